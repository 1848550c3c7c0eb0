// Package client connects Go services to tokenbroker over mutual TLS and
// hands them access tokens the Go way: an oauth2.TokenSource (TokenSource)
// and an http.RoundTripper (Transport) that sets the Authorization header and
// recovers once from a token the resource server rejects. For a DPoP-bound
// credential, Transport also sends the broker's proof for each request.
//
// It imports neither the server packages nor the store: a caller's binary
// carries only what it needs to reach the broker.
package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// TLSFiles names the PEM files a caller authenticates with.
type TLSFiles struct {
	// CAFile holds the CA certificates that the broker's certificate must chain to.
	CAFile string
	// CertFile is the caller's certificate (its workload identity).
	CertFile string
	// KeyFile is the caller's private key.
	KeyFile string
}

// TLSConfig loads the files, once, into a TLS 1.3 client configuration. Use
// DialFiles instead to follow the files as they are renewed.
func (f TLSFiles) TLSConfig() (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("client certificate: %w", err)
	}
	caPEM, err := os.ReadFile(f.CAFile)
	if err != nil {
		return nil, fmt.Errorf("CA file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("CA file: no PEM certificates found")
	}
	return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, RootCAs: pool}, nil
}

// roundRobin spreads calls over every address the target resolves to: with
// a headless Service (dns:///tokenbroker.ns.svc:8443) every ready replica.
const roundRobin = `{"loadBalancingConfig":[{"round_robin":{}}]}`

// Dial returns a connection to the broker at target (host:port, or a gRPC
// target such as dns:///tokenbroker.tokenbroker.svc:8443) using tc. Calls are
// balanced round robin over the resolved addresses; opts may override that.
// The connection is made lazily, on the first call.
func Dial(target string, tc *tls.Config, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	return dial(target, credentials.NewTLS(tc), opts)
}

// DialFiles is Dial with the TLS material read from files, and read again
// for each new connection after any of them changes: a certificate renewed
// by cert-manager or SPIRE is used without a restart. While changed files do
// not load (a certificate written before its key, say), the material loaded
// before is used and the files are tried again at the next connection.
func DialFiles(target string, files TLSFiles, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	rc := &reloadingCreds{files: files}
	if _, err := rc.current(); err != nil {
		return nil, err
	}
	return dial(target, rc, opts)
}

func dial(target string, creds credentials.TransportCredentials, opts []grpc.DialOption) (*grpc.ClientConn, error) {
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(creds), grpc.WithDefaultServiceConfig(roundRobin),
		grpc.WithChainUnaryInterceptor(propagateUnary), grpc.WithChainStreamInterceptor(propagateStream)}, opts...)
	conn, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", target, err)
	}
	return conn, nil
}

// reloadingCreds are TLS transport credentials rebuilt from TLSFiles when a
// file's size or modification time changes (checked at each handshake;
// handshakes are rare, one per connection).
type reloadingCreds struct {
	files TLSFiles

	mu    sync.Mutex
	stamp [3]fileStamp
	creds credentials.TransportCredentials
}

type fileStamp struct {
	size int64
	mod  time.Time
}

func (r *reloadingCreds) current() (credentials.TransportCredentials, error) {
	var stamp [3]fileStamp
	for i, p := range []string{r.files.CAFile, r.files.CertFile, r.files.KeyFile} {
		fi, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("TLS files: %w", err)
		}
		stamp[i] = fileStamp{fi.Size(), fi.ModTime()}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.creds != nil && stamp == r.stamp {
		return r.creds, nil
	}
	tc, err := r.files.TLSConfig()
	if err != nil {
		if r.creds != nil {
			return r.creds, nil // keep the stamp: tried again next time
		}
		return nil, err
	}
	r.creds, r.stamp = credentials.NewTLS(tc), stamp
	return r.creds, nil
}

// ClientHandshake implements credentials.TransportCredentials.
func (r *reloadingCreds) ClientHandshake(ctx context.Context, authority string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	c, err := r.current()
	if err != nil {
		return nil, nil, err
	}
	return c.ClientHandshake(ctx, authority, conn)
}

// ServerHandshake implements credentials.TransportCredentials; these are client credentials only.
func (r *reloadingCreds) ServerHandshake(net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("client: reloading TLS credentials are for clients only")
}

// Info implements credentials.TransportCredentials.
func (r *reloadingCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls", SecurityVersion: "1.3"}
}

// Clone implements credentials.TransportCredentials.
func (r *reloadingCreds) Clone() credentials.TransportCredentials {
	return &reloadingCreds{files: r.files}
}

// OverrideServerName implements credentials.TransportCredentials (deprecated there; unused).
func (r *reloadingCreds) OverrideServerName(string) error {
	return errors.New("client: OverrideServerName is not supported; use grpc.WithAuthority")
}
