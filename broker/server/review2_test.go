package server

import (
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// TestReview2DPoPURLPrefixEncodedDotSegments: a caller limited to
// /v1/accounts must not get a proof whose htu a resource server normalizes
// (RFC 3986 §6.2.2, which RFC 9449 §4.3 points to) to a URL outside it.
// "%2e%2e" is "..": percent-encoding of an unreserved character is
// equivalent to the character itself.
func TestReview2DPoPURLPrefixEncodedDotSegments(t *testing.T) {
	h := newDPoPHarness(t)
	accounts := h.rs.URL() + "/v1/accounts"
	for _, u := range []string{
		accounts + "/%2e%2e/payments",
		accounts + "/%2E%2E/payments",
		accounts + "/.%2e/payments",
		accounts + "/%2e/../payments",
		accounts + "/..;/payments",
		accounts + "/x%2F..%2F..%2Fpayments",
	} {
		resp, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity-dpop", Dpop: &pb.DPoPRequest{Method: "GET", Url: u}})
		if err == nil {
			h.remember(resp.GetAccessToken())
		}
		if st := status.Convert(err); st.Code() != codes.PermissionDenied && st.Code() != codes.InvalidArgument {
			t.Errorf("proof for %s: got %s %q, want PERMISSION_DENIED (it resolves to /v1/payments)", u, st.Code(), strings.TrimSpace(st.Message()))
		}
	}
}
