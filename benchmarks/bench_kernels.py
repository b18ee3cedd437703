"""Kernel throughput per backend, each op next to NumPy measured in the same run.

    python benchmarks/bench_kernels.py                 # full run (a few minutes)
    python benchmarks/bench_kernels.py --quick         # smoke run (fewer repeats)
    python benchmarks/bench_kernels.py --only matmul,fft

Backends: cpu (always), every OpenCL device (when `kernelmesh.native.opencl` finds
one), every CUDA device (when `kernelmesh.native.cuda` imports and finds a GPU).

Ops (names for --only), all float32 or complex64:

  matmul   1024 x 1024 @ 1024 x 1024                GFLOP/s, 2 n^3 flops
  add      16 Mi elements                            GB/s, 12 bytes per element
  sum      16 Mi elements, all axes                  GB/s, 4 bytes per element
  softmax  4096 x 1024, last axis                    GB/s, 8 bytes per element
  conv2d   x 8x64x56x56, w 64x64x3x3, padding 1      GFLOP/s, 2 N O OH OW C KH KW flops
  fft      2**20 points                              GFLOP/s, 5 n log2 n flops

Every figure is a backend's `run` end to end, as a task pays it: for a device backend
that includes copying inputs to the device and outputs back. The baseline is NumPy on
the host (OpenBLAS for matmul, pocketfft for fft; conv2d as a sliding-window view
contracted with np.tensordot). On CUDA, matmul is also set against cuBLAS through
`cupy.matmul` and add against a device-to-device copy (`cupy.ndarray.copy`): both
device-resident, so they bound what the kernels alone could reach.

Ours and the baseline run alternately, call for call, so both see the same machine (a
loaded machine slows both alike). Each row prints the best and the median rate of both,
the ratio of bests and the ratio of medians (ours / baseline, above 1 is faster), the
target and PASS or MISS: every CPU op must reach 1.0x NumPy at best and at median; on
CUDA, matmul 0.7x cuBLAS and add 0.8x a device-to-device copy. Rows without a target
(OpenCL against NumPy) are for information.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernelmesh.native import cpu

OPS = ("matmul", "add", "sum", "softmax", "conv2d", "fft")


@dataclass(frozen=True)
class Workload:
    op: str
    label: str
    inputs: list[np.ndarray]
    params: dict[str, Any]
    work: float  # flops or bytes of one call
    unit: str  # "GFLOP/s" or "GB/s"
    numpy: Callable[[], Any]  # the baseline computing the same result


def _conv2d_numpy(x: np.ndarray, w: np.ndarray, padding: int) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    kh, kw = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))
    # windows: (N, C, OH, OW, KH, KW) . w: (O, C, KH, KW) -> (N, OH, OW, O)
    out = np.tensordot(windows, w, axes=([1, 4, 5], [1, 2, 3]))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def workloads(only: Sequence[str]) -> list[Workload]:
    # each baseline binds its arrays as default arguments: a closure would see the names
    # rebound by the next workload
    rng = np.random.default_rng(0)
    made: list[Workload] = []
    if "matmul" in only:
        n = 1024
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        made.append(
            Workload(
                "matmul", f"{n}x{n} f32", [a, b], {}, 2 * n**3, "GFLOP/s", lambda a=a, b=b: a @ b
            )
        )
    if "add" in only:
        n = 16 << 20
        a, b = (rng.standard_normal(n, dtype=np.float32) for _ in range(2))
        made.append(Workload("add", "16Mi f32", [a, b], {}, 12 * n, "GB/s", lambda a=a, b=b: a + b))
    if "sum" in only:
        n = 16 << 20
        x = rng.standard_normal(n, dtype=np.float32)
        made.append(
            Workload(
                "sum",
                "16Mi f32",
                [x],
                {"axis": None, "keepdims": False},
                4 * n,
                "GB/s",
                lambda x=x: x.sum(dtype=np.float64),  # the same float64 accumulation as ours
            )
        )
    if "softmax" in only:
        x = rng.standard_normal((4096, 1024), dtype=np.float32)

        def softmax(x: np.ndarray = x) -> np.ndarray:
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)

        made.append(Workload("softmax", "4096x1024 f32", [x], {}, 8 * x.size, "GB/s", softmax))
    if "conv2d" in only:
        x = rng.standard_normal((8, 64, 56, 56), dtype=np.float32)
        w = rng.standard_normal((64, 64, 3, 3), dtype=np.float32)
        flops = 2 * 8 * 64 * 56 * 56 * 64 * 9
        params = {"stride": (1, 1), "padding": (1, 1)}
        made.append(
            Workload(
                "conv2d",
                "8x64x56x56*64x64x3x3",
                [x, w],
                params,
                flops,
                "GFLOP/s",
                lambda x=x, w=w: _conv2d_numpy(x, w, 1),
            )
        )
    if "fft" in only:
        n = 1 << 20
        x = (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(np.complex64)
        made.append(
            Workload(
                "fft",
                "2^20 c64",
                [x],
                {"inverse": False},
                5 * n * math.log2(n),
                "GFLOP/s",
                lambda x=x: np.fft.fft(x),
            )
        )
    return made


def timed_pair(
    ours: Callable[[], Any],
    baseline: Callable[[], Any],
    repeats: int,
    sync: Callable[[], None] = lambda: None,
) -> tuple[list[float], list[float]]:
    """Seconds of each call of `ours` and of `baseline`, run alternately, which one goes
    first swapping every repeat (the second of a pair ran 1-3% faster on a 2-core
    machine: its caches and the BLAS threads were warm from the first)."""
    times: tuple[list[float], list[float]] = ([], [])
    for fn in (ours, baseline):
        fn()  # warm: compiles, first-touch page faults, pools
        sync()
    pairs = list(zip((ours, baseline), times, strict=True))
    for i in range(repeats):
        for fn, seconds in pairs if i % 2 == 0 else pairs[::-1]:
            start = time.perf_counter()
            fn()
            sync()
            seconds.append(time.perf_counter() - start)
    return times


@dataclass(frozen=True)
class Row:
    backend: str
    workload: str
    unit: str
    best: float
    median: float
    baseline_name: str
    baseline_best: float
    baseline_median: float
    target: float | None  # the ratio both best and median must reach; None: no target

    @classmethod
    def of(
        cls,
        backend: str,
        item: Workload,
        times: tuple[list[float], list[float]],
        baseline_name: str,
        baseline_work: float,
        target: float | None,
    ) -> Row:
        ours, base = times
        return cls(
            backend,
            f"{item.op} {item.label}",
            item.unit,
            item.work / min(ours) / 1e9,
            item.work / float(np.median(ours)) / 1e9,
            baseline_name,
            baseline_work / min(base) / 1e9,
            baseline_work / float(np.median(base)) / 1e9,
            target,
        )

    @property
    def ratio_best(self) -> float:
        return self.best / self.baseline_best

    @property
    def ratio_median(self) -> float:
        return self.median / self.baseline_median

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "-"
        return "PASS" if min(self.ratio_best, self.ratio_median) >= self.target else "MISS"


def say(text: str = "") -> None:
    print(text, flush=True)


def print_row(row: Row) -> None:
    target = "-" if row.target is None else f"{row.target:.1f}x"
    say(
        f"  {row.backend:10} {row.workload:28} {row.best:8.2f} {row.median:8.2f} {row.unit:8}"
        f" {row.baseline_name:9} {row.baseline_best:8.2f} {row.baseline_median:8.2f}"
        f" {row.ratio_best:6.2f}x {row.ratio_median:6.2f}x {target:>6} {row.verdict}"
    )


def header() -> None:
    say(
        f"  {'backend':10} {'op':28} {'best':>8} {'median':>8} {'unit':8} {'baseline':9}"
        f" {'best':>8} {'median':>8} {'r.best':>7} {'r.med':>7} {'target':>6} verdict"
    )


# -- backends ----------------------------------------------------------------


@dataclass
class Backend:
    name: str
    run: Callable[[str, list[np.ndarray], Mapping[str, Any]], list[np.ndarray]]
    device: Any = None  # a backend.Device, for the device-only baselines


def backends() -> list[Backend]:
    found = [Backend("cpu", cpu.run)]
    try:
        from kernelmesh.native import opencl
    except ImportError as exc:
        say(f"opencl: skipped ({exc})")
    else:
        reason = opencl.available()
        if reason:
            say(f"opencl: skipped ({reason})")
        for device in opencl.devices():
            device.warmup()
            say(f"{device.name}: {device.properties.model} ({device.properties.driver_version})")
            found.append(Backend(device.name, device.run, device))
    try:
        from kernelmesh.native import cuda  # written alongside, same interface
    except Exception as exc:  # absent, or CUDA libraries missing: skip that section
        say(f"cuda: skipped ({type(exc).__name__}: {exc})")
    else:
        reason = cuda.available()
        if reason:
            say(f"cuda: skipped ({reason})")
        else:
            for device in cuda.devices():
                device.warmup()
                say(f"{device.name}: {device.properties.model}")
                found.append(Backend(device.name, device.run, device))
    return found


def cuda_baselines(backend: Backend, items: list[Workload], repeats: int) -> list[Row]:
    """matmul against cuBLAS (cupy.matmul), add against a device-to-device copy."""
    try:
        import cupy
    except ImportError as exc:
        say(f"  {backend.name}: no device-resident baselines (cupy: {exc})")
        return []
    rows = []
    sync = cupy.cuda.Device().synchronize
    for item in items:
        ours = lambda item=item: backend.run(item.op, item.inputs, item.params)  # noqa: E731
        if item.op == "matmul":
            a, b = (cupy.asarray(x) for x in item.inputs)
            times = timed_pair(ours, lambda a=a, b=b: cupy.matmul(a, b), repeats, sync)
            rows.append(Row.of(backend.name, item, times, "cuBLAS", item.work, 0.7))
        elif item.op == "add":
            a = cupy.asarray(item.inputs[0])
            times = timed_pair(ours, lambda a=a: a.copy(), repeats, sync)
            # a copy moves 8 bytes per element; add moves 12: compare bandwidths
            work = 8 * item.inputs[0].size
            rows.append(Row.of(backend.name, item, times, "d2d copy", work, 0.8))
    return rows


def check(backend: Backend, item: Workload, want: np.ndarray) -> None:
    """A fast wrong answer is no result: each backend's output is checked against NumPy's."""
    (got,) = backend.run(item.op, item.inputs, item.params)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-3 * scale):
        say(f"  !! {backend.name} {item.op}: output differs from NumPy's")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument(
        "--only", default=",".join(OPS), help=f"comma-separated ops of: {', '.join(OPS)}"
    )
    args = parser.parse_args(argv)
    only = [op.strip() for op in args.only.split(",") if op.strip()]
    unknown = sorted(set(only) - set(OPS))
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    repeats = 3 if args.quick else 10

    host = platform.processor() or platform.machine()
    say(f"kernelmesh kernel benchmark on {host} ({os.cpu_count()} cpus), NumPy {np.__version__}")
    say(
        f"{repeats} repeats, ours and the baseline alternately; best and median of each; "
        "r.best = best / baseline's best, r.med = median / baseline's median"
    )
    found = backends()
    items = workloads(only)
    references = {item.op: np.asarray(item.numpy()) for item in items}

    say()
    header()
    rows: list[Row] = []
    for backend in found:
        # every CPU op must match NumPy on the same machine; devices are for information
        target = 1.0 if backend.name == "cpu" else None
        for item in items:
            ours = lambda b=backend, i=item: b.run(i.op, i.inputs, i.params)  # noqa: E731
            times = timed_pair(ours, item.numpy, repeats)
            row = Row.of(backend.name, item, times, "NumPy", item.work, target)
            rows.append(row)
            print_row(row)
            check(backend, item, references[item.op])
        if backend.name.startswith("cuda"):
            for row in cuda_baselines(backend, items, repeats):
                rows.append(row)
                print_row(row)
    missed = [row for row in rows if row.verdict == "MISS"]
    say()
    say(f"threads: {thread_report()}")
    say(
        f"{len(rows) - len(missed)} of {len(rows)} rows pass or have no target; MISS: {len(missed)}"
    )
    return 0


def thread_report() -> str:
    """Numba's threading layer and thread count, and each BLAS/OpenMP pool's (threadpoolctl),
    since oversubscription between them is what makes CPU timings swing."""
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = "not started"
    parts = [f"numba {numba.get_num_threads()} ({layer})"]
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return parts[0] + "; threadpoolctl not installed"
    for pool in threadpool_info():
        name = pool.get("internal_api", "?")
        kernel = pool.get("architecture") or pool.get("threading_layer") or ""
        parts.append(f"{name} {pool.get('num_threads')} {kernel}".strip())
    return ", ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
