package grpcapi

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker"
)

func TestToStatus(t *testing.T) {
	tests := []struct {
		err        error
		expectCode codes.Code
		expectMsg  string
	}{
		{fmt.Errorf("%w: x", broker.ErrUnauthenticated), codes.Unauthenticated, "unauthenticated: x"},
		{fmt.Errorf("%w: x", broker.ErrPermissionDenied), codes.PermissionDenied, "permission denied: x"},
		{fmt.Errorf("%w: x", broker.ErrInvalidArgument), codes.InvalidArgument, "invalid argument: x"},
		{fmt.Errorf("%w: x", broker.ErrUnavailable), codes.Unavailable, "unavailable: x"},
		{fmt.Errorf("%w: x", broker.ErrResourceExhausted), codes.ResourceExhausted, "resource exhausted: x"},
		{fmt.Errorf("%w: x", broker.ErrFailedPrecondition), codes.FailedPrecondition, "failed precondition: x"},
		{context.DeadlineExceeded, codes.DeadlineExceeded, "deadline exceeded"},
		{context.Canceled, codes.Canceled, "request canceled"},
		{errors.New("db password=hunter2"), codes.Internal, "internal error"},
	}
	for _, tt := range tests {
		st := status.Convert(toStatus(tt.err))
		if st.Code() != tt.expectCode || !strings.Contains(st.Message(), tt.expectMsg) {
			t.Errorf("toStatus(%v) = %v %q, want %v %q", tt.err, st.Code(), st.Message(), tt.expectCode, tt.expectMsg)
		}
	}
	if strings.Contains(status.Convert(toStatus(errors.New("db password=hunter2"))).Message(), "hunter2") {
		t.Error("an unexpected error's text reached the caller")
	}
	if toStatus(nil) != nil {
		t.Error("toStatus(nil) != nil")
	}
}
