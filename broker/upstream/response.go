package upstream

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/url"
	"strings"
)

// maxBody caps the token endpoint's response body. A token response is a
// few kilobytes; anything past the cap is not read.
const maxBody = 1 << 20

// tokenResponse is a parsed token endpoint response body (RFC 6749 §5.1 and
// §5.2): the members the broker reads, each of which appeared once.
type tokenResponse struct {
	accessToken, tokenType, scope string
	// expiresIn is nil when absent, else a float64 or a string (as some
	// servers and every form-encoded body send it).
	expiresIn any
	// errorCode is the RFC 6749 §5.2 error member.
	errorCode string
	// errorDescription is its error_description, as sent.
	errorDescription string
}

// errDuplicate: a member appears twice. Two parsers (or two versions of one)
// may then read two different tokens or lifetimes from one response, so it is
// refused whole.
var errDuplicate = errors.New("a member appears more than once")

// parseBody parses a response body by its content type: form-encoded for
// application/x-www-form-urlencoded and text/plain (as GitHub-era servers
// answer), JSON otherwise.
func parseBody(contentType string, body []byte) (tokenResponse, error) {
	mt, _, _ := mime.ParseMediaType(contentType)
	if mt == "application/x-www-form-urlencoded" || mt == "text/plain" {
		return parseForm(body)
	}
	return parseJSON(body)
}

func parseForm(body []byte) (tokenResponse, error) {
	vals, err := url.ParseQuery(string(body))
	if err != nil {
		return tokenResponse{}, errors.New("form-encoded body does not parse")
	}
	for _, v := range vals {
		if len(v) > 1 {
			return tokenResponse{}, errDuplicate
		}
	}
	var r tokenResponse
	r.accessToken, r.tokenType, r.scope, r.errorCode = vals.Get("access_token"), vals.Get("token_type"), vals.Get("scope"), vals.Get("error")
	r.errorDescription = vals.Get("error_description")
	if vals.Has("expires_in") {
		r.expiresIn = vals.Get("expires_in")
	}
	return r, nil
}

// parseJSON parses a JSON object, refusing duplicate members at the top
// level (names compared without regard to case, as encoding/json matches
// them) and anything after the object.
func parseJSON(body []byte) (tokenResponse, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return tokenResponse{}, errors.New("body is not a JSON object")
	}
	members := map[string]json.RawMessage{}
	seen := map[string]bool{}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return tokenResponse{}, errors.New("body is not valid JSON")
		}
		name, _ := t.(string) // object keys are always strings
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return tokenResponse{}, errors.New("body is not valid JSON")
		}
		folded := strings.ToLower(name)
		if seen[folded] {
			return tokenResponse{}, errDuplicate
		}
		seen[folded] = true
		members[name] = v
	}
	if t, err := dec.Token(); err != nil || t != json.Delim('}') {
		return tokenResponse{}, errors.New("body is not valid JSON")
	}
	if _, err := dec.Token(); err != io.EOF {
		return tokenResponse{}, errors.New("data after the JSON object")
	}

	var r tokenResponse
	for _, f := range []struct {
		name string
		dst  *string
	}{{"access_token", &r.accessToken}, {"token_type", &r.tokenType}, {"scope", &r.scope}, {"error", &r.errorCode}} {
		if err := jsonString(members[f.name], f.dst); err != nil {
			return tokenResponse{}, fmt.Errorf("%s is not a string", f.name)
		}
	}
	// A description that is not a string is only lost: the error code stays.
	_ = jsonString(members["error_description"], &r.errorDescription)
	if raw := members["expires_in"]; raw != nil && string(raw) != "null" {
		var s string
		var n float64
		switch {
		case json.Unmarshal(raw, &s) == nil:
			r.expiresIn = s
		case json.Unmarshal(raw, &n) == nil:
			r.expiresIn = n
		default:
			return tokenResponse{}, errors.New("expires_in is not a number")
		}
	}
	return r, nil
}

// jsonString sets *dst from a JSON string; absent and null leave it empty.
func jsonString(raw json.RawMessage, dst *string) error {
	if raw == nil || string(raw) == "null" {
		return nil
	}
	return json.Unmarshal(raw, dst)
}
