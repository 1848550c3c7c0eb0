package grpcapi

import (
	"context"
	"crypto/x509"
	"fmt"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/policy"
)

// Reasons a connection is closed by Conns, as logged and counted.
const (
	// ReasonCertificateExpired: the client certificate (or a CA of its
	// chain) passed its notAfter while the connection was open.
	ReasonCertificateExpired = "client_certificate_expired"
	// ReasonTrustRemoved: after a reload of the trust material the client's
	// chain no longer verifies.
	ReasonTrustRemoved = "client_trust_removed"
)

// Conns tracks the server's open caller connections so that none outlives
// what admitted it: a connection is closed when its client certificate
// expires, and Recheck closes those whose chain no longer verifies after the
// trust material changed. The zero value is not usable; see NewConns.
type Conns struct {
	verify  func(chain []*x509.Certificate, now time.Time) error
	onClose func(id policy.Identity, reason string)

	mu  sync.Mutex
	set map[*trackedConn]struct{}
}

// NewConns returns a tracker that judges chains with verify (the current
// trust material) and reports each connection it closes to onClose.
func NewConns(verify func(chain []*x509.Certificate, now time.Time) error, onClose func(id policy.Identity, reason string)) *Conns {
	return &Conns{verify: verify, onClose: onClose, set: map[*trackedConn]struct{}{}}
}

// Len is the number of open connections that completed their handshake.
func (c *Conns) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.set)
}

// Recheck verifies every open connection's chain again at now and closes
// those that fail; it returns how many it closed.
func (c *Conns) Recheck(now time.Time) int {
	c.mu.Lock()
	open := make([]*trackedConn, 0, len(c.set))
	for t := range c.set {
		open = append(open, t)
	}
	c.mu.Unlock()
	n := 0
	for _, t := range open {
		if err := c.verify(t.chain, now); err != nil {
			t.revoke(ReasonTrustRemoved)
			n++
		}
	}
	return n
}

// Sweep closes the connections whose chain expired by now on the wall
// clock. The per-connection timers run on the monotonic clock, which a
// suspended VM or a stepped clock leaves behind; the server sweeps every
// second.
func (c *Conns) Sweep(now time.Time) int {
	c.mu.Lock()
	var expired []*trackedConn
	for t := range c.set {
		if now.After(t.notAfter) {
			expired = append(expired, t)
		}
	}
	c.mu.Unlock()
	for _, t := range expired {
		t.revoke(ReasonCertificateExpired)
	}
	return len(expired)
}

// trackedConn is a caller's raw connection under a Conns.
type trackedConn struct {
	net.Conn
	owner    *Conns
	chain    []*x509.Certificate // as the peer sent it, verified by the handshake
	id       policy.Identity
	notAfter time.Time
	expiry   *time.Timer // guarded by owner.mu
	once     sync.Once
}

// SetVerifiedChain implements tlsreload.VerifiedConn.
func (t *trackedConn) SetVerifiedChain(chain []*x509.Certificate, notAfter time.Time) {
	t.chain, t.notAfter = chain, notAfter
}

// Close removes the connection from its tracker and closes it.
func (t *trackedConn) Close() error {
	t.owner.mu.Lock()
	delete(t.owner.set, t)
	expiry := t.expiry
	t.owner.mu.Unlock()
	if expiry != nil {
		expiry.Stop()
	}
	return t.Conn.Close()
}

// revoke closes the connection at once, for reason: calls on it end, and
// the client must handshake again.
func (t *trackedConn) revoke(reason string) {
	t.once.Do(func() {
		t.owner.onClose(t.id, reason)
		_ = t.Close()
	})
}

// CallerCredentials wraps a server's TLS transport credentials so that each
// connection's caller identity is read from its verified client certificate
// once, at the handshake, and not again on every call. With conns, every
// connection is tracked there; the TLS configuration must then be one of
// tlsreload's, which reports the chain it verified.
func CallerCredentials(tc credentials.TransportCredentials, conns *Conns) credentials.TransportCredentials {
	return callerCreds{tc, conns}
}

type callerCreds struct {
	credentials.TransportCredentials
	conns *Conns
}

// ServerHandshake completes the TLS handshake and derives the identity.
func (c callerCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	if c.conns == nil {
		conn, ai, err := c.TransportCredentials.ServerHandshake(raw)
		if ti, ok := ai.(credentials.TLSInfo); ok && err == nil {
			id, idErr := identityOf(ti)
			return conn, &callerInfo{TLSInfo: ti, id: id, err: idErr}, nil
		}
		return conn, ai, err
	}
	t := &trackedConn{Conn: raw, owner: c.conns}
	conn, ai, err := c.TransportCredentials.ServerHandshake(t)
	if err != nil {
		return conn, ai, err
	}
	ti, ok := ai.(credentials.TLSInfo)
	if !ok || len(t.chain) == 0 {
		_ = conn.Close()
		return nil, nil, fmt.Errorf("%w: no verified client certificate", broker.ErrUnauthenticated)
	}
	info := &callerInfo{TLSInfo: ti, conn: t}
	info.id, info.err = policy.IdentityFromCert(t.chain[0])
	if info.err != nil {
		info.err = fmt.Errorf("%w: %w", broker.ErrUnauthenticated, info.err)
	}
	t.id = info.id
	if t.notAfter.IsZero() { // a verifier that gave no expiry: the chain as sent
		for _, cert := range t.chain {
			if t.notAfter.IsZero() || cert.NotAfter.Before(t.notAfter) {
				t.notAfter = cert.NotAfter
			}
		}
	}
	info.notAfter = t.notAfter
	c.conns.mu.Lock()
	c.conns.set[t] = struct{}{}
	t.expiry = time.AfterFunc(time.Until(t.notAfter), func() { t.revoke(ReasonCertificateExpired) })
	c.conns.mu.Unlock()
	// A trust reload between the verification and the registration above
	// was not rechecked for this connection: judge it once more, now that
	// any later reload will see it.
	if err := c.conns.verify(t.chain, time.Now()); err != nil {
		t.revoke(ReasonTrustRemoved)
		return nil, nil, fmt.Errorf("%w: client certificate no longer trusted", broker.ErrUnauthenticated)
	}
	return conn, info, nil
}

// Clone keeps the wrapper.
func (c callerCreds) Clone() credentials.TransportCredentials {
	return callerCreds{c.TransportCredentials.Clone(), c.conns}
}

// callerInfo is the TLS information of a connection with its caller identity,
// or the reason it has none.
type callerInfo struct {
	credentials.TLSInfo
	id       policy.Identity
	err      error
	conn     *trackedConn // nil when untracked
	notAfter time.Time    // of the client's chain, when tracked
	streams  streamCount  // calls open on the connection (Admission)
	waiting  waitingCalls // admitted calls whose first message has not come (Admission)
	resetter StreamResetter
}

// callerFrom returns the identity of the caller of the call ctx belongs to.
// A connection whose client certificate has expired is refused and closed.
func callerFrom(ctx context.Context) (policy.Identity, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", fmt.Errorf("%w: no peer", broker.ErrUnauthenticated)
	}
	switch ai := p.AuthInfo.(type) {
	case *callerInfo:
		if ai.conn != nil && time.Now().After(ai.notAfter) {
			ai.conn.revoke(ReasonCertificateExpired)
			return "", fmt.Errorf("%w: client certificate expired at %s; reconnect with a renewed one",
				broker.ErrUnauthenticated, ai.notAfter.UTC().Format(time.RFC3339))
		}
		return ai.id, ai.err
	case credentials.TLSInfo: // a server without CallerCredentials
		return identityOf(ai)
	}
	return "", fmt.Errorf("%w: no verified client certificate", broker.ErrUnauthenticated)
}

// identityOf reads the identity from a connection's verified client
// certificate.
func identityOf(ti credentials.TLSInfo) (policy.Identity, error) {
	if len(ti.State.VerifiedChains) == 0 || len(ti.State.VerifiedChains[0]) == 0 {
		return "", fmt.Errorf("%w: no verified client certificate", broker.ErrUnauthenticated)
	}
	id, err := policy.IdentityFromCert(ti.State.VerifiedChains[0][0])
	if err != nil {
		return "", fmt.Errorf("%w: %w", broker.ErrUnauthenticated, err)
	}
	return id, nil
}
