"""Accelerator devices through the services: discovery, selectors, refusals,
capabilities in ListOps and device failures. Runs on the OpenCL device PoCL gives
every Linux machine; skipped, with the reason, where no OpenCL device exists."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from held_kernel import HeldKernel
from helpers import output, spec

from kernelmesh.native import opencl
from kernelmesh.v1 import device_pb2, device_pb2_grpc, task_pb2, task_pb2_grpc

_reason = opencl.available()
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"no OpenCL device: {_reason}")


@pytest.fixture
def tasks(channel) -> task_pb2_grpc.TaskServiceStub:
    return task_pb2_grpc.TaskServiceStub(channel)


@pytest.fixture
def device_stub(channel) -> device_pb2_grpc.DeviceServiceStub:
    return device_pb2_grpc.DeviceServiceStub(channel)


def on_opencl(msg: task_pb2.TaskSpec) -> task_pb2.TaskSpec:
    msg.device.kind = device_pb2.DEVICE_KIND_OPENCL
    return msg


async def test_list_devices_shows_the_opencl_device_with_its_properties(device_stub):
    listed = (await device_stub.ListDevices(device_pb2.ListDevicesRequest())).devices
    names = [d.name for d in listed]
    assert names[0] == "cpu:0" and "opencl:0" in names
    ocl = next(d for d in listed if d.name == "opencl:0")
    assert ocl.kind == device_pb2.DEVICE_KIND_OPENCL
    assert ocl.model and ocl.vendor and ocl.driver_version
    assert ocl.compute_units >= 1 and ocl.max_work_group_size >= 1
    assert ocl.memory_total_bytes >= ocl.memory_available_bytes > 0


async def test_an_opencl_selector_runs_there_and_the_record_says_so(tasks):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((70, 33), dtype=np.float32)
    b = rng.standard_normal((33, 21), dtype=np.float32)
    task = (await tasks.RunTask(task_pb2.RunTaskRequest(task=on_opencl(spec("matmul", a, b))))).task
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED
    assert task.device == "opencl:0"
    np.testing.assert_allclose(output(task), a @ b, rtol=1e-4, atol=1e-4)


async def test_an_exact_device_name_pins_the_task(tasks):
    x = np.linspace(-3, 3, 1001, dtype=np.float32)
    msg = spec("relu", x)
    msg.device.name = "opencl:0"
    task = (await tasks.RunTask(task_pb2.RunTaskRequest(task=msg))).task
    assert task.device == "opencl:0"
    np.testing.assert_array_equal(output(task), np.maximum(x, 0))


async def test_a_length_opencl_refuses_fails_there_and_runs_elsewhere_when_allowed(tasks):
    x = (np.arange(12) + 1j).astype(np.complex64)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tasks.RunTask(task_pb2.RunTaskRequest(task=on_opencl(spec("fft", x))))
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "power-of-two length, got 12" in info.value.details()
    anywhere = (await tasks.RunTask(task_pb2.RunTaskRequest(task=spec("fft", x)))).task
    assert anywhere.device == "cpu:0"
    np.testing.assert_allclose(output(anywhere), np.fft.fft(x), rtol=1e-5, atol=1e-4)


async def test_list_ops_names_the_devices_of_each_op(tasks):
    ops = {o.name: o for o in (await tasks.ListOps(task_pb2.ListOpsRequest(page_size=100))).ops}
    for name in ("add", "sum", "softmax", "matmul", "transpose", "conv2d", "fft"):
        assert {"cpu:0", "opencl:0"} <= set(ops[name].devices), name


async def test_a_device_failure_fails_the_task_and_the_server_carries_on(server, tasks):
    device = next(d for d in server.devices if d.name == "opencl:0")
    allocator = device.backend.allocator
    limit, allocator.max_alloc = allocator.max_alloc, 1024  # the device refuses big buffers
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await tasks.RunTask(
                task_pb2.RunTaskRequest(task=on_opencl(spec("exp", np.ones(4096, np.float32))))
            )
    finally:
        allocator.max_alloc = limit
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "opencl:0" in info.value.details()
    x = np.ones(4096, np.float32)
    again = (await tasks.RunTask(task_pb2.RunTaskRequest(task=on_opencl(spec("exp", x))))).task
    assert again.device == "opencl:0"
    np.testing.assert_allclose(output(again), np.exp(x), rtol=1e-6)


async def test_watch_devices_reports_queue_and_memory_of_each_device(server, device_stub, tasks):
    # The OpenCL kernels are held until an update has shown the work: eight
    # free-running 768² matmuls could all end between two updates on a fast machine.
    (device,) = (d for d in server.tasks.devices if d.name == "opencl:0")
    held = HeldKernel(device, "matmul")
    stream = device_stub.WatchDevices(
        device_pb2.WatchDevicesRequest(names=["cpu:0", "opencl:0"], interval_ms=100)
    )
    x = np.ones((64, 64), np.float32)
    work = [
        asyncio.ensure_future(
            tasks.RunTask(task_pb2.RunTaskRequest(task=on_opencl(spec("matmul", x, x))))
        )
        for _ in range(8)
    ]
    seen_busy = False
    try:
        async for update in stream:
            statuses = {s.name: s for s in update.statuses}
            assert set(statuses) == {"cpu:0", "opencl:0"}
            ocl = statuses["opencl:0"]
            assert ocl.memory_total_bytes >= ocl.memory_available_bytes > 0
            assert 0.0 <= ocl.utilization <= 1.0
            seen_busy |= ocl.queue_depth + ocl.running > 0
            if seen_busy:
                held.release()
            if all(w.done() for w in work):
                break
    finally:
        held.release()
        stream.cancel()
        await asyncio.gather(*work)
    assert seen_busy
