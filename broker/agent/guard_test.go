package agent

import (
	"net/http"
	"net/url"
	"testing"
)

func TestUpstreamPath(t *testing.T) {
	for _, tt := range []struct {
		base, in string
		want     string // "" means refused
	}{
		{"https://bank.example/api", "/identity/v1/me", "/api/identity/v1/me"},
		{"https://bank.example/api/", "/identity/v1/me", "/api/identity/v1/me"},
		{"https://bank.example", "/identity/v1/me", "/identity/v1/me"},
		{"https://bank.example/api", "/", "/api/"},
		{"https://bank.example/api", "/a/./b/../c", "/api/a/c"},
		{"https://bank.example/api", "/a/b/..", "/api/a/"},
		{"https://bank.example/api", "/a%20b/c%2Fd", "/api/a%20b/c%2Fd"},
		{"https://bank.example/api", "/../../admin/x", ""},
		{"https://bank.example/api", "/x/../../admin/x", ""},
		{"https://bank.example/api", "/%2e%2e/admin/x", ""},
		{"https://bank.example/api", "/%2E%2e/%2e%2E/admin", ""},
		{"https://bank.example/api", "/.%2e/admin", ""},
		{"https://bank.example/api", "/..", ""},
		{"https://bank.example/api", "/..%2fadmin", ""},
		{"https://bank.example/api", "/..%5cadmin", ""},
		{"https://bank.example/api", "/a/%2e%2e/b", "/api/b"},
		{"https://bank.example", "/../../etc/passwd", "/etc/passwd"}, // the root: nothing to leave
		{"https://bank.example/api", "/apix/../../apix", ""},
	} {
		base, _ := url.Parse(tt.base)
		in, err := url.Parse(tt.in)
		if err != nil {
			t.Fatal(err)
		}
		_, raw, err := upstreamPath(base, in)
		if tt.want == "" {
			if err == nil {
				t.Errorf("%s + %s = %q, want refused", tt.base, tt.in, raw)
			}
			continue
		}
		if err != nil || raw != tt.want {
			t.Errorf("%s + %s = %q, %v; want %q", tt.base, tt.in, raw, err, tt.want)
		}
	}
}

func TestHostAndOrigin(t *testing.T) {
	a := &Agent{}
	for _, tt := range []struct {
		host string
		any  bool
		want bool
	}{
		{"127.0.0.1:8080", false, true},
		{"localhost:8080", false, true},
		{"LOCALHOST:8080", false, true},
		{"[::1]:8080", false, true},
		{"127.0.0.2:8080", false, true},
		{"127.0.0.1:8081", false, false},
		{"127.0.0.1", false, false},
		{"attacker.example:8080", false, false},
		{"attacker.example", false, false},
		{"10.0.0.5:8080", false, false},
		{"10.0.0.5:8080", true, true},
		{"agent.svc:8080", true, false},
	} {
		a.cfg.ListenAny = tt.any
		if got := a.hostAllowed(tt.host, "8080"); got != tt.want {
			t.Errorf("Host %q (listen-any %v) allowed = %v, want %v", tt.host, tt.any, got, tt.want)
		}
	}
	for _, tt := range []struct {
		origin, fetchSite string
		want              bool
	}{
		{"", "", false},
		{"http://localhost:3000", "", false},
		{"http://127.0.0.1:8080", "same-origin", false},
		{"http://[::1]:3000", "same-site", false},
		{"https://attacker.example", "", true},
		{"null", "", true},
		{"", "cross-site", true},
		{"http://localhost:3000", "cross-site", true},
		{"http://localhost.attacker.example", "", true},
	} {
		r, _ := http.NewRequest(http.MethodGet, "http://127.0.0.1:8080/", nil)
		if tt.origin != "" {
			r.Header.Set("Origin", tt.origin)
		}
		if tt.fetchSite != "" {
			r.Header.Set("Sec-Fetch-Site", tt.fetchSite)
		}
		if got := crossSite(r); got != tt.want {
			t.Errorf("Origin %q, Sec-Fetch-Site %q: cross-site = %v, want %v", tt.origin, tt.fetchSite, got, tt.want)
		}
	}
}
