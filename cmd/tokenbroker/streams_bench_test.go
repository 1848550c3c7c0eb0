package main

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/client"
	"github.com/tokenbroker/tokenbroker/broker/devmode"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// BenchmarkWatchStreamMemory measures what an open WatchToken stream costs
// the server: the real binary in dev mode, 1,000 streams (the default
// rate_limit.watch_streams) opened by one caller over 10 connections, and the
// growth of the server's resident memory and of its Go heap and stacks (from
// its /metrics), per stream. Run it with -benchtime 1x: each iteration starts
// a server.
//
// About half of a stream's cost is its goroutine stack: gRPC runs each
// stream's handler on its own goroutine, whose stack has grown to 8 KB by the
// time the first token is sent. The rest is gRPC's per-stream state. Shutdown
// is awaited with a context callback, not a second goroutine per stream.
func BenchmarkWatchStreamMemory(b *testing.B) {
	const streams, conns = 1000, 10
	bin := buildBinary(b)
	var rss, goMem float64
	for range b.N {
		rss, goMem = measureStreams(b, bin, streams, conns)
	}
	b.ReportMetric(rss, "rss-bytes/stream")
	b.ReportMetric(goMem, "heap+stack-bytes/stream")
}

func measureStreams(b *testing.B, bin string, streams, conns int) (rssPerStream, goPerStream float64) {
	b.Helper()
	grpcAddr := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(b))
	adminAddr := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(b))
	dir := filepath.Join(b.TempDir(), "dev")
	p := startBinary(b, bin, nil, adminAddr, "--dev", "--dev-dir", dir, "--rate-limit", "0", "--listen-addr", grpcAddr, "--admin-addr", adminAddr)
	defer func() { _ = p.cmd.Process.Kill(); <-p.exited }()

	files := client.TLSFiles{CAFile: filepath.Join(dir, devmode.CAFile), CertFile: filepath.Join(dir, devmode.ClientCertFile),
		KeyFile: filepath.Join(dir, devmode.ClientKeyFile)}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var clients []pb.TokenBrokerClient
	for range conns {
		conn, err := client.DialFiles(grpcAddr, files)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		c := pb.NewTokenBrokerClient(conn)
		if _, err := c.GetToken(ctx, &pb.GetTokenRequest{Credential: devmode.Credential}); err != nil {
			b.Fatal(err) // warms the cache and the connection
		}
		clients = append(clients, c)
	}
	rss0, go0 := serverMemory(b, p.cmd.Process.Pid, adminAddr)
	for i := range streams {
		s, err := clients[i%conns].WatchToken(ctx, &pb.WatchTokenRequest{Credential: devmode.Credential})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := s.Recv(); err != nil {
			b.Fatalf("stream %d: %v", i, err)
		}
	}
	rss1, go1 := serverMemory(b, p.cmd.Process.Pid, adminAddr)
	return (rss1 - rss0) / float64(streams), (go1 - go0) / float64(streams)
}

// serverMemory reads the process's resident set and, from its /metrics, the
// Go heap and stack in use (after the collections a scrape does not force,
// so figures are taken twice a second apart and the second kept).
func serverMemory(b *testing.B, pid int, adminAddr string) (rss, goMem float64) {
	b.Helper()
	time.Sleep(time.Second)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			rss = kb * 1024
		}
	}
	resp, err := http.Get("http://" + adminAddr + "/metrics")
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		for _, m := range []string{"go_memstats_heap_inuse_bytes ", "go_memstats_stack_inuse_bytes "} {
			if v, ok := strings.CutPrefix(sc.Text(), m); ok {
				f, _ := strconv.ParseFloat(v, 64)
				goMem += f
			}
		}
	}
	return rss, goMem
}
