package client

import (
	"context"
	"fmt"

	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// rememberRejected is how many reported fingerprints a Source remembers, so
// that each is reported to the broker once: a token stays rejected for good,
// and only the last few can still be in use by requests in flight.
const rememberRejected = 16

// rejection is a fingerprint reported to the broker; done closes when the
// report has been answered (or failed).
type rejection struct {
	fingerprint string
	done        chan struct{}
}

// markRejected records that a resource server rejected the token with
// fingerprint fp. report says this call must tell the broker (the token is
// the Source's current one and nobody reported it before); r is the
// rejection in force for fp (nil when fp was never reported and is not the
// current token: it was replaced by rotation, and there is nothing to
// report). The cached token is dropped whenever it is fp.
func (s *Source) markRejected(fp string) (report bool, r *rejection) {
	s.mu.Lock()
	defer s.mu.Unlock()
	current := s.tok != nil && s.tok.GetFingerprint() == fp
	if current {
		s.tok = nil // fetched again from the broker, even if it was reported before
	}
	for _, r := range s.rejected {
		if r.fingerprint == fp {
			return false, r
		}
	}
	if !current {
		return false, nil
	}
	r = &rejection{fingerprint: fp, done: make(chan struct{})}
	if len(s.rejected) == rememberRejected {
		s.rejected = append(s.rejected[:0], s.rejected[1:]...)
	}
	s.rejected = append(s.rejected, r)
	return true, r
}

// report tells the broker about r's token and closes r.done.
func (s *Source) report(ctx context.Context, r *rejection) (bool, error) {
	defer close(r.done)
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	resp, err := s.c.InvalidateToken(ctx, &pb.InvalidateTokenRequest{Credential: s.credential, Scopes: s.scopes,
		Fingerprint: r.fingerprint})
	if err != nil {
		return false, fmt.Errorf("invalidate token: %w", err)
	}
	return resp.GetInvalidated(), nil
}
