package broker

import (
	"context"
	"crypto/rand"
	"encoding/hex"

	"google.golang.org/grpc/metadata"
)

// RequestIDHeader is the gRPC metadata key a caller may set to correlate its
// request with the audit trail; without it the broker makes one up.
const RequestIDHeader = "x-request-id"

type requestIDKey struct{}

// withRequestID returns ctx carrying the call's request ID.
func withRequestID(ctx context.Context) context.Context {
	id := ""
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get(RequestIDHeader); len(v) > 0 && len(v[0]) <= 128 {
			id = v[0]
		}
	}
	if id == "" {
		var b [8]byte
		_, _ = rand.Read(b[:])
		id = hex.EncodeToString(b[:])
	}
	return context.WithValue(ctx, requestIDKey{}, id)
}

// RequestID returns the request ID of the call ctx belongs to, if any.
func RequestID(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey{}).(string)
	return id
}
