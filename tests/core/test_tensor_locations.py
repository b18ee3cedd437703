"""The orchestrator's record of tensors held on nodes (core/mesh/tensors.py) and
how stored inputs pull placement toward their node."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kernelmesh.core.devices import DeviceKind, DeviceSelector, select
from kernelmesh.core.errors import FailedPrecondition, NotFound
from kernelmesh.core.mesh.nodes import Capability, RemoteDevice, placeholder
from kernelmesh.core.mesh.tensors import RemoteTensor, TensorLocations, near
from kernelmesh.core.placement import DeviceSpeed, Work


def tensor(name: str, node: str, shape=(1024,), tenant: str = "t") -> RemoteTensor:
    return RemoteTensor(name, tenant, node, "cpu:0", "float32", shape)


def node_device(node: str, speed: DeviceSpeed | None = None) -> RemoteDevice:
    device = placeholder(f"{node}/cpu:0")
    device.info = dataclasses.replace(device.info, kind=DeviceKind.CPU)
    device.gone = False
    device.speed = speed
    device.capability = Capability("cpu:0", frozenset({("relu", "float32")}), speed)
    return device


def test_a_new_tensor_goes_to_the_node_holding_the_fewest_bytes():
    where = TensorLocations()
    where.add(tensor("tensors/1", "a", (4096,)))
    assert where.choose(["a", "b"]) == "b"
    where.add(tensor("tensors/2", "b", (8192,)))
    assert where.choose(["a", "b"]) == "a"
    assert where.choose([]) is None


def test_another_tenants_tensor_is_not_found():
    where = TensorLocations()
    where.add(tensor("tensors/1", "a", tenant="t1"))
    assert where.get("tensors/1", "t1").node == "a"
    assert where.find("tensors/1", "t2") is None
    with pytest.raises(NotFound):
        where.get("tensors/1", "t2")


def test_a_gone_node_takes_its_tensors_and_says_which():
    where = TensorLocations()
    where.add(tensor("tensors/1", "a"))
    where.add(tensor("tensors/2", "b"))
    assert where.node_gone("a", "was lost (no heartbeat)") == 1
    with pytest.raises(FailedPrecondition, match=r"tensors/1.*node a, which was lost"):
        where.get("tensors/1", "t").check_held()
    where.get("tensors/2", "t").check_held()
    assert where.held_bytes() == {"b": 4096}


def test_the_placeholder_has_the_shape_and_dtype_and_holds_no_memory():
    item = tensor("tensors/1", "a", (1 << 20, 64))
    array = item.placeholder()
    assert array.shape == (1 << 20, 64) and array.dtype == np.float32
    assert array.strides == (0, 0)
    assert item.nbytes == (1 << 26) * 4


@pytest.mark.parametrize("speed", [None, DeviceSpeed(1e-5, 1e10, 1e11)])
def test_stored_inputs_pull_a_task_to_their_node(speed):
    a, b = node_device("a", speed), node_device("b", speed)
    inputs = {0: tensor("tensors/1", "b", (1 << 20,))}
    work = Work(bytes=8 << 20, flops=1 << 20, elements=2 << 20)
    for _ in range(4):  # ties would take turns; the data decides instead
        chosen = select([a, b], DeviceSelector(), "relu", "float32", work=work, near=near(inputs))
        assert chosen is b


def test_a_busy_holder_loses_the_task_when_moving_is_cheaper():
    speed = DeviceSpeed(1e-5, 1e10, 1e11)
    a, b = node_device("a", speed), node_device("b", speed)
    b.running = 50  # far behind
    inputs = {0: tensor("tensors/1", "b", (16,))}  # 64 bytes: cheap to move
    work = Work(bytes=128, flops=16, elements=32)
    chosen = select([a, b], DeviceSelector(), "relu", "float32", work=work, near=near(inputs))
    assert chosen is a


def test_lost_tensors_pull_nothing():
    item = tensor("tensors/1", "b")
    item.lost = "was lost"
    assert near({0: item}) == {}
