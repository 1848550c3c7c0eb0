package grpcapi

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"math/rand/v2"

	"google.golang.org/grpc/metadata"
)

// RequestIDHeader is the gRPC metadata key a caller may set to correlate its
// request with the audit trail; without it the broker makes one up.
const RequestIDHeader = "x-request-id"

// The request ID of a call is the caller's x-request-id when it sent one of
// at most 128 bytes, else a made-up one. The adapter hands it to the audit
// record itself; only calls whose audit event the core writes
// (InvalidateToken) carry it in their context (broker.WithRequestID).

// requestID returns the call's request ID.
func requestID(ctx context.Context) string {
	if id := sentRequestID(ctx); id != "" {
		return id
	}
	var made [16]byte
	makeRequestID(&made)
	return string(made[:])
}

// sentRequestID returns the caller's request ID, or "" when it sent none (or
// one too long to record). It reads only the one header, not a copy of all
// metadata.
func sentRequestID(ctx context.Context) string {
	if v := metadata.ValueFromIncomingContext(ctx, RequestIDHeader); len(v) > 0 && len(v[0]) <= 128 {
		return v[0]
	}
	return ""
}

// makeRequestID writes a made-up request ID into made: 16 hex digits, unique
// rather than unpredictable. (GetToken, on the hit path of every call, keeps
// made on its stack.)
func makeRequestID(made *[16]byte) {
	var raw [8]byte
	binary.LittleEndian.PutUint64(raw[:], rand.Uint64())
	hex.Encode(made[:], raw[:])
}
