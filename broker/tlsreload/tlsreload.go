// Package tlsreload serves TLS from certificate, key and client CA files that
// may change while the server runs: each new handshake uses the newest valid
// material, and connections already open keep theirs. A change that does not
// load (a half-written file, a key that does not match) is reported and the
// previous material stays in force.
package tlsreload

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"
)

// Files names the server's TLS material.
type Files struct {
	CertFile, KeyFile, ClientCAFile string
}

// material is one loaded generation of the files.
type material struct {
	cert *tls.Certificate
	leaf *x509.Certificate
	pool *x509.CertPool
	sum  [32]byte // of the three files' contents, to notice changes
}

// Reloader holds the current TLS material.
type Reloader struct {
	files      Files
	minVersion uint16
	cur        atomic.Pointer[material]
}

// New loads the files. minVersion is tls.VersionTLS13 or tls.VersionTLS12.
func New(files Files, minVersion uint16) (*Reloader, error) {
	r := &Reloader{files: files, minVersion: minVersion}
	m, err := load(files)
	if err != nil {
		return nil, err
	}
	r.cur.Store(m)
	return r, nil
}

func load(f Files) (*material, error) {
	certPEM, err := os.ReadFile(f.CertFile)
	if err != nil {
		return nil, fmt.Errorf("tls.cert_file: %w", err)
	}
	keyPEM, err := os.ReadFile(f.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("tls.key_file: %w", err)
	}
	caPEM, err := os.ReadFile(f.ClientCAFile)
	if err != nil {
		return nil, fmt.Errorf("tls.client_ca_file: %w", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("tls.cert_file/tls.key_file: %w", err)
	}
	leaf := cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("tls.cert_file: %w", err)
		}
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("tls.client_ca_file: no PEM certificates found")
	}
	return &material{cert: &cert, leaf: leaf, pool: pool, sum: sha256.Sum256(bytes.Join([][]byte{certPEM, keyPEM, caPEM}, []byte{0}))}, nil
}

// Reload re-reads the files. It reports whether new material took effect;
// on error the previous material stays.
func (r *Reloader) Reload() (bool, error) {
	m, err := load(r.files)
	if err != nil {
		return false, err
	}
	if m.sum == r.cur.Load().sum {
		return false, nil
	}
	r.cur.Store(m)
	return true, nil
}

// Watch calls Reload every interval until ctx ends, and report with each
// change or error.
func (r *Reloader) Watch(ctx context.Context, interval time.Duration, report func(changed bool, err error)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if changed, err := r.Reload(); changed || err != nil {
				report(changed, err)
			}
		}
	}
}

// Leaf is the current server certificate.
func (r *Reloader) Leaf() *x509.Certificate { return r.cur.Load().leaf }

// ServerConfig returns a configuration that requires and verifies client
// certificates against the current client CA and presents the current
// certificate, with session tickets off so every connection proves its
// certificate afresh.
func (r *Reloader) ServerConfig() *tls.Config {
	base := &tls.Config{MinVersion: r.minVersion, SessionTicketsDisabled: true}
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		m := r.cur.Load()
		return &tls.Config{
			MinVersion:             r.minVersion,
			Certificates:           []tls.Certificate{*m.cert},
			ClientAuth:             tls.RequireAndVerifyClientCert,
			ClientCAs:              m.pool,
			SessionTicketsDisabled: true,
			NextProtos:             []string{"h2"},
		}, nil
	}
	return base
}
