"""The catalog as offered: each op with the devices that run it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kernelmesh.core import devices, ops
from kernelmesh.core.catalog import devices_for
from kernelmesh.core.devices import LocalDevice
from kernelmesh.native.backend import Device, DeviceProperties


class _Listed(Device):
    """A device with the capabilities a test gives it; nothing runs on it."""

    def run(self, op: str, inputs: Sequence[Any], params: Mapping[str, Any]) -> list[Any]:
        raise AssertionError("the catalog never runs kernels")

    def memory_available_bytes(self) -> int:
        return 1 << 20


def _device(kind: str, supported: dict[str, frozenset[str]]) -> LocalDevice:
    props = DeviceProperties(
        kind=kind,
        index=0,
        model="m",
        vendor="test",
        driver_version="1",
        compute_units=1,
        max_work_group_size=1,
        memory_total_bytes=1 << 20,
        supports_fp64=True,
        supports_fp16=False,
    )
    return LocalDevice(info=devices._info(props, "node"), backend=_Listed(props, supported))


def test_an_op_lists_the_devices_that_run_any_of_its_dtypes_in_order() -> None:
    add = ops.CATALOG["add"]
    cpu = _device("cpu", {"add": frozenset(add.dtypes)})
    gpu = _device("opencl", {"add": frozenset({add.dtypes[-1]})})
    other = _device("cuda", {"matmul": frozenset({"float32"})})
    assert devices_for(add, [cpu, other, gpu]) == ["cpu:0", "opencl:0"]


def test_a_device_that_runs_the_op_only_for_other_dtypes_is_left_out() -> None:
    add = ops.CATALOG["add"]
    odd = _device("cpu", {"add": frozenset({"not-a-dtype"})})
    assert devices_for(add, [odd]) == []
