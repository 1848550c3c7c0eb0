package server

import (
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// alertRules is the part of a PrometheusRule that the checks below read.
type alertRules struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   struct {
		Name   string            `yaml:"name"`
		Labels map[string]string `yaml:"labels"`
	} `yaml:"metadata"`
	Spec struct {
		Groups []struct {
			Name  string `yaml:"name"`
			Rules []struct {
				Alert       string            `yaml:"alert"`
				Expr        string            `yaml:"expr"`
				For         string            `yaml:"for"`
				Labels      map[string]string `yaml:"labels"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	} `yaml:"spec"`
}

const alertsFile = "../../deploy/kubernetes/components/monitoring/prometheusrule.yaml"

// runbooksFile holds a runbook per alert, under a heading of the alert's name.
const runbooksFile = "../../deploy/docs/operations.md"

// TestAlertRules parses the shipped alert rules and checks that each is
// complete, that its expression is balanced, that every metric it reads is one
// the server exports, and that the operations guide has its runbook, which
// the rule's runbook annotation links to.
func TestAlertRules(t *testing.T) {
	raw, err := os.ReadFile(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	var pr alertRules
	dec := yaml.NewDecoder(strings.NewReader(string(raw)))
	dec.KnownFields(true)
	if err := dec.Decode(&pr); err != nil {
		t.Fatalf("%s: %v", alertsFile, err)
	}
	guide, err := os.ReadFile(runbooksFile)
	if err != nil {
		t.Fatal(err)
	}

	// The metrics the server exports after a served call, with a
	// tls_client_auth credential configured (its certificate's expiry; its
	// closed token URL makes it unhealthy), and the served token then
	// overdue for refresh (series an alert reads only while there is trouble).
	h := newHarnessWithMTLS(t)
	c := h.client(payments)
	tok, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatal(err)
	}
	h.overdueToken(t, c, "identity", tok)
	waitFor(t, "the mtls credential unhealthy", func() bool { return h.metric(t, "tokenbroker_credential_healthy", "credential=mtls") == 0 })
	resp, err := http.Get("http://" + h.srv.AdminAddr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	exposition, _ := io.ReadAll(resp.Body)
	resp.Body.Close()

	metricName := regexp.MustCompile(`\b(?:tokenbroker|grpc_server)_[a-z_]+\b`)
	seen := map[string]bool{}
	n := 0
	for _, g := range pr.Spec.Groups {
		for _, r := range g.Rules {
			n++
			if r.Alert == "" || !strings.HasPrefix(r.Alert, "Tokenbroker") {
				t.Errorf("rule %d of group %s: alert name %q, want Tokenbroker…", n, g.Name, r.Alert)
			}
			if seen[r.Alert] {
				t.Errorf("%s: defined twice", r.Alert)
			}
			seen[r.Alert] = true
			if d, err := time.ParseDuration(r.For); err != nil || d <= 0 {
				t.Errorf("%s: for %q is not a positive duration", r.Alert, r.For)
			}
			if s := r.Labels["severity"]; s != "critical" && s != "warning" {
				t.Errorf("%s: severity %q, want critical or warning", r.Alert, s)
			}
			for _, a := range []string{"summary", "description", "runbook"} {
				if r.Annotations[a] == "" {
					t.Errorf("%s: no %s annotation", r.Alert, a)
				}
			}
			if err := balanced(r.Expr); err != "" {
				t.Errorf("%s: expr %q: %s", r.Alert, r.Expr, err)
			}
			for _, m := range metricName.FindAllString(r.Expr, -1) {
				if !strings.Contains(string(exposition), "\n"+m+"{") && !strings.Contains(string(exposition), "\n"+m+" ") {
					t.Errorf("%s reads %s, which the server does not export", r.Alert, m)
				}
			}
			if !strings.Contains(string(guide), "\n### "+r.Alert+"\n") {
				t.Errorf("%s: %s has no runbook heading \"### %s\"", r.Alert, runbooksFile, r.Alert)
			}
			if got, want := r.Annotations["runbook"], "deploy/docs/operations.md#"+strings.ToLower(r.Alert); got != want {
				t.Errorf("%s: runbook annotation %q, want %q", r.Alert, got, want)
			}
		}
	}
	if pr.Kind != "PrometheusRule" || n < 5 {
		t.Fatalf("%s: kind %q with %d rules, want a PrometheusRule with the alerts", alertsFile, pr.Kind, n)
	}
}

// balanced reports unbalanced brackets or quotes in a PromQL expression.
func balanced(expr string) string {
	var stack []rune
	pair := map[rune]rune{')': '(', ']': '[', '}': '{'}
	inQuote := false
	for _, c := range expr {
		switch {
		case c == '"':
			inQuote = !inQuote
		case inQuote:
		case c == '(' || c == '[' || c == '{':
			stack = append(stack, c)
		case c == ')' || c == ']' || c == '}':
			if len(stack) == 0 || stack[len(stack)-1] != pair[c] {
				return "unbalanced " + string(c)
			}
			stack = stack[:len(stack)-1]
		}
	}
	if inQuote || len(stack) > 0 {
		return "unclosed bracket or quote"
	}
	return ""
}

// needTool returns the path of a tool from Debian's prometheus package. A
// missing tool skips the test on a developer's machine and fails it in CI,
// where .ci/run installs the package.
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s is not installed (apt-get install prometheus); CI must run this test", name)
	}
	t.Skipf("%s is not on PATH: apt-get install prometheus to run this test", name)
	return ""
}

// rulesFile writes the PrometheusRule's .spec, a plain Prometheus rules
// file, into dir and returns the alert names it holds.
func rulesFile(t *testing.T, dir string) []string {
	t.Helper()
	raw, err := os.ReadFile(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	var pr struct {
		Spec yaml.Node `yaml:"spec"`
	}
	if err := yaml.Unmarshal(raw, &pr); err != nil {
		t.Fatal(err)
	}
	spec, err := yaml.Marshal(&pr.Spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "tokenbroker.rules.yaml"), spec, 0o600); err != nil {
		t.Fatal(err)
	}
	return regexp.MustCompile(`(?m)^\s*-?\s*alert: (\S+)`).FindAllString(string(spec), -1)
}

// TestAlertRulesWithPromtool runs promtool's own checks on the alert rules,
// and their unit tests (alerts_test.yaml beside them): every alert fires on
// the series that should fire it and stays silent otherwise.
func TestAlertRulesWithPromtool(t *testing.T) {
	promtool := needTool(t, "promtool")
	dir := t.TempDir()
	alerts := rulesFile(t, dir)
	tests, err := os.ReadFile(filepath.Join(filepath.Dir(alertsFile), "alerts_test.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "alerts_test.yaml"), tests, 0o600); err != nil {
		t.Fatal(err)
	}
	if len(alerts) < 8 {
		t.Fatalf("found %d alerts in the rules, want all of them", len(alerts))
	}
	for _, a := range alerts {
		name := a[strings.LastIndex(a, " ")+1:]
		if !strings.Contains(string(tests), "alertname: "+name+"\n") {
			t.Errorf("%s has no unit test in alerts_test.yaml", name)
		}
	}
	for _, args := range [][]string{{"check", "rules", "tokenbroker.rules.yaml"}, {"test", "rules", "alerts_test.yaml"}} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// newHarnessWithMTLS starts a harness with a second credential, "mtls", that
// authenticates to the bank with a client certificate (never used: its token
// URL is closed), so that the certificate's expiry is exported.
func newHarnessWithMTLS(t *testing.T) *harness {
	t.Helper()
	dir := t.TempDir()
	ca, err := devpki.NewCA("bank client CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := ca.Client(time.Hour, "broker.bank.internal")
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	if err := pair.WriteFiles(certFile, keyFile); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, func(c *config.Config) {
		mtls := c.Credentials[0]
		mtls.Name, mtls.AuthMethod, mtls.ClientSecretFile, mtls.TLSClientCertFile, mtls.TLSClientKeyFile = "mtls", "tls_client_auth", "", certFile, keyFile
		mtls.TokenURL = "https://127.0.0.1:1/oauth2/token" // never called
		c.Credentials = append(c.Credentials, mtls)
	})
	h.secrets = append(h.secrets, string(pair.KeyPEM))
	return h
}
