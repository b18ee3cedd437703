"""`--store memory`: the same interface with nothing kept past the process.
For tests and for measuring what durability costs."""

from __future__ import annotations

import asyncio
import dataclasses

from kernelmesh.core.api_keys import ApiKeyRecord
from kernelmesh.core.store.base import (
    AttemptRecord,
    BudgetAnswer,
    ChargeBudget,
    DeleteBlob,
    DeleteTask,
    DeleteTensor,
    DeleteTensorLocation,
    Fenced,
    NodeRecord,
    Op,
    PutApiKey,
    PutAttempt,
    PutBlob,
    PutNode,
    PutTask,
    PutTensor,
    PutTensorLocation,
    PutUsage,
    RenewNode,
    RevokeApiKey,
    SettleBudget,
    Snapshot,
    Store,
    TaskRecord,
    TensorLocationRecord,
    TensorRecord,
    TensorsLost,
    UpdateTask,
    inputs_key,
    outputs_key,
)
from kernelmesh.core.store.workflow_records import (
    DeleteWorkflow,
    PutWorkflow,
    PutWorkflowStep,
    UpdateWorkflow,
    WorkflowRecord,
    WorkflowSnapshot,
    WorkflowStepRecord,
)


class MemoryStore(Store):
    kind = "memory"
    durable = False

    def __init__(self) -> None:
        self.tasks: dict[str, TaskRecord] = {}
        self.attempts: dict[tuple[str, int], AttemptRecord] = {}
        self.blobs: dict[str, bytes] = {}
        self.tensors: dict[str, TensorRecord] = {}
        self.api_keys: dict[str, ApiKeyRecord] = {}
        self.workflows: dict[str, WorkflowRecord] = {}
        self.workflow_steps: dict[tuple[str, str], WorkflowStepRecord] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.usage: list[PutUsage] = []
        self.budget_spent: dict[str, int] = {}
        self.reservations: dict[int, tuple[str, int, float]] = {}  # tenant, tokens, expires
        self._holds = 0
        self.tensor_location_records: dict[str, TensorLocationRecord] = {}

    @property
    def where(self) -> str:
        return "memory (nothing survives a restart)"

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def write(self, *ops: Op, wait: bool = False) -> asyncio.Future[None] | None:
        for op in ops:
            self._apply(op)
        if not wait:
            return None
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def _apply(self, op: Op) -> None:
        if isinstance(op, PutUsage):
            self.usage.append(op)
        elif isinstance(op, ChargeBudget):
            self.budget_spent[op.tenant] = self.budget_spent.get(op.tenant, 0) + op.tokens
        elif isinstance(op, SettleBudget):
            if self.reservations.pop(op.hold_id, None) is not None:
                self.budget_spent[op.tenant] = self.budget_spent.get(op.tenant, 0) + op.used
        elif isinstance(op, Fenced):
            record = self.tasks.get(op.task_id)
            if (
                record is not None
                and record.node == op.node
                and (op.attempt is None or record.attempt == op.attempt)
            ):
                for inner in op.ops:
                    self._apply(inner)
            elif self.fenced_out is not None:
                self.fenced_out([op.task_id])
        elif isinstance(op, PutTask):
            self.tasks[op.record.id] = dataclasses.replace(op.record)
        elif isinstance(op, UpdateTask):
            record = self.tasks.get(op.id)
            if record is not None:
                for name, value in op.fields.items():
                    setattr(record, name, value)
        elif isinstance(op, DeleteTask):
            self.tasks.pop(op.id, None)
            self.blobs.pop(inputs_key(op.id), None)
            self.blobs.pop(outputs_key(op.id), None)
            for key in [k for k in self.attempts if k[0] == op.id]:
                del self.attempts[key]
        elif isinstance(op, PutAttempt):
            self.attempts[(op.record.task_id, op.record.number)] = op.record
        elif isinstance(op, PutBlob):
            self.blobs[op.key] = bytes(op.data)
        elif isinstance(op, DeleteBlob):
            self.blobs.pop(op.key, None)
        elif isinstance(op, PutTensor):
            self.tensors[op.record.name] = op.record
            self.blobs[op.record.name] = bytes(op.data)
        elif isinstance(op, DeleteTensor):
            self.tensors.pop(op.name, None)
            self.blobs.pop(op.name, None)
        elif isinstance(op, PutApiKey):
            self.api_keys[op.record.key_id] = op.record
        elif isinstance(op, PutNode):
            self.nodes[op.record.name] = op.record
        elif isinstance(op, RenewNode):
            node = self.nodes.get(op.name)
            if node is not None and node.orchestrator == op.orchestrator:
                self.nodes[op.name] = dataclasses.replace(node, lease_until=op.lease_until)
        elif isinstance(op, PutTensorLocation):
            self.tensor_location_records[op.record.name] = op.record
        elif isinstance(op, DeleteTensorLocation):
            self.tensor_location_records.pop(op.name, None)
        elif isinstance(op, TensorsLost):
            for name, held in list(self.tensor_location_records.items()):
                if held.node == op.node and not held.lost:
                    self.tensor_location_records[name] = dataclasses.replace(held, lost=op.why)
        elif isinstance(op, RevokeApiKey):
            api_key = self.api_keys.get(op.key_id)
            if api_key is not None and (api_key.revoked_at is None or api_key.revoked_at > op.at):
                self.api_keys[op.key_id] = dataclasses.replace(api_key, revoked_at=op.at)
        elif isinstance(op, PutWorkflow):
            self.workflows[op.record.id] = dataclasses.replace(op.record)
        elif isinstance(op, UpdateWorkflow):
            workflow = self.workflows.get(op.id)
            if workflow is not None:
                for name, value in op.fields.items():
                    setattr(workflow, name, value)
        elif isinstance(op, PutWorkflowStep):
            step = (op.record.workflow_id, op.record.step_id)
            self.workflow_steps[step] = dataclasses.replace(op.record)
        elif isinstance(op, DeleteWorkflow):
            self.workflows.pop(op.id, None)
            for step in [k for k in self.workflow_steps if k[0] == op.id]:
                del self.workflow_steps[step]

    async def list_nodes(self) -> list[NodeRecord]:
        return [self.nodes[k] for k in sorted(self.nodes)]

    async def tensor_locations(self, name: str | None = None) -> list[TensorLocationRecord]:
        if name is not None:
            found = self.tensor_location_records.get(name)
            return [] if found is None else [found]
        return list(self.tensor_location_records.values())

    async def load(self) -> Snapshot:
        snap = Snapshot(
            tasks=sorted((dataclasses.replace(t) for t in self.tasks.values()), key=_seq),
            tensors=list(self.tensors.values()),
            blobs=dict(self.blobs),
        )
        for (task_id, _), attempt in sorted(self.attempts.items()):
            snap.attempts.setdefault(task_id, []).append(attempt)
        return snap

    async def load_workflows(self) -> WorkflowSnapshot:
        snap = WorkflowSnapshot(
            sorted((dataclasses.replace(w) for w in self.workflows.values()), key=lambda w: w.seq),
            {},
        )
        for (workflow_id, _), step in sorted(self.workflow_steps.items()):
            snap.steps.setdefault(workflow_id, []).append(dataclasses.replace(step))
        return snap

    async def reserve_budget(
        self, tenant: str, tokens: int, budget: int, owner: str, expires: float, now: float
    ) -> BudgetAnswer:
        spent = self.budget_spent.setdefault(tenant, 0)
        for hold, (who, held, until) in list(self.reservations.items()):
            if who == tenant and until < now:
                del self.reservations[hold]
                spent += held
        self.budget_spent[tenant] = spent
        reserved = sum(n for who, n, _ in self.reservations.values() if who == tenant)
        if spent + reserved + tokens > budget:
            return BudgetAnswer(None, spent, reserved)
        self._holds += 1
        self.reservations[self._holds] = (tenant, tokens, expires)
        return BudgetAnswer(self._holds, spent, reserved + tokens)

    async def budget_usage(
        self,
    ) -> tuple[dict[str, int], list[tuple[str, str, str, int, int, int, float]]]:
        totals: dict[tuple[str, str, str], list[float]] = {}
        for u in self.usage:
            row = totals.setdefault((u.tenant, u.model, u.provider), [0, 0, 0, 0.0])
            row[0] += 1
            row[1] += u.prompt_tokens
            row[2] += u.completion_tokens
            row[3] += u.cost
        return dict(self.budget_spent), [
            (t, m, p, int(v[0]), int(v[1]), int(v[2]), float(v[3]))
            for (t, m, p), v in sorted(totals.items())
        ]

    async def get_api_key_by_digest(self, digest: bytes) -> ApiKeyRecord | None:
        return next((r for r in self.api_keys.values() if r.digest == digest), None)

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        return self.api_keys.get(key_id)

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        records = sorted(self.api_keys.values(), key=lambda r: (r.created_at, r.key_id))
        return [r for r in records if tenant is None or r.tenant == tenant]


def _seq(record: TaskRecord) -> int:
    return record.seq
