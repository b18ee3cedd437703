"""The workflow RPCs of OrchestratorService: translate kernelmesh.v1
messages to the core workflow engine and back. The node and API-key RPCs of
the same service live in their own modules; services/server.py composes them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format

from kernelmesh.core import ops
from kernelmesh.core.devices import DeviceKind
from kernelmesh.core.errors import InvalidArgument, NotFound, ResourceExhausted, Violation
from kernelmesh.core.idempotency import check_request_id
from kernelmesh.core.tasks import fingerprint_of
from kernelmesh.core.workflows import (
    SpecError,
    StepState,
    Workflow,
    WorkflowEngine,
    WorkflowEvent,
    WorkflowState,
    spec_from_dict,
    spec_to_dict,
)
from kernelmesh.core.workflows.shared import token_below
from kernelmesh.core.workflows.spec import MAX_STEPS
from kernelmesh.services import convert
from kernelmesh.services.context import tenant_of
from kernelmesh.services.retry_convert import retry_from_proto
from kernelmesh.services.status import rpc, stream_rpc
from kernelmesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc, task_pb2, tensor_pb2


class WorkflowServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    # A ListWorkflows reply is cut to this size (the server sets it from its max
    # message size): a page of large workflows is never built whole.
    max_reply_bytes: int = 64 << 20

    def __init__(self, workflows: WorkflowEngine, limits: ops.Limits) -> None:
        self.workflows = workflows
        self.limits = limits

    @rpc
    async def SubmitWorkflow(
        self, request: orchestrator_pb2.SubmitWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.SubmitWorkflowResponse:
        """Validates the whole workflow, commits it to the store, then replies;
        request_id makes a retry return the first workflow."""
        tenant = tenant_of(context)
        check_request_id(request.request_id)
        if len(request.steps) > MAX_STEPS:  # refused before any step is decoded
            raise InvalidArgument(
                [Violation("steps", f"{len(request.steps)} steps; at most {MAX_STEPS}")]
            )
        try:
            spec = spec_from_dict(spec_dict_from_proto(request, self.limits))
        except SpecError as exc:
            raise InvalidArgument(exc.violations) from None
        fingerprint = ""
        if request.request_id:
            body = orchestrator_pb2.SubmitWorkflowRequest()
            body.CopyFrom(request)
            body.request_id = ""
            fingerprint = fingerprint_of(body.SerializeToString(deterministic=True))
        wf = await self.workflows.submit(
            spec, tenant=tenant, request_id=request.request_id, fingerprint=fingerprint
        )
        return orchestrator_pb2.SubmitWorkflowResponse(workflow=self._proto(wf))

    @rpc
    async def GetWorkflow(
        self, request: orchestrator_pb2.GetWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.GetWorkflowResponse:
        wf = await self.workflows.read(_name(request.name), tenant=tenant_of(context))
        return orchestrator_pb2.GetWorkflowResponse(workflow=self._proto(wf))

    @stream_rpc
    async def WatchWorkflow(
        self, request: orchestrator_pb2.WatchWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.WatchWorkflowResponse]:
        name = _name(request.name)
        async for event in self.workflows.watch(
            name, tenant=tenant_of(context), steps=not request.end_only
        ):
            yield self._event(event)

    @rpc
    async def CancelWorkflow(
        self, request: orchestrator_pb2.CancelWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.CancelWorkflowResponse:
        wf = await self.workflows.cancel(_name(request.name), tenant=tenant_of(context))
        return orchestrator_pb2.CancelWorkflowResponse(workflow=self._proto(wf))

    @rpc
    async def ListWorkflows(
        self, request: orchestrator_pb2.ListWorkflowsRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.ListWorkflowsResponse:
        state = WorkflowState(request.state) if request.state else None
        tenant = tenant_of(context)
        page, token = await self.workflows.page(
            tenant=tenant, state=state, page_size=request.page_size, page_token=request.page_token
        )
        response = orchestrator_pb2.ListWorkflowsResponse()
        size = 0
        for i, wf in enumerate(page):
            msg = self._proto(wf)
            size += msg.ByteSize() + 16  # the field's tag and length prefix, generously
            if size > self.max_reply_bytes:
                if i == 0:
                    raise ResourceExhausted(
                        f"{wf.name} alone is larger than a reply may be "
                        f"({self.max_reply_bytes} bytes); read it with GetWorkflow",
                        retry_after=0.0,
                    )
                # the same page cut to the i workflows that fit, and its token
                if self.workflows.shared is not None:
                    token = token_below(page[i - 1])
                else:
                    _, token = self.workflows.list(
                        tenant=tenant, state=state, page_size=i, page_token=request.page_token
                    )
                break
            response.workflows.append(msg)
        response.next_page_token = token
        return response

    # -- translation ------------------------------------------------------------

    def _ref(self, name: str, tenant: str):
        try:
            return convert.ref_to_proto(self.workflows.tasks.kept_ref(name, tenant))
        except NotFound:  # deleted since: the name is still worth showing
            return tensor_pb2.TensorRef(name=name)

    def _proto(self, wf: Workflow) -> orchestrator_pb2.Workflow:
        msg = orchestrator_pb2.Workflow(
            name=wf.name,
            state=int(wf.state),
            tenant=wf.tenant,
            request_id=wf.request_id or "",
        )
        msg.steps.extend(steps_to_proto(spec_to_dict(wf.spec)["steps"]))
        for name, tensor in wf.spec.inputs.items():
            msg.inputs[name].CopyFrom(self._ref(str(tensor), wf.tenant))
        for run in wf.steps.values():
            step = run.view  # as the store holds it: what was shown stays after a restart
            status = msg.step_statuses.add(
                id=run.id, state=int(step.state), task=step.task, attempt=step.attempt
            )
            if step.task:
                msg.step_tasks[run.id] = step.task
            _timestamp(status.start_time, step.start_time)
            _timestamp(status.end_time, step.end_time)
            if step.error is not None:
                status.error.code = int(step.error.code)
                status.error.message = step.error.message
            status.outputs.extend(self._ref(n, wf.tenant) for n in step.outputs)
            if step.text is not None:
                status.text = step.text
        if wf.error is not None:
            msg.error.code = int(wf.error.code)
            msg.error.message = wf.error.message
        _timestamp(msg.create_time, wf.create_time)
        _timestamp(msg.end_time, wf.end_time)
        return msg

    def _event(self, event: WorkflowEvent) -> orchestrator_pb2.WatchWorkflowResponse:
        msg = orchestrator_pb2.WatchWorkflowResponse(
            step=event.step, state=int(event.state), message=event.message
        )
        if event.step_state is not None:
            msg.step_state = int(event.step_state)
        _timestamp(msg.time, event.time)
        if event.duration is not None:
            msg.step_duration.FromNanoseconds(int(event.duration * 1e9))
        if not event.step:  # the first message and the workflow's own transitions
            msg.workflow.CopyFrom(self._proto(event.workflow))
        return msg


def spec_dict_from_proto(
    request: orchestrator_pb2.SubmitWorkflowRequest, limits: ops.Limits
) -> dict[str, object]:
    """The request in the dict shape `spec_from_dict` reads (the YAML shape)."""
    violations: list[Violation] = []
    steps: list[dict[str, object]] = []
    for i, step in enumerate(request.steps):
        where = f"steps[{i}]"
        item: dict[str, object] = {
            "id": step.id,
            "depends_on": list(step.depends_on),
            "continue_on_failure": step.continue_on_failure,
            "keep_outputs": step.keep_outputs,
        }
        action = step.WhichOneof("action")
        if action == "task":
            item["task"] = _task_dict(step.task, f"{where}.task", limits, violations)
            item["keep_outputs"] = step.keep_outputs or step.task.keep_outputs
            policy = step.retry_policy if step.HasField("retry_policy") else None
            if policy is None and step.task.HasField("retry_policy"):
                policy = step.task.retry_policy
        elif action == "llm":
            item["llm"] = _integral(json_format.MessageToDict(step.llm))
            policy = step.retry_policy if step.HasField("retry_policy") else None
        else:
            item["task"] = None  # spec_from_dict names it
            policy = None
        if policy is not None:
            try:
                item["retry_policy"] = retry_from_proto(task_pb2.TaskSpec(retry_policy=policy))
            except InvalidArgument as exc:
                violations.extend(
                    Violation(
                        v.field.replace("task.retry_policy", f"{where}.retry_policy"), v.description
                    )
                    for v in exc.violations
                )
        if step.HasField("timeout"):
            try:
                item["timeout"] = convert.duration_seconds(
                    step.timeout, f"{where}.timeout", maximum=convert.MAX_STEP_TIMEOUT_SECONDS
                )
            except InvalidArgument as exc:
                violations.extend(exc.violations)
        steps.append(item)
    inputs: dict[str, object] = {}
    for name, arg in request.inputs.items():
        inputs[name] = _tensor_arg(arg, f"inputs[{name}]", limits, violations)
    if violations:
        raise InvalidArgument(violations)
    return {"steps": steps, "inputs": inputs}


def _task_dict(msg, where: str, limits: ops.Limits, violations: list[Violation]) -> dict:
    selector = convert.selector_from_proto(msg.device)
    device: dict[str, str] = {}
    if selector.kind is not None:
        device["kind"] = selector.kind.value
    if selector.name:
        device["name"] = selector.name
    return {
        "op": msg.op,
        "inputs": [
            _tensor_arg(arg, f"{where}.inputs[{j}]", limits, violations)
            for j, arg in enumerate(msg.inputs)
        ],
        "params": convert.params_from_proto(msg.params),
        "device": device,
        "priority": msg.priority,
    }


def _tensor_arg(arg, where: str, limits: ops.Limits, violations: list[Violation]) -> object:
    source = arg.WhichOneof("source")
    if source == "ref":
        return arg.ref
    if source == "tensor":
        try:
            return convert.tensor_from_proto(arg.tensor, f"{where}.tensor", limits)
        except InvalidArgument as exc:
            violations.extend(exc.violations)
            return ""
    violations.append(Violation(where, "set either tensor or ref"))
    return ""


def _integral(value: object) -> object:
    """Struct numbers are doubles: 64.0 means the integer 64 here."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def steps_to_proto(steps: list) -> list[orchestrator_pb2.WorkflowStep]:
    out = []
    for step in steps:
        msg = orchestrator_pb2.WorkflowStep(
            id=step["id"],
            depends_on=step["depends_on"],
            continue_on_failure=step.get("continue_on_failure", False),
            keep_outputs=step.get("keep_outputs", False),
        )
        if "task" in step:
            task = step["task"]
            msg.task.op = task["op"]
            for name in task["inputs"]:
                msg.task.inputs.add(ref=name)
            if task["params"]:
                msg.task.params.update(task["params"])
            device = task.get("device") or {}
            if device.get("kind"):
                msg.task.device.kind = convert.KIND_TO_PROTO[DeviceKind(device["kind"])]
            msg.task.device.name = device.get("name", "")
            msg.task.priority = task.get("priority", 0)
        else:
            msg.llm.update(step["llm"])
        if "timeout" in step:
            msg.timeout.FromNanoseconds(int(step["timeout"] * 1e9))
        retry = step.get("retry_policy")
        if retry:
            policy = msg.retry_policy
            policy.initial_interval.FromNanoseconds(int(retry["initial_interval"] * 1e9))
            policy.backoff_coefficient = retry["backoff_coefficient"]
            if retry.get("maximum_interval") is not None:
                policy.maximum_interval.FromNanoseconds(int(retry["maximum_interval"] * 1e9))
            policy.maximum_attempts = retry["maximum_attempts"]
        out.append(msg)
    return out


def _timestamp(target, seconds: float | None) -> None:
    if seconds is not None:
        target.seconds, target.nanos = divmod(int(seconds * 1e9), 1_000_000_000)


def _name(name: str) -> str:
    if not name:
        raise InvalidArgument(
            [Violation("name", "required: the workflow's name, e.g. workflows/0123abcd")]
        )
    return name


__all__ = ["StepState", "WorkflowServicer", "spec_dict_from_proto"]
