package oauthtest

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

func TestRejectsWhatARealServerRejects(t *testing.T) {
	s := New(Options{ExpiresIn: time.Minute})
	s.AddClient(Client{ID: "app", Secret: "pw", Scopes: []string{"IDENTITY"}})
	if err := s.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	form := func(kv ...string) url.Values {
		v := url.Values{}
		for i := 0; i+1 < len(kv); i += 2 {
			v.Set(kv[i], kv[i+1])
		}
		return v
	}
	tests := []struct {
		name       string
		method     string
		basic      [2]string
		body       url.Values
		wantStatus int
		wantError  string
	}{
		{"post auth", "POST", [2]string{}, form("grant_type", "client_credentials", "client_id", "app", "client_secret", "pw"), 200, ""},
		{"basic auth", "POST", [2]string{"app", "pw"}, form("grant_type", "client_credentials", "scope", "IDENTITY"), 200, ""},
		{"GET", "GET", [2]string{"app", "pw"}, nil, 405, ""},
		{"wrong secret", "POST", [2]string{"app", "nope"}, form("grant_type", "client_credentials"), 401, "invalid_client"},
		{"unknown client", "POST", [2]string{}, form("grant_type", "client_credentials", "client_id", "x", "client_secret", "pw"), 401, "invalid_client"},
		{"no auth", "POST", [2]string{}, form("grant_type", "client_credentials"), 401, "invalid_client"},
		{"two auth methods", "POST", [2]string{"app", "pw"}, form("grant_type", "client_credentials", "client_id", "app", "client_secret", "pw"), 400, "invalid_request"},
		{"scope not allowed", "POST", [2]string{"app", "pw"}, form("grant_type", "client_credentials", "scope", "ADMIN"), 400, "invalid_scope"},
		{"other grant", "POST", [2]string{"app", "pw"}, form("grant_type", "password"), 400, "unsupported_grant_type"},
	}
	for _, tt := range tests {
		req, err := http.NewRequest(tt.method, s.TokenURL(), strings.NewReader(tt.body.Encode()))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		if tt.basic[0] != "" {
			req.SetBasicAuth(tt.basic[0], tt.basic[1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var body map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if resp.StatusCode != tt.wantStatus {
			t.Errorf("%s: status %d, want %d", tt.name, resp.StatusCode, tt.wantStatus)
		}
		if tt.wantError != "" && body["error"] != tt.wantError {
			t.Errorf("%s: error %v, want %s", tt.name, body["error"], tt.wantError)
		}
		if tt.wantStatus == 200 {
			tok, _ := body["access_token"].(string)
			if _, ok := s.Lookup(tok); !ok || body["token_type"] != "Bearer" || body["expires_in"] != float64(60) || body["scope"] != "IDENTITY" {
				t.Errorf("%s: response %v is not a recorded Bearer token for 60s with scope IDENTITY", tt.name, body)
			}
		}
	}
	if got := s.TokenRequests(); got != int64(len(tests)) {
		t.Errorf("TokenRequests = %d, want %d", got, len(tests))
	}
}
