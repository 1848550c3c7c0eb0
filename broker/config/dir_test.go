package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// teamFile is a credentials_dir file with one credential per name.
func teamFile(names ...string) string {
	var b strings.Builder
	for _, n := range names {
		fmt.Fprintf(&b, `- name: %s
  token_url: https://auth.bank.example/oauth2/token
  client_id: %s-app
  client_secret_file: /secrets/%s
  scopes: [IDENTITY]
  allowed_callers: [spiffe://bank.internal/ns/%s/*]
`, n, n, n, n)
	}
	return b.String()
}

// writeTree writes files (relative path → content) under a new directory.
func writeTree(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

const mainWithDir = `
tls: {cert_file: /tls/tls.crt, key_file: /tls/tls.key, client_ca_file: /tls/ca.crt}
credentials_dir: teams
`

func TestCredentialsDir(t *testing.T) {
	dir := writeTree(t, map[string]string{
		"config.yaml":         mainWithDir + "credentials:\n" + indent(teamFile("identity")),
		"teams/payments.yaml": teamFile("payments-a", "payments-b"),
		"teams/kyc.yaml":      teamFile("kyc"),
		"teams/README.md":     "not a credentials file",
		"teams/.hidden.yaml":  "not: [a list",
		"teams/empty.yaml":    "",
	})
	c, err := Load(filepath.Join(dir, "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, cr := range c.Credentials {
		got = append(got, cr.Name+"@"+cr.DefinedIn)
	}
	want := "identity@ kyc@teams/kyc.yaml payments-a@teams/payments.yaml payments-b@teams/payments.yaml"
	if strings.Join(got, " ") != want {
		t.Errorf("credentials = %v, want %s", got, want)
	}
	if c.Credentials[3].AuthMethod != "client_secret_basic" || c.Credentials[3].Key() != "teams/payments.yaml: credentials[1]" {
		t.Errorf("a dir credential: defaults or key missing: %+v, %s", c.Credentials[3], c.Credentials[3].Key())
	}
	if c.CredentialsDirPath() != filepath.Join(dir, "teams") {
		t.Errorf("CredentialsDirPath = %q, want it resolved against the config file's directory", c.CredentialsDirPath())
	}
}

func TestCredentialsDirErrors(t *testing.T) {
	tests := []struct {
		name  string
		files map[string]string
		want  string
	}{
		{"a name in two files", map[string]string{"teams/kyc.yaml": teamFile("identity"), "teams/payments.yaml": teamFile("a", "b", "identity")},
			`teams/payments.yaml: credentials[2].name: "identity" is also defined in teams/kyc.yaml`},
		{"a name in the main file and a file", map[string]string{"teams/kyc.yaml": teamFile("main")},
			`teams/kyc.yaml: credentials[0].name: "main" is also defined in the main configuration (credentials[0])`},
		{"a name twice in one file", map[string]string{"teams/kyc.yaml": teamFile("x", "x")},
			`teams/kyc.yaml: credentials[1].name: "x" is also defined in teams/kyc.yaml: credentials[0]`},
		{"an invalid value", map[string]string{"teams/kyc.yaml": strings.Replace(teamFile("kyc"), "https://", "ftp://", 1)},
			"teams/kyc.yaml: credentials[0].token_url:"},
		{"an unknown key", map[string]string{"teams/kyc.yaml": teamFile("kyc") + "  colour: blue\n"},
			"teams/kyc.yaml: credentials[0].colour: unknown key"},
		{"not a list", map[string]string{"teams/kyc.yaml": "name: kyc\n"}, "teams/kyc.yaml: credentials: must be a list"},
		{"not YAML", map[string]string{"teams/kyc.yaml": "- [unclosed\n"}, "teams/kyc.yaml: yaml:"},
		{"no such directory", map[string]string{}, "credentials_dir: open"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			files := map[string]string{"config.yaml": mainWithDir + "credentials:\n" + indent(teamFile("main"))}
			for k, v := range tt.files {
				files[k] = v
			}
			dir := writeTree(t, files)
			_, err := Load(filepath.Join(dir, "config.yaml"))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Load = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

// TestCredentialsDirConfigMap: a directory laid out as Kubernetes mounts a
// ConfigMap (files are symlinks into ..data, itself a symlink to a
// timestamped directory) is read through the links, and its dot entries skipped.
func TestCredentialsDirConfigMap(t *testing.T) {
	dir := writeTree(t, map[string]string{
		"config.yaml":                     mainWithDir,
		"teams/..2026_11_24_1/kyc.yaml":   teamFile("kyc"),
		"teams/..2026_11_24_1/other.yaml": teamFile("other"),
	})
	teams := filepath.Join(dir, "teams")
	for _, l := range [][2]string{{"..2026_11_24_1", "..data"}, {"..data/kyc.yaml", "kyc.yaml"}, {"..data/other.yaml", "other.yaml"}} {
		if err := os.Symlink(l[0], filepath.Join(teams, l[1])); err != nil {
			t.Fatal(err)
		}
	}
	c, err := Load(filepath.Join(dir, "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Credentials) != 2 || c.Credentials[0].Name != "kyc" || c.Credentials[1].Name != "other" {
		t.Errorf("credentials = %+v, want kyc and other, once each", c.Credentials)
	}
}

func indent(s string) string {
	return "  " + strings.ReplaceAll(strings.TrimSuffix(s, "\n"), "\n", "\n  ") + "\n"
}
