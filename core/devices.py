"""The devices of this node and how a task's selector picks one."""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import ModuleType
from typing import Any

import numpy as np

from kernelmesh.core.errors import FailedPrecondition, InvalidArgument, Violation
from kernelmesh.native import cpu as cpu_backend
from kernelmesh.native import cpu_info
from kernelmesh.native._dispatch import ReadyQueue


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


@dataclass(eq=False)
class LocalDevice:
    """A device of this node with its own ready queue."""

    info: DeviceInfo
    backend: ModuleType
    queue: ReadyQueue = field(default_factory=ReadyQueue)
    running: int = 0

    @property
    def name(self) -> str:
        return self.info.name

    def supports(self, op: str, dtype: str) -> bool:
        return dtype in self.backend.SUPPORTED_DTYPES.get(op, ())

    def run(self, op: str, inputs: Sequence[np.ndarray], params: Mapping[str, Any]) -> list:
        return self.backend.run(op, inputs, params)

    def memory_available_bytes(self) -> int:
        return cpu_info.memory_available_bytes()


class CpuUtilisation:
    """Shares one non-blocking psutil sampler between all readers."""

    def __init__(self) -> None:
        self._sampler = cpu_info.UtilisationSampler()
        self.last = 0.0

    def refresh(self) -> float:
        self.last = self._sampler.sample()
        return self.last


def discover(node: str) -> list[LocalDevice]:
    """The devices this node can run kernels on (the CPU today)."""
    info = cpu_info.cpu_info()
    cpu = DeviceInfo(
        name="cpu:0",
        kind=DeviceKind.CPU,
        model=info.model,
        vendor=info.vendor,
        driver_version=f"numba-{_numba_version()} numpy-{np.__version__} {platform.machine()}",
        compute_units=info.cores,
        threads=info.threads,
        features=info.features,
        memory_total_bytes=info.memory_total_bytes,
        supports_fp64=True,
        supports_fp16=False,
        max_work_group_size=0,
        node=node,
    )
    return [LocalDevice(info=cpu, backend=cpu_backend)]


def _numba_version() -> str:
    import numba

    return numba.__version__


def parse_selector_name(name: str) -> DeviceKind:
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
                    f"{name!r} is not a device name; expected KIND:INDEX such as 'cpu:0' "
                    f"(kinds: {', '.join(k.value for k in DeviceKind)})",
                )
            ]
        )
    return parsed


def select(
    devices: Sequence[LocalDevice], selector: DeviceSelector, op: str, dtype: str
) -> LocalDevice:
    """The device that runs a task: the first capable match, least loaded first."""
    if selector.name:
        parse_selector_name(selector.name)
    candidates = [
        d
        for d in devices
        if (not selector.name or d.name == selector.name)
        and (selector.kind is None or d.info.kind is selector.kind)
    ]
    wanted = selector.name or (selector.kind.value if selector.kind else "any device")
    if not candidates:
        have = ", ".join(d.name for d in devices)
        raise FailedPrecondition(f"no device matches {wanted!r} on this node (devices: {have})")
    capable = [d for d in candidates if d.supports(op, dtype)]
    if not capable:
        raise FailedPrecondition(
            f"{op} on {dtype} is not supported by {wanted!r}; "
            "ListOps shows which devices run each op"
        )
    return min(capable, key=lambda d: len(d.queue) + d.running)
