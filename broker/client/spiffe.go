package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// SPIFFE configures DialSPIFFE: the caller's X.509-SVID and trust bundles
// come from the SPIFFE Workload API (a SPIRE agent's socket, say), and the
// broker is verified by its SPIFFE ID.
type SPIFFE struct {
	// WorkloadAPI is the Workload API address (unix:///path or
	// tcp://ip:port; an absolute path is taken as unix://path). Empty means
	// the SPIFFE_ENDPOINT_SOCKET variable.
	WorkloadAPI string
	// BrokerID is the SPIFFE ID the broker must present, e.g.
	// spiffe://bank.internal/ns/tokenbroker/sa/tokenbroker. Required.
	BrokerID string
	// ID, when set, picks which of this workload's SVIDs to present; empty
	// means the first the Workload API gives.
	ID string
}

// Address is the Workload API address in force.
func (s SPIFFE) Address() string {
	addr := s.WorkloadAPI
	if addr == "" {
		addr, _ = workloadapi.GetDefaultAddress()
	}
	if strings.HasPrefix(addr, "/") {
		addr = "unix://" + addr
	}
	return addr
}

// DialSPIFFE is Dial with the caller's TLS material from the SPIFFE Workload
// API: each new connection presents the SVID current at that moment, so a
// renewal is used without a restart, and accepts only a broker whose SVID has
// cfg.BrokerID and verifies against the bundle of its trust domain. It waits,
// until ctx is done, for the first SVID. The Workload API connection ends
// when the returned connection is closed.
func DialSPIFFE(ctx context.Context, target string, cfg SPIFFE, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	if cfg.BrokerID == "" {
		return nil, errors.New("client: the broker's SPIFFE ID is required (BrokerID, tokenctl --broker-id)")
	}
	brokerID, err := spiffeid.FromString(cfg.BrokerID)
	if err != nil {
		return nil, fmt.Errorf("client: broker SPIFFE ID %q: %w", cfg.BrokerID, err)
	}
	var want spiffeid.ID
	if cfg.ID != "" {
		if want, err = spiffeid.FromString(cfg.ID); err != nil {
			return nil, fmt.Errorf("client: SPIFFE ID %q: %w", cfg.ID, err)
		}
	}
	addr := cfg.Address()
	if addr == "" {
		return nil, fmt.Errorf("client: no Workload API address: give one (tokenctl --spiffe-socket) or set %s", workloadapi.SocketEnv)
	}
	srcOpts := []workloadapi.X509SourceOption{workloadapi.WithClientOptions(workloadapi.WithAddr(addr))}
	if !want.IsZero() {
		srcOpts = append(srcOpts, workloadapi.WithDefaultX509SVIDPicker(func(svids []*x509svid.SVID) *x509svid.SVID {
			for _, s := range svids {
				if s.ID == want {
					return s
				}
			}
			return nil
		}))
	}
	src, err := workloadapi.NewX509Source(ctx, srcOpts...)
	if err != nil {
		return nil, fmt.Errorf("client: SPIFFE Workload API %s: %w", addr, err)
	}
	// The first update may lack the SVID picked (an entry not yet synced
	// to the agent): wait for one that has it.
	_, err = src.GetX509SVID()
	for err != nil && ctx.Err() == nil {
		select {
		case <-src.Updated():
			_, err = src.GetX509SVID()
		case <-ctx.Done():
		}
	}
	if err != nil {
		_ = src.Close()
		return nil, fmt.Errorf("client: SPIFFE Workload API %s gives this workload no SVID%s: %w", addr, forID(cfg.ID), err)
	}
	tc := tlsconfig.MTLSClientConfig(src, src, tlsconfig.AuthorizeID(brokerID))
	tc.MinVersion = tls.VersionTLS13
	conn, err := dial(target, credentials.NewTLS(tc), opts)
	if err != nil {
		_ = src.Close()
		return nil, err
	}
	go func() { // the source lives as long as the connection
		for st := conn.GetState(); st != connectivity.Shutdown; st = conn.GetState() {
			conn.WaitForStateChange(context.Background(), st)
		}
		_ = src.Close()
	}()
	return conn, nil
}

func forID(id string) string {
	if id == "" {
		return ""
	}
	return " with ID " + id
}

// SPIFFEHandshakeHint explains err when it shows a failed TLS handshake with
// the broker on a connection made by DialSPIFFE; otherwise it returns "".
func SPIFFEHandshakeHint(err error, cfg SPIFFE) string {
	if status.Code(err) != codes.Unavailable {
		return ""
	}
	msg := status.Convert(err).Message()
	switch {
	case strings.Contains(msg, "unexpected ID"):
		return fmt.Sprintf("the broker presented another SPIFFE ID than %s (see the error); check --broker-id", cfg.BrokerID)
	case strings.Contains(msg, "x509svid:") || containsAny(msg, serverCertSigns):
		return "the broker's SVID does not verify against this workload's bundle of the broker's trust domain: " +
			"is that trust domain yours, or federated with yours for this workload?"
	case containsAny(msg, refusedSigns):
		return "the broker refused the TLS handshake: its Workload API (tls.spiffe) must give it the bundle of your " +
			"trust domain (federation, if another), and your SVID must be current"
	}
	return ""
}
