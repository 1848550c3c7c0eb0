package upstream

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/bearer"
)

// FuzzTokenResponse sends arbitrary token endpoint responses through the whole
// client path (HTTP, parsing, validation). A response yields either a valid
// token or an *Error, never a panic; an error never carries the body; an
// accepted token is a bearer token (RFC 6750 b64token); and no body with a
// member that appears twice is accepted.
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
		{200, false, `{"access_token":"a","token_type":"Bearer","expires_in":300,"expires_in":99999999}`},
		{200, false, `{"access_token":"a","ACCESS_TOKEN":"b","token_type":"Bearer"}`},
		{200, false, `{"access_token":"abc\r\nX-Evil: 1","token_type":"Bearer"}`},
		{200, false, `{"access_token":"abc def","token_type":"Bearer"}`},
		{200, false, `{"access_token":"YWJj==","token_type":"Bearer"} {}`},
		{200, true, `access_token=a&access_token=b&token_type=Bearer`},
		{200, true, `access_token=a%0d%0a&token_type=Bearer`},
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
		if !bearer.Valid(tok.AccessToken) || !strings.EqualFold(tok.TokenType, "Bearer") {
			t.Fatalf("accepted token %+v", tok)
		}
		if dup := duplicateMember(form, body); dup != "" {
			t.Fatalf("accepted a body in which %q appears twice", dup)
		}
		if lt := tok.Expiry.Sub(tok.IssuedAt); lt <= 0 || lt > 24*time.Hour {
			t.Fatalf("accepted lifetime %v", lt)
		}
		if len(tok.Scopes) == 0 {
			t.Fatal("accepted a token without the scope asked for")
		}
	})
}

// duplicateMember returns a top-level member name that body holds twice
// (case-folded for JSON), or "". It is the fuzz target's oracle, written
// apart from the parser it checks.
func duplicateMember(form bool, body []byte) string {
	if form {
		vals, err := url.ParseQuery(string(body))
		if err != nil {
			return ""
		}
		for k, v := range vals {
			if len(v) > 1 {
				return k
			}
		}
		return ""
	}
	var top map[string]json.RawMessage
	if json.Unmarshal(body, &top) != nil {
		return ""
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	seen := map[string]bool{}
	depth := 0
	expectKey := false
	for {
		t, err := dec.Token()
		if err != nil {
			return ""
		}
		switch v := t.(type) {
		case json.Delim:
			if v == '{' || v == '[' {
				depth++
			} else {
				depth--
			}
			expectKey = depth == 1
			continue
		case string:
			if depth == 1 && expectKey {
				k := strings.ToLower(v)
				if seen[k] {
					return v
				}
				seen[k] = true
				expectKey = false
				continue
			}
		}
		expectKey = depth == 1
	}
}
