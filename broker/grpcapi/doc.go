// Package grpcapi is the gRPC adapter of tokenbroker: it serves the
// tokenbroker.v1.TokenBroker API from a broker.Broker, reads each caller's
// identity from its verified client certificate (once per connection, at
// the handshake), sets the request ID the audit trail carries, and turns the
// core's errors into gRPC status codes — the one place where that happens.
// The core (package broker) knows nothing of gRPC.
package grpcapi
