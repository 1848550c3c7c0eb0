package server

import (
	"context"
	"crypto/tls"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/tokenbroker/tokenbroker/broker/client"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// TestTracesOfAColdGetToken: with tracing on, a cold GetToken from a Go
// caller in a trace of its own produces, in that trace, the broker's server
// span (credential, source, fingerprint, outcome) and child spans for the
// store read, the lease wait, the token endpoint request and the Redis
// commands. No span holds a token, a secret or the form.
func TestTracesOfAColdGetToken(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	rs := redistest.Start(t)
	h := newHarnessWith(t, withRedis("", rs.Addr()), func(o *Options) { o.TracerProvider = tp })
	second, _ := h.startBroker()
	h.as.SetFaults(oauthtest.Faults{Latency: 300 * time.Millisecond}) // both replicas' callers arrive during the fetch

	// The caller's own trace, propagated as W3C traceparent by broker/client.
	prev := otel.GetTextMapPropagator()
	otel.SetTextMapPropagator(propagation.TraceContext{})
	t.Cleanup(func() { otel.SetTextMapPropagator(prev) })
	callerTP := sdktrace.NewTracerProvider()
	ctx, parent := callerTP.Tracer("caller").Start(context.Background(), "caller work")
	defer parent.End()

	pair, err := h.ca.Client(time.Hour, payments)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pair.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: h.ca.Pool(), Certificates: []tls.Certificate{cert}}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var tok string
	for _, srv := range []*Server{h.srv, second} {
		conn, err := client.Dial(srv.GRPCAddr().String(), tc)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ts := client.TokenSource(conn, "identity")
		wg.Go(func() {
			got, err := ts.TokenContext(ctx)
			if err != nil {
				t.Errorf("GetToken: %v", err)
				return
			}
			mu.Lock()
			tok = got.AccessToken
			mu.Unlock()
		})
	}
	wg.Wait()
	if tok == "" {
		t.FailNow()
	}
	h.mu.Lock()
	h.tokens = map[string]bool{tok: true}
	h.mu.Unlock()

	spans := exp.GetSpans()
	byName := map[string][]tracetest.SpanStub{}
	for _, s := range spans {
		byName[s.Name] = append(byName[s.Name], s)
	}
	servers := byName["tokenbroker.v1.TokenBroker/GetToken"]
	if len(servers) != 2 {
		t.Fatalf("server spans = %d, want 2 (one per replica); spans: %v", len(servers), names(spans))
	}
	sources := map[string]bool{}
	for _, s := range servers {
		if s.SpanContext.TraceID() != parent.SpanContext().TraceID() || s.Parent.SpanID() != parent.SpanContext().SpanID() {
			t.Errorf("server span not in the caller's trace: %v", s.SpanContext.TraceID())
		}
		attrs := attrMap(s)
		if attrs["tokenbroker.credential"] != "identity" || attrs["tokenbroker.outcome"] != "ok" || attrs["tokenbroker.fingerprint"] == "" {
			t.Errorf("server span attributes = %v", attrs)
		}
		sources[attrs["tokenbroker.source"]] = true
	}
	if !sources["upstream"] || !sources["redis"] {
		t.Errorf("sources = %v, want one replica to fetch (upstream) and the other to read Redis after waiting", sources)
	}
	for _, name := range []string{"tokenbroker.store.get", "tokenbroker.lease.wait", "tokenbroker.token_endpoint", "HTTP POST"} {
		if len(byName[name]) == 0 {
			t.Errorf("no %q span; spans: %v", name, names(spans))
		}
		for _, s := range byName[name] {
			if s.SpanContext.TraceID() != parent.SpanContext().TraceID() {
				t.Errorf("%s span in another trace", name)
			}
		}
	}
	redisSpans := 0
	for _, s := range spans {
		if attrMap(s)["db.system"] == "redis" || attrMap(s)["db.system.name"] == "redis" {
			redisSpans++
		}
	}
	if redisSpans == 0 {
		t.Errorf("no Redis command spans; spans: %v", names(spans))
	}

	// Nothing secret in any span: names, attributes, events, status.
	for _, s := range spans {
		text := s.Name + " " + s.Status.Description
		for _, a := range s.Attributes {
			text += " " + string(a.Key) + "=" + a.Value.Emit()
		}
		for _, e := range s.Events {
			text += " " + e.Name
			for _, a := range e.Attributes {
				text += " " + a.Value.Emit()
			}
		}
		h.checkClean("span", text)
		for _, form := range []string{"client_secret", "grant_type", "client_id=broker"} {
			if strings.Contains(text, form) {
				t.Errorf("span %q holds the token request's form (%s)", s.Name, form)
			}
		}
	}
}

func attrMap(s tracetest.SpanStub) map[string]string {
	m := map[string]string{}
	for _, a := range s.Attributes {
		m[string(a.Key)] = a.Value.Emit()
	}
	return m
}

func names(spans tracetest.SpanStubs) []string {
	var out []string
	for _, s := range spans {
		out = append(out, s.Name)
	}
	return out
}
