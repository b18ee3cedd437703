"""The cost model that places a task on the device expected to finish it first.

Each device's speed is measured once at start (`measure`), end to end through its
backend's `run`, so host-device copies are part of what is measured: a launch latency,
a bandwidth and an arithmetic rate. A task's expected time on a device is then

    launch + bytes moved / bandwidth + flops / arithmetic rate

multiplied by how much work is already queued or running there. Nothing is guessed
from vendor names or peak figures; a device not measured yet (the server skipped
warm-up) is ranked after measured ones, the CPU first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kernelmesh.core import ops

if TYPE_CHECKING:
    from kernelmesh.core.devices import LocalDevice

__all__ = ["DeviceSpeed", "Work", "expected_finish", "measure", "work_of"]


@dataclass(frozen=True)
class DeviceSpeed:
    launch_seconds: float
    bytes_per_second: float
    flops_per_second: float

    def seconds(self, work: Work) -> float:
        return (
            self.launch_seconds
            + work.bytes / self.bytes_per_second
            + work.flops / self.flops_per_second
        )


@dataclass(frozen=True)
class Work:
    bytes: int
    flops: float
    elements: int = 0  # of inputs and outputs together


def _nbytes(meta: ops.TensorMeta) -> int:
    return meta.size * np.dtype(meta.dtype).itemsize


def work_of(call: ops.ValidatedCall) -> Work:
    """Bytes a call moves and the arithmetic it does, from its shapes."""
    moved = sum(_nbytes(m) for m in call.inputs) + sum(_nbytes(m) for m in call.outputs)
    out = call.outputs[0] if call.outputs else None
    name = call.op.name
    if name == "matmul":
        a = call.inputs[0].shape
        flops = 2.0 * (out.size if out else 0) * a[-1]
    elif name == "conv2d":
        _, c, kh, kw = call.inputs[1].shape
        flops = 2.0 * (out.size if out else 0) * c * kh * kw
    elif name == "fft":
        n = call.inputs[0].shape[-1] if call.inputs[0].shape else 1
        rows = call.inputs[0].size // max(n, 1)
        flops = 5.0 * rows * n * math.log2(max(n, 2))
    else:
        flops = float(sum(m.size for m in call.inputs))
    elements = sum(m.size for m in call.inputs) + sum(m.size for m in call.outputs)
    return Work(moved, flops, elements)


# Assumed speed of the network between an orchestrator and its nodes, for the
# bytes a forwarded task moves (loopback and a LAN are both within 2x of it).
NETWORK_BYTES_PER_SECOND = 1e9


def expected_finish(
    speed: DeviceSpeed | None,
    work: Work | None,
    load: int,
    *,
    is_cpu: bool = False,
    network_bytes: int = 0,
    stored_bytes: int = 0,
) -> tuple[float, ...]:
    """A sort key: lower finishes sooner. `load` is the tasks queued or running.
    Unmeasured devices come after measured ones; among them the CPU, whose kernels
    need no compiling or copying, goes first. `stored_bytes`: what a device's node
    adds to `network_bytes` for the task's stored inputs (negative on the node that
    holds them, positive where they would have to be moved), so tasks go to their
    data unless moving it is cheaper than waiting there."""
    if speed is None or work is None:
        return (1, 0 if is_cpu else 1, load, stored_bytes)
    moved = max(0, network_bytes + stored_bytes)
    return (0, (speed.seconds(work) + moved / NETWORK_BYTES_PER_SECOND) * (1 + load))


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # the first call may compile or load a cached binary
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


def measure(device: LocalDevice, repeats: int = 3) -> DeviceSpeed:
    """Times three calls on `device`; about 0.1 s on a CPU."""
    tiny = np.ones(16, np.float32)
    launch = _best(lambda: device.run("relu", [tiny], {}), repeats + 2)

    big = np.ones(1 << 20, np.float32)
    moved = 3 * big.nbytes
    copy = _best(lambda: device.run("add", [big, big], {}), repeats)
    # Each call is timed apart, so a noisy launch can come out longer than the whole
    # copy or matmul: the work itself is held to at least a quarter of its call, or
    # one slow launch made a device look 1e17 FLOP/s fast.
    bandwidth = moved / max(copy - launch, copy / 4, 1e-9)

    # 512: big enough that launch and copies are a small part of it, as in the tasks
    # whose placement the rate decides (a 256x256 matmul measured PoCL 2-3x faster
    # relative to the CPU than a 1024x1024 one runs)
    n = 512
    square = np.ones((n, n), np.float32)
    matmul = _best(lambda: device.run("matmul", [square, square], {}), repeats)
    transfer = 3 * square.nbytes / bandwidth
    flops = 2.0 * n**3 / max(matmul - launch - transfer, matmul / 4, 1e-9)
    return DeviceSpeed(launch, bandwidth, flops)
