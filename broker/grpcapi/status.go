package grpcapi

import (
	"context"
	"errors"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker"
)

// toStatus is the one place where errors become gRPC status codes. Messages
// come from the Broker's own errors, which never hold secrets, tokens or
// upstream bodies; anything unexpected becomes a bare INTERNAL.
func toStatus(err error) error {
	var code codes.Code
	switch {
	case err == nil:
		return nil
	case errors.Is(err, broker.ErrUnauthenticated):
		code = codes.Unauthenticated
	case errors.Is(err, broker.ErrPermissionDenied):
		code = codes.PermissionDenied
	case errors.Is(err, broker.ErrInvalidArgument):
		code = codes.InvalidArgument
	case errors.Is(err, broker.ErrResourceExhausted):
		code = codes.ResourceExhausted
	case errors.Is(err, broker.ErrUnavailable):
		code = codes.Unavailable
	case errors.Is(err, broker.ErrFailedPrecondition):
		code = codes.FailedPrecondition
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded before a token could be had")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "request canceled")
	default:
		return status.Error(codes.Internal, "internal error")
	}
	if reason := dpopReason(err); reason != "" {
		st, derr := status.New(code, err.Error()).WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain})
		if derr == nil {
			return st.Err()
		}
	}
	return status.Error(code, err.Error())
}

// dpopReason is the ErrorInfo reason of a DPoP mismatch, "" for other errors.
func dpopReason(err error) string {
	switch {
	case errors.Is(err, broker.ErrDPoPRequired):
		return ReasonDPoPRequired
	case errors.Is(err, broker.ErrNotDPoP):
		return ReasonNotDPoP
	}
	return ""
}
