package server

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"

	"github.com/tokenbroker/tokenbroker/broker/config"
)

// adminTLS serves the admin address over TLS (config admin_tls). The files
// are read again at each handshake and parsed only when their bytes change,
// so that a renewed certificate or CA takes effect without a restart; a
// file that fails to load keeps the previous material.
type adminTLS struct {
	files config.AdminTLS

	mu   sync.Mutex
	sum  [32]byte
	cert *tls.Certificate
	pool *x509.CertPool // nil without client_ca_file
}

func newAdminTLS(files config.AdminTLS) (*adminTLS, error) {
	a := &adminTLS{files: files}
	if _, err := a.current(); err != nil {
		return nil, err
	}
	return a, nil
}

// current returns the material in force, loading the files again if they changed.
func (a *adminTLS) current() (*tls.Config, error) {
	var raw [3][]byte
	h := sha256.New()
	for i, f := range []struct{ key, path string }{{"admin_tls.cert_file", a.files.CertFile},
		{"admin_tls.key_file", a.files.KeyFile}, {"admin_tls.client_ca_file", a.files.ClientCAFile}} {
		if f.path == "" {
			continue
		}
		b, err := os.ReadFile(f.path)
		if err != nil {
			return a.fallback(fmt.Errorf("%s: %w", f.key, err))
		}
		raw[i] = b
		h.Write(b)
		h.Write([]byte{0})
	}
	var sum [32]byte
	h.Sum(sum[:0])
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cert == nil || sum != a.sum {
		cert, err := tls.X509KeyPair(raw[0], raw[1])
		if err != nil {
			return a.fallbackLocked(fmt.Errorf("admin_tls.cert_file, key_file: %w", err))
		}
		var pool *x509.CertPool
		if a.files.ClientCAFile != "" {
			pool = x509.NewCertPool()
			if !pool.AppendCertsFromPEM(raw[2]) {
				return a.fallbackLocked(fmt.Errorf("admin_tls.client_ca_file: no PEM certificate in %s", a.files.ClientCAFile))
			}
		}
		a.cert, a.pool, a.sum = &cert, pool, sum
	}
	return a.configLocked(), nil
}

func (a *adminTLS) fallback(err error) (*tls.Config, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.fallbackLocked(err)
}

// fallbackLocked keeps serving the previous material after a failed reload
// (a renewal caught halfway); without any, the error stands.
func (a *adminTLS) fallbackLocked(err error) (*tls.Config, error) {
	if a.cert == nil {
		return nil, err
	}
	return a.configLocked(), nil
}

func (a *adminTLS) configLocked() *tls.Config {
	c := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{*a.cert}}
	if a.pool != nil {
		// Asked for, not required: the kubelet's probes present none.
		c.ClientAuth, c.ClientCAs = tls.VerifyClientCertIfGiven, a.pool
	}
	return c
}

// serverConfig is the listener's configuration: each handshake gets the current material.
func (a *adminTLS) serverConfig() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return a.current()
	}}
}

// guard lets /healthz and /readyz through and answers everything else
// (metrics, the profiler, /credentials) only to clients that presented a
// certificate the client CA verified, when admin_tls.client_ca_file is set.
func (a *adminTLS) guard(next http.Handler) http.Handler {
	if a.files.ClientCAFile == "" {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" || r.URL.Path == "/readyz" || (r.TLS != nil && len(r.TLS.VerifiedChains) > 0) {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusForbidden)
		_, _ = w.Write([]byte("a client certificate from admin_tls.client_ca_file is required for " +
			strings.TrimSpace(r.URL.Path) + "\n"))
	})
}
