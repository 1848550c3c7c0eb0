package server

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"

	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// BenchmarkServerVsFloor sets a cached GetToken beside the same-bytes floor
// and Health/Check on BenchmarkServer's server (Redis behind it, audit trail
// to a file, rate limit on) and one connection, in three runs. A run makes
// b.N calls of each, serially and then from GOMAXPROCS goroutines at once,
// in alternating slices of chunk calls (the order turning every slice), so
// that the drift of a shared VM's speed, which over seconds is larger than
// the difference measured, falls on the three alike. It reports the medians
// of the three runs: wall time and CPU time (this process's: client and
// server) per call, and the ratios of GetToken to the floor.
//
// What separates GetToken from the floor is the broker's own work on a hit,
// which BenchmarkServiceGetToken measures alone. About half of it is the
// audit record (encoding the line, and its share of the trail's 256 KiB
// writes into the page cache); the rest is the rate limit, the policy, the
// cache lookup, the request ID and the counters. Inside the server that work
// costs two to three times what it costs alone, because gRPC and TLS between
// two calls push the broker's data out of the CPU caches. A floor made to burn
// the same CPU in its handler measures the same as GetToken; skipping the
// audit record or the checks on a hit would weaken what the broker is for.
// Where the time goes:
//
//	go test -p 1 -run '^$' -bench 'BenchmarkServer/^GetToken$/serial' -benchtime 60000x -cpuprofile cpu.out ./broker/server/
//	go tool pprof -top -cum -focus 'grpcapi.\(\*Service\).GetToken' server.test cpu.out
//
// Run it:
//
//	go test -run '^$' -bench BenchmarkServerVsFloor -benchtime 30000x -v ./broker/server/
func BenchmarkServerVsFloor(b *testing.B) {
	const chunk = 500
	rs := redistest.Start(b)
	fb := newFloorBench(b, withRedis("", rs.Addr()))
	calls := []struct {
		name string
		call func() error
	}{{"GetToken", fb.getToken}, {"Floor", fb.floor}, {"Health/Check", fb.health}}
	for _, c := range calls { // warm up: connections, buffers, the heap's size
		if err := runCalls(min(b.N, 2000), 1, c.call); err != nil {
			b.Fatal(err)
		}
	}
	type sample struct{ wall, cpu float64 } // ns per call
	samples := map[string][]sample{}        // by call and mode
	modes := []struct {
		name    string
		callers int
	}{{"serial", 1}, {"parallel", runtime.GOMAXPROCS(0)}}
	fetches := fb.h.as.TokenRequests()
	for range 3 {
		for _, m := range modes {
			wall := make([]time.Duration, len(calls))
			cpu := make([]time.Duration, len(calls))
			for slice, done := 0, 0; done < b.N; slice++ {
				n := min(chunk, b.N-done)
				for k := range calls {
					i := (k + slice) % len(calls)
					cpu0, t0 := cpuTime(b), time.Now()
					if err := runCalls(n, m.callers, calls[i].call); err != nil {
						b.Fatalf("%s/%s: %v", calls[i].name, m.name, err)
					}
					wall[i] += time.Since(t0)
					cpu[i] += cpuTime(b) - cpu0
				}
				done += n
			}
			for i, c := range calls {
				key := c.name + "/" + m.name
				samples[key] = append(samples[key], sample{float64(wall[i]) / float64(b.N), float64(cpu[i]) / float64(b.N)})
			}
		}
	}
	if n := fb.h.as.TokenRequests() - fetches; n != 0 {
		b.Errorf("%d token requests while measuring hits, want 0", n)
	}
	median := func(key string, f func(sample) float64) float64 { return medianOf(samples[key], f) }
	wall := func(s sample) float64 { return s.wall }
	cpu := func(s sample) float64 { return s.cpu }
	var table strings.Builder
	fmt.Fprintf(&table, "\n%d calls of each per run, medians of 3 runs\n| call | serial ns/call | serial CPU ns/call | parallel ns/call | parallel CPU ns/call |\n|---|---|---|---|---|\n", b.N)
	for _, c := range calls {
		fmt.Fprintf(&table, "| %s | %.0f | %.0f | %.0f | %.0f |\n", c.name, median(c.name+"/serial", wall), median(c.name+"/serial", cpu),
			median(c.name+"/parallel", wall), median(c.name+"/parallel", cpu))
	}
	ratio := func(mode string, f func(sample) float64) float64 {
		return median("GetToken/"+mode, f) / median("Floor/"+mode, f)
	}
	fmt.Fprintf(&table, "| GetToken / Floor | %.3f× | %.3f× | %.3f× | %.3f× |\n",
		ratio("serial", wall), ratio("serial", cpu), ratio("parallel", wall), ratio("parallel", cpu))
	b.Log(table.String())
	b.ReportMetric(0, "ns/op") // a round's total would mean nothing
	b.ReportMetric(ratio("serial", wall), "GetToken/Floor-serial")
	b.ReportMetric(ratio("serial", cpu), "GetToken/Floor-serial-cpu")
	b.ReportMetric(ratio("parallel", wall), "GetToken/Floor-parallel")
	b.ReportMetric(ratio("parallel", cpu), "GetToken/Floor-parallel-cpu")
}

// medianOf is the median of f over xs (the upper one of an even count).
func medianOf[T any](xs []T, f func(T) float64) float64 {
	v := make([]float64, len(xs))
	for i, x := range xs {
		v[i] = f(x)
	}
	slices.Sort(v)
	return v[len(v)/2]
}

// runCalls makes n calls of call from the given number of goroutines.
func runCalls(n, callers int, call func() error) error {
	var next atomic.Int64
	errs := make([]error, callers)
	var wg sync.WaitGroup
	for i := range callers {
		wg.Go(func() {
			for next.Add(1) <= int64(n) {
				if err := call(); err != nil {
					errs[i] = err
					return
				}
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// floorBench is a broker with the floor registered (benchConfig, then
// mutate), a warm cache, and one client connection to it.
type floorBench struct {
	h      *harness
	tb     pb.TokenBrokerClient
	fc     pb.TokenBrokerClient // its GetToken calls the floor
	hc     healthpb.HealthClient
	getReq *pb.GetTokenRequest
}

func newFloorBench(b *testing.B, mutate func(*config.Config)) *floorBench {
	b.Helper()
	floor := &floorServer{}
	h := newHarnessWith(b, func(c *config.Config) {
		benchConfig(b)(c)
		if mutate != nil {
			mutate(c)
		}
	}, func(o *Options) { o.Register = floor.register })
	conn := h.conn(nil, payments)
	fb := &floorBench{h: h, tb: pb.NewTokenBrokerClient(conn), fc: pb.NewTokenBrokerClient(floorConn{conn}),
		hc: healthpb.NewHealthClient(conn), getReq: &pb.GetTokenRequest{Credential: "identity"}}
	ctx := context.Background()
	warm, err := fb.tb.GetToken(ctx, fb.getReq) // warms the cache
	if err != nil {
		b.Fatal(err)
	}
	floor.resp = warm
	if floorResp, err := fb.fc.GetToken(ctx, fb.getReq); err != nil || !proto.Equal(floorResp, warm) {
		b.Fatalf("floor = %v, %v; want the same response as GetToken", floorResp, err)
	}
	return fb
}

var healthReq = &healthpb.HealthCheckRequest{}

func (fb *floorBench) getToken() error {
	_, err := fb.tb.GetToken(context.Background(), fb.getReq)
	return err
}

func (fb *floorBench) floor() error {
	_, err := fb.fc.GetToken(context.Background(), fb.getReq)
	return err
}

func (fb *floorBench) health() error {
	_, err := fb.hc.Check(context.Background(), healthReq)
	return err
}

// floorMethod is the same-bytes floor: GetToken's request and response
// types, a pre-built answer, on the broker's own gRPC server.
const floorMethod = "/tokenbroker.v1.Floor/GetToken"

// floorServer answers floorMethod with resp, a token the broker issued.
type floorServer struct {
	pb.UnimplementedTokenBrokerServer
	resp *pb.GetTokenResponse
}

// GetToken returns the pre-built response.
func (f *floorServer) GetToken(context.Context, *pb.GetTokenRequest) (*pb.GetTokenResponse, error) {
	return f.resp, nil
}

// floorConn sends unary calls to the floor, so that the floor is called
// through the generated TokenBroker client, as GetToken is: the client side
// of the two costs the same.
type floorConn struct{ grpc.ClientConnInterface }

// Invoke calls floorMethod instead of method.
func (c floorConn) Invoke(ctx context.Context, _ string, args, reply any, opts ...grpc.CallOption) error {
	return c.ClientConnInterface.Invoke(ctx, floorMethod, args, reply, opts...)
}

// register adds the floor service under its own name, with TokenBroker's
// GetToken handler (decoding, interceptors and all).
func (f *floorServer) register(s *grpc.Server) {
	desc := pb.TokenBroker_ServiceDesc
	desc.ServiceName = "tokenbroker.v1.Floor"
	desc.Methods = []grpc.MethodDesc{{MethodName: "GetToken", Handler: pb.TokenBroker_ServiceDesc.Methods[0].Handler}}
	desc.Streams = nil
	s.RegisterService(&desc, f)
}

// cpuTime is the CPU time (user and system) this process has used so far:
// client and server together, as both run here. Unlike ns/op it leaves out
// the time a call waits to be woken, which on a small VM varies more from
// run to run than the work does.
func cpuTime(b *testing.B) time.Duration {
	b.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
