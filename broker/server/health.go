package server

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// healthServer is grpc-go's health service with one change: once the server
// drains, each Watch stream ends after it has told its caller NOT_SERVING.
// grpc-go's Watch runs until the caller leaves, and GracefulStop waits for every
// stream, so a caller with client-side health checking would otherwise hold
// shutdown for the whole grace period.
type healthServer struct {
	*health.Server
	draining chan struct{}
	once     sync.Once
}

// notServingWait bounds how long a draining Watch stream waits to deliver
// NOT_SERVING before it ends anyway.
const notServingWait = time.Second

func newHealthServer() *healthServer {
	return &healthServer{Server: health.NewServer(), draining: make(chan struct{})}
}

// Drain turns every service NOT_SERVING and ends the Watch streams once they
// have said so.
func (h *healthServer) Drain() {
	h.Shutdown()
	h.once.Do(func() { close(h.draining) })
}

// Watch serves grpc.health.v1.Health/Watch until the caller leaves or the
// server drains; a drained stream ends with UNAVAILABLE.
func (h *healthServer) Watch(req *healthpb.HealthCheckRequest, stream healthpb.Health_WatchServer) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	ws := &watchStream{Health_WatchServer: stream, ctx: ctx, notServing: make(chan struct{})}
	go func() {
		select {
		case <-h.draining:
		case <-ctx.Done():
			return
		}
		t := time.NewTimer(notServingWait)
		defer t.Stop()
		select {
		case <-ws.notServing:
		case <-t.C:
		case <-ctx.Done():
		}
		cancel()
	}()
	err := h.Server.Watch(req, ws)
	select {
	case <-h.draining:
		if stream.Context().Err() == nil {
			return status.Error(codes.Unavailable, "server is shutting down")
		}
	default:
	}
	return err
}

// watchStream is a Watch stream whose context ends when the server drains, and
// which notes when it has sent anything but SERVING.
type watchStream struct {
	healthpb.Health_WatchServer
	ctx        context.Context
	once       sync.Once
	notServing chan struct{}
}

func (w *watchStream) Context() context.Context { return w.ctx }

func (w *watchStream) Send(m *healthpb.HealthCheckResponse) error {
	err := w.Health_WatchServer.Send(m)
	if m.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		w.once.Do(func() { close(w.notServing) })
	}
	return err
}
