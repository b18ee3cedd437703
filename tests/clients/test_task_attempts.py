"""Attempts, the retry policy, the dead letter and placement as the Python client
sees them, on both faces: a server whose cpu:0 fails every launch (an in-process
server, its device's `run` raising the launch error a lost device raises), and
the shared `kernelmesh serve` for placement."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from click.testing import CliRunner

from kernelmesh.clients import Client, InvalidArgumentError, RetryPolicy, TaskInfo, TaskState
from kernelmesh.clients.cli import main
from kernelmesh.native.backend import LaunchError

UNAVAILABLE = 14
FAST = 0.01  # seconds between attempts


@pytest.fixture
async def failing(server_config, start_server, monkeypatch) -> str:
    """An in-process server whose cpu:0 fails every launch with UNAVAILABLE (a
    retryable error); returns its target."""
    server = await start_server(server_config)
    device = next(d for d in server.tasks.devices if d.name == "cpu:0")

    def lost(op, inputs, params, outputs=None):
        raise LaunchError("device lost")

    monkeypatch.setattr(device, "run", lost)
    return f"127.0.0.1:{server.port}"


def _x() -> np.ndarray:
    return np.arange(-8, 8, dtype=np.float32)


async def test_exhausted_task_ends_failed_with_every_attempts_error(failing, connect):
    face = connect(failing, timeout=30.0)
    handle = await face.submit("relu", _x(), device="cpu:0", retry=RetryPolicy(FAST))
    info = await face.on(handle).wait(timeout=30)

    assert info.state is TaskState.FAILED
    assert info.error_code == UNAVAILABLE
    # the server's default policy: 3 attempts in all
    assert [a.number for a in info.attempts] == [1, 2, 3]
    assert info.attempt == 3
    for attempt in info.attempts:
        assert attempt.state is TaskState.FAILED
        assert attempt.error_code == UNAVAILABLE
        assert "device lost" in attempt.error_message
        assert attempt.device == "cpu:0"
        assert attempt.start_time is not None and attempt.end_time is not None
        assert attempt.end_time >= attempt.start_time


async def test_maximum_attempts_two_gives_exactly_two_attempts(failing, connect):
    face = connect(failing, timeout=30.0)
    policy = RetryPolicy(initial_interval=FAST, backoff_coefficient=1.5, maximum_attempts=2)
    handle = await face.submit("relu", _x(), device="cpu:0", retry=policy)
    info = await face.on(handle).wait(timeout=30)

    assert info.state is TaskState.FAILED
    assert [(a.number, a.state) for a in info.attempts] == [
        (1, TaskState.FAILED),
        (2, TaskState.FAILED),
    ]


async def test_a_non_retryable_error_type_ends_the_task_after_one_attempt(failing, connect):
    face = connect(failing, timeout=30.0)
    policy = RetryPolicy(FAST, non_retryable_error_types=("UNAVAILABLE",))
    handle = await face.submit("relu", _x(), device="cpu:0", retry=policy)
    info = await face.on(handle).wait(timeout=30)

    assert info.state is TaskState.FAILED
    assert len(info.attempts) == 1


async def test_list_tasks_by_state_shows_the_attempts(failing, connect):
    face = connect(failing, timeout=30.0)
    policy = RetryPolicy(FAST, maximum_attempts=2)
    handle = await face.submit("relu", _x(), device="cpu:0", retry=policy)
    await face.on(handle).wait(timeout=30)

    failed = await face.collect(face.client.list_tasks(TaskState.FAILED))
    assert [t.name for t in failed] == [handle.name]
    assert [a.number for a in failed[0].attempts] == [1, 2]
    assert all("device lost" in a.error_message for a in failed[0].attempts)


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (RetryPolicy(maximum_attempts=-1), "task.retry_policy.maximum_attempts"),
        (RetryPolicy(backoff_coefficient=0.5), "task.retry_policy.backoff_coefficient"),
        (
            RetryPolicy(initial_interval=2.0, maximum_interval=1.0),
            "task.retry_policy.maximum_interval",
        ),
        (
            RetryPolicy(non_retryable_error_types=("NOT_A_CODE",)),
            "task.retry_policy.non_retryable_error_types[0]",
        ),
    ],
)
async def test_an_invalid_retry_policy_is_invalid_argument_naming_the_field(face, policy, field):
    with pytest.raises(InvalidArgumentError) as info:
        await face.submit("relu", _x(), retry=policy)
    assert field in [v.field for v in info.value.violations]


async def test_placement_names_the_device_that_ran_the_task_and_why(face):
    handle = await face.submit("relu", _x(), retry=RetryPolicy(maximum_attempts=1))
    info = await face.on(handle).wait(timeout=60)

    assert info.state is TaskState.SUCCEEDED
    assert info.placement is not None
    assert info.placement.reason
    assert info.placement.device == info.device
    assert info.placement.node == ""  # a device of the server's own process
    assert info.attempt == 1
    assert [(a.number, a.state, a.device) for a in info.attempts] == [
        (1, TaskState.SUCCEEDED, info.device)
    ]


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _submit_and_wait(target: str, **options: object) -> TaskInfo:
    with Client(target, timeout=30.0) as km:
        return km.submit("relu", _x(), **options).wait(timeout=60)


# The command line has one face (the blocking client): these run once.


async def test_cli_task_get_prints_each_attempts_error(failing):
    policy = RetryPolicy(FAST, maximum_attempts=2)
    info = await asyncio.to_thread(_submit_and_wait, failing, device="cpu:0", retry=policy)

    code, out = await asyncio.to_thread(_cli, "task", "get", info.name, "--target", failing)
    assert code == 0, out
    assert f"{info.name}  relu  FAILED" in out
    attempts = [line.strip() for line in out.splitlines() if line.strip().startswith("attempt ")]
    assert len(attempts) == 2, out
    assert all("FAILED" in line and "UNAVAILABLE: " in line for line in attempts)
    assert all("device lost" in line for line in attempts)

    code, out = await asyncio.to_thread(
        _cli, "task", "get", info.name, "--json", "--target", failing
    )
    assert code == 0, out
    data = json.loads(out)
    assert data["state"] == "FAILED"
    assert [(a["number"], a["error_code"]) for a in data["attempts"]] == [
        (1, "UNAVAILABLE"),
        (2, "UNAVAILABLE"),
    ]


async def test_cli_task_get_and_list_show_the_placement(served):
    info = await asyncio.to_thread(_submit_and_wait, served.target)
    assert info.placement is not None

    code, out = await asyncio.to_thread(_cli, "task", "get", info.name, "--target", served.target)
    assert code == 0, out
    assert f"device {info.device}" in out
    assert f"placed on {info.device}: {info.placement.reason}" in out

    code, out = await asyncio.to_thread(
        _cli, "task", "list", "--state", "succeeded", "--limit", "1000", "--target", served.target
    )
    assert code == 0, out
    assert any(line.startswith(info.name) and "SUCCEEDED" in line for line in out.splitlines())


async def test_cli_task_get_of_an_unknown_task_fails_with_not_found(served):
    code, out = await asyncio.to_thread(
        _cli, "task", "get", "tasks/nope", "--target", served.target
    )
    assert code == 1
    assert "NOT_FOUND" in out


@pytest.mark.parametrize("command", ["get", "list"])
def test_cli_task_commands_document_their_environment(command):
    code, out = _cli("task", command, "--help")
    assert code == 0, out
    text = " ".join(out.split())  # click wraps lines anywhere
    assert "KERNELMESH_TARGET" in text and "--wait" in text and "--json" in text
