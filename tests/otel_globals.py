"""A tracer provider installed for one test: OpenTelemetry allows setting the
global provider once per process, so this resets the API's globals afterwards
(as opentelemetry-test-utils' `reset_trace_globals` does), leaving later tests
untraced."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once


def _reset() -> None:
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@contextlib.contextmanager
def installed() -> Iterator[InMemorySpanExporter]:
    """A global SDK provider whose spans are kept in memory, for the block."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        _reset()
        provider.shutdown()


async def spans_when(
    exporter: InMemorySpanExporter,
    done: Callable[[tuple[ReadableSpan, ...]], bool],
    timeout: float = 10.0,
) -> tuple[ReadableSpan, ...]:
    """The finished spans once `done(spans)` holds (a server span may end just
    after the client has its reply); the last spans seen when it never does."""
    deadline = time.monotonic() + timeout
    spans = exporter.get_finished_spans()
    while not done(spans) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        spans = exporter.get_finished_spans()
    return spans


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]
