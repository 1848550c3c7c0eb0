// Package server runs tokenbroker: the TokenBroker gRPC API over mutual TLS
// (with grpc.health.v1 and, when configured, reflection) and the admin HTTP
// endpoints (/healthz, /readyz, /metrics). It builds the Broker, its store and its
// upstream clients from a validated config.Config.
//
// Shutdown is graceful: health turns NOT_SERVING, new calls are refused,
// in-flight calls finish within the grace period, then the store is closed.
package server

import (
	"cmp"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/audit"
	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/grpcapi"
	"github.com/tokenbroker/tokenbroker/broker/policy"
	"github.com/tokenbroker/tokenbroker/broker/tlsreload"
	"github.com/tokenbroker/tokenbroker/broker/upstream"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store"
)

// GracePeriod bounds how long shutdown waits for in-flight calls.
const GracePeriod = 20 * time.Second

// TLSReloadInterval is how often the TLS files are checked for changes.
const TLSReloadInterval = 5 * time.Second

// HandshakeTimeout bounds a new connection's TLS and HTTP/2 handshakes, so
// that connections that never present a certificate hold nothing for long.
const HandshakeTimeout = 10 * time.Second

// MaxStreamsPerConnection caps the concurrent calls on one connection (HTTP/2
// SETTINGS_MAX_CONCURRENT_STREAMS); a client queues calls beyond it. It is
// above rate_limit.watch_streams' default, so that a caller over that limit
// is told so rather than left queueing.
const MaxStreamsPerConnection = 2000

// streamWorkers is how many goroutines serve calls (grpc.NumStreamWorkers).
func streamWorkers() uint32 { return uint32(max(128, 2*runtime.GOMAXPROCS(0))) }

// maxMessageSize caps request messages: requests are small, and a cap keeps a
// misbehaving caller from making the server allocate.
const maxMessageSize = 64 << 10

// Options configures a Server.
type Options struct {
	// Config is a validated configuration. The Server keeps it (as it keeps
	// each one given to Reload): it must not change afterwards.
	Config *config.Config
	// Logger receives the process log; nil means none.
	Logger *zap.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// RefreshInterval is passed to the Broker (negative: no background refresher).
	RefreshInterval time.Duration
	// CheckInterval is passed to the Broker (zero: the default; negative: no
	// background checks of idle credentials).
	CheckInterval time.Duration
	// AuditStdout receives the audit trail when audit.path is "stdout"; nil means os.Stdout.
	AuditStdout io.Writer
	// TracerProvider, when set, traces every RPC (honouring an incoming W3C
	// traceparent), the store reads, lease waits, token endpoint requests
	// and Redis commands; nil means no tracing at all (see package tracing).
	TracerProvider trace.TracerProvider
	// Register, when set, registers more services on the gRPC server, which
	// then share its options and interceptors (benchmarks use it for a
	// same-bytes floor).
	Register func(*grpc.Server)
	// HandshakeTimeout and MaxStreamsPerConnection override the constants of
	// the same names when non-zero (tests use small values).
	HandshakeTimeout        time.Duration
	MaxStreamsPerConnection uint32
	// AuditDenialWindow overrides audit.DenialWindow when non-zero (tests).
	AuditDenialWindow time.Duration
}

// Server is a running tokenbroker. Create it with New, then call Run (or
// Listen and Serve to learn the bound addresses first).
type Server struct {
	tp        trace.TracerProvider // nil: tracing off
	cfg       *config.Config
	cfgNow    atomic.Pointer[config.Config] // the configuration in force: cfg, or the last reloaded
	materials materials
	log       *zap.Logger
	now       func() time.Time
	store     store.Store
	broker    *broker.Broker
	svc       *grpcapi.Service
	audit     *audit.Logger
	grpc      *grpc.Server
	health    *healthServer
	admin     *http.Server
	adminTLS  *adminTLS // nil: plain HTTP
	tls       *tlsreload.Reloader
	admins    atomic.Pointer[policy.Matcher] // admin.callers in force
	conns     *grpcapi.Conns
	connsShut *prometheus.CounterVec // reason
	front     *frontDoor             // limits: on the gRPC listener

	grpcLn, adminLn net.Listener
	serving         atomic.Bool

	registry *prometheus.Registry
	rpcs     *rpcMetrics
}

// New builds a Server from opts. It reads the TLS material and checks every
// credential, but opens no listener.
func New(opts Options) (_ *Server, err error) {
	s := &Server{cfg: opts.Config, log: opts.Logger, now: opts.Now}
	s.cfgNow.Store(opts.Config)
	if s.log == nil {
		s.log = zap.NewNop()
	}
	if s.now == nil {
		s.now = time.Now
	}
	minVersion := uint16(tls.VersionTLS13)
	if s.cfg.TLS.MinVersion == "1.2" {
		minVersion = tls.VersionTLS12
	}
	if s.tls, err = newTLS(s.cfg, minVersion, s.log); err != nil {
		return nil, err
	}
	if s.cfg.AdminTLS.CertFile != "" {
		if s.adminTLS, err = newAdminTLS(s.cfg.AdminTLS); err != nil {
			return nil, err
		}
	}
	defer func() {
		if err != nil {
			_ = s.tls.Close() // a Workload API watch
		}
	}()
	s.connsShut = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tokenbroker_connections_closed_total",
		Help: "Caller connections the broker closed because what admitted them no longer holds, by reason.",
	}, []string{"reason"})
	for _, r := range []string{grpcapi.ReasonCertificateExpired, grpcapi.ReasonTrustRemoved} {
		s.connsShut.WithLabelValues(r)
	}
	s.conns = grpcapi.NewConns(s.tls.Verify, func(id policy.Identity, reason string) {
		s.connsShut.WithLabelValues(reason).Inc()
		s.log.Warn("caller connection closed", zap.String("caller", string(id)), zap.String("reason", reason))
	})
	s.tp = opts.TracerProvider
	creds, err := brokerCredentials(s.cfg, s.now, s.tp)
	if err != nil {
		return nil, err
	}
	// Past this point s.cfg serves the keys that only a restart applies; the
	// credentials in force are cfgNow's. Without them, the first reload does
	// not keep a second copy of every credential alive.
	boot := *s.cfg
	boot.Credentials = nil
	s.cfg = &boot
	if s.store, err = newStore(s.cfg.Store, s.log, s.now, opts.TracerProvider); err != nil {
		return nil, err
	}
	if s.audit, err = audit.New(audit.Config{Path: s.cfg.Audit.Path, FailClosed: s.cfg.Audit.FailClosed, Stdout: opts.AuditStdout,
		DenialWindow: opts.AuditDenialWindow}); err != nil {
		_ = s.store.Close()
		return nil, err
	}
	rl := config.RateLimit{} // none when the config (built in code) has no section
	if s.cfg.RateLimit != nil {
		rl = *s.cfg.RateLimit
	}
	s.broker, err = broker.New(broker.Options{Credentials: creds, Store: s.store, Logger: s.log, Now: s.now,
		RefreshInterval: opts.RefreshInterval, CheckInterval: opts.CheckInterval, Audit: s.audit, Tracer: tracer(s.tp),
		RateLimit: rl.RequestsPerSecond, RateBurst: rl.Burst, WatchStreams: rl.WatchStreams,
		MaxBackoffWithWaiters: s.cfg.Retry.MaxBackoffWithWaiters.D(), MaxRetryAfter: s.cfg.Retry.MaxRetryAfter.D()})
	if err != nil {
		return nil, err
	}

	s.front = newFrontDoor(s.cfg.Limits, s.broker)
	s.registry = prometheus.NewRegistry()
	s.registry.MustRegister(s.front.collectors()...)
	// tokenbroker_requests_total and the grpc_server_* metrics (started,
	// handled, messages, handling time), for latency SLOs per method.
	s.rpcs = newRPCMetrics()
	s.registry.MustRegister(s.rpcs.collectors()...)
	storeUp := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "tokenbroker_store_up",
		Help:        "1 while the token store answers, 0 while the broker serves without it (fail-open).",
		ConstLabels: prometheus.Labels{"backend": s.store.Name()},
	}, func() float64 {
		if s.store.State() == "ok" {
			return 1
		}
		return 0
	})
	certExpiry := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "tokenbroker_server_certificate_expiry_timestamp_seconds",
		Help: "When the server certificate in use expires (Unix time); follows TLS reloads.",
	}, func() float64 { return float64(s.tls.Leaf().NotAfter.Unix()) })
	openConns := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "tokenbroker_connections_open",
		Help: "Caller connections open past their TLS handshake.",
	}, func() float64 { return float64(s.conns.Len()) })
	s.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		s.broker, storeUp, certExpiry, materialCollector{s}, s.connsShut, openConns)
	if r, ok := s.store.(*store.Redis); ok {
		s.registry.MustRegister(storeCollector{r})
	}

	handshake, streams := cmp.Or(opts.HandshakeTimeout, HandshakeTimeout), cmp.Or(opts.MaxStreamsPerConnection, MaxStreamsPerConnection)
	serverOpts := []grpc.ServerOption{}
	if s.tp != nil { // off, no handler at all: tracing costs nothing
		serverOpts = append(serverOpts, grpc.StatsHandler(otelgrpc.NewServerHandler(otelgrpc.WithTracerProvider(s.tp),
			otelgrpc.WithPropagators(propagation.TraceContext{}))))
	}
	serverOpts = append(serverOpts, s.front.serverOptions(s.rpcs.unary, s.rpcs.stream)...)
	s.grpc = grpc.NewServer(append(serverOpts,
		grpc.Creds(s.front.credentials(grpcapi.CallerCredentials(credentials.NewTLS(s.tls.ServerConfig()), s.conns))),
		grpc.ConnectionTimeout(handshake),
		grpc.MaxConcurrentStreams(streams),
		// Calls run on goroutines that live on, whose stacks have grown to
		// what the interceptors need, instead of a new goroutine's stack
		// growing (and being copied) on every call; a call finding every
		// worker busy gets a goroutine of its own, as without the option.
		grpc.NumStreamWorkers(streamWorkers()),
		grpc.MaxRecvMsgSize(maxMessageSize),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		// A connection re-proves its certificate at least this often (grpc-go
		// adds ±10% jitter so that a fleet does not reconnect at once).
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionAge:      s.maxConnectionAge(),
			MaxConnectionAgeGrace: cmp.Or(s.cfg.TLS.MaxConnectionAgeGrace.D(), config.DefaultMaxConnectionAgeGrace)}),
	)...)
	s.svc = grpcapi.NewService(s.broker, s.log, s.tp != nil)
	pb.RegisterTokenBrokerServer(s.grpc, s.svc)
	if err := s.setAdmins(s.cfg); err != nil {
		return nil, err
	}
	pb.RegisterAdminServer(s.grpc, &grpcapi.Admin{Callers: s.admins.Load, Describe: s.describe, Log: s.log})
	if opts.Register != nil {
		opts.Register(s.grpc)
	}
	s.health = newHealthServer()
	healthpb.RegisterHealthServer(s.grpc, s.health)
	if s.cfg.Reflection {
		reflection.Register(s.grpc)
	}
	s.rpcs.initialize(s.grpc) // every method shows at zero from the start

	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", s.readyz)
	if inventoryOverHTTP(s.cfg.AdminAddr) {
		mux.HandleFunc("GET /credentials", s.credentials)
	} else {
		mux.HandleFunc("GET /credentials", inventoryElsewhere)
	}
	mux.Handle("GET /metrics", s.metricsHandler())
	if s.cfg.Pprof {
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	s.admin = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	if s.adminTLS != nil {
		s.admin.Handler = s.adminTLS.guard(mux)
		// Failed handshakes (a scanner, a probe cut short) as JSON debug lines, not plain stderr.
		if s.admin.ErrorLog, err = zap.NewStdLogAt(s.log.Named("admin"), zap.DebugLevel); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// setAdmins puts cfg's admin.callers in force.
func (s *Server) setAdmins(cfg *config.Config) error {
	m, err := policy.Compile(cfg.Admin.Callers)
	if err != nil {
		return fmt.Errorf("admin.callers: %w", err)
	}
	s.admins.Store(m)
	return nil
}

// brokerCredentials builds the Broker's credentials, with their caller
// policies and upstream fetchers, from cfg, which the credentials keep: it
// must not change afterwards. Each credential's upstream configuration is
// checked here (a client is made of it and let go); its client proper is
// made at its first fetch (see fetcher).
func brokerCredentials(cfg *config.Config, now func() time.Time, tp trace.TracerProvider) ([]broker.Credential, error) {
	out := make([]broker.Credential, 0, len(cfg.Credentials))
	env := &upstreamEnv{now: now, tp: tp}
	for i := range cfg.Credentials {
		c := &cfg.Credentials[i]
		ring, err := keyringFor(*c)
		if err != nil {
			return nil, err
		}
		if _, err := upstream.New(upstreamConfig(c, ring, env)); err != nil {
			return nil, fmt.Errorf("%s: %w", c.Key(), err)
		}
		rules, err := callerRules(*c)
		if err != nil {
			return nil, err
		}
		callers, err := policy.CompileRules(rules)
		if err != nil {
			return nil, fmt.Errorf("%s.allowed_callers: %w", c.Key(), err)
		}
		out = append(out, broker.Credential{
			Name: c.Name, Scopes: c.Scopes, MinTTL: c.MinTTL.D(), Callers: callers,
			Fetcher:     &fetcher{cr: c, ring: ring, env: env},
			Timeout:     c.Timeout.D(), // the lease is one fetch plus broker.LeaseSlack
			RefreshAt:   c.RefreshAt,
			IdleTimeout: c.IdleTimeout.D(),
			TokenURL:    c.TokenURL, ClientID: c.ClientID, EndpointParams: c.EndpointParams,
			DPoP:    ring,
			Secrets: len(c.ClientSecretFiles) + min(len(c.ClientSecretFile), 1),
		})
	}
	return out, nil
}

// Listen binds the gRPC and admin listeners.
func (s *Server) Listen() error {
	var err error
	if s.grpcLn, err = net.Listen("tcp", s.cfg.ListenAddr); err != nil {
		return fmt.Errorf("listen_addr: %w", err)
	}
	s.grpcLn = s.front.listener(s.grpcLn)
	if s.adminLn, err = net.Listen("tcp", s.cfg.AdminAddr); err != nil {
		_ = s.grpcLn.Close()
		return fmt.Errorf("admin_addr: %w", err)
	}
	if s.adminTLS != nil {
		s.adminLn = tls.NewListener(s.adminLn, s.adminTLS.serverConfig())
	}
	return nil
}

// GRPCAddr is the bound gRPC address, after Listen.
func (s *Server) GRPCAddr() net.Addr { return s.grpcLn.Addr() }

// AdminAddr is the bound admin HTTP address, after Listen.
func (s *Server) AdminAddr() net.Addr { return s.adminLn.Addr() }

// Run listens and serves until ctx is done, then shuts down gracefully.
func (s *Server) Run(ctx context.Context) error {
	if err := s.Listen(); err != nil {
		return err
	}
	return s.Serve(ctx)
}

// Serve serves on the listeners bound by Listen until ctx is done or a
// listener fails, then shuts down gracefully.
func (s *Server) Serve(ctx context.Context) error {
	errc := make(chan error, 2)
	go func() {
		if err := s.grpc.Serve(s.grpcLn); err != nil { // nil after Stop/GracefulStop
			errc <- err
		}
	}()
	go func() {
		if err := s.admin.Serve(s.adminLn); !errors.Is(err, http.ErrServerClosed) {
			errc <- err
		}
	}()
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	s.health.SetServingStatus(pb.TokenBroker_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	s.serving.Store(true)
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go func() {
		reload, sweep := time.NewTicker(TLSReloadInterval), time.NewTicker(time.Second)
		defer reload.Stop()
		defer sweep.Stop()
		for {
			select {
			case <-watchCtx.Done():
				return
			case <-reload.C:
				_, _ = s.ReloadTLS()
			case <-sweep.C:
				// The wall clock, in case a suspended VM or a stepped clock
				// left the per-connection expiry timers behind.
				s.conns.Sweep(time.Now())
			case <-s.tls.Updated(): // from the SPIFFE Workload API
				_, _ = s.ReloadTLS()
			}
		}
	}()
	s.log.Info("serving", zap.Stringer("grpc_addr", s.GRPCAddr()), zap.Stringer("admin_addr", s.AdminAddr()),
		zap.Int("credentials", len(s.cfgNow.Load().Credentials)), zap.String("store", s.store.Name()))

	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
		err = fmt.Errorf("serve: %w", err)
	}
	s.shutdown()
	return err
}

// ReloadTLS re-reads the TLS files. When they changed, new handshakes use
// them at once, and every open connection whose client chain no longer
// verifies against the new trust material is closed. It reports whether the
// material changed; on error the previous material stays in force.
func (s *Server) ReloadTLS() (bool, error) {
	changed, err := s.tls.Reload()
	if err != nil {
		s.log.Error("new TLS material does not load; the previous stays in force", zap.Error(err))
		return false, err
	}
	if changed {
		closed := s.conns.Recheck(time.Now())
		s.log.Info("TLS material reloaded", zap.String("subject", s.tls.Leaf().Subject.String()),
			zap.Time("not_after", s.tls.Leaf().NotAfter), zap.Int("connections_closed", closed))
	}
	return changed, nil
}

func (s *Server) shutdown() {
	s.log.Info("shutting down", zap.Duration("grace_period", GracePeriod))
	s.serving.Store(false)
	s.health.Drain() // NOT_SERVING first, so balancers stop sending
	s.svc.Drain()    // watch streams end with UNAVAILABLE; their clients reconnect elsewhere
	done := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(GracePeriod):
		s.log.Warn("grace period over; closing remaining calls")
		s.grpc.Stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = s.admin.Shutdown(ctx)
	s.broker.Close()
	if err := s.audit.Close(); err != nil { // flushes buffered events
		s.log.Warn("audit close failed", zap.Error(err))
	}
	if err := s.store.Close(); err != nil {
		s.log.Warn("store close failed", zap.Error(err))
	}
	_ = s.tls.Close()
	s.log.Info("stopped")
}

// readyz reports whether this process can serve. Only its own state counts:
// a shared dependency's trouble would fail every replica at once.
func (s *Server) readyz(w http.ResponseWriter, _ *http.Request) {
	checks := map[string]string{"config": "ok", "grpc_listener": "ok", "tls": "ok"}
	ready := true
	if !s.serving.Load() {
		checks["grpc_listener"], ready = "not serving", false
	}
	if leaf := s.tls.Leaf(); s.now().After(leaf.NotAfter) {
		checks["tls"], ready = "server certificate expired at "+leaf.NotAfter.UTC().Format(time.RFC3339), false
	}
	code, st := http.StatusOK, "ready"
	if !ready {
		code, st = http.StatusServiceUnavailable, "not ready"
	}
	// The store's state is shown but never fails readiness: a Redis outage is
	// shared by every replica, and the broker serves through it (fail-open).
	// Credential health is shown too, and does not fail readiness either: a
	// refused registration or a failing token endpoint is the same for all
	// replicas. "state" sums both up: "degraded" while either is not ok.
	creds := s.broker.Health()
	body := map[string]any{"status": st, "state": overallState(s.store, creds), "checks": checks,
		"store": storeDetail(s.store), "credentials": creds}
	if wl := s.tls.WorkloadState(); wl != nil { // shown; the SVID's expiry above is what fails readiness
		body["spiffe"] = wl
	}
	writeJSON(w, code, body)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// NewLogger returns the process logger: JSON lines to w at level.
func NewLogger(level string, w io.Writer) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("log.level: %w", err)
	}
	enc := zap.NewProductionEncoderConfig()
	enc.TimeKey = "time"
	enc.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.Lock(zapcore.AddSync(w)), lvl)
	return zap.New(core), nil
}

// tracer is the broker's tracer: tp's, or nil (off) without one.
func tracer(tp trace.TracerProvider) trace.Tracer {
	if tp == nil {
		return nil
	}
	return tp.Tracer("github.com/tokenbroker/tokenbroker/broker")
}
