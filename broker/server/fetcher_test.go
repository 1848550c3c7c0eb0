package server

import (
	"context"
	"slices"
	"strings"
	"testing"

	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// TestUpstreamClientAtFirstFetch: a credential's upstream client is made at
// its first fetch, and kept; a background check before it keeps none. Its
// upstream configuration is still checked when it is loaded: a CA file that
// holds no certificate fails the load and the reload, naming the credential.
func TestUpstreamClientAtFirstFetch(t *testing.T) {
	h := newHarness(t, nil)
	creds, err := brokerCredentials(h.cfg, h.clock.Now, nil)
	if err != nil {
		t.Fatal(err)
	}
	f := creds[0].Fetcher.(*fetcher)
	if f.client.Load() != nil {
		t.Fatal("the upstream client was made at load")
	}
	if err := f.Check(context.Background()); err != nil {
		t.Fatalf("Check: %v", err)
	}
	if f.client.Load() != nil {
		t.Fatal("a check kept an upstream client")
	}
	if _, err := f.Fetch(context.Background(), creds[0].Scopes); err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	made := f.client.Load()
	if made == nil {
		t.Fatal("no upstream client after a fetch")
	}
	if _, err := f.Fetch(context.Background(), creds[0].Scopes); err != nil || f.client.Load() != made {
		t.Errorf("second Fetch: %v; want it to use the client the first made", err)
	}

	// The running broker fetches through the same kind of fetcher.
	if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}

	h.write("not-a-ca.pem", "no certificate here\n")
	next := *h.cfg
	next.Credentials = slices.Clone(h.cfg.Credentials)
	next.Credentials[0].TLSCAFile = h.path("not-a-ca.pem")
	for what, err := range map[string]error{
		"load":   func() error { _, err := brokerCredentials(&next, h.clock.Now, nil); return err }(),
		"reload": h.srv.Reload(&next),
	} {
		if err == nil || !strings.Contains(err.Error(), "credentials[0]") || !strings.Contains(err.Error(), "CA file") {
			t.Errorf("%s with a CA file of no certificate: %v; want an error naming credentials[0] and its CA file", what, err)
		}
	}
	if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Errorf("after the rejected reload: %v; want the configuration in force kept", err)
	}
}
