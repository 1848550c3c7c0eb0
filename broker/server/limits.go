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

// serverOptions bound the header list and install the admission.
func (f *frontDoor) serverOptions() []grpc.ServerOption {
	return append([]grpc.ServerOption{grpc.MaxHeaderListSize(uint32(f.cfg.MaxHeaderListSize))}, f.admission.ServerOptions()...)
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
	return &frameGuard{Conn: conn, f: g.f, pending: pc, prefaceLeft: len(http2Preface),
		streams: rate.NewLimiter(rate.Limit(g.f.cfg.NewStreamsPerSecond), g.f.cfg.NewStreamsBurst),
		resets:  rate.NewLimiter(rate.Limit(g.f.cfg.StreamResetsPerSecond), max(1, int(2*g.f.cfg.StreamResetsPerSecond)))}, ai, nil
}

// Clone implements credentials.TransportCredentials.
func (g guardCreds) Clone() credentials.TransportCredentials {
	return guardCreds{g.TransportCredentials.Clone(), g.f}
}

const http2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// HTTP/2 frame types and error codes used here (RFC 9113).
const (
	frameHeaders           = 0x1
	frameRSTStream         = 0x3
	frameGoAway            = 0x7
	errCodeEnhanceYourCalm = 0xb
)

// errCalm ends reading from a connection that was sent GOAWAY.
var errCalm = errors.New("connection over limits.new_streams_per_second or limits.stream_resets_per_second: sent GOAWAY ENHANCE_YOUR_CALM")

// frameGuard sits between gRPC's HTTP/2 transport and the TLS connection.
// It follows the frame boundaries both ways (9-byte headers with lengths;
// nothing is decoded): in what the peer sends, it ends the connection's
// handshake at the client preface, and counts against two token buckets
// the HEADERS frames that open a stream (every new stream, including those
// gRPC refuses before its tap sees them) and the RST_STREAM frames that
// cancel one (the HTTP/2 rapid reset attack, CVE-2023-44487, cancels every
// stream it opens); in what the server sends, it finds a boundary where a
// GOAWAY (ENHANCE_YOUR_CALM) can go in between gRPC's own frames when a
// bucket runs dry. The connection is then no longer read, and closed.
type frameGuard struct {
	net.Conn
	f       *frontDoor
	pending *pendingConn  // nil when the listener was not capListener
	streams *rate.Limiter // new streams
	resets  *rate.Limiter // streams the peer cancelled

	// reading side: only the reader goroutine
	prefaceLeft int
	in          frameCursor
	lastStream  atomic.Uint32
	calm        atomic.Bool // GOAWAY decided: reads end

	mu         sync.Mutex // the writing side
	out        frameCursor
	goAwayDue  atomic.Bool
	goAwaySent bool
}

// frameCursor follows frame boundaries in a byte stream.
type frameCursor struct {
	hdr     [9]byte
	hdrN    int
	payload int // bytes of the current frame's payload still to come
}

// feed advances over p, calling onHeader for each complete frame header.
func (fc *frameCursor) feed(p []byte, onHeader func(hdr *[9]byte)) {
	for len(p) > 0 {
		if fc.payload > 0 {
			n := min(fc.payload, len(p))
			fc.payload -= n
			p = p[n:]
			continue
		}
		n := copy(fc.hdr[fc.hdrN:], p)
		fc.hdrN += n
		p = p[n:]
		if fc.hdrN < len(fc.hdr) {
			return
		}
		fc.hdrN = 0
		fc.payload = int(fc.hdr[0])<<16 | int(fc.hdr[1])<<8 | int(fc.hdr[2])
		if onHeader != nil {
			onHeader(&fc.hdr)
		}
	}
}

func (fc *frameCursor) atBoundary() bool { return fc.hdrN == 0 && fc.payload == 0 }

// Read implements net.Conn.
func (c *frameGuard) Read(p []byte) (int, error) {
	if c.calm.Load() {
		return 0, errCalm
	}
	n, err := c.Conn.Read(p)
	b := p[:n]
	if c.prefaceLeft > 0 {
		k := min(c.prefaceLeft, len(b))
		c.prefaceLeft -= k
		b = b[k:]
		if c.prefaceLeft == 0 && c.pending != nil {
			c.pending.handshakeOver()
		}
	}
	c.in.feed(b, c.onFrame)
	return n, err
}

// onFrame counts a frame that opens a stream or cancels one.
func (c *frameGuard) onFrame(hdr *[9]byte) {
	var over string
	switch hdr[3] {
	case frameHeaders:
		id := binary.BigEndian.Uint32(hdr[5:9]) & 0x7fffffff
		if id <= c.lastStream.Load() { // trailers, or a stream gRPC will refuse as out of order
			return
		}
		c.lastStream.Store(id)
		if !c.streams.Allow() {
			over = refusedStreamRate
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
			c.flushGoAway()
			c.mu.Unlock()
		}
	}
}

// flushGoAway writes the GOAWAY if one is due and the output is between
// frames. c.mu is held.
func (c *frameGuard) flushGoAway() {
	if !c.goAwayDue.Load() || c.goAwaySent || !c.out.atBoundary() {
		return
	}
	const debug = "too_many_streams"
	var f [9 + 8 + len(debug)]byte
	f[2] = byte(8 + len(debug))
	f[3] = frameGoAway
	binary.BigEndian.PutUint32(f[9:13], c.lastStream.Load())
	binary.BigEndian.PutUint32(f[13:17], errCodeEnhanceYourCalm)
	copy(f[17:], debug)
	c.goAwaySent = true
	_, _ = c.Conn.Write(f[:])
}

// Write implements net.Conn.
func (c *frameGuard) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, err := c.Conn.Write(p)
	c.out.feed(p[:n], nil)
	c.flushGoAway()
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
	c.flushGoAway() // if gRPC's last write left the output between frames
	c.mu.Unlock()
	go func() {
		_ = c.Conn.SetReadDeadline(time.Now().Add(time.Second))
		_, _ = io.Copy(io.Discard, io.LimitReader(c.Conn, 4<<20))
		_ = c.Conn.Close()
	}()
	return nil
}
