package main

import (
	"net/http"
	"testing"
)

// TestReviewAgentPathParameterDotSegments: a segment that is ".." followed
// by a path parameter (";" and anything) is not a dot segment for RFC 3986,
// but Tomcat and the servers behind Spring strip the parameter and then
// resolve "..": "/..;/admin/x" reaches /admin/x there. The proxy must refuse
// it as it refuses "/../admin/x", before anything is forwarded with the token.
func TestReviewAgentPathParameterDotSegments(t *testing.T) {
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
	for _, path := range []string{"/..;/admin/x", "/identity/..;/..;/admin/x", "/%2e%2e;x=1/admin/x", "/.;/..;jsessionid=1/admin"} {
		t.Run(path, func(t *testing.T) {
			before, _ := e.seen()
			got := rawRequest(t, listen, path, listen, nil)
			after, _ := e.seen()
			if got != http.StatusBadRequest {
				t.Errorf("GET %s: %d, want 400", path, got)
			}
			if n := len(after) - len(before); n != 0 {
				t.Errorf("GET %s: %d requests forwarded with the token (last upstream path %q)", path, n, after[len(after)-1].URL.EscapedPath())
			}
		})
	}
}
