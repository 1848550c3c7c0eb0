package server

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// rpcMetrics counts every call in one interceptor: tokenbroker_requests_total
// and the grpc_server_* series of go-grpc-middleware's Prometheus provider
// (same names, help, labels and semantics, so that its dashboards and
// alerts keep working). Each method's series are resolved once, when it is
// registered, not hashed from their label values on every call: with the
// provider, five label lookups per call cost more than the token work.
type rpcMetrics struct {
	requests *prometheus.CounterVec   // method, code
	started  *prometheus.CounterVec   // grpc_type, grpc_service, grpc_method
	handled  *prometheus.CounterVec   // … grpc_code
	received *prometheus.CounterVec   // grpc_type, grpc_service, grpc_method
	sent     *prometheus.CounterVec   // grpc_type, grpc_service, grpc_method
	seconds  *prometheus.HistogramVec // grpc_type, grpc_service, grpc_method

	mu      sync.Mutex
	methods sync.Map // full method name → *methodSeries
}

// allCodes are the status codes gRPC defines, whose series every method has
// from the start.
const allCodes = codes.Unauthenticated + 1

// methodSeries are one method's series.
type methodSeries struct {
	typ, service, method   string
	started, rcvd, sent    prometheus.Counter
	seconds                prometheus.Observer
	handled                [allCodes]prometheus.Counter
	requests               [allCodes]atomic.Value // prometheus.Counter, made at a code's first use
	requestsName, fullName string
}

func newRPCMetrics() *rpcMetrics {
	labels := []string{"grpc_type", "grpc_service", "grpc_method"}
	return &rpcMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenbroker_requests_total",
			Help: "gRPC calls, by method and status code.",
		}, []string{"method", "code"}),
		started: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_started_total",
			Help: "Total number of RPCs started on the server.",
		}, labels),
		handled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_handled_total",
			Help: "Total number of RPCs completed on the server, regardless of success or failure.",
		}, append(labels[:3:3], "grpc_code")),
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_msg_received_total",
			Help: "Total number of RPC stream messages received on the server.",
		}, labels),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_msg_sent_total",
			Help: "Total number of gRPC stream messages sent by the server.",
		}, labels),
		seconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "grpc_server_handling_seconds",
			Help:    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, labels),
	}
}

// collectors are the vectors to register.
func (m *rpcMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.requests, m.started, m.handled, m.received, m.sent, m.seconds}
}

// initialize makes every series of every method registered on g, at zero.
func (m *rpcMetrics) initialize(g *grpc.Server) {
	for svc, info := range g.GetServiceInfo() {
		for _, mi := range info.Methods {
			typ := "unary"
			switch {
			case mi.IsClientStream && mi.IsServerStream:
				typ = "bidi_stream"
			case mi.IsClientStream:
				typ = "client_stream"
			case mi.IsServerStream:
				typ = "server_stream"
			}
			m.series("/"+svc+"/"+mi.Name, typ)
		}
	}
}

// series returns the series of fullMethod, making them at its first call.
func (m *rpcMetrics) series(fullMethod, typ string) *methodSeries {
	if v, ok := m.methods.Load(fullMethod); ok {
		return v.(*methodSeries)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if v, ok := m.methods.Load(fullMethod); ok {
		return v.(*methodSeries)
	}
	name := strings.TrimPrefix(fullMethod, "/")
	svc, method, _ := strings.Cut(name, "/")
	s := &methodSeries{typ: typ, service: svc, method: method, requestsName: name, fullName: fullMethod,
		started: m.started.WithLabelValues(typ, svc, method),
		rcvd:    m.received.WithLabelValues(typ, svc, method),
		sent:    m.sent.WithLabelValues(typ, svc, method),
		seconds: m.seconds.WithLabelValues(typ, svc, method)}
	for c := range allCodes {
		s.handled[c] = m.handled.WithLabelValues(typ, svc, method, c.String())
	}
	m.methods.Store(fullMethod, s)
	return s
}

// done counts a call of s that ended with err after d.
func (m *rpcMetrics) done(s *methodSeries, err error, d time.Duration) {
	code := status.Code(err)
	if code >= allCodes { // not a code gRPC defines
		m.handled.WithLabelValues(s.typ, s.service, s.method, code.String()).Inc()
		m.requests.WithLabelValues(s.requestsName, code.String()).Inc()
	} else {
		s.handled[code].Inc()
		r, _ := s.requests[code].Load().(prometheus.Counter)
		if r == nil { // tokenbroker_requests_total shows codes as they occur
			r = m.requests.WithLabelValues(s.requestsName, code.String())
			s.requests[code].Store(r)
		}
		r.Inc()
	}
	s.seconds.Observe(d.Seconds())
}

// unary is the unary interceptor.
func (m *rpcMetrics) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	t0 := time.Now()
	s := m.series(info.FullMethod, "unary")
	s.started.Inc()
	s.rcvd.Inc()
	resp, err := h(ctx, req)
	if err == nil {
		s.sent.Inc()
	}
	m.done(s, err, time.Since(t0))
	return resp, err
}

// stream is the stream interceptor.
func (m *rpcMetrics) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	t0 := time.Now()
	typ := "server_stream"
	switch {
	case info.IsClientStream && info.IsServerStream:
		typ = "bidi_stream"
	case info.IsClientStream:
		typ = "client_stream"
	}
	s := m.series(info.FullMethod, typ)
	s.started.Inc()
	err := h(srv, &countedStream{ServerStream: ss, s: s})
	m.done(s, err, time.Since(t0))
	return err
}

// countedStream counts a stream's messages.
type countedStream struct {
	grpc.ServerStream
	s *methodSeries
}

// SendMsg implements grpc.ServerStream.
func (c *countedStream) SendMsg(msg any) error {
	err := c.ServerStream.SendMsg(msg)
	if err == nil {
		c.s.sent.Inc()
	}
	return err
}

// RecvMsg implements grpc.ServerStream.
func (c *countedStream) RecvMsg(msg any) error {
	err := c.ServerStream.RecvMsg(msg)
	if err == nil {
		c.s.rcvd.Inc()
	}
	return err
}
