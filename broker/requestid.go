package broker

import "context"

type requestIDKey struct{}

// WithRequestID returns ctx carrying the request ID of the call it belongs
// to, for the audit trail. The gRPC adapter sets it.
func WithRequestID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, requestIDKey{}, id)
}

// RequestID returns the request ID of the call ctx belongs to, if any.
func RequestID(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey{}).(string)
	return id
}
