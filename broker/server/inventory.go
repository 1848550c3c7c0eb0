package server

import (
	"crypto/x509"
	"encoding/pem"
	"net/http"
	"net/url"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/config"
)

// credentialView is one credential on the inventory page: its configuration
// (never a secret), its upstream state and its use.
type credentialView struct {
	Name           string                 `json:"name"`
	DefinedIn      string                 `json:"defined_in"`
	TokenURL       string                 `json:"token_url"`
	ClientID       string                 `json:"client_id"`
	AuthMethod     string                 `json:"auth_method"`
	Scopes         []string               `json:"scopes"`
	AllowedCallers []config.AllowedCaller `json:"allowed_callers"`
	Material       []material             `json:"material"`
	broker.CredentialUse
}

// material is a file of the broker's own credential material: what is known
// of its expiry and rotation.
type material struct {
	// Kind is client_secret, private_key or client_certificate.
	Kind string `json:"kind"`
	// File is the file's path.
	File string `json:"file"`
	// LastRotated is the file's modification time.
	LastRotated *time.Time `json:"last_rotated,omitempty"`
	// Expires is a certificate's notAfter.
	Expires *time.Time `json:"expires,omitempty"`
	// Error says why the file could not be read, if it could not.
	Error string `json:"error,omitempty"`
}

// credentials serves GET /credentials (?name= for one): the platform team's
// inventory of every credential.
func (s *Server) credentials(w http.ResponseWriter, r *http.Request) {
	cfg := s.cfgNow.Load()
	use := s.broker.Use()
	name := r.URL.Query().Get("name")
	views := []credentialView{}
	for _, cr := range cfg.Credentials {
		if name != "" && cr.Name != name {
			continue
		}
		views = append(views, credentialView{Name: cr.Name, DefinedIn: definedIn(cr), TokenURL: withoutQuery(cr.TokenURL),
			ClientID: cr.ClientID, AuthMethod: cr.AuthMethod, Scopes: cr.Scopes, AllowedCallers: cr.AllowedCallers,
			Material: s.materials.of(cr), CredentialUse: use[cr.Name]})
	}
	sort.Slice(views, func(i, j int) bool { return views[i].Name < views[j].Name })
	switch {
	case name == "":
		writeJSON(w, http.StatusOK, map[string]any{"credentials": views})
	case len(views) == 0:
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "no credential named " + url.QueryEscape(name)})
	default:
		writeJSON(w, http.StatusOK, views[0])
	}
}

// definedIn names where a credential is defined: its credentials_dir file,
// or the main configuration.
func definedIn(cr config.Credential) string {
	if cr.DefinedIn != "" {
		return cr.DefinedIn
	}
	return cr.Key() + " of the main configuration"
}

// withoutQuery is a token URL without its query and fragment, which may
// carry anything.
func withoutQuery(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return ""
	}
	u.RawQuery, u.Fragment, u.User = "", "", nil
	return u.String()
}

// materials reads what can be known of credential material files, parsing a
// certificate again only when its file changes.
type materials struct {
	mu    sync.Mutex
	certs map[string]certStamp // by path
}

type certStamp struct {
	mod      time.Time
	size     int64
	notAfter time.Time
	err      string
}

func (m *materials) of(cr config.Credential) []material {
	var out []material
	add := func(kind, file string) {
		if file == "" {
			return
		}
		mt := material{Kind: kind, File: file}
		fi, err := os.Stat(file)
		if err != nil {
			mt.Error = err.Error()
			out = append(out, mt)
			return
		}
		mod := fi.ModTime().UTC()
		mt.LastRotated = &mod
		if kind == "client_certificate" {
			if na, err := m.notAfter(file, fi); err != "" {
				mt.Error = err
			} else {
				mt.Expires = &na
			}
		}
		out = append(out, mt)
	}
	add("client_secret", cr.ClientSecretFile)
	for _, f := range cr.ClientSecretFiles {
		add("client_secret", f)
	}
	add("private_key", cr.PrivateKeyFile)
	add("client_certificate", cr.TLSClientCertFile)
	return out
}

// expiry is when cr's material expires, where that is known: a
// tls_client_auth certificate's notAfter. (Secrets and keys have none; they
// are not looked at on each scrape.)
func (m *materials) expiry(cr config.Credential) (time.Time, bool) {
	if cr.TLSClientCertFile == "" {
		return time.Time{}, false
	}
	fi, err := os.Stat(cr.TLSClientCertFile)
	if err != nil {
		return time.Time{}, false
	}
	na, errMsg := m.notAfter(cr.TLSClientCertFile, fi)
	return na, errMsg == ""
}

func (m *materials) notAfter(file string, fi os.FileInfo) (time.Time, string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if c, ok := m.certs[file]; ok && c.mod.Equal(fi.ModTime()) && c.size == fi.Size() {
		return c.notAfter, c.err
	}
	c := certStamp{mod: fi.ModTime(), size: fi.Size()}
	b, err := os.ReadFile(file)
	if err != nil {
		c.err = err.Error()
	} else if block, _ := pem.Decode(b); block == nil || block.Type != "CERTIFICATE" {
		c.err = "no PEM certificate"
	} else if cert, err := x509.ParseCertificate(block.Bytes); err != nil {
		c.err = "certificate does not parse"
	} else {
		c.notAfter = cert.NotAfter.UTC()
	}
	if m.certs == nil {
		m.certs = map[string]certStamp{}
	}
	m.certs[file] = c
	return c.notAfter, c.err
}

var materialExpiryDesc = prometheus.NewDesc("tokenbroker_credential_material_expiry_timestamp_seconds",
	"When the credential's own material expires (Unix time): the notAfter of a tls_client_auth certificate; follows file changes.",
	[]string{"credential"}, nil)

// materialCollector exports tokenbroker_credential_material_expiry_timestamp_seconds
// for the credentials in force whose material has a known expiry.
type materialCollector struct{ s *Server }

// Describe implements prometheus.Collector.
func (c materialCollector) Describe(ch chan<- *prometheus.Desc) { ch <- materialExpiryDesc }

// Collect implements prometheus.Collector.
func (c materialCollector) Collect(ch chan<- prometheus.Metric) {
	for _, cr := range c.s.cfgNow.Load().Credentials {
		if t, ok := c.s.materials.expiry(cr); ok {
			ch <- prometheus.MustNewConstMetric(materialExpiryDesc, prometheus.GaugeValue, float64(t.Unix()), cr.Name)
		}
	}
}
