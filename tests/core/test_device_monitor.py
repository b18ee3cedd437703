"""DeviceMonitor: live device status, sampled at most every 100 ms, and the mesh's
devices as their nodes reported them."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from kernelmesh.core import devices
from kernelmesh.core.device_monitor import DeviceMonitor, watch_interval
from kernelmesh.core.devices import DeviceStatus, LocalDevice
from kernelmesh.core.errors import NotFound
from kernelmesh.core.mesh.nodes import RemoteDevice
from kernelmesh.native.backend import Device, DeviceProperties


class _Idle(Device):
    """A device the monitor reads; nothing runs on it."""

    def run(self, op: str, inputs: Sequence[Any], params: Mapping[str, Any]) -> list[Any]:
        raise AssertionError("the monitor never runs kernels")

    def memory_available_bytes(self) -> int:
        return 3 << 20


def _props(kind: str, index: int = 0) -> DeviceProperties:
    return DeviceProperties(
        kind=kind,
        index=index,
        model=f"{kind} model",
        vendor="test",
        driver_version="1",
        compute_units=4,
        max_work_group_size=256,
        memory_total_bytes=4 << 20,
        supports_fp64=True,
        supports_fp16=False,
    )


def _device(kind: str, index: int = 0) -> LocalDevice:
    props = _props(kind, index)
    return LocalDevice(info=devices._info(props, "node"), backend=_Idle(props, {}))


def _remote(name: str, reported: DeviceStatus | None) -> RemoteDevice:
    info = devices._info(_props("opencl"), "peer")
    info = devices.DeviceInfo(**{**info.__dict__, "name": name})
    return RemoteDevice(info=info, backend=None, local_name="opencl:0", reported=reported)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    clock = _Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    return clock


def test_an_accelerator_reports_the_fraction_of_time_it_ran(clock: _Clock) -> None:
    gpu = _device("opencl")
    monitor = DeviceMonitor([gpu])
    assert monitor.status(gpu).utilization == 0.0
    gpu.task_started()
    clock.now += 0.25
    gpu.task_ended()
    clock.now += 0.75
    assert monitor.status(gpu).utilization == pytest.approx(0.25)


def test_utilisation_is_sampled_at_most_every_100_ms(clock: _Clock) -> None:
    gpu = _device("opencl")
    monitor = DeviceMonitor([gpu])
    monitor.status(gpu)
    gpu.task_started()
    clock.now += 0.0625
    assert monitor.status(gpu).utilization == 0.0  # too soon: the last sample stands
    clock.now += 0.0625
    assert monitor.status(gpu).utilization == pytest.approx(1.0)


def test_the_cpu_sampler_is_shared_by_every_reader(
    clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = _device("cpu")
    monitor = DeviceMonitor([cpu])
    refreshes: list[float] = []

    def refresh() -> float:
        refreshes.append(clock.now)
        monitor._cpu.last = 0.5
        return 0.5

    monkeypatch.setattr(monitor._cpu, "refresh", refresh)
    statuses = [monitor.status(cpu) for _ in range(5)]
    assert len(refreshes) == 1
    assert {s.utilization for s in statuses} == {0.5}
    clock.now += 0.1
    monitor.status(cpu)
    assert len(refreshes) == 2


def test_a_local_status_reads_memory_and_queue_from_the_device(clock: _Clock) -> None:
    gpu = _device("opencl")
    gpu.task_started()
    status = DeviceMonitor([gpu]).status(gpu)
    assert status.name == "opencl:0"
    assert status.memory_total_bytes == 4 << 20
    assert status.memory_available_bytes == 3 << 20
    assert (status.queue_depth, status.running) == (0, 1)


def test_a_remote_device_is_what_its_node_last_reported() -> None:
    reported = DeviceStatus(
        name="opencl:0",
        utilization=0.75,
        memory_total_bytes=4 << 20,
        memory_available_bytes=1 << 20,
        queue_depth=3,
        running=2,
    )
    remote = _remote("peer/opencl:0", reported)
    status = DeviceMonitor([]).status(remote)
    assert status.name == "peer/opencl:0"
    assert status.utilization == 0.75
    assert status.memory_available_bytes == 1 << 20
    assert (status.queue_depth, status.running) == (3, 2)


def test_a_remote_device_not_yet_reported_is_idle_with_all_its_memory() -> None:
    status = DeviceMonitor([]).status(_remote("peer/opencl:0", None))
    assert status.utilization == 0.0
    assert status.memory_available_bytes == 4 << 20
    assert (status.queue_depth, status.running) == (0, 0)


def test_the_mesh_devices_are_read_on_every_call() -> None:
    local = _device("cpu")
    mesh: list[LocalDevice] = []
    monitor = DeviceMonitor([local], lambda: mesh)
    assert [d.name for d in monitor.devices] == ["cpu:0"]
    mesh.append(_remote("peer/opencl:0", None))
    assert [d.name for d in monitor.devices] == ["cpu:0", "peer/opencl:0"]
    assert monitor.find("peer/opencl:0") is mesh[0]


def test_an_unknown_device_is_not_found_with_the_names_there_are() -> None:
    monitor = DeviceMonitor([_device("cpu"), _device("opencl")])
    with pytest.raises(NotFound, match=r"'gpu:9' not found \(devices: cpu:0, opencl:0\)"):
        monitor.find("gpu:9")


@pytest.mark.parametrize(("asked_ms", "seconds"), [(0, 1.0), (250, 0.25), (5, 0.1), (10**9, 60.0)])
def test_a_watch_interval_is_clamped_to_100_ms_to_a_minute(asked_ms: int, seconds: float) -> None:
    assert watch_interval(asked_ms) == seconds
