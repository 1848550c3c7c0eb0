// Package redistest starts real redis-server processes for tests: standalone
// servers, Clusters and Sentinel groups, each on free loopback ports with its
// own temporary directory, so tests can kill, restart and fail them over
// without touching any Redis they did not start.
//
// redis-server must be on PATH; without it the tests fail and say how to
// install it, and with -short they are skipped.
package redistest

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Server is one redis-server process.
type Server struct {
	t    testing.TB
	Port int
	// BusPort is the Cluster bus port of a cluster node (0 otherwise).
	BusPort int
	Dir     string
	args    []string
	cmd     *exec.Cmd
	exited  chan struct{} // closed when cmd has been waited for
	opts    Options
	// build makes the command line for the chosen ports; start calls it
	// again with new ports when another process took one first.
	build func(port, bus int) []string
}

// Options configure a standalone server beyond the defaults.
type Options struct {
	// Password sets requirepass.
	Password string
	// TLS, when set, makes the server speak TLS only, with this certificate
	// and key (PEM files); clients are not asked for certificates.
	CertFile, KeyFile string
	// ClientTLS is what Client and the readiness check use to reach a TLS server.
	ClientTLS *tls.Config
	// Args are extra redis-server arguments.
	Args []string

	// clusterBus gives the node its own free Cluster bus port instead of
	// Redis's default of port+10000, which another test may hold.
	clusterBus bool
}

// need fails (or, with -short, skips) the test when redis-server is missing.
func need(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if testing.Short() {
			t.Skip("redis-server not on PATH (skipped with -short)")
		}
		t.Fatal("redis-server is not on PATH; install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) or run go test -short")
	}
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// pickPort chooses the ports servers start on; a test replaces it to hand
// out a port that is already taken.
var pickPort = FreePort

// Start runs a standalone redis-server with extra arguments and waits for it.
func Start(t testing.TB, extra ...string) *Server {
	t.Helper()
	return StartWith(t, Options{Args: extra})
}

// StartWith runs a standalone redis-server configured by o and waits for it.
func StartWith(t testing.TB, o Options) *Server {
	t.Helper()
	need(t)
	s := &Server{t: t, Dir: t.TempDir(), opts: o}
	s.build = func(port, bus int) []string {
		args := []string{"--port", strconv.Itoa(port)}
		if o.CertFile != "" {
			args = []string{"--port", "0", "--tls-port", strconv.Itoa(port),
				"--tls-cert-file", o.CertFile, "--tls-key-file", o.KeyFile, "--tls-auth-clients", "no"}
		}
		if bus != 0 {
			args = append(args, "--cluster-port", strconv.Itoa(bus))
		}
		args = append(args, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", s.Dir,
			"--logfile", filepath.Join(s.Dir, "redis.log"))
		if o.Password != "" {
			args = append(args, "--requirepass", o.Password)
		}
		return append(args, o.Args...)
	}
	s.startFresh()
	t.Cleanup(s.Kill)
	return s
}

func (s *Server) clientOptions() *redis.Options {
	return &redis.Options{Addr: s.Addr(), Password: s.opts.Password, TLSConfig: s.opts.ClientTLS}
}

// startFresh starts the server on newly chosen free ports. A port is only
// known to be free until the server binds it, so when another process took
// one in between (the log says "Address already in use") it tries new ports,
// a few times, before failing the test.
func (s *Server) startFresh() {
	s.t.Helper()
	for attempt := 1; ; attempt++ {
		s.Port = pickPort(s.t)
		if s.opts.clusterBus {
			s.BusPort = pickPort(s.t)
		}
		s.args = s.build(s.Port, s.BusPort)
		_ = os.Remove(filepath.Join(s.Dir, "redis.log"))
		err := s.run()
		if err == nil || attempt == 5 || !strings.Contains(s.log(), "Address already in use") {
			s.started(err)
			return
		}
	}
}

// start runs the server again on the ports it had (Restart).
func (s *Server) start() {
	s.t.Helper()
	s.started(s.run())
}

// started fails the test, with the server's log, when err says it did not start.
func (s *Server) started(err error) {
	s.t.Helper()
	if err != nil {
		s.t.Fatalf("redis-server on %s did not answer: %v\n%s", s.Addr(), err, s.log())
	}
}

// log is the server's log file so far.
func (s *Server) log() string {
	b, _ := os.ReadFile(filepath.Join(s.Dir, "redis.log"))
	return string(b)
}

// run starts the process and waits until it answers PING, it exits, or 10s pass.
func (s *Server) run() error {
	cmd := exec.Command("redis-server", s.args...)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start redis-server: %w", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	s.cmd, s.exited = cmd, exited
	o := s.clientOptions()
	o.MaxRetries = -1
	c := redis.NewClient(o)
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		err := c.Ping(ctx).Err()
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			s.cmd = nil
			return fmt.Errorf("redis-server exited before answering: %w", err)
		default:
		}
		if time.Now().After(deadline) {
			s.Kill()
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Addr is the server's host:port.
func (s *Server) Addr() string { return "127.0.0.1:" + strconv.Itoa(s.Port) }

// Client returns a plain client for inspecting the server; it is closed at cleanup.
func (s *Server) Client() *redis.Client {
	c := redis.NewClient(s.clientOptions())
	s.t.Cleanup(func() { _ = c.Close() })
	return c
}

// Kill stops the server at once (SIGKILL), as a crash would.
func (s *Server) Kill() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	<-s.exited
	s.cmd = nil
}

// Pause stops the server without closing its connections (SIGSTOP), as a
// hung host would: commands and pings wait and time out.
func (s *Server) Pause() {
	s.t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		s.t.Fatalf("pause redis-server: %v", err)
	}
}

// Resume continues a paused server (SIGCONT).
func (s *Server) Resume() {
	s.t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		s.t.Fatalf("resume redis-server: %v", err)
	}
}

// Restart starts the server again on the same port, empty.
func (s *Server) Restart() {
	s.t.Helper()
	s.Kill()
	s.start()
}

// Cluster is a Redis Cluster of masters without replicas.
type Cluster struct {
	Nodes []*Server
}

// StartCluster starts n masters, joins them into a Cluster with all slots
// assigned, and waits until every node reports the cluster ok.
func StartCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	return StartClusterWithReplicas(t, n, 0)
}

// StartClusterWithReplicas starts masters masters with replicas replicas
// each, joins them into a Cluster with all slots assigned, and waits until
// every node reports the cluster ok. Nodes time out after 2s, so a master's
// replica takes over a few seconds after the master dies.
func StartClusterWithReplicas(t testing.TB, masters, replicas int) *Cluster {
	t.Helper()
	need(t)
	c := &Cluster{}
	var addrs []string
	for range masters * (1 + replicas) {
		s := StartWith(t, Options{clusterBus: true, Args: []string{
			"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
			"--cluster-replica-validity-factor", "0", // a replica takes over however long ago it last synced
		}})
		c.Nodes = append(c.Nodes, s)
		addrs = append(addrs, s.Addr())
	}
	args := append([]string{"--cluster", "create"}, addrs...)
	args = append(args, "--cluster-replicas", strconv.Itoa(replicas), "--cluster-yes")
	if out, err := exec.Command("redis-cli", args...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	deadline := time.Now().Add(20 * time.Second)
	for _, s := range c.Nodes {
		cl := s.Client()
		for {
			info, err := cl.ClusterInfo(context.Background()).Result()
			if err == nil && strings.Contains(info, "cluster_state:ok") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("cluster not ok on %s: %v %s", s.Addr(), err, info)
			}
			time.Sleep(50 * time.Millisecond)
		}
		for { // a replica holds its master's keys before the test goes on
			info, err := cl.Info(context.Background(), "replication").Result()
			if err == nil && (strings.Contains(info, "role:master") || strings.Contains(info, "master_link_status:up")) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("replica %s not in sync: %v %s", s.Addr(), err, info)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return c
}

// Addrs are the nodes' addresses.
func (c *Cluster) Addrs() []string {
	var out []string
	for _, s := range c.Nodes {
		out = append(out, s.Addr())
	}
	return out
}

// Sentinel is a master, a replica and one sentinel monitoring them.
type Sentinel struct {
	Master, Replica *Server
	Sentinel        *Server
	// MasterName is the name the sentinel monitors the master under.
	MasterName string
}

// StartSentinel starts a master, a replica of it, and a sentinel with quorum 1.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	need(t)
	g := &Sentinel{MasterName: "tokenbroker"}
	g.Master = Start(t)
	g.Replica = Start(t, "--replicaof", "127.0.0.1", strconv.Itoa(g.Master.Port))

	dir := t.TempDir()
	conf := filepath.Join(dir, "sentinel.conf")
	g.Sentinel = &Server{t: t, Dir: dir, build: func(port, _ int) []string {
		body := fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %s\nlogfile %s\n"+
			"sentinel monitor %s 127.0.0.1 %d 1\n"+
			"sentinel down-after-milliseconds %s 1000\n"+
			"sentinel failover-timeout %s 5000\n",
			port, dir, filepath.Join(dir, "redis.log"), g.MasterName, g.Master.Port, g.MasterName, g.MasterName)
		if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return []string{conf, "--sentinel"}
	}}
	g.Sentinel.startFresh()
	t.Cleanup(g.Sentinel.Kill)
	return g
}
