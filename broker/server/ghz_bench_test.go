package server

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// ghz is the load generator, pinned; it is built once per run, so that no
// go command shares the machine with the measured rounds.
const ghz = "github.com/bojand/ghz/cmd/ghz@v0.121.0"

// BenchmarkGhz loads the broker with ghz (a separate process, on loopback,
// concurrency 50): GetToken, the same-bytes Floor and Health/Check on one
// server in this process (audit trail to a file, rate limit off, as in dev
// mode with --rate-limit 0). Three runs of 30,000 calls of each; a run is
// made of slices of 5,000 calls, the three calls taking turns (the order
// turning every slice), so that the drift of a shared VM's speed falls on the
// three alike. Every call must succeed. It reports each call's medians over
// the runs: throughput, p50 and p99 (of every call's latency in the run),
// and the server's CPU per call (this process's CPU time over the run's
// slices of that call). Every call is described to ghz by a proto file, so
// that none pays for server reflection. Opt in, as it takes a minute and
// builds ghz:
//
// TOKENBROKER_GHZ may instead name a ghz binary (where there is no Go).
//
//	TOKENBROKER_GHZ=1 go test -run '^$' -bench BenchmarkGhz -benchtime 1x -v ./broker/server/
func BenchmarkGhz(b *testing.B) {
	if os.Getenv("TOKENBROKER_GHZ") == "" {
		b.Skip("a load run with ghz: set TOKENBROKER_GHZ=1 to run it")
	}
	floor := &floorServer{}
	h := newHarnessWith(b, func(c *config.Config) {
		benchConfig(b)(c)
		c.RateLimit = &config.RateLimit{} // one identity makes all the load
	}, func(o *Options) { o.Register = floor.register })
	pair, err := h.ca.Client(time.Hour, payments)
	if err != nil {
		b.Fatal(err)
	}
	certFile, keyFile := h.path("caller.pem"), h.path("caller-key.pem")
	if err := pair.WriteFiles(certFile, keyFile); err != nil {
		b.Fatal(err)
	}
	warm, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		b.Fatal(err)
	}
	floor.resp = &pb.GetTokenResponse{Token: warm}

	ghzBin := os.Getenv("TOKENBROKER_GHZ")
	if _, err := os.Stat(ghzBin); err != nil { // not a path to a ghz binary: build it
		bin := b.TempDir()
		install := exec.Command("go", "install", ghz)
		install.Env = append(os.Environ(), "GOBIN="+bin)
		if out, err := install.CombinedOutput(); err != nil {
			b.Fatalf("building ghz: %v\n%s", err, out)
		}
		ghzBin = filepath.Join(bin, "ghz")
	}

	// The bare floor (see BenchmarkBareFloor): grpc-go with the same TLS and
	// the same response, in a process of its own with GOMAXPROCS=1.
	js, err := protojson.Marshal(floor.resp)
	if err != nil {
		b.Fatal(err)
	}
	bareCfg, err := json.Marshal(perfBare{CertFile: h.cfg.TLS.CertFile, KeyFile: h.cfg.TLS.KeyFile, CAFile: h.cfg.TLS.ClientCAFile, Response: string(js)})
	if err != nil {
		b.Fatal(err)
	}
	h.write("perf-bare.json", string(bareCfg))
	bare := startPerfChild(b, "bare", h.path("perf-bare.json"))
	self := func() time.Duration { return cpuTime(b) }
	bareCPU := func() time.Duration { return bare.cpu(b) }
	calls := []struct {
		name, method, data, proto string
		addr                      string
		cpu                       func() time.Duration
	}{
		{"GetToken", "tokenbroker.v1.TokenBroker/GetToken", `{"credential":"identity"}`, "tokenbroker/v1/tokenbroker.proto", h.srv.GRPCAddr().String(), self},
		{"Floor", "tokenbroker.v1.Floor/GetToken", `{"credential":"identity"}`, "floor.proto", h.srv.GRPCAddr().String(), self},
		{"Health/Check", "grpc.health.v1.Health/Check", `{}`, "health.proto", h.srv.GRPCAddr().String(), self},
		{"Bare GetToken", "tokenbroker.v1.TokenBroker/GetToken", `{"credential":"identity"}`, "tokenbroker/v1/tokenbroker.proto", bare.addrs.GRPC, bareCPU},
		{"Bare Health/Check", "grpc.health.v1.Health/Check", `{}`, "health.proto", bare.addrs.GRPC, bareCPU},
	}
	const runs, nSlices, perSlice, c = 3, 6, 5000, 50
	results := map[string][]ghzResult{}
	for range runs {
		type acc struct {
			cpu, total time.Duration
			latencies  []float64
		}
		run := make([]acc, len(calls))
		for slice := range nSlices {
			for k := range calls {
				i := (k + slice) % len(calls)
				call := calls[i]
				args := []string{"--cacert", h.path("ca.pem"), "--cert", certFile, "--key", keyFile,
					"--proto", call.proto, "--import-paths", "../../proto,testdata",
					"--call", call.method, "-d", call.data, "-n", strconv.Itoa(perSlice), "-c", strconv.Itoa(c), "--format", "json",
					call.addr}
				cpu0 := call.cpu()
				out, err := exec.Command(ghzBin, args...).Output()
				cpu := call.cpu() - cpu0
				if err != nil {
					b.Fatalf("ghz %s: %v\n%s", call.name, err, out)
				}
				var r ghzReport
				if err := json.Unmarshal(out, &r); err != nil {
					b.Fatalf("ghz %s output: %v", call.name, err)
				}
				if r.StatusCodes["OK"] != perSlice || len(r.Details) != perSlice {
					b.Fatalf("ghz %s: status codes %v, %d results; want %d OK", call.name, r.StatusCodes, len(r.Details), perSlice)
				}
				run[i].cpu += cpu
				run[i].total += time.Duration(r.Total)
				for _, d := range r.Details {
					run[i].latencies = append(run[i].latencies, d.Latency)
				}
			}
		}
		for i, call := range calls {
			lat := run[i].latencies
			slices.Sort(lat)
			n := len(lat)
			results[call.name] = append(results[call.name], ghzResult{
				RPS: float64(n) / run[i].total.Seconds(), P50: lat[n/2], P99: lat[n*99/100],
				CPUPerCall: run[i].cpu / time.Duration(n)})
		}
	}
	med := func(name string, f func(ghzResult) float64) float64 { return medianOf(results[name], f) }
	p50 := func(r ghzResult) float64 { return r.P50 }
	p99 := func(r ghzResult) float64 { return r.P99 }
	var table strings.Builder
	fmt.Fprintf(&table, "\n%d calls of each per run at concurrency %d, medians of %d runs\n| call | requests/s | p50 | p99 | server CPU per call |\n|---|---|---|---|---|\n",
		nSlices*perSlice, c, runs)
	for _, call := range calls {
		fmt.Fprintf(&table, "| %s | %.0f | %s | %s | %s |\n", call.name, med(call.name, func(r ghzResult) float64 { return r.RPS }),
			time.Duration(med(call.name, p50)).Round(10*time.Microsecond), time.Duration(med(call.name, p99)).Round(10*time.Microsecond),
			time.Duration(med(call.name, func(r ghzResult) float64 { return float64(r.CPUPerCall) })).Round(100*time.Nanosecond))
	}
	ratio := func(a, bb string, f func(ghzResult) float64) float64 { return med(a, f) / med(bb, f) }
	rps := func(r ghzResult) float64 { return r.RPS }
	cpu := func(r ghzResult) float64 { return float64(r.CPUPerCall) }
	fmt.Fprintf(&table, "\nGetToken/Health throughput %.2f×, p99 %.2f×; GetToken/Floor throughput %.2f×, CPU per call %.2f×\n",
		ratio("GetToken", "Health/Check", rps), ratio("GetToken", "Health/Check", p99),
		ratio("GetToken", "Floor", rps), ratio("GetToken", "Floor", cpu))
	fmt.Fprintf(&table, "broker/bare (the bare server on one CPU, the broker here on GOMAXPROCS=%d): GetToken throughput %.2f×, CPU per call %.2f×; Health throughput %.2f×, CPU per call %.2f×\n",
		runtime.GOMAXPROCS(0), ratio("GetToken", "Bare GetToken", rps), ratio("GetToken", "Bare GetToken", cpu),
		ratio("Health/Check", "Bare Health/Check", rps), ratio("Health/Check", "Bare Health/Check", cpu))
	b.Log(table.String())
	b.ReportMetric(ratio("GetToken", "Health/Check", rps), "GetToken/Health-rps")
	b.ReportMetric(ratio("GetToken", "Floor", cpu), "GetToken/Floor-cpu")
}

// ghzReport is the part of ghz's JSON report used here.
type ghzReport struct {
	Total       int64          `json:"total"` // nanoseconds
	StatusCodes map[string]int `json:"statusCodeDistribution"`
	Details     []struct {
		Latency float64 `json:"latency"` // nanoseconds
	} `json:"details"`
}

// ghzResult is one call's figures over one run.
type ghzResult struct {
	RPS        float64
	P50, P99   float64 // nanoseconds
	CPUPerCall time.Duration
}
