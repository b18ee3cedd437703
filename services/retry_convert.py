"""A task's RetryPolicy message to core's RetryPolicy (core.task_retry checks
and defaults it); shared by SubmitTask and the task steps of SubmitWorkflow."""

from __future__ import annotations

import grpc

from kernelmesh.core.errors import InvalidArgument, Violation
from kernelmesh.core.task_retry import RetryPolicy, checked_policy
from kernelmesh.services import convert
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
    intervals: dict[str, float | None] = {}
    bad_durations: list[Violation] = []
    for name in ("initial_interval", "maximum_interval"):
        intervals[name] = None
        if policy.HasField(name):
            try:
                intervals[name] = convert.duration_seconds(
                    getattr(policy, name),
                    f"{where}.{name}",
                    maximum=convert.MAX_RETRY_INTERVAL_SECONDS,
                )
            except InvalidArgument as exc:
                bad_durations.extend(exc.violations)
    if bad_durations:  # checked_policy would judge defaults in their place
        raise InvalidArgument([*bad_durations, *unknown])
    return checked_policy(
        initial_interval=intervals["initial_interval"],
        backoff_coefficient=policy.backoff_coefficient,
        maximum_interval=intervals["maximum_interval"],
        maximum_attempts=policy.maximum_attempts,
        non_retryable=codes,
        field=where,
        violations=unknown,
    )


__all__ = ["retry_from_proto"]
