"""`kernelmesh demo`: real work against a running server, each result checked
against NumPy, with timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from kernelmesh.clients.client import Client, StreamItem
from kernelmesh.clients.types import TaskState


@dataclass
class Case:
    op: str
    inputs: tuple[np.ndarray, ...]
    params: dict[str, Any]
    expected: np.ndarray
    rtol: float = 1e-4
    atol: float = 1e-4


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf, sqrt

    out: np.ndarray = (0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))).astype(x.dtype)
    return out


def _conv2d(x: np.ndarray, w: np.ndarray, stride: int, padding: int) -> np.ndarray:
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    _, _, h, wd = xp.shape
    _, _, kh, kw = w.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    windows = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride][:, :, :oh, :ow]
    out: np.ndarray = np.einsum("nchwij,ocij->nohw", windows, w).astype(x.dtype)
    return out


def cases(rng: np.random.Generator) -> list[Case]:
    f32 = np.float32
    a = rng.standard_normal((512, 512), dtype=f32)
    b = rng.standard_normal((512, 512), dtype=f32)
    batch_a = rng.standard_normal((8, 64, 32), dtype=f32)
    batch_b = rng.standard_normal((8, 32, 48), dtype=f32)
    v = rng.standard_normal(1 << 20, dtype=f32)
    w = rng.standard_normal(1 << 20, dtype=f32)
    positive = rng.uniform(0.5, 2.0, 1 << 20).astype(f32)
    logits = rng.standard_normal((256, 1000)).astype(np.float64)
    img = rng.standard_normal((2, 3, 32, 32), dtype=f32)
    kernel = rng.standard_normal((8, 3, 3, 3), dtype=f32)
    sig = (rng.standard_normal((16, 1024)) + 1j * rng.standard_normal((16, 1024))).astype(
        np.complex64
    )
    ints = rng.integers(-1000, 1000, size=(100, 300), dtype=np.int32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    softmax = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    return [
        Case("matmul", (a, b), {}, a @ b, rtol=1e-3, atol=1e-3),
        Case("matmul", (batch_a, batch_b), {}, batch_a @ batch_b, rtol=1e-3, atol=1e-3),
        Case("add", (v, w), {}, v + w),
        Case("sub", (v, w), {}, v - w),
        Case("mul", (v, np.array(3.0, dtype=f32)), {}, v * np.float32(3.0)),
        Case("div", (v, positive), {}, v / positive, rtol=1e-5, atol=1e-5),
        Case("scale", (v,), {"factor": 0.5}, v * np.float32(0.5)),
        Case("relu", (v,), {}, np.maximum(v, 0)),
        Case("gelu", (v[:4096],), {}, _gelu(v[:4096])),
        Case("exp", (v[:4096],), {}, np.exp(v[:4096])),
        Case("softmax", (logits,), {}, softmax, rtol=1e-9, atol=1e-12),
        Case("sum", (ints,), {"axis": 1}, ints.sum(axis=1)),
        Case("mean", (a,), {"axis": 0}, a.mean(axis=0), atol=1e-5),
        Case("max", (a,), {}, np.asarray(a.max())),
        Case("transpose", (a,), {}, a.T),
        Case(
            "conv2d",
            (img, kernel),
            {"stride": 1, "padding": 1},
            _conv2d(img, kernel, 1, 1),
            rtol=1e-3,
            atol=1e-3,
        ),
        Case("fft", (sig,), {}, np.fft.fft(sig).astype(np.complex64), rtol=1e-3, atol=1e-2),
    ]


def _close(got: np.ndarray, case: Case) -> tuple[bool, float]:
    if got.shape != case.expected.shape:
        return False, float("inf")
    err = float(np.max(np.abs(got - case.expected))) if got.size else 0.0
    return bool(np.allclose(got, case.expected, rtol=case.rtol, atol=case.atol)), err


def run_demo(km: Client, *, echo: Callable[[str], None]) -> bool:
    """Runs the demo against a server that reports SERVING; prints a line per step as
    it goes. True when every result matched NumPy."""
    devices = km.devices()
    for d in devices:
        echo(f"device {d.name}: {d.model} ({d.compute_units} cores, {d.kind})")
    rng = np.random.default_rng(0)
    ok = True
    all_cases = cases(rng)
    missing = sorted({op.name for op in km.ops()} - {case.op for case in all_cases})
    echo(
        f"every op of the catalog ({len(all_cases)} cases), then pinned, batched and streamed work:"
        if not missing
        else f"{len(all_cases)} cases; not covered by this demo: {', '.join(missing)}"
    )
    echo(
        f"{'op':<10} {'inputs':<28} {'device':<8} {'kernel ms':>10} {'round trip ms':>14}  "
        f"{'max |err|':>10}  check"
    )
    for case in all_cases:
        began = time.perf_counter()
        info = km.run_task(case.op, *case.inputs, **case.params)
        trip = (time.perf_counter() - began) * 1e3
        good, err = _close(info.outputs[0], case)
        ok &= good
        shapes = " ".join("x".join(map(str, x.shape)) or "()" for x in case.inputs)
        echo(
            f"{case.op:<10} {shapes:<28} {info.device:<8} {info.run_seconds * 1e3:>10.3f} "
            f"{trip:>14.3f}  {err:>10.2e}  {'ok' if good else 'MISMATCH'}"
        )

    # The same ops pinned to each device in turn (placement alone picks the fastest).
    a = rng.standard_normal((256, 192), dtype=np.float32)
    b = rng.standard_normal((192, 128), dtype=np.float32)
    for d in devices:
        info = km.run_task("matmul", a, b, device=d.name)
        good = info.device == d.name and bool(
            np.allclose(info.outputs[0], a @ b, rtol=1e-3, atol=1e-3)
        )
        ok &= good
        echo(
            f"matmul 256x192x128 pinned to {d.name:<10} ran on {info.device:<10} "
            f"{info.run_seconds * 1e3:8.3f} ms: {'ok' if good else 'MISMATCH'}"
        )

    # Queued work: submit a batch, then collect the results.
    mats = [rng.standard_normal((256, 256), dtype=np.float32) for _ in range(8)]
    began = time.perf_counter()
    handles = [km.submit("matmul", m, m, labels={"demo": "batch"}) for m in mats]
    results = [cast(np.ndarray, h.result()) for h in handles]  # one output each, not kept
    batch_ok = all(
        np.allclose(r, m @ m, rtol=1e-3, atol=1e-3) for r, m in zip(results, mats, strict=True)
    )
    ok &= batch_ok
    echo(
        f"submitted {len(mats)} matmul 256x256 tasks and collected them in "
        f"{(time.perf_counter() - began) * 1e3:.1f} ms: {'ok' if batch_ok else 'MISMATCH'}"
    )

    # Pipelined tiny tasks over one StreamTasks call.
    n = 2000
    xs = [rng.standard_normal(16, dtype=np.float32) for _ in range(n)]
    began = time.perf_counter()
    done = dict(km.stream(StreamItem("relu", (x,)) for x in xs))
    seconds = time.perf_counter() - began
    stream_ok = len(done) == n and all(
        done[i].state is TaskState.SUCCEEDED
        and np.array_equal(done[i].outputs[0], np.maximum(xs[i], 0))
        for i in range(n)
    )
    ok &= stream_ok
    echo(
        f"streamed {n} tiny relu tasks in {seconds * 1e3:.1f} ms "
        f"({n / seconds:,.0f} tasks/s): {'ok' if stream_ok else 'MISMATCH'}"
    )
    echo("demo: all results match NumPy" if ok else "demo: SOME RESULTS DID NOT MATCH")
    return ok
