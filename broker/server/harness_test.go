package server

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// Identities used across the end-to-end tests.
const (
	payments = "spiffe://bank.internal/ns/payments/sa/api"
	kycWork  = "spiffe://bank.internal/ns/kyc/sa/worker"
	kycx     = "spiffe://bank.internal/ns/kycx/sa/worker"
	stranger = "spiffe://bank.internal/ns/other/sa/x"
	readOnly = "spiffe://bank.internal/ns/audit/sa/reader" // allowed IDENTITY_READ only
	tokenTTL = time.Hour
)

// clock is a settable clock shared by the broker and the authorization server.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Now()} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// logBuffer collects the server's JSON log lines.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// harness is a real tokenbroker on loopback (mTLS gRPC and admin HTTP) in
// front of a real oauthtest authorization server.
type harness struct {
	t      testing.TB
	ca     *devpki.CA
	as     *oauthtest.Server
	srv    *Server
	clock  *clock
	logs   *logBuffer
	audit  *logBuffer // the audit trail (audit.path: stdout)
	secret string
	dir    string

	mu     sync.Mutex
	tokens map[string]bool // every distinct access token handed to a test caller

	stop func() error // cancels the first broker's Serve and waits for it to return

	cfg      *config.Config // the brokers' configuration
	adjust   func(*Options) // changes the brokers' options, when set
	secrets  []string       // more secret values (keys in PEM) the log scan looks for
	storeKey []byte         // the Redis sealing key
}

// newHarness starts a broker whose config mutate may adjust.
func newHarness(t testing.TB, mutate func(*config.Config)) *harness {
	t.Helper()
	return newHarnessWith(t, mutate, nil)
}

// newHarnessWith is newHarness with the server's Options adjusted too.
func newHarnessWith(t testing.TB, mutate func(*config.Config), adjust func(*Options)) *harness {
	t.Helper()
	h := &harness{adjust: adjust, t: t, clock: newClock(), logs: &logBuffer{}, audit: &logBuffer{}, dir: t.TempDir(), secret: "s3cret-" + t.Name()}
	var err error
	if h.ca, err = devpki.NewCA("test CA", time.Hour); err != nil {
		t.Fatal(err)
	}
	srvPair, err := h.ca.Server(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, caFile := h.path("server.pem"), h.path("server-key.pem"), h.path("ca.pem")
	if err := srvPair.WriteFiles(certFile, keyFile); err != nil {
		t.Fatal(err)
	}
	if err := h.ca.WriteCertFile(caFile); err != nil {
		t.Fatal(err)
	}
	h.write("secret", h.secret+"\n")
	h.storeKey = make([]byte, 32)
	if _, err := rand.Read(h.storeKey); err != nil {
		t.Fatal(err)
	}
	h.write("store-key", base64.StdEncoding.EncodeToString(h.storeKey)+"\n")

	h.as = oauthtest.New(oauthtest.Options{ExpiresIn: tokenTTL, Now: h.clock.Now})
	h.as.AddClient(oauthtest.Client{ID: "broker", Secret: h.secret, Scopes: []string{"IDENTITY", "IDENTITY_READ"}})
	if err := h.as.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.as.Close() })

	cfg := &config.Config{
		ListenAddr: "127.0.0.1:0",
		AdminAddr:  "127.0.0.1:0",
		Reflection: true,
		TLS:        config.TLS{CertFile: certFile, KeyFile: keyFile, ClientCAFile: caFile, MinVersion: "1.3"},
		Log:        config.Log{Level: "debug"},
		Audit:      config.Audit{Path: "stdout"},
		RateLimit:  &config.RateLimit{}, // off, as most tests hammer one caller
		Store: config.Store{Backend: "memory", EncryptionKeyFile: h.path("store-key"),
			Redis: config.Redis{KeyPrefix: "tb-test:"}},
		Credentials: []config.Credential{{
			Name:             "identity",
			TokenURL:         h.as.TokenURL(),
			ClientID:         "broker",
			ClientSecretFile: h.path("secret"),
			AuthMethod:       "client_secret_post",
			Scopes:           []string{"IDENTITY", "IDENTITY_READ"},
			DefaultTTL:       config.Duration(5 * time.Minute),
			MaxTTL:           config.Duration(24 * time.Hour),
			MinTTL:           config.Duration(30 * time.Second),
			Timeout:          config.Duration(2 * time.Second),
			IdleTimeout:      config.Duration(config.DefaultIdle),
			ExpiryMargin:     config.Duration(config.DefaultMargin),
			AllowedCallers: []config.AllowedCaller{{Caller: payments}, {Caller: "spiffe://bank.internal/ns/kyc/*"},
				{Caller: "dns:reporting.internal"}, {Caller: readOnly, Scopes: []string{"IDENTITY_READ"}}},
		}},
	}
	if mutate != nil {
		mutate(cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("test config: %v", err)
	}
	h.cfg = cfg
	h.srv, h.stop = h.startBroker()
	t.Cleanup(func() {
		if err := h.stop(); err != nil {
			t.Errorf("Serve: %v", err)
		}
		h.checkLogsClean()
	})
	return h
}

// startBroker starts another broker replica on h.cfg. stop cancels its Serve
// and returns what Serve returned; cleanup calls it too.
func (h *harness) startBroker() (srv *Server, stop func() error) {
	h.t.Helper()
	log, err := NewLogger(h.cfg.Log.Level, h.logs)
	if err != nil {
		h.t.Fatal(err)
	}
	// The tests drive the refresher themselves, on the fake clock.
	opts := Options{Config: h.cfg, Logger: log, Now: h.clock.Now, RefreshInterval: -1, AuditStdout: h.audit}
	if h.adjust != nil {
		h.adjust(&opts)
	}
	srv, err = New(opts)
	if err != nil {
		h.t.Fatal(err)
	}
	if err := srv.Listen(); err != nil {
		h.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	var once sync.Once
	var serveErr error
	stop = func() error {
		once.Do(func() { cancel(); serveErr = <-done })
		return serveErr
	}
	h.t.Cleanup(func() { _ = stop() })
	return srv, stop
}

func (h *harness) path(name string) string { return filepath.Join(h.dir, name) }

func (h *harness) write(name, content string) {
	h.t.Helper()
	if err := os.WriteFile(h.path(name), []byte(content), 0o600); err != nil {
		h.t.Fatal(err)
	}
}

// conn dials the broker with a client certificate for ids, issued by ca
// (the broker's trusted CA when ca is nil). A nil ids list means no client
// certificate at all.
func (h *harness) conn(ca *devpki.CA, ids ...string) *grpc.ClientConn {
	h.t.Helper()
	return h.connTo(h.srv, ca, ids...)
}

// connTo is conn to a given broker replica.
func (h *harness) connTo(srv *Server, ca *devpki.CA, ids ...string) *grpc.ClientConn {
	h.t.Helper()
	if ca == nil {
		ca = h.ca
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: h.ca.Pool()}
	if ids != nil {
		pair, err := ca.Client(time.Hour, ids...)
		if err != nil {
			h.t.Fatal(err)
		}
		cert, err := pair.TLSCertificate()
		if err != nil {
			h.t.Fatal(err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	conn, err := grpc.NewClient(srv.GRPCAddr().String(), grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// client returns a TokenBroker client for a caller with identities ids.
func (h *harness) client(ids ...string) pb.TokenBrokerClient {
	return pb.NewTokenBrokerClient(h.conn(nil, ids...))
}

// get calls GetToken and records any token returned, for the log scan.
func (h *harness) get(c pb.TokenBrokerClient, req *pb.GetTokenRequest) (*pb.Token, error) {
	return h.getWithin(c, req, 10*time.Second)
}

// getWithin is get with a deadline of d. Tests that move the fake clock
// through an outage use a short one: a caller waits (on the real clock) for
// a retry due before its deadline.
func (h *harness) getWithin(c pb.TokenBrokerClient, req *pb.GetTokenRequest, d time.Duration) (*pb.Token, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	resp, err := c.GetToken(ctx, req)
	if err != nil {
		h.checkClean("status message", status.Convert(err).Message())
		return nil, err
	}
	h.mu.Lock()
	if h.tokens == nil {
		h.tokens = map[string]bool{}
	}
	h.tokens[resp.GetToken().GetAccessToken()] = true
	h.mu.Unlock()
	return resp.GetToken(), nil
}

// checkClean fails the test if text holds the client secret, other secret
// material or an access token handed out so far.
func (h *harness) checkClean(what, text string) {
	h.t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, sec := range append([]string{h.secret}, h.secrets...) {
		if sec != "" && strings.Contains(text, sec) {
			h.t.Errorf("secret material in a %s", what)
		}
	}
	for tok := range h.tokens {
		if strings.Contains(text, tok) {
			h.t.Errorf("an access token in a %s", what)
		}
	}
}

// checkLogsClean fails the test if the client secret or any access token
// handed out appears in the server's log.
func (h *harness) checkLogsClean() {
	h.t.Helper()
	logs := h.logs.String()
	if !strings.Contains(logs, `"msg":"serving"`) {
		h.t.Errorf("log capture is empty or broken: %q", logs)
	}
	logs += h.audit.String() // the audit trail is held to the same rule
	if strings.Contains(logs, h.secret) {
		h.t.Errorf("client secret found in logs")
	}
	for _, sec := range h.secrets {
		if strings.Contains(logs, sec) {
			h.t.Errorf("secret material found in logs")
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for tok := range h.tokens {
		if tok != "" && strings.Contains(logs, tok) {
			h.t.Errorf("access token %s… found in logs", tok[:8])
		}
	}
}
