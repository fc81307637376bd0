"""OpenTelemetry tracing (the optional extra ``otel``): one trace per watch.

The producer's ``enqueue_watch`` starts the trace (a PRODUCER span) and sends its
context in the start message's ``traceparent`` header (W3C Trace Context). The
worker keeps that context with the watch in Redis, so every poll, whichever worker
runs it and after any re-arm by the sweep, is a span of the same trace; the
watch's events keep it too, and each delivery attempt is a span whose own context
reaches the receiver in the webhook's ``traceparent`` header.

The spans go to the global tracer provider: configure it as for any Python
service (``opentelemetry-instrument``, or the SDK in your own start-up code).
Without ``opentelemetry-api`` installed, or with no provider configured, nothing is
recorded; a ``traceparent`` received from the producer is still kept and passed
on, so a receiver can join the producer's trace.

It lives in the producers' package because ``enqueue_watch`` starts the trace; the
worker imports it from here, like the names of the Redis keys.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final, Literal

TRACEPARENT: Final = "traceparent"
TRACER_NAME: Final = "check365-worker"
# W3C Trace Context, version 00: trace id, parent span id, flags; all-zero ids are invalid.
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")

Kind = Literal["producer", "client", "internal"]
Attribute = str | int | float | bool


def valid_traceparent(value: object) -> str:
    """``value`` when it is a well-formed traceparent, else '' (it comes from a message: untrusted)."""
    if isinstance(value, str) and len(value) == 55 and _TRACEPARENT.fullmatch(value):
        return value
    return ""


class Span:
    """What the code in a traced block sees: its context to pass on, and a place for attributes."""

    def __init__(self, traceparent: str, otel_span: Any = None) -> None:
        self.traceparent = traceparent
        self._span = otel_span

    def set(self, key: str, value: Attribute | None) -> None:
        if self._span is not None and value is not None:
            self._span.set_attribute(key, value)

    def headers(self) -> dict[str, str]:
        """The header that carries this span's context, or none."""
        return {TRACEPARENT: self.traceparent} if self.traceparent else {}


@functools.cache
def _api() -> Any:
    # Looked up once: a failed import is retried on every call otherwise, for every poll.
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: str | None = None,
    kind: Kind = "internal",
    attributes: Mapping[str, Attribute | None] | None = None,
) -> Iterator[Span]:
    """Run the block in a span.

    ``parent`` is a traceparent to continue ('' for none); ``None`` continues the
    current context (the producer's own request, say). The block gets the span's own
    traceparent, or ``parent`` when nothing is recorded.
    """
    trace = _api()
    # No provider configured (OpenTelemetry's proxy stands in until one is set): nothing
    # would be recorded, so the context is only passed on, at a fraction of the cost.
    if trace is None or isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        yield Span(valid_traceparent(parent))
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    context = None
    if parent is not None:
        # An empty carrier gives a fresh root: a watch whose producer sent no context
        # still gets one trace of its own.
        context = propagator.extract({TRACEPARENT: parent} if valid_traceparent(parent) else {})
    kinds = {"producer": trace.SpanKind.PRODUCER, "client": trace.SpanKind.CLIENT}
    tracer = trace.get_tracer(TRACER_NAME)
    clean = {k: v for k, v in (attributes or {}).items() if v is not None}
    with tracer.start_as_current_span(
        name, context=context, kind=kinds.get(kind, trace.SpanKind.INTERNAL), attributes=clean
    ) as otel_span:
        carrier: dict[str, str] = {}
        propagator.inject(carrier)
        yield Span(valid_traceparent(carrier.get(TRACEPARENT)) or valid_traceparent(parent), otel_span)
