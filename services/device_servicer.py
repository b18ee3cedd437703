"""DeviceService: translates kernelmesh.v1 device messages to the core device
monitor and back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from kernelmesh.core.device_monitor import DeviceMonitor, watch_interval
from kernelmesh.core.errors import InvalidArgument, Violation
from kernelmesh.core.limits import Quotas
from kernelmesh.services import convert, paging
from kernelmesh.services.status import rpc, stream_rpc
from kernelmesh.v1 import device_pb2, device_pb2_grpc


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    def __init__(self, monitor: DeviceMonitor, quotas: Quotas | None = None) -> None:
        self.monitor = monitor
        self.quotas = quotas or Quotas()

    @rpc
    async def ListDevices(
        self, request: device_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.ListDevicesResponse:
        kind = convert.device_kind(request.kind, "kind") if request.kind else None
        devices = [d for d in self.monitor.devices if kind is None or d.info.kind is kind]
        page, token = paging.page_of(devices, request.page_token, request.page_size)
        return device_pb2.ListDevicesResponse(
            devices=[convert.device_to_proto(d.info, self.monitor.status(d)) for d in page],
            next_page_token=token,
        )

    @rpc
    async def GetDevice(
        self, request: device_pb2.GetDeviceRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.GetDeviceResponse:
        device = self.monitor.find(request.name)
        return device_pb2.GetDeviceResponse(
            device=convert.device_to_proto(device.info, self.monitor.status(device))
        )

    @stream_rpc
    async def WatchDevices(
        self, request: device_pb2.WatchDevicesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[device_pb2.WatchDevicesResponse]:
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
        interval = watch_interval(request.interval_ms)
        while True:
            yield device_pb2.WatchDevicesResponse(
                statuses=[convert.status_to_proto(self.monitor.status(d)) for d in devices]
            )
            await asyncio.sleep(interval)


__all__ = ["DeviceServicer"]
