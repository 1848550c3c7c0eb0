// Package client connects Go services to tokenbroker over mutual TLS.
//
// It imports neither the server packages nor the store: a caller's binary
// carries only what it needs to reach the broker.
package client

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"

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

// TLSConfig loads the files into a TLS 1.3 client configuration.
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

// Dial returns a connection to the broker at addr (host:port) using tc. The
// connection is made lazily, on the first call.
func Dial(addr string, tc *tls.Config, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tc))}, opts...)
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	return conn, nil
}
