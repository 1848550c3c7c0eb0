package server

import (
	"compress/gzip"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// TestMetricsExposition: /metrics, which joins client_golang's families and
// the broker's per-credential families written as text, is one valid text
// exposition — Prometheus' parser reads it whole, every family once — plain
// or gzip-compressed as the scraper asks. A credential with one client
// secret has no tokenbroker_client_secret_used_total series (it would
// repeat upstream_requests_total{outcome="ok"}); a reload keeps the counts
// of a credential it keeps and drops the series of one it removes. Health
// and expiry have series only for the credential with something to show.
func TestMetricsExposition(t *testing.T) {
	h := newHarness(t, func(c *config.Config) {
		second := c.Credentials[0]
		second.Name = "second"
		c.Credentials = append(c.Credentials, second)
	})
	c := h.client(payments)
	var tok *pb.Token
	for _, name := range []string{"identity", "identity", "second"} {
		var err error
		if tok, err = h.get(c, &pb.GetTokenRequest{Credential: name}); err != nil {
			t.Fatal(err)
		}
	}
	// Every per-credential family has a series: second's token is overdue
	// for refresh, and second is failing (the bank answers 503).
	h.overdueToken(t, c, "second", tok)
	if _, err := h.get(c, &pb.GetTokenRequest{Credential: "second", MinTtl: durationpb.New(time.Minute)}); status.Code(err) != codes.Unavailable {
		t.Fatalf("second with the bank down: %v, want UNAVAILABLE", err)
	}

	read := func(gz bool) map[string]float64 {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, "http://"+h.srv.AdminAddr().String()+"/metrics", nil)
		if gz {
			req.Header.Set("Accept-Encoding", "gzip")
		} else {
			req.Header.Set("Accept-Encoding", "identity")
		}
		resp, err := http.DefaultTransport.RoundTrip(req) // no transparent decompression
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
			t.Errorf("Content-Type %q", ct)
		}
		var body io.Reader = resp.Body
		if enc := resp.Header.Get("Content-Encoding"); gz != (enc == "gzip") {
			t.Fatalf("asked gzip %v, got Content-Encoding %q", gz, enc)
		}
		if gz {
			zr, err := gzip.NewReader(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			body = zr
		}
		raw, err := io.ReadAll(body)
		if err != nil {
			t.Fatal(err)
		}
		for _, fam := range broker.CredentialFamilies {
			if n := strings.Count(string(raw), "# TYPE "+fam+" "); n > 1 {
				t.Errorf("family %s declared %d times", fam, n)
			}
		}
		parser := expfmt.NewTextParser(model.UTF8Validation)
		fams, err := parser.TextToMetricFamilies(strings.NewReader(string(raw)))
		if err != nil {
			t.Fatalf("/metrics does not parse: %v", err)
		}
		out := map[string]float64{}
		for name, f := range fams {
			for _, m := range f.GetMetric() {
				key := name
				for _, l := range m.GetLabel() {
					key += "," + l.GetName() + "=" + l.GetValue()
				}
				out[key] = m.GetCounter().GetValue() + m.GetGauge().GetValue() + m.GetUntyped().GetValue()
			}
		}
		return out
	}

	for _, gz := range []bool{false, true} {
		got := read(gz)
		for key, want := range map[string]float64{
			"tokenbroker_token_source_total,source=upstream":                                2,
			"tokenbroker_token_source_total,source=memory":                                  2,
			"tokenbroker_tokens_issued_total,credential=identity":                           2,
			"tokenbroker_tokens_issued_total,credential=second":                             2,
			"tokenbroker_upstream_requests_total,credential=second,outcome=ok":              1,
			"tokenbroker_credential_healthy,credential=second":                              0,
			"tokenbroker_credentials,state=ok":                                              1,
			"tokenbroker_credentials,state=failing":                                         1,
			"tokenbroker_requests_total,code=OK,method=tokenbroker.v1.TokenBroker/GetToken": 4, // and one UNAVAILABLE
		} {
			if got[key] != want {
				t.Errorf("gzip %v: %s = %v, want %v", gz, key, got[key], want)
			}
		}
		for _, key := range []string{"tokenbroker_credential_last_success_timestamp_seconds,credential=second", "tokenbroker_token_expiry_seconds,credential=second"} {
			if got[key] <= 0 {
				t.Errorf("gzip %v: %s missing", gz, key)
			}
		}
		if _, ok := got["tokenbroker_credential_healthy,credential=second"]; !ok {
			t.Errorf("gzip %v: no tokenbroker_credential_healthy series for the failing credential", gz)
		}
		for _, key := range []string{"tokenbroker_credential_healthy,credential=identity", "tokenbroker_credential_last_success_timestamp_seconds,credential=identity"} {
			if _, ok := got[key]; ok {
				t.Errorf("gzip %v: %s, for a credential that is ok", gz, key)
			}
		}
		for key := range got {
			if strings.HasPrefix(key, "tokenbroker_client_secret_used_total") {
				t.Errorf("gzip %v: %s, for credentials with one secret", gz, key)
			}
		}
	}

	next := *h.cfg
	next.Credentials = next.Credentials[:1]
	if err := h.srv.Reload(&next); err != nil {
		t.Fatal(err)
	}
	got := read(false)
	if got["tokenbroker_tokens_issued_total,credential=identity"] != 2 {
		t.Errorf("the kept credential's counts after a reload: %v", got["tokenbroker_tokens_issued_total,credential=identity"])
	}
	// The counts by source keep the removed credential's: a counter that
	// went down would read as a reset.
	if got["tokenbroker_token_source_total,source=upstream"] != 2 || got["tokenbroker_token_source_total,source=memory"] != 2 {
		t.Errorf("tokens by source after a credential was removed: upstream %v, memory %v; want 2 and 2",
			got["tokenbroker_token_source_total,source=upstream"], got["tokenbroker_token_source_total,source=memory"])
	}
	for key := range got {
		if strings.Contains(key, "credential=second") {
			t.Errorf("%s after the credential was removed", key)
		}
	}
}
