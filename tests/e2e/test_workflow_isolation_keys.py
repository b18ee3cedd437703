"""Workflow isolation under API keys, against a real `kernelmesh serve --auth`:
the tenant is the key's, so one tenant's workflows and tensors do not exist
for another (NOT_FOUND, answered exactly as for a name that was never used),
and only user and admin keys may touch workflows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from kernelmesh.clients import tensors
from kernelmesh.v1 import orchestrator_pb2 as o
from kernelmesh.v1 import orchestrator_pb2_grpc, task_pb2, task_pb2_grpc

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 30.0


@dataclass
class Caller:
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub
    metadata: tuple[tuple[str, str], ...]

    def call(self, method: str, request, **kw):
        return getattr(self.stub, method)(
            request, metadata=self.metadata + kw.pop("extra", ()), timeout=RPC_TIMEOUT_S, **kw
        )

    def watch(self, name: str, **kw) -> o.Workflow | None:
        """The last workflow WatchWorkflow reports (it ends when the workflow does)."""
        last = None
        for event in self.call("WatchWorkflow", o.WatchWorkflowRequest(name=name), **kw):
            if event.HasField("workflow"):
                last = event.workflow
        return last


@dataclass
class Mesh:
    channel: grpc.Channel
    admin: Caller

    def as_(self, secret: str | None) -> Caller:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self.channel)
        return Caller(stub, (("authorization", f"Bearer {secret}"),) if secret else ())

    def key(self, tenant: str, role: int) -> Caller:
        made = self.admin.call("CreateApiKey", o.CreateApiKeyRequest(tenant=tenant, role=role))
        return self.as_(made.secret)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, serve_tools) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("workflow-keys")
    state = tmp / "state"
    proc = serve_tools.start_serve(tmp, "--no-warmup", "--auth", "--state-dir", str(state))
    try:
        with grpc.insecure_channel(proc.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            admin_secret = (state / "bootstrap-admin.key").read_text().strip()
            admin = Caller(stub, (("authorization", f"Bearer {admin_secret}"),))
            yield Mesh(channel, admin)
    finally:
        serve_tools.stop_serve(proc)


@pytest.fixture(scope="module")
def alice(mesh) -> Caller:
    return mesh.key("alice", o.API_KEY_ROLE_USER)


@pytest.fixture(scope="module")
def bob(mesh) -> Caller:
    return mesh.key("bob", o.API_KEY_ROLE_USER)


def relu_workflow(x: np.ndarray | str) -> o.SubmitWorkflowRequest:
    """One relu step on the workflow input `x`: inline values or a stored tensor's name."""
    step = o.WorkflowStep(id="pos")
    step.task.op = "relu"
    step.task.inputs.add(ref="${inputs.x}")
    request = o.SubmitWorkflowRequest(steps=[step])
    if isinstance(x, str):
        request.inputs["x"].ref = x
    else:
        request.inputs["x"].tensor.CopyFrom(tensors.to_proto(x))
    return request


def step_on(tensor_name: str) -> o.SubmitWorkflowRequest:
    """One relu step whose input names a stored tensor directly."""
    step = o.WorkflowStep(id="pos")
    step.task.op = "relu"
    step.task.inputs.add(ref=tensor_name)
    return o.SubmitWorkflowRequest(steps=[step])


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        for _ in result if hasattr(result, "__iter__") else ():  # a stream fails on read
            pass
    return info.value


def never_used(name: str) -> str:
    """A name of the same shape as `name` that no one has used."""
    kind, _, ident = name.partition("/")
    other = "".join("0" if c != "0" else "1" for c in ident)
    assert other != ident
    return f"{kind}/{other}"


@pytest.fixture(scope="module")
def alices_workflow(alice) -> o.Workflow:
    submitted = alice.call("SubmitWorkflow", relu_workflow(np.array([-1, 2], np.float32)))
    done = alice.watch(submitted.workflow.name)
    assert done is not None and done.state == o.WORKFLOW_STATE_SUCCEEDED, done
    assert done.tenant == "alice"
    return done


def test_a_user_key_submits_and_sees_its_own_workflow(alice, alices_workflow):
    got = alice.call("GetWorkflow", o.GetWorkflowRequest(name=alices_workflow.name)).workflow
    assert got.state == o.WORKFLOW_STATE_SUCCEEDED
    listed = alice.call("ListWorkflows", o.ListWorkflowsRequest()).workflows
    assert alices_workflow.name in [w.name for w in listed]


@pytest.mark.parametrize("method", ["GetWorkflow", "WatchWorkflow", "CancelWorkflow"])
@pytest.mark.parametrize("spoof", [False, True])
def test_another_tenants_workflow_is_not_found_like_a_missing_one(
    bob, alices_workflow, method, spoof
):
    # The tenant metadata is no way in when auth is on: the key decides.
    extra = (("kernelmesh-tenant", "alice"),) if spoof else ()
    request_type = getattr(o, f"{method}Request")
    missing = never_used(alices_workflow.name)

    def ask(name: str):
        return bob.call(method, request_type(name=name), extra=extra)

    theirs = refusal(lambda: ask(alices_workflow.name))
    nothing = refusal(lambda: ask(missing))
    assert theirs.code() == nothing.code() == grpc.StatusCode.NOT_FOUND
    # The same answer as for a name never used: nothing tells the workflow exists.
    assert theirs.details().replace(alices_workflow.name, missing) == nothing.details()


def test_another_tenants_workflow_is_not_listed_and_not_cancelled(
    alice, bob, mesh, alices_workflow
):
    bobs = bob.call("SubmitWorkflow", relu_workflow(np.ones(2, np.float32))).workflow
    assert bob.watch(bobs.name).state == o.WORKFLOW_STATE_SUCCEEDED
    for state in (0, o.WORKFLOW_STATE_SUCCEEDED):
        listed = [
            w.name for w in bob.call("ListWorkflows", o.ListWorkflowsRequest(state=state)).workflows
        ]
        assert listed == [bobs.name]
    spoofed = bob.call(
        "ListWorkflows", o.ListWorkflowsRequest(), extra=(("kernelmesh-tenant", "alice"),)
    )
    assert [w.name for w in spoofed.workflows] == [bobs.name]
    # An admin key is in its own tenant too: admin powers are keys and nodes.
    admins = [w.name for w in mesh.admin.call("ListWorkflows", o.ListWorkflowsRequest()).workflows]
    assert alices_workflow.name not in admins and bobs.name not in admins
    # Bob's cancel attempt above left alice's workflow as it was.
    after = alice.call("GetWorkflow", o.GetWorkflowRequest(name=alices_workflow.name)).workflow
    assert after.state == o.WORKFLOW_STATE_SUCCEEDED
    assert [w.name for w in alice.call("ListWorkflows", o.ListWorkflowsRequest()).workflows] == [
        alices_workflow.name
    ]


@pytest.mark.parametrize("where", ["step input", "workflow input"])
def test_a_workflow_cannot_use_another_tenants_tensor(alice, bob, alices_workflow, where):
    (status,) = alices_workflow.step_statuses
    (output,) = status.outputs
    theirs_name = output.name
    assert theirs_name.startswith("tensors/")
    # alice can build on her own tensor
    build = step_on if where == "step input" else relu_workflow
    mine = alice.call("SubmitWorkflow", build(theirs_name)).workflow
    assert alice.watch(mine.name).state == o.WORKFLOW_STATE_SUCCEEDED
    # bob cannot, and cannot tell it exists: the answer is the one for a missing name
    missing = never_used(theirs_name)
    theirs = refusal(lambda: bob.call("SubmitWorkflow", build(theirs_name)))
    nothing = refusal(lambda: bob.call("SubmitWorkflow", build(missing)))
    assert theirs.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert theirs.code() == nothing.code()
    assert theirs.details().replace(theirs_name, missing) == nothing.details()
    assert (
        bob.call("ListWorkflows", o.ListWorkflowsRequest(state=o.WORKFLOW_STATE_RUNNING)).workflows
        == []
    )


def test_a_node_key_may_not_touch_workflows(mesh, alices_workflow):
    node = mesh.key("alice", o.API_KEY_ROLE_NODE)  # even in the workflow's own tenant
    name = alices_workflow.name
    calls = {
        "SubmitWorkflow": relu_workflow(np.ones(2, np.float32)),
        "GetWorkflow": o.GetWorkflowRequest(name=name),
        "WatchWorkflow": o.WatchWorkflowRequest(name=name),
        "CancelWorkflow": o.CancelWorkflowRequest(name=name),
        "ListWorkflows": o.ListWorkflowsRequest(),
    }
    for method, request in calls.items():
        denied = refusal(lambda m=method, r=request: node.call(m, r))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED, method
        anonymous = refusal(lambda m=method, r=request: mesh.as_(None).call(m, r))
        assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED, method


def test_a_request_id_is_per_tenant(alice, bob):
    request = relu_workflow(np.ones(2, np.float32))
    request.request_id = "nightly-1"
    alices = alice.call("SubmitWorkflow", request).workflow
    # bob's retry key may be the same words: he gets his own workflow, and no
    # "already used" error naming alice's
    bobs = bob.call("SubmitWorkflow", request).workflow
    assert bobs.name != alices.name and bobs.tenant == "bob"
    assert bob.call("SubmitWorkflow", request).workflow.name == bobs.name
    assert alice.call("SubmitWorkflow", request).workflow.name == alices.name


def test_a_workflows_step_tasks_are_its_tenants(mesh, alice, bob, alices_workflow):
    tasks = task_pb2_grpc.TaskServiceStub(mesh.channel)
    (task,) = alices_workflow.step_tasks.values()
    got = tasks.GetTask(task_pb2.GetTaskRequest(name=task), metadata=alice.metadata, timeout=30)
    assert got.task.state == task_pb2.TASK_STATE_SUCCEEDED
    denied = refusal(
        lambda: tasks.GetTask(task_pb2.GetTaskRequest(name=task), metadata=bob.metadata, timeout=30)
    )
    assert denied.code() == grpc.StatusCode.NOT_FOUND
