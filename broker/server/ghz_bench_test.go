package server

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// ghz is the load generator, pinned; it is built once per run, so that no
// go command shares the machine with the measured rounds.
const ghz = "github.com/bojand/ghz/cmd/ghz@v0.121.0"

// BenchmarkGhz loads the broker with ghz (a separate process, on loopback):
// GetToken, the same-bytes Floor and Health/Check, 30,000 calls each at
// concurrency 50, three alternating rounds, on one server in this process
// (audit trail to a file, rate limit off, as in dev mode with --rate-limit 0).
// It reports each call's median throughput, p50 and p99, and the server's CPU
// per call (this process's CPU time over the run, from /proc). Opt in, as
// it takes a minute and builds ghz:
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

	bin := b.TempDir()
	install := exec.Command("go", "install", ghz)
	install.Env = append(os.Environ(), "GOBIN="+bin)
	if out, err := install.CombinedOutput(); err != nil {
		b.Fatalf("building ghz: %v\n%s", err, out)
	}
	ghzBin := filepath.Join(bin, "ghz")

	calls := []struct{ name, method, data string }{
		{"GetToken", "tokenbroker.v1.TokenBroker/GetToken", `{"credential":"identity"}`},
		{"Floor", "tokenbroker.v1.Floor/GetToken", `{"credential":"identity"}`},
		{"Health/Check", "grpc.health.v1.Health/Check", `{}`},
	}
	const n, c = 30000, 50
	results := map[string][]ghzResult{}
	for range 3 {
		for _, call := range calls {
			args := []string{"--cacert", h.path("ca.pem"), "--cert", certFile, "--key", keyFile,
				"--call", call.method, "-d", call.data, "-n", strconv.Itoa(n), "-c", strconv.Itoa(c), "--format", "json"}
			if call.name == "Floor" {
				args = append(args, "--proto", "testdata/floor.proto", "--import-paths", "../../proto,testdata")
			}
			args = append(args, h.srv.GRPCAddr().String())
			cpu0 := cpuTime(b)
			out, err := exec.Command(ghzBin, args...).Output()
			cpu := cpuTime(b) - cpu0
			if err != nil {
				b.Fatalf("ghz %s: %v\n%s", call.name, err, out)
			}
			var r ghzResult
			if err := json.Unmarshal(out, &r); err != nil {
				b.Fatalf("ghz %s output: %v", call.name, err)
			}
			if r.StatusCodes["OK"] != n {
				b.Fatalf("ghz %s: status codes %v, want %d OK", call.name, r.StatusCodes, n)
			}
			r.CPUPerCall = cpu / n
			results[call.name] = append(results[call.name], r)
		}
	}
	med := func(name string, f func(ghzResult) float64) float64 {
		var v []float64
		for _, r := range results[name] {
			v = append(v, f(r))
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	var table strings.Builder
	fmt.Fprintf(&table, "\n| call | requests/s | p50 | p99 | server CPU per call |\n|---|---|---|---|---|\n")
	for _, call := range calls {
		fmt.Fprintf(&table, "| %s | %.0f | %s | %s | %s |\n", call.name, med(call.name, func(r ghzResult) float64 { return r.RPS }),
			time.Duration(med(call.name, percentile(50))).Round(10*time.Microsecond), time.Duration(med(call.name, percentile(99))).Round(10*time.Microsecond),
			time.Duration(med(call.name, func(r ghzResult) float64 { return float64(r.CPUPerCall) })).Round(100*time.Nanosecond))
	}
	ratio := func(a, bb string, f func(ghzResult) float64) float64 { return med(a, f) / med(bb, f) }
	rps := func(r ghzResult) float64 { return r.RPS }
	cpu := func(r ghzResult) float64 { return float64(r.CPUPerCall) }
	fmt.Fprintf(&table, "\nGetToken/Health throughput %.2f×, p99 %.2f×; GetToken/Floor throughput %.2f×, CPU per call %.2f×\n",
		ratio("GetToken", "Health/Check", rps), ratio("GetToken", "Health/Check", percentile(99)),
		ratio("GetToken", "Floor", rps), ratio("GetToken", "Floor", cpu))
	b.Log(table.String())
	b.ReportMetric(ratio("GetToken", "Health/Check", rps), "GetToken/Health-rps")
	b.ReportMetric(ratio("GetToken", "Floor", cpu), "GetToken/Floor-cpu")
}

// ghzResult is the part of ghz's JSON report used here.
type ghzResult struct {
	RPS         float64        `json:"rps"`
	StatusCodes map[string]int `json:"statusCodeDistribution"`
	Latencies   []struct {
		Percentage int     `json:"percentage"`
		Latency    float64 `json:"latency"` // nanoseconds
	} `json:"latencyDistribution"`
	CPUPerCall time.Duration `json:"-"`
}

// percentile returns a function reading the pct-th percentile latency in nanoseconds.
func percentile(pct int) func(ghzResult) float64 {
	return func(r ghzResult) float64 {
		for _, l := range r.Latencies {
			if l.Percentage == pct {
				return l.Latency
			}
		}
		return 0
	}
}
