"""Store records for the store and mesh tests."""

from __future__ import annotations

from kernelmesh.core.store import TaskRecord


def task(n: int, **changes: object) -> TaskRecord:
    values: dict[str, object] = {
        "id": f"{n:032x}",
        "seq": n,
        "tenant": "acme",
        "op": "relu",
        "state": 1,
        "priority": 0,
        "spec": '{"params": {}}',
        "create_time": 1000.0 + n,
    }
    values.update(changes)
    return TaskRecord(**values)  # type: ignore[arg-type]
