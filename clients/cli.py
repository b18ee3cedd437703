"""The `kernelmesh` command. Client commands live here; server commands
(`serve`) plug in through the `kernelmesh.cli` entry-point group, so this
layer never imports the server."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import click
import numpy as np

from kernelmesh.clients.client import DEFAULT_TARGET, Client
from kernelmesh.clients.errors import DeadlineExceededError, KernelmeshError
from kernelmesh.clients.reach import Unreachable, reach
from kernelmesh.clients.types import TensorRef, selector

if TYPE_CHECKING:
    import grpc

    from kernelmesh.v1.orchestrator_pb2_grpc import OrchestratorServiceStub

# Inputs above this many bytes go up chunked (UploadTensor) before the task runs, with
# a line per file, instead of inside one RunTask message.
UPLOAD_ABOVE_BYTES = 32 << 20
# Work above this many bytes says what it is doing before it starts.
ANNOUNCE_ABOVE_BYTES = 8 << 20


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
                return cast(click.Command, ep.load())
        return None


@click.group(cls=_PluginGroup)
@click.version_option(package_name="kernelmesh")
def main() -> None:
    """kernelmesh: a gRPC compute mesh.

    Client commands talk to the server named by --target or $KERNELMESH_TARGET
    (default 127.0.0.1:50051); start one with `kernelmesh serve`."""


DEFAULT_WAIT = 5.0


def _remember_ca_bundle(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta["kernelmesh.ca_bundle"] = value


def _ca_bundle() -> str | None:
    """The --ca-bundle (or $KERNELMESH_CA_BUNDLE) of the command being run."""
    ctx = click.get_current_context(silent=True)
    return None if ctx is None else ctx.meta.get("kernelmesh.ca_bundle")


_F = TypeVar("_F", bound=Callable[..., Any])


def target_option(command: _F) -> _F:
    """--target, --wait and --ca-bundle: where the server is, how long to wait for it
    to answer, and the CAs to trust when it serves TLS."""
    command = click.option(
        "--ca-bundle",
        type=click.Path(exists=True, dir_okay=False),
        envvar="KERNELMESH_CA_BUNDLE",
        show_envvar=True,
        expose_value=False,  # read through _ca_bundle(): no command takes it as an argument
        callback=_remember_ca_bundle,
        help="PEM file of the CAs to trust: talk TLS to a server started with --tls-cert.",
    )(command)
    command = click.option(
        "--wait",
        "wait",
        type=float,
        default=DEFAULT_WAIT,
        show_default=True,
        envvar="KERNELMESH_WAIT",
        show_envvar=True,
        help="Seconds to wait for the server to answer before giving up.",
    )(command)
    return click.option(
        "--target",
        "-t",
        default=DEFAULT_TARGET,
        show_default=True,
        envvar="KERNELMESH_TARGET",
        show_envvar=True,
        help="host:port of a kernelmesh server.",
    )(command)


def _client(
    target: str, wait: float, *, timeout: float = 60.0, tenant: str | None = None
) -> Client:
    """A client for a server that answers, or exit 1 with what to do when none does."""
    ca_bundle = _ca_bundle()
    try:
        reach(
            target,
            wait,
            on_wait=lambda text: click.echo(text, err=True),
            credentials=_tls_credentials(ca_bundle),
        )
    except Unreachable as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    return Client(target, timeout=timeout, tenant=tenant, ca_bundle=ca_bundle)


def _tls_credentials(ca_bundle: str | None) -> grpc.ChannelCredentials | None:
    import grpc

    if ca_bundle is None:
        return None
    with open(ca_bundle, "rb") as handle:
        return grpc.ssl_channel_credentials(handle.read())


def _fail(exc: KernelmeshError) -> None:
    """Prints the status once: the code and message, then each field violation on its
    own line (the server's message already lists them, so it is not repeated)."""
    if exc.violations:
        lines = [f"error: {exc.code.name}: invalid request"]
        lines += [f"  {v.field}: {v.description}" for v in exc.violations]
    else:
        lines = [f"error: {exc.code.name}: {exc.message}"]
    if exc.retry_delay is not None:
        lines.append(f"  retry after {exc.retry_delay:.3g}s")
    click.echo("\n".join(lines), err=True)
    sys.exit(1)


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


@main.command()
@target_option
def devices(target: str, wait: float) -> None:
    """List the devices of the mesh."""
    with _client(target, wait) as km:
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
def ops(target: str, wait: float) -> None:
    """List the op catalog with signatures and devices."""
    with _client(target, wait) as km:
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


def _check_device(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            selector(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


_NPY_MAGIC = b"\x93NUMPY"


def _load_npy(path: str) -> np.ndarray:
    """The array in a .npy file, or a usage error saying what the file is instead."""
    with open(path, "rb") as handle:
        magic = handle.read(len(_NPY_MAGIC))
    if magic.startswith(b"PK"):
        raise click.BadParameter(
            f"{path} is an .npz archive; save each array alone with numpy.save",
            param_hint="'--input' / '-i'",
        )
    if magic != _NPY_MAGIC:
        raise click.BadParameter(
            f"{path} is not a NumPy .npy file (it does not start with the .npy header); "
            "write one with numpy.save(path, array)",
            param_hint="'--input' / '-i'",
        )
    try:
        array: np.ndarray = np.load(path, allow_pickle=False)
        return array
    except (ValueError, OSError, EOFError) as exc:
        raise click.BadParameter(
            f"{path}: the .npy file cannot be read ({exc})", param_hint="'--input' / '-i'"
        ) from None


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
    "--device",
    "-d",
    default=None,
    callback=_check_device,
    help="cpu, opencl, cuda, metal, or a name like cpu:0.",
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
    wait: float,
    op: str,
    inputs: tuple[str, ...],
    params: tuple[str, ...],
    device: str | None,
    output: str | None,
) -> None:
    """Run OP on .npy inputs and print or save the result."""
    arrays = [_load_npy(path) for path in inputs]
    kwargs: dict[str, Any] = dict(_parse_param(p) for p in params)
    with _client(target, wait, timeout=600.0) as km:
        try:
            args = [_send(km, path, a) for path, a in zip(inputs, arrays, strict=True)]
            sent = sum(a.nbytes for a in arrays)
            began = time.perf_counter()
            if sent > ANNOUNCE_ABOVE_BYTES:
                click.echo(f"running {op} on {_mib(sent)} of inputs at {target} ...", err=True)
            info = km.run_task(op, *args, device=device, **kwargs)
        except KernelmeshError as exc:
            _fail(exc)
    result = info.outputs[0]
    if result.nbytes > ANNOUNCE_ABOVE_BYTES:
        click.echo(
            f"received {_mib(result.nbytes)} of result in {time.perf_counter() - began:.1f}s",
            err=True,
        )
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


def _send(km: Client, path: str, array: np.ndarray) -> np.ndarray | TensorRef:
    """Large inputs go up in chunks first, with a line saying so; small ones ride inline."""
    if array.nbytes <= UPLOAD_ABOVE_BYTES:
        return array
    click.echo(f"uploading {path} ({_mib(array.nbytes)}) ...", err=True, nl=False)
    began = time.perf_counter()
    ref = km.upload(array)
    seconds = time.perf_counter() - began
    rate = array.nbytes / (1 << 20) / max(seconds, 1e-9)
    click.echo(f" done in {seconds:.1f}s ({rate:.0f} MiB/s)", err=True)
    return ref


@main.command()
@target_option
@click.option(
    "--warmup-timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds to wait for a reachable server to finish compiling its kernels.",
)
def demo(target: str, wait: float, warmup_timeout: float) -> None:
    """Run every op of the catalog and check each result against NumPy."""
    from kernelmesh.clients.demo import run_demo

    with _client(target, wait, timeout=120.0) as km:
        try:
            _wait_serving(km, target, warmup_timeout)
            ok = run_demo(km, echo=click.echo)
        except KernelmeshError as exc:
            _fail(exc)
    sys.exit(0 if ok else 1)


def _wait_serving(km: Client, target: str, timeout: float) -> None:
    """A server that answers may still be compiling kernels (its first start takes
    tens of seconds); say so while waiting for it to report SERVING."""
    try:
        km.wait_ready(timeout=0.5)
        return
    except DeadlineExceededError:
        pass
    click.echo(
        f"kernelmesh at {target} is warming up (compiling or loading its kernels); "
        f"waiting up to {timeout:g}s for it to report SERVING ...",
        err=True,
    )
    began = time.perf_counter()
    km.wait_ready(timeout=timeout)
    waited = time.perf_counter() - began
    click.echo(f"kernelmesh at {target} is serving (waited {waited:.1f}s)", err=True)


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
    wait: float,
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
    with _client(target, wait, timeout=timeout, tenant=tenant) as km:
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
def models(target: str, wait: float, tenant: str | None) -> None:
    """List models with their deployments' health and circuit-breaker state."""
    with _client(target, wait, tenant=tenant) as km:
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
    target: str,
    wait: float,
    tenant: str | None,
    texts: tuple[str, ...],
    model: str,
    as_json: bool,
) -> None:
    """Embed TEXTS; print each vector's size and norm, and their cosine similarities."""
    with _client(target, wait, tenant=tenant) as km:
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


from kernelmesh.clients.workflow_cli import workflow  # noqa: E402 - it builds on the above

main.add_command(workflow)

from kernelmesh.clients.task_cli import task  # noqa: E402 - it builds on the above

main.add_command(task)


def _orchestrator(
    target: str, wait: float
) -> tuple[grpc.Channel, OrchestratorServiceStub, list[tuple[str, str]]]:
    """A stub for the node RPCs, and the metadata (API key) each call carries."""
    import os

    import grpc

    from kernelmesh.v1 import orchestrator_pb2_grpc

    credentials = _tls_credentials(_ca_bundle())
    try:
        reach(
            target, wait, on_wait=lambda text: click.echo(text, err=True), credentials=credentials
        )
    except Unreachable as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    key = os.environ.get("KERNELMESH_API_KEY")
    metadata = [("authorization", f"Bearer {key}")] if key else []
    channel = (
        grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    )
    return channel, orchestrator_pb2_grpc.OrchestratorServiceStub(channel), metadata


def _rpc_failed(exc: grpc.RpcError) -> NoReturn:
    click.echo(f"error: {exc.code().name}: {exc.details()}", err=True)
    sys.exit(1)


_NODE_STATES = {1: "READY", 2: "DRAINING", 3: "LOST"}


@main.command()
@target_option
@click.option("--json", "as_json", is_flag=True, help="Print the nodes as JSON.")
def nodes(target: str, wait: float, as_json: bool) -> None:
    """List the nodes that joined the orchestrator, with their devices."""
    import grpc
    from google.protobuf import json_format

    from kernelmesh.v1 import orchestrator_pb2

    channel, stub, metadata = _orchestrator(target, wait)
    found = []
    token = ""
    with channel:
        try:
            while True:
                reply = stub.ListNodes(
                    orchestrator_pb2.ListNodesRequest(page_token=token),
                    metadata=metadata,
                    timeout=30,
                )
                found += reply.nodes
                token = reply.next_page_token
                if not token:
                    break
        except grpc.RpcError as exc:
            _rpc_failed(exc)
    if as_json:
        click.echo(json.dumps([json_format.MessageToDict(n) for n in found], indent=2))
        return
    if not found:
        click.echo("no nodes have joined")
    for n in found:
        devices = ", ".join(d.name.partition("/")[2] or d.name for d in n.devices) or "-"
        click.echo(
            f"{n.name.removeprefix('nodes/'):<16} {_NODE_STATES.get(n.state, '?'):<9} "
            f"{n.address:<22} running {n.running:<4} queued {n.queue_depth:<4} {devices}"
        )


@main.command()
@target_option
@click.argument("node")
def drain(target: str, wait: float, node: str) -> None:
    """Stop placing work on NODE; its running work finishes, then it leaves the mesh."""
    import grpc

    from kernelmesh.v1 import orchestrator_pb2

    channel, stub, metadata = _orchestrator(target, wait)
    with channel:
        try:
            reply = stub.DrainNode(
                orchestrator_pb2.DrainNodeRequest(name=node), metadata=metadata, timeout=30
            )
        except grpc.RpcError as exc:
            _rpc_failed(exc)
    click.echo(f"{reply.node.name}: {_NODE_STATES.get(reply.node.state, '?')}")
