package server

import (
	"crypto/x509"
	"encoding/pem"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
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

// views returns the inventory of the credential named, or of all when name
// is "", sorted by name.
func (s *Server) views(name string) []credentialView {
	cfg := s.cfgNow.Load()
	use := s.broker.Use()
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
	return views
}

// credentials serves GET /credentials (?name= for one): the platform team's
// inventory of every credential, on a loopback admin address only (see
// inventoryOverHTTP), and only to a request addressed to a loopback name
// that no browser sent cross-site: a page the operator has open cannot read
// it through DNS rebinding or a cross-origin request.
func (s *Server) credentials(w http.ResponseWriter, r *http.Request) {
	if !loopbackHost(r.Host) || r.Header.Get("Origin") != "" ||
		r.Header.Get("Sec-Fetch-Site") != "" && r.Header.Get("Sec-Fetch-Site") != "none" {
		writeJSON(w, http.StatusForbidden, map[string]string{"error": "the inventory answers only requests to a loopback host that no browser sent on a page's behalf"})
		return
	}
	name := r.URL.Query().Get("name")
	views := s.views(name)
	switch {
	case name == "":
		writeJSON(w, http.StatusOK, map[string]any{"credentials": views})
	case len(views) == 0:
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "no credential named " + url.QueryEscape(name)})
	default:
		writeJSON(w, http.StatusOK, views[0])
	}
}

// inventoryOverHTTP reports whether GET /credentials is served on the admin
// address: only when that address is loopback, where only this host (and
// kubectl port-forward) reaches it. Elsewhere the admin port serves metrics to
// whoever can scrape them, and the inventory (token endpoints, client IDs,
// file paths, policy, callers, fingerprints) is for admin.callers, through the
// Admin gRPC service over mutual TLS.
func inventoryOverHTTP(adminAddr string) bool { return loopbackHost(adminAddr) }

// loopbackHost reports whether a request's Host names this machine's
// loopback: localhost or a loopback IP, with or without a port.
func loopbackHost(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// inventoryElsewhere answers GET /credentials on an admin address that is
// not loopback.
func inventoryElsewhere(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusNotFound, map[string]string{"error": "the inventory is not served on a non-loopback admin_addr; " +
		"use the tokenbroker.v1.Admin gRPC service (tokenctl inventory) as one of admin.callers"})
}

// describe is the Admin service's view of the credential named, or of all.
func (s *Server) describe(name string) ([]*pb.CredentialDescription, bool) {
	views := s.views(name)
	if name != "" && len(views) == 0 {
		return nil, false
	}
	out := make([]*pb.CredentialDescription, 0, len(views))
	for _, v := range views {
		d := &pb.CredentialDescription{Name: v.Name, DefinedIn: v.DefinedIn, TokenUrl: v.TokenURL, ClientId: v.ClientID,
			AuthMethod: v.AuthMethod, Scopes: v.Scopes, TokensIssued: v.Issued,
			Upstream: &pb.UpstreamState{State: v.Upstream.State, Reason: v.Upstream.Reason, Description: v.Upstream.Description,
				ConsecutiveFailures: int32(v.Upstream.Failures), Since: stamp(v.Upstream.Since), NextAttempt: stamp(v.Upstream.NextAttempt)}}
		for _, a := range v.AllowedCallers {
			d.AllowedCallers = append(d.AllowedCallers, &pb.CallerRule{Caller: a.Caller, Scopes: a.Scopes, Urls: a.URLs})
		}
		for _, m := range v.Material {
			d.Material = append(d.Material, &pb.MaterialFile{Kind: m.Kind, File: m.File, LastRotated: stamp(m.LastRotated),
				ExpireTime: stamp(m.Expires), Error: m.Error})
		}
		for _, t := range v.Cached {
			d.CachedTokens = append(d.CachedTokens, &pb.CachedToken{Scopes: t.Scopes, Fingerprint: t.Fingerprint, ExpireTime: timestamppb.New(t.ExpireTime)})
		}
		if f := v.LastFetch; f != nil {
			d.LastFetch = &pb.FetchRecord{Time: timestamppb.New(f.Time), Outcome: f.Outcome}
		}
		for _, c := range v.RecentCallers {
			d.RecentCallers = append(d.RecentCallers, &pb.RecentCaller{Caller: c.Caller, Last: timestamppb.New(c.Last)})
		}
		out = append(out, d)
	}
	return out, true
}

func stamp(t *time.Time) *timestamppb.Timestamp {
	if t == nil {
		return nil
	}
	return timestamppb.New(*t)
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
	if cr.DPoP != nil {
		add("dpop_key", cr.DPoP.KeyFile)
	}
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
