"""Server logs (issue 8): text by default, JSON with `--log-format json`; both
carry the trace and span ids of the span that is current when a line is logged."""

from __future__ import annotations

import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from kernelmesh.services import logging_setup


@pytest.fixture
def configured(capsys):
    """configure() for the test, then the logging setup pytest had."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))

    def configure(fmt):
        logging_setup.configure("INFO", fmt)
        return lambda: capsys.readouterr().err.strip().splitlines()

    yield configure
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])


def test_json_lines_carry_the_current_trace_and_span_ids(configured):
    read = configured("json")
    tracer = TracerProvider().get_tracer("test")
    log = logging.getLogger("kernelmesh.test")
    with tracer.start_as_current_span("call") as span:
        log.info("inside %s", "a span")
    log.warning("outside")
    inside, outside = (json.loads(line) for line in read())
    context = span.get_span_context()
    assert inside["message"] == "inside a span"
    assert inside["level"] == "INFO" and inside["logger"] == "kernelmesh.test"
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert inside["time"].endswith("Z")
    assert outside["message"] == "outside" and "trace_id" not in outside


def test_json_lines_hold_the_exception(configured):
    read = configured("json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("kernelmesh.test").exception("failed")
    [line] = read()
    entry = json.loads(line)
    assert entry["message"] == "failed" and "RuntimeError: boom" in entry["exception"]


def test_text_lines_name_the_trace_only_inside_one(configured):
    read = configured("text")
    tracer = TracerProvider().get_tracer("test")
    log = logging.getLogger("kernelmesh.test")
    with tracer.start_as_current_span("call") as span:
        log.info("inside")
    log.info("outside")
    inside, outside = read()
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert inside.endswith(
        f"trace_id={trace_id} span_id=" + format(span.get_span_context().span_id, "016x")
    )
    assert " INFO kernelmesh.test: inside" in inside
    assert outside.endswith("kernelmesh.test: outside")


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text, json"):
        logging_setup.configure("INFO", "xml")  # type: ignore[arg-type]
