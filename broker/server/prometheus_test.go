package server

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

const dashboardFile = "../../deploy/kubernetes/components/monitoring/dashboard.yaml"

// dashboardQueries returns each panel's title and queries, with Grafana's
// $__rate_interval set to one minute.
func dashboardQueries(t *testing.T) map[string][]string {
	t.Helper()
	raw, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var cm struct {
		Metadata struct {
			Labels map[string]string `yaml:"labels"`
		} `yaml:"metadata"`
		Data map[string]string `yaml:"data"`
	}
	if err := yaml.Unmarshal(raw, &cm); err != nil {
		t.Fatal(err)
	}
	if cm.Metadata.Labels["grafana_dashboard"] != "1" {
		t.Errorf("%s: no grafana_dashboard: \"1\" label for Grafana's sidecar", dashboardFile)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal([]byte(cm.Data["tokenbroker.json"]), &dash); err != nil {
		t.Fatalf("%s: tokenbroker.json: %v", dashboardFile, err)
	}
	out := map[string][]string{}
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			out[p.Title] = append(out[p.Title], strings.ReplaceAll(tg.Expr, "$__rate_interval", "1m"))
		}
	}
	if len(out) < 10 {
		t.Fatalf("%s: %d panels with queries, want the dashboard's", dashboardFile, len(out))
	}
	return out
}

// promQuery evaluates expr on the Prometheus at base and returns the number
// of series in the answer, or an error from Prometheus.
func promQuery(base, expr string) (int, error) {
	resp, err := http.Get(base + "/api/v1/query?query=" + url.QueryEscape(expr))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var r struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result json.RawMessage `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return 0, err
	}
	if r.Status != "success" {
		return 0, fmt.Errorf("%s", r.Error)
	}
	var series []json.RawMessage
	if err := json.Unmarshal(r.Data.Result, &series); err != nil {
		return 1, nil // a scalar
	}
	return len(series), nil
}

// TestDashboardAndAlertsAgainstPrometheus: a real Prometheus scrapes a
// running broker on loopback after some calls; every dashboard panel's query
// and every alert expression evaluates without error, and every panel has
// data.
func TestDashboardAndAlertsAgainstPrometheus(t *testing.T) {
	prometheus := needTool(t, "prometheus")
	dir := t.TempDir()
	h := newHarnessWithMTLS(t)

	// Calls that give every panel something to show.
	c := h.client(payments)
	tok, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatal(err)
	}
	toks, errs, cancel := watch(t, c, &pb.WatchTokenRequest{Credential: "identity"})
	recvToken(t, toks, errs)
	cancel()
	limited := false
	for range 15 { // InvalidateToken allows bursts of 10 per caller
		_, err := c.InvalidateToken(context.Background(), &pb.InvalidateTokenRequest{Credential: "identity", Fingerprint: tok.GetFingerprint()})
		limited = limited || status.Code(err) == codes.ResourceExhausted
	}
	if !limited {
		t.Fatal("no InvalidateToken call was rate limited")
	}
	again, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"}) // a token cached again
	if err != nil {
		t.Fatal(err)
	}
	// Series that only trouble makes: a token overdue for refresh, the
	// mtls credential (its token URL closed) unhealthy,
	h.overdueToken(t, c, "identity", again)
	// and a token request that fails (the bank answers 503 now).
	if _, err := h.get(c, &pb.GetTokenRequest{Credential: "identity", MinTtl: durationpb.New(time.Minute)}); status.Code(err) != codes.Unavailable {
		t.Fatalf("identity with the bank down: %v, want UNAVAILABLE", err)
	}
	waitFor(t, "the mtls credential unhealthy", func() bool { return h.metric(t, "tokenbroker_credential_healthy", "credential=mtls") == 0 })

	port := redistest.FreePort(t)
	promCfg := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(promCfg, []byte(fmt.Sprintf(`global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: tokenbroker
    static_configs: [{targets: ["%s"]}]
`, h.srv.AdminAddr())), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(prometheus, "--config.file="+promCfg, "--storage.tsdb.path="+filepath.Join(dir, "tsdb"),
		fmt.Sprintf("--web.listen-address=127.0.0.1:%d", port), "--log.level=warn")
	var stderr logBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	// Three scrapes, so that rate() has samples to work on.
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if n, err := promQuery(base, `count_over_time(up{job="tokenbroker"}[1m]) >= 3`); err == nil && n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus did not scrape the broker three times in 60s; its log:\n%s", stderr.String())
		}
	}

	for title, exprs := range dashboardQueries(t) {
		for _, expr := range exprs {
			n, err := promQuery(base, expr)
			switch {
			case err != nil:
				t.Errorf("panel %q: %s: %v", title, expr, err)
			case n == 0:
				t.Errorf("panel %q: %s: no data", title, expr)
			}
		}
	}
	raw, err := os.ReadFile(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	var pr alertRules
	if err := yaml.Unmarshal(raw, &pr); err != nil {
		t.Fatal(err)
	}
	for _, g := range pr.Spec.Groups {
		for _, r := range g.Rules {
			if _, err := promQuery(base, r.Expr); err != nil {
				t.Errorf("alert %s: %s: %v", r.Alert, r.Expr, err)
			}
		}
	}
}
