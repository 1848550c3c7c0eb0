package server

import (
	"bytes"
	"context"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/server/attacktest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// The hostile review of issue 27: a silent call is ended by an RST_STREAM
// that frameGuard puts into what gRPC reads. These tests play a peer that
// tries to have the wrong stream reset, to keep the reset from reaching
// gRPC, or to get past the guard's counting, frame by frame.

const getToken = "/tokenbroker.v1.TokenBroker/GetToken"

// resetHarness is a broker whose limits.first_message_timeout is 300ms,
// with limits (and options) that mutate (adjust) change further, and a
// session on it from a caller with an identity (its streams are admitted).
func resetHarness(t *testing.T, mutate func(*config.Limits), adjust func(*Options)) (*harness, *attacktest.Session) {
	t.Helper()
	h := newHarnessWith(t, func(c *config.Config) {
		c.Limits = config.Limits{FirstMessageTimeout: config.Duration(300 * time.Millisecond)}
		if mutate != nil {
			mutate(&c.Limits)
		}
	}, adjust)
	return h, h.session(t)
}

// session opens an attacktest.Session on h's broker as a caller with an
// identity; the test's end closes it.
func (h *harness) session(t *testing.T) *attacktest.Session {
	t.Helper()
	target := h.attacker(t, payments)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	s, err := attacktest.Open(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// frames builds frames with an http2.Framer.
type frames struct {
	bytes.Buffer
	fr *http2.Framer
}

func newFrames() *frames {
	f := &frames{}
	f.fr = http2.NewFramer(&f.Buffer, nil)
	return f
}

// headers writes a HEADERS frame on stream id with block, END_HEADERS set.
func (f *frames) headers(id uint32, block []byte, endStream bool) *frames {
	_ = f.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndHeaders: true, EndStream: endStream})
	return f
}

// data writes a DATA frame on stream id.
func (f *frames) data(id uint32, endStream bool, b []byte) *frames {
	_ = f.fr.WriteData(id, endStream, b)
	return f
}

// take returns the frames written so far, and empties f.
func (f *frames) take() []byte {
	b := bytes.Clone(f.Bytes())
	f.Reset()
	return b
}

// waitingCalls counts the server's calls whose handler goroutine waits in
// gRPC for a request message: a silent call that is still there.
func waitingCalls() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "grpc.(*Server).handleStream") && strings.Contains(g, "(*recvBufferReader)") {
			count++
		}
	}
	return count
}

// within polls cond until it holds or d has passed; it reports whether it held.
func within(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// TestResetAfterHeadersTheFramerRefused: a HEADERS frame that gRPC's
// framer refuses as a stream error (here an upper-case field name; a
// malformed pseudo-header or an oversized pad length do the same) is
// answered RST_STREAM PROTOCOL_ERROR and does not move gRPC's highest
// stream id, so the peer may go on with lower stream ids. Those are new
// streams to gRPC, and each must still be the stream the guard names to the
// tap: a silent call among them is reset, and no other stream is — not a
// live Health/Watch of the same peer opened next.
func TestResetAfterHeadersTheFramerRefused(t *testing.T) {
	h, s := resetHarness(t, nil, nil)
	authority := h.srv.GRPCAddr().String()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	f := newFrames()
	bad := attacktest.RequestHeaders(authority, getToken, hpack.HeaderField{Name: "X-Upper", Value: "1"})
	if err := s.Write(f.headers(101, bad, false).take()); err != nil {
		t.Fatal(err)
	}
	if got := s.Ended(ctx, 101); got[0] != "rst PROTOCOL_ERROR" {
		t.Fatalf("stream 101 with an upper-case field name ended %q, want rst PROTOCOL_ERROR", got[0])
	}
	watch, err := proto.Marshal(&healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// One write: a silent GetToken on stream 1, a Health/Watch on 103.
	f.headers(1, attacktest.RequestHeaders(authority, getToken), false)
	f.headers(103, attacktest.RequestHeaders(authority, "/grpc.health.v1.Health/Watch"), false).data(103, true, attacktest.Message(watch))
	if err := s.Write(f.take()); err != nil {
		t.Fatal(err)
	}
	wait, stop := context.WithTimeout(context.Background(), 3*time.Second)
	defer stop()
	if got := s.Ended(wait, 1); got[0] != "rst CANCEL" {
		t.Errorf("silent stream 1 ended %q, want rst CANCEL", got[0])
	}
	short, stop2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer stop2()
	if got := s.Ended(short, 103); got[0] != "" {
		t.Errorf("Health/Watch on stream 103 ended %q; it was not silent, want it open", got[0])
	}
	if !within(2*time.Second, func() bool { return waitingCalls() == 0 }) {
		t.Errorf("%d silent calls still wait in gRPC for their request", waitingCalls())
	}
	if n := h.metric(t, "tokenbroker_streams_refused_total", "reason=first_message_timeout"); n != 1 {
		t.Errorf("tokenbroker_streams_refused_total{reason=first_message_timeout} = %v, want 1", n)
	}
}

// TestNewStreamsCountedAfterHeadersTheFramerRefused: HEADERS on the highest
// stream id, refused by gRPC's framer (an upper-case field name), leaves
// gRPC ready to open every lower stream; those streams count against
// limits.new_streams_per_second as any other: a flood of them is sent
// GOAWAY ENHANCE_YOUR_CALM.
func TestNewStreamsCountedAfterHeadersTheFramerRefused(t *testing.T) {
	h, s := resetHarness(t, func(l *config.Limits) { l.NewStreamsPerSecond, l.NewStreamsBurst = 50, 50 }, nil)
	authority := h.srv.GRPCAddr().String()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := newFrames()
	bad := attacktest.RequestHeaders(authority, getToken, hpack.HeaderField{Name: "X-Upper", Value: "1"})
	if err := s.Write(f.headers(1<<31-1, bad, false).take()); err != nil {
		t.Fatal(err)
	}
	if got := s.Ended(ctx, 1<<31-1); got[0] != "rst PROTOCOL_ERROR" {
		t.Fatalf("stream 2^31-1 with an upper-case field name ended %q, want rst PROTOCOL_ERROR", got[0])
	}
	check := attacktest.RequestHeaders(authority, "/grpc.health.v1.Health/Check")
	id := uint32(1)
	for range 4 { // 400 calls at once: eight times the burst
		for range 100 {
			f.headers(id, check, true)
			id += 2
		}
		if err := s.Write(f.take()); err != nil {
			break // the server closed the connection
		}
	}
	short, stop := context.WithTimeout(ctx, 2*time.Second)
	defer stop()
	g, ok := s.GoAway(short)
	if !ok || g.Code != http2.ErrCodeEnhanceYourCalm {
		t.Errorf("400 new streams at once after a refused HEADERS on stream 2^31-1: GOAWAY %+v (%v), want ENHANCE_YOUR_CALM", g, ok)
	}
	if got := h.metric(t, "tokenbroker_connections_refused_total", "reason=new_streams_per_second"); got != 1 {
		t.Errorf("tokenbroker_connections_refused_total{reason=new_streams_per_second} = %v, want 1", got)
	}
}

// TestEverySilentStreamResetToThePeer: on each of 50 connections at once,
// three times over, silent calls among ordinary ones, so that their
// first-message deadlines fall due while the resets of others are being
// written: the peer is sent RST_STREAM CANCEL for each, none left waiting
// for a write of gRPC's that may never come.
func TestEverySilentStreamResetToThePeer(t *testing.T) {
	h, _ := resetHarness(t, nil, nil)
	authority := h.srv.GRPCAddr().String()
	silent, check := attacktest.RequestHeaders(authority, getToken), attacktest.RequestHeaders(authority, "/grpc.health.v1.Health/Check")
	health, err := proto.Marshal(&healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var sessions []*attacktest.Session
	for range 50 {
		sessions = append(sessions, h.session(t))
	}
	var wg sync.WaitGroup
	for i, s := range sessions {
		wg.Go(func() {
			f := newFrames()
			for round, id := 0, uint32(1); round < 3; round++ {
				var ids []uint32
				for range 5 {
					f.headers(id, silent, false)
					ids = append(ids, id)
					f.headers(id+2, check, false).data(id+2, true, attacktest.Message(health))
					id += 4
				}
				if err := s.Write(f.take()); err != nil {
					t.Error(err)
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				for j, e := range s.Ended(ctx, ids...) {
					if e != "rst CANCEL" {
						t.Errorf("connection %d, silent stream %d: ended %q in 2s, want RST_STREAM CANCEL", i, ids[j], e)
					}
				}
				cancel()
			}
		})
	}
	wg.Wait()
	if !within(2*time.Second, func() bool { return waitingCalls() == 0 }) {
		t.Errorf("%d silent calls still wait in gRPC for their request", waitingCalls())
	}
}

// TestStalledPeerLosesItsSilentCalls: a peer that, once its silent calls
// are due to be reset, stops in the middle of a frame or of a block of
// headers keeps the guard from putting the RST_STREAM into what gRPC reads
// (it goes in between two frames, outside a block). The silent calls must
// not outlive that: within another limits.first_message_timeout the
// connection is closed, and no call waits in gRPC for its request.
func TestStalledPeerLosesItsSilentCalls(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stall func(authority string) []byte
	}{
		{"mid-frame", func(string) []byte {
			var b bytes.Buffer
			_ = http2.NewFramer(&b, nil).WritePing(false, [8]byte{1, 2, 3, 4, 5, 6, 7, 8})
			return b.Bytes()[:9+3] // a PING's header and 3 of its 8 bytes
		}},
		{"mid-frame-header", func(string) []byte {
			var b bytes.Buffer
			_ = http2.NewFramer(&b, nil).WritePing(false, [8]byte{})
			return b.Bytes()[:5]
		}},
		{"mid-header-block", func(authority string) []byte {
			var b bytes.Buffer
			_ = http2.NewFramer(&b, nil).WriteHeaders(http2.HeadersFrameParam{StreamID: 5,
				BlockFragment: attacktest.RequestHeaders(authority, getToken)[:10], EndHeaders: false})
			return b.Bytes() // HEADERS without END_HEADERS, and no CONTINUATION
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, s := resetHarness(t, nil, nil)
			authority := h.srv.GRPCAddr().String()
			f := newFrames()
			f.headers(1, attacktest.RequestHeaders(authority, getToken), false)
			f.headers(3, attacktest.RequestHeaders(authority, getToken), false)
			if err := s.Write(f.take()); err != nil {
				t.Fatal(err)
			}
			if !within(time.Second, func() bool { return waitingCalls() == 2 }) {
				t.Fatalf("%d calls wait in gRPC for their request, want the 2 silent ones", waitingCalls())
			}
			if err := s.Write(tc.stall(authority)); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			if got := s.Ended(ctx, 1, 3); got[0] != "rst CANCEL" || got[1] != "rst CANCEL" {
				t.Errorf("silent streams ended %q, want RST_STREAM CANCEL", got)
			}
			if !within(2*time.Second, func() bool { return waitingCalls() == 0 }) {
				t.Errorf("%d silent calls still wait in gRPC for their request 2s after their reset", waitingCalls())
			}
			select {
			case <-s.Closed():
			case <-time.After(time.Second):
				t.Errorf("the stalled connection is still open")
			}
		})
	}
}

// TestResetAmongOddHeaders: on one connection, silent calls whose headers
// take the less common shapes — PRIORITY and padding flags, a block in
// HEADERS and CONTINUATION frames, a frame cut into one-byte TLS records,
// stream ids that jump, a partial request message — among streams gRPC
// refuses before its tap (over its cap on concurrent streams, without
// :authority, over limits.max_header_list_size, :method GET), a call with
// END_STREAM on its headers and an ordinary call. Each silent call is
// reset and leaves gRPC; no other stream is reset; the connection, its
// flow-control window included, serves on.
func TestResetAmongOddHeaders(t *testing.T) {
	const concurrent = 4
	h, s := resetHarness(t, func(l *config.Limits) { l.MaxHeaderListSize = 1024 },
		func(o *Options) { o.MaxStreamsPerConnection = concurrent })
	authority := h.srv.GRPCAddr().String()
	req, err := proto.Marshal(&pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatal(err)
	}
	silent := attacktest.RequestHeaders(authority, getToken)
	partial := func(n int) []byte { // the start of a request message of 30,000 bytes
		return append(attacktest.Message(make([]byte, 30000))[:5], make([]byte, n)...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ends := func(want map[uint32]string) {
		t.Helper()
		var ids []uint32
		for id := range want {
			ids = append(ids, id)
		}
		for i, got := range s.Ended(ctx, ids...) {
			if got != want[ids[i]] {
				t.Errorf("stream %d ended %q, want %q", ids[i], got, want[ids[i]])
			}
		}
	}
	f := newFrames()

	// As many silent calls as gRPC holds at once.
	_ = f.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: silent, EndHeaders: true, PadLength: 40,
		Priority: http2.PriorityParam{StreamDep: 0, Weight: 200, Exclusive: true}})
	_ = f.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: silent[:10]})
	_ = f.fr.WriteContinuation(3, false, silent[10:20])
	_ = f.fr.WriteContinuation(3, true, silent[20:])
	f.headers(1001, silent, false) // a jump
	f.headers(1003, silent, false).data(1003, false, partial(15000))
	// Refused before the tap: over gRPC's cap, then before its cap is looked at.
	f.headers(1005, silent, false)
	var noAuthority bytes.Buffer
	enc := hpack.NewEncoder(&noAuthority)
	for _, hf := range []hpack.HeaderField{{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "https"},
		{Name: ":path", Value: getToken}, {Name: "content-type", Value: "application/grpc"}} {
		_ = enc.WriteField(hf)
	}
	f.headers(1009, noAuthority.Bytes(), false)
	big := strings.Repeat("x", 500) // three of them: over 1024 bytes (one string over it ends the connection)
	f.headers(1011, attacktest.RequestHeaders(authority, getToken, hpack.HeaderField{Name: "x-a", Value: big},
		hpack.HeaderField{Name: "x-b", Value: big}, hpack.HeaderField{Name: "x-c", Value: big}), false)
	if err := s.Write(f.take()); err != nil {
		t.Fatal(err)
	}
	ends(map[uint32]string{1: "rst CANCEL", 3: "rst CANCEL", 1001: "rst CANCEL", 1003: "rst CANCEL",
		1005: "rst REFUSED_STREAM", 1009: "13", 1011: "rst FRAME_SIZE_ERROR"})

	// gRPC let the reset ones go: refused after its cap, END_STREAM, an
	// ordinary call, a silent call in one-byte TLS records, more partial
	// messages than the connection's window took at first.
	var get bytes.Buffer
	enc = hpack.NewEncoder(&get)
	for _, hf := range []hpack.HeaderField{{Name: ":method", Value: "GET"}, {Name: ":scheme", Value: "https"},
		{Name: ":path", Value: getToken}, {Name: ":authority", Value: authority}, {Name: "content-type", Value: "application/grpc"}} {
		_ = enc.WriteField(hf)
	}
	gone := func() {
		t.Helper()
		if !within(2*time.Second, func() bool { return waitingCalls() == 0 }) {
			t.Fatalf("%d silent calls still wait in gRPC for their request", waitingCalls())
		}
	}
	gone()
	f.headers(1013, get.Bytes(), false)
	f.headers(1015, silent, true)
	f.headers(1017, silent, false).data(1017, true, attacktest.Message(req))
	if err := s.Write(f.take()); err != nil {
		t.Fatal(err)
	}
	ends(map[uint32]string{1013: "13", 1015: "13", 1017: "0"})
	f.headers(1019, silent, false)
	var records [][]byte
	for _, b := range f.take() {
		records = append(records, []byte{b})
	}
	if err := s.Write(records...); err != nil {
		t.Fatal(err)
	}
	f.headers(1021, silent, false).data(1021, false, partial(15000))
	f.headers(1023, silent, false).data(1023, false, partial(15000))
	if err := s.Write(f.take()); err != nil {
		t.Fatal(err)
	}
	ends(map[uint32]string{1019: "rst CANCEL", 1021: "rst CANCEL", 1023: "rst CANCEL"})
	gone()

	f.headers(1025, silent, false).data(1025, false, partial(15000))
	f.headers(1027, silent, false).data(1027, true, attacktest.Message(req))
	if err := s.Write(f.take()); err != nil {
		t.Fatal(err)
	}
	ends(map[uint32]string{1025: "rst CANCEL", 1027: "0"})
	gone()
	if got := h.metric(t, "tokenbroker_streams_refused_total", "reason=first_message_timeout"); got != 8 {
		t.Errorf("tokenbroker_streams_refused_total{reason=first_message_timeout} = %v, want 8", got)
	}
	select {
	case <-s.Closed():
		t.Errorf("the connection was closed")
	default:
	}
}

// TestManyResetsKeepTheConnection: on each of 4 connections at once, three
// times over, 300 silent calls, reset one after another as fast as the
// sweep goes, each reset waking gRPC's read of the connection: the
// connections live on (a read deadline left from one reset must not reach
// gRPC as a timeout) and serve an ordinary call afterwards.
func TestManyResetsKeepTheConnection(t *testing.T) {
	h, _ := resetHarness(t, nil, nil)
	authority := h.srv.GRPCAddr().String()
	silent := attacktest.RequestHeaders(authority, getToken)
	req, err := proto.Marshal(&pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for c := range 4 {
		s := h.session(t)
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			f := newFrames()
			id := uint32(1)
			for round := range 3 {
				var ids []uint32
				for range 300 {
					f.headers(id, silent, false)
					ids = append(ids, id)
					id += 2
				}
				if err := s.Write(f.take()); err != nil {
					t.Errorf("connection %d, round %d: %v", c, round, err)
					return
				}
				for i, e := range s.Ended(ctx, ids...) {
					if e != "rst CANCEL" {
						t.Errorf("connection %d, round %d: silent stream %d ended %q, want RST_STREAM CANCEL", c, round, ids[i], e)
						return
					}
				}
			}
			f.headers(id, silent, false).data(id, true, attacktest.Message(req))
			if err := s.Write(f.take()); err != nil {
				t.Errorf("connection %d: %v", c, err)
				return
			}
			if got := s.Ended(ctx, id); got[0] != "0" {
				t.Errorf("connection %d: an ordinary call after the resets ended %q, want grpc-status 0", c, got[0])
			}
		})
	}
	wg.Wait()
}

// TestGuardResetsAreNotThePeers: the RST_STREAM frames the guard puts into
// what gRPC reads do not count against limits.stream_resets_per_second,
// which is the peer's: 40 silent calls reset at once on a connection
// allowed one reset a second keep the connection, which serves on.
func TestGuardResetsAreNotThePeers(t *testing.T) {
	h, s := resetHarness(t, func(l *config.Limits) { l.StreamResetsPerSecond = 1 }, nil)
	authority := h.srv.GRPCAddr().String()
	req, err := proto.Marshal(&pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatal(err)
	}
	f := newFrames()
	var ids []uint32
	for id := uint32(1); id < 80; id += 2 {
		f.headers(id, attacktest.RequestHeaders(authority, getToken), false)
		ids = append(ids, id)
	}
	if err := s.Write(f.take()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for i, e := range s.Ended(ctx, ids...) {
		if e != "rst CANCEL" {
			t.Errorf("silent stream %d ended %q, want RST_STREAM CANCEL", ids[i], e)
		}
	}
	if err := s.Write(f.headers(81, attacktest.RequestHeaders(authority, getToken), false).data(81, true, attacktest.Message(req)).take()); err != nil {
		t.Fatal(err)
	}
	if got := s.Ended(ctx, 81); got[0] != "0" {
		t.Errorf("an ordinary call after the resets ended %q, want grpc-status 0", got[0])
	}
	if got := h.metric(t, "tokenbroker_connections_refused_total", "reason=stream_resets_per_second"); got != 0 {
		t.Errorf("tokenbroker_connections_refused_total{reason=stream_resets_per_second} = %v, want 0", got)
	}
}

// TestGoAwayWithResetsDue: a connection sent GOAWAY ENHANCE_YOUR_CALM (over
// limits.new_streams_per_second) while its silent calls are due to be
// reset ends cleanly: the peer gets the GOAWAY, the connection is closed,
// and no call is left waiting in gRPC.
func TestGoAwayWithResetsDue(t *testing.T) {
	h, s := resetHarness(t, func(l *config.Limits) { l.NewStreamsPerSecond, l.NewStreamsBurst = 1, 10 }, nil)
	authority := h.srv.GRPCAddr().String()
	f := newFrames()
	for id := uint32(1); id < 20; id += 2 {
		f.headers(id, attacktest.RequestHeaders(authority, getToken), false)
	}
	if err := s.Write(f.take()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(350 * time.Millisecond) // their deadline passes
	_ = s.Write(f.headers(21, attacktest.RequestHeaders(authority, getToken), false).take())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if g, ok := s.GoAway(ctx); !ok || g.Code != http2.ErrCodeEnhanceYourCalm {
		t.Errorf("GOAWAY %+v (%v), want ENHANCE_YOUR_CALM", g, ok)
	}
	select {
	case <-s.Closed():
	case <-ctx.Done():
		t.Errorf("the connection is still open")
	}
	if !within(2*time.Second, func() bool { return waitingCalls() == 0 }) {
		t.Errorf("%d silent calls still wait in gRPC for their request", waitingCalls())
	}
}
