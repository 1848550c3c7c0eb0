package grpcapi

import (
	"context"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/peer"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/policy"
)

// TestCallOnExpiredCertificateRefused: a call that arrives on a connection
// whose client certificate has passed its notAfter (before the expiry timer
// closed it) is UNAUTHENTICATED, and the connection is closed then.
func TestCallOnExpiredCertificateRefused(t *testing.T) {
	var closed []string
	conns := NewConns(func([]*x509.Certificate, time.Time) error { return nil },
		func(id policy.Identity, reason string) { closed = append(closed, string(id)+" "+reason) })
	server, client := net.Pipe()
	defer client.Close()
	tc := &trackedConn{Conn: server, owner: conns, id: "spiffe://td/a"}
	conns.set[tc] = struct{}{}

	ctxFor := func(notAfter time.Time) context.Context {
		return peer.NewContext(context.Background(), &peer.Peer{AuthInfo: &callerInfo{id: tc.id, conn: tc, notAfter: notAfter}})
	}
	if id, err := callerFrom(ctxFor(time.Now().Add(time.Hour))); err != nil || id != tc.id {
		t.Fatalf("a valid certificate: %q, %v", id, err)
	}
	_, err := callerFrom(ctxFor(time.Now().Add(-time.Second)))
	if !errors.Is(err, broker.ErrUnauthenticated) || !strings.Contains(err.Error(), "client certificate expired") {
		t.Fatalf("an expired certificate: %v, want ErrUnauthenticated saying it expired", err)
	}
	if _, rerr := client.Read(make([]byte, 1)); !errors.Is(rerr, io.EOF) {
		t.Errorf("the connection is still open after the refusal: read = %v", rerr)
	}
	if conns.Len() != 0 || len(closed) != 1 || closed[0] != "spiffe://td/a "+ReasonCertificateExpired {
		t.Errorf("tracked %d, closed %q; want 0 and one close for the expiry", conns.Len(), closed)
	}
}

// TestRecheckClosesOnlyWhatNoLongerVerifies: Recheck closes the connections
// whose chain the new trust material refuses, and no others.
func TestRecheckClosesOnlyWhatNoLongerVerifies(t *testing.T) {
	bad := &x509.Certificate{}
	conns := NewConns(func(chain []*x509.Certificate, _ time.Time) error {
		if chain[0] == bad {
			return errors.New("untrusted")
		}
		return nil
	}, func(policy.Identity, string) {})
	var peers []net.Conn
	for _, leaf := range []*x509.Certificate{bad, {}, {}} {
		s, c := net.Pipe()
		peers = append(peers, c)
		conns.set[&trackedConn{Conn: s, owner: conns, chain: []*x509.Certificate{leaf}}] = struct{}{}
	}
	if n := conns.Recheck(time.Now()); n != 1 || conns.Len() != 2 {
		t.Errorf("Recheck closed %d, %d left; want 1 closed and 2 left", n, conns.Len())
	}
	for _, c := range peers {
		_ = c.Close()
	}
}

// TestSweepClosesExpiredOnTheWallClock: Sweep closes what expired by the
// given wall-clock time, whatever the monotonic timers say.
func TestSweepClosesExpiredOnTheWallClock(t *testing.T) {
	conns := NewConns(func([]*x509.Certificate, time.Time) error { return nil }, func(policy.Identity, string) {})
	now := time.Now()
	var peers []net.Conn
	for _, na := range []time.Time{now.Add(-time.Second), now.Add(time.Hour)} {
		s, c := net.Pipe()
		peers = append(peers, c)
		conns.set[&trackedConn{Conn: s, owner: conns, notAfter: na}] = struct{}{}
	}
	if n := conns.Sweep(now); n != 1 || conns.Len() != 1 {
		t.Errorf("Sweep closed %d, %d left; want 1 and 1", n, conns.Len())
	}
	for _, c := range peers {
		_ = c.Close()
	}
}
