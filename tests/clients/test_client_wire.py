"""What each face puts on the wire and how it reads the answers, against small
in-test grpc.aio servers on loopback: paging, idempotent submissions, the API
key, TLS and mTLS, deadlines and cancellation."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kernelmesh.clients import (
    CancelledError,
    DeadlineExceededError,
    StreamItem,
    TaskState,
    UnavailableError,
)
from kernelmesh.v1 import (
    device_pb2,
    device_pb2_grpc,
    llm_pb2,
    llm_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

# -- a fake mesh that records what it was sent ---------------------------------------


@dataclass
class Seen:
    """What the fake servers received."""

    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    page_tokens: dict[str, list[str]] = field(default_factory=dict)
    request_ids: list[str] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def call(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.metadata[method] = {k: v for k, v in context.invocation_metadata() or ()}

    def page(self, method: str, token: str) -> str:
        """Two pages: "" answers page one and names "page-2"; "page-2" is the last."""
        self.page_tokens.setdefault(method, []).append(token)
        return "page-2" if token == "" else ""


def _task(name: str, state: int = task_pb2.TASK_STATE_SUCCEEDED) -> task_pb2.Task:
    return task_pb2.Task(name=name, op="relu", state=state)


class Tasks(task_pb2_grpc.TaskServiceServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen
        self.unavailable_once: set[str] = set()

    async def ListOps(self, request, context):
        self.seen.call("ListOps", context)
        following = self.seen.page("ListOps", request.page_token)
        op = task_pb2.Op(name=f"op-{'b' if request.page_token else 'a'}", num_inputs=1)
        return task_pb2.ListOpsResponse(ops=[op], next_page_token=following)

    async def ListTasks(self, request, context):
        self.seen.call("ListTasks", context)
        following = self.seen.page("ListTasks", request.page_token)
        page = "2" if request.page_token else "1"
        return task_pb2.ListTasksResponse(
            tasks=[_task(f"tasks/{page}a"), _task(f"tasks/{page}b")], next_page_token=following
        )

    async def RunTask(self, request, context):
        self.seen.call("RunTask", context)
        if request.task.op == "slow":
            await asyncio.sleep(30)
        return task_pb2.RunTaskResponse(task=_task("tasks/run"))

    async def SubmitTask(self, request, context):
        self.seen.call("SubmitTask", context)
        self.seen.request_ids.append(request.request_id)
        if request.task.op == "flaky" and request.request_id not in self.unavailable_once:
            # The first attempt is lost as if the connection dropped.
            self.unavailable_once.add(request.request_id)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        return task_pb2.SubmitTaskResponse(task=_task(f"tasks/{request.request_id}", 1))

    async def WatchTask(self, request, context):
        self.seen.call("WatchTask", context)
        try:
            yield task_pb2.WatchTaskResponse(name=request.name, state=task_pb2.TASK_STATE_RUNNING)
            yield task_pb2.WatchTaskResponse(
                name=request.name, state=task_pb2.TASK_STATE_SUCCEEDED, task=_task(request.name)
            )
            # The stream stays open: a client that has what it waited for cancels it.
            await asyncio.sleep(30)
        except (asyncio.CancelledError, GeneratorExit):
            # A cancel that lands while a reply is being written closes the
            # handler (GeneratorExit) instead of cancelling its task.
            self.seen.cancelled.set()
            raise

    async def StreamTasks(self, request_iterator, context):
        self.seen.call("StreamTasks", context)
        async for request in request_iterator:
            yield task_pb2.StreamTasksResponse(
                correlation_id=request.correlation_id, task=_task("tasks/streamed")
            )

    async def UploadTensor(self, request_iterator, context):
        self.seen.call("UploadTensor", context)
        async for _ in request_iterator:
            pass
        return task_pb2.UploadTensorResponse()


class Devices(device_pb2_grpc.DeviceServiceServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def ListDevices(self, request, context):
        self.seen.call("ListDevices", context)
        following = self.seen.page("ListDevices", request.page_token)
        name = "cpu:1" if request.page_token else "cpu:0"
        device = device_pb2.Device(name=name, kind=device_pb2.DEVICE_KIND_CPU)
        return device_pb2.ListDevicesResponse(devices=[device], next_page_token=following)


class Models(llm_pb2_grpc.LLMServiceServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def Generate(self, request, context):
        self.seen.call("Generate", context)
        return llm_pb2.GenerateResponse(message=llm_pb2.ChatMessage(content="hi"))

    async def GenerateStream(self, request, context):
        self.seen.call("GenerateStream", context)
        try:
            for i in range(1000):
                yield llm_pb2.GenerateStreamResponse(delta=f"t{i} ")
                await asyncio.sleep(0.02)
        except (asyncio.CancelledError, GeneratorExit):  # as in WatchTask
            self.seen.cancelled.set()
            raise

    async def ListModels(self, request, context):
        self.seen.call("ListModels", context)
        following = self.seen.page("ListModels", request.page_token)
        name = "m2" if request.page_token else "m1"
        return llm_pb2.ListModelsResponse(
            models=[llm_pb2.Model(name=name)], next_page_token=following
        )


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def Watch(self, request, context):
        self.seen.call("Health.Watch", context)
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        await asyncio.sleep(30)


@pytest.fixture
def seen() -> Seen:
    return Seen()


def _mesh(seen: Seen) -> Callable[[grpc.aio.Server], None]:
    def add(server: grpc.aio.Server) -> None:
        task_pb2_grpc.add_TaskServiceServicer_to_server(Tasks(seen), server)
        device_pb2_grpc.add_DeviceServiceServicer_to_server(Devices(seen), server)
        llm_pb2_grpc.add_LLMServiceServicer_to_server(Models(seen), server)
        health_pb2_grpc.add_HealthServicer_to_server(Health(seen), server)

    return add


@pytest.fixture
async def mesh(grpc_server, seen) -> str:
    """The fake mesh's target."""
    return await grpc_server(_mesh(seen))


async def _wait_for(event: asyncio.Event, seconds: float = 10.0) -> bool:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


# -- paging ---------------------------------------------------------------------------


async def test_ops_devices_and_models_read_every_page(mesh, seen, connect):
    km = connect(mesh)
    assert [op.name for op in await km.ops()] == ["op-a", "op-b"]
    assert [d.name for d in await km.devices()] == ["cpu:0", "cpu:1"]
    assert [m.name for m in await km.llm.models()] == ["m1", "m2"]
    for method in ("ListOps", "ListDevices", "ListModels"):
        assert seen.page_tokens[method] == ["", "page-2"], method


async def test_list_tasks_fetches_the_next_page_only_when_read(mesh, seen, connect):
    km = connect(mesh)
    tasks = km.client.list_tasks(state=TaskState.SUCCEEDED)
    first_two = await km.take(tasks, 2)
    assert [t.name for t in first_two] == ["tasks/1a", "tasks/1b"]
    assert seen.page_tokens["ListTasks"] == [""]
    rest = await km.collect(tasks)
    assert [t.name for t in rest] == ["tasks/2a", "tasks/2b"]
    assert seen.page_tokens["ListTasks"] == ["", "page-2"]


# -- idempotent submissions -------------------------------------------------------------


async def test_submit_sends_a_fresh_uuid4_request_id(mesh, seen, connect):
    km = connect(mesh)
    first = await km.submit("relu", np.ones(2, np.float32))
    second = await km.submit("relu", np.ones(2, np.float32))
    ids = seen.request_ids
    assert len(ids) == 2 and ids[0] != ids[1]
    assert all(uuid.UUID(i).version == 4 for i in ids)
    assert (first.name, second.name) == (f"tasks/{ids[0]}", f"tasks/{ids[1]}")


async def test_a_retried_submit_keeps_its_request_id(mesh, seen, connect):
    km = connect(mesh, retries=3)
    handle = await km.submit("flaky", np.ones(2, np.float32))
    assert len(seen.request_ids) == 2  # the lost attempt and its retry
    assert seen.request_ids[0] == seen.request_ids[1]
    assert handle.name == f"tasks/{seen.request_ids[0]}"


async def test_submit_sends_the_callers_request_id(mesh, seen, connect):
    km = connect(mesh)
    await km.submit("relu", np.ones(2, np.float32), request_id="order-42")
    assert seen.request_ids == ["order-42"]


# -- the API key ----------------------------------------------------------------------


async def _every_kind_of_call(km) -> None:
    """A unary call, a server stream, a bidirectional stream, a client stream,
    an LLM call and a health watch."""
    await km.run("relu", np.ones(2, np.float32))
    assert len(await km.take(km.client.watch_task("tasks/x"), 2)) == 2
    await km.collect(km.client.stream([StreamItem("relu", (np.ones(2, np.float32),))]))
    await km.upload(np.ones(2, np.float32))
    await km.llm.generate("hi")
    await km.wait_ready(timeout=10)


CALLS = ("RunTask", "WatchTask", "StreamTasks", "UploadTensor", "Generate", "Health.Watch")


async def test_api_key_is_sent_as_a_bearer_token_on_every_call(mesh, seen, connect):
    await _every_kind_of_call(connect(mesh, api_key="k-123", tenant="acme"))
    for method in CALLS:
        assert seen.metadata[method]["authorization"] == "Bearer k-123", method
        assert seen.metadata[method]["kernelmesh-tenant"] == "acme", method


async def test_api_key_defaults_to_the_environment(mesh, seen, connect, monkeypatch):
    monkeypatch.setenv("KERNELMESH_API_KEY", "k-env")
    await _every_kind_of_call(connect(mesh))
    for method in CALLS:
        assert seen.metadata[method]["authorization"] == "Bearer k-env", method


async def test_no_api_key_sends_no_authorization(mesh, seen, connect, monkeypatch):
    monkeypatch.setenv("KERNELMESH_API_KEY", "k-env")
    await _every_kind_of_call(connect(mesh, api_key=""))
    for method in CALLS:
        assert "authorization" not in seen.metadata[method], method


# -- deadlines and cancellation ----------------------------------------------------------


async def test_a_call_past_its_timeout_is_deadline_exceeded(mesh, connect):
    km = connect(mesh)
    began = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await km.run("slow", np.ones(2, np.float32), timeout=0.3)
    assert time.monotonic() - began < 5


async def test_wait_returns_at_the_final_event_and_cancels_the_watch(mesh, seen, connect):
    km = connect(mesh)
    handle = km.on(await km.submit("relu", np.ones(2, np.float32)))
    info = await handle.wait(timeout=20)
    assert info.state is TaskState.SUCCEEDED
    assert await _wait_for(seen.cancelled), "the server's WatchTask was never cancelled"


async def test_cancelling_a_token_stream_ends_it_on_both_sides(mesh, seen, connect):
    km = connect(mesh)
    stream = km.client.llm.stream("go")
    chunks = aiter(stream) if km.is_async else iter(stream)
    assert await km.next(chunks) == "t0 "
    stream.cancel()
    rest, error = await km.drain(chunks)
    assert isinstance(error, CancelledError), error
    assert len(rest) < 10
    assert await _wait_for(seen.cancelled), "the server's GenerateStream was never cancelled"


async def test_closing_a_watch_early_cancels_it_on_the_server(mesh, seen, connect):
    km = connect(mesh)
    events = km.client.watch_task("tasks/x")
    assert (await km.next(events)).state is TaskState.RUNNING
    if km.is_async:
        await events.aclose()
    else:
        events.close()
    assert await _wait_for(seen.cancelled), "the server's WatchTask was never cancelled"
    assert await km.collect(events) == []


async def test_a_stream_cancelled_before_reading_never_starts(mesh, seen, connect):
    km = connect(mesh)
    stream = km.client.llm.stream("go")
    stream.cancel()
    received, error = await km.drain(stream)
    assert (received, type(error)) == ([], CancelledError)
    assert "GenerateStream" not in seen.metadata


async def test_wait_ready_returns_once_serving(mesh, seen, connect):
    km = connect(mesh)
    await km.wait_ready(timeout=10)
    assert "Health.Watch" in seen.metadata


# -- TLS --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: bytes
    server_key: bytes
    client_cert: Path
    client_key: Path
    ca_pem: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca_cert = _cert("kernelmesh test CA", ca_key, None, ca_key, ca=True)
    server_key, client_key = _key(), _key()
    server_cert = _cert("127.0.0.1", server_key, ca_cert.subject, ca_key, server=True)
    client_cert = _cert("a client", client_key, ca_cert.subject, ca_key)
    pem = serialization.Encoding.PEM
    paths = {name: directory / f"{name}.pem" for name in ("ca", "client", "client-key")}
    paths["ca"].write_bytes(ca_cert.public_bytes(pem))
    paths["client"].write_bytes(client_cert.public_bytes(pem))
    paths["client-key"].write_bytes(_pem_key(client_key))
    return Pki(
        ca=paths["ca"],
        server_cert=server_cert.public_bytes(pem),
        server_key=_pem_key(server_key),
        client_cert=paths["client"],
        client_key=paths["client-key"],
        ca_pem=ca_cert.public_bytes(pem),
    )


@pytest.fixture
async def tls_mesh(grpc_server, seen, pki) -> str:
    creds = grpc.ssl_server_credentials([(pki.server_key, pki.server_cert)])
    return await grpc_server(_mesh(seen), creds)


@pytest.fixture
async def mtls_mesh(grpc_server, seen, pki) -> str:
    creds = grpc.ssl_server_credentials(
        [(pki.server_key, pki.server_cert)],
        root_certificates=pki.ca_pem,
        require_client_auth=True,
    )
    return await grpc_server(_mesh(seen), creds)


async def test_tls_with_a_ca_bundle_connects(tls_mesh, pki, connect):
    km = connect(tls_mesh, ca_bundle=pki.ca, api_key="k-tls")
    assert [op.name for op in await km.ops()] == ["op-a", "op-b"]


async def test_tls_sends_the_api_key_inside_the_channel(tls_mesh, seen, pki, connect):
    await connect(tls_mesh, ca_bundle=str(pki.ca), api_key="k-tls").ops()
    assert seen.metadata["ListOps"]["authorization"] == "Bearer k-tls"


@pytest.mark.parametrize(
    "options",
    [{}, {"tls": True}],
    ids=["plaintext-client", "system-roots-only"],
)
async def test_tls_server_refuses_a_client_that_cannot_verify_it(tls_mesh, connect, options):
    km = connect(tls_mesh, retries=1, timeout=5, **options)
    with pytest.raises(UnavailableError):
        await km.ops()


async def test_mtls_with_a_client_certificate_connects(mtls_mesh, pki, connect):
    km = connect(
        mtls_mesh, ca_bundle=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key
    )
    assert [d.name for d in await km.devices()] == ["cpu:0", "cpu:1"]


async def test_mtls_refuses_a_client_without_a_certificate(mtls_mesh, pki, connect):
    km = connect(mtls_mesh, ca_bundle=pki.ca, retries=1, timeout=5)
    with pytest.raises(UnavailableError):
        await km.devices()


def test_a_client_certificate_needs_its_key(pki):
    from kernelmesh.clients import Client

    with pytest.raises(ValueError, match="both client_cert and client_key"):
        Client("127.0.0.1:1", client_cert=pki.client_cert)
