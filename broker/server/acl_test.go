package server

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// readmeACL returns the ACL SETUSER arguments README gives for the broker's
// Redis user, for key_prefix prefix and password pw.
func readmeACL(t *testing.T, prefix, pw string) []any {
	t.Helper()
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	line := regexp.MustCompile("(?m)^ACL SETUSER tokenbroker .*$").Find(readme)
	if line == nil {
		t.Fatal("README has no line starting with 'ACL SETUSER tokenbroker '")
	}
	var args []any
	for _, f := range strings.Fields(string(line))[1:] { // without ACL
		f = strings.ReplaceAll(f, "tokenbroker:", prefix)
		if f == ">PASSWORD" {
			f = ">" + pw
		}
		args = append(args, f)
	}
	return args
}

// TestRedisLeastPrivilege: three brokers under exactly README's ACL user
// share one fetch, invalidate across replicas, take leases and hear events,
// and Redis denies them nothing (ACL LOG stays empty).
func TestRedisLeastPrivilege(t *testing.T) {
	const admin, pw = "admin-pw-7c1", "broker-pw-51e"
	rs := redistest.StartWith(t, redistest.Options{Password: admin})
	c, ctx := rs.Client(), context.Background()
	args := append([]any{"ACL"}, readmeACL(t, "tb-test:", pw)...)
	if err := c.Do(ctx, args...).Err(); err != nil {
		t.Fatalf("README's ACL: %v", err)
	}
	pwFile := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pwFile, []byte(pw), 0o600); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, func(cf *config.Config) {
		withRedis("", rs.Addr())(cf)
		cf.Store.Redis.Username = "tokenbroker"
		cf.Store.Redis.PasswordFile = pwFile
	})
	srvs, clients := replicas(h, 3)
	req := &pb.GetTokenRequest{Credential: "identity"}
	got := load(h, clients, 20, req)
	if len(got) != 1 || len(errorsIn(got)) > 0 || h.as.TokenRequests() != 1 {
		t.Fatalf("3x20 callers: %v, token requests %d; want one token, one request", got, h.as.TokenRequests())
	}
	a := firstKey(got)
	if resp, err := clients[0].InvalidateToken(ctx, &pb.InvalidateTokenRequest{Credential: "identity", Fingerprint: a}); err != nil || !resp.GetInvalidated() {
		t.Fatalf("InvalidateToken = %v, %v", resp.GetInvalidated(), err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for i, cl := range clients {
		for {
			tok, err := h.get(cl, req)
			if err != nil {
				t.Fatal(err)
			}
			if tok.GetFingerprint() != a {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("replica %d still serves the invalidated token after 5s", i)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if n := h.as.TokenRequests(); n != 2 {
		t.Errorf("token requests = %d, want 2", n)
	}
	for i, s := range srvs {
		if st := s.store.State(); st != "ok" {
			t.Errorf("replica %d: store %s", i, st)
		}
		for _, op := range []string{"get", "put", "lock", "delete"} {
			if n := metricAt(t, s, "tokenbroker_store_errors_total", "op="+op); n != 0 {
				t.Errorf("replica %d: %v store errors (%s)", i, n, op)
			}
		}
	}
	if denied := c.Do(ctx, "ACL", "LOG").Val(); denied != nil && len(denied.([]any)) > 0 {
		t.Errorf("Redis denied the broker's user: %v", denied)
	}
	if who := c.Do(ctx, "CLIENT", "LIST").String(); !strings.Contains(who, "user=tokenbroker") {
		t.Errorf("no connection as the ACL user: %s", who)
	}
}
