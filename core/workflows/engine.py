"""Runs workflows: each ready step starts at once (steps run in parallel), a
task step is submitted through the task manager like any SubmitTask (so it is
journaled, placed and retried by its policy), an LLM step calls the gateway.
Tensors stay on the server as named tensors and pass to the next step by name.

Durability (Temporal's shape without replay): the workflow is committed before
submission returns; each step's transitions and outputs are journaled, and
shown (GetWorkflow, WatchWorkflow, `wait`) only once committed (commits.py), while
dependants already run on the result. At start, `recover` resumes unfinished
workflows from their finished steps. A step that was running is submitted again
with the same request id, which returns its task (finished, or queued again by
the task manager's own recovery), so no step shown finished runs twice.

Retention: a step's tensor outputs are deleted once every step that depends on
it has ended, unless no step depends on it (the workflow's results) or it sets
`keep_outputs`; tensors the engine stored from inline inputs are deleted when
the workflow ends."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from kernelmesh.core import listing, ops
from kernelmesh.core.errors import (
    Code,
    FailedPrecondition,
    InvalidArgument,
    KernelmeshError,
    NotFound,
    Unavailable,
    Violation,
)
from kernelmesh.core.store import Store, StoreUnavailable
from kernelmesh.core.store.base import RequestIdTaken
from kernelmesh.core.store.workflow_records import (
    DeleteWorkflow,
    PutWorkflow,
    PutWorkflowStep,
    UpdateWorkflow,
    WorkflowRecord,
    WorkflowSnapshot,
    WorkflowStepRecord,
)
from kernelmesh.core.task_retry import DEFAULT_RETRY
from kernelmesh.core.tasks import Task, TaskFailure, TaskManager, TaskSpec, TaskState
from kernelmesh.core.workflows.commits import CommitOrder
from kernelmesh.core.workflows.refs import Ref, interpolate, tensor_ref
from kernelmesh.core.workflows.spec import (
    LlmAction,
    StepSpec,
    TaskAction,
    WorkflowSpec,
    spec_from_dict,
    spec_to_dict,
)
from kernelmesh.core.workflows.validation import Plan, plan_of, validate

if TYPE_CHECKING:
    from kernelmesh.core.llm import Gateway
    from kernelmesh.core.workflows.shared import SharedWorkflows

PREFIX = "workflows/"
log = logging.getLogger(__name__)

# How often a step's inputs lost with their node are made again (by running the
# steps that made them) before the step fails with FAILED_PRECONDITION.
MAX_REMAKES = 3


class WorkflowState(IntEnum):
    """Values match kernelmesh.v1.WorkflowState."""

    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    CANCELLED = 4

    @property
    def terminal(self) -> bool:
        return self is not WorkflowState.RUNNING


class StepState(IntEnum):
    """Values match kernelmesh.v1.WorkflowStepState."""

    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5
    SKIPPED = 6

    @property
    def terminal(self) -> bool:
        return self >= StepState.SUCCEEDED


@dataclass(frozen=True)
class StepView:
    """A step as the store holds it: what readers are shown."""

    state: StepState = StepState.PENDING
    task: str = ""
    attempt: int = 0
    start_time: float | None = None
    end_time: float | None = None
    error: TaskFailure | None = None
    outputs: tuple[str, ...] = ()
    text: str | None = None


@dataclass(eq=False)
class StepRun:
    """A step as the engine knows it (ahead of the store); `view` is what is shown."""

    spec: StepSpec
    state: StepState = StepState.PENDING
    task: str = ""
    attempt: int = 0
    start_time: float | None = None
    end_time: float | None = None
    error: TaskFailure | None = None
    outputs: list[str] = field(default_factory=list)  # tensor names
    text: str | None = None
    view: StepView = field(default_factory=StepView)

    @property
    def id(self) -> str:
        return self.spec.id

    def snapshot(self) -> StepView:
        return StepView(
            self.state,
            self.task,
            self.attempt,
            self.start_time,
            self.end_time,
            self.error,
            tuple(self.outputs),
            self.text,
        )


@dataclass(eq=False)
class _Watcher:
    queue: asyncio.Queue[WorkflowEvent]
    steps: bool  # False: only the workflow's own transitions


@dataclass(eq=False)
class Workflow:
    """`state`, `end_time` and `error` are as the store holds them (shown);
    `outcome` is how the engine ended it, possibly before the store has it."""

    id: str
    seq: int
    tenant: str
    spec: WorkflowSpec
    plan: Plan
    steps: dict[str, StepRun]
    request_id: str | None = None
    fingerprint: str | None = None
    state: WorkflowState = WorkflowState.RUNNING
    create_time: float = field(default_factory=time.time)
    end_time: float | None = None
    error: TaskFailure | None = None
    outcome: WorkflowState | None = None
    # Tensors the engine stored from inline inputs: the workflow's to delete.
    owned: frozenset[str] = frozenset()
    # Claimed from another orchestrator: its steps' tasks may be held elsewhere.
    adopted: bool = False
    _watchers: list[_Watcher] = field(default_factory=list)
    _runner: asyncio.Task[None] | None = None
    _running: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    # Per step: its dependants not yet shown ended (retention of its outputs).
    _consumers_left: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return PREFIX + self.id

    async def wait(self) -> None:
        await self._done.wait()


@dataclass(frozen=True)
class WorkflowEvent:
    """A transition: of one step (`step` set), or of the workflow."""

    workflow: Workflow
    step: str
    step_state: StepState | None
    state: WorkflowState
    time: float
    message: str
    duration: float | None = None


@dataclass(frozen=True)
class WorkflowOptions:
    limits: ops.Limits = field(default_factory=ops.Limits)
    # Finished workflows kept (in memory and in the store); the oldest go first.
    retention: int = 10_000


class WorkflowEngine:
    def __init__(
        self,
        tasks: TaskManager,
        llm: Gateway | None = None,
        journal: Store | None = None,
        options: WorkflowOptions | None = None,
    ) -> None:
        self.tasks = tasks
        self.llm = llm
        self.journal = journal if journal is not None and journal.durable else None
        self.options = options or WorkflowOptions()
        self._workflows: OrderedDict[str, Workflow] = OrderedDict()
        self._finished: OrderedDict[str, Workflow] = OrderedDict()
        self._requests: dict[tuple[str, str], Workflow] = {}
        self._committing: dict[str, asyncio.Future[None]] = {}
        self._commits = CommitOrder(self.journal)
        self._seq = 0
        self._stopping = False
        # Steps run again because a lost node took their outputs (rare): by
        # (workflow, step), how often, and one at a time.
        self._remakes: dict[tuple[str, str], int] = {}
        self._remaking: dict[tuple[str, str], asyncio.Lock] = {}
        # Several orchestrators on one store (the task manager has an owner then):
        # workflows are held under a lease renewed by services/mesh_sync.py, and
        # those held elsewhere are read from the store.
        self.shared: SharedWorkflows | None = None
        if self.journal is not None and self.journal.shared and tasks.owner:
            from kernelmesh.core.workflows.shared import SharedWorkflows

            self.shared = SharedWorkflows(self, self.journal)

    # -- submission ----------------------------------------------------------

    async def submit(
        self,
        spec: WorkflowSpec,
        *,
        tenant: str,
        request_id: str = "",
        fingerprint: str = "",
    ) -> Workflow:
        """Validates, stores inline tensors, commits the workflow, then starts
        it. The same request_id from the same tenant returns the first workflow."""
        if self._stopping:
            raise Unavailable("the server is shutting down and accepts no new workflows")
        if request_id:
            first = self._requests.get((tenant, request_id))
            if first is not None:
                return await self._same_request(first, fingerprint)
            if self.shared is not None and self.journal is not None:
                # Submitted through another orchestrator: that workflow is the
                # answer, whatever this one would make of the spec now.
                known = self.views_of(await self.journal.find_workflow_request(tenant, request_id))
                if known:
                    return await self._same_request(known[0], fingerprint)
        plan = validate(
            spec,
            tensor_meta=lambda name: self._meta(name, tenant),
            devices=self.tasks.devices,
            limits=self.options.limits,
            models=self._models(),
        )
        spec, owned = self._stored(spec, tenant)
        self._seq += 1
        wf = Workflow(
            id=f"{random.getrandbits(128):032x}",
            seq=self._seq,
            tenant=tenant,
            spec=spec,
            plan=plan,
            steps={s.id: StepRun(s) for s in spec.steps},
            request_id=request_id or None,
            fingerprint=fingerprint or None,
            owned=owned,
        )
        if request_id:
            self._requests[(tenant, request_id)] = wf
        if self.journal is not None:
            record = _record_of(wf)
            if self.shared is not None:
                record.owner = self.tasks.owner
                record.lease_until = time.time() + self.tasks.lease_seconds
            future = self.journal.write(PutWorkflow(record), wait=True)
            assert future is not None
            self._committing[wf.id] = future
            try:
                await future
            except RequestIdTaken:
                # Another orchestrator sharing the store has this request id: its
                # workflow is the answer (as for tasks), never UNAVAILABLE.
                if self._requests.get((tenant, request_id)) is wf:
                    del self._requests[(tenant, request_id)]
                self._delete_tensors(owned, tenant)
                return await self._taken(tenant, request_id, fingerprint)
            except BaseException:
                if request_id:
                    self._requests.pop((tenant, request_id), None)
                self._delete_tensors(owned, tenant)
                raise
            finally:
                self._committing.pop(wf.id, None)
        self._workflows[wf.name] = wf
        self._count_consumers(wf)
        self._start(wf)
        return wf

    async def _taken(self, tenant: str, request_id: str, fingerprint: str) -> Workflow:
        first = self._requests.get((tenant, request_id))
        if first is not None:  # claimed by this process meanwhile
            return await self._same_request(first, fingerprint)
        assert self.journal is not None
        snap = await self.journal.find_workflow_request(tenant, request_id)
        views = self.views_of(snap)
        if not views:  # forgotten (retention) between the refusal and this read
            raise StoreUnavailable(
                f"request_id {request_id!r} was taken and released meanwhile; retry"
            )
        return await self._same_request(views[0], fingerprint)

    async def _same_request(self, first: Workflow, fingerprint: str) -> Workflow:
        if (first.fingerprint or "") != fingerprint:
            raise InvalidArgument(
                [
                    Violation(
                        "request_id",
                        f"already used for a different workflow ({first.name}); "
                        "a retry must send the same workflow, a new one a new request_id",
                    )
                ]
            )
        pending = self._committing.get(first.id)
        if pending is not None:
            await asyncio.shield(pending)
        return first

    def _meta(self, name: str, tenant: str) -> ops.TensorMeta | None:
        try:  # kept here, or (an orchestrator's) on a node
            array = self.tasks.kept_ref(name, tenant).array
        except NotFound:
            return None
        return ops.TensorMeta(array.dtype.name, tuple(array.shape))

    def _models(self) -> dict[str, str]:
        if self.llm is None:
            return {}
        return {m.name: m.kind for m in self.llm.models()}

    def _stored(self, spec: WorkflowSpec, tenant: str) -> tuple[WorkflowSpec, frozenset[str]]:
        """The spec with every inline tensor kept on the server, by name, and
        the names stored for it."""
        names: dict[int, str] = {}  # the same array given twice is stored once

        def put(value: str | np.ndarray) -> str:
            if isinstance(value, str):
                return value
            if id(value) not in names:
                array = np.ascontiguousarray(value)
                names[id(value)] = self.tasks.store.put(array, tenant=tenant).name
            return names[id(value)]

        inputs = {k: put(v) for k, v in spec.inputs.items()}
        steps = []
        for step in spec.steps:
            action = step.action
            if isinstance(action, TaskAction) and any(
                not isinstance(i, str) for i in action.inputs
            ):
                stored = tuple(put(i) for i in action.inputs)
                step = replace(step, action=replace(action, inputs=stored))
            steps.append(step)
        return WorkflowSpec(tuple(steps), inputs), frozenset(names.values())

    # -- running -------------------------------------------------------------

    def _start(self, wf: Workflow) -> None:
        wf._runner = asyncio.create_task(self._run(wf), name=f"workflow-{wf.id}")

    def _count_consumers(self, wf: Workflow) -> None:
        """Each step's dependants not yet ended; those already at zero (after a
        restart) have their outputs deleted again (the delete may not have been
        committed)."""
        left = {sid: 0 for sid in wf.plan.deps}
        for sid, ds in wf.plan.deps.items():
            if not wf.steps[sid].view.state.terminal:
                for d in ds:
                    left[d] += 1
        wf._consumers_left = left
        has_dependants = {d for ds in wf.plan.deps.values() for d in ds}
        for sid in has_dependants:
            if left[sid] == 0:
                self._free_outputs(wf, wf.steps[sid])

    async def _run(self, wf: Workflow) -> None:
        deps = wf.plan.deps
        dependants: dict[str, list[str]] = {sid: [] for sid in deps}
        for sid, ds in deps.items():
            for d in ds:
                dependants[d].append(sid)
        waiting = {
            sid: sum(wf.steps[d].state is not StepState.SUCCEEDED for d in ds)
            for sid, ds in deps.items()
        }
        running = wf._running

        def launch(sid: str) -> None:
            running[sid] = asyncio.create_task(runner(sid), name=f"{wf.name}/steps/{sid}")

        def skip_after(sid: str, why: str) -> None:
            stack = list(dependants[sid])
            while stack:
                nxt = wf.steps[stack.pop()]
                if nxt.state is StepState.PENDING:
                    self._step_end(wf, nxt, StepState.SKIPPED, None, why)
                    stack.extend(dependants[nxt.id])

        def settle(sid: str) -> list[str]:
            """A step ended: the steps it made ready (none when it failed)."""
            step = wf.steps[sid]
            if step.state is StepState.SUCCEEDED:
                ready = []
                for nxt in dependants[sid]:
                    waiting[nxt] -= 1
                    if waiting[nxt] == 0 and wf.steps[nxt].state is StepState.PENDING:
                        ready.append(nxt)
                return ready
            if step.spec.continue_on_failure:
                skip_after(sid, f"step {sid!r} failed")
            else:
                error = step.error or TaskFailure(Code.UNKNOWN, "failed")
                message = f"step {sid!r}: {error.message}"
                self._abort(wf, WorkflowState.FAILED, TaskFailure(error.code, message))
            return []

        async def runner(sid: str) -> None:
            """Runs a step, then goes on with the first step its end made ready (a
            chain runs in one asyncio task, with no scheduling round per step)."""
            me = asyncio.current_task()
            try:
                while True:
                    await self._run_step(wf, wf.steps[sid])
                    if wf.outcome is not None:
                        return
                    ready = settle(sid)
                    if not ready:
                        return
                    for other in ready[1:]:
                        launch(other)
                    del running[sid]
                    sid = ready[0]
                    running[sid] = me  # type: ignore[assignment]
                    await asyncio.sleep(0)  # a long chain of tiny steps still lets others run
            finally:
                if running.get(sid) is me:
                    del running[sid]

        for sid in wf.plan.order:  # resumed workflows have finished steps already
            step = wf.steps[sid]
            if step.state.terminal:
                if step.state is StepState.FAILED and not step.spec.continue_on_failure:
                    error = step.error or TaskFailure(Code.UNKNOWN, "failed")
                    message = f"step {sid!r}: {error.message}"
                    self._abort(wf, WorkflowState.FAILED, TaskFailure(error.code, message))
                    return
                if step.state is not StepState.SUCCEEDED:
                    skip_after(sid, f"step {sid!r} did not succeed")
            elif waiting[sid] == 0:
                launch(sid)
        try:
            while running:
                await asyncio.wait(list(running.values()), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            return  # cancelled (state already set) or shutting down (resumed at start)
        if wf.outcome is None:
            self._end(wf, WorkflowState.SUCCEEDED, None)

    async def _run_step(self, wf: Workflow, step: StepRun) -> None:
        try:
            if isinstance(step.spec.action, TaskAction):
                await self._run_task(wf, step, step.spec.action)
            else:
                await self._run_llm(wf, step, step.spec.action)
        except asyncio.CancelledError:
            raise
        except KernelmeshError as exc:
            self._step_end(wf, step, StepState.FAILED, TaskFailure(exc.code, exc.message))
        except Exception as exc:  # a bug fails its step, never the engine
            log.exception("workflow %s step %s", wf.name, step.id)
            self._step_end(
                wf,
                step,
                StepState.FAILED,
                TaskFailure(Code.INTERNAL, f"{type(exc).__name__}: {exc}"),
            )

    def _resolve(self, wf: Workflow, ref: Ref) -> str:
        if ref.is_input:
            return str(wf.spec.inputs[ref.field])
        source = wf.steps[ref.source]
        if ref.field == "text":
            return source.text or ""
        if ref.index is None or ref.index >= len(source.outputs):
            raise InvalidArgument(
                [Violation(ref.text, f"step {ref.source!r} has {len(source.outputs)} output(s)")]
            )
        return source.outputs[ref.index]

    def _task_spec(self, wf: Workflow, step: StepRun, action: TaskAction) -> TaskSpec:
        inputs: list[np.ndarray | str] = []
        for item in action.inputs:
            ref = tensor_ref(item) if isinstance(item, str) else None
            inputs.append(self._resolve(wf, ref) if ref is not None else item)
        return TaskSpec(
            op=action.op,
            inputs=inputs,
            params=action.params,
            selector=action.selector,
            priority=action.priority,
            keep_outputs=True,
            labels={"workflow": wf.name, "step": step.id},
            tenant=wf.tenant,
            retry=step.spec.retry or DEFAULT_RETRY,
        )

    async def _run_task(self, wf: Workflow, step: StepRun, action: TaskAction) -> None:
        for remade in range(MAX_REMAKES + 1):
            await self._remake_lost_inputs(wf, action)
            if await self._run_task_once(wf, step, action, remade):
                return

    async def _run_task_once(
        self, wf: Workflow, step: StepRun, action: TaskAction, remade: int
    ) -> bool:
        """One submission of the step's task; False when it failed for want of an
        input lost with its node that an earlier step can make again."""
        spec = self._task_spec(wf, step, action)
        timeout = step.spec.timeout
        deadline = time.monotonic() + timeout if timeout else None
        # One request id per step: after a restart the same submission returns
        # the step's task instead of running it again.
        request = f"{wf.name}/steps/{step.id}" + (f"/remade-{remade}" if remade else "")
        # Not waiting for the task's commit: the step is shown finished only once
        # its end is committed, which is after the task's record (the store commits
        # in order). Dying before that, the step had not finished as far as anyone
        # saw, and runs again (with this request id, as the same task if the store
        # has it).
        task = await self._task_elsewhere(wf, request) if wf.adopted else None
        if task is None:
            task = await self.tasks.submit_journaled(
                spec,
                request_id=request,
                fingerprint=request,
                deadline=deadline,
                await_commit=False,
                inline=True,
            )
        self._step_running(wf, step, task=task.name)
        try:
            if not task.state.terminal:  # a tiny step ran on the spot
                async with asyncio.timeout_at(_loop_time(deadline)):
                    if self.tasks.held(task.id) is task:
                        await self._follow(wf, step, task)
                    else:  # another orchestrator's: followed in the store
                        await task.wait()
        except TimeoutError:
            with contextlib.suppress(KernelmeshError):
                self.tasks.cancel(task.name, tenant=wf.tenant)
            step.attempt = task.attempt
            self._step_end(
                wf,
                step,
                StepState.FAILED,
                TaskFailure(Code.DEADLINE_EXCEEDED, f"the step's timeout of {timeout:g}s passed"),
            )
            return True
        step.attempt = task.attempt
        if task.state is TaskState.SUCCEEDED:
            step.outputs = [r.name for r in task.output_refs]
            # The outputs pass to dependants by name (tensor references), never
            # as bytes: the task manager resolves them where they are kept.
            self._step_end(wf, step, StepState.SUCCEEDED, None)
            return True
        error = task.error or TaskFailure(Code.UNKNOWN, task.state.name.lower())
        if (
            remade < MAX_REMAKES
            and error.code == Code.FAILED_PRECONDITION
            and self._lost_sources(wf, action)
        ):
            log.warning(
                "workflow %s step %s: %s; making its inputs again", wf.name, step.id, error.message
            )
            return False
        self._step_end(wf, step, StepState.FAILED, error)
        return True

    async def _task_elsewhere(self, wf: Workflow, request: str) -> Task | None:
        """The task of a step of a workflow claimed from another orchestrator, if
        the store has it: held here (claimed with it), or followed where it is.
        Submitting it again without looking would not wait for its commit, and
        the store would refuse the copy only after it had started here."""
        assert self.journal is not None
        snap = await self.journal.find_request(wf.tenant, request)
        if not snap.tasks:
            return None
        record = snap.tasks[0]
        return self.tasks.held(record.id) or self.tasks.view(record, snap)

    # -- intermediates lost with their node ------------------------------------

    def _lost_sources(self, wf: Workflow, action: TaskAction) -> list[StepRun]:
        """The earlier kernel steps whose outputs this action uses and a lost node
        took with it (an orchestrator keeping tensors on its nodes only)."""
        remote = self.tasks.remote_tensors
        if remote is None:
            return []
        found: dict[str, StepRun] = {}
        for item in action.inputs:
            ref = tensor_ref(item) if isinstance(item, str) else None
            if ref is None or ref.is_input or ref.field == "text" or ref.index is None:
                continue
            source = wf.steps[ref.source]
            if not isinstance(source.spec.action, TaskAction) or ref.index >= len(source.outputs):
                continue
            held = remote.find(source.outputs[ref.index], wf.tenant)
            if held is not None and held.lost:
                found[source.id] = source
        return list(found.values())

    async def _remake_lost_inputs(self, wf: Workflow, action: TaskAction) -> None:
        """Runs again each earlier step whose output this action needs and a lost
        node took: a kernel step is deterministic, so its outputs are made anew
        (its own lost inputs first). The step keeps its state; its outputs are the
        new ones from then on."""
        for source in self._lost_sources(wf, action):
            lock = self._remaking.setdefault((wf.name, source.id), asyncio.Lock())
            async with lock:  # two consumers of one lost output make it once
                if source not in self._lost_sources(wf, action):
                    continue
                assert isinstance(source.spec.action, TaskAction)
                await self._remake_lost_inputs(wf, source.spec.action)
                remakes = self._remakes.get((wf.name, source.id), 0) + 1
                self._remakes[(wf.name, source.id)] = remakes
                request = f"{wf.name}/steps/{source.id}/remake-{remakes}"
                task = await self.tasks.submit_journaled(
                    self._task_spec(wf, source, source.spec.action),
                    request_id=request,
                    fingerprint=request,
                    await_commit=False,
                    inline=True,
                )
                await self.tasks.wait(task)
                if task.state is not TaskState.SUCCEEDED:
                    error = task.error or TaskFailure(Code.UNKNOWN, task.state.name.lower())
                    raise FailedPrecondition(
                        f"step {source.id!r}'s outputs were lost with their node, and making "
                        f"them again failed: {error.message}"
                    )
                log.warning(
                    "workflow %s: step %s run again (as %s), its outputs lost with their node",
                    wf.name,
                    source.id,
                    task.name,
                )
                remote = self.tasks.remote_tensors
                if remote is not None:
                    for name in source.outputs:
                        remote.remove(name)
                source.outputs = [r.name for r in task.output_refs]
                source.task = task.name
                source.view = source.snapshot()
                self._journal(PutWorkflowStep(_step_record(wf, source)))

    async def _follow(self, wf: Workflow, step: StepRun, task: Task) -> None:
        """Waits for a step's task; a new attempt (after a failure or a lost node)
        is shown as a step transition with the reason the previous one ended."""
        if task.state.terminal:
            return
        async with contextlib.aclosing(self.tasks.watch(task.name, tenant=wf.tenant)) as events:
            async for event in events:
                if event.state is not TaskState.RUNNING or task.attempt == step.attempt:
                    continue
                step.attempt = task.attempt
                if step.attempt > 1:
                    ended = task.attempts[-2] if len(task.attempts) > 1 else None
                    why = (
                        f" (attempt {ended.number}: {ended.error.message})"
                        if (ended is not None and ended.error is not None)
                        else ""
                    )
                    self._step_running(
                        wf,
                        step,
                        task=task.name,
                        message=f"attempt {step.attempt} running on {task.device_name}{why}",
                    )

    async def _run_llm(self, wf: Workflow, step: StepRun, action: LlmAction) -> None:
        from kernelmesh.core.llm.types import GenerationOptions, Message, Role

        if self.llm is None:
            raise Unavailable("no LLM gateway is configured on this server")
        policy = step.spec.retry or DEFAULT_RETRY
        timeout = step.spec.timeout
        deadline = time.monotonic() + timeout if timeout else None

        def text(t: str) -> str:
            return interpolate(t, lambda ref: self._resolve(wf, ref))

        self._step_running(wf, step, task="")
        while True:
            step.attempt += 1
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                # An Embeddings or a Completion, as action.kind says (mypy cannot tell).
                call: Coroutine[Any, Any, object]
                if action.kind == "embed":
                    call = self.llm.embed(
                        wf.tenant, action.model, [text(t) for t in action.inputs], timeout=left
                    )
                else:
                    messages = [Message(Role(r), text(c)) for r, c in action.messages]
                    options = GenerationOptions(
                        temperature=action.temperature,
                        max_tokens=action.max_tokens,
                        seed=action.seed,
                    )
                    call = self.llm.generate(
                        wf.tenant, action.model, messages, options, timeout=left
                    )
                result: Any = await (call if left is None else asyncio.wait_for(call, left))
            except TimeoutError:
                failure = TaskFailure(
                    Code.DEADLINE_EXCEEDED, f"the step's timeout of {timeout:g}s passed"
                )
            except KernelmeshError as exc:
                failure = TaskFailure(exc.code, exc.message)
            else:
                if action.kind == "embed":
                    array = np.asarray(result.vectors, dtype=np.float32)
                    step.outputs = [self.tasks.store.put(array, tenant=wf.tenant).name]
                else:
                    step.text = result.text
                self._step_end(wf, step, StepState.SUCCEEDED, None)
                return
            if policy.retryable(int(failure.code)) and step.attempt < policy.maximum_attempts:
                delay = policy.delay(step.attempt)
                if deadline is None or time.monotonic() + delay < deadline:
                    self._transition(
                        wf,
                        step,
                        f"attempt {step.attempt} failed ({failure.message}); "
                        f"retrying in {delay:g}s",
                        None,
                    )
                    await asyncio.sleep(delay)
                    continue
            self._step_end(wf, step, StepState.FAILED, failure)
            return

    # -- transitions -----------------------------------------------------------

    def _step_running(self, wf: Workflow, step: StepRun, *, task: str, message: str = "") -> None:
        step.state = StepState.RUNNING
        step.task = task
        if step.start_time is None:
            step.start_time = time.time()
        self._transition(wf, step, message or (f"running as {task}" if task else "running"), None)

    def _transition(
        self, wf: Workflow, step: StepRun, message: str, duration: float | None
    ) -> None:
        """Shows the step as it stands once the store has it. Only an end is
        journaled: a running step is submitted again after a restart either way
        (its request id finds its task), so its start costs no write."""
        view = step.snapshot()

        def show() -> None:
            step.view = view
            self._emit(wf, step.id, view.state, message, duration)
            if view.state.terminal:
                self._consumed(wf, step)

        journaled = self.journal is not None and view.state.terminal
        self._commits.after((PutWorkflowStep(_step_record(wf, step)),) if journaled else (), show)

    def _step_end(
        self,
        wf: Workflow,
        step: StepRun,
        state: StepState,
        error: TaskFailure | None,
        message: str = "",
    ) -> None:
        step.state = state
        step.error = error
        step.end_time = time.time()
        duration = None
        if step.start_time is not None:
            duration = step.end_time - step.start_time
        self._transition(
            wf, step, message or (error.message if error else state.name.lower()), duration
        )

    def _abort(self, wf: Workflow, state: WorkflowState, error: TaskFailure) -> None:
        """Ends a workflow early: its running steps are cancelled (with their
        tasks), its pending ones will never run."""
        for sid, runner in list(wf._running.items()):
            runner.cancel()
            step = wf.steps[sid]
            if step.task:
                with contextlib.suppress(KernelmeshError):
                    self.tasks.cancel(step.task, tenant=wf.tenant)
            if not step.state.terminal:
                self._step_end(wf, step, StepState.CANCELLED, None, "cancelled")
        wf._running.clear()
        for step in wf.steps.values():
            if not step.state.terminal:
                self._step_end(wf, step, StepState.CANCELLED, None, "cancelled")
        self._end(wf, state, error)

    def _end(self, wf: Workflow, state: WorkflowState, error: TaskFailure | None) -> None:
        wf.outcome = state
        end_time = time.time()
        update = UpdateWorkflow(
            wf.id,
            {
                "state": int(state),
                "end_time": end_time,
                "error_code": int(error.code) if error else None,
                "error_message": error.message if error else None,
            },
        )

        def show() -> None:
            wf.state, wf.error, wf.end_time = state, error, end_time
            self._emit(wf, "", None, error.message if error else state.name.lower())
            self._delete_tensors(wf.owned, wf.tenant)
            wf._done.set()
            self._finished[wf.name] = wf
            self._evict()

        self._commits.after((update,), show)

    def _emit(
        self,
        wf: Workflow,
        step: str,
        step_state: StepState | None,
        message: str,
        duration: float | None = None,
    ) -> None:
        if not wf._watchers:
            return
        event = WorkflowEvent(wf, step, step_state, wf.state, time.time(), message, duration)
        for watcher in wf._watchers:
            if watcher.steps or not step:
                watcher.queue.put_nowait(event)

    # -- retention of intermediate tensors ---------------------------------------

    def _consumed(self, wf: Workflow, step: StepRun) -> None:
        """`step` is shown ended: the outputs of the steps it depends on are deleted
        once no other step still needs them."""
        left = wf._consumers_left
        for d in wf.plan.deps[step.id]:
            left[d] -= 1
            if left[d] == 0:
                self._free_outputs(wf, wf.steps[d])

    def _free_outputs(self, wf: Workflow, step: StepRun) -> None:
        if step.spec.keep_outputs or not step.outputs:
            return
        self._delete_tensors(set(step.outputs), wf.tenant)

    def _delete_tensors(self, names: frozenset[str] | set[str], tenant: str) -> None:
        remote = self.tasks.remote_tensors  # an orchestrator's: on the nodes
        for name in names:
            if remote is not None and remote.discard(name, tenant):
                continue
            with contextlib.suppress(NotFound, StoreUnavailable):
                self.tasks.store.delete(name, tenant=tenant)

    def _journal(self, *ops_: object) -> None:
        if self.journal is None:
            return
        try:
            self.journal.write(*ops_)  # type: ignore[arg-type]
        except StoreUnavailable as exc:  # closed while shutting down: recovery redoes it
            log.warning("workflow state not journaled: %s", exc)

    def _evict(self) -> None:
        while len(self._finished) > self.options.retention:
            name, wf = self._finished.popitem(last=False)
            self._workflows.pop(name, None)
            for key in [k for k in self._remakes if k[0] == name]:
                self._remakes.pop(key, None)
                self._remaking.pop(key, None)
            if wf.request_id:
                self._requests.pop((wf.tenant, wf.request_id), None)
            self._journal(DeleteWorkflow(wf.id))

    # -- reads -------------------------------------------------------------

    def get(self, name: str, *, tenant: str) -> Workflow:
        wf = self._workflows.get(name)
        # Another tenant's workflow is reported exactly like a missing one.
        if wf is None or wf.tenant != tenant:
            raise NotFound(f"workflow {name!r} not found")
        return wf

    async def read(self, name: str, *, tenant: str) -> Workflow:
        """`get`, or on a shared store the workflow another orchestrator holds."""
        if self.shared is not None and name not in self._workflows:
            return await self.shared.get(name, tenant=tenant)
        return self.get(name, tenant=tenant)

    async def page(
        self,
        *,
        tenant: str,
        state: WorkflowState | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[builtins.list[Workflow], str]:
        """`list`, or on a shared store every orchestrator's workflows (from the
        store, newest first by creation time; those held here as they are here)."""
        if self.shared is not None:
            return await self.shared.list(
                tenant=tenant, state=state, page_size=page_size, page_token=page_token
            )
        return self.list(tenant=tenant, state=state, page_size=page_size, page_token=page_token)

    def list(
        self,
        *,
        tenant: str,
        state: WorkflowState | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[builtins.list[Workflow], str]:
        """Newest first; the token is the sequence number to continue below."""
        return listing.newest_first(
            self._workflows.values(),
            tenant=tenant,
            state=state,
            page_size=page_size,
            page_token=page_token,
        )

    async def watch(
        self, name: str, *, tenant: str, steps: bool = True
    ) -> AsyncGenerator[WorkflowEvent, None]:
        """The workflow as it stands, then every transition until it ends (with
        `steps=False`, only the workflow's own). One held by another
        orchestrator is followed in the store."""
        if self.shared is not None and name not in self._workflows:
            events = self.shared.watch(name, tenant=tenant, steps=steps)
            async with contextlib.aclosing(events):
                async for item in events:
                    yield item
            return
        wf = self.get(name, tenant=tenant)
        queue: asyncio.Queue[WorkflowEvent] = asyncio.Queue()
        watcher = _Watcher(queue, steps)
        wf._watchers.append(watcher)
        try:
            event = WorkflowEvent(wf, "", None, wf.state, time.time(), "current state")
            while True:
                yield event
                if event.step == "" and event.state.terminal:
                    return
                event = await queue.get()
        finally:
            wf._watchers.remove(watcher)

    async def cancel(self, name: str, *, tenant: str) -> Workflow:
        """Cancels running steps (and their tasks) and returns once the store holds
        the workflow's end; a finished workflow is unchanged. One held by another
        orchestrator is cancelled by its holder, asked through the store."""
        if self.shared is not None and name not in self._workflows:
            return await self.shared.cancel(name, tenant=tenant)
        wf = self.get(name, tenant=tenant)
        if wf.outcome is None:
            if wf._runner is not None:
                wf._runner.cancel()
            self._abort(
                wf, WorkflowState.CANCELLED, TaskFailure(Code.CANCELLED, "cancelled by request")
            )
        await wf.wait()
        return wf

    # -- lifecycle -----------------------------------------------------------

    async def recover(self) -> tuple[int, int]:
        """Loads the journal (after the task manager's recovery): finished
        workflows within retention, and unfinished ones, resumed. Returns
        (workflows resumed, finished workflows restored). On a store several
        orchestrators share, an unfinished workflow is another one's (or a dead
        one's, whose lease runs out): the shared round claims it, not this."""
        if self.journal is None:
            return 0, 0
        snap = await self.journal.load_workflows()
        resumed = finished = 0
        for record in snap.workflows:
            self._seq = max(self._seq, record.seq)
            if self.shared is not None and record.state == WorkflowState.RUNNING:
                continue
            wf = self._workflow_of(record, snap.steps.get(record.id, []))
            if wf is None:
                continue
            self._hold(wf)
            if wf.state.terminal:
                finished += 1
            else:
                self._start(wf)
                resumed += 1
        self._evict()
        return resumed, finished

    def _workflow_of(
        self, record: WorkflowRecord, steps: builtins.list[WorkflowStepRecord]
    ) -> Workflow | None:
        """The workflow as the store holds it (its steps as shown)."""
        try:
            data = json.loads(record.spec)
            spec = spec_from_dict(data)
            plan = plan_of(spec)
        except (ValueError, KeyError) as exc:  # written by a kernelmesh that read it
            log.error("workflow %s cannot be read back: %s", record.id, exc)
            return None
        wf = Workflow(
            id=record.id,
            seq=record.seq,
            tenant=record.tenant,
            spec=spec,
            plan=plan,
            steps={s.id: StepRun(s) for s in spec.steps},
            request_id=record.request_id,
            fingerprint=record.fingerprint,
            state=WorkflowState(record.state),
            create_time=record.create_time,
            end_time=record.end_time,
            owned=frozenset(data.get("owned", ())),
        )
        if record.error_code is not None:
            wf.error = TaskFailure(_code(record.error_code), record.error_message or "")
        for row in steps:
            step = wf.steps.get(row.step_id)
            if step is None:
                continue
            step.state = StepState(row.state)
            step.task = row.task
            step.attempt = row.attempt
            step.start_time = row.start_time
            step.end_time = row.end_time
            step.outputs = json.loads(row.outputs)
            step.text = row.text
            if row.error_code is not None:
                step.error = TaskFailure(_code(row.error_code), row.error_message or "")
            step.view = step.snapshot()
        return wf

    def views_of(self, snap: WorkflowSnapshot) -> builtins.list[Workflow]:
        """Read-only workflows from store records (of workflows held elsewhere)."""
        out = []
        for record in snap.workflows:
            wf = self._workflow_of(record, snap.steps.get(record.id, []))
            if wf is not None:
                if wf.state.terminal:
                    wf.outcome = wf.state
                    wf._done.set()
                out.append(wf)
        return out

    def _hold(self, wf: Workflow) -> None:
        """Keeps a workflow read from the store as this process's."""
        self._workflows[wf.name] = wf
        if wf.request_id:
            self._requests[(wf.tenant, wf.request_id)] = wf
        self._count_consumers(wf)
        if wf.state.terminal:
            wf.outcome = wf.state
            self._delete_tensors(wf.owned, wf.tenant)
            wf._done.set()
            self._finished[wf.name] = wf

    # -- several orchestrators on one store (services/mesh_sync.py) -----------------

    def leased(self) -> builtins.list[str]:
        """The ids of the running workflows this process holds."""
        return [wf.id for wf in self._workflows.values() if wf.outcome is None]

    def held(self, workflow_id: str) -> Workflow | None:
        return self._workflows.get(PREFIX + workflow_id)

    def adopt(self, snap: WorkflowSnapshot) -> int:
        """Resumes the workflows claimed from an orchestrator whose lease ran out,
        as `recover` does after a restart: from their finished steps; a step that
        was running is submitted again under its request id, which finds its task
        (claimed here, or followed where it runs), so no finished step runs again."""
        adopted = 0
        for record in snap.workflows:
            held = self.held(record.id)
            if held is not None and held.outcome is None:
                continue  # this process's own, renewed late: still running here
            wf = self._workflow_of(record, snap.steps.get(record.id, []))
            if wf is None:
                continue
            self._seq += 1
            wf.seq = max(wf.seq, self._seq)  # listed in this process's order
            wf.adopted = True
            self._hold(wf)
            if not wf.state.terminal:
                self._start(wf)
                adopted += 1
                if record.cancel_requested is not None:
                    self.cancel_held([record.id])
        return adopted

    def relinquish(self, ids: builtins.list[str]) -> int:
        """Another orchestrator holds these workflows now (this one's lease ran
        out): they stop here and are forgotten, so reads go to the store."""
        done = 0
        for workflow_id in ids:
            wf = self._workflows.pop(PREFIX + workflow_id, None)
            if wf is None:
                continue
            done += 1
            for runner in [*wf._running.values(), wf._runner]:
                if runner is not None:
                    runner.cancel()
            if wf.request_id and self._requests.get((wf.tenant, wf.request_id)) is wf:
                del self._requests[(wf.tenant, wf.request_id)]
            self._finished.pop(wf.name, None)
        if done:
            log.warning("%d workflows are held by another orchestrator now; stopped here", done)
        return done

    def cancel_held(self, ids: builtins.list[str]) -> int:
        """Cancels the workflows held here that another orchestrator was asked to."""
        done = 0
        for workflow_id in ids:
            wf = self.held(workflow_id)
            if wf is None or wf.outcome is not None:
                continue
            if wf._runner is not None:
                wf._runner.cancel()
            self._abort(
                wf,
                WorkflowState.CANCELLED,
                TaskFailure(Code.CANCELLED, "cancelled by request (through another orchestrator)"),
            )
            done += 1
        return done

    async def shutdown(self) -> None:
        """Stops running workflows where they stand: the store keeps them
        RUNNING, and the next start resumes them."""
        self._stopping = True
        self._commits.stopped = True
        runners = []
        for wf in self._workflows.values():
            if wf.outcome is None:
                for step_runner in wf._running.values():
                    step_runner.cancel()
                    runners.append(step_runner)
                if wf._runner is not None:
                    wf._runner.cancel()
                    runners.append(wf._runner)
        await asyncio.gather(*runners, return_exceptions=True)


def _record_of(wf: Workflow) -> WorkflowRecord:
    spec = {**spec_to_dict(wf.spec), "owned": sorted(wf.owned)}
    return WorkflowRecord(
        id=wf.id,
        seq=wf.seq,
        tenant=wf.tenant,
        state=int(wf.state),
        spec=json.dumps(spec, separators=(",", ":")),
        request_id=wf.request_id,
        fingerprint=wf.fingerprint,
        create_time=wf.create_time,
    )


def _step_record(wf: Workflow, step: StepRun) -> WorkflowStepRecord:
    error = step.error
    return WorkflowStepRecord(
        workflow_id=wf.id,
        step_id=step.id,
        state=int(step.state),
        task=step.task,
        attempt=step.attempt,
        start_time=step.start_time,
        end_time=step.end_time,
        error_code=int(error.code) if error else None,
        error_message=error.message if error else None,
        outputs=json.dumps(step.outputs),
        text=step.text,
    )


def _loop_time(deadline: float | None) -> float | None:
    """A time.monotonic() deadline on the event loop's clock (asyncio.timeout_at)."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def _code(value: int) -> Code | int:
    try:
        return Code(value)
    except ValueError:
        return value


__all__ = [
    "StepRun",
    "StepState",
    "StepView",
    "Workflow",
    "WorkflowEngine",
    "WorkflowEvent",
    "WorkflowOptions",
    "WorkflowState",
]
