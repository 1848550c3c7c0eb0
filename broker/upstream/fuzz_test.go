package upstream

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// FuzzTokenResponse sends arbitrary token endpoint responses through the whole
// client path (HTTP, the oauth2 library's parsing, our validation). A response
// yields either a valid token or an *Error, never a panic, and an error never
// carries the body.
func FuzzTokenResponse(f *testing.F) {
	type resp struct {
		status int
		ctype  string
		body   []byte
	}
	var cur atomic.Pointer[resp]
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		r := cur.Load()
		w.Header().Set("Content-Type", r.ctype)
		w.WriteHeader(r.status)
		_, _ = w.Write(r.body)
	}))
	defer srv.Close()
	secretFile := secretFileFor(f)
	c, err := New(Config{TokenURL: srv.URL, ClientID: "app", ClientSecretFile: secretFile, MaxTTL: 24 * time.Hour, Timeout: 5 * time.Second})
	if err != nil {
		f.Fatal(err)
	}

	for _, seed := range []struct {
		status int
		form   bool
		body   string
	}{
		{200, false, `{"access_token":"a","token_type":"Bearer","expires_in":3600,"scope":"IDENTITY"}`},
		{200, false, `{"access_token":"a","token_type":"bearer"}`},
		{200, false, `{"access_token":"a","token_type":"Bearer","expires_in":"3600"}`},
		{200, false, `{"access_token":"a","token_type":"Bearer","expires_in":-1}`},
		{200, false, `{"access_token":"a","token_type":"Bearer","expires_in":1e300}`},
		{200, false, `{"access_token":"","token_type":"Bearer"}`},
		{200, false, `{"access_token":"a","token_type":"mac"}`},
		{200, false, `{"access_token":"a","token_type":"Bearer","scope":"OTHER"}`},
		{200, false, `{"error":"invalid_client"}`},
		{200, false, `{"access_token": "trunc`},
		{200, false, `[1,2,3]`},
		{200, false, `null`},
		{200, true, `access_token=a&token_type=Bearer&expires_in=60`},
		{200, true, `access_token=a&token_type=Bearer&expires_in=1.5`},
		{200, true, `%zz`},
		{400, false, `{"error":"invalid_scope","error_description":"no"}`},
		{401, false, ``},
		{429, false, `slow down`},
		{500, false, `<html>oops</html>`},
		{302, false, ``},
	} {
		f.Add(seed.status, seed.form, []byte(seed.body))
	}
	f.Fuzz(func(t *testing.T, status int, form bool, body []byte) {
		if status < 200 || status > 599 {
			status = 200 + (status%400+400)%400
		}
		ctype := "application/json"
		if form {
			ctype = "application/x-www-form-urlencoded"
		}
		cur.Store(&resp{status: status, ctype: ctype, body: body})
		tok, err := c.Fetch(context.Background(), []string{"IDENTITY"})
		if err != nil {
			var ue *Error
			if !errors.As(err, &ue) {
				t.Fatalf("error %v is not an *Error", err)
			}
			if len(body) >= 16 && strings.Contains(err.Error(), string(body)) {
				t.Fatalf("error %q carries the response body", err)
			}
			return
		}
		if tok.AccessToken == "" || !strings.EqualFold(tok.TokenType, "Bearer") {
			t.Fatalf("accepted token %+v", tok)
		}
		if lt := tok.Expiry.Sub(tok.IssuedAt); lt <= 0 || lt > 24*time.Hour {
			t.Fatalf("accepted lifetime %v", lt)
		}
		if len(tok.Scopes) == 0 {
			t.Fatal("accepted a token without the scope asked for")
		}
	})
}
