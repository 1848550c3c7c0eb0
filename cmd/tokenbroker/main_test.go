package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devmode"
)

func runArgs(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	err := run(context.Background(), args, &out, &errb)
	return out.String() + errb.String(), err
}

func TestCheckConfig(t *testing.T) {
	env, err := devmode.Start(devmode.Options{Dir: filepath.Join(t.TempDir(), "dev"), ListenAddr: "127.0.0.1:0", AdminAddr: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()
	cfgPath := env.Path(devmode.ConfigFile)

	// The config dev mode writes is one the normal loader accepts.
	if out, err := runArgs(t, "--config", cfgPath, "--check-config"); err != nil || !strings.Contains(out, "configuration OK") {
		t.Fatalf("--check-config on the dev config = %q, %v; want OK", out, err)
	}

	// A file it names that cannot be read is reported by key.
	if err := os.Remove(env.Path(devmode.ClientSecretFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := runArgs(t, "--config", cfgPath, "--check-config"); err == nil ||
		!strings.HasPrefix(err.Error(), "credentials[0].client_secret_file: ") {
		t.Errorf("--check-config with a missing secret file = %v, want an error naming credentials[0].client_secret_file", err)
	}

	// A credentials_dir file's missing secret is reported with the file and key.
	if err := os.WriteFile(env.Path(devmode.ClientSecretFile), []byte("dev-secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(env.Path("teams"), 0o755); err != nil {
		t.Fatal(err)
	}
	team := "- name: team-cred\n  token_url: https://auth.bank.example/oauth2/token\n  client_id: team\n  client_secret_file: /nonexistent/secret\n"
	if err := os.WriteFile(env.Path("teams/payments.yaml"), []byte(team), 0o600); err != nil {
		t.Fatal(err)
	}
	withDir := env.Path("with-dir.yaml")
	if err := os.WriteFile(withDir, append(raw, []byte("credentials_dir: teams\n")...), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := runArgs(t, "--config", withDir, "--check-config"); err == nil ||
		!strings.HasPrefix(err.Error(), "teams/payments.yaml: credentials[0].client_secret_file: ") {
		t.Errorf("--check-config with a credentials_dir file's missing secret = %v, want the file and key named", err)
	}

	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("listen_adr: x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := runArgs(t, "--config", bad, "--check-config"); err == nil || !strings.Contains(err.Error(), "listen_adr: unknown key") {
		t.Errorf("--check-config on an unknown key = %v, want it named", err)
	}
	if _, err := runArgs(t, "--config", cfgPath, "--listen-addr", "nonsense", "--check-config"); err == nil ||
		!strings.Contains(err.Error(), "listen_addr: must be host:port") {
		t.Errorf("--listen-addr nonsense = %v, want a listen_addr error", err)
	}
}

func TestFlags(t *testing.T) {
	if out, err := runArgs(t, "--version"); err != nil || !strings.HasPrefix(out, "tokenbroker ") || !strings.Contains(out, "(commit ") {
		t.Errorf("--version = %q, %v", out, err)
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{nil, "--config FILE or --dev is required"},
		{[]string{"--dev", "--config", "x"}, "exclusive"},
		{[]string{"serve"}, `unexpected argument "serve"`},
		{[]string{"--redis", "127.0.0.1:6379"}, "--redis goes with --dev"},
		{[]string{"--rate-limit", "0"}, "--rate-limit goes with --dev"},
		{[]string{"--config", filepath.Join(t.TempDir(), "missing.yaml")}, "read config"},
	} {
		if _, err := runArgs(t, tt.args...); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("tokenbroker %v = %v, want an error containing %q", tt.args, err, tt.want)
		}
	}
}

// TestDevRateLimit: --rate-limit sets the dev config's per-caller limit (0
// turns it off, for a load test from the one dev identity); without it the
// default applies.
func TestDevRateLimit(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want float64
	}{
		{nil, config.DefaultRate},
		{[]string{"--rate-limit", "0"}, 0},
		{[]string{"--rate-limit", "1000"}, 1000},
	} {
		dir := filepath.Join(t.TempDir(), "dev")
		args := append([]string{"--dev", "--dev-dir", dir, "--check-config"}, tt.args...)
		if _, err := runArgs(t, args...); err != nil {
			t.Fatalf("tokenbroker %v: %v", args, err)
		}
		cfg, err := config.Load(filepath.Join(dir, devmode.ConfigFile))
		if err != nil {
			t.Fatal(err)
		}
		if got := cfg.RateLimit.RequestsPerSecond; got != tt.want {
			t.Errorf("tokenbroker %v: rate_limit.requests_per_second = %v, want %v", args, got, tt.want)
		}
	}
}

// TestDeployConfigsPassCheckConfig runs --check-config on every example
// configuration under deploy/, with the files they name (mounted Secrets in a
// pod) created under a temporary directory.
func TestDeployConfigsPassCheckConfig(t *testing.T) {
	configs := []string{"../../deploy/config.example.yaml", "../../deploy/kubernetes/base/config.yaml"}
	overlays, err := filepath.Glob("../../deploy/kubernetes/overlays/*/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	configs = append(configs, overlays...)
	if len(configs) < 3 {
		t.Fatalf("found only %v", configs)
	}
	// The production configuration with the admin_tls block that the
	// metrics-tls component tells you to add (the Helm chart merges the same).
	prod, err := os.ReadFile("../../deploy/kubernetes/overlays/production/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	component, err := os.ReadFile("../../deploy/kubernetes/components/metrics-tls/kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	_, block, _ := strings.Cut(string(component), "#   admin_tls:\n")
	block, _, _ = strings.Cut(block, "\n#\n")
	block = "admin_tls:\n" + regexp.MustCompile(`(?m)^#   `).ReplaceAllString(block, "") + "\n"
	if !strings.Contains(block, "client_ca_file: /etc/tokenbroker/") {
		t.Fatalf("no admin_tls block in components/metrics-tls/kustomization.yaml: %q", block)
	}
	withTLS := filepath.Join(t.TempDir(), "production-metrics-tls.yaml")
	if err := os.WriteFile(withTLS, append(prod, block...), 0o600); err != nil {
		t.Fatal(err)
	}
	configs = append(configs, withTLS)
	mounted := regexp.MustCompile(`/etc/tokenbroker/[^\s#"',\]]+`)
	for _, path := range configs {
		t.Run(strings.TrimPrefix(path, "../../"), func(t *testing.T) {
			raw, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			root := t.TempDir()
			files := mounted.FindAllString(string(raw), -1)
			if len(files) == 0 {
				t.Fatal("names no mounted file")
			}
			for _, f := range files {
				p := filepath.Join(root, f)
				if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte("mounted\n"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			cfg := filepath.Join(root, "config.yaml")
			rewritten := strings.ReplaceAll(string(raw), "/etc/tokenbroker/", root+"/etc/tokenbroker/")
			if err := os.WriteFile(cfg, []byte(rewritten), 0o600); err != nil {
				t.Fatal(err)
			}
			if out, err := runArgs(t, "--config", cfg, "--check-config"); err != nil || !strings.Contains(out, "configuration OK") {
				t.Fatalf("--check-config = %q, %v", out, err)
			}
			// And it can fail: without the files it names, it names the first missing one.
			if err := os.RemoveAll(filepath.Join(root, "etc")); err != nil {
				t.Fatal(err)
			}
			if _, err := runArgs(t, "--config", cfg, "--check-config"); err == nil || !strings.Contains(err.Error(), "no such file") {
				t.Errorf("--check-config without the mounted files = %v, want a missing-file error", err)
			}
		})
	}
}
