package client

import (
	"net/http"
	"testing"
)

func TestTokenRejected(t *testing.T) {
	for _, tt := range []struct {
		name   string
		header []string
		want   bool
	}{
		{"no challenge", nil, true},
		{"bearer, no error", []string{`Bearer realm="bank"`}, true},
		{"bare bearer", []string{`Bearer`}, true},
		{"invalid_token", []string{`Bearer realm="bank", error="invalid_token", error_description="expired"`}, true},
		{"invalid_token as a token", []string{`Bearer error=invalid_token`}, true},
		{"scheme in another case", []string{`bearer error="invalid_token"`}, true},
		{"insufficient_scope", []string{`Bearer realm="bank", error="insufficient_scope", scope="IDENTITY_WRITE"`}, false},
		{"invalid_request", []string{`Bearer error="invalid_request"`}, false},
		{"unknown error", []string{`Bearer error="something_else"`}, false},
		{"quoted comma and escape", []string{`Bearer error_description="a, \"b\"", error="insufficient_scope"`}, false},
		{"two challenges, the bearer one says scope", []string{`Basic realm="x", Bearer error="insufficient_scope"`}, false},
		{"two header values", []string{`Basic realm="x"`, `Bearer error="invalid_token"`}, true},
		{"another scheme only", []string{`Basic realm="x"`}, true},
		{"DPoP only", []string{`DPoP error="invalid_token"`}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			resp := &http.Response{Header: http.Header{}}
			for _, h := range tt.header {
				resp.Header.Add("WWW-Authenticate", h)
			}
			if got := tokenRejected(resp); got != tt.want {
				t.Errorf("tokenRejected(%q) = %v, want %v", tt.header, got, tt.want)
			}
		})
	}
}
