"""`kernelmesh task get|list`: submitted tasks from the command line, with where
each was placed and why, and every attempt with its error (the dead letter)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import click

from kernelmesh.clients.cli import _client, _fail, target_option
from kernelmesh.clients.errors import KernelmeshError
from kernelmesh.clients.status import code_of
from kernelmesh.clients.types import TaskInfo, TaskState

tenant_option = click.option(
    "--tenant", default=None, envvar="KERNELMESH_TENANT", help="Tenant the task belongs to."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead.")


@click.group()
def task() -> None:
    """Inspect submitted tasks: state, placement and attempts."""


def _error(code: int, message: str) -> str:
    return f"{code_of(code).name}: {message}" if code else ""


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    when = datetime.fromtimestamp(seconds, UTC).isoformat(sep=" ", timespec="milliseconds")
    return when.removesuffix("+00:00") + "Z"


def _as_dict(info: TaskInfo) -> dict[str, object]:
    """Everything but output data, with states and error codes by name."""
    return {
        "name": info.name,
        "op": info.op,
        "state": info.state.name,
        "device": info.device,
        "tenant": info.tenant,
        "labels": dict(info.labels),
        "run_seconds": info.run_seconds,
        "error": {"code": code_of(info.error_code).name, "message": info.error_message}
        if info.error_code
        else None,
        "placement": dataclasses.asdict(info.placement) if info.placement else None,
        "attempt": info.attempt,
        "attempts": [
            {
                **dataclasses.asdict(a),
                "state": a.state.name,
                "error_code": code_of(a.error_code).name if a.error_code else None,
            }
            for a in info.attempts
        ],
        "output_refs": [r.name for r in info.output_refs],
    }


def _show(info: TaskInfo) -> None:
    click.echo(f"{info.name}  {info.op}  {info.state.name}")
    click.echo(f"  device {info.device or '-'}  tenant {info.tenant}  run {info.run_seconds:.3g}s")
    if info.placement is not None:
        where = f" on {info.placement.node}" if info.placement.node else ""
        click.echo(f"  placed on {info.placement.device}{where}: {info.placement.reason}")
    if info.error_code:
        click.echo(f"  error {_error(info.error_code, info.error_message)}")
    for a in info.attempts:
        line = f"attempt {a.number}  {a.state.name:<9} {a.device or '-'}  {_when(a.start_time)}"
        failed = _error(a.error_code, a.error_message)
        click.echo(f"  {line}  {failed}".rstrip())


@task.command()
@target_option
@tenant_option
@json_option
@click.argument("name")
def get(target: str, wait: float, tenant: str | None, as_json: bool, name: str) -> None:
    """Show task NAME: state, device, placement and each attempt with its error."""
    with _client(target, wait, tenant=tenant) as km:
        try:
            info = km.get_task(name)
        except KernelmeshError as exc:
            _fail(exc)
    if as_json:
        click.echo(json.dumps(_as_dict(info), indent=2))
    else:
        _show(info)


@task.command(name="list")
@target_option
@tenant_option
@json_option
@click.option(
    "--state",
    type=click.Choice([s.name.lower() for s in TaskState if s is not TaskState.UNSPECIFIED]),
    default=None,
    help="Only tasks in this state.",
)
@click.option("--limit", type=int, default=20, show_default=True)
def list_(
    target: str, wait: float, tenant: str | None, as_json: bool, state: str | None, limit: int
) -> None:
    """List submitted tasks, newest first."""
    wanted = TaskState[state.upper()] if state else None
    found: list[TaskInfo] = []
    with _client(target, wait, tenant=tenant) as km:
        try:
            for info in km.list_tasks(wanted, page_size=min(max(limit, 1), 1000)):
                if len(found) >= limit:
                    break
                found.append(info)
        except KernelmeshError as exc:
            _fail(exc)
    if as_json:
        click.echo(json.dumps([_as_dict(info) for info in found], indent=2))
        return
    for info in found:
        tries = f"{len(info.attempts)} attempts" if len(info.attempts) != 1 else "1 attempt"
        failed = _error(info.error_code, info.error_message)
        click.echo(
            f"{info.name}  {info.op:<10} {info.state.name:<9} {info.device or '-':<10} "
            f"{tries}  {failed}".rstrip()
        )
