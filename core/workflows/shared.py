"""Workflows as every orchestrator sharing one store sees them: GetWorkflow,
ListWorkflows, WatchWorkflow and CancelWorkflow of a workflow another
orchestrator holds (or held before it died) answer from the store.

The holder stays the only writer of a workflow's state: a cancel asked here is
recorded in the store (`cancel_requested`) and the holder acts on it in its next
shared round; a watch here polls the workflow's rows. The store has a step's
end (and its outputs), not its start: a watcher here sees steps end, not begin."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from kernelmesh.core import listing
from kernelmesh.core.errors import InvalidArgument, NotFound, Violation
from kernelmesh.core.store import Store
from kernelmesh.core.store.workflow_records import UpdateWorkflow

if TYPE_CHECKING:
    from kernelmesh.core.workflows.engine import (
        Workflow,
        WorkflowEngine,
        WorkflowEvent,
        WorkflowState,
    )

PREFIX = "workflows/"
# A watch of a workflow held elsewhere reads its rows this often.
WATCH_POLL_S = 0.5
# A cancel asked of another orchestrator waits this long for the holder to end it.
CANCEL_WAIT_S = 10.0
_TOKEN_KIND = "aw"


class SharedWorkflows:
    def __init__(
        self, engine: WorkflowEngine, store: Store, *, poll_s: float = WATCH_POLL_S
    ) -> None:
        self.engine = engine
        self.store = store
        self.poll_s = poll_s

    async def get(self, name: str, *, tenant: str) -> Workflow:
        held = self.engine._workflows.get(name)
        if held is not None:
            return self.engine.get(name, tenant=tenant)
        views = (
            self.engine.views_of(await self.store.read_workflows([name.removeprefix(PREFIX)]))
            if name.startswith(PREFIX)
            else []
        )
        # Another tenant's workflow is reported exactly like a missing one.
        if not views or views[0].tenant != tenant:
            raise NotFound(f"workflow {name!r} not found")
        return views[0]

    async def list(
        self,
        *,
        tenant: str,
        state: WorkflowState | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Workflow], str]:
        """Newest first by creation time, across every orchestrator; one held here
        is shown as it is in memory."""
        size = listing.page_size_of(page_size)
        below = _decode(page_token) if page_token else None
        snap = await self.store.list_workflow_records(
            tenant, state=int(state) if state is not None else None, limit=size + 1, below=below
        )
        page: list[Workflow] = []
        for wf in self.engine.views_of(snap)[:size]:
            held = self.engine._workflows.get(wf.name)
            page.append(held if held is not None else wf)
        token = ""
        if len(snap.workflows) > size:
            token = token_below(page[-1])
        return page, token

    async def watch(
        self, name: str, *, tenant: str, steps: bool = True
    ) -> AsyncGenerator[WorkflowEvent, None]:
        """The workflow as it stands, then each step's end and the workflow's own
        end as the store shows them."""
        from kernelmesh.core.workflows.engine import WorkflowEvent

        wf = await self.get(name, tenant=tenant)
        seen = {sid: (s.view.state, s.view.attempt) for sid, s in wf.steps.items()}
        yield WorkflowEvent(wf, "", None, wf.state, time.time(), "current state")
        while not wf.state.terminal:
            await asyncio.sleep(self.poll_s)
            wf = await self.get(name, tenant=tenant)
            for sid, step in wf.steps.items():
                view = step.view
                if (view.state, view.attempt) == seen[sid]:
                    continue
                seen[sid] = (view.state, view.attempt)
                if not steps:
                    continue
                duration = None
                if view.start_time is not None and view.end_time is not None:
                    duration = view.end_time - view.start_time
                message = view.error.message if view.error else view.state.name.lower()
                yield WorkflowEvent(wf, sid, view.state, wf.state, time.time(), message, duration)
        message = wf.error.message if wf.error else wf.state.name.lower()
        yield WorkflowEvent(wf, "", None, wf.state, time.time(), message)

    async def cancel(self, name: str, *, tenant: str) -> Workflow:
        """Records the request in the store; the holder (or whoever claims the
        workflow next) cancels it in its next round. Waits a while for its end."""
        wf = await self.get(name, tenant=tenant)
        if wf.state.terminal:
            return wf
        future = self.store.write(
            UpdateWorkflow(wf.id, {"cancel_requested": time.time()}), wait=True
        )
        if future is not None:
            await future
        deadline = time.monotonic() + CANCEL_WAIT_S
        while not wf.state.terminal and time.monotonic() < deadline:
            await asyncio.sleep(min(self.poll_s, 0.2))
            wf = await self.get(name, tenant=tenant)
        return wf


def token_below(wf: Workflow) -> str:
    """The page token that continues below `wf` (newest first)."""
    text = f"{_TOKEN_KIND}:{wf.create_time!r}:{wf.id}"
    return base64.urlsafe_b64encode(text.encode()).decode()


def _decode(token: str) -> tuple[float, str]:
    try:
        kind, when, workflow_id = base64.urlsafe_b64decode(token.encode()).decode().split(":", 2)
        if kind != _TOKEN_KIND:
            raise ValueError(kind)
        return float(when), workflow_id
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(
            [Violation("page_token", "not a page token returned by this server")]
        ) from None


__all__ = ["SharedWorkflows", "token_below"]
