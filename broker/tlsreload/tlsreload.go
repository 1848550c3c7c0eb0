// Package tlsreload serves TLS from certificate, key and client trust files
// that may change while the server runs: each new handshake uses the newest
// valid material, and Verify re-checks a connection already open against it.
// A change that does not load (a half-written file, a key that does not match)
// is reported and the previous material stays in force.
//
// Client certificates are verified by the caller's identity (see package
// policy): a SPIFFE ID whose trust domain has a bundle of its own verifies
// against that bundle alone (SPIFFE X509-SVID verification), so one trust
// domain's CA cannot vouch for another's workloads; any other certificate
// verifies against the client CA file, whose every CA can vouch for any such
// identity.
package tlsreload

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/tokenbroker/tokenbroker/broker/policy"
)

// Files names the server's TLS material.
type Files struct {
	CertFile, KeyFile string
	// ClientCAFile may be empty when TrustBundles are given.
	ClientCAFile string
	// TrustBundles are the CA files of SPIFFE trust domains, by name.
	TrustBundles []TrustBundle
}

// TrustBundle is one trust domain's CA file.
type TrustBundle struct {
	TrustDomain, CAFile string
}

// material is one loaded generation of the files.
type material struct {
	cert    *tls.Certificate
	leaf    *x509.Certificate
	pool    *x509.CertPool // client_ca_file; nil without one
	bundles x509bundle.Source
	hints   *x509.CertPool // every CA, named in the certificate request; nil: none named
	sum     [32]byte       // of every file's contents, to notice changes
}

// ErrUntrusted is wrapped by Verify's errors: the chain does not verify.
var ErrUntrusted = errors.New("client certificate is not trusted")

// verify checks a peer's certificate chain (leaf first, as sent) at now, and
// returns when the chain it verified first expires: the earliest notAfter of
// the leaf, the intermediates and the trusted root it chains to.
func (m *material) verify(chain []*x509.Certificate, now time.Time) (time.Time, error) {
	if len(chain) == 0 {
		return time.Time{}, fmt.Errorf("%w: no certificate", ErrUntrusted)
	}
	leaf := chain[0]
	if id, err := policy.IdentityFromCert(leaf); err == nil && id.IsSPIFFE() {
		td, err := spiffeid.TrustDomainFromString(id.TrustDomain())
		if err == nil && hasBundle(m.bundles, td) {
			_, chains, err := x509svid.Verify(chain, m.bundles, x509svid.WithTime(now))
			if err != nil {
				return time.Time{}, fmt.Errorf("%w: %s does not verify against trust domain %s's bundle: %w", ErrUntrusted, id, td, err)
			}
			return firstExpiry(chains), nil
		}
	}
	if m.pool == nil {
		return time.Time{}, fmt.Errorf("%w: no trust bundle for this identity and no tls.client_ca_file", ErrUntrusted)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	chains, err := leaf.Verify(x509.VerifyOptions{Roots: m.pool, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		return time.Time{}, fmt.Errorf("%w: %w", ErrUntrusted, err)
	}
	return firstExpiry(chains), nil
}

// firstExpiry is the earliest notAfter in the first of chains.
func firstExpiry(chains [][]*x509.Certificate) time.Time {
	var t time.Time
	if len(chains) == 0 {
		return t
	}
	for _, c := range chains[0] {
		if t.IsZero() || c.NotAfter.Before(t) {
			t = c.NotAfter
		}
	}
	return t
}

// hasBundle reports whether src has a bundle for td.
func hasBundle(src x509bundle.Source, td spiffeid.TrustDomain) bool {
	_, err := src.GetX509BundleForTrustDomain(td)
	return err == nil
}

// Reloader holds the current TLS material, from files (New) or from the
// SPIFFE Workload API (NewWorkloadAPI).
type Reloader struct {
	files      Files
	minVersion uint16
	cur        atomic.Pointer[material]
	wl         *workload // nil for files
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
	set := x509bundle.NewSet()
	m := &material{cert: &cert, leaf: leaf, bundles: set, hints: x509.NewCertPool()}
	sum := sha256.New()
	sum.Write(bytes.Join([][]byte{certPEM, keyPEM}, []byte{0}))
	if f.ClientCAFile != "" {
		caPEM, err := os.ReadFile(f.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("tls.client_ca_file: %w", err)
		}
		m.pool = x509.NewCertPool()
		if !m.pool.AppendCertsFromPEM(caPEM) {
			return nil, errors.New("tls.client_ca_file: no PEM certificates found")
		}
		m.hints.AppendCertsFromPEM(caPEM)
		sum.Write([]byte{0})
		sum.Write(caPEM)
	}
	for i, b := range f.TrustBundles {
		key := fmt.Sprintf("tls.client_trust_bundles[%d].ca_file", i)
		td, err := spiffeid.TrustDomainFromString(b.TrustDomain)
		if err != nil {
			return nil, fmt.Errorf("tls.client_trust_bundles[%d].trust_domain: %w", i, err)
		}
		pemBytes, err := os.ReadFile(b.CAFile)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", key, err)
		}
		bundle, err := x509bundle.Parse(td, pemBytes)
		if err != nil || bundle.Empty() {
			return nil, fmt.Errorf("%s: no PEM certificates found", key)
		}
		set.Add(bundle)
		for _, ca := range bundle.X509Authorities() {
			m.hints.AddCert(ca)
		}
		sum.Write([]byte{0})
		sum.Write([]byte(b.TrustDomain))
		sum.Write([]byte{0})
		sum.Write(pemBytes)
	}
	sum.Sum(m.sum[:0])
	return m, nil
}

// Reload re-reads the files. It reports whether new material took effect;
// on error the previous material stays. With the Workload API it reads
// nothing: it reports whether an update arrived since the last call.
func (r *Reloader) Reload() (bool, error) {
	if r.wl != nil {
		return r.wl.pending.Swap(false), nil
	}
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

// Leaf is the current server certificate.
func (r *Reloader) Leaf() *x509.Certificate { return r.cur.Load().leaf }

// Verify checks a peer's certificate chain (leaf first) against the current
// material at now; its errors wrap ErrUntrusted. It is how a connection that
// is already open is judged again after the trust files change.
func (r *Reloader) Verify(chain []*x509.Certificate, now time.Time) error {
	_, err := r.cur.Load().verify(chain, now)
	return err
}

// VerifiedConn is a connection that wants to know the client certificate
// chain that the handshake verified (as sent) and when the chain it was
// verified through first expires: the raw connection handed to a tls.Server
// made from ServerConfig may implement it.
type VerifiedConn interface {
	SetVerifiedChain(chain []*x509.Certificate, notAfter time.Time)
}

// ServerConfig returns a configuration that requires client certificates,
// verifies them against the current trust material by identity (the
// standard verification cannot bind a trust domain to its CA), and presents
// the current certificate, with session tickets off so every connection
// proves its certificate afresh. A raw connection that implements
// VerifiedConn is told the verified chain.
func (r *Reloader) ServerConfig() *tls.Config {
	base := &tls.Config{MinVersion: r.minVersion, SessionTicketsDisabled: true}
	base.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		m := r.cur.Load()
		return &tls.Config{
			MinVersion:             r.minVersion,
			Certificates:           []tls.Certificate{*m.cert},
			ClientAuth:             tls.RequireAnyClientCert, // verified below, by identity
			ClientCAs:              m.hints,                  // only names the CAs to the client
			SessionTicketsDisabled: true,
			NextProtos:             []string{"h2"},
			VerifyConnection: func(cs tls.ConnectionState) error {
				// The trust material in force now, not at the ClientHello: a
				// reload may land while the client takes its time.
				notAfter, err := r.cur.Load().verify(cs.PeerCertificates, time.Now())
				if err != nil {
					return err
				}
				if vc, ok := hello.Conn.(VerifiedConn); ok {
					vc.SetVerifiedChain(cs.PeerCertificates, notAfter)
				}
				return nil
			},
		}, nil
	}
	return base
}
