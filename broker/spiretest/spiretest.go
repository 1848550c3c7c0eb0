// Package spiretest runs real SPIRE servers and agents for tests: each
// in its own short temporary directory, the server's API and the agent's
// Workload API on unix sockets, the server's agent API on a free loopback
// port, agents attested with join tokens and workloads with the unix
// attestor (by uid or executable path).
//
// The binaries (spire-server and spire-agent v1.13.3) are found in the
// directory named by TOKENBROKER_SPIRE_BIN, else in the user cache directory
// under tokenbroker-spire/bin, where .ci/run builds them. Without them a test
// is skipped, except under CI (CI=true), where it fails: CI must run them.
package spiretest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Version is the SPIRE release the tests run against.
const Version = "v1.13.3"

// BinEnv names the variable that points at the directory of the binaries.
const BinEnv = "TOKENBROKER_SPIRE_BIN"

// BuildHint says how to get the binaries.
const BuildHint = "build them with: d=$(mktemp -d) && cd $d && go mod init spirebuild && " +
	"go get -tool github.com/spiffe/spire/cmd/spire-server@" + Version + " github.com/spiffe/spire/cmd/spire-agent@" + Version +
	" && GOBIN=$HOME/.cache/tokenbroker-spire/bin go install github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent" +
	" (or run .ci/run, which does it)"

// BinDir is where the binaries are looked for: $TOKENBROKER_SPIRE_BIN, or
// the user cache directory's tokenbroker-spire/bin.
func BinDir() string {
	if d := os.Getenv(BinEnv); d != "" {
		return d
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		return ""
	}
	return filepath.Join(cache, "tokenbroker-spire", "bin")
}

// Bin returns the directory holding spire-server and spire-agent. Without
// them it skips t, or fails it under CI.
func Bin(t testing.TB) string {
	t.Helper()
	dir := BinDir()
	for _, name := range []string{"spire-server", "spire-agent"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			msg := fmt.Sprintf("SPIRE %s binaries not found in %s (%s): %s", Version, dir, BinEnv, BuildHint)
			if os.Getenv("CI") == "true" {
				t.Fatal(msg)
			}
			t.Skip(msg)
		}
	}
	return dir
}

// shortDir makes a temporary directory with a short path (unix socket
// paths are limited to about 100 bytes), removed at the end of the test.
func shortDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// process is a SPIRE binary running for a test.
type process struct {
	t       testing.TB
	name    string
	bin     string
	args    []string
	logPath string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

func (p *process) start() {
	p.t.Helper()
	log, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		p.t.Fatal(err)
	}
	cmd := exec.Command(p.bin, p.args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // not left behind by a killed test
	if err := cmd.Start(); err != nil {
		_ = log.Close()
		p.t.Fatalf("start %s: %v", p.name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); _ = log.Close(); close(done) }()
	p.mu.Lock()
	p.cmd, p.done = cmd, done
	p.mu.Unlock()
}

// stop ends the process (SIGTERM, then SIGKILL after 5s) and waits for it.
func (p *process) stop() {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.cmd = nil
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

func (p *process) exited() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return true
	}
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *process) logTail() string {
	b, _ := os.ReadFile(p.logPath)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// Server is a running SPIRE server.
type Server struct {
	t testing.TB
	// TrustDomain is the server's trust domain, e.g. "bank.internal".
	TrustDomain string
	// Dir holds its configuration, data and log.
	Dir string
	// Socket is the path of its API socket.
	Socket string
	// Port is its loopback port for agents.
	Port int
	bin  string
	proc *process
}

// StartServer starts a SPIRE server for trustDomain (sqlite datastore,
// in-memory keys, join-token node attestation) and waits until it is healthy.
func StartServer(t testing.TB, trustDomain string) *Server {
	t.Helper()
	bin := Bin(t)
	dir := shortDir(t, "spire-s")
	s := &Server{t: t, TrustDomain: trustDomain, Dir: dir, Socket: filepath.Join(dir, "api.sock"), Port: freePort(t), bin: bin}
	conf := fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = "%d"
  socket_path = %q
  trust_domain = %q
  data_dir = %q
  log_level = "WARN"
  ca_key_type = "ec-p256"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1h"
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = %q
    }
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "memory" {
    plugin_data {}
  }
}
`, s.Port, s.Socket, trustDomain, filepath.Join(dir, "data"), filepath.Join(dir, "datastore.sqlite3"))
	confPath := filepath.Join(dir, "server.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	s.proc = &process{t: t, name: "spire-server", bin: filepath.Join(bin, "spire-server"),
		args: []string{"run", "-config", confPath}, logPath: filepath.Join(dir, "server.log")}
	s.proc.start()
	t.Cleanup(s.proc.stop)
	waitHealthy(t, s.proc, func() error {
		_, err := s.run("healthcheck", "-shallow")
		return err
	})
	return s
}

// waitHealthy polls check for up to 30s, failing t with the process log.
func waitHealthy(t testing.TB, p *process, check func() error) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		if err = check(); err == nil {
			return
		}
		if p.exited() {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s did not become healthy: %v\n%s", p.name, err, p.logTail())
}

// run runs a spire-server subcommand against this server's API socket.
func (s *Server) run(sub string, args ...string) (string, error) {
	parts := strings.Fields(sub)
	full := append(append(parts, "-socketPath", s.Socket), args...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, filepath.Join(s.bin, "spire-server"), full...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("spire-server %s: %w: %s", sub, err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// Run runs a spire-server subcommand (e.g. "entry create") with args
// against this server and returns its output; a failure fails t.
func (s *Server) Run(sub string, args ...string) string {
	s.t.Helper()
	out, err := s.run(sub, args...)
	if err != nil {
		s.t.Fatal(err)
	}
	return out
}

// ID is the SPIFFE ID path in this server's trust domain.
func (s *Server) ID(path string) string { return "spiffe://" + s.TrustDomain + path }

// JoinToken generates a join token and returns it with the SPIFFE ID the
// agent that uses it will have (the parent of its workloads' entries).
func (s *Server) JoinToken() (token, agentID string) {
	s.t.Helper()
	out := s.Run("token generate", "-ttl", "600")
	for _, line := range strings.Split(out, "\n") { // "Token: …", then a warning
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Token:"); ok {
			token = strings.TrimSpace(v)
		}
	}
	if token == "" || strings.ContainsAny(token, " \n") {
		s.t.Fatalf("token generate: unexpected output %q", out)
	}
	return token, s.ID("/spire/agent/join_token/" + token)
}

// Entry is a workload registration.
type Entry struct {
	// ParentID is the agent's SPIFFE ID.
	ParentID string
	// SPIFFEID is the workload's.
	SPIFFEID string
	// Selectors are e.g. "unix:uid:0" or "unix:path:/usr/bin/app".
	Selectors []string
	// X509SVIDTTL is the SVID lifetime; 0 means the server's default (1h).
	X509SVIDTTL time.Duration
	// FederatesWith are trust domains (spiffe://td) whose bundles the
	// workload receives too.
	FederatesWith []string
}

// CreateEntry registers e.
func (s *Server) CreateEntry(e Entry) {
	s.t.Helper()
	args := []string{"-parentID", e.ParentID, "-spiffeID", e.SPIFFEID}
	for _, sel := range e.Selectors {
		args = append(args, "-selector", sel)
	}
	if e.X509SVIDTTL > 0 {
		args = append(args, "-x509SVIDTTL", strconv.Itoa(int(e.X509SVIDTTL/time.Second)))
	}
	for _, td := range e.FederatesWith {
		args = append(args, "-federatesWith", td)
	}
	s.Run("entry create", args...)
}

// BundlePEM is the server's X.509 trust bundle (its root CAs) as PEM.
func (s *Server) BundlePEM() []byte {
	s.t.Helper()
	return []byte(s.Run("bundle show", "-format", "pem"))
}

// Federate makes other's trust domain known to s: s's workloads whose
// entries federate with it receive other's bundle.
func (s *Server) Federate(other *Server) {
	s.t.Helper()
	path := filepath.Join(s.Dir, other.TrustDomain+".bundle")
	if err := os.WriteFile(path, []byte(other.Run("bundle show", "-format", "spiffe")), 0o600); err != nil {
		s.t.Fatal(err)
	}
	s.Run("bundle set", "-format", "spiffe", "-id", "spiffe://"+other.TrustDomain, "-path", path)
}

// MintX509 mints an X509-SVID for spiffeID without an agent and writes it
// to dir as svid.pem, key.pem and bundle.pem (this server's roots).
func (s *Server) MintX509(spiffeID string, ttl time.Duration, dir string) (svid, key, bundle string) {
	s.t.Helper()
	s.Run("x509 mint", "-spiffeID", spiffeID, "-ttl", ttl.String(), "-write", dir)
	return filepath.Join(dir, "svid.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "bundle.pem")
}

// Agent is a running SPIRE agent.
type Agent struct {
	t testing.TB
	// Socket is the path of its Workload API socket.
	Socket string
	// Dir holds its configuration, data and log.
	Dir  string
	proc *process
}

// StartAgent starts an agent of s attested with token (see JoinToken), its
// unix workload attestor discovering workload paths, and waits until its
// Workload API answers. Its key and SVID are kept on disk, so that Restart
// needs no new token.
func (s *Server) StartAgent(token string) *Agent {
	s.t.Helper()
	dir := shortDir(s.t, "spire-a")
	a := &Agent{t: s.t, Dir: dir, Socket: filepath.Join(dir, "workload.sock")}
	if err := os.Mkdir(filepath.Join(dir, "keys"), 0o700); err != nil {
		s.t.Fatal(err)
	}
	bundle := filepath.Join(dir, "bootstrap.pem")
	if err := os.WriteFile(bundle, s.BundlePEM(), 0o600); err != nil {
		s.t.Fatal(err)
	}
	conf := fmt.Sprintf(`agent {
  data_dir = %q
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "%d"
  socket_path = %q
  trust_bundle_path = %q
  trust_domain = %q
  join_token = %q
}
plugins {
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "disk" {
    plugin_data {
      directory = %q
    }
  }
  WorkloadAttestor "unix" {
    plugin_data {
      discover_workload_path = true
      workload_size_limit = -1
    }
  }
}
`, filepath.Join(dir, "data"), s.Port, a.Socket, bundle, s.TrustDomain, token, filepath.Join(dir, "keys"))
	confPath := filepath.Join(dir, "agent.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		s.t.Fatal(err)
	}
	a.proc = &process{t: s.t, name: "spire-agent", bin: filepath.Join(s.bin, "spire-agent"),
		args: []string{"run", "-config", confPath}, logPath: filepath.Join(dir, "agent.log")}
	a.Start()
	s.t.Cleanup(a.Stop)
	return a
}

// Addr is the Workload API address, as SPIFFE_ENDPOINT_SOCKET takes it.
func (a *Agent) Addr() string { return "unix://" + a.Socket }

// Start starts the agent (again) and waits until its Workload API answers.
func (a *Agent) Start() {
	a.t.Helper()
	a.proc.start()
	waitHealthy(a.t, a.proc, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, a.proc.bin, "healthcheck", "-socketPath", a.Socket).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%w: %s", err, bytes.TrimSpace(out))
		}
		return nil
	})
}

// Stop stops the agent and waits for it to exit; its Workload API socket
// then refuses connections until Start.
func (a *Agent) Stop() { a.proc.stop() }

// Log is the tail of the agent's log, for failure messages.
func (a *Agent) Log() string { return a.proc.logTail() }

// Log is the tail of the server's log, for failure messages.
func (s *Server) Log() string { return s.proc.logTail() }
