"""Prometheus metrics of the task path. Module-level so that several servers in
one process (tests) share one registry instead of colliding."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from typing import Any, TypeVar, cast

from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Tally(Collector):
    """A labelled counter or histogram for the task path. prometheus_client's own
    take a lock and build sample objects on every call, about 2 us each: as much as
    a tiny kernel, three times per task. Here a sample is a dict lookup and a bisect;
    the exposition is built when /metrics is scraped. Updated from the event loop's
    thread only."""

    def __init__(
        self, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...] = ()
    ) -> None:
        self.name, self.doc, self.labels, self.buckets = name, doc, labels, buckets
        # labels -> [count per bucket (the last one is +Inf), sum of values]
        self._series: dict[tuple[str, ...], list[Any]] = {}
        REGISTRY.register(self)

    def inc(self, key: tuple[str, ...]) -> None:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [[0], 0.0]
        series[0][0] += 1

    def observe(self, key: tuple[str, ...], value: float) -> None:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [[0] * (len(self.buckets) + 1), 0.0]
        series[0][bisect.bisect_left(self.buckets, value)] += 1  # buckets are "<= le"
        series[1] += value

    def counts(self) -> dict[tuple[str, ...], tuple[int, float]]:
        """Each label set's (count, sum of observed values); sum is 0 for counters."""
        return {key: (sum(counts), total) for key, (counts, total) in list(self._series.items())}

    def collect(self) -> Iterator[Metric]:
        if not self.buckets:
            counter = CounterMetricFamily(self.name, self.doc, labels=self.labels)
            for key, (counts, _) in list(self._series.items()):
                counter.add_metric(list(key), counts[0])
            yield counter
            return
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, (counts, total) in list(self._series.items()):
            cumulative = list(itertools.accumulate(counts))
            edges = [repr(float(b)) for b in self.buckets] + ["+Inf"]
            family.add_metric(list(key), list(zip(edges, cumulative, strict=True)), total)
        yield family


TASKS = Tally("kernelmesh_tasks", "Tasks that reached a terminal state.", ("op", "state"))
TASK_RUN_SECONDS = Tally(
    "kernelmesh_task_run_seconds",
    "Kernel run time of succeeded tasks.",
    ("op", "device"),
    _LATENCY_BUCKETS,
)
TASK_QUEUE_SECONDS = Tally(
    "kernelmesh_task_queue_seconds",
    "Time tasks waited in a ready queue.",
    ("device",),
    _LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("kernelmesh_queue_depth", "Tasks waiting in a ready queue.", ["device"])
RUNNING = Gauge("kernelmesh_tasks_running", "Tasks running now.", ["device"])
TASKS_RETAINED = Gauge("kernelmesh_tasks_retained", "Task records held in memory.")


# labels() takes a lock and builds a key on every call; the hot path keeps the
# children it has already resolved.
_children: dict[tuple[int | str, ...], MetricWrapperBase] = {}
_M = TypeVar("_M", bound=MetricWrapperBase)


def child(metric: _M, *labels: str) -> _M:
    key: tuple[int | str, ...] = (id(metric), *labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return cast(_M, found)


# The mesh (core/mesh): membership and failover.
NODES = Gauge("kernelmesh_nodes", "Nodes joined to this orchestrator and not lost.")
NODES_LOST = Tally("kernelmesh_nodes_lost", "Nodes declared LOST (lease expired or rejoined).", ())
REDISPATCHED = Tally(
    "kernelmesh_attempts_redispatched",
    "Attempts placed again after their node was lost or drained.",
    (),
)
TASKS_RELINQUISHED = Tally(
    "kernelmesh_tasks_relinquished",
    "Tasks another orchestrator claimed after this one's lease on them ran out "
    "(their attempts here stopped, their results dropped).",
    (),
)
RESULTS_REFUSED = Tally(
    "kernelmesh_results_refused",
    "Results a node returned that did not match the op's outputs (shape or dtype).",
    (),
)
TENSOR_MOVES = Tally(
    "kernelmesh_tensor_moves",
    "Stored tensors moved from the node holding them to the node a task was placed on.",
    (),
)
