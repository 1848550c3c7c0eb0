package grpcapi

import (
	"context"
	"fmt"
	"net"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/policy"
)

// CallerCredentials wraps a server's TLS transport credentials so that each
// connection's caller identity is read from its verified client certificate
// once, at the handshake, and not again on every call.
func CallerCredentials(tc credentials.TransportCredentials) credentials.TransportCredentials {
	return callerCreds{tc}
}

type callerCreds struct {
	credentials.TransportCredentials
}

// ServerHandshake completes the TLS handshake and derives the identity.
func (c callerCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, ai, err := c.TransportCredentials.ServerHandshake(raw)
	if err != nil {
		return conn, ai, err
	}
	ti, ok := ai.(credentials.TLSInfo)
	if !ok {
		return conn, ai, nil
	}
	id, idErr := identityOf(ti)
	return conn, &callerInfo{TLSInfo: ti, id: id, err: idErr}, nil
}

// Clone keeps the wrapper.
func (c callerCreds) Clone() credentials.TransportCredentials {
	return callerCreds{c.TransportCredentials.Clone()}
}

// callerInfo is the TLS information of a connection with its caller identity,
// or the reason it has none.
type callerInfo struct {
	credentials.TLSInfo
	id      policy.Identity
	err     error
	streams streamCount // calls open on the connection (Admission)
}

// callerFrom returns the identity of the caller of the call ctx belongs to.
func callerFrom(ctx context.Context) (policy.Identity, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", fmt.Errorf("%w: no peer", broker.ErrUnauthenticated)
	}
	switch ai := p.AuthInfo.(type) {
	case *callerInfo:
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
