"""OpenTelemetry for every service: one tracer provider per process, exporting over OTLP when
`--otlp-traces-endpoint` is given, and W3C `traceparent` carried in gRPC metadata so one trace
runs from the router through prefill, the KV transfer and decode.

Without an endpoint no provider is installed and spans cost next to nothing (the API's no-op
tracer); tests install an SDK provider with an in-memory exporter before starting services.
"""
from __future__ import annotations

from typing import Any, Iterable

from opentelemetry import context, propagate, trace

TRACER_NAME = "tandem"


def setup_tracing(service_name: str, otlp_endpoint: str | None) -> None:
    if not otlp_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    insecure = not otlp_endpoint.startswith("https://")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=insecure)))
    trace.set_tracer_provider(provider)


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def outgoing_metadata(extra: Iterable[tuple[str, str]] = (), ctx: context.Context | None = None
                      ) -> list[tuple[str, str]]:
    """gRPC metadata carrying a trace context (traceparent, tracestate): `ctx`, else the current."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return list(extra) + list(carrier.items())


def incoming_context(metadata: Iterable[Any] | None) -> context.Context:
    """The caller's trace context from gRPC invocation metadata (empty context if none)."""
    carrier = {m.key if hasattr(m, "key") else m[0]: m.value if hasattr(m, "value") else m[1]
               for m in (metadata or ())}
    return propagate.extract(carrier)
