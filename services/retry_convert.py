"""A task's RetryPolicy message to core's RetryPolicy (core.task_retry checks
and defaults it); shared by SubmitTask and the task steps of SubmitWorkflow."""

from __future__ import annotations

import grpc

from kernelmesh.core.errors import Violation
from kernelmesh.core.task_retry import RetryPolicy, checked_policy
from kernelmesh.v1 import task_pb2


def retry_from_proto(msg: task_pb2.TaskSpec) -> RetryPolicy | None:
    """The task's retry policy (Temporal's fields and defaults); None when unset."""
    if not msg.HasField("retry_policy"):
        return None
    policy = msg.retry_policy
    where = "task.retry_policy"
    unknown: list[Violation] = []
    codes: set[int] = set()
    for i, name in enumerate(policy.non_retryable_error_types):
        try:
            codes.add(grpc.StatusCode[name].value[0])
        except KeyError:
            unknown.append(
                Violation(
                    f"{where}.non_retryable_error_types[{i}]",
                    f"{name!r} is not a google.rpc.Code name (e.g. INTERNAL, UNAVAILABLE)",
                )
            )
    return checked_policy(
        initial_interval=(
            policy.initial_interval.ToNanoseconds() / 1e9
            if policy.HasField("initial_interval")
            else None
        ),
        backoff_coefficient=policy.backoff_coefficient,
        maximum_interval=(
            policy.maximum_interval.ToNanoseconds() / 1e9
            if policy.HasField("maximum_interval")
            else None
        ),
        maximum_attempts=policy.maximum_attempts,
        non_retryable=codes,
        field=where,
        violations=unknown,
    )


__all__ = ["retry_from_proto"]
