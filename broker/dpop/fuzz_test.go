package dpop_test

import (
	"net/url"
	"strings"
	"testing"

	"github.com/tokenbroker/tokenbroker/broker/dpop"
)

// FuzzHTU: whatever a caller sends as dpop.url, an accepted one yields an
// htu that is an absolute http(s) URL without user information, query or
// fragment, and that HTU leaves as it is.
//
//	go test -run '^$' -fuzz FuzzHTU -fuzztime 30s ./broker/dpop/
func FuzzHTU(f *testing.F) {
	for _, s := range []string{"https://API.example:443/a/b?q=1#f", "http://[::1]:80", "https://h/%7E/x", "https://h/a%2Fb",
		"https://u@h/", "HTTPS://H/", "https://h:8443/../x", "https://h/?", "https://h#", "//h/x", "https:///x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		htu, err := dpop.HTU(raw)
		if err != nil {
			return
		}
		u, err := url.Parse(htu)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.User != nil ||
			u.RawQuery != "" || u.Fragment != "" || strings.ContainsAny(htu, "?#") {
			t.Fatalf("HTU(%q) = %q", raw, htu)
		}
		if again, err := dpop.HTU(htu); err != nil || again != htu {
			t.Fatalf("HTU(HTU(%q)) = %q, %v; want %q", raw, again, err, htu)
		}
	})
}
