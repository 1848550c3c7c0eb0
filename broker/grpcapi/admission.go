package grpcapi

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/audit"
)

// Reasons a stream is refused or ended by Admission, as counted by Refused.
const (
	RefusedNoIdentity   = "no_identity"
	RefusedStreams      = "streams_per_connection"
	RefusedFirstMessage = "first_message_timeout"
)

// AdmissionConfig configures an Admission.
type AdmissionConfig struct {
	// Core records the denials (aggregated; see broker.Broker.RecordDenial).
	Core *broker.Broker
	// StreamsPerConnection caps the calls open at once on one connection,
	// whatever their method. It must be positive.
	StreamsPerConnection int
	// FirstMessageTimeout bounds the wait for a call's request message. It
	// must be positive.
	FirstMessageTimeout time.Duration
	// Refused, when set, counts each stream refused or ended, by reason.
	Refused func(reason string)
}

// Admission admits calls before their stream exists (its Tap runs as the
// server's InTapHandle, on the transport's reader, before any handler or
// interceptor): a peer whose certificate yields no usable identity is refused
// with UNAUTHENTICATED, a connection already holding StreamsPerConnection
// calls gets RESOURCE_EXHAUSTED, and a call whose request message has not
// come FirstMessageTimeout after its headers is ended (CANCELLED): reset
// through the connection's StreamResetter, or its context cancelled. It needs the
// server's transport credentials to be CallerCredentials, and its
// interceptors installed (ServerOptions).
type Admission struct {
	cfg AdmissionConfig
}

// NewAdmission returns an Admission for cfg.
func NewAdmission(cfg AdmissionConfig) *Admission { return &Admission{cfg: cfg} }

// ServerOptions are the options that make a server use a: the tap and the
// interceptors that see a call's first message arrive. The server's own
// interceptors, unary and stream (either may be nil), run inside a's, as
// part of the same interceptor: a chain of two would cost every call a
// closure.
func (a *Admission) ServerOptions(unary grpc.UnaryServerInterceptor, stream grpc.StreamServerInterceptor) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.InTapHandle(a.Tap),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			return a.unary(ctx, req, info, h, unary)
		}),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if stream == nil {
				return a.stream(srv, ss, info, h)
			}
			return a.stream(srv, ss, info, func(srv any, ss grpc.ServerStream) error { return stream(srv, ss, info, h) })
		}),
	}
}

// errNoFirstMessage ends a call whose request message did not come in time.
var errNoFirstMessage = errors.New("no request message within limits.first_message_timeout")

// admitKey is the context key under which an admitted call finds itself.
type admitKey struct{}

// epoch is what admission times are measured from (monotonic).
var epoch = time.Now()

// Tap admits or refuses a new stream. It runs with the transport's lock
// held: it only counts, notes the call's stream (or, on a connection without
// a StreamResetter, makes it cancellable), puts it at the end of its
// connection's calls waiting for their first message, and (for a first
// denial of a source) writes one audit line.
func (a *Admission) Tap(ctx context.Context, _ *tap.Info) (context.Context, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return ctx, nil
	}
	ci, ok := p.AuthInfo.(*callerInfo)
	if !ok {
		return ctx, nil // another server's credentials: nothing to count by
	}
	if ci.err != nil {
		a.refused(RefusedNoIdentity)
		st := status.Convert(toStatus(ci.err))
		src := sourceIP(p.Addr)
		_ = a.cfg.Core.RecordDenial(src, audit.Event{Event: audit.TokenDenied, Peer: src,
			Outcome: st.Code().String(), Reason: st.Message()})
		return nil, st.Err()
	}
	if n := ci.streams.Add(1); n > int32(a.cfg.StreamsPerConnection) {
		ci.streams.Add(-1)
		a.refused(RefusedStreams)
		return nil, status.Errorf(codes.ResourceExhausted, "%d calls are already open on this connection (limits.streams_per_connection); wait for one to end or use another connection", a.cfg.StreamsPerConnection)
	}
	c := &admittedCall{Context: ctx, conn: ci, at: time.Since(epoch)}
	if ci.resetter != nil {
		c.stream = ci.resetter.OpenedStream()
	} else {
		c.Context, c.cancel = context.WithCancelCause(ctx)
	}
	ci.waiting.add(c, a)
	return c, nil
}

// StreamResetter ends a connection's streams from the server's side. The
// connection that transport credentials hand gRPC offers it (see
// WithStreamResetter) so that Admission can end a call whose request
// message never came without making every call's context cancellable: a
// cancellable context per call costs four allocations and a third of what
// admission adds to a call, for an event that a well-behaved client never
// causes.
type StreamResetter interface {
	// OpenedStream is the id of the stream whose opening headers gRPC has
	// just read: the stream being admitted, when called from the tap.
	OpenedStream() uint32
	// ResetStream ends stream id as if the peer had cancelled it, and
	// sends the peer RST_STREAM (CANCEL). It must not block on the
	// connection.
	ResetStream(id uint32)
}

// WithStreamResetter makes Admission end the silent calls of the connection
// ai belongs to through r instead of cancelling their contexts. ai is the
// connection's AuthInfo from CallerCredentials; it reports whether it was.
// It must be called before gRPC reads the connection's first stream.
func WithStreamResetter(ai credentials.AuthInfo, r StreamResetter) bool {
	ci, ok := ai.(*callerInfo)
	if ok {
		ci.resetter = r
	}
	return ok
}

// admittedCall is an admitted call's context: the stream's context (made
// cancellable when the connection has no StreamResetter), its stream id, and
// the call's place in its connection's count. The place is
// released once: when its handler returns (the interceptors), or when the
// call is found still without its first message FirstMessageTimeout after
// its headers — a call that never reached an interceptor (reset by the
// peer, or silent) holds its place until then.
//
// One allocation (with a StreamResetter; otherwise besides the cancellable
// context): no timer, closure or context value per call. A connection's
// calls waiting for their first message are a list in admission order, and
// one timer per connection fires at the oldest one's deadline
// (waitingCalls).
type admittedCall struct {
	context.Context
	cancel   context.CancelCauseFunc // nil when the connection has a StreamResetter
	stream   uint32                  // the call's stream id, with a StreamResetter
	conn     *callerInfo
	at       time.Duration // admitted, since epoch
	released atomic.Bool

	// In conn.waiting's list while inList; guarded by its mutex.
	prev, next *admittedCall
	inList     bool
}

// Value implements context.Context: the call finds itself under admitKey.
func (c *admittedCall) Value(key any) any {
	if _, ok := key.(admitKey); ok {
		return c
	}
	return c.Context.Value(key)
}

func (c *admittedCall) release() {
	if c.released.CompareAndSwap(false, true) {
		c.conn.streams.Add(-1)
	}
}

// waitingCalls are a connection's admitted calls whose first message has not
// come, oldest first, and the timer that checks the oldest.
type waitingCalls struct {
	mu         sync.Mutex
	head, tail *admittedCall
	timer      *time.Timer // made at the connection's first call
	armed      bool
}

// add appends c, arming the timer when it is not.
func (w *waitingCalls) add(c *admittedCall, a *Admission) {
	w.mu.Lock()
	defer w.mu.Unlock()
	c.inList, c.prev = true, w.tail
	if w.tail != nil {
		w.tail.next = c
	} else {
		w.head = c
	}
	w.tail = c
	if w.armed {
		return
	}
	w.armed = true
	if w.timer == nil {
		ci := c.conn
		w.timer = time.AfterFunc(a.cfg.FirstMessageTimeout, func() { a.sweep(ci) })
		return
	}
	w.timer.Reset(a.cfg.FirstMessageTimeout)
}

// remove takes c out of the list, if it is there: its first message came.
func (w *waitingCalls) remove(c *admittedCall) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if c.inList {
		w.unlinkLocked(c)
	}
}

// unlinkLocked takes c, which is in the list, out of it. w.mu is held.
func (w *waitingCalls) unlinkLocked(c *admittedCall) {
	c.inList = false
	if c.prev != nil {
		c.prev.next = c.next
	} else {
		w.head = c.next
	}
	if c.next != nil {
		c.next.prev = c.prev
	} else {
		w.tail = c.prev
	}
	c.prev, c.next = nil, nil
}

// sweep ends the calls of ci that have waited FirstMessageTimeout for their
// first message: each is counted and cancelled, and its place released; one
// whose stream already ended (reset by the peer, or failed before its
// handler) only has its place released. The timer is armed again for the
// oldest call left.
func (a *Admission) sweep(ci *callerInfo) {
	w := &ci.waiting
	now := time.Since(epoch)
	var expired []*admittedCall
	w.mu.Lock()
	for c := w.head; c != nil && now-c.at >= a.cfg.FirstMessageTimeout; c = w.head {
		w.unlinkLocked(c)
		expired = append(expired, c)
	}
	if w.head != nil {
		w.timer.Reset(a.cfg.FirstMessageTimeout - (now - w.head.at))
	} else {
		w.armed = false
	}
	w.mu.Unlock()
	for _, c := range expired {
		if c.Context.Err() != nil || c.released.Load() {
			c.release()
			continue
		}
		a.refused(RefusedFirstMessage)
		c.release()
		if c.cancel != nil {
			c.cancel(errNoFirstMessage)
		} else {
			ci.resetter.ResetStream(c.stream)
		}
	}
}

func (a *Admission) refused(reason string) {
	if a.cfg.Refused != nil {
		a.cfg.Refused(reason)
	}
}

// admittedFrom returns ctx's admitted call, or nil.
func admittedFrom(ctx context.Context) *admittedCall {
	c, _ := ctx.Value(admitKey{}).(*admittedCall)
	return c
}

// unary runs once a unary call's request message has been read: the call
// leaves the waiting list, and its place is released when inner (or, when
// inner is nil, the handler) returns.
func (a *Admission) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler, inner grpc.UnaryServerInterceptor) (any, error) {
	if c := admittedFrom(ctx); c != nil {
		c.conn.waiting.remove(c)
		defer c.release()
	}
	if inner == nil {
		return h(ctx, req)
	}
	return inner(ctx, req, info, h)
}

// stream watches for a streaming call's first request message, and
// releases the call's place when its handler returns.
func (a *Admission) stream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	c := admittedFrom(ss.Context())
	if c == nil {
		return h(srv, ss)
	}
	defer c.release()
	defer c.conn.waiting.remove(c)
	return h(srv, &firstMessageStream{ServerStream: ss, c: c})
}

// firstMessageStream takes its call out of the waiting list at the first message.
type firstMessageStream struct {
	grpc.ServerStream
	c   *admittedCall
	got bool
}

// RecvMsg implements grpc.ServerStream.
func (s *firstMessageStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if err == nil && !s.got {
		s.got = true
		s.c.conn.waiting.remove(s.c)
	}
	return err
}

// sourceIP is the IP address of addr, without the port: denials of peers
// without an identity are aggregated by it (the port changes with every
// connection).
func sourceIP(addr net.Addr) string {
	if tcp, ok := addr.(*net.TCPAddr); ok {
		return tcp.IP.String()
	}
	if addr == nil {
		return "unknown"
	}
	host, _, err := net.SplitHostPort(addr.String())
	if err != nil {
		return addr.String()
	}
	return host
}

// streamCount is a connection's open calls, as counted by Admission.
type streamCount = atomic.Int32
