package grpcapi

import (
	"hash/maphash"
	"sync/atomic"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store"
)

// responses remembers the message built for each recently issued token, so
// that a cache hit hands gRPC the GetTokenResponse built for the previous
// caller of the same token rather than building (and allocating) another.
// A cached entry never changes, so neither does its message, and gRPC only
// reads it: marshalling one message from many goroutines at once is safe.
//
// The table is direct-mapped on the token's fingerprint and bounded: a
// collision costs a rebuild, never a wrong token, because the entry itself is
// compared. An entry stays referenced until its place is taken; the process
// holds its tokens in memory anyway.
type responses struct {
	seed  maphash.Seed
	slots [1024]atomic.Pointer[response]
}

// response is one remembered message and the entry it was built from.
type response struct {
	entry *store.Entry
	msg   *pb.GetTokenResponse
}

func newResponses() *responses { return &responses{seed: maphash.MakeSeed()} }

// get returns the GetTokenResponse for e. The message must not be modified.
func (r *responses) get(e *store.Entry) *pb.GetTokenResponse {
	slot := &r.slots[maphash.String(r.seed, e.Fingerprint)%uint64(len(r.slots))]
	if m := slot.Load(); m != nil && m.entry == e {
		return m.msg
	}
	m := &response{entry: e, msg: &pb.GetTokenResponse{Token: tokenProto(e)}}
	slot.Store(m)
	return m.msg
}

// tokenProto is e as the API's Token message.
func tokenProto(e *store.Entry) *pb.Token {
	return &pb.Token{
		AccessToken: e.AccessToken,
		TokenType:   e.TokenType,
		ExpireTime:  timestamppb.New(e.Expiry),
		Scopes:      e.Scopes,
		Fingerprint: e.Fingerprint,
	}
}
