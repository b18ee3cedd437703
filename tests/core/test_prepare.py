"""Start-up: every device compiles (logging progress with counts and time) before any
is measured, a device that fails either step stays unmeasured, and `kernelmesh warmup`
does the same ahead of time."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

from kernelmesh.core import devices, placement
from kernelmesh.native.backend import DeviceProperties


class _Backend:
    """A backend that records the order of warm-ups and measurements."""

    def __init__(self, name: str, events: list[str], fail: bool = False) -> None:
        self.name, self.events, self.fail = name, events, fail

    def warmup_steps(self) -> int:
        return 3

    def warmup(self, progress) -> None:
        if self.fail:
            raise RuntimeError("the compiler crashed")
        for step in ("a", "b", "c"):
            progress(step)
        self.events.append(f"compiled {self.name}")


def _device(name: str, events: list[str], fail: bool = False) -> devices.LocalDevice:
    kind, _, index = name.partition(":")
    props = DeviceProperties(kind, int(index), "m", "v", "d", 1, 1, 1, True, False)
    return devices.LocalDevice(info=devices._info(props, "n"), backend=_Backend(name, events, fail))


@pytest.fixture
def events(monkeypatch) -> list[str]:
    seen: list[str] = []
    # the first round is the slowest (busy threads after a compile), the second the fastest
    rounds = iter([1.0, 0.25, 0.5] * 10)

    def measure(device: devices.LocalDevice) -> placement.DeviceSpeed:
        seen.append(f"measured {device.name}")
        slow = next(rounds)
        return placement.DeviceSpeed(1e-5 * slow, 1e10 / slow, 1e9 / slow)

    monkeypatch.setattr(placement, "measure", measure)
    return seen


def test_every_device_compiles_before_any_is_measured(events, caplog, monkeypatch):
    monkeypatch.setattr(devices._Progress, "__init__", _every_step(devices._Progress.__init__))
    found = [_device("cpu:0", events), _device("opencl:0", events)]
    with caplog.at_level(logging.INFO, logger="kernelmesh.core.devices"):
        devices.prepare(found)
    measured = ["measured cpu:0", "measured opencl:0"] * devices._MEASURE_ROUNDS
    assert events == ["compiled cpu:0", "compiled opencl:0", *measured]
    # each figure is the fastest of the rounds
    assert found[0].speed == placement.DeviceSpeed(0.25e-5, 4e10, 4e9)
    progress = [r.getMessage() for r in caplog.records if "compiling" in r.getMessage()]
    assert progress[0].startswith("cpu:0 compiling 1/3 (a), ") and progress[0].endswith("s")
    assert "opencl:0 compiling 3/3 (c)" in progress[-1]


def _every_step(init):
    def patched(self, device, steps, every=2.0):
        init(self, device, steps, every=0.0)  # log every step, not one every 2 s

    return patched


def test_a_device_that_fails_to_compile_stays_unmeasured(events, caplog):
    broken, fine = _device("opencl:0", events, fail=True), _device("cpu:0", events)
    devices.prepare([broken, fine])
    assert broken.speed is None and fine.speed is not None
    assert events == ["compiled cpu:0"] + ["measured cpu:0"] * devices._MEASURE_ROUNDS
    assert "compiling the kernels of opencl:0 failed" in caplog.text


def test_kernelmesh_warmup_compiles_ahead_of_time(events, monkeypatch):
    from kernelmesh.services import cli

    found = [_device("cpu:0", events)]
    asked: list[object] = []

    def discover(node: str, backends=None):
        asked.append(backends)
        return found

    monkeypatch.setattr(devices, "discover", discover)
    monkeypatch.setenv("KERNELMESH_COMPILE_JOBS", "1")  # restored after the CLI sets it
    result = CliRunner().invoke(cli.warmup, ["--backends", "cpu", "--jobs", "2"])
    assert result.exit_code == 0, result.output
    assert asked == [["cpu"]] and events[:2] == ["compiled cpu:0", "measured cpu:0"]
    assert "compiled the kernels of cpu:0 in" in result.output


def _measured(name: str, events: list[str], gflops: float) -> devices.LocalDevice:
    device = _device(name, events)
    device.speed = placement.DeviceSpeed(1e-5, 1e10, gflops * 1e9)
    return device


def test_a_rate_measured_in_a_busy_moment_rises_when_measured_again(events):
    # the fixture's measurements: 1e9/slow FLOP/s with slow = 1.0, then 0.25, then 0.5
    cpu = _measured("cpu:0", events, gflops=0.5)  # a busy start measured it at 0.5
    assert devices.refine([cpu]) == ["cpu:0"]
    assert cpu.speed == placement.DeviceSpeed(1e-5, 1e10, 1e9)
    assert devices.refine([cpu]) == ["cpu:0"]  # 4 GFLOP/s, and the other figures too
    assert cpu.speed == placement.DeviceSpeed(0.25e-5, 4e10, 4e9)
    assert devices.refine([cpu]) == []  # slower now: the better figures stand
    assert cpu.speed == placement.DeviceSpeed(0.25e-5, 4e10, 4e9)


def test_refining_skips_busy_unmeasured_and_failing_devices(events, monkeypatch, caplog):
    busy = _measured("cpu:0", events, gflops=0.5)
    busy.running = 1
    unmeasured = _device("opencl:0", events)
    assert devices.refine([busy, unmeasured]) == []
    assert busy.speed.flops_per_second == 0.5e9 and unmeasured.speed is None
    assert events == []

    def broken(device):
        raise RuntimeError("the driver went away")

    monkeypatch.setattr(placement, "measure", broken)
    busy.running = 0
    assert devices.refine([busy]) == []
    assert busy.speed.flops_per_second == 0.5e9
    assert "measuring cpu:0 again failed" in caplog.text


async def test_refining_runs_after_each_delay_until_cancelled(events):
    import asyncio

    cpu = _measured("cpu:0", events, gflops=0.1)
    await devices.refine_later([cpu], after=(0.0, 0.0))
    assert events == ["measured cpu:0", "measured cpu:0"]
    task = asyncio.create_task(devices.refine_later([cpu], after=(3600.0,)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(events) == 2
