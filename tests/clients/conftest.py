"""Fixtures for the Python client tests: the shared real `kernelmesh serve`
once it reports SERVING, clients bound to it, NumPy references and ports.

Every behaviour is tested on both faces: `face` (and `connect`) are
parametrised over the blocking `Client` and the asyncio `AsyncClient`, seen
through `Face`, which awaits either (the blocking one in a worker thread, so
servers running on the test's own event loop keep serving)."""

from __future__ import annotations

import asyncio
import itertools
import math
import socket
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from kernelmesh.clients import AsyncClient, Client, TaskState


class Awaiting:
    """Any object of either face (a client, its llm, a task handle) whose
    methods are awaited: `await Awaiting(handle, is_async).result(timeout=9)`."""

    def __init__(self, target: object, is_async: bool) -> None:
        self._target = target
        self._is_async = is_async

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._target, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self._is_async:
                return await method(*args, **kwargs)
            return await asyncio.to_thread(method, *args, **kwargs)

        return call


class Face(Awaiting):
    """One client of either face. `await face.run(...)` awaits any client
    method; `face.client` is the client itself (for its streams and
    iterators, read with `collect`, `drain` and `next`)."""

    def __init__(self, client: Client | AsyncClient) -> None:
        self.client = client
        self.is_async = isinstance(client, AsyncClient)
        super().__init__(client, self.is_async)

    @property
    def llm(self) -> Awaiting:
        return Awaiting(self.client.llm, self.is_async)

    def on(self, target: object) -> Awaiting:
        """A handle (or other object) of this face, with awaited methods."""
        return Awaiting(target, self.is_async)

    async def drain(
        self, items: Iterable[Any] | AsyncIterable[Any]
    ) -> tuple[list[Any], Exception | None]:
        """Reads a stream to its end: what it gave, and the error it ended with."""
        got: list[Any] = []
        if isinstance(items, AsyncIterable):
            try:
                async for item in items:
                    got.append(item)
            except Exception as exc:  # returned to the test, which asserts on it
                return got, exc
            return got, None

        def read() -> Exception | None:
            try:
                for item in items:
                    got.append(item)
            except Exception as exc:
                return exc
            return None

        return got, await asyncio.to_thread(read)

    async def collect(self, items: Iterable[Any] | AsyncIterable[Any]) -> list[Any]:
        got, error = await self.drain(items)
        if error is not None:
            raise error
        return got

    async def take(self, items: Iterable[Any] | AsyncIterable[Any], n: int) -> list[Any]:
        """The first n items of a stream or a listing (fewer if it ends first)."""
        if isinstance(items, AsyncIterable):
            got = []
            async for item in items:
                got.append(item)
                if len(got) == n:
                    break
            return got
        return await asyncio.to_thread(lambda: list(itertools.islice(items, n)))

    async def next(self, items: Iterator[Any] | AsyncIterator[Any]) -> Any:
        if isinstance(items, AsyncIterator):
            return await anext(items)
        return await asyncio.to_thread(next, items)

    async def close(self) -> None:
        if isinstance(self.client, AsyncClient):
            await self.client.close()
        else:
            self.client.close()


@pytest.fixture(params=["sync", "async"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Face]]:
    """`connect(target, **options)`: a client of this test's face, closed afterwards."""
    opened: list[Face] = []

    def open_face(target: str, **options: Any) -> Face:
        cls = AsyncClient if request.param == "async" else Client
        face = Face(cls(target, **options))
        opened.append(face)
        return face

    yield open_face
    for face in opened:
        await face.close()


@pytest.fixture
def face(served, connect) -> Face:
    """A client of this test's face on the shared `kernelmesh serve`."""
    return connect(served.target, timeout=30.0)


@pytest.fixture
async def grpc_server() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """`await grpc_server(add_servicers, credentials=None)`: a grpc.aio server
    on a free loopback port, running on the test's loop; returns its target."""
    servers: list[grpc.aio.Server] = []

    async def start(
        add: Callable[[grpc.aio.Server], None],
        credentials: grpc.ServerCredentials | None = None,
    ) -> str:
        server = grpc.aio.server()
        add(server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(grace=None)


# Big float64 matmuls keep both kernel workers of cpu:0 busy for a while, so a
# task submitted behind them is still queued when it is cancelled.
BUSY_SIZE = 2500
BUSY_QUEUED_SECONDS = 10.0
# under the tenant's 4 GiB quota: each queued matmul is charged its output (its
# inputs are the one stored tensor)
BUSY_MAX_TASKS = (3 << 30) // (8 * BUSY_SIZE**2)


@pytest.fixture
def busy_device(served) -> Iterator[None]:
    """cpu:0 busy with big float64 matmuls: both workers taken and, queued behind
    them, up to BUSY_QUEUED_SECONDS of work, counted from a probe matmul's own run
    time (a fixed three queued went stale: on CI they all finished before the
    test's next call). They are cancelled afterwards."""
    with Client(served.target, timeout=60.0) as client:
        # Inputs stay on the server, so submitting is far quicker than running.
        big = client.upload(np.random.default_rng(99).standard_normal((BUSY_SIZE, BUSY_SIZE)))
        handles = []
        try:
            probe = client.submit("matmul", big, big, device="cpu:0")
            seconds = max(probe.wait(timeout=60).run_seconds, 1e-3)
            count = min(BUSY_MAX_TASKS, 2 + 2 * math.ceil(BUSY_QUEUED_SECONDS / seconds))
            while len(handles) < count:
                handles.append(client.submit("matmul", big, big, device="cpu:0"))
            assert handles[-1].info().state is TaskState.QUEUED, "cpu:0 is not busy"
            yield
        finally:
            for handle in handles:
                handle.cancel()
            client.delete(big)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on (bound to port 0, then closed)."""
    return _free_port()


def conv2d_reference(x: np.ndarray, w: np.ndarray, stride: int, padding: int) -> np.ndarray:
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    kh, kw = w.shape[2:]
    oh = (xp.shape[2] - kh) // stride + 1
    ow = (xp.shape[3] - kw) // stride + 1
    windows = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride][:, :, :oh, :ow]
    return np.einsum("nchwij,ocij->nohw", windows.astype(np.float64), w.astype(np.float64))


@pytest.fixture(scope="session")
def conv2d_ref():
    return conv2d_reference
