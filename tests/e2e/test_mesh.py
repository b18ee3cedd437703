"""The mesh with real processes on loopback: an orchestrator and two nodes (one
with the CPU only, one with CPU and OpenCL), membership, placement by
capability, a node killed under 1,000 tasks, a partition, and DrainNode."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from mesh_procs import list_nodes, ready_nodes, wait_for

from kernelmesh.v1 import (
    device_pb2,
    device_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
    tensor_pb2,
)

pytestmark = pytest.mark.e2e

LEASE = "1.5"
BASIC = task_pb2.TASK_VIEW_BASIC  # polls without the outputs' bytes


@pytest.fixture
def mesh(procs):
    """An orchestrator, node-a (cpu) and node-b (cpu, opencl), both joined."""
    orch = procs.orchestrator("--store", "memory", "--lease-seconds", LEASE)
    a = procs.node("node-a", orch.target, "--backends", "cpu")
    b = procs.node("node-b", orch.target, "--backends", "cpu,opencl")
    wait_for(lambda: ready_nodes(orch.target) == {"node-a", "node-b"}, what="both nodes READY")
    return orch, a, b


def tensor(a: np.ndarray) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=a.shape, data=a.astype(np.float32).tobytes()
    )


def spec(op: str, *inputs: np.ndarray, device: str = "", kind: int = 0, retries: int = 0):
    msg = task_pb2.TaskSpec(op=op)
    for a in inputs:
        msg.inputs.add().tensor.CopyFrom(tensor(a))
    msg.device.name = device
    msg.device.kind = kind
    if retries:
        msg.retry_policy.maximum_attempts = retries
        msg.retry_policy.initial_interval.FromMilliseconds(50)
    return msg


def output(task: task_pb2.Task) -> np.ndarray:
    out = task.outputs[0]
    return np.frombuffer(out.data, np.float32).reshape(tuple(out.shape))


def test_nodes_devices_and_placement_by_capability(mesh, kernelmesh):
    orch, _, b = mesh
    nodes = {n.name: n for n in list_nodes(orch.target)}
    assert set(nodes) == {"nodes/node-a", "nodes/node-b"}
    assert nodes["nodes/node-a"].address.endswith(f":{mesh[1].port}")
    assert [d.name for d in nodes["nodes/node-a"].devices] == ["node-a/cpu:0"]
    assert nodes["nodes/node-a"].version

    listed = kernelmesh("nodes", "--target", orch.target)
    assert listed.returncode == 0, listed.stderr
    assert "node-a" in listed.stdout and "node-b" in listed.stdout and "READY" in listed.stdout

    with grpc.insecure_channel(orch.target) as channel:
        devices = device_pb2_grpc.DeviceServiceStub(channel)
        names = [d.name for d in devices.ListDevices(device_pb2.ListDevicesRequest()).devices]
        assert "node-a/cpu:0" in names and "node-b/cpu:0" in names
        ops = task_pb2_grpc.TaskServiceStub(channel).ListOps(task_pb2.ListOpsRequest()).ops
        add = next(o for o in ops if o.name == "add")
        assert {"node-a/cpu:0", "node-b/cpu:0"} <= set(add.devices)

        stub = task_pb2_grpc.TaskServiceStub(channel)
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        # A whole node named by its name, an exact device by node/kind:index.
        for selector, where in (("node-a", "node-a/cpu:0"), ("node-b/cpu:0", "node-b/cpu:0")):
            reply = stub.RunTask(task_pb2.RunTaskRequest(task=spec("add", x, x, device=selector)))
            assert reply.task.device == where
            assert reply.task.placement.node == "nodes/" + where.partition("/")[0]
            assert reply.task.placement.reason
            np.testing.assert_allclose(output(reply.task), x + x)

        # An op only one node can run (a device kind only node-b has) goes there.
        if not any(n.startswith("node-b/opencl") for n in names):
            pytest.skip(f"node-b found no OpenCL device (no PoCL here): {b.output()[-500:]}")
        for _ in range(3):
            reply = stub.RunTask(
                task_pb2.RunTaskRequest(
                    task=spec("relu", x - 5, kind=device_pb2.DEVICE_KIND_OPENCL)
                ),
                timeout=120,
            )
            assert reply.task.device == "node-b/opencl:0"
            np.testing.assert_allclose(output(reply.task), np.maximum(x - 5, 0))


def _mixed(i: int) -> tuple[task_pb2.TaskSpec, np.ndarray]:
    x = np.full((64, 64), (i % 5) + 1, np.float32)
    if i % 3 == 0:
        return spec("matmul", x, x, retries=5), x @ x
    if i % 3 == 1:
        return spec("add", x, x, retries=5), x + x
    return spec("relu", x - 3, retries=5), np.maximum(x - 3, 0)


def test_a_node_killed_mid_load_loses_nothing(mesh):
    """1,000 submitted tasks; node-a is killed (-9) while they run: every task
    succeeds, exactly one attempt of each succeeded, results are right."""
    orch, a, _ = mesh
    total = 1000
    names: dict[int, str] = {}
    lock = threading.Lock()
    killed = threading.Event()
    with grpc.insecure_channel(orch.target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)

        def submit(i: int) -> None:
            reply = stub.SubmitTask(task_pb2.SubmitTaskRequest(task=_mixed(i)[0]), timeout=60)
            with lock:
                names[i] = reply.task.name
                if len(names) == total // 3 and not killed.is_set():
                    killed.set()
                    a.kill9()

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(submit, range(total)))
        assert killed.is_set()

        def finished() -> bool:
            pending = [
                n
                for n in names.values()
                if stub.GetTask(task_pb2.GetTaskRequest(name=n), timeout=10).task.state
                < task_pb2.TASK_STATE_SUCCEEDED
            ]
            return not pending

        wait_for(finished, timeout=180, what="every task finished")
        lost_attempts = 0
        for i, name in names.items():
            task = stub.GetTask(task_pb2.GetTaskRequest(name=name), timeout=10).task
            assert task.state == task_pb2.TASK_STATE_SUCCEEDED, (name, task.error)
            succeeded = [x for x in task.attempts if x.state == task_pb2.TASK_STATE_SUCCEEDED]
            assert len(succeeded) == 1, task.attempts
            lost_attempts += sum("node-a" in x.device and x.error.code for x in task.attempts)
            np.testing.assert_allclose(output(task), _mixed(i)[1])
        # node-a held work when it died, and that work ran again elsewhere.
        assert lost_attempts > 0
    nodes = {n.name: n.state for n in list_nodes(orch.target)}
    assert nodes["nodes/node-a"] == orchestrator_pb2.NODE_STATE_LOST


def test_a_partitioned_node_loses_its_attempts_and_its_late_results(mesh):
    """node-a stops (SIGSTOP: no heartbeats, no answers) while running; after its
    lease the work runs on node-b; node-a, resumed, rejoins and its late answers
    are discarded (each task has one succeeded attempt)."""
    orch, a, _ = mesh
    big = np.ones((1400, 1400), np.float32)
    small = np.ones((32, 32), np.float32)
    with grpc.insecure_channel(orch.target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        # Compiled on both nodes first: a node busy compiling may miss heartbeats.
        for node in ("node-a", "node-b"):
            stub.RunTask(
                task_pb2.RunTaskRequest(task=spec("matmul", small, small, device=node)),
                timeout=120,
            )
        wait_for(lambda: ready_nodes(orch.target) == {"node-a", "node-b"}, what="both READY")
        request = task_pb2.SubmitTaskRequest(task=spec("matmul", big, big, retries=5))
        names: list[str] = []

        def running_on_a() -> bool:
            tasks = [stub.GetTask(task_pb2.GetTaskRequest(name=n, view=BASIC)).task for n in names]
            return any(
                t.state == task_pb2.TASK_STATE_RUNNING and t.device.startswith("node-a")
                for t in tasks
            )

        # Submit until node-a is caught running one (bounded).
        for _ in range(200):
            names.append(stub.SubmitTask(request, timeout=60).task.name)
            if running_on_a():
                break
        else:
            pytest.fail("no task was seen running on node-a")
        a.process.send_signal(signal.SIGSTOP)
        wait_for(
            lambda: "node-a" not in ready_nodes(orch.target), what="node-a lost after its lease"
        )
        a.process.send_signal(signal.SIGCONT)

        def done() -> list:
            tasks = [stub.GetTask(task_pb2.GetTaskRequest(name=n, view=BASIC)).task for n in names]
            return tasks if all(t.state >= task_pb2.TASK_STATE_SUCCEEDED for t in tasks) else []

        tasks = wait_for(done, timeout=180, what="every task finished")
        for task in tasks:
            assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task.error
            ok = [x for x in task.attempts if x.state == task_pb2.TASK_STATE_SUCCEEDED]
            assert len(ok) == 1
        assert any(
            "lost" in x.error.message and x.device.startswith("node-a")
            for t in tasks
            for x in t.attempts
        )
        # The resumed node finds its lease gone and registers again, under its name.
        wait_for(lambda: "node-a" in ready_nodes(orch.target), what="node-a rejoined")


def test_drain_node(mesh, kernelmesh):
    """Drained: no new work, running work finishes, the node leaves and exits."""
    orch, a, _ = mesh
    with grpc.insecure_channel(orch.target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        big = np.ones((500, 500), np.float32)
        running = stub.SubmitTask(
            task_pb2.SubmitTaskRequest(task=spec("matmul", big, big, device="node-a"))
        ).task.name
        wait_for(
            lambda: (
                stub.GetTask(task_pb2.GetTaskRequest(name=running, view=BASIC)).task.state
                >= task_pb2.TASK_STATE_RUNNING
            ),
            what="the pinned task started",
        )
        drained = kernelmesh("drain", "node-a", "--target", orch.target)
        assert drained.returncode == 0, drained.stderr
        assert "nodes/node-a" in drained.stdout
        assert "DRAINING" in drained.stdout or "READY" not in drained.stdout
        x = np.ones((8, 8), np.float32)
        for _ in range(10):
            reply = stub.RunTask(task_pb2.RunTaskRequest(task=spec("add", x, x)), timeout=30)
            assert reply.task.device.startswith("node-b/")
        wait_for(
            lambda: (
                stub.GetTask(task_pb2.GetTaskRequest(name=running, view=BASIC)).task.state
                == task_pb2.TASK_STATE_SUCCEEDED
            ),
            what="the running task finished on the draining node",
        )
        task = stub.GetTask(task_pb2.GetTaskRequest(name=running, view=BASIC)).task
        assert task.device == "node-a/cpu:0"
        # Pinned to a node that is leaving: refused with the reason.
        with pytest.raises(grpc.RpcError) as err:
            stub.RunTask(task_pb2.RunTaskRequest(task=spec("add", x, x, device="node-a/cpu:0")))
        assert err.value.code() in (
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    wait_for(
        lambda: "nodes/node-a" not in {n.name for n in list_nodes(orch.target)},
        what="node-a gone from ListNodes",
    )
    assert a.process.wait(30) == 0
    assert "drained" in a.output()


def test_register_node_refuses_skew_and_absurd_values(procs):
    orch = procs.orchestrator("--store", "memory")
    with grpc.insecure_channel(
        orch.target, options=[("grpc.max_send_message_length", 256 << 20)]
    ) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        base = dict(name="n1", address="127.0.0.1:1", version="0.0.1")
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterNode(orchestrator_pb2.RegisterNodeRequest(**base), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "0.0.1" in err.value.details() and "0.1.0" in err.value.details()

        version = "0.1.0"
        many = orchestrator_pb2.RegisterNodeRequest(
            name="n1", address="127.0.0.1:1", version=version
        )
        many.devices.extend(device_pb2.Device(name=f"cpu:{i}") for i in range(10**6))
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterNode(many, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "devices" in err.value.details()

        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterNode(
                orchestrator_pb2.RegisterNodeRequest(
                    name="n" * 100_000, address="127.0.0.1:1", version=version
                ),
                timeout=30,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterNode(
                orchestrator_pb2.RegisterNodeRequest(
                    name="n1", address="x" * 100_000, version=version
                ),
                timeout=30,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list_nodes(orch.target) == []
        with pytest.raises(grpc.RpcError) as err:
            stub.GetNode(orchestrator_pb2.GetNodeRequest(name="nodes/none"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
