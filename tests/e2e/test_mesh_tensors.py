"""Tensors on nodes, with an orchestrator and two real node processes (issue 8):
an upload through the orchestrator is stored on a node, a task naming it runs on
that node (its placement says why), a task made to run elsewhere moves it, a
download through the orchestrator returns its bytes, a delete reaches the node,
and a node lost with its tensors fails the tasks that need them with
FAILED_PRECONDITION naming the tensor."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from mesh_procs import ready_nodes, wait_for

from kernelmesh.v1 import orchestrator_pb2, task_pb2, task_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.e2e

# Long enough that a loaded machine does not starve a live node of its lease.
LEASE = "4"
CHAIN_PROBE = 1000  # a matmul timed to size the workflow's chain of them
CHAIN_STEP_SECONDS = 0.3
CHAIN_MIN_N, CHAIN_MAX_N = 1500, 2000


@pytest.fixture
def mesh(procs):
    orch = procs.orchestrator("--store", "memory", "--lease-seconds", LEASE)
    a = procs.node("node-a", orch.target, "--backends", "cpu", "--auth")
    b = procs.node("node-b", orch.target, "--backends", "cpu", "--auth")
    wait_for(lambda: ready_nodes(orch.target) == {"node-a", "node-b"}, what="both nodes READY")
    with grpc.insecure_channel(orch.target) as channel:
        yield orch, {"node-a": a, "node-b": b}, task_pb2_grpc.TaskServiceStub(channel)


def upload(stub, array: np.ndarray) -> tensor_pb2.TensorRef:
    def parts():
        header = task_pb2.TensorHeader(dtype=tensor_pb2.DTYPE_FLOAT32, shape=array.shape)
        yield task_pb2.UploadTensorRequest(header=header)
        data = array.astype(np.float32).tobytes()
        for start in range(0, len(data), 1000):
            yield task_pb2.UploadTensorRequest(chunk=data[start : start + 1000])

    return stub.UploadTensor(parts(), timeout=30).tensor


def download(stub, name: str) -> np.ndarray:
    header, data = None, b""
    for part in stub.DownloadTensor(task_pb2.DownloadTensorRequest(name=name), timeout=30):
        if part.WhichOneof("part") == "header":
            header = part.header
        else:
            data += part.chunk
    assert header is not None
    return np.frombuffer(data, np.float32).reshape(tuple(header.shape))


def relu_of(name: str, device: str = "") -> task_pb2.RunTaskRequest:
    request = task_pb2.RunTaskRequest()
    request.task.op = "relu"
    request.task.inputs.add().ref = name
    request.task.device.name = device
    return request


def holder(ref: tensor_pb2.TensorRef) -> str:
    return ref.device.partition("/")[0]


def on_each_node(stub) -> dict[str, tuple[tensor_pb2.TensorRef, np.ndarray]]:
    """Uploads until each node holds one (a new tensor goes to the node holding
    the fewest bytes, so two uploads of the same size land on both)."""
    held = {}
    for i in range(4):
        x = np.linspace(-5, 5, 2048, dtype=np.float32) * (i + 1)
        ref = upload(stub, x)
        held.setdefault(holder(ref), (ref, x))
        if len(held) == 2:
            return held
    raise AssertionError(f"uploads all went to {set(held)}")


def test_a_task_runs_on_the_node_holding_its_input(mesh):
    _, _, stub = mesh
    held = on_each_node(stub)
    ref, x = held["node-b"]
    assert ref.name.startswith("tensors/") and ref.size_bytes == x.nbytes
    for _ in range(4):  # not by chance: every time
        task = stub.RunTask(relu_of(ref.name), timeout=60).task
        assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task.error
        assert task.device == "node-b/cpu:0"
        assert task.placement.node == "nodes/node-b"
        assert f"node node-b holds the input {ref.name}" in task.placement.reason
        out = np.frombuffer(task.outputs[0].data, np.float32)
        np.testing.assert_array_equal(out, np.maximum(x, 0))

    np.testing.assert_array_equal(download(stub, ref.name), x)


def test_a_task_placed_away_from_its_input_moves_it(mesh):
    _, _, stub = mesh
    ref, x = on_each_node(stub)["node-b"]
    task = stub.RunTask(relu_of(ref.name, device="node-a"), timeout=60).task
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task.error
    assert task.device == "node-a/cpu:0"
    assert f"moves the input {ref.name} (from node-b)" in task.placement.reason
    np.testing.assert_array_equal(np.frombuffer(task.outputs[0].data, np.float32), np.maximum(x, 0))


def test_delete_reaches_the_node(mesh):
    _, _, stub = mesh
    ref, _ = on_each_node(stub)["node-a"]
    stub.DeleteTensor(task_pb2.DeleteTensorRequest(name=ref.name), timeout=30)
    for call in (
        lambda: download(stub, ref.name),
        lambda: stub.RunTask(relu_of(ref.name), timeout=30),
    ):
        with pytest.raises(grpc.RpcError) as gone:
            call()
        assert gone.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert ref.name in gone.value.details()


def test_a_lost_node_takes_its_tensors_and_tasks_needing_them_say_which(mesh):
    orch, nodes, stub = mesh
    held = on_each_node(stub)
    lost_ref, _ = held["node-a"]
    kept_ref, kept = held["node-b"]
    nodes["node-a"].kill9()

    from mesh_procs import list_nodes

    wait_for(
        lambda: any(
            n.name == "nodes/node-a" and n.state == orchestrator_pb2.NODE_STATE_LOST
            for n in list_nodes(orch.target)
        ),
        what="node-a LOST",
    )
    for call in (
        lambda: stub.RunTask(relu_of(lost_ref.name), timeout=30),
        lambda: download(stub, lost_ref.name),
    ):
        with pytest.raises(grpc.RpcError) as failed:
            call()
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert lost_ref.name in failed.value.details()
        assert "node-a" in failed.value.details()
    # what node-b holds is untouched
    task = stub.RunTask(relu_of(kept_ref.name), timeout=60).task
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task.error
    np.testing.assert_array_equal(download(stub, kept_ref.name), kept)


def test_tensor_locations_survive_an_orchestrator_restart(procs, tmp_path):
    """The location record is in the store (SQLite here): an orchestrator killed
    and restarted on its address still relays a download of a tensor a node holds,
    and deletes it there."""
    args = ("--state-dir", str(tmp_path / "orch-state"), "--lease-seconds", LEASE)
    orch = procs.orchestrator(*args)
    port = orch.port  # the node's --join names it: the restarted one listens there too
    procs.node("node-a", orch.target, "--backends", "cpu")
    wait_for(lambda: ready_nodes(orch.target) == {"node-a"}, what="node-a READY")
    x = np.linspace(-3, 3, 4096, dtype=np.float32)
    with grpc.insecure_channel(orch.target) as channel:
        ref = upload(task_pb2_grpc.TaskServiceStub(channel), x)
    assert holder(ref) == "node-a"

    orch.kill9()
    again = procs.orchestrator(*args, name="orchestrator-again", port=port)
    wait_for(lambda: ready_nodes(again.target) == {"node-a"}, what="node-a rejoined")
    with grpc.insecure_channel(again.target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        np.testing.assert_array_equal(download(stub, ref.name), x)
        task = stub.RunTask(relu_of(ref.name), timeout=60).task
        assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task.error
        assert task.device == "node-a/cpu:0"
        stub.DeleteTensor(task_pb2.DeleteTensorRequest(name=ref.name), timeout=30)
        with pytest.raises(grpc.RpcError) as gone:
            download(stub, ref.name)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def workflow_of(first: dict, second: dict) -> dict:
    return {
        "steps": [
            {"id": "first", "task": {"op": "relu", "inputs": ["${inputs.x}"], **first}},
            {
                "id": "second",
                "task": {"op": "exp", "inputs": ["${first.outputs[0]}"], **second},
                "keep_outputs": True,
            },
        ]
    }


def run_workflow(orch, spec: dict, x: np.ndarray):
    from kernelmesh.clients import Client

    with Client(orch.target, timeout=60) as km:
        info = km.workflows.submit(spec, {"x": x})
        done = km.workflows.wait(info.name, timeout=120)
        assert done.state.name == "SUCCEEDED", done
        out = km.download(done.step("second").outputs[0])
    with grpc.insecure_channel(orch.target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        tasks = {
            s.id: stub.GetTask(task_pb2.GetTaskRequest(name=s.task), timeout=30).task
            for s in done.steps
        }
    return done, tasks, out


def test_a_workflow_intermediate_stays_on_its_node_and_the_next_step_runs_there(mesh):
    orch, _, stub = mesh
    x = np.linspace(-4, 4, 5000, dtype=np.float32)
    done, tasks, out = run_workflow(orch, workflow_of({}, {}), x)
    np.testing.assert_allclose(out, np.exp(np.maximum(x, 0)), rtol=1e-5)
    first, second = tasks["first"], tasks["second"]
    node = first.device.partition("/")[0]
    assert second.device.partition("/")[0] == node, (first.device, second.device)
    # the intermediate never came to the orchestrator: the second step found it there
    assert f"node {node} holds the input" in second.placement.reason, second.placement.reason
    assert "moves" not in second.placement.reason
    # the second step's kept output is on its node and downloads through the orchestrator
    assert done.step("second").outputs[0].device.startswith(f"{node}/")
    # the freed intermediate is gone from the node and from the record
    intermediate = done.step("first").outputs[0].name

    def freed() -> bool:
        try:
            download(stub, intermediate)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.NOT_FOUND
        return False

    wait_for(freed, what="the intermediate deleted")


def test_a_workflow_step_placed_elsewhere_moves_the_intermediate(mesh):
    orch, _, _ = mesh
    x = np.linspace(-4, 4, 5000, dtype=np.float32)
    done, tasks, out = run_workflow(
        orch, workflow_of({"device": {"name": "node-a"}}, {"device": {"name": "node-b"}}), x
    )
    np.testing.assert_allclose(out, np.exp(np.maximum(x, 0)), rtol=1e-5)
    assert tasks["first"].device == "node-a/cpu:0"
    assert tasks["second"].device == "node-b/cpu:0"
    reason = tasks["second"].placement.reason
    assert "moves the input" in reason and "(from node-a)" in reason, reason
    assert done.step("second").outputs[0].device == "node-b/cpu:0"


def test_a_workflow_intermediate_lost_with_its_node_is_made_again(mesh):
    """The node holding a finished step's output dies before the step using it
    runs: the step that made it runs again (it is deterministic), and the
    workflow completes with the right result."""
    from kernelmesh.clients import Client

    orch, nodes, _ = mesh
    x = np.linspace(-4, 4, 5000, dtype=np.float32)
    with Client(orch.target, timeout=60) as km:
        # The matmuls sized from a probe (about CHAIN_STEP_SECONDS each): ten fixed
        # 1500² ones are over in a fraction of a second on a fast machine, before
        # the poll for the first step and the kill.
        probe = np.ones((CHAIN_PROBE, CHAIN_PROBE), np.float32)
        one = min(km.run_task("matmul", probe, probe).run_seconds for _ in range(2))
    scale = (CHAIN_STEP_SECONDS / max(one, 1e-4)) ** (1 / 3)
    n = int(min(CHAIN_MAX_N, max(CHAIN_MIN_N, CHAIN_PROBE * scale)))
    # 1/sqrt(n): the chain's products keep entries of the same size.
    big = (np.random.default_rng(1).standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    chain = [{"id": "first", "task": {"op": "relu", "inputs": ["${inputs.x}"]}}]
    previous = "${inputs.big}"
    for i in range(10):  # seconds of matmuls: the last step waits while the node is killed
        chain.append(
            {"id": f"slow{i}", "task": {"op": "matmul", "inputs": [previous, "${inputs.big}"]}}
        )
        previous = f"${{slow{i}.outputs[0]}}"
    chain.append(
        {
            "id": "last",
            "task": {"op": "exp", "inputs": ["${first.outputs[0]}"]},
            "depends_on": ["slow9"],
            "keep_outputs": True,
        }
    )
    with Client(orch.target, timeout=60) as km:
        info = km.workflows.submit({"steps": chain}, {"x": x, "big": big})

        def first_done():
            got = km.workflows.get(info.name)
            step = got.step("first")
            return step if step.state.name == "SUCCEEDED" else None

        first = wait_for(first_done, what="the first step done")
        before = first.outputs[0]
        holder_node = before.device.partition("/")[0]
        assert not km.workflows.get(info.name).step("last").state.terminal, "too late to kill"
        nodes[holder_node].kill9()
        done = km.workflows.wait(info.name, timeout=180)
        assert done.state.name == "SUCCEEDED", done
        np.testing.assert_allclose(
            km.download(done.step("last").outputs[0]), np.exp(np.maximum(x, 0)), rtol=1e-5
        )
        again = done.step("first")
        assert again.outputs[0].name != before.name  # made anew
        assert again.task != first.task
        assert "run again" in orch.output() and "outputs lost with their node" in orch.output()
