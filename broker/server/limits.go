package server

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/grpcapi"
)

// Reasons a connection is refused or cut, the reason label of
// tokenbroker_connections_refused_total.
const (
	refusedHandshakes = "handshakes_in_progress"
	refusedPerSource  = "handshakes_per_source"
	refusedStreamRate = "new_streams_per_second"
	refusedResetRate  = "stream_resets_per_second"
)

// frontDoor holds the limits of the gRPC listener (config limits:): how many
// connections may be in their handshake, in all and per source address;
// each connection's rate of new streams; and, through grpcapi.Admission, the
// streams a connection may hold and their first-message deadline. Everything
// here runs before a call reaches a handler.
type frontDoor struct {
	cfg       config.Limits // with defaults
	admission *grpcapi.Admission

	mu        sync.Mutex
	pending   int            // connections in their handshake
	perSource map[string]int // the same, by source (sourceOf)

	connsRefused   *prometheus.CounterVec // reason
	streamsRefused *prometheus.CounterVec // reason
	inHandshake    prometheus.GaugeFunc
}

func newFrontDoor(cfg config.Limits, core *broker.Broker) *frontDoor {
	f := &frontDoor{cfg: cfg.WithDefaults(), perSource: map[string]int{}}
	f.connsRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tokenbroker_connections_refused_total",
		Help: "Connections closed by a front-door limit, by reason: handshakes_in_progress, handshakes_per_source (closed at once, before the TLS handshake), new_streams_per_second, stream_resets_per_second (sent GOAWAY ENHANCE_YOUR_CALM, then closed).",
	}, []string{"reason"})
	f.streamsRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tokenbroker_streams_refused_total",
		Help: "Calls refused before their handler, or cancelled waiting for their request, by reason: no_identity, streams_per_connection, first_message_timeout.",
	}, []string{"reason"})
	for _, r := range []string{refusedHandshakes, refusedPerSource, refusedStreamRate, refusedResetRate} {
		f.connsRefused.WithLabelValues(r)
	}
	for _, r := range []string{grpcapi.RefusedNoIdentity, grpcapi.RefusedStreams, grpcapi.RefusedFirstMessage} {
		f.streamsRefused.WithLabelValues(r)
	}
	f.inHandshake = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "tokenbroker_connections_in_handshake",
		Help: "Connections accepted whose TLS and HTTP/2 handshakes are not over.",
	}, func() float64 {
		f.mu.Lock()
		defer f.mu.Unlock()
		return float64(f.pending)
	})
	f.admission = grpcapi.NewAdmission(grpcapi.AdmissionConfig{Core: core, StreamsPerConnection: f.cfg.StreamsPerConnection,
		FirstMessageTimeout: f.cfg.FirstMessageTimeout.D(), Refused: func(r string) { f.streamsRefused.WithLabelValues(r).Inc() }})
	return f
}

// collectors are the front door's metrics.
func (f *frontDoor) collectors() []prometheus.Collector {
	return []prometheus.Collector{f.connsRefused, f.streamsRefused, f.inHandshake}
}

// serverOptions bound the header list and install the admission, with the
// server's interceptors unary and stream inside it.
func (f *frontDoor) serverOptions(unary grpc.UnaryServerInterceptor, stream grpc.StreamServerInterceptor) []grpc.ServerOption {
	return append([]grpc.ServerOption{grpc.MaxHeaderListSize(uint32(f.cfg.MaxHeaderListSize))}, f.admission.ServerOptions(unary, stream)...)
}

// credentials are tc (grpcapi.CallerCredentials, which Admission needs)
// with each connection's frames watched.
func (f *frontDoor) credentials(tc credentials.TransportCredentials) credentials.TransportCredentials {
	return guardCreds{tc, f}
}

// listener wraps the gRPC listener with the handshake caps.
func (f *frontDoor) listener(ln net.Listener) net.Listener { return &capListener{Listener: ln, f: f} }

// capListener closes at once a connection over the handshake caps: it never
// reaches gRPC, costs no TLS work and holds no file descriptor.
type capListener struct {
	net.Listener
	f *frontDoor
}

// Accept returns the next connection within the caps.
func (l *capListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		src := sourceOf(c.RemoteAddr())
		if reason := l.f.admit(src); reason != "" {
			_ = c.Close()
			l.f.connsRefused.WithLabelValues(reason).Inc()
			continue
		}
		return &pendingConn{Conn: c, f: l.f, src: src}, nil
	}
}

// admit counts a new connection from src as in its handshake, or says
// which cap it would exceed.
func (f *frontDoor) admit(src string) (refused string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case f.pending >= f.cfg.Handshakes:
		return refusedHandshakes
	case f.perSource[src] >= f.cfg.HandshakesPerSource:
		return refusedPerSource
	}
	f.pending++
	f.perSource[src]++
	return ""
}

// handshakeOver releases a connection's place in the handshake caps.
func (f *frontDoor) handshakeOver(src string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pending--
	if f.perSource[src]--; f.perSource[src] <= 0 {
		delete(f.perSource, src)
	}
}

// sourceOf is the source a connection from a counts against in
// limits.handshakes_per_source: its IPv4 address, or the /64 network of its
// IPv6 address — one host commonly holds a whole /64, so counting single
// IPv6 addresses would let it spread over as many sources as it likes.
func sourceOf(a net.Addr) string {
	var ip net.IP
	if tcp, ok := a.(*net.TCPAddr); ok {
		ip = tcp.IP
	} else if host, _, err := net.SplitHostPort(a.String()); err == nil {
		ip = net.ParseIP(host)
		if ip == nil {
			return host
		}
	} else {
		return a.String()
	}
	if v4 := ip.To4(); v4 != nil {
		return v4.String()
	}
	return (&net.IPNet{IP: ip.Mask(net.CIDRMask(64, 128)), Mask: net.CIDRMask(64, 128)}).String()
}

// pendingConn is an accepted connection; it holds its place in the
// handshake caps until its HTTP/2 preface has been read or it is closed.
type pendingConn struct {
	net.Conn
	f    *frontDoor
	src  string
	over atomic.Bool
}

func (c *pendingConn) handshakeOver() {
	if c.over.CompareAndSwap(false, true) {
		c.f.handshakeOver(c.src)
	}
}

// Close implements net.Conn.
func (c *pendingConn) Close() error {
	c.handshakeOver()
	return c.Conn.Close()
}

// guardCreds wraps the server's transport credentials: the connection gRPC
// gets back from the handshake is a frameGuard.
type guardCreds struct {
	credentials.TransportCredentials
	f *frontDoor
}

// ServerHandshake implements credentials.TransportCredentials.
func (g guardCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, ai, err := g.TransportCredentials.ServerHandshake(raw)
	if err != nil {
		return conn, ai, err
	}
	pc, _ := raw.(*pendingConn)
	fg := &frameGuard{Conn: conn, f: g.f, pending: pc, prefaceLeft: len(http2Preface),
		streams: rate.NewLimiter(rate.Limit(g.f.cfg.NewStreamsPerSecond), g.f.cfg.NewStreamsBurst),
		resets:  rate.NewLimiter(rate.Limit(g.f.cfg.StreamResetsPerSecond), max(1, int(2*g.f.cfg.StreamResetsPerSecond)))}
	grpcapi.WithStreamResetter(ai, fg)
	return fg, ai, nil
}

// Clone implements credentials.TransportCredentials.
func (g guardCreds) Clone() credentials.TransportCredentials {
	return guardCreds{g.TransportCredentials.Clone(), g.f}
}

const http2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// HTTP/2 frame types, flags and error codes used here (RFC 9113).
const (
	frameHeaders           = 0x1
	frameRSTStream         = 0x3
	frameGoAway            = 0x7
	frameContinuation      = 0x9
	flagEndHeaders         = 0x4
	errCodeCancel          = 0x8
	errCodeEnhanceYourCalm = 0xb
)

// errCalm ends reading from a connection that was sent GOAWAY.
var errCalm = errors.New("connection over limits.new_streams_per_second or limits.stream_resets_per_second: sent GOAWAY ENHANCE_YOUR_CALM")

// frameGuard sits between gRPC's HTTP/2 transport and the TLS connection.
// It follows the frame boundaries both ways (9-byte headers with lengths;
// nothing is decoded). In what the peer sends, it ends the connection's
// handshake at the client preface, and counts against two token buckets
// the HEADERS frames, each of which opens a stream or ends the connection
// (every new stream, including those gRPC refuses before its tap sees
// them, whatever its id), and the RST_STREAM frames that
// cancel one (the HTTP/2 rapid reset attack, CVE-2023-44487, cancels every
// stream it opens); in what the server sends, it finds a boundary where a
// GOAWAY (ENHANCE_YOUR_CALM) can go in between gRPC's own frames when a
// bucket runs dry. The connection is then no longer read, and closed.
//
// It is also the connection's grpcapi.StreamResetter: a read that hands
// gRPC the end of a block of headers (any may open a stream) ends there, so
// that when the tap admits that stream (on the reader goroutine, before the
// next read) OpenedStream is its id; ResetStream puts an RST_STREAM
// (CANCEL) for a stream in what gRPC reads, between two of the peer's
// frames — gRPC then ends the stream as cancelled by the peer — and one in
// what the peer is sent, between two of gRPC's.
type frameGuard struct {
	net.Conn
	f       *frontDoor
	pending *pendingConn  // nil when the listener was not capListener
	streams *rate.Limiter // new streams
	resets  *rate.Limiter // streams the peer cancelled

	// reading side: only the reader goroutine
	prefaceLeft int
	in          frameCursor
	opening     bool   // in a block of headers (each may open a stream)
	opened      uint32 // the stream whose headers were read last
	held        []byte // read from the connection; held[heldOff:] not yet handed to gRPC
	heldOff     int
	inject      []byte // RST_STREAM frames to hand gRPC before the peer's next frame
	lastStream  atomic.Uint32
	calm        atomic.Bool // GOAWAY decided: reads end

	resetMu    sync.Mutex // guards the two lists of streams to reset, the watch and woken
	resetIn    []uint32   // for gRPC to read
	resetOut   []uint32   // for the peer
	resetSince time.Time  // when resetIn last became non-empty
	stallWatch *time.Timer
	woken      bool // a read deadline in the past was set to wake the reader
	resetDue   atomic.Bool
	resetSent  atomic.Bool // the peer is due an RST_STREAM

	mu         sync.Mutex // the writing side
	out        frameCursor
	goAwayDue  atomic.Bool
	goAwaySent atomic.Bool
}

// frameCursor follows frame boundaries in a byte stream.
type frameCursor struct {
	hdr      [9]byte
	hdrN     int
	payload  int  // bytes of the current frame's payload still to come
	cutAfter bool // stop once the current frame is complete (next)
}

// next advances over p, calling onHeader (when not nil) for each complete
// frame header, and returns how many bytes it went over: all of p, or up to
// the end of the first frame for which onHeader returned true or, with
// atFrameEnd, the first frame end.
func (fc *frameCursor) next(p []byte, onHeader func(hdr *[9]byte) (cut bool), atFrameEnd bool) int {
	k := 0
	for k < len(p) {
		if fc.payload > 0 {
			n := min(fc.payload, len(p)-k)
			fc.payload -= n
			k += n
			if fc.payload == 0 && (fc.cutAfter || atFrameEnd) {
				fc.cutAfter = false
				return k
			}
			continue
		}
		n := copy(fc.hdr[fc.hdrN:], p[k:])
		fc.hdrN += n
		k += n
		if fc.hdrN < len(fc.hdr) {
			return k
		}
		fc.hdrN = 0
		fc.payload = int(fc.hdr[0])<<16 | int(fc.hdr[1])<<8 | int(fc.hdr[2])
		cut := onHeader != nil && onHeader(&fc.hdr)
		if fc.payload == 0 {
			if cut || atFrameEnd {
				return k
			}
		} else {
			fc.cutAfter = cut
		}
	}
	return k
}

func (fc *frameCursor) atBoundary() bool { return fc.hdrN == 0 && fc.payload == 0 }

// Read implements net.Conn.
func (c *frameGuard) Read(p []byte) (int, error) {
	for {
		if c.calm.Load() {
			return 0, errCalm
		}
		if len(c.inject) == 0 && c.resetDue.Load() && c.in.atBoundary() && !c.opening {
			c.takeResets()
		}
		if len(c.inject) > 0 {
			n := copy(p, c.inject)
			c.inject = c.inject[n:]
			return n, nil
		}
		if held := c.held[c.heldOff:]; len(held) > 0 {
			n := c.advance(held[:min(len(held), len(p))])
			copy(p, held[:n])
			if c.heldOff += n; c.heldOff == len(c.held) {
				c.held, c.heldOff = c.held[:0], 0
				if cap(c.held) > maxHeldKept {
					c.held = nil
				}
			}
			return n, nil
		}
		n, err := c.Conn.Read(p)
		if err != nil && isTimeout(err) && c.woke() {
			if err = nil; n == 0 {
				continue
			}
		}
		k := c.advance(p[:n])
		if k < n {
			c.held = append(c.held[:0], p[k:n]...)
		}
		return k, err
	}
}

// maxHeldKept is the most of a connection's buffer of held bytes kept for
// reuse once it is empty; a larger one is let go.
const maxHeldKept = 4 << 10

// advance follows b, the peer's next bytes, and returns how many of them
// gRPC gets now: up to the end of a block of headers (the tap then admits
// its stream before the next read), or of the current frame when a reset is
// to go in after it.
func (c *frameGuard) advance(b []byte) int {
	k := 0
	if c.prefaceLeft > 0 {
		k = min(c.prefaceLeft, len(b))
		c.prefaceLeft -= k
		if c.prefaceLeft == 0 && c.pending != nil {
			c.pending.handshakeOver()
		}
	}
	return k + c.in.next(b[k:], c.onFrame, c.resetDue.Load())
}

// isTimeout reports whether err is a read deadline's.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// onFrame counts a frame that opens a stream or cancels one, and says
// whether it ends a block of headers.
func (c *frameGuard) onFrame(hdr *[9]byte) (endsOpening bool) {
	var over string
	switch hdr[3] {
	case frameHeaders:
		// Every block of headers may open a stream, and is counted: gRPC
		// takes any HEADERS it reads as a new stream (a lower id than its
		// highest is a connection error), and HEADERS its framer refuses (a
		// malformed field) leave its highest id where it was, so that an id
		// at or below the highest seen here can still open a stream.
		id := binary.BigEndian.Uint32(hdr[5:9]) & 0x7fffffff
		c.opened, c.opening = id, hdr[4]&flagEndHeaders == 0
		endsOpening = !c.opening
		if id > c.lastStream.Load() {
			c.lastStream.Store(id)
		}
		if !c.streams.Allow() {
			over = refusedStreamRate
		}
	case frameContinuation:
		if c.opening && hdr[4]&flagEndHeaders != 0 {
			c.opening, endsOpening = false, true
		}
	case frameRSTStream:
		if !c.resets.Allow() {
			over = refusedResetRate
		}
	}
	if over != "" && c.calm.CompareAndSwap(false, true) {
		c.f.connsRefused.WithLabelValues(over).Inc()
		c.goAwayDue.Store(true)
		// Never wait on a write (a peer that does not read could hold it):
		// a write in progress sends the GOAWAY when it is done.
		if c.mu.TryLock() {
			c.flushControl()
			c.unlock()
		}
	}
	return endsOpening
}

// OpenedStream implements grpcapi.StreamResetter: the stream whose headers
// the last read ended with. Only the reader goroutine (gRPC's tap) calls it.
func (c *frameGuard) OpenedStream() uint32 { return c.opened }

// ResetStream implements grpcapi.StreamResetter. The RST_STREAM for gRPC
// goes in at the reader's next read that starts between two of the peer's
// frames (a read blocked on the connection is woken by a read deadline in
// the past); the one for the peer at the next point between two of gRPC's
// frames, now if gRPC is not writing.
//
// A peer that stops in the middle of a frame or of a block of headers (or
// anything else that keeps gRPC from reading) would keep the reset out, and
// the call in gRPC until the connection ends; the connection is closed if
// the reset has not gone in after another limits.first_message_timeout.
func (c *frameGuard) ResetStream(id uint32) {
	c.resetMu.Lock()
	if len(c.resetIn) == 0 {
		c.resetSince = time.Now()
		if c.stallWatch == nil {
			c.stallWatch = time.AfterFunc(c.f.cfg.FirstMessageTimeout.D(), c.closeIfStalled)
		} else {
			c.stallWatch.Reset(c.f.cfg.FirstMessageTimeout.D())
		}
	}
	c.resetIn = append(c.resetIn, id)
	c.resetOut = append(c.resetOut, id)
	c.resetDue.Store(true)
	c.resetSent.Store(true)
	c.woken = true
	_ = c.Conn.SetReadDeadline(time.Now())
	c.resetMu.Unlock()
	if c.mu.TryLock() {
		// The write goes on a goroutine of its own: a peer that does not
		// read could hold it, and the caller (a connection's sweep) has
		// other calls to end.
		go func() {
			c.flushControl()
			c.unlock()
		}()
	}
}

// woke reports whether a read's timeout was ResetStream waking the reader,
// and then clears the deadline. ResetStream sets a deadline and woken
// together, and woke clears them together (under resetMu): otherwise a
// deadline set just after the reader cleared the last one would time out
// its next read as an error, and gRPC would close the connection.
func (c *frameGuard) woke() bool {
	c.resetMu.Lock()
	defer c.resetMu.Unlock()
	if !c.woken {
		return false // not the guard's deadline (gRPC's, in the handshake)
	}
	c.woken = false
	_ = c.Conn.SetReadDeadline(time.Time{})
	return true
}

// closeIfStalled closes the connection when resets have waited
// limits.first_message_timeout to go in to gRPC.
func (c *frameGuard) closeIfStalled() {
	grace := c.f.cfg.FirstMessageTimeout.D()
	c.resetMu.Lock()
	waited := time.Since(c.resetSince)
	stalled := len(c.resetIn) > 0 && waited >= grace
	if len(c.resetIn) > 0 && !stalled {
		c.stallWatch.Reset(grace - waited)
	}
	c.resetMu.Unlock()
	if stalled {
		_ = c.Conn.Close()
	}
}

// takeResets moves the resets due to gRPC into c.inject. Only the reader
// goroutine calls it, between two of the peer's frames.
func (c *frameGuard) takeResets() {
	c.resetMu.Lock()
	ids := c.resetIn
	c.resetIn = nil
	c.resetDue.Store(false)
	c.resetMu.Unlock()
	c.inject = c.inject[:0]
	for _, id := range ids {
		c.inject = appendRSTStream(c.inject, id)
	}
}

// appendRSTStream appends an RST_STREAM (CANCEL) frame for stream id.
func appendRSTStream(b []byte, id uint32) []byte {
	var f [9 + 4]byte
	f[2] = 4
	f[3] = frameRSTStream
	binary.BigEndian.PutUint32(f[5:9], id)
	binary.BigEndian.PutUint32(f[9:13], errCodeCancel)
	return append(b, f[:]...)
}

// flushControl writes the frames the guard owes the peer — RST_STREAM for
// reset streams, then a GOAWAY if one is due — when the output is between
// frames. c.mu is held.
func (c *frameGuard) flushControl() {
	if !c.out.atBoundary() {
		return
	}
	if c.resetSent.Load() {
		c.resetMu.Lock()
		ids := c.resetOut
		c.resetOut = nil
		c.resetSent.Store(false)
		c.resetMu.Unlock()
		var frames []byte
		for _, id := range ids {
			frames = appendRSTStream(frames, id)
		}
		if len(frames) > 0 {
			_, _ = c.Conn.Write(frames)
		}
	}
	if !c.goAwayDue.Load() || c.goAwaySent.Load() {
		return
	}
	const debug = "too_many_streams"
	var f [9 + 8 + len(debug)]byte
	f[2] = byte(8 + len(debug))
	f[3] = frameGoAway
	binary.BigEndian.PutUint32(f[9:13], c.lastStream.Load())
	binary.BigEndian.PutUint32(f[13:17], errCodeEnhanceYourCalm)
	copy(f[17:], debug)
	c.goAwaySent.Store(true)
	_, _ = c.Conn.Write(f[:])
}

// unlock releases c.mu, then sends what the guard came to owe the peer
// while it was held: a ResetStream or a GOAWAY that found c.mu taken left
// their frames to its holder, which may have looked before they were due;
// left there, they would wait for a write of gRPC's that may never come.
// Every holder of c.mu releases it here.
func (c *frameGuard) unlock() {
	for {
		c.mu.Unlock()
		if !c.controlDue() || !c.mu.TryLock() {
			return // nothing owed, or another holder looks again
		}
		if !c.out.atBoundary() { // gRPC is mid-frame: its next write sends them
			c.mu.Unlock()
			return
		}
		c.flushControl()
	}
}

// controlDue reports whether the guard owes the peer an RST_STREAM or a
// GOAWAY.
func (c *frameGuard) controlDue() bool {
	return c.resetSent.Load() || c.goAwayDue.Load() && !c.goAwaySent.Load()
}

// Write implements net.Conn.
func (c *frameGuard) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.unlock()
	n, err := c.Conn.Write(p)
	c.out.next(p[:n], nil, false)
	if c.controlDue() {
		c.flushControl()
	}
	return n, err
}

// Close implements net.Conn. A connection sent GOAWAY is closed after the
// peer had a moment to read it: closing with its unread frames in the
// socket would reset the connection and could lose the GOAWAY.
func (c *frameGuard) Close() error {
	if !c.calm.Load() {
		return c.Conn.Close()
	}
	c.mu.Lock()
	c.flushControl() // if gRPC's last write left the output between frames
	c.unlock()
	go func() {
		_ = c.Conn.SetReadDeadline(time.Now().Add(time.Second))
		_, _ = io.Copy(io.Discard, io.LimitReader(c.Conn, 4<<20))
		_ = c.Conn.Close()
	}()
	return nil
}
