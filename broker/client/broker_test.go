package client_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/tokenbroker/tokenbroker/broker/client"
	"github.com/tokenbroker/tokenbroker/broker/devmode"
	"github.com/tokenbroker/tokenbroker/broker/server"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// The package's tests run against real brokers in dev mode (a real token
// endpoint, real mTLS on loopback); the Examples against one started here.

// testBroker is a running tokenbroker on a dev environment.
type testBroker struct {
	env  *devmode.Env
	addr string
	stop func() error
}

// startBroker starts a broker for env on addr ("127.0.0.1:0" for any port).
func startBroker(env *devmode.Env, addr string) (*testBroker, error) {
	cfg := *env.Config
	cfg.ListenAddr, cfg.AdminAddr = addr, "127.0.0.1:0"
	cfg.Audit.Path = filepath.Join(env.Dir, "audit.log") // keep stdout for the Examples' output
	srv, err := server.New(server.Options{Config: &cfg})
	if err != nil {
		return nil, err
	}
	if err := srv.Listen(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	var stopped atomic.Bool
	var serveErr error
	stop := func() error {
		if stopped.CompareAndSwap(false, true) {
			cancel()
			serveErr = <-done
		}
		return serveErr
	}
	return &testBroker{env: env, addr: srv.GRPCAddr().String(), stop: stop}, nil
}

// newBroker starts a dev environment and a broker on it for t.
func newBroker(t *testing.T) *testBroker {
	t.Helper()
	env, err := devmode.Start(devmode.Options{Dir: filepath.Join(t.TempDir(), "dev")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Close() })
	b, err := startBroker(env, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.stop() })
	return b
}

// restart stops the broker and starts a new one on the same address. The
// store is in memory, so the new broker fetches a new token.
func (b *testBroker) restart(t *testing.T) {
	t.Helper()
	if err := b.stop(); err != nil {
		t.Fatal(err)
	}
	nb, err := startBroker(b.env, b.addr)
	if err != nil {
		t.Fatal(err)
	}
	b.stop = nb.stop
	t.Cleanup(func() { _ = nb.stop() })
}

// files are the dev caller's TLS files.
func (b *testBroker) files() client.TLSFiles {
	return client.TLSFiles{CAFile: b.env.Path(devmode.CAFile), CertFile: b.env.Path(devmode.ClientCertFile),
		KeyFile: b.env.Path(devmode.ClientKeyFile)}
}

// calls counts the RPCs made on a connection, by method name.
type calls struct {
	get, invalidate, watch atomic.Int64
}

func (c *calls) options() []grpc.DialOption {
	count := func(method string) {
		switch method[strings.LastIndexByte(method, '/')+1:] {
		case "GetToken":
			c.get.Add(1)
		case "InvalidateToken":
			c.invalidate.Add(1)
		case "WatchToken":
			c.watch.Add(1)
		}
	}
	return []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
			invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			count(method)
			return invoker(ctx, method, req, reply, cc, opts...)
		}),
		grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string,
			streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			count(method)
			return streamer(ctx, desc, cc, method, opts...)
		}),
	}
}

// conn dials b with the dev caller's files, counting the calls made.
func (b *testBroker) conn(t *testing.T) (*grpc.ClientConn, *calls) {
	t.Helper()
	c := &calls{}
	conn, err := client.DialFiles(b.addr, b.files(), c.options()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn, c
}

// rotate makes the broker drop its current token, as a resource server's
// rejection reported by another process would.
func (b *testBroker) rotate(t *testing.T, fingerprint string) {
	t.Helper()
	conn, err := client.DialFiles(b.addr, b.files())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	resp, err := pb.NewTokenBrokerClient(conn).InvalidateToken(context.Background(),
		&pb.InvalidateTokenRequest{Credential: devmode.Credential, Fingerprint: fingerprint})
	if err != nil || !resp.GetInvalidated() {
		t.Fatalf("InvalidateToken = %v, %v; want it invalidated", resp, err)
	}
}

// eventually polls cond every 10ms for up to 10s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after 10s: %s", what)
		}
	}
}

// The Examples' broker, caller files and bank API, set by TestMain.
var (
	brokerTarget = "dns:///tokenbroker.tokenbroker.svc.cluster.local:8443"
	callerFiles  = client.TLSFiles{
		CAFile:   "/etc/tokenbroker-client/ca.crt",
		CertFile: "/etc/tokenbroker-client/tls.crt",
		KeyFile:  "/etc/tokenbroker-client/tls.key",
	}
	identityAPI = "https://api.bank.example"
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

// runMain starts the Examples' broker and a stand-in for the bank's API that
// accepts only tokens the dev authorization server issued, sent as Bearer.
func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "tokenbroker-client-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	env, err := devmode.Start(devmode.Options{Dir: dir})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer env.Close()
	b, err := startBroker(env, "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer b.stop()
	api := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if _, issued := env.OAuth.Lookup(tok); !ok || !issued || r.URL.RawQuery != "" {
			http.Error(w, "invalid_token", http.StatusUnauthorized)
			return
		}
		fmt.Fprintln(w, `{"subject":"example"}`)
	}))
	defer api.Close()
	http.DefaultTransport = api.Client().Transport // trusts the stand-in's certificate

	brokerTarget, callerFiles, identityAPI = b.addr, b.files(), api.URL
	return m.Run()
}
