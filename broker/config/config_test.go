package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const valid = `
listen_addr: 127.0.0.1:8443
tls:
  cert_file: /tls/tls.crt
  key_file: /tls/tls.key
  client_ca_file: /tls/ca.crt
credentials:
  - name: identity
    token_url: https://auth.bank.example/oauth2/token
    client_id: my-app
    client_secret_file: /secrets/identity
    scopes: [IDENTITY]
    allowed_callers: [spiffe://bank.internal/ns/kyc/*]
`

func TestParseValid(t *testing.T) {
	c, err := Parse([]byte(valid))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	cr := c.Credentials[0]
	if c.AdminAddr != DefaultAdminAddr || c.Log.Level != "info" || c.Store.Backend != "memory" {
		t.Errorf("top-level defaults not applied: %+v", c)
	}
	if cr.AuthMethod != "client_secret_basic" || cr.DefaultTTL.D() != DefaultTTL || cr.MaxTTL.D() != DefaultMaxTTL ||
		cr.MinTTL.D() != DefaultMinTTL || cr.Timeout.D() != DefaultTimeout || cr.RefreshAt != 0 || cr.IdleTimeout.D() != DefaultIdle {
		t.Errorf("credential defaults not applied: %+v", cr)
	}
	if c.RateLimit == nil || c.RateLimit.RequestsPerSecond != DefaultRate || c.RateLimit.Burst != 2*DefaultRate {
		t.Errorf("rate_limit default = %+v", c.RateLimit)
	}
	off, err := Parse([]byte(valid + "rate_limit: {requests_per_second: 0}\n"))
	if err != nil || off.RateLimit.RequestsPerSecond != 0 {
		t.Errorf("rate_limit explicitly off = %+v, %v; want 0", off.RateLimit, err)
	}
	c2, err := Parse([]byte(valid + "    default_ttl: 90s\n    min_ttl: 1m\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := c2.Credentials[0].DefaultTTL.D(); got != 90*time.Second {
		t.Errorf("default_ttl = %v, want 90s", got)
	}
}

func TestAllowedCallerForms(t *testing.T) {
	c, err := Parse([]byte(strings.Replace(valid, "[spiffe://bank.internal/ns/kyc/*]",
		"[spiffe://bank.internal/ns/payments/sa/api, {caller: spiffe://bank.internal/ns/kyc/*, scopes: [IDENTITY]}]", 1)))
	if err != nil {
		t.Fatal(err)
	}
	got := c.Credentials[0].AllowedCallers
	if len(got) != 2 || got[0].Caller != "spiffe://bank.internal/ns/payments/sa/api" || got[0].Scopes != nil ||
		got[1].Caller != "spiffe://bank.internal/ns/kyc/*" || strings.Join(got[1].Scopes, " ") != "IDENTITY" {
		t.Errorf("allowed_callers = %+v", got)
	}
}

func TestParseRedis(t *testing.T) {
	c, err := Parse([]byte(valid + `
store:
  backend: redis
  encryption_key_file: /k/current
  previous_encryption_key_files: [/k/old]
  redis:
    addrs: [s1:26379, s2:26379, s3:26379]
    master_name: tokenbroker
    username: broker
    password_file: /k/redis-password
    db: 3
    tls: {ca_file: /k/ca.pem}
    probe_interval: 500ms
`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	r := c.Store.Redis
	if c.Store.Backend != "redis" || r.KeyPrefix != DefaultKeyPrefix || r.DB != 3 || r.MasterName != "tokenbroker" ||
		len(r.Addrs) != 3 || !r.TLS.Enabled() || c.Store.PreviousEncryptionKeyFiles[0] != "/k/old" || r.ProbeInterval.D() != 500*time.Millisecond {
		t.Errorf("store = %+v", c.Store)
	}
	// The store's files are checked too, by key.
	dir := t.TempDir()
	touch := func(p *string) {
		*p = filepath.Join(dir, strings.ReplaceAll(*p, "/", "_"))
		if err := os.WriteFile(*p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []*string{&c.TLS.CertFile, &c.TLS.KeyFile, &c.TLS.ClientCAFile, &c.Credentials[0].ClientSecretFile} {
		touch(p)
	}
	if err := c.CheckFiles(); err == nil || !strings.HasPrefix(err.Error(), "store.") {
		t.Errorf("CheckFiles with the store files missing = %v, want an error naming a store key", err)
	}
	for _, p := range []*string{&c.Store.EncryptionKeyFile, &c.Store.PreviousEncryptionKeyFiles[0], &c.Store.Redis.PasswordFile, &c.Store.Redis.TLS.CAFile} {
		touch(p)
	}
	if err := c.CheckFiles(); err != nil {
		t.Errorf("CheckFiles with every file present = %v", err)
	}
}

func TestParseInvalid(t *testing.T) {
	// Each case edits the valid document and expects an error naming the key.
	tests := []struct {
		name string
		doc  string
		want string
	}{
		{"empty", "", "config: empty document"},
		{"unknown top key", valid + "listen: x\n", "listen: unknown key (line"},
		{"unknown nested key", strings.Replace(valid, "  cert_file:", "  certfile:", 1), "tls.certfile: unknown key"},
		{"unknown credential key", valid + "    tokn_url: x\n", "credentials[0].tokn_url: unknown key"},
		{"bad listen_addr", strings.Replace(valid, "127.0.0.1:8443", "8443", 1), "listen_addr: must be host:port"},
		{"no cert", strings.Replace(valid, "  cert_file: /tls/tls.crt\n", "", 1), "tls.cert_file: required"},
		{"bad log level", valid + "log: {level: loud}\n", "log.level: must be one of"},
		{"negative rate", valid + "rate_limit: {requests_per_second: -1}\n", "rate_limit: requests_per_second must be 0 (off) or positive"},
		{"negative watch streams", valid + "rate_limit: {requests_per_second: 1, burst: 1, watch_streams: -1}\n", "rate_limit.watch_streams: must be 0"},
		{"no client trust", strings.Replace(valid, "  client_ca_file: /tls/ca.crt\n", "", 1), "tls.client_ca_file: required unless tls.client_trust_bundles is set"},
		{"trust domain as an ID", strings.Replace(valid, "tls:\n", "tls:\n  client_trust_bundles: [{trust_domain: spiffe://bank.internal, ca_file: /b.pem}]\n", 1),
			"tls.client_trust_bundles[0].trust_domain: want a trust domain name"},
		{"uppercase trust domain", strings.Replace(valid, "tls:\n", "tls:\n  client_trust_bundles: [{trust_domain: Bank.internal, ca_file: /b.pem}]\n", 1),
			"tls.client_trust_bundles[0].trust_domain: want a trust domain name"},
		{"admin_tls key without cert", valid + "admin_tls: {key_file: /k.pem}\n", "admin_tls.key_file: admin_tls.cert_file and admin_tls.key_file go together"},
		{"admin_tls client CA without TLS", valid + "admin_tls: {client_ca_file: /ca.pem}\n", "admin_tls.client_ca_file: needs admin_tls.cert_file"},
		{"admin_tls unknown key", valid + "admin_tls: {ca_file: /ca.pem}\n", "admin_tls.ca_file: unknown key"},
		{"trust domain twice", strings.Replace(valid, "tls:\n", "tls:\n  client_trust_bundles: [{trust_domain: td, ca_file: /a.pem}, {trust_domain: td, ca_file: /b.pem}]\n", 1),
			`tls.client_trust_bundles[1].trust_domain: "td" is listed twice`},
		{"bundle without file", strings.Replace(valid, "tls:\n", "tls:\n  client_trust_bundles: [{trust_domain: td}]\n", 1), "tls.client_trust_bundles[0].ca_file: required"},
		{"short connection age", strings.Replace(valid, "tls:\n", "tls:\n  max_connection_age: 10ms\n", 1), "tls.max_connection_age: must be at least 1s"},
		{"bad admin caller", valid + "admin: {callers: [SPIFFE://bank.internal/ops]}\n", "admin.callers[0]:"},
		{"tls 1.1", strings.Replace(valid, "tls:\n", "tls:\n  min_version: \"1.1\"\n", 1), `tls.min_version: must be "1.3" or "1.2"`},
		{"unknown backend", valid + "store: {backend: etcd}\n", "store.backend: must be memory or redis"},
		{"redis without key", valid + "store: {backend: redis, redis: {addrs: [r:6379]}}\n", "store.encryption_key_file: required when store.backend is redis"},
		{"redis without addrs", valid + "store: {backend: redis, encryption_key_file: /k}\n", "store.redis.addrs: at least one"},
		{"redis bad addr", valid + "store: {backend: redis, encryption_key_file: /k, redis: {addrs: [redis]}}\n", "store.redis.addrs[0]: must be host:port"},
		{"cluster db", valid + "store: {backend: redis, encryption_key_file: /k, redis: {addrs: [a:1, b:1], db: 2}}\n", "store.redis.db: must be 0 for a Redis Cluster"},
		{"redis tls half", valid + "store: {backend: redis, encryption_key_file: /k, redis: {addrs: [a:1], tls: {cert_file: /c}}}\n", "store.redis.tls: cert_file and key_file go together"},
		{"redis probe", valid + "store: {backend: redis, encryption_key_file: /k, redis: {addrs: [a:1], probe_interval: 10ms}}\n", "store.redis.probe_interval: must be between 100ms and 1m"},
		{"redis unknown key", valid + "store: {backend: redis, redis: {adrs: [a:1]}}\n", "store.redis.adrs: unknown key"},
		{"no credentials", strings.Split(valid, "credentials:")[0], "credentials: at least one"},
		{"http token_url", strings.Replace(valid, "https://auth.bank.example", "http://auth.bank.example", 1),
			"credentials[0].token_url: must be https (or http to a loopback address)"},
		{"userinfo token_url", strings.Replace(valid, "https://auth", "https://u:p@auth", 1), "credentials[0].token_url: must not contain user information"},
		{"relative token_url", strings.Replace(valid, "https://auth.bank.example/oauth2/token", "/token", 1), "credentials[0].token_url: must be https"},
		{"no name", strings.Replace(valid, "name: identity", "name: ''", 1), "credentials[0].name: required"},
		{"bad name", strings.Replace(valid, "name: identity", "name: 'a b'", 1), "credentials[0].name: must be 1 to 128"},
		{"no client id", strings.Replace(valid, "client_id: my-app", "client_id: ''", 1), "credentials[0].client_id: required"},
		{"no secret file", strings.Replace(valid, "client_secret_file: /secrets/identity", "client_secret: hunter2", 1), "credentials[0].client_secret: unknown key"},
		{"both secret keys", valid + "    client_secret_files: [/a, /b]\n", "credentials[0].client_secret_files: use either client_secret_file or client_secret_files"},
		{"bad auth", valid + "    auth_method: magic\n", "credentials[0].auth_method: must be client_secret_basic, client_secret_post, private_key_jwt or tls_client_auth"},
		{"mtls without cert", strings.Replace(valid, "    client_secret_file: /secrets/identity\n", "", 1) + "    auth_method: tls_client_auth\n",
			"credentials[0].tls_client_cert_file: tls_client_cert_file and tls_client_key_file are required"},
		{"cert without mtls", valid + "    tls_client_cert_file: /c.pem\n", "credentials[0].tls_client_cert_file: only for auth_method tls_client_auth"},
		{"jwt without key", valid + "    auth_method: private_key_jwt\n", "credentials[0].private_key_file: required for private_key_jwt"},
		{"jwt with secret", valid + "    auth_method: private_key_jwt\n    private_key_file: /k.pem\n", "credentials[0].client_secret_file: not used with private_key_jwt"},
		{"jwt bad alg", strings.Replace(valid, "    client_secret_file: /secrets/identity\n", "", 1) + "    auth_method: private_key_jwt\n    private_key_file: /k.pem\n    jwt_alg: HS256\n", "credentials[0].jwt_alg: must be RS256, PS256 or ES256"},
		{"key with basic", valid + "    private_key_file: /k.pem\n", "credentials[0].private_key_file: only for auth_method private_key_jwt"},
		{"scope with space", strings.Replace(valid, "[IDENTITY]", "['A B']", 1), "credentials[0].scopes[0]: must be"},
		{"duplicate scope", strings.Replace(valid, "[IDENTITY]", "[A, A]", 1), "credentials[0].scopes[1]: \"A\" is listed twice"},
		{"scopes not a list", strings.Replace(valid, "[IDENTITY]", "IDENTITY", 1), "credentials[0].scopes: must be a list"},
		{"reserved param", valid + "    endpoint_params: {client_secret: x}\n", "credentials[0].endpoint_params: \"client_secret\" is set by the broker"},
		{"bare number ttl", valid + "    default_ttl: 300\n", "credentials[0].default_ttl: want a duration with a unit"},
		{"bad ttl", valid + "    default_ttl: soon\n", "credentials[0].default_ttl: want a duration with a unit"},
		{"max below default", valid + "    default_ttl: 1h\n    max_ttl: 5m\n", "credentials[0].max_ttl: must be at least default_ttl (1h0m0s)"},
		{"negative min_ttl", valid + "    min_ttl: -1s\n", "credentials[0].min_ttl: must be between 0s and max_ttl"},
		{"timeout too long", valid + "    timeout: 1h\n", "credentials[0].timeout: must be between 1ms and 5m"},
		{"refresh_at too late", valid + "    refresh_at: 0.95\n", "credentials[0].refresh_at: must be a fraction of the token lifetime between 0.2 and 0.85"},
		{"refresh_at percent", valid + "    refresh_at: 60\n", "credentials[0].refresh_at: must be a fraction"},
		{"idle_timeout negative", valid + "    idle_timeout: -1m\n", "credentials[0].idle_timeout: must be positive"},
		{"expiry_margin large", valid + "    expiry_margin: 1h\n", "credentials[0].expiry_margin: must be between 0s and 5m"},
		{"bad caller", strings.Replace(valid, "spiffe://bank.internal/ns/kyc/*", "spiffe://bank.internal/*/kyc", 1), "credentials[0].allowed_callers[0]:"},
		{"caller scope not on credential", strings.Replace(valid, "[spiffe://bank.internal/ns/kyc/*]", "[{caller: spiffe://bank.internal/ns/kyc/*, scopes: [ADMIN]}]", 1),
			`credentials[0].allowed_callers[0].scopes[0]: "ADMIN" is not one of the credential's scopes`},
		{"caller unknown key", strings.Replace(valid, "[spiffe://bank.internal/ns/kyc/*]", "[{caler: spiffe://bank.internal/ns/kyc/*}]", 1),
			"credentials[0].allowed_callers[0].caler: unknown key"},
		{"duplicate name", valid + strings.Split(valid, "credentials:\n")[1], "credentials[1].name: \"identity\" is used by an earlier credential"},
		{"not yaml", "listen_addr: [", "config: yaml:"},
		{"limits unknown key", valid + "limits: {handshakes: 10}\n", "limits.handshakes: unknown key"},
		{"limits negative", valid + "limits: {handshakes_per_source: -1}\n", "limits.handshakes_per_source: must be 0"},
		{"limits header size", valid + "limits: {max_header_list_size: 8}\n", "limits.max_header_list_size: must be 0"},
		{"limits per source over total", valid + "limits: {handshakes_in_progress: 10, handshakes_per_source: 20}\n",
			"limits.handshakes_per_source: must not exceed"},
		{"limits rate", valid + "limits: {stream_resets_per_second: -5}\n", "limits.stream_resets_per_second: must be 0"},
		{"limits duration", valid + "limits: {first_message_timeout: 10}\n", "limits.first_message_timeout:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.doc))
			if err == nil {
				t.Fatalf("Parse succeeded, want error containing %q", tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Parse error = %q, want it to contain %q", err, tt.want)
			}
		})
	}
}

func TestLimitsDefaults(t *testing.T) {
	c, err := Parse([]byte(valid + "limits: {streams_per_connection: 7}\n"))
	if err != nil {
		t.Fatal(err)
	}
	got := c.Limits.WithDefaults()
	want := Limits{Handshakes: DefaultHandshakes, HandshakesPerSource: DefaultHandshakesPerSource, MaxHeaderListSize: DefaultMaxHeaderListSize,
		StreamsPerConnection: 7, NewStreamsPerSecond: DefaultNewStreamsPerSecond, NewStreamsBurst: DefaultNewStreamsBurst,
		StreamResetsPerSecond: DefaultStreamResetsPerSecond, FirstMessageTimeout: Duration(DefaultFirstMessageTimeout)}
	if got != want {
		t.Errorf("limits with defaults = %+v, want %+v", got, want)
	}
}

func TestValidName(t *testing.T) {
	for name, want := range map[string]bool{
		"identity": true, "a.b_c-D9": true, strings.Repeat("a", 128): true,
		"": false, strings.Repeat("a", 129): false, "a b": false, "a/b": false, "é": false, "a\x00": false,
	} {
		if got := ValidName(name); got != want {
			t.Errorf("ValidName(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestCheckFiles(t *testing.T) {
	c, err := Parse([]byte(valid))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, p := range []*string{&c.TLS.CertFile, &c.TLS.KeyFile, &c.TLS.ClientCAFile, &c.Credentials[0].ClientSecretFile} {
		*p = filepath.Join(dir, filepath.Base(*p))
		if err := os.WriteFile(*p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.CheckFiles(); err != nil {
		t.Fatalf("CheckFiles: %v", err)
	}
	if err := os.Remove(c.Credentials[0].ClientSecretFile); err != nil {
		t.Fatal(err)
	}
	if err := c.CheckFiles(); err == nil || !strings.HasPrefix(err.Error(), "credentials[0].client_secret_file: ") {
		t.Errorf("CheckFiles = %v, want an error naming credentials[0].client_secret_file", err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(valid))
	f.Add([]byte("credentials: [{name: a}]"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Parse(b)
		if err == nil && c.Validate() != nil {
			t.Errorf("Parse accepted a config that Validate rejects")
		}
		if err != nil && err.Error() == "" {
			t.Errorf("empty error message")
		}
	})
}

// TestDeployExamples keeps the example configurations in deploy/ valid.
func TestDeployExamples(t *testing.T) {
	paths, err := filepath.Glob("../../deploy/*.yaml")
	if err != nil || len(paths) == 0 {
		t.Fatalf("no example configs found in deploy/: %v", err)
	}
	for _, p := range paths {
		if _, err := Load(p); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
}

// TestReadmeConfigReference keeps the configuration reference in README.md valid.
func TestReadmeConfigReference(t *testing.T) {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(b), "## Configuration")
	if !ok {
		t.Fatal("README has no Configuration section")
	}
	_, block, ok := strings.Cut(section, "```yaml\n")
	if !ok {
		t.Fatal("README's Configuration section has no yaml block")
	}
	block, _, _ = strings.Cut(block, "```")
	if _, err := Parse([]byte(block)); err != nil {
		t.Errorf("README configuration reference: %v", err)
	}
}
