// Package broker is tokenbroker's core: it vends access tokens to callers
// identified by their client certificates.
//
// A Broker serves a token from its in-process cache while the token has at
// least the caller's min_ttl left, otherwise from the shared store, otherwise
// from the authorization server. Concurrent misses on one key collapse into a
// single fetch. It never serves a token below the caller's min_ttl and never
// an expired one. It knows nothing of gRPC: package grpcapi exposes the
// Broker over gRPC and turns its errors (the sentinels in errors.go, whose
// messages never hold a secret, a token or an upstream response body) into
// status codes.
package broker
