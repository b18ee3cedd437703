"""`kernelmesh.clients.AsyncClient` against a real `kernelmesh serve` process."""

from __future__ import annotations

import asyncio
import inspect
import time

import numpy as np
import pytest

from kernelmesh.clients import (
    AsyncClient,
    CancelledError,
    Client,
    InvalidArgumentError,
    NotFoundError,
    StreamItem,
    TaskState,
    UnavailableError,
)

pytestmark = pytest.mark.e2e

rng = np.random.default_rng(4048)


# -- run: results against NumPy -------------------------------------------


async def test_async_run_matmul_matches_numpy(akm):
    a = rng.standard_normal((64, 48), dtype=np.float32)
    b = rng.standard_normal((48, 32), dtype=np.float32)
    c = await akm.run("matmul", a, b)
    assert c.dtype == np.float32 and c.shape == (64, 32)
    np.testing.assert_allclose(c, a @ b, rtol=1e-4, atol=1e-4)


async def test_async_run_sum_along_axis_matches_numpy(akm):
    x = rng.standard_normal((30, 40))
    s = await akm.run("sum", x, axis=0)
    assert s.shape == (40,)
    np.testing.assert_allclose(s, x.sum(axis=0), rtol=1e-12, atol=1e-12)


async def test_async_run_conv2d_with_stride_and_padding_matches_numpy(akm, conv2d_ref):
    x = rng.standard_normal((1, 2, 12, 12), dtype=np.float32)
    w = rng.standard_normal((3, 2, 5, 5), dtype=np.float32)
    y = await akm.run("conv2d", x, w, stride=1, padding=2)
    expected = conv2d_ref(x, w, stride=1, padding=2)
    assert y.dtype == np.float32 and y.shape == expected.shape == (1, 3, 12, 12)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


async def test_async_run_fft_of_real_float32_matches_numpy(akm):
    x = rng.standard_normal((3, 128), dtype=np.float32)  # taken as real, result complex64
    y = await akm.run("fft", x)
    assert y.dtype == np.complex64 and y.shape == x.shape
    np.testing.assert_allclose(y, np.fft.fft(x), rtol=1e-3, atol=1e-3)


async def test_async_run_returns_writable_arrays(akm):
    y = await akm.run("relu", rng.standard_normal(10, dtype=np.float32))
    assert y.flags.writeable
    y[0] = 42.0


async def test_async_concurrent_runs_all_match(akm):
    xs = [rng.standard_normal((16, 16), dtype=np.float32) for _ in range(20)]
    ys = await asyncio.gather(*(akm.run("matmul", x, x) for x in xs))
    for x, y in zip(xs, ys, strict=True):
        np.testing.assert_allclose(y, x @ x, rtol=1e-4, atol=1e-4)


# -- submit: handles --------------------------------------------------------


async def test_async_submit_result_matches_numpy(akm):
    a = rng.standard_normal((32, 32), dtype=np.float32)
    handle = await akm.submit("matmul", a, a)
    assert handle.name.startswith("tasks/")
    np.testing.assert_allclose(await handle.result(timeout=30), a @ a, rtol=1e-4, atol=1e-4)


async def test_async_submit_events_end_succeeded(akm):
    a = rng.standard_normal((64, 64), dtype=np.float32)
    handle = await akm.submit("matmul", a, a)
    states = [e.state async for e in handle.events(timeout=30)]
    assert states[-1] is TaskState.SUCCEEDED
    assert states == sorted(states)


async def test_async_cancel_queued_task_is_cancelled_and_result_raises(akm, busy_device):
    handle = await akm.submit("relu", np.ones(8, np.float32), device="cpu:0")
    assert (await handle.info()).state is TaskState.QUEUED
    assert (await handle.cancel()).state is TaskState.CANCELLED
    with pytest.raises(CancelledError):
        await handle.result(timeout=30)


# -- errors -----------------------------------------------------------------


async def test_async_invalid_argument_carries_field_violations(akm):
    with pytest.raises(InvalidArgumentError) as info:
        await akm.run("matmul", np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))
    fields = [v.field for v in info.value.violations]
    assert any("inputs[1]" in f for f in fields), fields


async def test_async_get_unknown_task_is_not_found(akm):
    with pytest.raises(NotFoundError):
        await akm.get_task("tasks/nope")


# -- streaming --------------------------------------------------------------


async def test_async_stream_of_500_tiny_tasks_covers_every_input(akm):
    xs = [np.arange(8, dtype=np.float32) - 4 + i for i in range(500)]
    done = {i: info async for i, info in akm.stream(StreamItem("relu", (x,)) for x in xs)}
    assert sorted(done) == list(range(500))
    for i, x in enumerate(xs):
        assert done[i].state is TaskState.SUCCEEDED
        np.testing.assert_array_equal(done[i].outputs[0], np.maximum(x, 0))


# -- the same surface as Client -------------------------------------------------


def test_async_client_has_the_sync_clients_surface():
    """README: "AsyncClient has the same surface for asyncio"."""
    public = {n for n, _ in inspect.getmembers(Client) if not n.startswith("_")}
    missing = sorted(n for n in public if not hasattr(AsyncClient, n))
    assert missing == [], f"AsyncClient lacks {missing}"


# -- tenants ----------------------------------------------------------------


async def test_async_tenant_cannot_see_another_tenants_task(served):
    async with (
        AsyncClient(served.target, tenant="bob") as bob,
        AsyncClient(served.target, tenant="alice") as alice,
    ):
        handle = await bob.submit("relu", np.ones(4, np.float32))
        await handle.result(timeout=30)
        assert (await bob.get_task(handle.name)).tenant == "bob"
        with pytest.raises(NotFoundError):
            await alice.get_task(handle.name)


# -- UNAVAILABLE and retries ------------------------------------------------


async def test_async_no_server_raises_unavailable_after_retries(free_port):
    began = time.monotonic()
    async with AsyncClient(f"127.0.0.1:{free_port}", retries=2, timeout=1) as km:
        with pytest.raises(UnavailableError):
            await km.devices()
    assert time.monotonic() - began < 10


async def test_async_client_started_before_the_server_succeeds_once_it_is_up(
    free_port, serve_tools, tmp_path
):
    x = rng.standard_normal(16, dtype=np.float32)
    async with AsyncClient(f"127.0.0.1:{free_port}", retries=25, timeout=2) as km:
        call = asyncio.create_task(km.run("relu", x))
        await asyncio.sleep(0.5)
        if call.done():  # it should still be retrying: nothing listens yet
            call.result()  # raises whatever ended it early
            pytest.fail("the call returned before any server was up")
        serve = await asyncio.to_thread(
            serve_tools.start_serve, tmp_path, "--port", str(free_port), "--no-warmup"
        )
        try:
            assert serve.port == free_port
            y = await asyncio.wait_for(call, 60)
            np.testing.assert_array_equal(y, np.maximum(x, 0))
        finally:
            await asyncio.to_thread(serve_tools.stop_serve, serve)
