package server

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// The perf benchmarks measure servers in processes of their own, so that the
// server's CPU is its own (read from the process, not shared with the load
// generator) and it can be held to one CPU: GOMAXPROCS=1, and pinned with
// taskset to the CPU in TOKENBROKER_PERF_SERVER_CPU when that is set. The
// test binary is that process: TestMain turns into a server when
// perfChildEnv names one.
const (
	perfChildEnv  = "TOKENBROKER_PERF_CHILD"  // "broker" or "bare"
	perfConfigEnv = "TOKENBROKER_PERF_CONFIG" // broker: the config file; bare: a perfBare file
	perfCPUEnv    = "TOKENBROKER_PERF_SERVER_CPU"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(perfChildEnv); mode != "" {
		if err := perfChild(mode, os.Getenv(perfConfigEnv)); err != nil {
			fmt.Fprintln(os.Stderr, "perf child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// perfAddrs is what a child prints on its first line of stdout.
type perfAddrs struct {
	GRPC, Admin, Control string
}

// perfBare configures the bare floor: the broker's TLS files and a response.
type perfBare struct {
	CertFile, KeyFile, CAFile string
	Response                  string // protojson of a GetTokenResponse
}

// perfChild serves until its stdin closes (the parent ended or is done).
func perfChild(mode, cfgPath string) error {
	var (
		addrs perfAddrs
		serve func(ctx context.Context) error
		srv   *Server
	)
	// TOKENBROKER_PERF_MEMPROFILERATE=64 gives heap profiles that resolve a
	// credential's few hundred bytes (and slows every allocation: not for
	// CPU profiles).
	if r, err := strconv.Atoi(os.Getenv("TOKENBROKER_PERF_MEMPROFILERATE")); err == nil && r > 0 {
		runtime.MemProfileRate = r
	}
	switch mode {
	case "broker":
		cfg, err := config.Load(cfgPath)
		if err != nil {
			return err
		}
		log, err := NewLogger(cfg.Log.Level, os.Stderr)
		if err != nil {
			return err
		}
		if srv, err = New(Options{Config: cfg, Logger: log}); err != nil {
			return err
		}
		if err := srv.Listen(); err != nil {
			return err
		}
		addrs.GRPC, addrs.Admin = srv.GRPCAddr().String(), srv.AdminAddr().String()
		serve = srv.Serve
		hup := make(chan os.Signal, 1) // as cmd/tokenbroker does
		signal.Notify(hup, syscall.SIGHUP)
		go func() {
			for range hup {
				_ = srv.ReloadFile(cfgPath)
			}
		}()
	case "bare":
		g, ln, err := bareServer(cfgPath)
		if err != nil {
			return err
		}
		addrs.GRPC = ln.Addr().String()
		serve = func(ctx context.Context) error {
			go func() { <-ctx.Done(); g.Stop() }()
			return g.Serve(ln)
		}
	default:
		return fmt.Errorf("%s=%q: want broker or bare", perfChildEnv, mode)
	}

	ctl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /cpu", func(w http.ResponseWriter, _ *http.Request) {
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		fmt.Fprint(w, ru.Utime.Nano()+ru.Stime.Nano())
	})
	mux.HandleFunc("GET /heap", func(w http.ResponseWriter, _ *http.Request) {
		runtime.GC()
		runtime.GC() // the first one's finalizers freed more
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		fmt.Fprint(w, ms.HeapAlloc)
	})
	mux.HandleFunc("GET /allocs", func(w http.ResponseWriter, _ *http.Request) {
		// Objects and bytes allocated so far, without stopping the world.
		s := []metrics.Sample{{Name: "/gc/heap/allocs:objects"}, {Name: "/gc/heap/allocs:bytes"}}
		metrics.Read(s)
		fmt.Fprintf(w, "%d %d", s[0].Value.Uint64(), s[1].Value.Uint64())
	})
	mux.HandleFunc("POST /reload", func(w http.ResponseWriter, _ *http.Request) {
		if srv == nil {
			http.Error(w, "no broker", http.StatusNotFound)
			return
		}
		if err := srv.ReloadFile(cfgPath); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		}
	})
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile) // the bare floor's too
	mux.Handle("GET /debug/pprof/allocs", pprof.Handler("allocs"))
	go func() { _ = http.Serve(ctl, mux) }()
	addrs.Control = ctl.Addr().String()

	ctx, cancel := context.WithCancel(context.Background())
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); cancel() }()
	line, _ := json.Marshal(addrs)
	fmt.Println(string(line))
	return serve(ctx)
}

// bareServer is grpc-go with the broker's TLS and nothing else: GetToken
// answers a pre-built response, and grpc.health.v1 is the library's own.
func bareServer(path string) (*grpc.Server, net.Listener, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	var cfg perfBare
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return nil, nil, err
	}
	resp := &pb.GetTokenResponse{}
	if err := protojson.Unmarshal([]byte(cfg.Response), resp); err != nil {
		return nil, nil, err
	}
	cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
	if err != nil {
		return nil, nil, err
	}
	caPEM, err := os.ReadFile(cfg.CAFile)
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, nil, errors.New("no CA certificate")
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(tc)))
	pb.RegisterTokenBrokerServer(g, &floorServer{resp: resp})
	hs := health.NewServer()
	healthpb.RegisterHealthServer(g, hs)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	return g, ln, nil
}

// perfProc is a server child process.
type perfProc struct {
	addrs perfAddrs
	cmd   *exec.Cmd
	stdin io.WriteCloser
	pid   int
}

// startPerfChild starts the test binary as a server of the given mode,
// configured by the file at cfgPath, on one CPU.
func startPerfChild(tb testing.TB, mode, cfgPath string) *perfProc {
	tb.Helper()
	self, err := os.Executable()
	if err != nil {
		tb.Fatal(err)
	}
	args := []string{self, "-test.run=^$"}
	if cpu := os.Getenv(perfCPUEnv); cpu != "" {
		args = append([]string{"taskset", "-c", cpu}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), perfChildEnv+"="+mode, perfConfigEnv+"="+cfgPath, "GOMAXPROCS=1")
	stderr, err := os.Create(cfgPath + "." + mode + ".stderr")
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Stderr = stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	p := &perfProc{cmd: cmd, stdin: stdin, pid: cmd.Process.Pid}
	exited := make(chan struct{})
	tb.Cleanup(func() {
		_ = stdin.Close()
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		_ = stderr.Close()
	})
	line := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		if sc.Scan() {
			line <- sc.Text()
		}
		close(line)
		_, _ = io.Copy(io.Discard, stdout)
		_ = cmd.Wait()
		close(exited)
	}()
	select {
	case l, ok := <-line:
		if !ok || json.Unmarshal([]byte(l), &p.addrs) != nil {
			errOut, _ := os.ReadFile(stderr.Name())
			tb.Fatalf("%s child: no addresses (%q)\n%s", mode, l, tail(string(errOut), 2000))
		}
	case <-time.After(2 * time.Minute):
		tb.Fatalf("%s child: no addresses after 2m", mode)
	}
	return p
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// control calls the child's control endpoint and returns the number it answers.
func (p *perfProc) control(tb testing.TB, method, path string) float64 {
	tb.Helper()
	req, _ := http.NewRequest(method, "http://"+p.addrs.Control+path, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		tb.Fatalf("%s %s: %s %s", method, path, resp.Status, b)
	}
	if len(b) == 0 {
		return 0
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
	if err != nil {
		tb.Fatalf("%s %s: %q", method, path, b)
	}
	return v
}

// allocs is what the child has allocated so far: objects and bytes.
func (p *perfProc) allocs(tb testing.TB) (objects, bytes float64) {
	tb.Helper()
	resp, err := http.Get("http://" + p.addrs.Control + "/allocs")
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	if _, err := fmt.Fscan(resp.Body, &objects, &bytes); err != nil {
		tb.Fatalf("/allocs: %v", err)
	}
	return objects, bytes
}

// cpu is the child's CPU time so far.
func (p *perfProc) cpu(tb testing.TB) time.Duration {
	return time.Duration(p.control(tb, http.MethodGet, "/cpu"))
}

// rss is the child's resident set size in bytes.
func (p *perfProc) rss(tb testing.TB) float64 {
	tb.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.pid))
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb * 1024
		}
	}
	return 0
}

// perfLoad is a load generator: conns client connections, calls spread
// over them.
type perfLoad struct {
	tb     []pb.TokenBrokerClient
	health []healthpb.HealthClient
	next   sync.Mutex
	i      int
}

func newPerfLoad(tb testing.TB, h *harness, addr string, conns int) *perfLoad {
	tb.Helper()
	pair, err := h.ca.Client(time.Hour, payments)
	if err != nil {
		tb.Fatal(err)
	}
	cert, err := pair.TLSCertificate()
	if err != nil {
		tb.Fatal(err)
	}
	l := &perfLoad{}
	for range conns {
		tc := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: h.ca.Pool(), Certificates: []tls.Certificate{cert}}
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { _ = conn.Close() })
		l.tb = append(l.tb, pb.NewTokenBrokerClient(conn))
		l.health = append(l.health, healthpb.NewHealthClient(conn))
	}
	return l
}

// pick is the index of the next connection, round robin.
func (l *perfLoad) pick() int {
	l.next.Lock()
	defer l.next.Unlock()
	l.i++
	return l.i % len(l.tb)
}

func (l *perfLoad) getToken() error {
	_, err := l.tb[l.pick()].GetToken(context.Background(), &pb.GetTokenRequest{Credential: "identity"})
	return err
}

func (l *perfLoad) check() error {
	_, err := l.health[l.pick()].Check(context.Background(), healthReq)
	return err
}
