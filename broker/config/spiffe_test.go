package config

import (
	"os"
	"strings"
	"testing"
	"time"
)

const validSPIFFE = `
tls:
  spiffe: {workload_api: "unix:///run/spire/agent-sockets/spire-agent.sock"}
credentials:
  - name: identity
    token_url: https://auth.bank.example/oauth2/token
    client_id: my-app
    client_secret_file: /secrets/identity
    allowed_callers: [spiffe://bank.internal/ns/kyc/*]
`

func TestParseSPIFFE(t *testing.T) {
	c, err := Parse([]byte(validSPIFFE))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := c.TLS.SPIFFE.Address(), "unix:///run/spire/agent-sockets/spire-agent.sock"; got != want {
		t.Errorf("Address() = %q, want %q", got, want)
	}
	if c.TLS.MaxConnectionAge != 0 {
		t.Errorf("max_connection_age = %v, want 0 (the server derives it from its SVID)", c.TLS.MaxConnectionAge)
	}
	if err := c.CheckFiles(); err != nil && strings.Contains(err.Error(), "tls.") {
		t.Errorf("CheckFiles looked for TLS files under tls.spiffe: %v", err)
	}

	// {} takes the address from SPIFFE_ENDPOINT_SOCKET.
	t.Setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///tmp/agent.sock")
	c, err = Parse([]byte(strings.Replace(validSPIFFE, `{workload_api: "unix:///run/spire/agent-sockets/spire-agent.sock"}`, "{}", 1) +
		"  - name: x\n    token_url: https://a.example/t\n    client_id: x\n    client_secret_file: /s\n    allowed_callers: [dns:a]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.TLS.SPIFFE.Address(); got != "unix:///tmp/agent.sock" {
		t.Errorf("Address() = %q, want the variable's value", got)
	}
	c, err = Parse([]byte(strings.Replace(validSPIFFE, "spire-agent.sock\"}", "spire-agent.sock\"}\n  max_connection_age: 10m", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.TLS.MaxConnectionAge.D(); got != 10*time.Minute {
		t.Errorf("max_connection_age = %v, want the 10m set", got)
	}
}

func TestParseSPIFFEInvalid(t *testing.T) {
	withAddr := func(v string) string {
		return strings.Replace(validSPIFFE, `{workload_api: "unix:///run/spire/agent-sockets/spire-agent.sock"}`, v, 1)
	}
	tests := []struct {
		name, doc, env, want string
	}{
		{"with cert file", strings.Replace(validSPIFFE, "tls:\n", "tls:\n  cert_file: /c\n", 1), "",
			"tls.cert_file: not allowed with tls.spiffe, which takes the certificate and the trust bundles from the Workload API"},
		{"with client ca", strings.Replace(validSPIFFE, "tls:\n", "tls:\n  client_ca_file: /c\n", 1), "", "tls.client_ca_file: not allowed with tls.spiffe"},
		{"with bundles", strings.Replace(validSPIFFE, "tls:\n", "tls:\n  client_trust_bundles: [{trust_domain: a, ca_file: /a}]\n", 1), "",
			"tls.client_trust_bundles: not allowed with tls.spiffe"},
		{"no address", withAddr("{}"), "", "tls.spiffe.workload_api: required unless SPIFFE_ENDPOINT_SOCKET is set"},
		{"bare path", withAddr("{workload_api: /run/agent.sock}"), "", `tls.spiffe.workload_api: the scheme must be "unix" or "tcp"`},
		{"tcp by name", withAddr("{workload_api: 'tcp://spire:8081'}"), "", "tls.spiffe.workload_api: a tcp address is an IP address and a port"},
		{"bad variable", withAddr("{}"), "/run/agent.sock", "tls.spiffe.workload_api (from SPIFFE_ENDPOINT_SOCKET):"},
		{"bad id", withAddr("{workload_api: 'unix:///a', id: 'bank.internal/broker'}"), "", "tls.spiffe.id: want a SPIFFE ID"},
		{"unix with query", withAddr("{workload_api: 'unix:///a.sock?x=1'}"), "", "tls.spiffe.workload_api: no user information, query or fragment"},
		{"unknown key", withAddr("{socket: 'unix:///a'}"), "", "tls.spiffe.socket: unknown key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("SPIFFE_ENDPOINT_SOCKET", tt.env)
			_, err := Parse([]byte(tt.doc))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Parse error = %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

// TestSPIFFEConfigsInReadmeAndDeploy: README's broker configuration in
// "SPIFFE and SPIRE" and the kustomize component's config.yaml (with the
// variable the component sets) are valid.
func TestSPIFFEConfigsInReadmeAndDeploy(t *testing.T) {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(b), "## SPIFFE and SPIRE")
	if !ok {
		t.Fatal(`README has no "SPIFFE and SPIRE" section`)
	}
	_, block, ok := strings.Cut(section, "```yaml\n")
	if !ok {
		t.Fatal(`README's "SPIFFE and SPIRE" has no yaml block`)
	}
	block, _, _ = strings.Cut(block, "```")
	if c, err := Parse([]byte(block)); err != nil {
		t.Errorf("README's SPIFFE configuration: %v", err)
	} else if c.TLS.SPIFFE == nil || c.TLS.SPIFFE.ID == "" {
		t.Errorf("README's SPIFFE configuration has no tls.spiffe.id: %+v", c.TLS.SPIFFE)
	}

	t.Setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///run/spire/agent-sockets/spire-agent.sock")
	c, err := Load("../../deploy/kubernetes/components/spiffe/config.yaml")
	if err != nil {
		t.Fatalf("components/spiffe/config.yaml: %v", err)
	}
	if c.TLS.SPIFFE == nil {
		t.Error("components/spiffe/config.yaml has no tls.spiffe")
	}
}
