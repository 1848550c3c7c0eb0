package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/tokenbroker/tokenbroker/broker/client"
	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devmode"
	"github.com/tokenbroker/tokenbroker/broker/server/attacktest"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// devBroker starts the real binary in dev mode on loopback ports and
// returns it with its dev directory and gRPC address.
func devBroker(t testing.TB) (p *process, dir, grpcAddr, adminAddr string) {
	t.Helper()
	bin := buildBinary(t)
	grpcAddr = fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	adminAddr = fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	dir = filepath.Join(t.TempDir(), "dev")
	p = startBinary(t, bin, nil, adminAddr, "--dev", "--dev-dir", dir, "--listen-addr", grpcAddr, "--admin-addr", adminAddr)
	t.Cleanup(func() { _ = p.cmd.Process.Kill(); <-p.exited })
	return p, dir, grpcAddr, adminAddr
}

// deniedTarget is an attacker with the dev CA's denied-client certificate:
// trusted, with an identity no credential allows.
func deniedTarget(t testing.TB, dir, addr string) attacktest.Target {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, devmode.DeniedCertFile), filepath.Join(dir, devmode.DeniedKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, devmode.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	return attacktest.Target{Addr: addr, TLS: &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: roots, Certificates: []tls.Certificate{cert}}}
}

// rss is pid's resident set size in bytes.
func rss(t testing.TB, pid int) float64 {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb * 1024
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// TestHeaderFloodMemory: the first attack of issue 23 against the real
// binary. 100 streams, each opened with 8 MiB of request headers and no
// request message, by a peer with a trusted certificate: the broker's
// resident memory grows by at most 50 MB (it grew by 896 MB before
// limits.max_header_list_size), and the broker still serves.
func TestHeaderFloodMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	p, dir, addr, _ := devBroker(t)
	time.Sleep(500 * time.Millisecond)
	before := rss(t, p.cmd.Process.Pid)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := attacktest.HeaderFlood(ctx, deniedTarget(t, dir, addr), 100, 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	after := rss(t, p.cmd.Process.Pid)
	t.Logf("100 x 8 MiB header streams (%d connections, %d cut: %s; %.1f MiB written): RSS %.1f MB -> %.1f MB (+%.1f MB)",
		res.Connections, res.Cut, res.LastError, float64(res.BytesSent)/(1<<20), before/1e6, after/1e6, (after-before)/1e6)
	if res.Streams != 100 {
		t.Errorf("%d streams sent, want 100", res.Streams)
	}
	if after-before > 50e6 {
		t.Errorf("RSS grew by %.1f MB, want at most 50 MB", (after-before)/1e6)
	}
	files := client.TLSFiles{CAFile: filepath.Join(dir, devmode.CAFile), CertFile: filepath.Join(dir, devmode.ClientCertFile),
		KeyFile: filepath.Join(dir, devmode.ClientKeyFile)}
	conn, err := client.DialFiles(addr, files)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Errorf("health check after the flood: %v", err)
	}
}

// BenchmarkFrontDoorMemory measures what deploy/docs/security.md states:
// the broker's resident memory per open connection (mTLS, HTTP/2, one
// Health/Check made on it) and per open stream (grpc.health.v1.Health/Watch,
// all on one connection, under limits.streams_per_connection), on the real
// binary in dev mode. Run it with -benchtime 1x.
func BenchmarkFrontDoorMemory(b *testing.B) {
	const conns, streams = 500, 900
	var perHandshake, perConn, perStream float64
	for range b.N {
		perHandshake, perConn, perStream = measureFrontDoor(b, conns, streams)
	}
	b.ReportMetric(perHandshake, "rss-bytes/handshake")
	b.ReportMetric(perConn, "rss-bytes/connection")
	b.ReportMetric(perStream, "rss-bytes/stream")
}

func measureFrontDoor(b *testing.B, conns, streams int) (perHandshake, perConn, perStream float64) {
	p, dir, addr, _ := devBroker(b)
	files := client.TLSFiles{CAFile: filepath.Join(dir, devmode.CAFile), CertFile: filepath.Join(dir, devmode.ClientCertFile),
		KeyFile: filepath.Join(dir, devmode.ClientKeyFile)}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	time.Sleep(time.Second)
	rssH := rss(b, p.cmd.Process.Pid)
	// Connections parked before their TLS handshake, as many as one source
	// may hold (limits.handshakes_per_source).
	held, _, err := attacktest.Hold(ctx, deniedTarget(b, dir, addr), config.DefaultHandshakesPerSource, time.Second)
	if err != nil {
		b.Fatal(err)
	}
	rss0 := rss(b, p.cmd.Process.Pid)
	perHandshake = (rss0 - rssH) / float64(len(held))
	for _, c := range held {
		_ = c.Close()
	}
	time.Sleep(time.Second)
	rss0 = rss(b, p.cmd.Process.Pid)
	var hcs []healthpb.HealthClient
	for range conns {
		conn, err := client.DialFiles(addr, files)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		hc := healthpb.NewHealthClient(conn)
		if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
			b.Fatal(err)
		}
		hcs = append(hcs, hc)
	}
	time.Sleep(time.Second)
	rss1 := rss(b, p.cmd.Process.Pid)
	for i := range streams {
		w, err := hcs[0].Watch(ctx, &healthpb.HealthCheckRequest{})
		if err == nil {
			_, err = w.Recv()
		}
		if err != nil {
			b.Fatalf("stream %d: %v", i, err)
		}
	}
	time.Sleep(time.Second)
	rss2 := rss(b, p.cmd.Process.Pid)
	return perHandshake, (rss1 - rss0) / float64(conns), (rss2 - rss1) / float64(streams)
}
