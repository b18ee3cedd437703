"""Device discovery and placement inside a node: selectors, capabilities, refusals and
the measured cost model."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from kernelmesh.core import devices, ops, placement
from kernelmesh.core.devices import DeviceKind, DeviceSelector, LocalDevice, select
from kernelmesh.core.errors import FailedPrecondition, InvalidArgument
from kernelmesh.core.placement import DeviceSpeed, Work
from kernelmesh.native import cpu
from kernelmesh.native.backend import Device, DeviceProperties


class _Scripted(Device):
    """A device whose capabilities a test sets; placement never runs it."""

    fft_powers_of_two_only = False

    def refusal(
        self, op: str, shapes: Sequence[tuple[int, ...]], params: Mapping[str, Any]
    ) -> str | None:
        n = shapes[0][-1] if shapes and shapes[0] else 1
        if self.fft_powers_of_two_only and op == "fft" and n & (n - 1):
            return f"fft on {self.name} needs a power-of-two length, got {n}"
        return None

    def run(self, op, inputs, params):
        raise AssertionError("placement tests never run kernels")

    def memory_available_bytes(self) -> int:
        return 1 << 30


def _device(kind: str, index: int = 0, *, fp64: bool = True, speed=None) -> LocalDevice:
    dtypes = {"float32", "float64"} if fp64 else {"float32"}
    supported = {
        op: frozenset(d for d in cpu.SUPPORTED_DTYPES[op] if d in dtypes | {"complex64"})
        for op in cpu.SUPPORTED_DTYPES
    }
    props = DeviceProperties(
        kind=kind,
        index=index,
        model=f"{kind} model",
        vendor="test",
        driver_version="1",
        compute_units=4,
        max_work_group_size=256,
        memory_total_bytes=1 << 30,
        supports_fp64=fp64,
        supports_fp16=False,
    )
    local = LocalDevice(info=devices._info(props, "node"), backend=_Scripted(props, supported))
    local.speed = speed
    return local


def _work(op: str, *shapes: tuple[int, ...], dtype: str = "float32", **params) -> Work:
    call = ops.validate(op, [ops.TensorMeta(dtype, s) for s in shapes], params)
    return placement.work_of(call)


FAST_ARITHMETIC = DeviceSpeed(launch_seconds=50e-6, bytes_per_second=5e9, flops_per_second=5e12)
CPU_LIKE = DeviceSpeed(launch_seconds=2e-6, bytes_per_second=10e9, flops_per_second=50e9)


def test_discovery_lists_the_cpu_first_and_explains_missing_backends():
    found = devices.discover_all("node")
    assert found.devices[0].name == "cpu:0"
    assert found.devices[0].info.kind is DeviceKind.CPU
    # Metal never runs on these Linux machines, and says why.
    assert "macOS" in found.unavailable.get("metal", "macOS")
    names = [d.name for d in found.devices]
    assert len(names) == len(set(names))


def test_discovery_can_be_limited_to_some_backends():
    assert [d.name for d in devices.discover("node", ["cpu"])] == ["cpu:0"]
    with pytest.raises(ValueError, match="unknown backends"):
        devices.discover("node", ["tpu"])


def test_kind_and_name_selectors_pick_matching_devices():
    cpu0, ocl0, ocl1 = _device("cpu"), _device("opencl", 0), _device("opencl", 1)
    all_ = [cpu0, ocl0, ocl1]
    by_kind = select(all_, DeviceSelector(kind=DeviceKind.OPENCL), "add", "float32")
    assert by_kind.info.kind is DeviceKind.OPENCL
    assert select(all_, DeviceSelector(name="opencl:1"), "add", "float32") is ocl1
    with pytest.raises(FailedPrecondition, match="no device matches 'cuda:0'"):
        select(all_, DeviceSelector(name="cuda:0"), "add", "float32")
    with pytest.raises(InvalidArgument):
        select(all_, DeviceSelector(name="opencl"), "add", "float32")


def test_a_dtype_a_device_lacks_is_never_sent_there():
    cpu0, gpu = _device("cpu", speed=CPU_LIKE), _device("metal", fp64=False, speed=FAST_ARITHMETIC)
    work = _work("matmul", (2048, 2048), (2048, 2048), dtype="float64")
    assert select([cpu0, gpu], DeviceSelector(), "matmul", "float64", work=work) is cpu0
    with pytest.raises(FailedPrecondition, match="not supported by 'metal'"):
        select([cpu0, gpu], DeviceSelector(kind=DeviceKind.METAL), "matmul", "float64")


def test_a_refused_shape_goes_to_another_device_or_fails_with_the_reason():
    cpu0, ocl = _device("cpu", speed=CPU_LIKE), _device("opencl", speed=FAST_ARITHMETIC)
    ocl.backend.fft_powers_of_two_only = True
    shapes = [(12,)]
    chosen = select([cpu0, ocl], DeviceSelector(), "fft", "complex64", shapes=shapes)
    assert chosen is cpu0
    with pytest.raises(FailedPrecondition, match="power-of-two length, got 12"):
        select([cpu0, ocl], DeviceSelector(kind=DeviceKind.OPENCL), "fft", "complex64", shapes)


def test_the_cost_model_sends_big_arithmetic_to_the_fast_device_and_tiny_work_to_the_cpu():
    cpu0, gpu = _device("cpu", speed=CPU_LIKE), _device("cuda", speed=FAST_ARITHMETIC)
    big = _work("matmul", (2048, 2048), (2048, 2048))
    tiny = _work("relu", (16,))
    assert select([cpu0, gpu], DeviceSelector(), "matmul", "float32", work=big) is gpu
    assert select([cpu0, gpu], DeviceSelector(), "relu", "float32", work=tiny) is cpu0


def test_queued_work_moves_placement_to_an_idle_device():
    a, b = _device("opencl", 0, speed=CPU_LIKE), _device("opencl", 1, speed=CPU_LIKE)
    work = _work("add", (1 << 20,), (1 << 20,))
    assert select([a, b], DeviceSelector(), "add", "float32", work=work) is a
    a.running = 1
    assert select([a, b], DeviceSelector(), "add", "float32", work=work) is b


def test_unmeasured_devices_place_on_the_cpu_first():
    cpu0, ocl = _device("cpu"), _device("opencl")
    work = _work("matmul", (512, 512), (512, 512))
    cpu0.running = 3  # even when busy: unmeasured accelerators are not trusted yet
    assert select([ocl, cpu0], DeviceSelector(), "matmul", "float32", work=work) is cpu0


def test_work_counts_bytes_and_flops_from_shapes():
    mm = _work("matmul", (8, 64, 32), (8, 32, 16))
    assert mm.flops == 2 * 8 * 64 * 32 * 16
    assert mm.bytes == 4 * (8 * 64 * 32 + 8 * 32 * 16 + 8 * 64 * 16)
    conv = _work("conv2d", (1, 3, 10, 10), (4, 3, 3, 3), stride=[1, 1], padding=[0, 0])
    assert conv.flops == 2 * (4 * 8 * 8) * 3 * 3 * 3


def test_measuring_the_cpu_gives_plausible_figures():
    cpu0 = devices.discover("node", ["cpu"])[0]
    speed = placement.measure(cpu0)  # best of 3 (2 left one stalled run more weight)
    assert 0 < speed.launch_seconds < 0.01
    assert 1e8 < speed.bytes_per_second < 1e12
    assert 1e8 < speed.flops_per_second < 1e13
    assert np.isfinite(speed.seconds(_work("add", (1 << 20,), (1 << 20,))))


class _SlowLaunch:
    """A device whose tiny launch was timed in a stall: it takes longer than its
    copy and its matmul (each call is timed apart)."""

    def __init__(self) -> None:
        self.seconds = {"relu": 0.03, "add": 0.004, "matmul": 0.02}

    def run(self, op: str, inputs: Sequence[np.ndarray], params: Mapping[str, Any]) -> None:
        time.sleep(self.seconds[op])


def test_a_stalled_launch_measurement_never_makes_a_device_look_boundless():
    speed = placement.measure(_SlowLaunch(), repeats=1)  # type: ignore[arg-type]
    n = 512
    # the work is held to at least a quarter of its call: a matmul of about 20 ms
    assert speed.flops_per_second <= 2 * n**3 / (0.02 / 4) * 1.01
    assert speed.bytes_per_second <= 3 * 4 * (1 << 20) / (0.004 / 4) * 1.01


def _matmul_call(n: int) -> ops.ValidatedCall:
    meta = ops.TensorMeta("float32", (n, n))
    return ops.validate("matmul", [meta, meta], {})


def test_a_finished_matmul_moves_the_rate_halfway_to_what_it_showed():
    device = _device("cpu", speed=DeviceSpeed(0.0, 1e30, 100e9))
    call = _matmul_call(1024)  # 2.15 GFLOP
    device.observe(call, 2 * 1024**3 / 10e9)  # it ran at 10 GFLOP/s
    assert device.speed.flops_per_second == pytest.approx(55e9)
    device.observe(call, 2 * 1024**3 / 10e9)
    assert device.speed.flops_per_second == pytest.approx(32.5e9)
    before = device.speed
    device.observe(ops.validate("relu", [ops.TensorMeta("float32", (1 << 20,))], {}), 1.0)
    assert device.speed == before  # not a matmul: its flops run at another rate


def test_observed_rates_turn_placement_back_to_the_faster_device():
    # a busy start-up measured the CPU slower than the OpenCL device
    cpu0 = _device("cpu", speed=DeviceSpeed(2e-6, 10e9, 3e9))
    other = _device("opencl", speed=DeviceSpeed(50e-6, 7e9, 5e9))
    call = _matmul_call(1024)
    work = placement.work_of(call)
    assert select([cpu0, other], DeviceSelector(), "matmul", "float32", work=work) is other
    for _ in range(2):
        other.observe(call, 2.0)  # it ran at about 1 GFLOP/s
    assert select([cpu0, other], DeviceSelector(), "matmul", "float32", work=work) is cpu0


def _remote(node: str, kind: DeviceKind) -> LocalDevice:
    """A node's device as an orchestrator sees it: its kind and the ops it reported."""
    import dataclasses

    from kernelmesh.core.mesh.nodes import Capability, placeholder

    device = placeholder(f"{node}/{kind.value}:0")
    device.info = dataclasses.replace(device.info, kind=kind)
    device.gone = False
    device.capability = Capability(
        f"{kind.value}:0", frozenset({("fft", "float32"), ("add", "float32")}), CPU_LIKE
    )
    return device


def test_the_mesh_never_places_an_fft_of_a_length_opencl_refuses_on_an_opencl_node():
    na, nb = _remote("na", DeviceKind.CPU), _remote("nb", DeviceKind.OPENCL)
    odd, even = [(64, 1000)], [(64, 1024)]
    chosen = {select([na, nb], DeviceSelector(), "fft", "float32", shapes=odd) for _ in range(40)}
    assert chosen == {na}
    # Only the length keeps it off: a power-of-two one runs there.
    assert select([nb], DeviceSelector(), "fft", "float32", shapes=even) is nb
    with pytest.raises(FailedPrecondition, match=r"power-of-two length, got 1000 on nb/opencl:0"):
        select([nb], DeviceSelector(), "fft", "float32", shapes=odd)
    assert nb.refusal("add", [(1000,), (1000,)], {}) is None


def test_the_mesh_refusal_rules_match_a_real_opencl_device():
    from kernelmesh.core.mesh.nodes import kind_refusal

    found = devices.discover_all("node", ["opencl"])
    if not found.devices:
        pytest.skip(f"no OpenCL device: {found.unavailable.get('opencl', 'none found')}")
    device = found.devices[0]
    for n in (1, 2, 7, 1000, 1024, 4096, 4097):
        theirs = device.refusal("fft", [(8, n)], {})
        ours = kind_refusal(DeviceKind.OPENCL, "fft", [(8, n)])
        assert (theirs is None) == (ours is None), (n, theirs, ours)
