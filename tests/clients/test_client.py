"""Both faces of the Python client (`Client` and `AsyncClient`, parametrised
through the `face` fixture) against a real `kernelmesh serve` process."""

from __future__ import annotations

import asyncio
import inspect
import time

import numpy as np
import pytest

from kernelmesh.clients import (
    AsyncClient,
    AsyncTaskHandle,
    CancelledError,
    Client,
    InvalidArgumentError,
    NotFoundError,
    StreamItem,
    TaskHandle,
    TaskState,
    TensorRef,
    UnavailableError,
)
from kernelmesh.clients.llm import LLM, AsyncLLM

pytestmark = pytest.mark.e2e

rng = np.random.default_rng(2024)


# -- run: results against NumPy -------------------------------------------


async def test_run_matmul_matches_numpy(face):
    a = rng.standard_normal((64, 48), dtype=np.float32)
    b = rng.standard_normal((48, 32), dtype=np.float32)
    c = await face.run("matmul", a, b)
    assert c.dtype == np.float32 and c.shape == (64, 32)
    np.testing.assert_allclose(c, a @ b, rtol=1e-4, atol=1e-4)


async def test_run_sum_along_axis_matches_numpy(face):
    x = rng.standard_normal((30, 40))
    s = await face.run("sum", x, axis=1)
    assert s.shape == (30,)
    np.testing.assert_allclose(s, x.sum(axis=1), rtol=1e-12, atol=1e-12)


async def test_run_conv2d_with_stride_and_padding_matches_numpy(face, conv2d_ref):
    x = rng.standard_normal((2, 3, 17, 15), dtype=np.float32)
    w = rng.standard_normal((4, 3, 3, 3), dtype=np.float32)
    y = await face.run("conv2d", x, w, stride=2, padding=1)
    expected = conv2d_ref(x, w, stride=2, padding=1)
    assert y.dtype == np.float32 and y.shape == expected.shape == (2, 4, 9, 8)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


async def test_run_fft_matches_numpy(face):
    x = (rng.standard_normal((4, 256)) + 1j * rng.standard_normal((4, 256))).astype(np.complex64)
    y = await face.run("fft", x)
    assert y.dtype == np.complex64 and y.shape == x.shape
    np.testing.assert_allclose(y, np.fft.fft(x), rtol=1e-3, atol=1e-3)


async def test_run_fft_of_real_float32_is_complex64(face):
    x = rng.standard_normal((3, 128), dtype=np.float32)
    y = await face.run("fft", x)
    assert y.dtype == np.complex64 and y.shape == x.shape
    np.testing.assert_allclose(y, np.fft.fft(x), rtol=1e-3, atol=1e-3)


async def test_run_returns_writable_arrays(face):
    x = rng.standard_normal(10, dtype=np.float32)
    y = await face.run("relu", x)
    assert y.flags.writeable
    y[0] = 42.0  # must not raise
    info = await face.run_task("add", x, x)
    assert all(o.flags.writeable for o in info.outputs)


async def test_concurrent_runs_all_match(face):
    xs = [rng.standard_normal((16, 16), dtype=np.float32) for _ in range(20)]
    ys = await asyncio.gather(*(face.run("matmul", x, x) for x in xs))
    for x, y in zip(xs, ys, strict=True):
        np.testing.assert_allclose(y, x @ x, rtol=1e-4, atol=1e-4)


async def test_ops_and_devices_list_the_catalog(face):
    ops = {op.name: op for op in await face.ops()}
    assert {"matmul", "relu", "sum", "conv2d", "fft"} <= set(ops)
    assert ops["matmul"].num_inputs == 2 and "float32" in ops["matmul"].dtypes
    devices = {d.name: d for d in await face.devices()}
    assert devices["cpu:0"].kind == "cpu"


# -- submit: handles --------------------------------------------------------


async def test_submit_result_matches_numpy(face):
    a = rng.standard_normal((32, 32), dtype=np.float32)
    handle = await face.submit("matmul", a, a)
    assert isinstance(handle, AsyncTaskHandle if face.is_async else TaskHandle)
    assert handle.name.startswith("tasks/")
    result = await face.on(handle).result(timeout=30)
    np.testing.assert_allclose(result, a @ a, rtol=1e-4, atol=1e-4)


async def test_submit_events_end_succeeded(face):
    a = rng.standard_normal((64, 64), dtype=np.float32)
    handle = await face.submit("matmul", a, a, labels={"test": "events"})
    events = await face.collect(handle.events(timeout=30))
    states = [e.state for e in events]
    assert states[-1] is TaskState.SUCCEEDED
    assert set(states) <= {TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCEEDED}
    assert states == sorted(states)  # never goes backwards
    final = events[-1].task
    assert final is not None and final.labels == {"test": "events"}
    np.testing.assert_allclose(final.outputs[0], a @ a, rtol=1e-4, atol=1e-4)


async def test_wait_returns_the_finished_task(face):
    handle = await face.submit("relu", np.full(4, -1.0, np.float32))
    info = await face.on(handle).wait(timeout=30)
    assert info.state is TaskState.SUCCEEDED and info.name == handle.name
    np.testing.assert_array_equal(info.outputs[0], np.zeros(4, np.float32))


async def test_list_tasks_pages_through_the_newest_first(face):
    names = []
    for _ in range(7):
        handle = await face.submit("relu", np.ones(4, np.float32))
        await face.on(handle).result(timeout=30)
        names.append(handle.name)
    # Pages of 3: the 7 newest come back over three pages, newest first.
    listed = await face.take(face.client.list_tasks(state=TaskState.SUCCEEDED, page_size=3), 7)
    assert [t.name for t in listed] == names[::-1]
    assert all(t.state is TaskState.SUCCEEDED for t in listed)


async def test_cancel_queued_task_is_cancelled_and_result_raises(face, busy_device):
    handle = face.on(await face.submit("relu", np.ones(8, np.float32), device="cpu:0"))
    assert (await handle.info()).state is TaskState.QUEUED
    assert (await handle.cancel()).state is TaskState.CANCELLED
    assert (await handle.info()).state is TaskState.CANCELLED
    with pytest.raises(CancelledError):
        await handle.result(timeout=30)


async def test_cancel_of_finished_task_changes_nothing(face):
    handle = face.on(await face.submit("relu", np.ones(8, np.float32)))
    await handle.result(timeout=30)
    assert (await handle.cancel()).state is TaskState.SUCCEEDED


# -- errors -----------------------------------------------------------------


async def test_invalid_argument_carries_field_violations(face):
    with pytest.raises(InvalidArgumentError) as info:
        await face.run("matmul", np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))
    assert info.value.violations, str(info.value)
    fields = [v.field for v in info.value.violations]
    assert any("inputs[1]" in f for f in fields), fields
    assert all(v.description for v in info.value.violations)


async def test_unknown_op_is_invalid_argument_naming_op(face):
    with pytest.raises(InvalidArgumentError) as info:
        await face.run("no_such_op", np.ones(3, np.float32))
    assert any(v.field.endswith("op") for v in info.value.violations), info.value.violations


async def test_get_unknown_task_is_not_found(face):
    with pytest.raises(NotFoundError):
        await face.get_task("tasks/nope")


async def test_unknown_device_kind_is_refused_before_sending(face):
    with pytest.raises(ValueError, match="unknown device kind"):
        await face.run("relu", np.ones(3, np.float32), device="tpu")


# -- streaming --------------------------------------------------------------


async def test_map_of_500_tiny_tasks_returns_results_in_input_order(face):
    xs = [np.arange(8, dtype=np.float32) - 4 + i for i in range(500)]
    results = await face.map("relu", [(x,) for x in xs])
    assert len(results) == 500
    for x, y in zip(xs, results, strict=True):
        np.testing.assert_array_equal(y, np.maximum(x, 0))


async def test_stream_yields_each_item_once_with_its_index(face):
    items = [StreamItem("mul", (np.full(4, i, np.float32), np.float32(2.0))) for i in range(100)]
    seen = dict(await face.collect(face.client.stream(items)))
    assert sorted(seen) == list(range(100))
    for i, info in seen.items():
        assert info.state is TaskState.SUCCEEDED
        np.testing.assert_array_equal(info.outputs[0], np.full(4, 2 * i, np.float32))


async def test_map_raises_for_the_first_failed_item(face):
    good = (np.ones(3, np.float32), np.ones(3, np.float32))
    bad = (np.ones(3, np.float32), np.ones(4, np.float32))
    with pytest.raises(InvalidArgumentError, match="item 1"):
        await face.map("add", [good, bad, good])


# -- tensors kept on the server ---------------------------------------------


async def test_upload_run_keep_outputs_download_round_trip(face):
    x = rng.standard_normal((300, 200), dtype=np.float32)
    w = rng.standard_normal((200, 50), dtype=np.float32)
    ref = await face.upload(x)
    assert isinstance(ref, TensorRef) and ref.name.startswith("tensors/")
    assert (ref.dtype, ref.shape, ref.size_bytes) == ("float32", (300, 200), x.nbytes)

    info = await face.run_task("matmul", ref, w, keep_outputs=True)

    assert info.state is TaskState.SUCCEEDED and info.outputs == ()
    (out_ref,) = info.output_refs
    assert (out_ref.dtype, out_ref.shape) == ("float32", (300, 50))
    np.testing.assert_array_equal(await face.download(ref), x)
    np.testing.assert_allclose(await face.download(out_ref), x @ w, rtol=1e-4, atol=1e-4)
    await face.delete(ref)
    await face.delete(out_ref.name)


async def test_upload_of_many_chunks_round_trips(face):
    x = rng.standard_normal(1_500_000)  # 12 MB: three 4 MiB chunks
    ref = await face.upload(x)
    try:
        np.testing.assert_array_equal(await face.download(ref), x)
    finally:
        await face.delete(ref)


async def test_deleted_tensor_is_not_found(face):
    ref = await face.upload(np.ones(4, np.float32))
    await face.delete(ref)
    with pytest.raises(NotFoundError):
        await face.download(ref)


async def test_submitted_task_with_kept_outputs_results_in_refs(face):
    handle = await face.submit("relu", np.full(3, -2.0, np.float32), keep_outputs=True)
    (ref,) = await face.on(handle).result(timeout=30)
    assert isinstance(ref, TensorRef)
    np.testing.assert_array_equal(await face.download(ref), np.zeros(3, np.float32))
    await face.delete(ref)


# -- tenants ----------------------------------------------------------------


async def test_tenant_cannot_see_another_tenants_task(served, connect):
    bob, alice = connect(served.target, tenant="bob"), connect(served.target, tenant="alice")
    handle = await bob.submit("relu", np.ones(4, np.float32))
    await bob.on(handle).result(timeout=30)
    assert (await bob.get_task(handle.name)).tenant == "bob"
    with pytest.raises(NotFoundError):
        await alice.get_task(handle.name)
    with pytest.raises(NotFoundError):
        await alice.cancel_task(handle.name)


async def test_tenant_cannot_read_another_tenants_tensor(served, connect):
    bob, alice = connect(served.target, tenant="bob"), connect(served.target, tenant="alice")
    ref = await bob.upload(np.ones(4, np.float32))
    try:
        with pytest.raises(NotFoundError):
            await alice.download(ref)
    finally:
        await bob.delete(ref)


# -- UNAVAILABLE and retries ------------------------------------------------


async def test_no_server_raises_unavailable_after_retries(free_port, connect):
    km = connect(f"127.0.0.1:{free_port}", retries=2, timeout=1)
    began = time.monotonic()
    with pytest.raises(UnavailableError):
        await km.devices()
    assert time.monotonic() - began < 10


async def test_client_started_before_the_server_succeeds_once_it_is_up(
    free_port, serve_tools, tmp_path, connect
):
    x = rng.standard_normal(16, dtype=np.float32)
    # Each try is refused at once while nothing listens; the timeout bounds the
    # first call the fresh server answers (kernels loaded on first use, no warmup).
    km = connect(f"127.0.0.1:{free_port}", retries=25, timeout=15)
    call = asyncio.ensure_future(km.run("relu", x))
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


# -- the two faces have one surface ---------------------------------------------


def _public(cls: type) -> dict[str, object]:
    return {n: m for n, m in inspect.getmembers(cls) if not n.startswith("_")}


@pytest.mark.parametrize(
    ("blocking", "awaiting"),
    [(Client, AsyncClient), (TaskHandle, AsyncTaskHandle), (LLM, AsyncLLM)],
)
def test_each_method_has_the_same_parameters_on_both_faces(blocking, awaiting):
    """README: "AsyncClient has the same surface for asyncio"."""
    sync_api, async_api = _public(blocking), _public(awaiting)
    assert sorted(sync_api) == sorted(async_api)
    for name, method in sync_api.items():
        if callable(method):
            sync_params = inspect.signature(method).parameters
            async_params = inspect.signature(async_api[name]).parameters
            assert list(sync_params) == list(async_params), name
            for param, spec in sync_params.items():
                assert spec.default == async_params[param].default, (name, param)
