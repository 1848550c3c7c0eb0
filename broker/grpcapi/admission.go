package grpcapi

import (
	"context"
	"errors"
	"net"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
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
// come FirstMessageTimeout after its headers is cancelled. It needs the
// server's transport credentials to be CallerCredentials, and its
// interceptors installed (ServerOptions).
type Admission struct {
	cfg AdmissionConfig
}

// NewAdmission returns an Admission for cfg.
func NewAdmission(cfg AdmissionConfig) *Admission { return &Admission{cfg: cfg} }

// ServerOptions are the options that make a server use a: the tap and the
// interceptors that see a call's first message arrive.
func (a *Admission) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.InTapHandle(a.Tap),
		grpc.ChainUnaryInterceptor(a.unary),
		grpc.ChainStreamInterceptor(a.stream),
	}
}

// errNoFirstMessage ends a call whose request message did not come in time.
var errNoFirstMessage = errors.New("no request message within limits.first_message_timeout")

// admitKey is the context key of a call's first-message timer.
type admitKey struct{}

// Tap admits or refuses a new stream. It runs with the transport's lock
// held: it only counts, starts a timer, and (for a first denial of a
// source) writes one audit line.
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
	ctx, cancel := context.WithCancelCause(ctx)
	st := &admitted{streams: &ci.streams}
	st.timer = time.AfterFunc(a.cfg.FirstMessageTimeout, func() {
		if st.released.Load() {
			return
		}
		a.refused(RefusedFirstMessage)
		st.release()
		cancel(errNoFirstMessage)
	})
	return context.WithValue(ctx, admitKey{}, st), nil
}

// admitted is an admitted call. Its place in the connection's count is
// released once: when its handler returns (the interceptors), or when its
// first-message timer fires — a call that never reached an interceptor
// (reset by the peer, or silent) holds its place until then.
type admitted struct {
	streams  *streamCount
	timer    *time.Timer
	released atomic.Bool
}

func (st *admitted) release() {
	if st.released.CompareAndSwap(false, true) {
		st.streams.Add(-1)
	}
}

func (a *Admission) refused(reason string) {
	if a.cfg.Refused != nil {
		a.cfg.Refused(reason)
	}
}

// admittedFrom returns ctx's admitted call, or nil.
func admittedFrom(ctx context.Context) *admitted {
	st, _ := ctx.Value(admitKey{}).(*admitted)
	return st
}

// unary runs once a unary call's request message has been read: the timer
// stops, and the call's place is released when its handler returns.
func (a *Admission) unary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	st := admittedFrom(ctx)
	if st == nil {
		return h(ctx, req)
	}
	st.timer.Stop()
	defer st.release()
	return h(ctx, req)
}

// stream watches for a streaming call's first request message, and
// releases the call's place when its handler returns.
func (a *Admission) stream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	st := admittedFrom(ss.Context())
	if st == nil {
		return h(srv, ss)
	}
	defer st.release()
	defer st.timer.Stop()
	return h(srv, &firstMessageStream{ServerStream: ss, st: st})
}

// firstMessageStream stops the first-message timer at the first message.
type firstMessageStream struct {
	grpc.ServerStream
	st  *admitted
	got bool
}

// RecvMsg implements grpc.ServerStream.
func (s *firstMessageStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if err == nil && !s.got {
		s.got = true
		s.st.timer.Stop()
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
