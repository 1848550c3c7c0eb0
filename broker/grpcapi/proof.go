package grpcapi

import (
	"fmt"

	"go.uber.org/zap"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/audit"
	"github.com/tokenbroker/tokenbroker/broker/policy"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// Reasons in the google.rpc.ErrorInfo of an INVALID_ARGUMENT that a DPoP
// mismatch causes, so that clients need not read the message.
const (
	// ReasonDPoPRequired: the credential is DPoP-bound; ask with dpop.
	ReasonDPoPRequired = "DPOP_REQUIRED"
	// ReasonNotDPoP: the credential issues bearer tokens; ask without dpop.
	ReasonNotDPoP = "DPOP_NOT_BOUND"
	// ErrorDomain is the ErrorInfo domain of the broker's reasons.
	ErrorDomain = "tokenbroker"
)

// withProof records a DPoP proof made for is and returns the response that
// carries it. Every proof is written to the audit trail on its own (never
// aggregated); under a fail-closed trail, a proof that cannot be recorded is
// withheld.
func (s *Service) withProof(id string, caller policy.Identity, credential string, is broker.Issued) (*pb.GetTokenResponse, error) {
	p := is.Proof
	err := s.core.Record(audit.Event{Event: audit.ProofIssued, RequestID: id, Caller: string(caller), Credential: credential,
		Fingerprint: is.Fingerprint, Method: p.Method, URL: p.URL, JTI: p.JTI, Outcome: "ok"})
	if err != nil {
		s.log.Error("audit trail cannot be written; proof withheld (audit.fail_closed)", zap.Error(err))
		return nil, toStatus(fmt.Errorf("%w: the audit trail cannot be written", broker.ErrUnavailable))
	}
	// The token message is shared with other callers of the same token;
	// only the response around it is new.
	return &pb.GetTokenResponse{Token: s.responses.get(is.Entry).Token, DpopProof: p.Value}, nil
}
