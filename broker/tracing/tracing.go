// Package tracing sets up OpenTelemetry traces from the standard OTEL_*
// environment variables, and is off unless OTEL_TRACES_EXPORTER names an
// exporter. Off, nothing is installed: no stats handler on the gRPC server,
// no wrapped transports, no Redis hook, so tracing costs nothing.
//
// On (e.g. OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318),
// the exporter, endpoint, protocol, headers, sampler and resource come from
// the variables as the OpenTelemetry specification defines them
// (go.opentelemetry.io/contrib/exporters/autoexport), the service name
// defaults to "tokenbroker", and W3C trace context is propagated.
package tracing

import (
	"context"
	"fmt"
	"os"

	"go.opentelemetry.io/contrib/exporters/autoexport"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	"go.opentelemetry.io/otel/trace"
)

// Enabled reports whether the environment asks for traces.
func Enabled() bool {
	v := os.Getenv("OTEL_TRACES_EXPORTER")
	return v != "" && v != "none" && os.Getenv("OTEL_SDK_DISABLED") != "true"
}

// Setup returns the tracer provider the environment asks for, installed as
// the global one with W3C trace context propagation, and its shutdown
// (which flushes spans). Without OTEL_TRACES_EXPORTER it returns nil: off.
func Setup(ctx context.Context) (trace.TracerProvider, func(context.Context) error, error) {
	if !Enabled() {
		return nil, func(context.Context) error { return nil }, nil
	}
	exp, err := autoexport.NewSpanExporter(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("tracing: %w", err)
	}
	res, err := resource.Merge(resource.NewSchemaless(semconv.ServiceName("tokenbroker")), resource.Default())
	if err != nil {
		res = resource.Default()
	}
	if env, err := resource.New(ctx, resource.WithFromEnv()); err == nil { // OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES win
		if merged, err := resource.Merge(res, env); err == nil {
			res = merged
		}
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))
	return tp, tp.Shutdown, nil
}
