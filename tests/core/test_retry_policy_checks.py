"""A task's retry policy from a request's fields (core.task_retry.checked_policy)
and Submit* request ids (core.idempotency), without gRPC."""

from __future__ import annotations

import pytest

from kernelmesh.core.errors import InvalidArgument, Violation
from kernelmesh.core.idempotency import MAX_REQUEST_ID, check_request_id
from kernelmesh.core.task_retry import DEFAULT_RETRY, MAX_ATTEMPTS, RetryPolicy, checked_policy

FIELD = "task.retry_policy"


def _policy(**fields: object) -> RetryPolicy:
    args: dict[str, object] = {
        "initial_interval": None,
        "backoff_coefficient": 0.0,
        "maximum_interval": None,
        "maximum_attempts": 0,
        "non_retryable": (),
        "field": FIELD,
    }
    args.update(fields)
    return checked_policy(**args)  # type: ignore[arg-type]


def _fields(info: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in info.value.violations]


def test_unset_fields_take_temporals_defaults():
    assert _policy() == DEFAULT_RETRY


def test_set_fields_are_kept():
    policy = _policy(
        initial_interval=0.5,
        backoff_coefficient=3.0,
        maximum_interval=4.0,
        maximum_attempts=7,
        non_retryable=[13, 14],
    )
    assert policy == RetryPolicy(0.5, 3.0, 4.0, 7, frozenset({13, 14}))


def test_every_field_out_of_range_is_named_at_once():
    with pytest.raises(InvalidArgument) as info:
        _policy(
            initial_interval=0.0,
            backoff_coefficient=0.5,
            maximum_interval=-1.0,
            maximum_attempts=MAX_ATTEMPTS + 1,
        )
    assert _fields(info) == [
        f"{FIELD}.initial_interval",
        f"{FIELD}.maximum_interval",
        f"{FIELD}.backoff_coefficient",
        f"{FIELD}.maximum_attempts",
    ]


def test_a_maximum_below_the_initial_interval_is_refused():
    with pytest.raises(InvalidArgument) as info:
        _policy(initial_interval=2.0, maximum_interval=1.0)
    assert _fields(info) == [f"{FIELD}.maximum_interval"]


def test_the_callers_violations_come_after_the_ranges():
    unknown = Violation(f"{FIELD}.non_retryable_error_types[0]", "not a code")
    with pytest.raises(InvalidArgument) as info:
        _policy(maximum_attempts=-1, violations=[unknown])
    assert _fields(info) == [f"{FIELD}.maximum_attempts", unknown.field]


def test_the_callers_violations_alone_are_refused():
    unknown = Violation(f"{FIELD}.non_retryable_error_types[0]", "not a code")
    with pytest.raises(InvalidArgument) as info:
        _policy(violations=[unknown])
    assert _fields(info) == [unknown.field]


def test_a_request_id_up_to_the_limit_is_kept():
    assert check_request_id("r" * MAX_REQUEST_ID) == "r" * MAX_REQUEST_ID


def test_a_longer_request_id_is_refused_naming_the_field():
    with pytest.raises(InvalidArgument) as info:
        check_request_id("r" * (MAX_REQUEST_ID + 1))
    assert _fields(info) == ["request_id"]
