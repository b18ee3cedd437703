"""`kernelmesh workflow run|get|watch|cancel|list`: workflows from the
command line, with a live table of the steps while one runs."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import numpy as np
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from kernelmesh.clients.cli import _client, _fail, _load_npy, target_option
from kernelmesh.clients.client import Client
from kernelmesh.clients.errors import KernelmeshError
from kernelmesh.clients.workflow_types import (
    StepState,
    WorkflowInfo,
    WorkflowState,
    load_spec,
)

_STYLE = {
    StepState.PENDING: "dim",
    StepState.RUNNING: "yellow",
    StepState.SUCCEEDED: "green",
    StepState.FAILED: "bold red",
    StepState.CANCELLED: "magenta",
    StepState.SKIPPED: "dim",
}

tenant_option = click.option(
    "--tenant", default=None, envvar="KERNELMESH_TENANT", help="Tenant the workflow belongs to."
)


@click.group()
def workflow() -> None:
    """Run and follow workflows: DAGs of kernel tasks and LLM calls."""


class _Rows:
    """Each step's state, seconds and last message, for the live table."""

    def __init__(self, info: WorkflowInfo) -> None:
        self.name = info.name
        self.state = info.state
        self.rows: dict[str, list[Any]] = {}  # step -> [state, seconds, message]
        self.began: dict[str, float] = {}
        self.update(info)

    def update(self, info: WorkflowInfo) -> None:
        self.state = info.state
        for step in info.steps:
            row = self.rows.setdefault(step.id, [step.state, None, ""])
            row[0] = step.state
            if step.seconds is not None:
                row[1] = step.seconds
            if step.error_message:
                row[2] = step.error_message
            elif step.text:
                row[2] = step.text.replace("\n", " ")[:60]
            elif step.outputs:
                row[2] = ", ".join(f"{o.dtype}{list(o.shape)}" for o in step.outputs)

    def step(self, step_id: str, state: StepState, seconds: float | None, message: str) -> None:
        row = self.rows.setdefault(step_id, [state, None, ""])
        row[0] = state
        if state is StepState.RUNNING:
            self.began.setdefault(step_id, time.monotonic())
        if seconds is not None:
            row[1] = seconds
        row[2] = message

    def table(self) -> Table:
        done = sum(r[0].terminal for r in self.rows.values())
        table = Table(title=f"{self.name}  {self.state.name}  {done}/{len(self.rows)} steps")
        for column in ("step", "state", "seconds", "detail"):
            table.add_column(column)
        for step_id, (state, seconds, message) in self.rows.items():
            if seconds is None and step_id in self.began and not state.terminal:
                seconds = time.monotonic() - self.began[step_id]
            shown = "" if seconds is None else f"{seconds:.3f}"
            table.add_row(step_id, f"[{_STYLE[state]}]{state.name}", shown, message)
        return table


def _follow(km: Client, info: WorkflowInfo, plain: bool) -> WorkflowInfo:
    rows = _Rows(info)
    console = Console()
    if plain or not console.is_terminal:
        for event in km.workflows.watch(info.name):
            if event.step and event.step_state is not None:  # a step's event has its state
                took = f" ({event.seconds:.3f}s)" if event.seconds is not None else ""
                click.echo(f"{event.step}: {event.step_state.name}{took} {event.message}".rstrip())
        final = km.workflows.get(info.name)
        rows.update(final)
        console.print(rows.table())
        return final
    with Live(rows.table(), console=console, refresh_per_second=8) as live:
        for event in km.workflows.watch(info.name):
            if event.workflow is not None:
                rows.update(event.workflow)
            elif event.step and event.step_state is not None:
                rows.step(event.step, event.step_state, event.seconds, event.message)
            live.update(rows.table())
        final = km.workflows.get(info.name)
        rows.update(final)
        live.update(rows.table())
    return final


def _leaves(spec: Mapping[str, Any]) -> list[str]:
    steps = spec.get("steps") or []
    used = {d for s in steps for d in (s.get("depends_on") or [])}
    text = yaml.safe_dump(spec)
    return [s["id"] for s in steps if s["id"] not in used and f"${{{s['id']}." not in text]


def _write(km: Client, final: WorkflowInfo, steps: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for step_id in steps:
        step = final.step(step_id)
        if step.text:
            path = out / f"{step_id}.txt"
            path.write_text(step.text)
            click.echo(f"wrote {path}")
        for i, ref in enumerate(step.outputs):
            path = out / (f"{step_id}.npy" if len(step.outputs) == 1 else f"{step_id}.{i}.npy")
            np.save(path, km.download(ref))
            click.echo(f"wrote {path}  {ref.dtype}{list(ref.shape)}")


@workflow.command()
@target_option
@tenant_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--input",
    "-i",
    "inputs",
    multiple=True,
    metavar="NAME=FILE.npy",
    help="A workflow input, referred to as ${inputs.NAME}; repeat for each.",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False),
    default=None,
    help="Write the final steps' outputs here (NAME.npy, NAME.txt).",
)
@click.option("--plain", is_flag=True, help="One line per step transition, no live table.")
@click.option("--request-id", default=None, help="Idempotency key; a retry returns the first run.")
def run(
    target: str,
    wait: float,
    tenant: str | None,
    file: str,
    inputs: tuple[str, ...],
    out: str | None,
    plain: bool,
    request_id: str | None,
) -> None:
    """Submit the workflow in FILE (YAML), show its steps live, write its outputs."""
    try:
        spec = load_spec(Path(file))
    except (ValueError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"{file}: {exc}", param_hint="FILE") from None
    arrays = {}
    for item in inputs:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r}: write NAME=FILE.npy", param_hint="'--input'")
        arrays[name] = _load_npy(path)
    with _client(target, wait, tenant=tenant) as km:
        try:
            info = km.workflows.submit(spec, arrays, request_id=request_id)
            final = _follow(km, info, plain)
            if out is not None:
                _write(km, final, _leaves(spec), Path(out))
        except KernelmeshError as exc:
            _fail(exc)
    if final.state is not WorkflowState.SUCCEEDED:
        click.echo(f"error: {final.name} {final.state.name}: {final.error_message}", err=True)
        sys.exit(1)


@workflow.command()
@target_option
@tenant_option
@click.argument("name")
def get(target: str, wait: float, tenant: str | None, name: str) -> None:
    """Show workflow NAME and its steps."""
    with _client(target, wait, tenant=tenant) as km:
        try:
            info = km.workflows.get(name)
        except KernelmeshError as exc:
            _fail(exc)
    Console().print(_Rows(info).table())


@workflow.command()
@target_option
@tenant_option
@click.argument("name")
@click.option("--plain", is_flag=True, help="One line per step transition, no live table.")
def watch(target: str, wait: float, tenant: str | None, name: str, plain: bool) -> None:
    """Follow workflow NAME until it ends."""
    with _client(target, wait, tenant=tenant) as km:
        try:
            final = _follow(km, km.workflows.get(name), plain)
        except KernelmeshError as exc:
            _fail(exc)
    if final.state is not WorkflowState.SUCCEEDED:
        sys.exit(1)


@workflow.command()
@target_option
@tenant_option
@click.argument("name")
def cancel(target: str, wait: float, tenant: str | None, name: str) -> None:
    """Cancel workflow NAME and its running steps."""
    with _client(target, wait, tenant=tenant) as km:
        try:
            info = km.workflows.cancel(name)
        except KernelmeshError as exc:
            _fail(exc)
    click.echo(f"{info.name} {info.state.name}")


@workflow.command(name="list")
@target_option
@tenant_option
@click.option(
    "--state",
    type=click.Choice([s.name.lower() for s in WorkflowState]),
    default=None,
    help="Only workflows in this state.",
)
@click.option("--limit", type=int, default=20, show_default=True)
def list_(target: str, wait: float, tenant: str | None, state: str | None, limit: int) -> None:
    """List workflows, newest first."""
    wanted = WorkflowState[state.upper()] if state else None
    with _client(target, wait, tenant=tenant) as km:
        try:
            for n, info in enumerate(km.workflows.list(wanted)):
                if n >= limit:
                    break
                done = sum(s.state.terminal for s in info.steps)
                click.echo(f"{info.name}  {info.state.name}  {done}/{len(info.steps)} steps")
        except KernelmeshError as exc:
            _fail(exc)
