package client_test

import (
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/oauth2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker/client"
	"github.com/tokenbroker/tokenbroker/broker/devmode"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

var _ oauth2.TokenSource = (*client.Source)(nil)

// fakeClock is a settable clock for a Source.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }

func (c *fakeClock) Set(t time.Time) { c.mu.Lock(); defer c.mu.Unlock(); c.t = t }

func TestTokenSourceColdCallersShareOneCall(t *testing.T) {
	b := newBroker(t)
	conn, calls := b.conn(t)
	ts := client.TokenSource(conn, devmode.Credential)
	defer ts.Close()

	const callers = 100
	toks := make(chan *oauth2.Token, callers)
	errs := make(chan error, callers)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			tok, err := ts.Token()
			if err != nil {
				errs <- err
				return
			}
			toks <- tok
		}()
	}
	close(start)
	wg.Wait()
	close(toks)
	close(errs)
	for err := range errs {
		t.Fatalf("Token: %v", err)
	}
	seen := map[string]bool{}
	for tok := range toks {
		seen[tok.AccessToken] = true
		if tok.TokenType != "Bearer" || !tok.Valid() || client.Fingerprint(tok) == "" {
			t.Fatalf("token %+v: want a valid Bearer token with a fingerprint", tok)
		}
		if _, ok := b.env.OAuth.Lookup(tok.AccessToken); !ok {
			t.Fatal("the token was not issued by the authorization server")
		}
	}
	if len(seen) != 1 || calls.get.Load() != 1 {
		t.Fatalf("%d callers: %d distinct tokens, %d GetToken calls; want 1 and 1", callers, len(seen), calls.get.Load())
	}
	// Warm: no call at all.
	for range callers {
		if _, err := ts.Token(); err != nil {
			t.Fatal(err)
		}
	}
	if n := calls.get.Load(); n != 1 {
		t.Errorf("warm calls made %d GetToken calls in all, want 1", n)
	}
}

// TestTokenSourceCachesUntilMinTTL: no call while the token has more than
// min_ttl left, even after the broker rotated it; then one call, which
// returns the rotated token.
func TestTokenSourceCachesUntilMinTTL(t *testing.T) {
	b := newBroker(t)
	conn, calls := b.conn(t)
	clock := &fakeClock{t: time.Now()}
	ts := client.TokenSource(conn, devmode.Credential, client.WithMinTTL(time.Minute), client.WithNow(clock.Now))
	defer ts.Close()

	first, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	if left := time.Until(first.Expiry); left < time.Minute {
		t.Fatalf("the broker gave a token with %v left, below the requested min_ttl", left)
	}
	b.rotate(t, client.Fingerprint(first))

	// Up to a second before min_ttl is reached: the cached token, no call.
	clock.Set(first.Expiry.Add(-time.Minute - time.Second))
	if tok, err := ts.Token(); err != nil || tok.AccessToken != first.AccessToken || calls.get.Load() != 1 {
		t.Fatalf("within min_ttl: same token %v, %v, %d GetToken calls; want the cached token and 1 call",
			tok != nil && tok.AccessToken == first.AccessToken, err, calls.get.Load())
	}
	// Past it: one call, and the broker's new token.
	clock.Set(first.Expiry.Add(-time.Minute + time.Second))
	next, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	if client.Fingerprint(next) == client.Fingerprint(first) || calls.get.Load() != 2 {
		t.Errorf("past min_ttl: rotated %v, %d GetToken calls; want the new token after 1 more call",
			client.Fingerprint(next) != client.Fingerprint(first), calls.get.Load())
	}
}

// TestTokenSourceWatchGetsRotations: with WithWatch, a rotation on the broker
// reaches the Source without a GetToken, and after a broker restart the
// stream reconnects and brings the new broker's token.
func TestTokenSourceWatchGetsRotations(t *testing.T) {
	b := newBroker(t)
	conn, calls := b.conn(t)
	ts := client.TokenSource(conn, devmode.Credential, client.WithWatch())
	defer ts.Close()

	first, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the watch stream is open", func() bool { return calls.watch.Load() == 1 })
	gets := calls.get.Load() // 0 or 1: the first Token may beat the stream's first message

	current := func() string {
		tok, err := ts.Token()
		if err != nil {
			t.Fatal(err)
		}
		return client.Fingerprint(tok)
	}
	b.rotate(t, client.Fingerprint(first))
	eventually(t, "the rotation reaches the Source", func() bool { return current() != client.Fingerprint(first) })
	rotated := current()
	if n := calls.get.Load(); n != gets {
		t.Errorf("GetToken calls went from %d to %d during the rotation; want none", gets, n)
	}

	b.restart(t) // a new process with an empty memory store: a new token
	eventually(t, "the stream reconnects after the restart", func() bool { return calls.watch.Load() >= 2 })
	eventually(t, "the restarted broker's token reaches the Source", func() bool { return current() != rotated })
	if n := calls.get.Load(); n != gets {
		t.Errorf("GetToken calls went from %d to %d across the restart; want none", gets, n)
	}
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestTokenSourceServesCachedTokenWhileBrokerDown: a token that is below
// min_ttl but still valid beats an error while the broker is unreachable; a
// refusal is returned as it is.
func TestTokenSourceServesCachedTokenWhileBrokerDown(t *testing.T) {
	b := newBroker(t)
	conn, _ := b.conn(t)
	clock := &fakeClock{t: time.Now()}
	ts := client.TokenSource(conn, devmode.Credential, client.WithNow(clock.Now), client.WithTimeout(2*time.Second))
	defer ts.Close()
	first, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	if err := b.stop(); err != nil {
		t.Fatal(err)
	}
	clock.Set(first.Expiry.Add(-10 * time.Second)) // below min_ttl, still valid
	if tok, err := ts.Token(); err != nil || tok.AccessToken != first.AccessToken {
		t.Errorf("broker down, token still valid: %v; want the cached token", err)
	}
	clock.Set(first.Expiry.Add(time.Second))
	if _, err := ts.Token(); status.Code(err) != codes.Unavailable {
		t.Errorf("broker down, token expired: %v; want UNAVAILABLE", err)
	}

	// Refused: the caller's identity is not allowed. No stale fallback applies.
	b.restart(t)
	denied := b.files()
	denied.CertFile, denied.KeyFile = b.env.Path(devmode.DeniedCertFile), b.env.Path(devmode.DeniedKeyFile)
	dconn, err := client.DialFiles(b.addr, denied)
	if err != nil {
		t.Fatal(err)
	}
	defer dconn.Close()
	if _, err := client.TokenSource(dconn, devmode.Credential).Token(); status.Code(err) != codes.PermissionDenied {
		t.Errorf("denied caller: %v, want PERMISSION_DENIED", err)
	}
}

// TestDialFilesFollowsRenewedCertificates: new connections use the files as
// they are now; files that do not load leave the previous material in use.
func TestDialFilesFollowsRenewedCertificates(t *testing.T) {
	b := newBroker(t)
	dir := t.TempDir()
	files := client.TLSFiles{CAFile: dir + "/ca.pem", CertFile: dir + "/tls.crt", KeyFile: dir + "/tls.key"}
	install := func(cert, key string) {
		t.Helper()
		for src, dst := range map[string]string{b.env.Path(devmode.CAFile): files.CAFile, cert: files.CertFile, key: files.KeyFile} {
			raw, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(dst, raw, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	install(b.env.Path(devmode.ClientCertFile), b.env.Path(devmode.ClientKeyFile))
	conn, err := client.DialFiles(b.addr, files)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := pb.NewTokenBrokerClient(conn)
	get := func() error {
		_, err := c.GetToken(t.Context(), &pb.GetTokenRequest{Credential: devmode.Credential})
		return err
	}
	if err := get(); err != nil {
		t.Fatalf("with the allowed identity: %v", err)
	}

	// "Renewed" with another identity; the next connection presents it.
	install(b.env.Path(devmode.DeniedCertFile), b.env.Path(devmode.DeniedKeyFile))
	b.restart(t)
	eventually(t, "the new connection presents the renewed certificate", func() bool {
		return status.Code(get()) == codes.PermissionDenied
	})

	// A broken renewal: the material loaded before stays in use.
	if err := os.WriteFile(files.CertFile, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	b.restart(t)
	eventually(t, "a connection with the previous material", func() bool {
		err := get()
		return status.Code(err) == codes.PermissionDenied && !strings.Contains(err.Error(), "certificate")
	})
}
