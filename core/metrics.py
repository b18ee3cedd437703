"""Prometheus metrics of the task path. Module-level so that several servers in
one process (tests) share one registry instead of colliding."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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

TASKS = Counter("kernelmesh_tasks_total", "Tasks that reached a terminal state.", ["op", "state"])
TASK_RUN_SECONDS = Histogram(
    "kernelmesh_task_run_seconds",
    "Kernel run time of succeeded tasks.",
    ["op", "device"],
    buckets=_LATENCY_BUCKETS,
)
TASK_QUEUE_SECONDS = Histogram(
    "kernelmesh_task_queue_seconds",
    "Time tasks waited in a ready queue.",
    ["device"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("kernelmesh_queue_depth", "Tasks waiting in a ready queue.", ["device"])
RUNNING = Gauge("kernelmesh_tasks_running", "Tasks running now.", ["device"])
TASKS_RETAINED = Gauge("kernelmesh_tasks_retained", "Task records held in memory.")


# labels() takes a lock and builds a key on every call; the hot path keeps the
# children it has already resolved.
_children: dict[tuple, object] = {}


def child(metric, *labels: str):
    key = (id(metric), *labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found
