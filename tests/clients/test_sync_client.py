"""`kernelmesh.clients.Client` against a real `kernelmesh serve` process."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kernelmesh.clients import (
    CancelledError,
    Client,
    InvalidArgumentError,
    NotFoundError,
    StreamItem,
    TaskState,
    TensorRef,
    UnavailableError,
)

pytestmark = pytest.mark.e2e

rng = np.random.default_rng(2024)


# -- run: results against NumPy -------------------------------------------


def test_run_matmul_matches_numpy(km):
    a = rng.standard_normal((64, 48), dtype=np.float32)
    b = rng.standard_normal((48, 32), dtype=np.float32)
    c = km.run("matmul", a, b)
    assert c.dtype == np.float32 and c.shape == (64, 32)
    np.testing.assert_allclose(c, a @ b, rtol=1e-4, atol=1e-4)


def test_run_sum_along_axis_matches_numpy(km):
    x = rng.standard_normal((30, 40))
    s = km.run("sum", x, axis=1)
    assert s.shape == (30,)
    np.testing.assert_allclose(s, x.sum(axis=1), rtol=1e-12, atol=1e-12)


def test_run_conv2d_with_stride_and_padding_matches_numpy(km, conv2d_ref):
    x = rng.standard_normal((2, 3, 17, 15), dtype=np.float32)
    w = rng.standard_normal((4, 3, 3, 3), dtype=np.float32)
    y = km.run("conv2d", x, w, stride=2, padding=1)
    expected = conv2d_ref(x, w, stride=2, padding=1)
    assert y.dtype == np.float32 and y.shape == expected.shape == (2, 4, 9, 8)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_run_fft_matches_numpy(km):
    x = (rng.standard_normal((4, 256)) + 1j * rng.standard_normal((4, 256))).astype(np.complex64)
    y = km.run("fft", x)
    assert y.dtype == np.complex64 and y.shape == x.shape
    np.testing.assert_allclose(y, np.fft.fft(x), rtol=1e-3, atol=1e-3)


def test_run_returns_writable_arrays(km):
    x = rng.standard_normal(10, dtype=np.float32)
    y = km.run("relu", x)
    assert y.flags.writeable
    y[0] = 42.0  # must not raise
    info = km.run_task("add", x, x)
    assert all(o.flags.writeable for o in info.outputs)


# -- submit: handles --------------------------------------------------------


def test_submit_result_matches_numpy(km):
    a = rng.standard_normal((32, 32), dtype=np.float32)
    handle = km.submit("matmul", a, a)
    assert handle.name.startswith("tasks/")
    np.testing.assert_allclose(handle.result(timeout=30), a @ a, rtol=1e-4, atol=1e-4)


def test_submit_events_end_succeeded(km):
    a = rng.standard_normal((64, 64), dtype=np.float32)
    handle = km.submit("matmul", a, a, labels={"test": "events"})
    events = list(handle.events(timeout=30))
    states = [e.state for e in events]
    assert states[-1] is TaskState.SUCCEEDED
    assert set(states) <= {TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCEEDED}
    assert states == sorted(states)  # never goes backwards
    final = events[-1].task
    assert final is not None and final.labels == {"test": "events"}
    np.testing.assert_allclose(final.outputs[0], a @ a, rtol=1e-4, atol=1e-4)


def test_cancel_queued_task_is_cancelled_and_result_raises(km, busy_device):
    handle = km.submit("relu", np.ones(8, np.float32), device="cpu:0")
    assert handle.info().state is TaskState.QUEUED
    cancelled = handle.cancel()
    assert cancelled.state is TaskState.CANCELLED
    assert handle.info().state is TaskState.CANCELLED
    with pytest.raises(CancelledError):
        handle.result(timeout=30)


def test_cancel_of_finished_task_changes_nothing(km):
    handle = km.submit("relu", np.ones(8, np.float32))
    handle.result(timeout=30)
    assert handle.cancel().state is TaskState.SUCCEEDED


# -- errors -----------------------------------------------------------------


def test_invalid_argument_carries_field_violations(km):
    with pytest.raises(InvalidArgumentError) as info:
        km.run("matmul", np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))
    assert info.value.violations, str(info.value)
    fields = [v.field for v in info.value.violations]
    assert any("inputs[1]" in f for f in fields), fields
    assert all(v.description for v in info.value.violations)


def test_unknown_op_is_invalid_argument_naming_op(km):
    with pytest.raises(InvalidArgumentError) as info:
        km.run("no_such_op", np.ones(3, np.float32))
    assert any(v.field.endswith("op") for v in info.value.violations), info.value.violations


def test_get_unknown_task_is_not_found(km):
    with pytest.raises(NotFoundError):
        km.get_task("tasks/nope")


# -- streaming --------------------------------------------------------------


def test_map_of_500_tiny_tasks_returns_results_in_input_order(km):
    xs = [np.arange(8, dtype=np.float32) - 4 + i for i in range(500)]
    results = km.map("relu", [(x,) for x in xs])
    assert len(results) == 500
    for x, y in zip(xs, results, strict=True):
        np.testing.assert_array_equal(y, np.maximum(x, 0))


def test_stream_yields_each_item_once_with_its_index(km):
    items = [StreamItem("mul", (np.full(4, i, np.float32), np.float32(2.0))) for i in range(100)]
    seen = dict(km.stream(items))
    assert sorted(seen) == list(range(100))
    for i, info in seen.items():
        assert info.state is TaskState.SUCCEEDED
        np.testing.assert_array_equal(info.outputs[0], np.full(4, 2 * i, np.float32))


# -- tensors kept on the server ---------------------------------------------


def test_upload_run_keep_outputs_download_round_trip(km):
    x = rng.standard_normal((300, 200), dtype=np.float32)
    w = rng.standard_normal((200, 50), dtype=np.float32)
    ref = km.upload(x)
    assert isinstance(ref, TensorRef) and ref.name.startswith("tensors/")
    assert (ref.dtype, ref.shape, ref.size_bytes) == ("float32", (300, 200), x.nbytes)

    info = km.run_task("matmul", ref, w, keep_outputs=True)

    assert info.state is TaskState.SUCCEEDED and info.outputs == ()
    (out_ref,) = info.output_refs
    assert (out_ref.dtype, out_ref.shape) == ("float32", (300, 50))
    np.testing.assert_array_equal(km.download(ref), x)
    np.testing.assert_allclose(km.download(out_ref), x @ w, rtol=1e-4, atol=1e-4)
    km.delete(ref)
    km.delete(out_ref)


def test_upload_of_many_chunks_round_trips(km):
    x = rng.standard_normal(600_000)  # 4.8 MB: five 1 MiB chunks
    ref = km.upload(x)
    try:
        np.testing.assert_array_equal(km.download(ref), x)
    finally:
        km.delete(ref)


def test_deleted_tensor_is_not_found(km):
    ref = km.upload(np.ones(4, np.float32))
    km.delete(ref)
    with pytest.raises(NotFoundError):
        km.download(ref)


# -- tenants ----------------------------------------------------------------


def test_tenant_cannot_see_another_tenants_task(served):
    with Client(served.target, tenant="bob") as bob, Client(served.target, tenant="alice") as alice:
        handle = bob.submit("relu", np.ones(4, np.float32))
        handle.result(timeout=30)
        assert bob.get_task(handle.name).tenant == "bob"
        with pytest.raises(NotFoundError):
            alice.get_task(handle.name)
        with pytest.raises(NotFoundError):
            alice.cancel_task(handle.name)


def test_tenant_cannot_read_another_tenants_tensor(served):
    with Client(served.target, tenant="bob") as bob, Client(served.target, tenant="alice") as alice:
        ref = bob.upload(np.ones(4, np.float32))
        try:
            with pytest.raises(NotFoundError):
                alice.download(ref)
        finally:
            bob.delete(ref)


# -- UNAVAILABLE and retries ------------------------------------------------


def test_no_server_raises_unavailable_after_retries(free_port):
    began = time.monotonic()
    with (
        Client(f"127.0.0.1:{free_port}", retries=2, timeout=1) as km,
        pytest.raises(UnavailableError),
    ):
        km.devices()
    assert time.monotonic() - began < 10


def test_client_started_before_the_server_succeeds_once_it_is_up(free_port, serve_tools, tmp_path):
    x = rng.standard_normal(16, dtype=np.float32)
    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            with Client(f"127.0.0.1:{free_port}", retries=25, timeout=2) as km:
                outcome["result"] = km.run("relu", x)
        except Exception as exc:  # reported by the assertions below
            outcome["error"] = exc

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    time.sleep(0.5)
    assert caller.is_alive(), outcome  # still retrying: nothing listens yet
    serve = serve_tools.start_serve(tmp_path, "--port", str(free_port), "--no-warmup")
    try:
        assert serve.port == free_port
        caller.join(60)
        assert not caller.is_alive(), "the client was still retrying after 60 s"
        assert "error" not in outcome, outcome
        np.testing.assert_array_equal(outcome["result"], np.maximum(x, 0))
    finally:
        serve_tools.stop_serve(serve)
