package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestAgentProxyRefusesAbuse: the agent attacks of issue 23, sent as raw
// HTTP/1.1 to the proxy so that nothing on the way cleans them up. A
// DNS-rebinding Host, a browser's cross-site request and a path that climbs
// out of the upstream's base path (plain or percent-encoded dot segments)
// are refused before anything is forwarded with the token; the same request
// with a loopback Host, no Origin, and a path that stays under the base
// goes through.
func TestAgentProxyRefusesAbuse(t *testing.T) {
	e := newAgentEnv(t)
	health := "127.0.0.1:" + freePort(t)
	listen := "127.0.0.1:" + freePort(t)
	startAgent(t, e, "--listen", listen, "--upstream", e.api.URL+"/api", "--upstream-ca", e.apiCA, "--health", health)
	eventually(t, "the agent is healthy", func() bool {
		resp, err := http.Get("http://" + health + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	_, port, _ := net.SplitHostPort(listen)

	for _, tt := range []struct {
		name, path, host string
		headers          []string
		want             int
	}{
		{"plain request", "/identity/v1/me", listen, nil, 200},
		{"localhost", "/identity/v1/me", "localhost:" + port, nil, 200},
		{"same-site page on another loopback port", "/identity/v1/me", listen, []string{"Origin: http://localhost:3000", "Sec-Fetch-Site: same-site"}, 200},
		{"dot segments that stay under the base", "/identity/x/../v1/./me", listen, nil, 200},
		{"DNS rebinding", "/identity/v1/me", "attacker.example", nil, 403},
		{"DNS rebinding with the port", "/identity/v1/me", "attacker.example:" + port, nil, 403},
		{"another port", "/identity/v1/me", "127.0.0.1:1", nil, 403},
		{"cross-site Origin", "/identity/v1/me", listen, []string{"Origin: https://attacker.example"}, 403},
		{"opaque Origin", "/identity/v1/me", listen, []string{"Origin: null"}, 403},
		{"Sec-Fetch-Site cross-site", "/identity/v1/me", listen, []string{"Sec-Fetch-Site: cross-site"}, 403},
		{"climbing out", "/api/../../admin/x", listen, nil, 400},
		{"climbing out, encoded", "/%2e%2e/admin/x", listen, nil, 400},
		{"climbing out, mixed", "/identity/.%2E/%2e./admin", listen, nil, 400},
		{"encoded slash beside dots", "/..%2fadmin", listen, nil, 400},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before, _ := e.seen()
			got := rawRequest(t, listen, tt.path, tt.host, tt.headers)
			after, _ := e.seen()
			if got != tt.want {
				t.Fatalf("GET %s Host %s %v: %d, want %d", tt.path, tt.host, tt.headers, got, tt.want)
			}
			if forwarded := len(after) - len(before); tt.want != 200 && forwarded != 0 {
				t.Errorf("refused, yet %d requests reached the upstream", forwarded)
			}
			if tt.want == 200 && after[len(after)-1].URL.EscapedPath() != "/api/identity/v1/me" {
				t.Errorf("upstream path %q, want /api/identity/v1/me", after[len(after)-1].URL.EscapedPath())
			}
		})
	}
}

// rawRequest sends one GET as written, and returns the status code.
func rawRequest(t *testing.T, addr, path, host string, headers []string) int {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	req := fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n", path, host, headerLines(headers))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func headerLines(hs []string) string {
	var b strings.Builder
	for _, h := range hs {
		b.WriteString(h + "\r\n")
	}
	return b.String()
}
