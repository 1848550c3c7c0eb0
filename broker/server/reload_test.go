package server

import (
	"os"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

func TestConfigReload(t *testing.T) {
	h := newHarness(t, nil)
	write := func(c *config.Config) string {
		b, err := yaml.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		h.write("config.yaml", string(b))
		return h.path("config.yaml")
	}
	req := &pb.GetTokenRequest{Credential: "identity"}
	outsider := h.client(stranger)
	if _, err := h.get(outsider, req); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("before: %v, want PermissionDenied", err)
	}

	// A valid change takes effect without a restart; a listener change is only reported.
	next := *h.cfg
	next.Credentials = append([]config.Credential(nil), h.cfg.Credentials...)
	next.Credentials[0].AllowedCallers = append([]config.AllowedCaller{{Caller: stranger}}, h.cfg.Credentials[0].AllowedCallers...)
	next.ListenAddr = "127.0.0.1:1"
	path := write(&next)
	if err := h.srv.ReloadFile(path); err != nil {
		t.Fatalf("ReloadFile: %v", err)
	}
	if _, err := h.get(outsider, req); err != nil {
		t.Errorf("after adding the caller: %v", err)
	}
	if !strings.Contains(h.logs.String(), `"need_restart":["listen_addr"]`) {
		t.Error("the listen_addr change was not reported as needing a restart")
	}

	// An invalid file is rejected and the configuration in force stays.
	if err := os.WriteFile(path, []byte("credentials: [{name: identity, tokn_url: x}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := h.srv.ReloadFile(path); err == nil || !strings.Contains(err.Error(), "tokn_url: unknown key") {
		t.Errorf("ReloadFile of a bad file = %v, want the key named", err)
	}
	if _, err := h.get(outsider, req); err != nil {
		t.Errorf("after a rejected reload: %v; want the previous configuration in force", err)
	}
	if !strings.Contains(h.logs.String(), "configuration rejected; the previous one stays in force") {
		t.Error("no log line for the rejected configuration")
	}
	if err := h.stop(); err != nil {
		t.Fatal(err)
	}
	events := auditLines(t, h.audit.String())
	var reloaded []string
	for _, e := range events {
		if e.Event == "config.reloaded" {
			reloaded = append(reloaded, e.Outcome)
		}
	}
	if strings.Join(reloaded, ",") != "ok,rejected" {
		t.Errorf("config.reloaded outcomes = %v, want ok, rejected", reloaded)
	}
}
