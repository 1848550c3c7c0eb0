package grpcapi

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/tap"
)

// BenchmarkAdmission is what admission adds to every call: the tap (count,
// first-message timer, end-of-stream callback) and the unary interceptor
// that stops the timer, up to the stream's end.
func BenchmarkAdmission(b *testing.B) {
	a := NewAdmission(AdmissionConfig{StreamsPerConnection: 1 << 30, FirstMessageTimeout: 10 * time.Second})
	ci := &callerInfo{id: "spiffe://bank.internal/ns/kyc/sa/onboarding"}
	base := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}, AuthInfo: ci})
	info := &tap.Info{FullMethodName: "/tokenbroker.v1.TokenBroker/GetToken"}
	b.ReportAllocs()
	for b.Loop() {
		stream, end := context.WithCancel(base)
		ctx, err := a.Tap(stream, info)
		if err != nil {
			b.Fatal(err)
		}
		_, _ = a.unary(ctx, nil, nil, func(context.Context, any) (any, error) { return nil, nil }, nil)
		end()
	}
}

// TestAdmissionReleasesStreams: a connection's count of open calls goes back
// down as streams end, so that the limit bites only on calls really open.
func TestAdmissionReleasesStreams(t *testing.T) {
	a := NewAdmission(AdmissionConfig{StreamsPerConnection: 2, FirstMessageTimeout: time.Minute})
	ci := &callerInfo{id: "spiffe://bank.internal/ns/kyc/sa/onboarding"}
	base := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}, AuthInfo: ci})
	var ends []context.CancelFunc
	for range 2 {
		stream, end := context.WithCancel(base)
		ctx, err := a.Tap(stream, &tap.Info{})
		if err != nil {
			t.Fatal(err)
		}
		ends = append(ends, func() { // the handler returns, then the stream ends
			_, _ = a.unary(ctx, nil, nil, func(context.Context, any) (any, error) { return nil, nil }, nil)
			end()
		})
	}
	stream, end := context.WithCancel(base)
	defer end()
	if _, err := a.Tap(stream, &tap.Info{}); err == nil {
		t.Fatal("a third stream admitted on a connection limited to 2")
	}
	ends[0]()
	if _, err := a.Tap(stream, &tap.Info{}); err != nil {
		t.Errorf("after a stream ended: %v, want a new one admitted", err)
	}
	ends[1]()
	if n := ci.streams.Load(); n != 1 {
		t.Errorf("%d calls counted open, want 1", n)
	}

	// A call that never reaches its handler holds its place until its
	// first-message timer releases it.
	b := NewAdmission(AdmissionConfig{StreamsPerConnection: 1, FirstMessageTimeout: 50 * time.Millisecond})
	ci2 := &callerInfo{id: "spiffe://bank.internal/ns/kyc/sa/onboarding"}
	base2 := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: ci2})
	ctx, err := b.Tap(base2, &tap.Info{})
	if err != nil {
		t.Fatal(err)
	}
	<-ctx.Done()
	if cause := context.Cause(ctx); cause != errNoFirstMessage || ci2.streams.Load() != 0 {
		t.Errorf("silent call: cause %v, %d counted open; want errNoFirstMessage and 0", cause, ci2.streams.Load())
	}
}

// TestWaitingCallsCutInOrder: a connection's calls without a first message
// are cut each at its own deadline (one timer per connection, armed again
// for the next oldest), counted as first_message_timeout; a call whose first
// message came is not touched, and one whose stream ended before its handler
// (reset by the peer) gives its place back without being counted.
func TestWaitingCallsCutInOrder(t *testing.T) {
	const timeout = 150 * time.Millisecond
	var mu sync.Mutex
	refused := map[string]int{}
	a := NewAdmission(AdmissionConfig{StreamsPerConnection: 10, FirstMessageTimeout: timeout, Refused: func(r string) {
		mu.Lock()
		refused[r]++
		mu.Unlock()
	}})
	ci := &callerInfo{id: "spiffe://bank.internal/ns/kyc/sa/onboarding"}
	base := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: ci})
	tapped := func() (context.Context, context.CancelFunc) {
		stream, end := context.WithCancel(base)
		ctx, err := a.Tap(stream, &tap.Info{})
		if err != nil {
			t.Fatal(err)
		}
		return ctx, end
	}

	first, end1 := tapped()
	defer end1()
	time.Sleep(timeout / 2)
	second, end2 := tapped()
	defer end2()
	answered, end3 := tapped()
	defer end3()
	if _, err := a.unary(answered, nil, nil, func(context.Context, any) (any, error) { return nil, nil }, nil); err != nil {
		t.Fatal(err)
	}
	_, reset := tapped()
	reset() // the peer resets the stream before its message

	<-first.Done()
	cutFirst := time.Now()
	if cause := context.Cause(first); cause != errNoFirstMessage {
		t.Errorf("first silent call: cause %v, want errNoFirstMessage", cause)
	}
	if second.Err() != nil {
		t.Error("the second call was cut with the first, before its own deadline")
	}
	<-second.Done()
	if cause := context.Cause(second); cause != errNoFirstMessage {
		t.Errorf("second silent call: cause %v, want errNoFirstMessage", cause)
	}
	if gap := time.Since(cutFirst); gap < timeout/4 {
		t.Errorf("second call cut %v after the first, want about %v", gap, timeout/2)
	}
	if answered.Err() != nil {
		t.Errorf("the answered call was cancelled: %v", context.Cause(answered))
	}
	time.Sleep(timeout / 2) // the reset call's deadline has passed too
	mu.Lock()
	defer mu.Unlock()
	if refused[RefusedFirstMessage] != 2 {
		t.Errorf("counted %d first_message_timeout, want 2 (the reset call is not one)", refused[RefusedFirstMessage])
	}
	ci.waiting.mu.Lock()
	defer ci.waiting.mu.Unlock()
	if n := ci.streams.Load(); n != 0 || ci.waiting.head != nil {
		t.Errorf("%d calls counted open, waiting list head %p; want 0 and empty", n, ci.waiting.head)
	}
}
