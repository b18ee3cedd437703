"""Live status of the devices a server offers: its own, sampled here, and the
mesh's, as their nodes last reported them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from kernelmesh.core.devices import CpuUtilisation, DeviceKind, DeviceStatus, LocalDevice
from kernelmesh.core.errors import NotFound
from kernelmesh.core.limits import quote
from kernelmesh.core.mesh.nodes import RemoteDevice

# How often a watcher may ask for a fresh status (WatchDevices' interval_ms).
MIN_INTERVAL_MS = 100
MAX_INTERVAL_MS = 60_000
DEFAULT_INTERVAL_MS = 1000
# Utilisation is sampled at most this often, however many readers ask.
SAMPLE_SECONDS = 0.1


def watch_interval(interval_ms: int) -> float:
    """Seconds between a watcher's statuses: its ask (0: the default), clamped."""
    interval_ms = interval_ms or DEFAULT_INTERVAL_MS
    return min(max(interval_ms, MIN_INTERVAL_MS), MAX_INTERVAL_MS) / 1000


class DeviceMonitor:
    """Live status of local devices. Utilisation is sampled at most every
    100 ms however many watchers ask, so watchers never skew each other."""

    def __init__(
        self,
        devices: list[LocalDevice],
        mesh_devices: Callable[[], Sequence[LocalDevice]] | None = None,
    ) -> None:
        self.local_devices = devices
        # The mesh's devices on other nodes (a callable: they come and go).
        self.mesh_devices = mesh_devices
        self._cpu = CpuUtilisation()
        self._sampled_at = 0.0
        # Accelerators: the fraction of wall time with one of our kernels running,
        # between samples (no portable vendor counter exists across backends).
        self._busy: dict[str, tuple[float, float, float]] = {}  # name -> (at, busy, last)

    @property
    def devices(self) -> list[LocalDevice]:
        if self.mesh_devices is None:
            return self.local_devices
        return [*self.local_devices, *self.mesh_devices()]

    def status(self, device: LocalDevice) -> DeviceStatus:
        if isinstance(device, RemoteDevice):
            return reported_status(device)
        now = time.monotonic()
        if now - self._sampled_at >= SAMPLE_SECONDS:
            self._cpu.refresh()
            self._sampled_at = now
        if device.info.kind is DeviceKind.CPU:
            utilization = self._cpu.last
        else:
            utilization = self._busy_fraction(device, now)
        return DeviceStatus(
            name=device.name,
            utilization=utilization,
            memory_total_bytes=device.info.memory_total_bytes,
            memory_available_bytes=device.memory_available_bytes(),
            queue_depth=len(device.queue),
            running=device.running,
        )

    def _busy_fraction(self, device: LocalDevice, now: float) -> float:
        busy = device.busy_seconds()
        at, before, last = self._busy.get(device.name, (now, busy, 0.0))
        if now - at >= SAMPLE_SECONDS:
            last = min(1.0, max(0.0, (busy - before) / (now - at)))
            at, before = now, busy
        self._busy[device.name] = (at, before, last)
        return last

    def find(self, name: str) -> LocalDevice:
        for device in self.devices:
            if device.name == name:
                return device
        have = ", ".join(d.name for d in self.devices)
        raise NotFound(f"device {quote(name)} not found (devices: {have})")


def reported_status(device: RemoteDevice) -> DeviceStatus:
    """A node's device as its node last reported it, under its mesh name."""
    r = device.reported
    return DeviceStatus(
        name=device.name,
        utilization=r.utilization if r else 0.0,
        memory_total_bytes=device.info.memory_total_bytes,
        memory_available_bytes=r.memory_available_bytes if r else device.info.memory_total_bytes,
        queue_depth=len(device.queue) + (r.queue_depth if r else 0),
        running=r.running if r else device.running,
    )


__all__ = ["DeviceMonitor", "reported_status", "watch_interval"]
