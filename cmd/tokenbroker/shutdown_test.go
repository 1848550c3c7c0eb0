package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker/client"
	"github.com/tokenbroker/tokenbroker/broker/devmode"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	"github.com/tokenbroker/tokenbroker/broker/server"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// lockedBuffer collects a child process's output for reading while it runs.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestSIGTERMUnderLoad runs the real binary against Redis and a slow token
// endpoint, sends SIGTERM while calls wait for the endpoint, and checks the
// order of a graceful shutdown: health says NOT_SERVING first, new calls get
// UNAVAILABLE, the calls in flight complete with a token, the fetch lease is
// released, the audit trail is flushed, and the process exits 0 within the
// grace period.
func TestSIGTERMUnderLoad(t *testing.T) {
	rdb := redistest.Start(t)
	grpcAddr := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	adminAddr := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	env, err := devmode.Start(devmode.Options{Dir: filepath.Join(t.TempDir(), "dev"), ListenAddr: grpcAddr, AdminAddr: adminAddr, RedisAddr: rdb.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()

	p := startBinary(t, buildBinary(t), nil, adminAddr, "--config", env.Path(devmode.ConfigFile))

	tc, err := client.TLSFiles{CAFile: env.Path(devmode.CAFile), CertFile: env.Path(devmode.ClientCertFile),
		KeyFile: env.Path(devmode.ClientKeyFile)}.TLSConfig()
	if err != nil {
		t.Fatal(err)
	}
	conn, err := client.Dial(grpcAddr, tc)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	tb := pb.NewTokenBrokerClient(conn)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	watch, err := healthpb.NewHealthClient(conn).Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := watch.Recv(); err != nil || m.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health before SIGTERM = %v, %v; want SERVING", m.GetStatus(), err)
	}

	// Calls in flight: the token endpoint answers after a second.
	const inFlight = 20
	env.OAuth.SetFaults(oauthtest.Faults{Latency: time.Second})
	type result struct {
		err  error
		done time.Time
	}
	results := make(chan result, inFlight)
	for range inFlight {
		go func() {
			_, err := tb.GetToken(ctx, &pb.GetTokenRequest{Credential: devmode.Credential})
			results <- result{err, time.Now()}
		}()
	}
	for deadline := time.Now().Add(10 * time.Second); env.OAuth.TokenRequests() == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the token endpoint saw no request")
		}
	}
	time.Sleep(100 * time.Millisecond) // let every call reach the broker

	sent := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}

	// Health turns NOT_SERVING, then the stream ends so it cannot hold shutdown.
	m, err := watch.Recv()
	if err != nil || m.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("health after SIGTERM = %v, %v; want NOT_SERVING", m.GetStatus(), err)
	}
	notServing := time.Now()
	if _, err := watch.Recv(); status.Code(err) != codes.Unavailable {
		t.Errorf("health stream after NOT_SERVING ended with %v, want UNAVAILABLE", err)
	}

	// New calls, on the open connection and on a new one, get UNAVAILABLE.
	time.Sleep(100 * time.Millisecond)
	if _, err := tb.GetToken(ctx, &pb.GetTokenRequest{Credential: devmode.Credential}); status.Code(err) != codes.Unavailable {
		t.Errorf("new call on the open connection while draining = %v, want UNAVAILABLE", err)
	}
	fresh, err := client.Dial(grpcAddr, tc)
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	if _, err := pb.NewTokenBrokerClient(fresh).GetToken(ctx, &pb.GetTokenRequest{Credential: devmode.Credential}); status.Code(err) != codes.Unavailable {
		t.Errorf("new call on a new connection while draining = %v, want UNAVAILABLE", err)
	}

	// The calls in flight complete, with a token, after NOT_SERVING was sent.
	for range inFlight {
		r := <-results
		if r.err != nil {
			t.Errorf("in-flight call: %v, want a token", r.err)
		} else if !r.done.After(notServing) {
			t.Errorf("an in-flight call completed before health turned NOT_SERVING")
		}
	}

	select {
	case err := <-p.exited:
		if err != nil {
			t.Fatalf("tokenbroker exited with %v, want 0", err)
		}
	case <-time.After(server.GracePeriod + 5*time.Second):
		t.Fatalf("tokenbroker still running %v after SIGTERM", server.GracePeriod+5*time.Second)
	}
	took := time.Since(sent)
	t.Logf("exit 0 %v after SIGTERM", took.Round(time.Millisecond))
	if took > server.GracePeriod {
		t.Errorf("exit took %v, longer than the grace period %v", took, server.GracePeriod)
	}

	// The fetch lease is released and the token is in Redis for the next replica.
	keys, err := rdb.Client().Keys(context.Background(), "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	var tokens int
	for _, k := range keys {
		if strings.HasSuffix(k, ":lock") {
			t.Errorf("lease %q left in Redis after shutdown", k)
		} else {
			tokens++
		}
	}
	if tokens == 0 {
		t.Errorf("no token stored in Redis; keys %v", keys)
	}
	// Every in-flight issuance reached the audit trail before exit.
	if n := strings.Count(p.stdout.String(), `"event":"token.issued"`); n != inFlight {
		t.Errorf("audit trail has %d token.issued events, want %d", n, inFlight)
	}
	if !strings.Contains(p.stderr.String(), `"msg":"stopped"`) {
		t.Errorf("log has no \"stopped\" line")
	}
}

// waitReady polls url until it answers 200, failing if the process exits.
// buildBinary builds tokenbroker from this directory into a temporary one.
func buildBinary(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "tokenbroker")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// process is a running tokenbroker binary.
type process struct {
	cmd            *exec.Cmd
	exited         chan error // receives Wait's result
	stdout, stderr lockedBuffer
}

// startBinary starts bin with args, in env (nil: this process's), and waits
// until its /readyz on adminAddr answers 200. The process is killed at the
// end of the test, and its stderr logged if the test failed.
func startBinary(t testing.TB, bin string, env []string, adminAddr string, args ...string) *process {
	t.Helper()
	p := &process{cmd: exec.Command(bin, args...), exited: make(chan error, 1)}
	p.cmd.Env = env
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.exited <- p.cmd.Wait() }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		if t.Failed() {
			t.Logf("tokenbroker stderr:\n%s", p.stderr.String())
		}
	})
	waitReady(t, "http://"+adminAddr+"/readyz", p.exited)
	return p
}

func waitReady(t testing.TB, url string, exited <-chan error) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-exited:
			t.Fatalf("tokenbroker exited before it was ready: %v", err)
		default:
		}
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready after 30s: %v", url, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
