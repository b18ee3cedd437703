"""DeviceService: the devices of this node, with live figures."""

from __future__ import annotations

import asyncio
import time

from kernelmesh.core.devices import CpuUtilisation, DeviceKind, DeviceStatus, LocalDevice
from kernelmesh.core.errors import InvalidArgument, NotFound, Violation
from kernelmesh.core.limits import Quotas, quote
from kernelmesh.services import convert, paging
from kernelmesh.services.status import rpc, stream_rpc
from kernelmesh.v1 import device_pb2, device_pb2_grpc

MIN_INTERVAL_MS = 100
MAX_INTERVAL_MS = 60_000


class DeviceMonitor:
    """Live status of local devices. Utilisation is sampled at most every
    100 ms however many watchers ask, so watchers never skew each other."""

    def __init__(self, devices: list[LocalDevice], mesh_devices=None) -> None:
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
        if getattr(device, "remote", False):
            return _reported(device)
        now = time.monotonic()
        if now - self._sampled_at >= 0.1:
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
        if now - at >= 0.1:
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


def _reported(device) -> DeviceStatus:
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


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    def __init__(self, monitor: DeviceMonitor, quotas: Quotas | None = None) -> None:
        self.monitor = monitor
        self.quotas = quotas or Quotas()

    @rpc
    async def ListDevices(self, request, context):
        kind = convert.device_kind(request.kind, "kind") if request.kind else None
        devices = [d for d in self.monitor.devices if kind is None or d.info.kind is kind]
        start, size = paging.page_bounds(request.page_token, request.page_size, len(devices))
        page = devices[start : start + size]
        token = paging.next_token(start, size, len(devices))
        return device_pb2.ListDevicesResponse(
            devices=[convert.device_to_proto(d.info, self.monitor.status(d)) for d in page],
            next_page_token=token,
        )

    @rpc
    async def GetDevice(self, request, context):
        device = self.monitor.find(request.name)
        return device_pb2.GetDeviceResponse(
            device=convert.device_to_proto(device.info, self.monitor.status(device))
        )

    @stream_rpc
    async def WatchDevices(self, request, context):
        if len(request.names) > self.quotas.max_filter_names:
            raise InvalidArgument(
                [
                    Violation(
                        "names",
                        f"{len(request.names)} names; at most {self.quotas.max_filter_names}",
                    )
                ]
            )
        devices = [self.monitor.find(n) for n in request.names] or self.monitor.devices
        interval_ms = request.interval_ms or 1000
        interval = min(max(interval_ms, MIN_INTERVAL_MS), MAX_INTERVAL_MS) / 1000
        while True:
            yield device_pb2.WatchDevicesResponse(
                statuses=[convert.status_to_proto(self.monitor.status(d)) for d in devices]
            )
            await asyncio.sleep(interval)
