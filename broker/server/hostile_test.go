package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// sink is a TCP listener on loopback that counts the connections made to it
// and keeps every byte sent: the place a redirect points to.
type sink struct {
	ln    net.Listener
	conns atomic.Int64
	mu    sync.Mutex
	got   []byte
}

func newSink(t *testing.T) *sink {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &sink{ln: ln}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.conns.Add(1)
			go func() {
				defer c.Close()
				_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
				b, _ := io.ReadAll(c)
				s.mu.Lock()
				s.got = append(s.got, b...)
				s.mu.Unlock()
			}()
		}
	}()
	return s
}

func (s *sink) addr() string { return s.ln.Addr().String() }

// received reports what reached the sink, after giving a stray connection time to arrive.
func (s *sink) received() (int64, int) {
	time.Sleep(100 * time.Millisecond)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns.Load(), len(s.got)
}

// TestRedirectIsNeverFollowed: a token endpoint that answers 307/308 to
// another address gets nothing more from the broker, for every client
// authentication method: no form, no Authorization header, no assertion, no
// client certificate. Callers get FAILED_PRECONDITION naming only the
// redirect's scheme and host; /readyz shows the credential refused.
func TestRedirectIsNeverFollowed(t *testing.T) {
	for _, method := range []string{"client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth"} {
		for _, code := range []int{http.StatusTemporaryRedirect, http.StatusPermanentRedirect} {
			t.Run(fmt.Sprintf("%s/%d", method, code), func(t *testing.T) {
				target := newSink(t)
				scheme := "http"
				if method == "tls_client_auth" {
					scheme = "https"
				}
				loc := scheme + "://" + target.addr() + "/steal?client=broker"
				h, as := harnessFor(t, method)
				as.SetFaults(oauthtest.Faults{RedirectTo: loc, RedirectStatus: code})

				_, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"})
				st := status.Convert(err)
				want := fmt.Sprintf("redirect (HTTP %d) to %s://%s", code, scheme, target.addr())
				if st.Code() != codes.FailedPrecondition || !strings.Contains(st.Message(), want) {
					t.Errorf("GetToken = %v %q, want FailedPrecondition with %q", st.Code(), st.Message(), want)
				}
				if strings.Contains(st.Message(), "/steal") || strings.Contains(st.Message(), "client=broker") {
					t.Errorf("message %q names the Location's path or query", st.Message())
				}
				if conns, n := target.received(); conns != 0 || n != 0 {
					t.Errorf("the redirect target got %d connections and %d bytes, want none", conns, n)
				}
				if n := as.TokenRequests(); n != 1 {
					t.Errorf("requests at token_url = %d, want 1", n)
				}
				_, body := h.readyz(t)
				if cred, _ := body.Credentials["identity"].(map[string]any); cred["state"] != "refused" || cred["reason"] != "redirect" {
					t.Errorf("/readyz credentials = %v, want identity refused (redirect)", body.Credentials)
				}
				if !strings.Contains(h.logs.String(), `"reason":"redirect"`) {
					t.Error("no log line with reason redirect")
				}
			})
		}
	}
}

// harnessFor starts a broker whose credential "identity" authenticates to
// its authorization server with method; it returns the server to fault.
func harnessFor(t *testing.T, method string) (*harness, *oauthtest.Server) {
	t.Helper()
	switch method {
	case "client_secret_basic", "client_secret_post":
		h := newHarness(t, func(c *config.Config) { c.Credentials[0].AuthMethod = method })
		return h, h.as
	case "private_key_jwt":
		key, keyPEM := ecKeyPEM(t)
		keyFile := filepath.Join(t.TempDir(), "signing-key.pem")
		if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
			t.Fatal(err)
		}
		h := newHarness(t, func(c *config.Config) {
			cr := &c.Credentials[0]
			cr.ClientID, cr.AuthMethod, cr.PrivateKeyFile, cr.ClientSecretFile = "jwt-app", method, keyFile, ""
		})
		h.as.AddClient(oauthtest.Client{ID: "jwt-app", PublicKey: key.Public(), Scopes: []string{"IDENTITY", "IDENTITY_READ"}})
		h.secrets = append(h.secrets, string(keyPEM))
		return h, h.as
	case "tls_client_auth":
		clientCA, err := devpki.NewCA("broker client CA", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		bank := startTLSBank(t, clientCA)
		return bank.brokerFor(t, clientCA), bank.Server
	}
	t.Fatalf("no harness for %s", method)
	return nil, nil
}

// TestRedirectIsProbedLikeARefusal: a redirecting endpoint is asked once a
// minute, not in a loop, and recovers by itself once fixed.
func TestRedirectIsProbedLikeARefusal(t *testing.T) {
	target := newSink(t)
	h := newHarness(t, nil)
	h.as.SetFaults(oauthtest.Faults{RedirectTo: "http://" + target.addr() + "/"})
	c := h.client(payments)
	req := &pb.GetTokenRequest{Credential: "identity"}
	for range 120 { // two minutes of callers, one a second
		if _, err := h.get(c, req); status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("with a redirect: %v, want FailedPrecondition", err)
		}
		h.clock.Add(time.Second)
	}
	if n := h.as.TokenRequests(); n != 2 {
		t.Errorf("attempts in two minutes of redirects = %d, want 2 (one probe a minute)", n)
	}
	h.as.SetFaults(oauthtest.Faults{})
	h.clock.Add(time.Minute)
	if _, err := h.get(c, req); err != nil {
		t.Fatalf("after the endpoint is fixed: %v", err)
	}
	if conns, _ := target.received(); conns != 0 {
		t.Errorf("the redirect target got %d connections", conns)
	}
}

// TestHostileTokenResponses: responses a broken or hostile endpoint might
// send are refused whole as malformed: never cached, stored, vended or logged.
func TestHostileTokenResponses(t *testing.T) {
	long := strings.Repeat("a", 16<<10+1)
	tests := []struct {
		name, body, ctype string
		hostile           string // a token value that must go nowhere
	}{
		{"CR LF in the token", `{"access_token":"abc\r\nX-Evil: 1","token_type":"Bearer","expires_in":300}`, "", "abc\r\nX-Evil: 1"},
		{"space in the token", `{"access_token":"abc def","token_type":"Bearer","expires_in":300}`, "", "abc def"},
		{"quote in the token", `{"access_token":"abc\"def","token_type":"Bearer"}`, "", `abc"def`},
		{"token over 16 KiB", `{"access_token":"` + long + `","token_type":"Bearer"}`, "", long},
		{"expires_in twice", `{"access_token":"dup1","token_type":"Bearer","expires_in":300,"expires_in":99999999}`, "", "dup1"},
		{"access_token twice", `{"access_token":"dup2","token_type":"Bearer","access_token":"dup3"}`, "", "dup3"},
		{"a name twice, in another case", `{"access_token":"dup4","token_type":"Bearer","ACCESS_TOKEN":"dup5"}`, "", "dup5"},
		{"form, a member twice", "access_token=dup6&token_type=Bearer&access_token=dup7", "application/x-www-form-urlencoded", "dup7"},
		{"form, CR LF in the token", "access_token=abc%0D%0AX-Evil%3A+1&token_type=Bearer", "application/x-www-form-urlencoded", "abc\r\nX-Evil: 1"},
		{"two JSON objects", `{"access_token":"dup8","token_type":"Bearer"}{"access_token":"dup9"}`, "", "dup9"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, nil)
			if len(tt.hostile) > 4 {
				h.secrets = append(h.secrets, tt.hostile) // the log scan looks for it
			}
			h.as.SetFaults(oauthtest.Faults{Body: tt.body, ContentType: tt.ctype})
			c := h.client(payments)
			_, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"})
			if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "is failing (malformed)") {
				t.Fatalf("GetToken = %v %q, want Unavailable malformed", st.Code(), st.Message())
			}
			h.as.SetFaults(oauthtest.Faults{})
			h.clock.Add(time.Minute) // past the backoff
			tok, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"})
			if err != nil {
				t.Fatalf("after the endpoint heals: %v", err)
			}
			if _, ok := h.as.Lookup(tok.GetAccessToken()); !ok {
				t.Errorf("served a token the server did not issue")
			}
			if n := h.as.TokenRequests(); n != 2 {
				t.Errorf("token requests = %d, want 2 (nothing of the hostile answer was kept)", n)
			}
		})
	}
}

// TestExpiresInAsString: expires_in as a JSON string of digits is accepted, as
// x/oauth2 and many servers have it.
func TestExpiresInAsString(t *testing.T) {
	h := newHarness(t, nil)
	h.as.SetFaults(oauthtest.Faults{Body: `{"access_token":"str-expiry.token","token_type":"bearer","expires_in":"300","scope":"IDENTITY IDENTITY_READ"}`})
	tok, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := tok.GetExpireTime().AsTime(), h.clock.Now().Add(300*time.Second-10*time.Second); got.Sub(want).Abs() > time.Second {
		t.Errorf("expire_time = %v, want 300s less the 10s margin from now (%v)", got, want)
	}
}

// TestWatchStreamsCappedPerCaller: one caller identity holds at most
// rate_limit.watch_streams streams, over any number of connections; the
// refused get RESOURCE_EXHAUSTED naming the limit; other callers are not
// affected; a closed stream frees its slot.
func TestWatchStreamsCappedPerCaller(t *testing.T) {
	const limit = 3
	h := newHarness(t, func(c *config.Config) { c.RateLimit = &config.RateLimit{WatchStreams: limit} })
	req := &pb.WatchTokenRequest{Credential: "identity"}
	var cancels []context.CancelFunc
	for i := range limit {
		c := h.client(payments) // a connection each: the cap is per identity
		if i == 1 {
			c = pb.NewTokenBrokerClient(h.conn(nil, payments))
		}
		toks, errs, cancel := watch(t, c, req)
		recvToken(t, toks, errs)
		cancels = append(cancels, cancel)
	}
	overCap := func() error {
		_, errs, _ := watch(t, h.client(payments), req)
		select {
		case err := <-errs:
			return err
		case <-time.After(5 * time.Second):
			return errors.New("stream still open after 5s")
		}
	}
	err := overCap()
	if st := status.Convert(err); st.Code() != codes.ResourceExhausted || !strings.Contains(st.Message(), "rate_limit.watch_streams") ||
		!strings.Contains(st.Message(), fmt.Sprint(limit)) {
		t.Errorf("stream %d: %v %q, want ResourceExhausted naming rate_limit.watch_streams and %d", limit+1, st.Code(), st.Message(), limit)
	}
	// Another identity has slots of its own.
	toks, errs, _ := watch(t, h.client(kycWork), req)
	recvToken(t, toks, errs)

	cancels[0]()
	deadline := time.Now().Add(5 * time.Second)
	for {
		toks, errs, cancel := watch(t, h.client(payments), req)
		select {
		case <-toks:
			cancel()
			return // the slot was freed
		case err := <-errs:
			if status.Code(err) != codes.ResourceExhausted || time.Now().After(deadline) {
				t.Fatalf("after closing a stream: %v, want a new stream to open", err)
			}
			time.Sleep(20 * time.Millisecond) // the server has not seen the cancel yet
		case <-time.After(5 * time.Second):
			t.Fatal("no token on the new stream")
		}
	}
}

// TestConnectionLimits: a connection that never completes its handshake is
// closed after the handshake timeout, and one connection carries at most
// MaxStreamsPerConnection calls at once (the rest queue in the client).
func TestConnectionLimits(t *testing.T) {
	h := newHarnessWith(t, nil, func(o *Options) {
		o.HandshakeTimeout = 300 * time.Millisecond
		o.MaxStreamsPerConnection = 2
	})
	raw, err := net.Dial("tcp", h.srv.GRPCAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	_ = raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	if _, err := io.ReadAll(raw); err != nil {
		t.Errorf("silent connection: %v after %v, want the server to close it", err, time.Since(start))
	}

	conn := h.conn(nil, payments)
	c := pb.NewTokenBrokerClient(conn)
	for range 2 {
		toks, errs, _ := watch(t, c, &pb.WatchTokenRequest{Credential: "identity"})
		recvToken(t, toks, errs)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := c.GetToken(ctx, &pb.GetTokenRequest{Credential: "identity"}); status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("third call on a connection with two streams open: %v, want it queued until its deadline", err)
	}
	if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Errorf("the same caller on a second connection: %v", err)
	}
}

// TestCallerWaitsForImminentRetry: while the token endpoint backs off, a
// caller whose deadline outlasts the next scheduled attempt waits for it and
// gets its result, and all such callers share that one attempt; a caller
// with a shorter deadline is told when to come back, in whole seconds.
func TestCallerWaitsForImminentRetry(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(payments)
	req := &pb.GetTokenRequest{Credential: "identity"}
	// The token endpoint restarts: one failure, the next attempt 1s later.
	h.as.SetFaults(oauthtest.Faults{Status: 503, RetryAfter: "1"})
	if _, err := h.get(c, req); status.Code(err) != codes.Unavailable {
		t.Fatalf("during the restart: %v, want Unavailable", err)
	}
	h.as.SetFaults(oauthtest.Faults{})
	before := h.as.TokenRequests()

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	_, err := c.GetToken(ctx, req)
	cancel()
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "(next attempt in 1s)") {
		t.Errorf("a caller with 300ms to spare: %v %q, want Unavailable saying the next attempt is in 1s", st.Code(), st.Message())
	}

	const callers = 20
	var wg sync.WaitGroup
	fps := make([]string, callers)
	errs := make([]error, callers)
	for i := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok, err := h.get(c, req) // 10s deadline
			fps[i], errs[i] = tok.GetFingerprint(), err
		}()
	}
	wg.Wait()
	for i := range callers {
		if errs[i] != nil || fps[i] != fps[0] {
			t.Fatalf("caller %d: %v (fingerprint %q, first %q), want the one token of the scheduled attempt", i, errs[i], fps[i], fps[0])
		}
	}
	if n := h.as.TokenRequests() - before; n != 1 {
		t.Errorf("token requests after the restart = %d, want 1 attempt shared by %d callers", n, callers)
	}
}
