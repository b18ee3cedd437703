"""The `kernelmesh` command. Client commands live here; server commands
(`serve`) plug in through the `kernelmesh.cli` entry-point group, so this
layer never imports the server."""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points

import click
import numpy as np

from kernelmesh.clients.client import DEFAULT_TARGET, Client
from kernelmesh.clients.errors import KernelmeshError


class _PluginGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        plugins = [ep.name for ep in entry_points(group="kernelmesh.cli")]
        return sorted({*super().list_commands(ctx), *plugins})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        for ep in entry_points(group="kernelmesh.cli"):
            if ep.name == name:
                return ep.load()
        return None


@click.group(cls=_PluginGroup)
@click.version_option(package_name="kernelmesh")
def main() -> None:
    """kernelmesh: a gRPC compute mesh."""


target_option = click.option(
    "--target",
    "-t",
    default=DEFAULT_TARGET,
    show_default=True,
    envvar="KERNELMESH_TARGET",
    help="host:port of a kernelmesh server.",
)


def _client(target: str) -> Client:
    return Client(target, timeout=60.0)


def _fail(exc: KernelmeshError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@main.command()
@target_option
def devices(target: str) -> None:
    """List the devices of the mesh."""
    with _client(target) as km:
        try:
            found = km.devices()
        except KernelmeshError as exc:
            _fail(exc)
    for d in found:
        gib = 1 << 30
        click.echo(
            f"{d.name:<10} {d.kind:<7} {d.model}  {d.compute_units} cores/{d.threads} threads  "
            f"mem {d.memory_available_bytes / gib:.1f}/{d.memory_total_bytes / gib:.1f} GiB  "
            f"util {d.utilization:.0%}  queue {d.queue_depth}"
        )
        precisions = "fp64" if d.supports_fp64 else "no fp64"
        precisions += ", fp16" if d.supports_fp16 else ""
        group = f", work-group {d.max_work_group_size}" if d.max_work_group_size else ""
        click.echo(f"{'':<10} {d.vendor}, driver {d.driver_version}, {precisions}{group}")
        if d.features:
            click.echo(f"{'':<10} features: {' '.join(d.features)}")


@main.command()
@target_option
def ops(target: str) -> None:
    """List the op catalog with signatures and devices."""
    with _client(target) as km:
        try:
            catalog = km.ops()
        except KernelmeshError as exc:
            _fail(exc)
    for op in catalog:
        params = ", ".join(
            f"{p.name}: {p.type}" + ("" if p.required else f" = {p.default_json or 'none'}")
            for p in op.params
        )
        click.echo(f"{op.name:<10} {op.kind:<12} {op.shape_rule}")
        click.echo(f"{'':<10} dtypes: {', '.join(op.dtypes)}; devices: {', '.join(op.devices)}")
        if params:
            click.echo(f"{'':<10} params: {params}")


def _parse_param(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep:
        raise click.BadParameter(f"{text!r}: expected NAME=VALUE (VALUE as JSON, e.g. axis=1)")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


@main.command()
@target_option
@click.argument("op")
@click.option(
    "--input",
    "-i",
    "inputs",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help=".npy file; repeat for each input in order.",
)
@click.option("--param", "-p", "params", multiple=True, help="NAME=VALUE, VALUE as JSON.")
@click.option(
    "--device", "-d", default=None, help="cpu, opencl, cuda, metal, or a name like cpu:0."
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the result to this .npy file.",
)
def run(
    target: str,
    op: str,
    inputs: tuple[str, ...],
    params: tuple[str, ...],
    device: str | None,
    output: str | None,
) -> None:
    """Run OP on .npy inputs and print or save the result."""
    arrays = [np.load(path, allow_pickle=False) for path in inputs]
    kwargs = dict(_parse_param(p) for p in params)
    with _client(target) as km:
        try:
            info = km.run_task(op, *arrays, device=device, **kwargs)
        except KernelmeshError as exc:
            _fail(exc)
    result = info.outputs[0]
    click.echo(
        f"{info.name} {info.state.name} on {info.device} in {info.run_seconds * 1e3:.3f} ms: "
        f"{result.dtype}{list(result.shape)}"
    )
    if output:
        np.save(output, result)
        click.echo(f"wrote {output}")
    else:
        with np.printoptions(threshold=20, edgeitems=3, precision=5):
            click.echo(result)


@main.command()
@target_option
@click.option("--wait", default=120.0, show_default=True, help="Seconds to wait for the server.")
def demo(target: str, wait: float) -> None:
    """Submit a real mix of tasks and check every result against NumPy."""
    from kernelmesh.clients.demo import run_demo

    with Client(target, timeout=120.0) as km:
        try:
            ok = run_demo(km, wait=wait, echo=click.echo)
        except KernelmeshError as exc:
            _fail(exc)
    sys.exit(0 if ok else 1)


# -- the LLM gateway ---------------------------------------------------------------

tenant_option = click.option(
    "--tenant",
    default=None,
    envvar="KERNELMESH_TENANT",
    help="Tenant to bill (default: the server's default tenant).",
)


@main.group()
def llm() -> None:
    """Chat, embed and list models through the LLM gateway."""


@llm.command()
@target_option
@tenant_option
@click.argument("prompt", required=False)
@click.option("--model", "-m", default="", envvar="KERNELMESH_LLM_MODEL", help="Model name.")
@click.option("--system", "-s", default=None, help="System message sent before the prompt.")
@click.option("--max-tokens", type=int, default=0, help="Cap on generated tokens (0: default).")
@click.option("--temperature", type=float, default=None, help="Sampling temperature.")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=None, help="Seed (makes the request cacheable).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds.")
def chat(
    target: str,
    tenant: str | None,
    prompt: str | None,
    model: str,
    system: str | None,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    timeout: float,
) -> None:
    """Stream a reply to PROMPT (or to stdin when PROMPT is - or left out).

    Tokens go to stdout as they arrive; a usage line goes to stderr."""
    text = sys.stdin.read() if prompt in (None, "-") else prompt
    with Client(target, timeout=timeout, tenant=tenant) as km:
        stream = km.llm.stream(
            text,
            model=model,
            system=system,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        printed = False
        try:
            with stream:
                for delta in stream:
                    click.echo(delta, nl=False)
                    sys.stdout.flush()
                    printed = True
        except KernelmeshError as exc:
            if printed:
                click.echo()  # end the partial reply's line before the error
            _fail(exc)
    click.echo()
    usage = stream.usage
    tokens = (
        f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
        if usage
        else "usage not reported"
    )
    cached = ", cached" if stream.cached else ""
    click.echo(
        f"[{stream.deployment} ({stream.provider}){cached}: {tokens}; "
        f"finish {stream.finish_reason or 'unknown'}]",
        err=True,
    )


@llm.command()
@target_option
@tenant_option
def models(target: str, tenant: str | None) -> None:
    """List models with their deployments' health and circuit-breaker state."""
    with Client(target, timeout=60.0, tenant=tenant) as km:
        try:
            found = km.llm.models()
        except KernelmeshError as exc:
            _fail(exc)
    for model in found:
        click.echo(model.name)
        for d in model.deployments:
            health = "healthy" if d.healthy else "unhealthy"
            click.echo(f"  {d.name:<24} {d.provider:<8} {health:<10} breaker {d.breaker}")


@llm.command()
@target_option
@tenant_option
@click.argument("texts", nargs=-1, required=True)
@click.option("--model", "-m", default="", help="Embedding model (default: the server's).")
@click.option("--json", "as_json", is_flag=True, help="Print the vectors as JSON.")
def embed(
    target: str, tenant: str | None, texts: tuple[str, ...], model: str, as_json: bool
) -> None:
    """Embed TEXTS; print each vector's size and norm, and their cosine similarities."""
    with Client(target, timeout=60.0, tenant=tenant) as km:
        try:
            vectors = km.llm.embed(list(texts), model=model)
        except KernelmeshError as exc:
            _fail(exc)
    if as_json:
        click.echo(json.dumps([v.tolist() for v in vectors]))
        return
    norms = np.linalg.norm(vectors, axis=1)
    for text, norm in zip(texts, norms, strict=True):
        click.echo(f"dims {vectors.shape[1]}  norm {norm:.4f}  {text}")
    if len(texts) > 1:
        unit = vectors / np.maximum(norms[:, None], 1e-12)
        with np.printoptions(precision=3, suppress=True):
            click.echo("cosine similarities:")
            click.echo(unit @ unit.T)
