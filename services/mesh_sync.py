"""Several orchestrators on one shared store (PostgreSQL): each renews the leases
of the tasks it accepted, places on the nodes joined to the others (their
records in the store), and one of them at a time (an advisory lock) claims the
unfinished tasks of an orchestrator whose leases ran out, so its work goes on."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time

from kernelmesh.core.mesh.nodes import Mesh, Registration
from kernelmesh.core.store import Store, StoreUnavailable
from kernelmesh.core.store.base import NodeRecord
from kernelmesh.core.tasks import TaskManager
from kernelmesh.core.workflows import WorkflowEngine
from kernelmesh.services import orchestrator_nodes
from kernelmesh.v1 import orchestrator_pb2

log = logging.getLogger(__name__)

# Claimed per round; the next round (a third of a lease later) takes more.
CLAIM_BATCH = 500


def encode(request: orchestrator_pb2.RegisterNodeRequest) -> str:
    return base64.b64encode(request.SerializeToString()).decode()


def decode(record: NodeRecord) -> Registration | None:
    try:
        request = orchestrator_pb2.RegisterNodeRequest.FromString(
            base64.b64decode(record.registration)
        )
    except Exception:  # a record written by something else: not a node to use
        return None
    return orchestrator_nodes.registration_of(request)


class SharedMesh:
    def __init__(self, mesh: Mesh, tasks: TaskManager, store: Store, owner: str) -> None:
        self.mesh = mesh
        self.tasks = tasks
        self.store = store
        self.owner = owner
        self.lease = mesh.lease_seconds
        self.claimed = 0
        # Held under leases as tasks are (set by the server once it has an engine).
        self.workflows: WorkflowEngine | None = None
        self.claimed_workflows = 0
        self._task: asyncio.Task | None = None
        # Set by a notification (a node joined another orchestrator, a cancel was
        # asked): the next round starts now, not a third of a lease later.
        self._wake = asyncio.Event()
        self.listening = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="shared-mesh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def notified(self, kind: str, ids: list[str]) -> None:
        if kind == "t":
            view = self.tasks.shared_view
            if view is not None:
                view.changed(ids)
        elif kind == "n" or (kind == "c" and any(self.tasks.held(i) for i in ids)):
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                # (Again) after a lost connection; until then, rounds poll.
                self.listening = await self.store.listen(self.notified)
                await self.round()
            except StoreUnavailable as exc:
                log.warning("shared store: %s", exc)
            except Exception:
                log.exception("shared store round failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.lease / 3)

    async def round(self) -> None:
        leased = self.tasks.leased()
        # Their rows are committed before they are checked (a task accepted without
        # waiting for its commit, a workflow step, may still be queued).
        await self.store.sync()
        now = time.time()
        # A renewal that came late (this process stalled past its lease) finds the
        # tasks another orchestrator claimed meanwhile: they stop here, so no task
        # runs to its end twice (their writes from here are fenced out as well).
        lost = await self.store.renew_task_leases(self.owner, now + self.lease, leased)
        if lost:
            self.tasks.relinquish(lost)
        if self.workflows is not None:
            lost = await self.store.renew_workflow_leases(
                self.owner, now + self.lease, self.workflows.leased()
            )
            if lost:
                self.workflows.relinquish(lost)
            cancels = await self.store.workflow_cancel_requests(self.owner)
            if cancels:
                self.workflows.cancel_held(cancels)
        entries = []
        for record in await self.store.list_nodes():
            reg = decode(record)
            if reg is not None:
                entries.append((record, reg))
        self.mesh.sync_foreign(entries)
        if self.mesh.tensors is not None:  # tensors uploaded through the others
            await self.mesh.tensors.refresh()
        cancels = await self.store.cancel_requests(self.owner)
        if cancels:
            done = self.tasks.cancel_held(cancels)
            log.info(
                "cancelled %d of %d tasks as asked through another orchestrator", done, len(cancels)
            )
        if await self.store.try_sweeper_lock():
            snap = await self.store.claim_expired_tasks(
                self.owner, now + self.lease, now, CLAIM_BATCH
            )
            if snap.tasks:
                log.warning(
                    "claimed %d unfinished tasks whose orchestrator's lease ran out",
                    len(snap.tasks),
                )
                try:
                    self.claimed += self.tasks.adopt(snap)
                except BaseException:
                    # Leased to this live process but not running here: the lease
                    # would be renewed for ever. Hand back what was not taken up.
                    left = [t.id for t in snap.tasks if self.tasks.held(t.id) is None]
                    with contextlib.suppress(StoreUnavailable):
                        await self.store.release_task_leases(self.owner, left)
                    raise
            if self.workflows is not None:
                # After the tasks: a resumed step finds its task claimed here.
                wf_snap = await self.store.claim_expired_workflows(
                    self.owner, now + self.lease, now, CLAIM_BATCH
                )
                if wf_snap.workflows:
                    log.warning(
                        "claimed %d running workflows whose orchestrator's lease ran out",
                        len(wf_snap.workflows),
                    )
                    self.claimed_workflows += self.workflows.adopt(wf_snap)
