package server

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker/client"
	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
	"github.com/tokenbroker/tokenbroker/broker/spiretest"
	"github.com/tokenbroker/tokenbroker/broker/tlsreload"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// The SPIFFE IDs of the SPIRE tests. The test process is both the broker
// and its callers: the broker's entry selects it by uid, the caller's by
// executable path, and each side picks its own SVID by ID.
const (
	spireBroker  = "spiffe://bank.internal/ns/tokenbroker/sa/tokenbroker"
	spireCaller  = "spiffe://bank.internal/ns/payments/sa/api"
	partnerTD    = "partner.example"
	partnerApp   = "spiffe://partner.example/ns/app/sa/caller"
	strangerTD   = "other.example"
	strangerApp  = "spiffe://other.example/ns/app/sa/caller"
	restrictedID = "restricted" // a credential no partner caller may use
)

// spire is a SPIRE server and agent of bank.internal with the broker and
// the caller registered for this process.
type spire struct {
	server *spiretest.Server
	agent  *spiretest.Agent
}

// startSPIRE starts bank.internal's SPIRE with SVIDs of ttl (0: 1h); the
// broker's entry federates with the trust domains in federates.
func startSPIRE(t *testing.T, ttl time.Duration, federates ...*spiretest.Server) *spire {
	t.Helper()
	s := &spire{server: spiretest.StartServer(t, "bank.internal")}
	var fedWith []string
	for _, f := range federates {
		s.server.Federate(f)
		fedWith = append(fedWith, "spiffe://"+f.TrustDomain)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	token, agentID := s.server.JoinToken()
	// Registered before the agent starts, so its first sync has them.
	s.server.CreateEntry(spiretest.Entry{ParentID: agentID, SPIFFEID: spireBroker, X509SVIDTTL: ttl,
		Selectors: []string{fmt.Sprintf("unix:uid:%d", os.Getuid())}, FederatesWith: fedWith})
	s.server.CreateEntry(spiretest.Entry{ParentID: agentID, SPIFFEID: spireCaller, X509SVIDTTL: ttl,
		Selectors: []string{"unix:path:" + exe}})
	s.agent = s.server.StartAgent(token)
	return s
}

// newSPIFFEHarness starts a broker whose TLS material comes from sp's
// Workload API, with a second credential that only spireCaller may use.
func newSPIFFEHarness(t *testing.T, sp *spire, callers ...string) *harness {
	t.Helper()
	return newHarness(t, func(c *config.Config) {
		c.TLS = config.TLS{MinVersion: "1.3", SPIFFE: &config.SPIFFE{WorkloadAPI: sp.agent.Addr(), ID: spireBroker},
			MaxConnectionAgeGrace: config.Duration(config.DefaultMaxConnectionAgeGrace)}
		cr := &c.Credentials[0]
		cr.AllowedCallers = nil
		for _, id := range append([]string{spireCaller}, callers...) {
			cr.AllowedCallers = append(cr.AllowedCallers, config.AllowedCaller{Caller: id})
		}
		restricted := *cr
		restricted.Name, restricted.AllowedCallers = restrictedID, []config.AllowedCaller{{Caller: spireCaller}}
		c.Credentials = append(c.Credentials, restricted)
	})
}

// dialCaller connects as spireCaller through the Workload API.
func dialCaller(t *testing.T, h *harness, sp *spire, brokerID string) pb.TokenBrokerClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := client.DialSPIFFE(ctx, h.srv.GRPCAddr().String(), client.SPIFFE{WorkloadAPI: sp.agent.Addr(), BrokerID: brokerID, ID: spireCaller})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return pb.NewTokenBrokerClient(conn)
}

// readyz fetches the broker's /readyz.
func readyz(t *testing.T, h *harness) (int, struct {
	Status string                   `json:"status"`
	SPIFFE *tlsreload.WorkloadState `json:"spiffe"`
}) {
	t.Helper()
	var body struct {
		Status string                   `json:"status"`
		SPIFFE *tlsreload.WorkloadState `json:"spiffe"`
	}
	resp, err := http.Get("http://" + h.srv.AdminAddr().String() + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, body
}

// TestSPIRETokenOverSVIDs: the broker serves with its SVID from a real SPIRE
// agent, a caller dials with its own and gets a token; a caller expecting
// another broker ID refuses the broker.
func TestSPIRETokenOverSVIDs(t *testing.T) {
	t.Parallel() // each has its own SPIRE; most of their time is waiting on it
	sp := startSPIRE(t, 0)
	h := newSPIFFEHarness(t, sp)

	tok, err := h.get(dialCaller(t, h, sp, spireBroker), &pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatalf("GetToken over SVIDs: %v", err)
	}
	if tok.GetAccessToken() == "" {
		t.Fatal("no token")
	}
	if leaf := h.srv.tls.Leaf(); len(leaf.URIs) != 1 || leaf.URIs[0].String() != spireBroker {
		t.Errorf("serving certificate URIs = %v, want [%s]", leaf.URIs, spireBroker)
	}
	code, body := readyz(t, h)
	if code != http.StatusOK || body.SPIFFE == nil || body.SPIFFE.State != "ok" || body.SPIFFE.SVID != spireBroker ||
		body.SPIFFE.Addr != sp.agent.Addr() {
		t.Errorf("/readyz = %d %+v, want 200 with the Workload API ok and SVID %s", code, body.SPIFFE, spireBroker)
	}

	// A caller that expects another broker does not send it a request.
	_, err = h.get(dialCaller(t, h, sp, "spiffe://bank.internal/ns/impostor/sa/x"), &pb.GetTokenRequest{Credential: "identity"})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "unexpected ID") {
		t.Errorf("GetToken expecting another broker ID = %v, want UNAVAILABLE with unexpected ID", err)
	}
	if hint := client.SPIFFEHandshakeHint(err, client.SPIFFE{BrokerID: "spiffe://bank.internal/ns/impostor/sa/x"}); !strings.Contains(hint, "check --broker-id") {
		t.Errorf("hint = %q, want one naming --broker-id", hint)
	}
}

// TestSPIRESVIDRotation: SVIDs of 30s rotate on both sides (SPIRE renews at
// half-life) while two callers keep calling; no call fails, and calls keep
// succeeding after both first SVIDs have expired, so both sides use the
// renewed ones.
func TestSPIRESVIDRotation(t *testing.T) {
	t.Parallel() // each has its own SPIRE; most of their time is waiting on it
	const ttl = 30 * time.Second
	sp := startSPIRE(t, ttl)
	h := newSPIFFEHarness(t, sp)
	firstBroker := h.srv.tls.Leaf()
	// SPIRE backdates notBefore a little; its renewal at half-life counts from there too.
	if got, want := h.srv.maxConnectionAge(), firstBroker.NotAfter.Sub(firstBroker.NotBefore)/4; got != want || got > ttl/3 {
		t.Errorf("default max connection age under tls.spiffe = %v, want a quarter of the SVID's validity (%v)", got, want)
	}
	firstCaller := callerSVID(t, sp)
	// Past both first SVIDs' expiry, with a margin for the last handshakes.
	until := later(firstBroker.NotAfter, firstCaller.Certificates[0].NotAfter).Add(2 * time.Second)
	if d := time.Until(until); d > 2*ttl {
		t.Fatalf("first SVIDs expire in %v, want within %v", d, 2*ttl)
	}

	var calls, failures atomic.Int64
	var mu sync.Mutex
	brokerSerials := map[string]bool{}
	var firstErr error
	var wg sync.WaitGroup
	for range 2 {
		c := dialCaller(t, h, sp, spireBroker)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; time.Now().Before(until) && n < 20000; n++ { // bounded in time and count
				var p peer.Peer
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				_, err := c.GetToken(ctx, &pb.GetTokenRequest{Credential: "identity"}, grpc.Peer(&p))
				cancel()
				calls.Add(1)
				mu.Lock()
				if err != nil {
					failures.Add(1)
					if firstErr == nil {
						firstErr = err
					}
				} else if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
					brokerSerials[ti.State.PeerCertificates[0].SerialNumber.String()] = true
				}
				mu.Unlock()
				time.Sleep(10 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	t.Logf("%d calls over %v, %d failed; broker SVIDs seen by callers: %d; broker SVID updates: %d",
		calls.Load(), ttl, failures.Load(), len(brokerSerials), h.srv.tls.WorkloadState().Updates)
	if failures.Load() != 0 {
		t.Errorf("%d of %d calls failed across SVID rotations; first: %v", failures.Load(), calls.Load(), firstErr)
	}
	if len(brokerSerials) < 2 {
		t.Errorf("callers saw %d broker certificates, want the renewed one too", len(brokerSerials))
	}
	if leaf := h.srv.tls.Leaf(); leaf.SerialNumber.Cmp(firstBroker.SerialNumber) == 0 {
		t.Error("the broker still serves its first SVID")
	}
	if now := callerSVID(t, sp).Certificates[0]; now.SerialNumber.Cmp(firstCaller.Certificates[0].SerialNumber) == 0 {
		t.Error("the caller's SVID was not renewed")
	}
	if strings.Contains(h.logs.String(), certificateExpiredLog) {
		t.Error("a caller's connection was cut at its certificate's expiry; it should have moved before")
	}
}

// certificateExpiredLog is how the log names a connection cut when its
// client certificate expired.
const certificateExpiredLog = `"reason":"client_certificate_expired"`

// callerSVID is spireCaller's current SVID, read from the Workload API.
func callerSVID(t *testing.T, sp *spire) *x509svid.SVID {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for { // its entry may reach the agent's cache after the broker's
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		svids, err := workloadapi.FetchX509SVIDs(ctx, workloadapi.WithAddr(sp.agent.Addr()))
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range svids {
			if s.ID.String() == spireCaller {
				return s
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the Workload API gives no SVID %s within 30s", spireCaller)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// TestSPIREFederatedCaller: a caller of a federated trust domain (its SVID
// minted by that domain's own SPIRE server) is admitted where policy names
// it and nowhere else; the same ID from a CA outside its domain's bundle,
// and a caller of a domain the broker does not federate with, are refused
// at the handshake.
func TestSPIREFederatedCaller(t *testing.T) {
	t.Parallel() // each has its own SPIRE; most of their time is waiting on it
	partner := spiretest.StartServer(t, partnerTD)
	stranger := spiretest.StartServer(t, strangerTD)
	sp := startSPIRE(t, 0, partner)
	h := newSPIFFEHarness(t, sp, partnerApp, strangerApp)

	dir := t.TempDir()
	bankBundle := filepath.Join(dir, "bank.pem")
	if err := os.WriteFile(bankBundle, sp.server.BundlePEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	dial := func(svidFile, keyFile string) pb.TokenBrokerClient {
		t.Helper()
		svid, err := x509svid.Load(svidFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		bundle, err := x509bundle.Load(spiffeid.RequireTrustDomainFromString("bank.internal"), bankBundle)
		if err != nil {
			t.Fatal(err)
		}
		tc := tlsconfig.MTLSClientConfig(svid, bundle, tlsconfig.AuthorizeID(spiffeid.RequireFromString(spireBroker)))
		tc.MinVersion = tls.VersionTLS13
		conn, err := client.Dial(h.srv.GRPCAddr().String(), tc)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.Close() })
		return pb.NewTokenBrokerClient(conn)
	}
	mint := func(s *spiretest.Server, id string) pb.TokenBrokerClient {
		d := t.TempDir()
		svid, key, _ := s.MintX509(id, time.Hour, d)
		return dial(svid, key)
	}

	partnerCaller := mint(partner, partnerApp)
	if _, err := h.get(partnerCaller, &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Errorf("federated caller on a credential that names it: %v", err)
	}
	if _, err := h.get(partnerCaller, &pb.GetTokenRequest{Credential: restrictedID}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("federated caller on a credential that does not name it = %v, want PERMISSION_DENIED", err)
	}

	// The same partner ID from a CA that is not in partner.example's bundle.
	rogue, err := devpki.NewCA("rogue", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := rogue.Client(time.Hour, partnerApp)
	if err != nil {
		t.Fatal(err)
	}
	rogueCert, rogueKey := filepath.Join(dir, "rogue.pem"), filepath.Join(dir, "rogue-key.pem")
	if err := pair.WriteFiles(rogueCert, rogueKey); err != nil {
		t.Fatal(err)
	}
	if _, err := h.get(dial(rogueCert, rogueKey), &pb.GetTokenRequest{Credential: "identity"}); status.Code(err) != codes.Unavailable {
		t.Errorf("partner ID from another CA = %v, want the handshake refused (UNAVAILABLE)", err)
	}
	// A real SVID of a trust domain the broker does not federate with,
	// although policy names it.
	if _, err := h.get(mint(stranger, strangerApp), &pb.GetTokenRequest{Credential: "identity"}); status.Code(err) != codes.Unavailable {
		t.Errorf("caller of a trust domain without federation = %v, want the handshake refused (UNAVAILABLE)", err)
	}
}

// TestSPIREAgentDown: while the SPIRE agent is down the broker keeps serving
// with its last SVID, new connections included, and /readyz says the
// Workload API is unreachable while staying ready; once the agent is back,
// /readyz says ok again.
func TestSPIREAgentDown(t *testing.T) {
	t.Parallel() // each has its own SPIRE; most of their time is waiting on it
	sp := startSPIRE(t, 0)
	h := newSPIFFEHarness(t, sp)
	if _, err := h.get(dialCaller(t, h, sp, spireBroker), &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	// The caller's own material is taken while the agent is up.
	caller := dialCaller(t, h, sp, spireBroker)

	sp.agent.Stop()
	waitReadyz(t, h, "unreachable")
	code, body := readyz(t, h)
	if code != http.StatusOK || body.Status != "ready" || body.SPIFFE.Error == "" || !body.SPIFFE.SVIDExpires.After(time.Now()) {
		t.Errorf("/readyz with the agent down = %d %+v, want 200 ready, the error and the SVID's expiry", code, body)
	}
	if _, err := h.get(caller, &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Errorf("GetToken with the agent down (a new connection, the last SVIDs): %v", err)
	}

	sp.agent.Start()
	waitReadyz(t, h, "ok")
	if _, err := h.get(caller, &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Errorf("GetToken after the agent is back: %v", err)
	}
	if !strings.Contains(h.logs.String(), "SPIFFE Workload API unreachable; serving with the last SVID") {
		t.Error("the outage was not logged")
	}
}

// waitReadyz waits up to 20s for /readyz to show the Workload API in state.
func waitReadyz(t *testing.T, h *harness, state string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, body := readyz(t, h)
		if body.SPIFFE != nil && body.SPIFFE.State == state {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz Workload API state = %+v after 20s, want %q", body.SPIFFE, state)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
