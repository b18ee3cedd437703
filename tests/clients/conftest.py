"""Fixtures for the Python client tests: the shared real `kernelmesh serve`
once it reports SERVING, clients bound to it, NumPy references and ports."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest

from kernelmesh.clients import AsyncClient, Client, TaskState

# Big float64 matmuls keep both kernel workers of cpu:0 busy for a while, so a
# task submitted behind them is still queued when it is cancelled.
BUSY_SIZE = 1500
BUSY_MAX_TASKS = 8


@pytest.fixture
def km(served) -> Iterator[Client]:
    with Client(served.target, timeout=30.0) as client:
        yield client


@pytest.fixture
async def akm(served) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(served.target, timeout=30.0) as client:
        yield client


@pytest.fixture
def busy_device(served) -> Iterator[None]:
    """cpu:0 busy with big float64 matmuls: both workers taken and at least
    one more queued behind them. They are cancelled afterwards."""
    with Client(served.target, timeout=60.0) as client:
        # Inputs stay on the server, so submitting is far quicker than running.
        big = client.upload(np.random.default_rng(99).standard_normal((BUSY_SIZE, BUSY_SIZE)))
        handles = []
        try:
            while len(handles) < BUSY_MAX_TASKS:
                handles.append(client.submit("matmul", big, big, device="cpu:0"))
                if len(handles) >= 3 and handles[-1].info().state is TaskState.QUEUED:
                    break
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
