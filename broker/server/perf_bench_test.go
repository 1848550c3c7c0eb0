package server

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// perfPair is the broker and the bare floor, each in a process of its own
// on one CPU, both serving the same token with the same TLS.
type perfPair struct {
	h            *harness
	broker, bare *perfProc
}

// startPerfPair starts the broker (the production shape of benchConfig: info
// logging, the audit trail in a file, the per-caller rate limit and the front
// door's limits on, high enough never to refuse; mutate may change it) and
// the bare floor answering the token the broker issues.
func startPerfPair(b *testing.B, mutate func(*config.Config)) *perfPair {
	b.Helper()
	h := newHarness(b, benchConfig(b))
	cfg := *h.cfg
	cfg.Pprof = true // profiles of the saturated server: go tool pprof http://ADMIN/debug/pprof/profile
	if mutate != nil {
		mutate(&cfg)
	}
	raw, err := yaml.Marshal(&cfg)
	if err != nil {
		b.Fatal(err)
	}
	h.write("perf-broker.yaml", string(raw))
	p := &perfPair{h: h, broker: startPerfChild(b, "broker", h.path("perf-broker.yaml"))}

	warm := newPerfLoad(b, h, p.broker.addrs.GRPC, 1)
	resp, err := warm.tb[0].GetToken(b.Context(), &pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		b.Fatal(err)
	}
	js, err := protojson.Marshal(resp)
	if err != nil {
		b.Fatal(err)
	}
	bare, err := json.Marshal(perfBare{CertFile: cfg.TLS.CertFile, KeyFile: cfg.TLS.KeyFile, CAFile: cfg.TLS.ClientCAFile, Response: string(js)})
	if err != nil {
		b.Fatal(err)
	}
	h.write("perf-bare.json", string(bare))
	p.bare = startPerfChild(b, "bare", h.path("perf-bare.json"))
	return p
}

// perfConns is the number of client connections the load is spread over
// (ghz's default is one); TOKENBROKER_PERF_CONNS overrides it.
func perfConns() int {
	if n, err := strconv.Atoi(os.Getenv("TOKENBROKER_PERF_CONNS")); err == nil && n > 0 {
		return n
	}
	return 1
}

// BenchmarkBareFloor sets the broker beside a bare grpc-go server with the
// same TLS (TLS 1.3, client certificates required and verified) and a
// pre-built GetTokenResponse holding the same token: what gRPC itself costs,
// with nothing of the broker's around it. Each server runs in a process of
// its own with GOMAXPROCS=1 (and pinned with taskset to the CPU in
// TOKENBROKER_PERF_SERVER_CPU, when set), loaded by 100 concurrent callers
// over one connection (TOKENBROKER_PERF_CONNS) from this process. Three
// rounds of b.N calls of each of GetToken and Health/Check on each server
// (at least 2,000), in slices of a tenth of that taking turns (the order
// turning every slice), so that drift in the machine's speed falls on all
// four alike. It reports the medians of the rounds: throughput and the
// server's own CPU time per call (read from the server process), and the
// ratios broker/bare. The broker's targets: GetToken at ≥ 0.90× the bare
// throughput and ≤ 1.10× its CPU per call; Health at ≤ 1.05× the bare CPU
// per call. The ratios only mean something when the server's core is
// saturated and the load generator is not: on a machine with few cores,
// read the CPU ratios.
//
// What the broker adds to a call on top of gRPC, per call, once issue 27's
// profiles had been followed: four allocations — the tap's record of the
// call (admission), and the UnaryServerInfo and handler closure gRPC makes
// for any server with an interceptor — and the work of admission, metrics,
// rate limit, identity, policy, cache and the audit line. What went: a
// cancellable context per call in the tap (a call that never sends its
// request is now reset by the front door's frameGuard instead), a second
// interceptor in a chain (the server's runs inside admission's), and a
// made-up request ID on the heap.
//
//	go test -run '^$' -bench BenchmarkBareFloor -benchtime 100000x -v ./broker/server/
//	TOKENBROKER_PERF_SERVER_CPU=2 taskset -c 3-15 ./server.test -test.run '^$' -test.bench BenchmarkBareFloor -test.benchtime 100000x -test.v
func BenchmarkBareFloor(b *testing.B) {
	const concurrency, rounds, nSlices = 100, 3, 10
	perRound := max(b.N, 2000)
	p := startPerfPair(b, nil)
	conns := perfConns()
	brokerLoad := newPerfLoad(b, p.h, p.broker.addrs.GRPC, conns)
	bareLoad := newPerfLoad(b, p.h, p.bare.addrs.GRPC, conns)
	targets := []struct {
		name string
		proc *perfProc
		call func() error
	}{
		{"broker GetToken", p.broker, brokerLoad.getToken},
		{"bare GetToken", p.bare, bareLoad.getToken},
		{"broker Health", p.broker, brokerLoad.check},
		{"bare Health", p.bare, bareLoad.check},
	}
	for _, t := range targets { // warm up: connections, buffers, the heap's size
		if err := runCalls(min(perRound, 5000), concurrency, t.call); err != nil {
			b.Fatalf("%s: %v", t.name, err)
		}
	}
	fetches := p.h.as.TokenRequests()
	type sample struct{ rps, cpu, objs, bytes float64 } // calls/s, ns, objects and bytes allocated per call
	samples := make([][]sample, len(targets))
	for range rounds {
		wall := make([]time.Duration, len(targets))
		cpu := make([]time.Duration, len(targets))
		objs, bytes := make([]float64, len(targets)), make([]float64, len(targets))
		for slice, done := 0, 0; done < perRound; slice++ {
			n := min(max(perRound/nSlices, 1), perRound-done)
			for k := range targets {
				i := (k + slice) % len(targets)
				t := targets[i]
				o0, b0 := t.proc.allocs(b)
				cpu0, t0 := t.proc.cpu(b), time.Now()
				if err := runCalls(n, concurrency, t.call); err != nil {
					b.Fatalf("%s: %v", t.name, err)
				}
				wall[i] += time.Since(t0)
				cpu[i] += t.proc.cpu(b) - cpu0
				o1, b1 := t.proc.allocs(b)
				objs[i] += o1 - o0
				bytes[i] += b1 - b0
			}
			done += n
		}
		for i := range targets {
			samples[i] = append(samples[i], sample{float64(perRound) / wall[i].Seconds(), float64(cpu[i]) / float64(perRound),
				objs[i] / float64(perRound), bytes[i] / float64(perRound)})
		}
	}
	if n := p.h.as.TokenRequests() - fetches; n != 0 {
		b.Errorf("%d token requests while measuring hits, want 0", n)
	}
	if dir := os.Getenv("TOKENBROKER_PERF_PROFILE"); dir != "" { // for go tool pprof
		for _, kind := range []string{"profile", "allocs"} { // CPU, then what was allocated meanwhile
			profileOf(b, kind, p.broker.addrs.Control, filepath.Join(dir, "broker-GetToken-"+kind+".pprof"), brokerLoad.getToken)
			profileOf(b, kind, p.broker.addrs.Control, filepath.Join(dir, "broker-Health-"+kind+".pprof"), brokerLoad.check)
			profileOf(b, kind, p.bare.addrs.Control, filepath.Join(dir, "bare-GetToken-"+kind+".pprof"), bareLoad.getToken)
			profileOf(b, kind, p.bare.addrs.Control, filepath.Join(dir, "bare-Health-"+kind+".pprof"), bareLoad.check)
		}
	}
	rps := func(i int) float64 { return medianOf(samples[i], func(s sample) float64 { return s.rps }) }
	cpu := func(i int) float64 { return medianOf(samples[i], func(s sample) float64 { return s.cpu }) }
	var table strings.Builder
	fmt.Fprintf(&table, "\nserver: GOMAXPROCS=1, CPU %q; %d calls of each per round at concurrency %d over %d connection(s), medians of %d rounds\n",
		os.Getenv(perfCPUEnv), perRound, concurrency, conns, rounds)
	fmt.Fprintf(&table, "| server | call | requests/s | server CPU per call | server allocations per call |\n|---|---|---|---|---|\n")
	for i, t := range targets {
		server, call, _ := strings.Cut(t.name, " ")
		fmt.Fprintf(&table, "| %s | %s | %.0f | %.2f µs | %.1f (%.0f B) |\n", server, call, rps(i), cpu(i)/1e3,
			medianOf(samples[i], func(s sample) float64 { return s.objs }), medianOf(samples[i], func(s sample) float64 { return s.bytes }))
	}
	fmt.Fprintf(&table, "\nbroker/bare: GetToken throughput %.3f× (target ≥ 0.90), CPU per call %.3f× (≤ 1.10); Health throughput %.3f×, CPU per call %.3f× (≤ 1.05)\n",
		rps(0)/rps(1), cpu(0)/cpu(1), rps(2)/rps(3), cpu(2)/cpu(3))
	b.Log(table.String())
	b.ReportMetric(0, "ns/op") // a round's total would mean nothing
	b.ReportMetric(rps(0)/rps(1), "GetToken-rps-broker/bare")
	b.ReportMetric(cpu(0)/cpu(1), "GetToken-cpu-broker/bare")
	b.ReportMetric(rps(2)/rps(3), "Health-rps-broker/bare")
	b.ReportMetric(cpu(2)/cpu(3), "Health-cpu-broker/bare")
	b.ReportMetric(cpu(0), "broker-GetToken-cpu-ns/call")
	b.ReportMetric(cpu(1), "bare-GetToken-cpu-ns/call")
}

// profile writes to path a 5-second CPU profile of the server whose pprof
// handlers are at addr, saturated with call.
func profile(b *testing.B, addr, path string, call func() error) {
	profileOf(b, "profile", addr, path, call)
}

// profileOf writes to path a 5-second profile of kind ("profile" for CPU,
// "allocs" for what was allocated in those seconds) of the server whose
// pprof handlers are at addr, saturated with call.
func profileOf(b *testing.B, kind, addr, path string, call func() error) {
	b.Helper()
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			if err := runCalls(1000, 100, call); err != nil {
				done <- err
				return
			}
		}
	}()
	prof := func() []byte {
		defer close(stop)
		return getOK(b, "http://"+addr+"/debug/pprof/"+kind+"?seconds=5")
	}()
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(path, prof, 0o644); err != nil {
		b.Fatal(err)
	}
}
