package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// teamCredential is a credential for the harness's authorization server,
// allowed to caller.
func (h *harness) teamCredential(name, caller string) config.Credential {
	c := h.cfg.Credentials[0]
	c.Name, c.AllowedCallers = name, []config.AllowedCaller{{Caller: caller}}
	return c
}

// writeConfigDir writes the harness's configuration as a file whose
// credentials_dir is "teams", with files (name → credentials) in it, and
// returns the file's path.
func (h *harness) writeConfigDir(files map[string][]config.Credential) string {
	h.t.Helper()
	main := *h.cfg
	main.CredentialsDir = "teams"
	b, err := yaml.Marshal(&main)
	if err != nil {
		h.t.Fatal(err)
	}
	h.write("config.yaml", string(b))
	if err := os.MkdirAll(h.path("teams"), 0o755); err != nil {
		h.t.Fatal(err)
	}
	for name, creds := range files {
		h.writeTeamFile(filepath.Join(h.path("teams"), name), creds)
	}
	return h.path("config.yaml")
}

func (h *harness) writeTeamFile(path string, creds []config.Credential) {
	h.t.Helper()
	b, err := yaml.Marshal(creds)
	if err != nil {
		h.t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		h.t.Fatal(err)
	}
}

// watchConfig runs the server's configuration watch on path every 20ms.
func (h *harness) watchConfig(path string) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	last := configSum(path) // before returning, so that no change made after it is missed
	go func() { h.srv.watchConfigFrom(ctx, path, 20*time.Millisecond, last); close(done) }()
	h.t.Cleanup(func() { cancel(); <-done })
}

// waitFor polls cond every 10ms for up to 5s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after 5s: %s", what)
		}
	}
}

// inventory reads GET /credentials.
func (h *harness) inventory(t *testing.T) (map[string]credentialView, string) {
	t.Helper()
	resp, err := http.Get("http://" + h.srv.AdminAddr().String() + "/credentials")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var body struct {
		Credentials []credentialView `json:"credentials"`
	}
	if resp.StatusCode != http.StatusOK || json.Unmarshal(raw, &body) != nil {
		t.Fatalf("/credentials = %d %s", resp.StatusCode, raw)
	}
	out := map[string]credentialView{}
	for _, c := range body.Credentials {
		out[c.Name] = c
	}
	return out, string(raw)
}

// TestCredentialsDirThroughTheServer: credentials from two files are
// served; a duplicate name or an invalid file is rejected whole (audited,
// naming the file) and the configuration in force stays; a file added is
// served, a file removed stops being served at once with its tokens gone;
// a ConfigMap-style swap of the ..data link is picked up.
func TestCredentialsDirThroughTheServer(t *testing.T) {
	h := newHarness(t, nil)
	path := h.writeConfigDir(map[string][]config.Credential{
		"payments.yaml": {h.teamCredential("payments-api", payments)},
		"kyc.yaml":      {h.teamCredential("kyc-api", kycWork)},
	})
	if err := h.srv.ReloadFile(path); err != nil {
		t.Fatal(err)
	}
	pay, kyc := h.client(payments), h.client(kycWork)
	for c, name := range map[pb.TokenBrokerClient]string{pay: "payments-api", kyc: "kyc-api"} {
		if _, err := h.get(c, &pb.GetTokenRequest{Credential: name}); err != nil {
			t.Errorf("%s from its file: %v", name, err)
		}
	}
	inv, _ := h.inventory(t)
	if inv["kyc-api"].DefinedIn != "teams/kyc.yaml" || len(inv["kyc-api"].Cached) != 1 {
		t.Errorf("inventory of kyc-api = %+v, want defined in teams/kyc.yaml with one cached token", inv["kyc-api"])
	}

	// A name defined twice: rejected, naming both files.
	h.writeTeamFile(h.path("teams/zz-dup.yaml"), []config.Credential{h.teamCredential("other", payments), h.teamCredential("kyc-api", payments)})
	err := h.srv.ReloadFile(path)
	if want := `teams/zz-dup.yaml: credentials[1].name: "kyc-api" is also defined in teams/kyc.yaml`; err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("duplicate: %v, want %q", err, want)
	}
	// An invalid file: rejected, naming the file and the key.
	if err := os.WriteFile(h.path("teams/zz-dup.yaml"), []byte("- name: bad\n  token_url: ftp://x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := h.srv.ReloadFile(path); err == nil || !strings.Contains(err.Error(), "teams/zz-dup.yaml: credentials[0].token_url") {
		t.Errorf("invalid file: %v, want the file and key named", err)
	}
	if _, err := h.get(kyc, &pb.GetTokenRequest{Credential: "kyc-api"}); err != nil {
		t.Errorf("after rejected reloads: %v, want the configuration in force kept", err)
	}
	if err := os.Remove(h.path("teams/zz-dup.yaml")); err != nil {
		t.Fatal(err)
	}

	// From now on the watch applies changes by itself.
	h.watchConfig(path)
	h.writeTeamFile(h.path("teams/new.yaml"), []config.Credential{h.teamCredential("new-api", payments)})
	waitFor(t, "a credential in an added file is served", func() bool {
		_, err := h.get(pay, &pb.GetTokenRequest{Credential: "new-api"})
		return err == nil
	})
	if err := os.Remove(h.path("teams/kyc.yaml")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a credential in a removed file is refused", func() bool {
		_, err := h.get(kyc, &pb.GetTokenRequest{Credential: "kyc-api"})
		return status.Code(err) == codes.PermissionDenied
	})
	inv, _ = h.inventory(t)
	if _, ok := inv["kyc-api"]; ok {
		t.Error("the removed credential is still in the inventory")
	}
	// The removed credential's series go with it; the kept one keeps its
	// cached token and its counts.
	if v := h.metric(t, "tokenbroker_tokens_issued_total", "credential=kyc-api"); v != -1 {
		t.Errorf("the removed credential still has series (tokens_issued_total %v)", v)
	}
	if v := h.metric(t, "tokenbroker_tokens_issued_total", "credential=payments-api"); v <= 0 {
		t.Errorf("tokens_issued_total of a kept credential = %v, want its count", v)
	}
	if len(inv["payments-api"].Cached) == 0 {
		t.Errorf("the kept credential's cached token is gone from the inventory: %+v", inv["payments-api"])
	}

	// ConfigMap-style: files are links into ..data, which is swapped atomically.
	if err := os.RemoveAll(h.path("teams")); err != nil {
		t.Fatal(err)
	}
	v1, v2 := h.path("teams/..v1"), h.path("teams/..v2")
	for _, d := range []string{v1, v2} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	h.writeTeamFile(filepath.Join(v1, "team.yaml"), []config.Credential{h.teamCredential("cm-one", payments)})
	h.writeTeamFile(filepath.Join(v2, "team.yaml"), []config.Credential{h.teamCredential("cm-two", payments)})
	for _, l := range [][2]string{{"..v1", "..data"}, {"..data/team.yaml", "team.yaml"}} {
		if err := os.Symlink(l[0], filepath.Join(h.path("teams"), l[1])); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the ConfigMap's credential is served", func() bool {
		_, err := h.get(pay, &pb.GetTokenRequest{Credential: "cm-one"})
		return err == nil
	})
	if err := os.Symlink("..v2", h.path("teams/..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(h.path("teams/..data_tmp"), h.path("teams/..data")); err != nil { // as the kubelet swaps it
		t.Fatal(err)
	}
	waitFor(t, "the swapped ConfigMap's credential is served", func() bool {
		_, err := h.get(pay, &pb.GetTokenRequest{Credential: "cm-two"})
		return err == nil
	})
	if _, err := h.get(pay, &pb.GetTokenRequest{Credential: "cm-one"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("the credential swapped out: %v, want PermissionDenied", err)
	}

	if err := h.stop(); err != nil {
		t.Fatal(err)
	}
	var rejected []string
	for _, e := range auditLines(t, h.audit.String()) {
		// The ConfigMap step removes the directory before making it again;
		// a watch tick in between rightly rejects the missing directory.
		if e.Event == "config.reloaded" && e.Outcome == "rejected" && !strings.Contains(e.Reason, "teams: no such file or directory") {
			rejected = append(rejected, e.Reason)
		}
	}
	if len(rejected) != 2 || !strings.Contains(rejected[0], "teams/zz-dup.yaml") || !strings.Contains(rejected[1], "teams/zz-dup.yaml") {
		t.Errorf("rejected reloads audited = %q, want two naming teams/zz-dup.yaml", rejected)
	}
}

// TestInventory: /credentials shows each credential's configuration,
// upstream state (ok, failing, refused), cached tokens, last fetch, tokens
// issued, recent callers and material; never a secret or token.
func TestInventory(t *testing.T) {
	clientCA, err := devpki.NewCA("bank client CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := clientCA.Client(time.Hour, "broker.bank.internal")
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, func(c *config.Config) {
		failing := c.Credentials[0]
		failing.Name, failing.TokenURL = "failing", "http://127.0.0.1:1/oauth2/token?tenant=secret-looking"
		refused := c.Credentials[0]
		refused.Name, refused.ClientID = "refused", "unknown-client"
		c.Credentials = append(c.Credentials, failing, refused)
	})
	certFile, keyFile := h.path("client.pem"), h.path("client-key.pem")
	if err := pair.WriteFiles(certFile, keyFile); err != nil {
		t.Fatal(err)
	}
	h.secrets = append(h.secrets, string(pair.KeyPEM))
	cfg := *h.cfg
	mtls := cfg.Credentials[0]
	mtls.Name, mtls.AuthMethod, mtls.ClientSecretFile, mtls.TLSClientCertFile, mtls.TLSClientKeyFile = "mtls", "tls_client_auth", "", certFile, keyFile
	mtls.TokenURL = "https://127.0.0.1:1/oauth2/token" // never called
	cfg.Credentials = append(append([]config.Credential(nil), cfg.Credentials...), mtls)
	if err := h.srv.Reload(&cfg); err != nil {
		t.Fatal(err)
	}

	for _, id := range []string{payments, kycWork} {
		if _, err := h.get(h.client(id), &pb.GetTokenRequest{Credential: "identity"}); err != nil {
			t.Fatal(err)
		}
		h.clock.Add(2 * time.Second)
	}
	for _, name := range []string{"failing", "refused"} {
		if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: name}); err == nil {
			t.Fatalf("%s: got a token", name)
		}
	}
	inv, raw := h.inventory(t)
	id := inv["identity"]
	if id.Upstream.State != "ok" || id.Issued != 2 || len(id.Cached) != 1 || id.LastFetch == nil || id.LastFetch.Outcome != "ok" ||
		id.ClientID != "broker" || id.AuthMethod != "client_secret_post" || len(id.RecentCallers) != 2 ||
		id.RecentCallers[0].Caller != kycWork || len(id.AllowedCallers) != 4 || !strings.Contains(raw, `"caller":"dns:reporting.internal"`) {
		t.Errorf("identity = %+v", id)
	}
	if len(id.Material) != 1 || id.Material[0].Kind != "client_secret" || id.Material[0].LastRotated == nil {
		t.Errorf("identity material = %+v, want the secret file with its modification time", id.Material)
	}
	if f := inv["failing"]; f.Upstream.State != "failing" || f.Upstream.Reason != "network" || f.LastFetch == nil ||
		f.LastFetch.Outcome != "network" || strings.Contains(f.TokenURL, "tenant") || f.Issued != 0 {
		t.Errorf("failing = %+v, want failing (network) and a token URL without its query", f)
	}
	if r := inv["refused"]; r.Upstream.State != "refused" || r.Upstream.Reason != "invalid_client" {
		t.Errorf("refused = %+v, want refused (invalid_client)", r.Upstream)
	}
	if m := inv["mtls"].Material; len(m) != 1 || m[0].Expires == nil || m[0].Expires.Sub(time.Now().Add(time.Hour)).Abs() > 2*time.Minute {
		t.Errorf("mtls material = %+v, want the certificate's notAfter (in about an hour)", m)
	}
	h.checkClean("/credentials", raw)
	if strings.Contains(raw, h.secret) || strings.Contains(raw, "PRIVATE KEY") {
		t.Error("/credentials holds secret material")
	}

	resp, err := http.Get("http://" + h.srv.AdminAddr().String() + "/credentials?name=refused")
	if err != nil {
		t.Fatal(err)
	}
	var one credentialView
	_ = json.NewDecoder(resp.Body).Decode(&one)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || one.Name != "refused" {
		t.Errorf("?name=refused = %d %+v", resp.StatusCode, one)
	}
	resp, err = http.Get("http://" + h.srv.AdminAddr().String() + "/credentials?name=nope")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("?name=nope = %d, want 404", resp.StatusCode)
	}
	if v := h.metric(t, "tokenbroker_credential_material_expiry_timestamp_seconds", "credential=mtls"); v < float64(time.Now().Unix()) {
		t.Errorf("material expiry metric = %v, want the certificate's notAfter", v)
	}

	// A renewed certificate: the metric follows the file.
	renewed, err := clientCA.Client(48*time.Hour, "broker.bank.internal")
	if err != nil {
		t.Fatal(err)
	}
	if err := renewed.WriteFiles(certFile, keyFile); err != nil {
		t.Fatal(err)
	}
	h.secrets = append(h.secrets, string(renewed.KeyPEM))
	want := float64(time.Now().Add(48 * time.Hour).Unix())
	if v := h.metric(t, "tokenbroker_credential_material_expiry_timestamp_seconds", "credential=mtls"); v < want-120 || v > want+120 {
		t.Errorf("material expiry metric after renewal = %v, want the new notAfter (%v)", v, want)
	}
}

// BenchmarkReloadCredentialsDir: a reload of 10,000 credentials in 100
// credentials_dir files (parse, validate, build the upstream clients and
// policies, swap), and a cached GetToken in the core, with those credentials
// in force, before and after reloads.
//
//	go test -run '^$' -bench ReloadCredentialsDir -benchmem -count 3 ./broker/server/
func BenchmarkReloadCredentialsDir(b *testing.B) {
	const files, perFile = 100, 100
	h := newHarness(b, benchConfig(b))
	teams := map[string][]config.Credential{}
	for f := range files {
		list := make([]config.Credential, perFile)
		for i := range list {
			list[i] = h.teamCredential(fmt.Sprintf("team%03d-cred%03d", f, i), payments)
		}
		teams[fmt.Sprintf("team%03d.yaml", f)] = list
	}
	path := h.writeConfigDir(teams)
	if err := h.srv.ReloadFile(path); err != nil { // the 10,000 in force before the first measure too
		b.Fatal(err)
	}
	req := broker.Request{Credential: "identity"}
	hit := func(b *testing.B) {
		runtime.GC() // the reload's garbage is not the hit's cost
		ctx := context.Background()
		if _, err := h.srv.broker.GetToken(ctx, payments, req); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if _, err := h.srv.broker.GetToken(ctx, payments, req); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("hit/before", hit)
	b.Run("reload", func(b *testing.B) {
		for b.Loop() {
			if err := h.srv.ReloadFile(path); err != nil {
				b.Fatal(err)
			}
		}
		if n := len(h.srv.cfgNow.Load().Credentials); n != files*perFile+1 {
			b.Fatalf("%d credentials in force, want %d", n, files*perFile+1)
		}
	})
	b.Run("hit/after", hit)
}
