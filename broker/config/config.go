// Package config reads and validates tokenbroker's YAML configuration.
//
// Parse rejects unknown keys and returns errors that name the key at fault,
// e.g. "credentials[0].token_url: must be https (or http to a loopback
// address)". Secrets never appear in the file, only the paths of files that
// hold them. A Config returned without error has every default filled in.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"time"
	"unique"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.yaml.in/yaml/v3"

	"github.com/tokenbroker/tokenbroker/broker/dpop"
	"github.com/tokenbroker/tokenbroker/broker/policy"
)

// Limits on names and scopes, shared with request validation.
const (
	MaxNameLen   = 128
	MaxScopes    = 32
	MaxScopeLen  = 256
	MaxMinTTL    = 24 * time.Hour
	maxFileBytes = 1 << 20
)

// ValidName reports whether s is a valid credential name: 1 to MaxNameLen
// characters of A-Z a-z 0-9 . _ -. (A loop, not a regexp: it runs on every request.)
func ValidName(s string) bool {
	if len(s) == 0 || len(s) > MaxNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// Config is the whole configuration file.
type Config struct {
	// ListenAddr is the gRPC (mTLS) listen address.
	ListenAddr string `yaml:"listen_addr"`
	// AdminAddr is the admin HTTP listen address (/healthz, /readyz).
	AdminAddr string `yaml:"admin_addr"`
	// Reflection turns on gRPC server reflection.
	Reflection bool `yaml:"reflection"`
	// Pprof serves the Go profiler under /debug/pprof/ on the admin address.
	// Off by default: profiles show memory contents' shapes and cost CPU.
	Pprof bool `yaml:"pprof"`
	// TLS is the server's TLS material.
	TLS TLS `yaml:"tls"`
	// AdminTLS serves the admin address over TLS when set.
	AdminTLS AdminTLS `yaml:"admin_tls"`
	// Admin names who may call the tokenbroker.v1.Admin service.
	Admin Admin `yaml:"admin"`
	// Log configures the process log.
	Log Log `yaml:"log"`
	// Audit configures the audit trail.
	Audit Audit `yaml:"audit"`
	// RateLimit limits each caller's calls; absent means the default
	// (DefaultRate per second, bursts of twice that).
	RateLimit *RateLimit `yaml:"rate_limit"`
	// Retry tunes retries of a failing token endpoint.
	Retry Retry `yaml:"retry"`
	// Limits bounds what a peer can cost before it is known (see Limits).
	Limits Limits `yaml:"limits"`
	// Store selects the shared token store.
	Store Store `yaml:"store"`
	// Credentials are the client registrations the broker holds.
	Credentials []Credential `yaml:"credentials"`
	// CredentialsDir, if set, is a directory whose every *.yaml file holds a
	// list of credentials in the schema of Credentials; they are merged
	// with Credentials. A relative path is taken from the configuration
	// file's directory. Names starting with a dot are skipped (Kubernetes
	// keeps its ConfigMap bookkeeping there).
	CredentialsDir string `yaml:"credentials_dir,omitempty"`

	credentialsDirPath string // CredentialsDir, resolved
}

// CredentialsDirPath is credentials_dir resolved against the configuration
// file's directory, or "" without one.
func (c *Config) CredentialsDirPath() string { return c.credentialsDirPath }

// TLS names the server certificate and what caller certificates must chain to.
type TLS struct {
	// CertFile is the server certificate chain (PEM).
	CertFile string `yaml:"cert_file"`
	// KeyFile is the server private key (PEM).
	KeyFile string `yaml:"key_file"`
	// ClientCAFile holds the CA certificates that caller certificates must
	// chain to (PEM), for DNS-SAN callers and SPIFFE IDs of trust domains that
	// have no bundle in ClientTrustBundles. Every CA in it can vouch for any
	// such identity.
	ClientCAFile string `yaml:"client_ca_file"`
	// ClientTrustBundles bind SPIFFE trust domains to their own CAs: a
	// SPIFFE ID of a listed trust domain verifies only against that bundle.
	ClientTrustBundles []TrustBundle `yaml:"client_trust_bundles"`
	// MinVersion is "1.3" (the default) or "1.2", for callers that cannot speak TLS 1.3.
	MinVersion string `yaml:"min_version"`
	// MaxConnectionAge is how long a caller's connection lives before the
	// server asks it to reconnect (GOAWAY), ±10% jitter; a connection
	// re-proves its certificate at least this often. Default 1h.
	MaxConnectionAge Duration `yaml:"max_connection_age"`
	// MaxConnectionAgeGrace is how long calls may still run on a connection
	// past its MaxConnectionAge. Default 30s.
	MaxConnectionAgeGrace Duration `yaml:"max_connection_age_grace"`
	// SPIFFE, when set, takes the serving certificate and the client trust
	// bundles from the SPIFFE Workload API instead of the files above,
	// which must then be absent. With it, MaxConnectionAge defaults to a
	// quarter of the broker's SVID lifetime.
	SPIFFE *SPIFFE `yaml:"spiffe"`
}

// SPIFFE takes the server's TLS material from the SPIFFE Workload API.
type SPIFFE struct {
	// WorkloadAPI is the Workload API's address (unix:///path or
	// tcp://ip:port); empty means the SPIFFE_ENDPOINT_SOCKET variable.
	WorkloadAPI string `yaml:"workload_api"`
	// ID is the broker's own SPIFFE ID: which SVID to serve with when the
	// Workload API gives this workload several. Empty means the first.
	ID string `yaml:"id"`
}

// Address is the Workload API address in force: WorkloadAPI, or the
// SPIFFE_ENDPOINT_SOCKET variable.
func (s *SPIFFE) Address() string {
	if s.WorkloadAPI != "" {
		return s.WorkloadAPI
	}
	return os.Getenv(SPIFFESocketEnv)
}

// SPIFFESocketEnv is the standard variable holding the Workload API address.
const SPIFFESocketEnv = "SPIFFE_ENDPOINT_SOCKET"

// checkWorkloadAPIAddr checks a Workload API address as go-spiffe's
// ValidateAddress does (its package is not imported here: it would bring
// gRPC into every package that reads the configuration, the core included).
func checkWorkloadAPIAddr(addr string) error {
	u, err := url.Parse(addr)
	switch {
	case err != nil:
		return fmt.Errorf("not a URI: %w", err)
	case u.Scheme != "unix" && u.Scheme != "tcp":
		return errors.New(`the scheme must be "unix" or "tcp"`)
	case u.Opaque != "" || u.User != nil || u.RawQuery != "" || u.Fragment != "":
		return errors.New("no user information, query or fragment, and not opaque (unix:///path)")
	case u.Scheme == "unix" && u.Host == "" && u.Path == "":
		return errors.New("a unix address needs a path")
	case u.Scheme == "tcp" && (u.Path != "" || net.ParseIP(u.Hostname()) == nil || u.Port() == ""):
		return errors.New("a tcp address is an IP address and a port, without a path")
	}
	return nil
}

// TrustBundle is the CA bundle of one SPIFFE trust domain.
type TrustBundle struct {
	// TrustDomain is the trust domain's name, e.g. "bank.internal".
	TrustDomain string `yaml:"trust_domain"`
	// CAFile holds the trust domain's X.509 authorities (PEM).
	CAFile string `yaml:"ca_file"`
}

// AdminTLS is the admin address's TLS: off without CertFile. With
// ClientCAFile, /metrics and /debug/pprof/ answer only clients whose
// certificate chains to it (Prometheus); /healthz and /readyz stay open to
// the kubelet's probes, which present none. The files are re-read when they
// change.
type AdminTLS struct {
	// CertFile is the admin server's certificate chain (PEM).
	CertFile string `yaml:"cert_file"`
	// KeyFile is its private key (PEM).
	KeyFile string `yaml:"key_file"`
	// ClientCAFile holds the CAs of the scrapers' client certificates (PEM).
	ClientCAFile string `yaml:"client_ca_file"`
}

func (t AdminTLS) validate() error {
	switch {
	case (t.CertFile == "") != (t.KeyFile == ""):
		return fieldErr("admin_tls.key_file", "admin_tls.cert_file and admin_tls.key_file go together")
	case t.ClientCAFile != "" && t.CertFile == "":
		return fieldErr("admin_tls.client_ca_file", "needs admin_tls.cert_file and key_file: client certificates are asked for over TLS")
	}
	return nil
}

// Admin configures the tokenbroker.v1.Admin service on the gRPC listener.
type Admin struct {
	// Callers may call it: patterns as in allowed_callers. Nobody by default.
	Callers []string `yaml:"callers"`
}

// Log configures the process log (JSON lines on stderr).
type Log struct {
	// Level is debug, info, warn or error.
	Level string `yaml:"level"`
}

// RateLimit limits each caller identity's calls (token bucket).
type RateLimit struct {
	// RequestsPerSecond is the sustained rate; 0 turns the limit off.
	RequestsPerSecond float64 `yaml:"requests_per_second"`
	// Burst is how many calls may come at once.
	Burst int `yaml:"burst"`
	// WatchStreams caps the WatchToken streams one caller identity may hold
	// open at once; 0 means the default (1,000).
	WatchStreams int `yaml:"watch_streams"`
}

// Audit configures the audit trail (JSON lines).
type Audit struct {
	// Path is "stdout" (the default) or a file events are appended to.
	Path string `yaml:"path"`
	// FailClosed refuses to hand out a token whose issuance cannot be recorded.
	FailClosed bool `yaml:"fail_closed"`
}

// Store selects the shared token store.
type Store struct {
	// Backend is "memory" (the default; one process) or "redis" (shared by replicas).
	Backend string `yaml:"backend"`
	// EncryptionKeyFile holds the key that seals values in Redis: 32 random
	// bytes, raw or base64. Required for redis.
	EncryptionKeyFile string `yaml:"encryption_key_file"`
	// PreviousEncryptionKeyFiles hold earlier keys that still open stored
	// values during a key rotation; nothing new is sealed with them.
	PreviousEncryptionKeyFiles []string `yaml:"previous_encryption_key_files"`
	// Redis configures the connection when Backend is redis.
	Redis Redis `yaml:"redis"`
}

// Redis configures the Redis connection: one address for a standalone server,
// several for a Cluster, or the sentinels' addresses with MasterName.
type Redis struct {
	// Addrs are host:port addresses.
	Addrs []string `yaml:"addrs"`
	// MasterName selects Sentinel mode.
	MasterName string `yaml:"master_name"`
	// Username is the ACL user, if any.
	Username string `yaml:"username"`
	// PasswordFile holds the password, if any.
	PasswordFile string `yaml:"password_file"`
	// DB is the database number (standalone and Sentinel only).
	DB int `yaml:"db"`
	// KeyPrefix starts every key and channel name.
	KeyPrefix string `yaml:"key_prefix"`
	// TLS configures TLS to Redis; empty means plain TCP.
	TLS RedisTLS `yaml:"tls"`
	// ProbeInterval is how often every Redis node is pinged, with or
	// without traffic; zero means 2s.
	ProbeInterval Duration `yaml:"probe_interval"`
}

// RedisTLS names the files for TLS to Redis.
type RedisTLS struct {
	// CAFile holds the CA certificates Redis's certificate must chain to; empty means the system roots.
	CAFile string `yaml:"ca_file"`
	// CertFile and KeyFile are a client certificate, if Redis requires one.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// Enabled reports whether TLS to Redis is configured.
func (t RedisTLS) Enabled() bool { return t.CAFile != "" || t.CertFile != "" || t.KeyFile != "" }

// DefaultKeyPrefix starts every Redis key when key_prefix is not set.
const DefaultKeyPrefix = "tokenbroker:"

// Credential is one OAuth 2.0 client registration at an authorization server.
type Credential struct {
	// Name is what callers ask for (e.g. "identity").
	Name string `yaml:"name"`
	// TokenURL is the token endpoint: https, or http to a loopback address.
	TokenURL string `yaml:"token_url"`
	// ClientID is the client identifier.
	ClientID string `yaml:"client_id"`
	// ClientSecretFile is the path of the file holding the client secret.
	ClientSecretFile string `yaml:"client_secret_file"`
	// ClientSecretFiles replaces ClientSecretFile during a rotation: [new, old],
	// tried in order, the next only when the server answers invalid_client.
	ClientSecretFiles []string `yaml:"client_secret_files"`
	// AuthMethod is client_secret_basic (default), client_secret_post or private_key_jwt.
	AuthMethod string `yaml:"auth_method"`
	// PrivateKeyFile is the PEM key that signs private_key_jwt assertions.
	PrivateKeyFile string `yaml:"private_key_file"`
	// JWTAlg is RS256, PS256 or ES256; empty picks by key type.
	JWTAlg string `yaml:"jwt_alg"`
	// KeyID is the assertions' kid header, if the bank wants one.
	KeyID string `yaml:"key_id"`
	// JWTAudience is the assertions' aud; empty means token_url.
	JWTAudience string `yaml:"jwt_audience"`
	// TLSClientCertFile and TLSClientKeyFile are the client certificate for tls_client_auth.
	TLSClientCertFile string `yaml:"tls_client_cert_file"`
	TLSClientKeyFile  string `yaml:"tls_client_key_file"`
	// TLSCAFile holds the CAs the token endpoint's certificate must chain to; empty means the system roots.
	TLSCAFile string `yaml:"tls_ca_file"`
	// Scopes are the scopes requested by default and the most a caller may ask for.
	Scopes []string `yaml:"scopes"`
	// EndpointParams are extra form fields for the token request (audience, resource).
	EndpointParams map[string]string `yaml:"endpoint_params"`
	// DefaultTTL is the lifetime assumed when the response has no expires_in.
	DefaultTTL Duration `yaml:"default_ttl"`
	// MaxTTL caps the lifetime a response declares.
	MaxTTL Duration `yaml:"max_ttl"`
	// MinTTL is the min_ttl applied when a caller sends none.
	MinTTL Duration `yaml:"min_ttl"`
	// Timeout bounds one request to the token endpoint.
	Timeout Duration `yaml:"timeout"`
	// RefreshAt is the fraction of a token's lifetime after which a
	// replacement is fetched in the background (jittered by ±0.1). Unset
	// (0): late, shortly before the token nears min_ttl, so that the bank
	// sees about one request per lifetime (see broker.Credential.RefreshAt).
	RefreshAt float64 `yaml:"refresh_at"`
	// IdleTimeout stops refreshing a token nobody asked for in this long.
	IdleTimeout Duration `yaml:"idle_timeout"`
	// ExpiryMargin is taken off every granted lifetime (at most half of it)
	// against clock skew and transit time.
	ExpiryMargin Duration `yaml:"expiry_margin"`
	// AllowedCallers are the callers admitted; none means nobody.
	AllowedCallers []AllowedCaller `yaml:"allowed_callers"`
	// DPoP, when set, makes the credential's tokens sender-constrained
	// (RFC 9449): bound to a key the broker holds, usable only with a proof
	// the broker signs for each request.
	DPoP *DPoP `yaml:"dpop"`

	// DefinedIn is the credentials_dir file the credential comes from, as
	// credentials_dir names it ("" for the main file); Index is its place
	// in that file's list.
	DefinedIn string `yaml:"-"`
	Index     int    `yaml:"-"`
}

// Key is the credential's place in the configuration, as validation errors
// name it: "credentials[2]", or "teams/kyc.yaml: credentials[2]" for one
// from credentials_dir.
func (cr *Credential) Key() string {
	if cr.DefinedIn == "" {
		return fmt.Sprintf("credentials[%d]", cr.Index)
	}
	return fmt.Sprintf("%s: credentials[%d]", cr.DefinedIn, cr.Index)
}

// AllowedCaller admits the callers Caller matches, to Scopes (all of the
// credential's scopes when empty). In YAML it is either the pattern alone or
// a mapping {caller: pattern, scopes: [...]}.
type AllowedCaller struct {
	Caller string   `yaml:"caller" json:"caller"`
	Scopes []string `yaml:"scopes" json:"scopes,omitempty"`
	// URLs, for a DPoP credential, are the API URL prefixes (scheme, host,
	// path prefix on a segment boundary) the caller may get proofs for;
	// none means any.
	URLs []string `yaml:"urls" json:"urls,omitempty"`
}

// DPoP is a credential's DPoP key (RFC 9449).
type DPoP struct {
	// KeyFile is a PEM private key: EC P-256, Ed25519 or RSA of at least
	// 2048 bits. It is read at each token request, like a secret file.
	KeyFile string `yaml:"key_file" json:"-"`
	// Alg is ES256 (EC P-256), EdDSA (Ed25519), RS256 or PS256 (RSA);
	// empty picks ES256, EdDSA or RS256 by key type.
	Alg string `yaml:"alg" json:"alg,omitempty"`
}

// UnmarshalYAML accepts a bare pattern or a mapping.
func (a *AllowedCaller) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		a.Caller, a.Scopes, a.URLs = n.Value, nil, nil
		return nil
	}
	type plain AllowedCaller
	return n.Decode((*plain)(a))
}

// MarshalYAML writes a bare pattern when there is no scope restriction.
func (a AllowedCaller) MarshalYAML() (any, error) {
	if len(a.Scopes) == 0 && len(a.URLs) == 0 {
		return a.Caller, nil
	}
	type plain AllowedCaller
	return plain(a), nil
}

// Duration is a time.Duration written with a unit ("30s", "5m"). A bare
// number is rejected: it is too easy to mean seconds and get nanoseconds.
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// UnmarshalYAML parses a duration string.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode || n.Tag == "!!int" || n.Tag == "!!float" {
		return fmt.Errorf("want a duration with a unit, like 30s or 5m")
	}
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("want a duration with a unit, like 30s or 5m")
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes the duration as a string.
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// Defaults for keys that are left out.
const (
	DefaultListenAddr = "0.0.0.0:8443"
	DefaultAdminAddr  = "127.0.0.1:9090"
	DefaultTTL        = 5 * time.Minute
	DefaultMaxTTL     = 24 * time.Hour
	DefaultMinTTL     = 30 * time.Second
	DefaultTimeout    = 10 * time.Second
	DefaultIdle       = 30 * time.Minute
	DefaultMargin     = 10 * time.Second
	DefaultRate       = 200 // calls per second per caller
	// DefaultMaxConnectionAge and DefaultMaxConnectionAgeGrace bound how long
	// a caller's connection lives (tls.max_connection_age, …_grace).
	DefaultMaxConnectionAge      = time.Hour
	DefaultMaxConnectionAgeGrace = 30 * time.Second
)

// Load reads and parses the file at path, and the files of its
// credentials_dir.
func Load(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return parse(b, filepath.Dir(path))
}

// Parse parses and validates a configuration document; a relative
// credentials_dir is taken from the working directory.
func Parse(b []byte) (*Config, error) {
	return parse(b, ".")
}

func parse(b []byte, base string) (*Config, error) {
	if len(b) > maxFileBytes {
		return nil, errors.New("config: larger than 1 MiB")
	}
	var root yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&root); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("config: empty document")
		}
		return nil, fmt.Errorf("config: %w", err)
	}
	if err := checkKeys(&root, typeOfConfig, ""); err != nil {
		return nil, err
	}
	var c Config
	if err := root.Decode(&c); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	for i := range c.Credentials {
		c.Credentials[i].Index = i
	}
	if c.CredentialsDir != "" {
		c.credentialsDirPath = resolveDir(base, c.CredentialsDir)
		more, err := loadDir(c.credentialsDirPath, c.CredentialsDir)
		if err != nil {
			return nil, err
		}
		c.Credentials = append(c.Credentials, more...)
	}
	for i := range c.Credentials {
		c.Credentials[i].intern()
	}
	c.applyDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// intern replaces the strings that credentials tend to share (token URL,
// auth method, file paths, scopes, caller patterns) with one canonical copy
// each: with ten thousand credentials from the same bank, each repeated
// string parsed anew was a tenth of the broker's heap. An empty
// endpoint_params ({}, as a YAML encoder writes none) becomes nil: an empty
// map each is 48 bytes for nothing.
func (cr *Credential) intern() {
	if len(cr.EndpointParams) == 0 {
		cr.EndpointParams = nil
	}
	in := func(s *string) {
		if *s != "" {
			*s = unique.Make(*s).Value()
		}
	}
	for _, s := range []*string{&cr.TokenURL, &cr.ClientID, &cr.ClientSecretFile, &cr.AuthMethod, &cr.PrivateKeyFile,
		&cr.JWTAlg, &cr.KeyID, &cr.JWTAudience, &cr.TLSClientCertFile, &cr.TLSClientKeyFile, &cr.TLSCAFile} {
		in(s)
	}
	for i := range cr.ClientSecretFiles {
		in(&cr.ClientSecretFiles[i])
	}
	for i := range cr.Scopes {
		in(&cr.Scopes[i])
	}
	for i := range cr.AllowedCallers {
		a := &cr.AllowedCallers[i]
		in(&a.Caller)
		for j := range a.Scopes {
			in(&a.Scopes[j])
		}
	}
	if cr.DPoP != nil {
		in(&cr.DPoP.KeyFile)
		in(&cr.DPoP.Alg)
	}
}

// resolveDir is credentials_dir dir of a configuration file in directory base.
func resolveDir(base, dir string) string {
	if filepath.IsAbs(dir) {
		return dir
	}
	return filepath.Join(base, dir)
}

// CredentialsDirOf returns the credentials_dir that the configuration file
// at path, holding data, names, resolved, or "" when it names none or does
// not parse. (Watching the files needs it without loading them.)
func CredentialsDirOf(path string, data []byte) string {
	var top struct {
		Dir string `yaml:"credentials_dir"`
	}
	if yaml.Unmarshal(data, &top) != nil || top.Dir == "" {
		return ""
	}
	return resolveDir(filepath.Dir(path), top.Dir)
}

// CredentialFiles lists the names of the files of a credentials_dir that
// are read: every *.yaml whose name does not start with a dot (Kubernetes
// keeps its ConfigMap bookkeeping there), in name order.
func CredentialFiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if name := e.Name(); !strings.HasPrefix(name, ".") && strings.HasSuffix(name, ".yaml") {
			out = append(out, name)
		}
	}
	return out, nil
}

// loadDir reads the credentials of the CredentialFiles of dir. shown is dir
// as the configuration names it, for errors.
func loadDir(dir, shown string) ([]Credential, error) {
	names, err := CredentialFiles(dir)
	if err != nil {
		return nil, fieldErr("credentials_dir", "%v", err)
	}
	var out []Credential
	for _, name := range names {
		where := filepath.Join(shown, name)
		b, err := os.ReadFile(filepath.Join(dir, name)) // follows the symlinks of a ConfigMap mount
		if err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		list, err := parseCredentials(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		for i := range list {
			list[i].DefinedIn, list[i].Index = where, i
		}
		out = append(out, list...)
	}
	return out, nil
}

// parseCredentials parses one credentials_dir file: a list of credentials.
func parseCredentials(b []byte) ([]Credential, error) {
	if len(b) > maxFileBytes {
		return nil, errors.New("larger than 1 MiB")
	}
	var root yaml.Node
	if err := yaml.Unmarshal(b, &root); err != nil {
		return nil, err
	}
	if len(root.Content) == 0 {
		return nil, nil // an empty file: no credentials
	}
	if err := checkKeys(&root, reflect.TypeFor[[]Credential](), "credentials"); err != nil {
		return nil, err
	}
	var list []Credential
	if err := root.Decode(&list); err != nil {
		return nil, err
	}
	return list, nil
}

func (c *Config) applyDefaults() {
	if c.ListenAddr == "" {
		c.ListenAddr = DefaultListenAddr
	}
	if c.AdminAddr == "" {
		c.AdminAddr = DefaultAdminAddr
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	if c.RateLimit == nil {
		c.RateLimit = &RateLimit{RequestsPerSecond: DefaultRate, Burst: 2 * DefaultRate}
	}
	if c.TLS.MinVersion == "" {
		c.TLS.MinVersion = "1.3"
	}
	if c.TLS.SPIFFE == nil { // with it, the server derives the default from its SVID
		setDefault(&c.TLS.MaxConnectionAge, DefaultMaxConnectionAge)
	}
	setDefault(&c.TLS.MaxConnectionAgeGrace, DefaultMaxConnectionAgeGrace)
	if c.Audit.Path == "" {
		c.Audit.Path = "stdout"
	}
	if c.Store.Backend == "" {
		c.Store.Backend = "memory"
	}
	c.Retry.applyDefaults()
	if c.Store.Redis.KeyPrefix == "" {
		c.Store.Redis.KeyPrefix = DefaultKeyPrefix
	}
	for i := range c.Credentials {
		cr := &c.Credentials[i]
		if cr.AuthMethod == "" {
			cr.AuthMethod = "client_secret_basic"
		}
		setDefault(&cr.DefaultTTL, DefaultTTL)
		setDefault(&cr.MaxTTL, DefaultMaxTTL)
		setDefault(&cr.MinTTL, DefaultMinTTL)
		setDefault(&cr.Timeout, DefaultTimeout)
		setDefault(&cr.IdleTimeout, DefaultIdle)
		setDefault(&cr.ExpiryMargin, DefaultMargin)
	}
}

func setDefault(d *Duration, v time.Duration) {
	if *d == 0 {
		*d = Duration(v)
	}
}

// FieldError is a validation error for one key.
type FieldError struct {
	// Key is the key's path, e.g. "credentials[0].token_url".
	Key string
	// Msg says what is wrong and what is allowed.
	Msg string
}

func (e *FieldError) Error() string { return e.Key + ": " + e.Msg }

func fieldErr(key, format string, args ...any) error {
	return &FieldError{Key: key, Msg: fmt.Sprintf(format, args...)}
}

// Validate checks every key and returns the first error, naming its key.
func (c *Config) Validate() error {
	if err := checkHostPort("listen_addr", c.ListenAddr); err != nil {
		return err
	}
	if err := checkHostPort("admin_addr", c.AdminAddr); err != nil {
		return err
	}
	if err := c.TLS.validate(); err != nil {
		return err
	}
	if err := c.AdminTLS.validate(); err != nil {
		return err
	}
	for i, p := range c.Admin.Callers {
		if err := policy.CheckPattern(p); err != nil {
			return fieldErr(fmt.Sprintf("admin.callers[%d]", i), "%v", err)
		}
	}
	if rl := c.RateLimit; rl != nil && (rl.RequestsPerSecond < 0 || rl.Burst < 0 || rl.RequestsPerSecond > 0 && rl.Burst < 1) {
		return fieldErr("rate_limit", "requests_per_second must be 0 (off) or positive, with a burst of at least 1")
	}
	if rl := c.RateLimit; rl != nil && rl.WatchStreams < 0 {
		return fieldErr("rate_limit.watch_streams", "must be 0 (the default, 1000) or positive")
	}
	if err := c.Limits.validate(); err != nil {
		return err
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return fieldErr("log.level", "must be one of debug, info, warn, error; got %q", c.Log.Level)
	}
	if err := c.Store.validate(); err != nil {
		return err
	}
	if err := c.Retry.validate(); err != nil {
		return err
	}
	if len(c.Credentials) == 0 {
		return fieldErr("credentials", "at least one credential is required (in credentials or credentials_dir)")
	}
	seen := make(map[string]*Credential, len(c.Credentials))
	for i := range c.Credentials {
		cr := &c.Credentials[i]
		if err := cr.validate(cr.Key()); err != nil {
			return err
		}
		if first := seen[cr.Name]; first != nil {
			if first.DefinedIn == cr.DefinedIn && cr.DefinedIn == "" {
				return fieldErr(cr.Key()+".name", "%q is used by an earlier credential", cr.Name)
			}
			other := first.DefinedIn // another file
			switch first.DefinedIn {
			case "":
				other = "the main configuration (" + first.Key() + ")"
			case cr.DefinedIn:
				other = first.Key()
			}
			return fieldErr(cr.Key()+".name", "%q is also defined in %s", cr.Name, other)
		}
		seen[cr.Name] = cr
	}
	return nil
}

func (s *Store) validate() error {
	switch s.Backend {
	case "memory":
		return nil
	case "redis":
	default:
		return fieldErr("store.backend", "must be memory or redis; got %q", s.Backend)
	}
	if s.EncryptionKeyFile == "" {
		return fieldErr("store.encryption_key_file", "required when store.backend is redis (a file holding 32 random bytes, raw or base64)")
	}
	for i, f := range s.PreviousEncryptionKeyFiles {
		if f == "" {
			return fieldErr(fmt.Sprintf("store.previous_encryption_key_files[%d]", i), "must be a file path")
		}
	}
	r := s.Redis
	if len(r.Addrs) == 0 {
		return fieldErr("store.redis.addrs", "at least one host:port is required when store.backend is redis")
	}
	for i, a := range r.Addrs {
		if err := checkHostPort(fmt.Sprintf("store.redis.addrs[%d]", i), a); err != nil {
			return err
		}
	}
	if r.DB < 0 {
		return fieldErr("store.redis.db", "must not be negative")
	}
	if r.DB != 0 && len(r.Addrs) > 1 && r.MasterName == "" {
		return fieldErr("store.redis.db", "must be 0 for a Redis Cluster (several addrs without master_name)")
	}
	if (r.TLS.CertFile == "") != (r.TLS.KeyFile == "") {
		return fieldErr("store.redis.tls", "cert_file and key_file go together")
	}
	if p := r.ProbeInterval.D(); p != 0 && (p < 100*time.Millisecond || p > time.Minute) {
		return fieldErr("store.redis.probe_interval", "must be between 100ms and 1m (default 2s); got %s", p)
	}
	return nil
}

// reservedParams are form fields the broker sets itself.
var reservedParams = map[string]bool{
	"grant_type": true, "scope": true, "client_id": true, "client_secret": true,
	"client_assertion": true, "client_assertion_type": true,
}

func (cr *Credential) validate(p string) error {
	switch {
	case cr.Name == "":
		return fieldErr(p+".name", "required")
	case !ValidName(cr.Name):
		return fieldErr(p+".name", "must be 1 to %d characters of A-Z a-z 0-9 . _ -", MaxNameLen)
	}
	if err := checkTokenURL(p+".token_url", cr.TokenURL); err != nil {
		return err
	}
	if cr.ClientID == "" {
		return fieldErr(p+".client_id", "required")
	}
	switch cr.AuthMethod {
	case "client_secret_basic", "client_secret_post":
		switch {
		case cr.ClientSecretFile == "" && len(cr.ClientSecretFiles) == 0:
			return fieldErr(p+".client_secret_file", "required for %s (the path of a file holding the secret)", cr.AuthMethod)
		case cr.ClientSecretFile != "" && len(cr.ClientSecretFiles) > 0:
			return fieldErr(p+".client_secret_files", "use either client_secret_file or client_secret_files, not both")
		case len(cr.ClientSecretFiles) > 3:
			return fieldErr(p+".client_secret_files", "at most 3 files (new, old)")
		case cr.PrivateKeyFile != "":
			return fieldErr(p+".private_key_file", "only for auth_method private_key_jwt")
		}
		for j, f := range cr.ClientSecretFiles {
			if f == "" {
				return fieldErr(fmt.Sprintf("%s.client_secret_files[%d]", p, j), "must be a file path")
			}
		}
	case "private_key_jwt":
		switch {
		case cr.PrivateKeyFile == "":
			return fieldErr(p+".private_key_file", "required for private_key_jwt (a PEM RSA or P-256 key)")
		case cr.ClientSecretFile != "" || len(cr.ClientSecretFiles) > 0:
			return fieldErr(p+".client_secret_file", "not used with private_key_jwt; remove it")
		}
		switch cr.JWTAlg {
		case "", "RS256", "PS256", "ES256":
		default:
			return fieldErr(p+".jwt_alg", "must be RS256, PS256 or ES256; got %q", cr.JWTAlg)
		}
	case "tls_client_auth":
		switch {
		case cr.TLSClientCertFile == "" || cr.TLSClientKeyFile == "":
			return fieldErr(p+".tls_client_cert_file", "tls_client_cert_file and tls_client_key_file are required for tls_client_auth")
		case cr.ClientSecretFile != "" || len(cr.ClientSecretFiles) > 0 || cr.PrivateKeyFile != "":
			return fieldErr(p+".auth_method", "tls_client_auth uses no secret or private_key_file; remove them")
		case !strings.HasPrefix(cr.TokenURL, "https://"):
			return fieldErr(p+".token_url", "must be https for tls_client_auth")
		}
	default:
		return fieldErr(p+".auth_method", "must be client_secret_basic, client_secret_post, private_key_jwt or tls_client_auth; got %q", cr.AuthMethod)
	}
	if cr.AuthMethod != "tls_client_auth" && (cr.TLSClientCertFile != "" || cr.TLSClientKeyFile != "") {
		return fieldErr(p+".tls_client_cert_file", "only for auth_method tls_client_auth")
	}
	if len(cr.Scopes) > MaxScopes {
		return fieldErr(p+".scopes", "at most %d scopes", MaxScopes)
	}
	seen := map[string]bool{}
	for j, s := range cr.Scopes {
		if s == "" || len(s) > MaxScopeLen || strings.ContainsAny(s, " \t\r\n\"\\") {
			return fieldErr(fmt.Sprintf("%s.scopes[%d]", p, j), "must be 1 to %d characters without spaces, quotes or backslashes", MaxScopeLen)
		}
		if seen[s] {
			return fieldErr(fmt.Sprintf("%s.scopes[%d]", p, j), "%q is listed twice", s)
		}
		seen[s] = true
	}
	for k := range cr.EndpointParams {
		if reservedParams[k] || k == "" {
			return fieldErr(p+".endpoint_params", "%q is set by the broker and cannot be overridden", k)
		}
	}
	if cr.DefaultTTL <= 0 {
		return fieldErr(p+".default_ttl", "must be positive")
	}
	if cr.MaxTTL < cr.DefaultTTL {
		return fieldErr(p+".max_ttl", "must be at least default_ttl (%s)", cr.DefaultTTL.D())
	}
	if cr.MinTTL < 0 || cr.MinTTL.D() > MaxMinTTL || cr.MinTTL >= cr.MaxTTL {
		return fieldErr(p+".min_ttl", "must be between 0s and max_ttl (%s), at most 24h", cr.MaxTTL.D())
	}
	if cr.Timeout <= 0 || cr.Timeout.D() > 5*time.Minute {
		return fieldErr(p+".timeout", "must be between 1ms and 5m")
	}
	if cr.RefreshAt != 0 && !(cr.RefreshAt >= 0.2 && cr.RefreshAt <= 0.85) {
		return fieldErr(p+".refresh_at", "must be a fraction of the token lifetime between 0.2 and 0.85")
	}
	if cr.IdleTimeout <= 0 {
		return fieldErr(p+".idle_timeout", "must be positive")
	}
	if cr.ExpiryMargin < 0 || cr.ExpiryMargin.D() > 5*time.Minute {
		return fieldErr(p+".expiry_margin", "must be between 0s and 5m")
	}
	for j, a := range cr.AllowedCallers {
		key := fmt.Sprintf("%s.allowed_callers[%d]", p, j)
		if err := policy.CheckPattern(a.Caller); err != nil {
			return fieldErr(key, "%v", err)
		}
		for k, sc := range a.Scopes {
			if !seen[sc] {
				return fieldErr(fmt.Sprintf("%s.scopes[%d]", key, k), "%q is not one of the credential's scopes", sc)
			}
		}
		if len(a.URLs) > 0 && cr.DPoP == nil {
			return fieldErr(key+".urls", "only for a credential with dpop: (proofs are what URLs limit)")
		}
		for k, u := range a.URLs {
			if _, err := policy.ParseURLPrefix(u); err != nil {
				return fieldErr(fmt.Sprintf("%s.urls[%d]", key, k), "%v", err)
			}
		}
	}
	return cr.validateDPoP(p)
}

// validateDPoP checks the dpop: mapping. The key itself is checked when the
// server starts (CheckFiles only opens files).
func (cr *Credential) validateDPoP(p string) error {
	if cr.DPoP == nil {
		return nil
	}
	if cr.DPoP.KeyFile == "" {
		return fieldErr(p+".dpop.key_file", "required (a PEM EC P-256, Ed25519 or RSA private key)")
	}
	switch cr.DPoP.Alg {
	case "", "ES256", "EdDSA", "RS256", "PS256":
		return nil
	}
	return fieldErr(p+".dpop.alg", "must be ES256 (EC P-256), EdDSA (Ed25519), RS256 or PS256 (RSA); got %q", cr.DPoP.Alg)
}

func (t *TLS) validate() error {
	if t.SPIFFE != nil {
		if err := t.validateSPIFFE(); err != nil {
			return err
		}
		return t.validateCommon()
	}
	for key, v := range map[string]string{"tls.cert_file": t.CertFile, "tls.key_file": t.KeyFile} {
		if v == "" {
			return fieldErr(key, "required")
		}
	}
	if t.ClientCAFile == "" && len(t.ClientTrustBundles) == 0 {
		return fieldErr("tls.client_ca_file", "required unless tls.client_trust_bundles is set")
	}
	seen := map[string]bool{}
	for i, b := range t.ClientTrustBundles {
		key := fmt.Sprintf("tls.client_trust_bundles[%d]", i)
		if _, err := spiffeid.TrustDomainFromString(b.TrustDomain); err != nil || strings.Contains(b.TrustDomain, ":") {
			return fieldErr(key+".trust_domain", "want a trust domain name of a-z 0-9 . _ - (like bank.internal, no spiffe://); got %q", b.TrustDomain)
		}
		if seen[b.TrustDomain] {
			return fieldErr(key+".trust_domain", "%q is listed twice", b.TrustDomain)
		}
		seen[b.TrustDomain] = true
		if b.CAFile == "" {
			return fieldErr(key+".ca_file", "required")
		}
	}
	return t.validateCommon()
}

// validateSPIFFE checks tls.spiffe, which excludes the files.
func (t *TLS) validateSPIFFE() error {
	for _, f := range []struct {
		key string
		set bool
	}{{"tls.cert_file", t.CertFile != ""}, {"tls.key_file", t.KeyFile != ""},
		{"tls.client_ca_file", t.ClientCAFile != ""}, {"tls.client_trust_bundles", len(t.ClientTrustBundles) > 0}} {
		if f.set {
			return fieldErr(f.key, "not allowed with tls.spiffe, which takes the certificate and the trust bundles from the Workload API; use one or the other")
		}
	}
	addr := t.SPIFFE.Address()
	if addr == "" {
		return fieldErr("tls.spiffe.workload_api", "required unless %s is set (e.g. unix:///run/spire/agent-sockets/spire-agent.sock)", SPIFFESocketEnv)
	}
	if err := checkWorkloadAPIAddr(addr); err != nil {
		key := "tls.spiffe.workload_api"
		if t.SPIFFE.WorkloadAPI == "" {
			key += " (from " + SPIFFESocketEnv + ")"
		}
		return fieldErr(key, "%v; want unix:///path or tcp://ip:port, got %q", err, addr)
	}
	if t.SPIFFE.ID != "" {
		if _, err := spiffeid.FromString(t.SPIFFE.ID); err != nil {
			return fieldErr("tls.spiffe.id", "want a SPIFFE ID such as spiffe://bank.internal/ns/tokenbroker/sa/tokenbroker: %v", err)
		}
	}
	return nil
}

// validateCommon checks the keys that files and tls.spiffe share.
func (t *TLS) validateCommon() error {
	if t.MinVersion != "1.3" && t.MinVersion != "1.2" {
		return fieldErr("tls.min_version", "must be \"1.3\" or \"1.2\"; got %q", t.MinVersion)
	}
	if t.MaxConnectionAge != 0 && t.MaxConnectionAge.D() < time.Second {
		return fieldErr("tls.max_connection_age", "must be at least 1s")
	}
	if t.MaxConnectionAgeGrace.D() < 0 {
		return fieldErr("tls.max_connection_age_grace", "must not be negative")
	}
	return nil
}

func checkHostPort(key, v string) error {
	if _, _, err := net.SplitHostPort(v); err != nil {
		return fieldErr(key, "must be host:port; got %q", v)
	}
	return nil
}

func checkTokenURL(key, v string) error {
	const want = "must be https (or http to a loopback address)"
	if v == "" {
		return fieldErr(key, "required")
	}
	u, err := url.Parse(v)
	if err != nil || u.Host == "" {
		return fieldErr(key, "%s: not an absolute URL", want)
	}
	if u.User != nil {
		return fieldErr(key, "must not contain user information (credentials belong in files)")
	}
	if u.Fragment != "" {
		return fieldErr(key, "must not contain a fragment")
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if isLoopback(u.Hostname()) {
			return nil
		}
	}
	return fieldErr(key, want)
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// CheckFiles verifies that every file the configuration names can be read,
// without keeping or printing what they hold.
func (c *Config) CheckFiles() error {
	check := func(key, path string) error {
		f, err := os.Open(path)
		if err != nil {
			return fieldErr(key, "%v", err)
		}
		return f.Close()
	}
	if c.TLS.SPIFFE == nil {
		if err := check("tls.cert_file", c.TLS.CertFile); err != nil {
			return err
		}
		if err := check("tls.key_file", c.TLS.KeyFile); err != nil {
			return err
		}
	}
	if c.TLS.ClientCAFile != "" {
		if err := check("tls.client_ca_file", c.TLS.ClientCAFile); err != nil {
			return err
		}
	}
	for i, b := range c.TLS.ClientTrustBundles {
		if err := check(fmt.Sprintf("tls.client_trust_bundles[%d].ca_file", i), b.CAFile); err != nil {
			return err
		}
	}
	for _, f := range [][2]string{{"admin_tls.cert_file", c.AdminTLS.CertFile}, {"admin_tls.key_file", c.AdminTLS.KeyFile},
		{"admin_tls.client_ca_file", c.AdminTLS.ClientCAFile}} {
		if f[1] != "" {
			if err := check(f[0], f[1]); err != nil {
				return err
			}
		}
	}
	if c.Store.Backend == "redis" {
		files := map[string]string{
			"store.encryption_key_file": c.Store.EncryptionKeyFile,
			"store.redis.password_file": c.Store.Redis.PasswordFile,
			"store.redis.tls.ca_file":   c.Store.Redis.TLS.CAFile,
			"store.redis.tls.cert_file": c.Store.Redis.TLS.CertFile,
			"store.redis.tls.key_file":  c.Store.Redis.TLS.KeyFile,
		}
		for i, f := range c.Store.PreviousEncryptionKeyFiles {
			files[fmt.Sprintf("store.previous_encryption_key_files[%d]", i)] = f
		}
		for key, path := range files {
			if path == "" {
				continue
			}
			if err := check(key, path); err != nil {
				return err
			}
		}
	}
	for _, cr := range c.Credentials {
		if cr.ClientSecretFile != "" {
			if err := check(cr.Key()+".client_secret_file", cr.ClientSecretFile); err != nil {
				return err
			}
		}
		for j, f := range cr.ClientSecretFiles {
			if err := check(fmt.Sprintf("%s.client_secret_files[%d]", cr.Key(), j), f); err != nil {
				return err
			}
		}
		files := map[string]string{"private_key_file": cr.PrivateKeyFile, "tls_client_cert_file": cr.TLSClientCertFile,
			"tls_client_key_file": cr.TLSClientKeyFile, "tls_ca_file": cr.TLSCAFile}
		if cr.DPoP != nil {
			files["dpop.key_file"] = cr.DPoP.KeyFile
		}
		for key, path := range files {
			if path == "" {
				continue
			}
			if err := check(cr.Key()+"."+key, path); err != nil {
				return err
			}
		}
		if cr.DPoP != nil { // a key that does not fit alg fails here, not at the first token request
			if _, err := dpop.LoadKey(cr.DPoP.KeyFile, cr.DPoP.Alg); err != nil {
				return fieldErr(cr.Key()+".dpop.key_file", "%v", err)
			}
		}
	}
	return nil
}
