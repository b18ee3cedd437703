"""The task path's tallies render as standard Prometheus counters and histograms."""

from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest

from kernelmesh.core.metrics import Tally


def _lines(prefix: str) -> list[str]:
    text = generate_latest(REGISTRY).decode()
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_a_counter_counts_per_label_set():
    tally = Tally("km_test_events", "Test events.", ("kind",))
    try:
        for kind in ("a", "a", "b"):
            tally.inc((kind,))
        assert sorted(_lines("km_test_events_total")) == [
            'km_test_events_total{kind="a"} 2.0',
            'km_test_events_total{kind="b"} 1.0',
        ]
    finally:
        REGISTRY.unregister(tally)


def test_a_histogram_has_inclusive_cumulative_buckets_count_and_sum():
    tally = Tally("km_test_seconds", "Test durations.", ("op",), (0.1, 1.0))
    try:
        for value in (0.05, 0.1, 0.5, 3.0):  # 0.1 lands in le="0.1": buckets are "<="
            tally.observe(("x",), value)
        lines = _lines("km_test_seconds")
        assert 'km_test_seconds_bucket{le="0.1",op="x"} 2.0' in lines
        assert 'km_test_seconds_bucket{le="1.0",op="x"} 3.0' in lines
        assert 'km_test_seconds_bucket{le="+Inf",op="x"} 4.0' in lines
        assert 'km_test_seconds_count{op="x"} 4.0' in lines
        assert 'km_test_seconds_sum{op="x"} 3.65' in lines
    finally:
        REGISTRY.unregister(tally)
