package grpcapi

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/audit"
	"github.com/tokenbroker/tokenbroker/broker/policy"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store"
)

// Service serves the TokenBroker gRPC API from a Broker. The server must
// require and verify client certificates; Service reads the caller's identity
// from the verified leaf.
type Service struct {
	pb.UnimplementedTokenBrokerServer
	core     *broker.Broker
	log      *zap.Logger
	draining context.Context // done once Drain is called
	drain    context.CancelFunc
	// responses are the messages of recently issued tokens, reused on hits.
	responses *responses
	// traced: the server puts a span in each call's context.
	traced bool
}

var _ pb.TokenBrokerServer = (*Service)(nil)

// NewService returns a Service for b. log may be nil. traced says whether the
// server traces calls (a stats handler puts a span in each call's context);
// without it the service does not look for one.
func NewService(b *broker.Broker, log *zap.Logger, traced bool) *Service {
	if log == nil {
		log = zap.NewNop()
	}
	draining, drain := context.WithCancel(context.Background())
	return &Service{core: b, log: log, draining: draining, drain: drain, responses: newResponses(), traced: traced}
}

// errDraining ends watch streams at shutdown; clients reconnect elsewhere.
var errDraining = fmt.Errorf("%w: server shutting down; reconnect", broker.ErrUnavailable)

// Drain ends every WatchToken stream with UNAVAILABLE, so that a graceful
// stop need not wait for streams that would never end by themselves.
func (s *Service) Drain() { s.drain() }

// GetToken returns a token for the requested credential.
func (s *Service) GetToken(ctx context.Context, req *pb.GetTokenRequest) (*pb.GetTokenResponse, error) {
	id := sentRequestID(ctx)
	var made [16]byte // the ID does not outlive the call: no allocation (a denial, which
	// may be kept for aggregation, gets a copy)
	if id == "" {
		makeRequestID(&made)
		id = string(made[:])
	}
	caller, err := callerFrom(ctx)
	if err != nil {
		return nil, s.deny(ctx, strings.Clone(id), "", req.GetCredential(), req.GetScopes(), err)
	}
	r := broker.Request{Credential: req.GetCredential(), Scopes: req.GetScopes()}
	setMinTTL(&r, req.GetMinTtl())
	if d := req.GetDpop(); d != nil {
		r.Proof = &broker.ProofRequest{Method: d.GetMethod(), URL: d.GetUrl(), Nonce: d.GetNonce()}
	}
	is, err := s.core.GetToken(ctx, caller, r)
	if err != nil {
		return nil, s.deny(ctx, strings.Clone(id), caller, r.Credential, r.Scopes, err)
	}
	if err := s.issued(id, caller, r.Credential, is); err != nil {
		return nil, toStatus(err)
	}
	if s.traced {
		s.annotate(ctx, r.Credential, is)
	}
	if is.Proof != nil {
		return s.withProof(id, caller, r.Credential, is)
	}
	return s.responses.get(is.Entry), nil
}

// setMinTTL puts the min_ttl a caller sent, if any, into r. One that is
// not a valid duration is refused by the core after the caller's rate limit
// and access: refused here, before them, each would be audited whole and
// uncounted against the caller.
func setMinTTL(r *broker.Request, d *durationpb.Duration) {
	if d == nil {
		return
	}
	r.MinTTLSet = true
	if d.CheckValid() != nil {
		r.MinTTLInvalid = true
		return
	}
	r.MinTTL = d.AsDuration()
}

// annotate adds what the broker did to the call's span.
func (s *Service) annotate(ctx context.Context, credential string, is broker.Issued) {
	if span := trace.SpanFromContext(ctx); span.IsRecording() {
		span.SetAttributes(attribute.String("tokenbroker.credential", credential), attribute.String("tokenbroker.source", is.Source),
			attribute.String("tokenbroker.fingerprint", is.Fingerprint), attribute.String("tokenbroker.outcome", "ok"))
	}
}

// issued records a token handed out under request ID id. Under a fail-closed
// audit trail, a failure to record it withholds the token.
func (s *Service) issued(id string, caller policy.Identity, credential string, is broker.Issued) error {
	err := s.core.Record(audit.Event{Event: audit.TokenIssued, RequestID: id, Caller: string(caller),
		Credential: credential, Scopes: is.Scopes, Source: is.Source, Fingerprint: is.Fingerprint,
		ExpireTime: is.Expiry, Outcome: "ok"})
	if err != nil {
		s.log.Error("audit trail cannot be written; token withheld (audit.fail_closed)", zap.Error(err))
		return fmt.Errorf("%w: the audit trail cannot be written", broker.ErrUnavailable)
	}
	if ce := s.log.Check(zap.DebugLevel, "token issued"); ce != nil {
		ce.Write(zap.String("caller", string(caller)), zap.String("credential", credential),
			zap.String("source", is.Source), zap.String("fingerprint", is.Fingerprint))
	}
	return nil
}

// deny records a refused request with request ID id and returns its status.
func (s *Service) deny(ctx context.Context, id string, caller policy.Identity, credential string, scopes []string, err error) error {
	st := toStatus(err)
	if s.traced {
		if span := trace.SpanFromContext(ctx); span.IsRecording() {
			span.SetAttributes(attribute.String("tokenbroker.credential", credential), attribute.String("tokenbroker.outcome", status.Code(st).String()))
		}
	}
	e := audit.Event{Event: audit.TokenDenied, RequestID: id, Caller: string(caller),
		Credential: credential, Scopes: scopes, Outcome: status.Code(st).String(), Reason: status.Convert(st).Message()}
	switch code := status.Code(st); {
	case errors.Is(err, broker.ErrStreamRevoked):
		// Once per stream and reload, and what the security review asks
		// first: each is written whole.
		_ = s.core.Record(e)
	case code == codes.Unauthenticated, code == codes.PermissionDenied, code == codes.ResourceExhausted:
		// Who the peer is or what it may do: a flood of these is aggregated.
		who := string(caller)
		if who == "" {
			if p, ok := peer.FromContext(ctx); ok {
				e.Peer = sourceIP(p.Addr)
			}
			who = e.Peer
		}
		_ = s.core.RecordDenial(who, e)
	default:
		_ = s.core.Record(e)
	}
	s.log.Debug("token denied", zap.String("caller", string(caller)), zap.String("credential", credential), zap.Error(err))
	return st
}

// WatchToken streams the current token and each replacement.
func (s *Service) WatchToken(req *pb.WatchTokenRequest, stream pb.TokenBroker_WatchTokenServer) error {
	ctx := stream.Context()
	id := requestID(ctx)
	caller, err := callerFrom(ctx)
	if err != nil {
		return s.deny(ctx, id, "", req.GetCredential(), req.GetScopes(), err)
	}
	r := broker.Request{Credential: req.GetCredential(), Scopes: req.GetScopes()}
	setMinTTL(&r, req.GetMinTtl())
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	// A callback, not a goroutine: an open stream should cost little.
	defer context.AfterFunc(s.draining, func() { cancel(errDraining) })()
	err = s.core.Watch(ctx, caller, r, func(e *store.Entry) error {
		if err := s.issued(id, caller, r.Credential, broker.Issued{Entry: e, Source: "watch"}); err != nil {
			return err
		}
		return stream.Send(&pb.WatchTokenResponse{Token: s.responses.get(e).Token})
	})
	switch cause := context.Cause(ctx); {
	case errors.Is(cause, errDraining):
		return toStatus(cause)
	case stream.Context().Err() != nil:
		return status.FromContextError(stream.Context().Err()).Err()
	case errors.Is(err, broker.ErrUnavailable), errors.Is(err, broker.ErrFailedPrecondition), errors.Is(err, broker.ErrPermissionDenied),
		errors.Is(err, broker.ErrInvalidArgument), errors.Is(err, broker.ErrResourceExhausted):
		return s.deny(ctx, id, caller, r.Credential, r.Scopes, err)
	}
	return toStatus(err)
}

// InvalidateToken drops a token a resource server rejected, if it is still current.
func (s *Service) InvalidateToken(ctx context.Context, req *pb.InvalidateTokenRequest) (*pb.InvalidateTokenResponse, error) {
	caller, err := callerFrom(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	ctx = broker.WithRequestID(ctx, requestID(ctx)) // the core writes its audit event
	ok, err := s.core.Invalidate(ctx, caller, broker.InvalidateRequest{
		Credential: req.GetCredential(), Scopes: req.GetScopes(), Fingerprint: req.GetFingerprint()})
	if err != nil {
		return nil, s.refuseInvalidation(ctx, caller, req, err)
	}
	return &pb.InvalidateTokenResponse{Invalidated: ok}, nil
}

// refuseInvalidation records a refused InvalidateToken (event
// token.invalidated, outcome the status code) and returns its status. A
// refusal of who the caller is or what it may do is aggregated, as GetToken's
// are; others are written whole (they come after the caller's rate limit).
func (s *Service) refuseInvalidation(ctx context.Context, caller policy.Identity, req *pb.InvalidateTokenRequest, err error) error {
	st := toStatus(err)
	code := status.Code(st)
	e := audit.Event{Event: audit.TokenInvalidated, RequestID: broker.RequestID(ctx), Caller: string(caller),
		Credential: req.GetCredential(), Scopes: req.GetScopes(), Fingerprint: req.GetFingerprint(),
		Outcome: code.String(), Reason: status.Convert(st).Message()}
	if code == codes.PermissionDenied || code == codes.ResourceExhausted {
		_ = s.core.RecordDenial(string(caller), e)
	} else {
		_ = s.core.Record(e)
	}
	return st
}

// ListCredentials lists the credentials the caller may use.
func (s *Service) ListCredentials(ctx context.Context, _ *pb.ListCredentialsRequest) (*pb.ListCredentialsResponse, error) {
	caller, err := callerFrom(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	infos, err := s.core.ListCredentials(caller)
	if err != nil {
		return nil, toStatus(err)
	}
	resp := &pb.ListCredentialsResponse{Credentials: make([]*pb.Credential, 0, len(infos))}
	for _, c := range infos {
		resp.Credentials = append(resp.Credentials, &pb.Credential{Name: c.Name, Scopes: c.Scopes})
	}
	return resp, nil
}
