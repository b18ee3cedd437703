"""The devices of this node, found through every backend in kernelmesh.native, and
how a task's selector picks one."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from kernelmesh.core import ops, placement
from kernelmesh.core.errors import FailedPrecondition, InvalidArgument, Violation
from kernelmesh.core.placement import DeviceSpeed, Work
from kernelmesh.native import cpu_info
from kernelmesh.native._dispatch import ReadyQueue
from kernelmesh.native.backend import Device, DeviceProperties

log = logging.getLogger(__name__)


class DeviceKind(Enum):
    CPU = "cpu"
    CUDA = "cuda"
    OPENCL = "opencl"
    METAL = "metal"


@dataclass(frozen=True)
class DeviceSelector:
    """Empty means any capable device; `kind` restricts to a backend; `name`
    pins one device."""

    kind: DeviceKind | None = None
    name: str = ""


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    kind: DeviceKind
    model: str
    vendor: str
    driver_version: str
    compute_units: int
    threads: int
    features: tuple[str, ...]
    memory_total_bytes: int
    supports_fp64: bool
    supports_fp16: bool
    max_work_group_size: int
    node: str


@dataclass(frozen=True)
class DeviceStatus:
    name: str
    utilization: float
    memory_total_bytes: int
    memory_available_bytes: int
    queue_depth: int
    running: int


# Run times that refine a device's rate (`LocalDevice.observe`): long enough that launch
# and timer noise do not dominate them. On a 2-core machine shared with other work the
# start-up measurements alone sent 1024x1024 matmuls to PoCL at 1 GFLOP/s (2 s a call)
# while the CPU's BLAS ran them at 12 (184 ms); the first few such calls correct it.
OBSERVE_FROM_S = 0.005
OBSERVED_WEIGHT = 0.5


@dataclass(eq=False)
class LocalDevice:
    """A device of this node, with its own ready queue and measured speed."""

    info: DeviceInfo
    backend: Device
    queue: ReadyQueue = field(default_factory=ReadyQueue)
    running: int = 0
    # Set once at start by `placement.measure`; None until then.
    speed: DeviceSpeed | None = None
    # Seconds this device has spent with at least one task running, for utilisation.
    _busy_total: float = 0.0
    _busy_since: float | None = None

    @property
    def name(self) -> str:
        return self.info.name

    def supports(self, op: str, dtype: str) -> bool:
        return self.backend.supports(op, dtype)

    def refusal(
        self, op: str, shapes: Sequence[tuple[int, ...]], params: Mapping[str, Any]
    ) -> str | None:
        return self.backend.refusal(op, shapes, params)

    def run(
        self,
        op: str,
        inputs: Sequence[np.ndarray],
        params: Mapping[str, Any],
        outputs: Sequence[Any] | None = None,
    ) -> list[np.ndarray]:
        """`outputs`: the validated call's outputs (``ValidatedCall.outputs``), so the
        backend does not infer them again."""
        return self.backend.run(op, inputs, params, outputs)

    def memory_available_bytes(self) -> int:
        return self.backend.memory_available_bytes()

    def observe(self, call: ops.ValidatedCall, seconds: float) -> None:
        """Folds the run time of a matmul this device finished into its arithmetic
        rate (half the old figure, half the one it just showed), so placement follows
        what the devices do now rather than only what they did at start. Matmul only:
        the rate is a matmul rate (`placement.measure`), and other ops' flops run at
        other rates. Callers skip tasks shorter than OBSERVE_FROM_S."""
        speed = self.speed
        if speed is None or call.op.name != "matmul":
            return
        work = placement.work_of(call)
        computing = seconds - speed.launch_seconds - work.bytes / speed.bytes_per_second
        if computing <= 0 or work.flops <= 0:
            return
        shown = work.flops / computing
        rate = speed.flops_per_second
        self.speed = DeviceSpeed(
            speed.launch_seconds, speed.bytes_per_second, rate + (shown - rate) * OBSERVED_WEIGHT
        )

    def task_started(self) -> None:
        if self.running == 0:
            self._busy_since = time.monotonic()
        self.running += 1

    def task_ended(self) -> None:
        self.running -= 1
        if self.running == 0 and self._busy_since is not None:
            self._busy_total += time.monotonic() - self._busy_since
            self._busy_since = None

    def busy_seconds(self) -> float:
        """Total time with work running, up to now."""
        since = self._busy_since
        return self._busy_total + (time.monotonic() - since if since is not None else 0.0)


class CpuUtilisation:
    """Shares one non-blocking psutil sampler between all readers."""

    def __init__(self) -> None:
        self._sampler = cpu_info.UtilisationSampler()
        self.last = 0.0

    def refresh(self) -> float:
        self.last = self._sampler.sample()
        return self.last


# Backend modules in kernelmesh.native, in the order their devices are listed.
BACKENDS = ("cpu", "opencl", "cuda", "metal")


@dataclass(frozen=True)
class Discovery:
    devices: list[LocalDevice]
    # backend -> why it has no devices here ("pyopencl is not installed", ...)
    unavailable: dict[str, str]


def discover(node: str, backends: Sequence[str] | None = None) -> list[LocalDevice]:
    """The devices this node can run kernels on, from every available backend."""
    found = discover_all(node, backends)
    for backend, reason in found.unavailable.items():
        log.info("backend %s unavailable: %s", backend, reason)
    return found.devices


def discover_all(node: str, backends: Sequence[str] | None = None) -> Discovery:
    wanted = list(backends) if backends else list(BACKENDS)
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    devices: list[LocalDevice] = []
    unavailable: dict[str, str] = {}
    for backend in wanted:
        try:
            module = importlib.import_module(f"kernelmesh.native.{backend}")
            reason = module.available()
            if reason is None:
                found = module.devices()
                if not found:
                    reason = "no devices found"
        except Exception as exc:  # a broken driver must not keep the node from starting
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            unavailable[backend] = reason
            continue
        devices += [LocalDevice(info=_info(d.properties, node), backend=d) for d in found]
    return Discovery(devices, unavailable)


def _info(p: DeviceProperties, node: str) -> DeviceInfo:
    return DeviceInfo(
        name=p.name,
        kind=DeviceKind(p.kind),
        model=p.model,
        vendor=p.vendor,
        driver_version=p.driver_version,
        compute_units=p.compute_units,
        threads=p.threads,
        features=p.features,
        memory_total_bytes=p.memory_total_bytes,
        supports_fp64=p.supports_fp64,
        supports_fp16=p.supports_fp16,
        max_work_group_size=p.max_work_group_size,
        node=node,
    )


def parse_selector_name(name: str) -> DeviceKind:
    """The kind a device name implies. In a mesh a name may be node-qualified
    ("node-a/cpu:0"); a whole node's name is checked by `select` against the nodes."""
    node, slash, rest = name.rpartition("/")
    if slash:
        if not _NODE_RE.match(node):
            raise InvalidArgument([Violation("device.name", f"{name!r} names no node")])
        name = rest
    kind, _, index = name.partition(":")
    try:
        parsed = DeviceKind(kind)
    except ValueError:
        parsed = None
    if parsed is None or not index.isdigit():
        raise InvalidArgument(
            [
                Violation(
                    "device.name",
                    f"{name!r} is not a device name; expected KIND:INDEX such as 'cpu:0', "
                    "NODE/KIND:INDEX or the name of a node in the mesh "
                    f"(kinds: {', '.join(k.value for k in DeviceKind)})",
                )
            ]
        )
    return parsed


_turn = itertools.count()
_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


# Which devices can run each (selector, op, dtype), for one fixed list of devices.
SelectCache = dict[tuple[DeviceSelector, str, str], list[LocalDevice]]


def select(
    devices: Sequence[LocalDevice],
    selector: DeviceSelector,
    op: str,
    dtype: str,
    shapes: Sequence[tuple[int, ...]] = (),
    params: Mapping[str, Any] | None = None,
    work: Work | None = None,
    cache: SelectCache | None = None,
    near: Mapping[str, int] | None = None,
) -> LocalDevice:
    """The device that runs a task. Only devices that match the selector and can run
    this op, dtype and shape are candidates; among them the one expected to finish
    first, by each device's measured speed and the work already queued on it.
    `cache` (owned by the caller, for one fixed list of devices) remembers which
    devices can run each (selector, op, dtype). `near`: bytes of the task's stored
    inputs per node holding them (core/mesh/tensors.py), which pull it there."""
    key = (selector, op, dtype)
    capable = cache.get(key) if cache is not None else None
    if capable is None:
        capable = _capable(devices, selector, op, dtype)
        if cache is not None:
            cache[key] = capable
    params = params or {}
    refusals = [d.refusal(op, shapes, params) for d in capable]
    able = [d for d, refusal in zip(capable, refusals, strict=True) if refusal is None]
    if not able:
        raise FailedPrecondition("; ".join(r for r in refusals if r))
    if len(able) == 1:
        return able[0]
    if getattr(able[-1], "remote", False):
        # Ties between nodes spread: the scan starts one device further each time,
        # so nodes expected to finish alike take turns instead of the first taking all.
        start = next(_turn) % len(able)
        able = able[start:] + able[:start]
    return min(able, key=lambda d: expected_finish(d, work, near))


def _capable(
    devices: Sequence[LocalDevice], selector: DeviceSelector, op: str, dtype: str
) -> list[LocalDevice]:
    if selector.name and not any(d.info.node == selector.name for d in devices):
        parse_selector_name(selector.name)
    candidates = [
        d
        for d in devices
        if (not selector.name or d.name == selector.name or d.info.node == selector.name)
        and (selector.kind is None or d.info.kind is selector.kind)
    ]
    wanted = selector.name or (selector.kind.value if selector.kind else "any device")
    if not candidates:
        have = ", ".join(d.name for d in devices)
        raise FailedPrecondition(
            f"no device matches {wanted!r} (devices: {have or 'none; no node has joined'})"
        )
    capable = [d for d in candidates if d.supports(op, dtype)]
    if not capable:
        raise FailedPrecondition(
            f"{op} on {dtype} is not supported by {wanted!r}; "
            "ListOps shows which devices run each op"
        )
    return capable


def expected_finish(
    device: LocalDevice, work: Work | None, near: Mapping[str, int] | None = None
) -> tuple[float, ...]:
    load = device.running + len(device.queue)
    is_cpu = device.info.kind is DeviceKind.CPU
    # A device of another node: the bytes also cross the network, both ways.
    moved = work.bytes if work is not None and getattr(device, "remote", False) else 0
    stored = 0
    if near:
        # Stored inputs on this device's node stay there; the others come from
        # their node through the orchestrator (twice over the network).
        total = sum(near.values())
        stored = total - 2 * near.get(device.info.node, 0)
    return placement.expected_finish(
        device.speed, work, load, is_cpu=is_cpu, network_bytes=moved, stored_bytes=stored
    )


# --------------------------------------------------------------------------
# Start-up: compile, then measure
# --------------------------------------------------------------------------


class _Progress:
    """Logs one device's warm-up as it goes: "cpu:0 compiling 12/60 (sum int64), 9.8s".
    Loading from a warm cache is quick and stays quiet; a cold compile logs a line at
    least every `every` seconds, so a first start shows where it is."""

    def __init__(self, device: LocalDevice, steps: int, every: float = 2.0) -> None:
        self.device, self.steps, self.every = device, steps, every
        self.done = 0
        self.began = self._last = time.monotonic()

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        if not what.startswith("compiled "):  # a worker's report, not a step of our own
            self.done += 1
        if now - self._last >= self.every:
            self._last = now
            log.info(
                "%s compiling %d/%d (%s), %.1fs",
                self.device.name,
                self.done,
                self.steps,
                what,
                now - self.began,
            )


# Measuring rounds, round robin over the devices. One round right after a cold compile
# measured the CPU's matmul at 2 GFLOP/s (the OpenCL device at 18) on a loaded 2-core
# machine, where a later round gave the true figure: threads that a compile or another
# device left busy, and BLAS workers that wait a whole time slice to be scheduled,
# only ever make a call slower, so the fastest of a few rounds is the device's speed.
# Back-to-back rounds were not enough on a machine shared with other work: slow spells
# last a few hundred milliseconds, and the CPU's best of three 512x512 matmuls swung
# between 4 and 230 GFLOP/s from one measurement to the next (PoCL's stayed at 5-8),
# so a first start could send every matmul to the 10-30x slower OpenCL device. Rounds
# spaced apart sample different moments; the best of them is the device's speed.
_MEASURE_ROUNDS = 4
_ROUND_GAP_S = 0.1


def prepare(devices: Sequence[LocalDevice]) -> None:
    """Compiles every device's kernels (or loads them from the caches), logging progress
    with counts and time, and only then measures each device's speed for placement, the
    fastest of a few rounds: a measurement taken while another device compiles (on the
    same cores) would send work to the wrong device until the next start. A device that
    fails either step stays listed and unmeasured, so placement prefers the others."""
    compiled = []
    for device in devices:
        progress = _Progress(device, device.backend.warmup_steps())
        try:
            device.backend.warmup(progress)
        except Exception:
            log.exception("compiling the kernels of %s failed; it is placed last", device.name)
            continue
        log.info(
            "%s compiled or loaded its kernels (%d steps) in %.1fs",
            device.name,
            progress.steps,
            time.monotonic() - progress.began,
        )
        compiled.append(device)
    speeds: dict[str, list[placement.DeviceSpeed] | None] = {d.name: [] for d in compiled}
    for round_ in range(_MEASURE_ROUNDS):
        if round_ and compiled:
            time.sleep(_ROUND_GAP_S)
        for device in compiled:
            if speeds[device.name] is None:
                continue
            try:
                speeds[device.name].append(placement.measure(device))  # type: ignore[union-attr]
            except Exception:
                log.exception("measuring %s failed; it is placed last", device.name)
                speeds[device.name] = None
    for device in compiled:
        measured = speeds[device.name]
        if not measured:
            continue
        device.speed = placement.DeviceSpeed(
            min(s.launch_seconds for s in measured),
            max(s.bytes_per_second for s in measured),
            max(s.flops_per_second for s in measured),
        )
        log.info(
            "%s measured: launch %.0f us, %.1f GB/s, %.1f GFLOP/s",
            device.name,
            device.speed.launch_seconds * 1e6,
            device.speed.bytes_per_second / 1e9,
            device.speed.flops_per_second / 1e9,
        )


# Measuring again later. On a machine shared with other work a whole start-up can fall
# in a busy spell: with the load average at 15 on 2 cores, every round measured the
# CPU's matmul at 3-8 GFLOP/s (PoCL's at 5-14), so matmul went to the 10-30x slower
# OpenCL device. Business only ever slows a call down, so a figure measured later that
# is better replaces the one from the start; after a few rounds the figures stand.
REFINE_AFTER_S = (5.0, 15.0, 45.0, 135.0, 405.0)


def _idle(device: LocalDevice) -> bool:
    return not device.running and not len(device.queue)


def refine(devices: Sequence[LocalDevice]) -> list[str]:
    """Measures each idle, already measured local device once more and keeps, figure by
    figure, the better of the old and the new (a measurement during which a task
    started is dropped). Returns the names of the devices whose speed changed."""
    changed = []
    for device in devices:
        if device.speed is None or getattr(device, "remote", False) or not _idle(device):
            continue
        try:
            fresh = placement.measure(device)
        except Exception:
            log.exception("measuring %s again failed; its figures stay", device.name)
            continue
        if not _idle(device):
            continue
        old = device.speed
        better = DeviceSpeed(
            min(old.launch_seconds, fresh.launch_seconds),
            max(old.bytes_per_second, fresh.bytes_per_second),
            max(old.flops_per_second, fresh.flops_per_second),
        )
        if better != old:
            device.speed = better
            changed.append(device.name)
            log.info(
                "%s measured again: launch %.0f us, %.1f GB/s, %.1f GFLOP/s",
                device.name,
                better.launch_seconds * 1e6,
                better.bytes_per_second / 1e9,
                better.flops_per_second / 1e9,
            )
    return changed


async def refine_later(
    devices: Sequence[LocalDevice], after: Sequence[float] = REFINE_AFTER_S
) -> None:
    """`refine` in a thread, `after[i]` seconds after the previous round (run as a task
    once the devices were measured at start; cancel it to stop)."""
    for delay in after:
        await asyncio.sleep(delay)
        await asyncio.to_thread(refine, devices)
