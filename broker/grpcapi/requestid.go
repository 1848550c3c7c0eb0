package grpcapi

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"math/rand/v2"

	"google.golang.org/grpc/metadata"

	"github.com/tokenbroker/tokenbroker/broker"
)

// RequestIDHeader is the gRPC metadata key a caller may set to correlate its
// request with the audit trail; without it the broker makes one up.
const RequestIDHeader = "x-request-id"

// withRequestID returns ctx carrying the call's request ID. It reads only the
// one header (not a copy of all metadata), and a made-up ID needs to be unique,
// not unpredictable: it is on the hit path of every call.
func withRequestID(ctx context.Context) context.Context {
	id := ""
	if v := metadata.ValueFromIncomingContext(ctx, RequestIDHeader); len(v) > 0 && len(v[0]) <= 128 {
		id = v[0]
	}
	if id == "" {
		var raw [8]byte
		binary.LittleEndian.PutUint64(raw[:], rand.Uint64())
		var b [16]byte
		hex.Encode(b[:], raw[:])
		id = string(b[:])
	}
	return broker.WithRequestID(ctx, id)
}
