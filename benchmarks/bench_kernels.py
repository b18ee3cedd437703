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

Rates are from the fastest of the repeats (the median is printed beside it); ratio =
ours / baseline, above 1 is faster than the baseline.
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


def timed(
    fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None
) -> list[float]:
    fn()  # warm: compiles, first-touch page faults, pools
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


@dataclass(frozen=True)
class Row:
    backend: str
    workload: str
    unit: str
    best: float
    median: float
    baseline_name: str
    baseline: float

    @property
    def ratio(self) -> float:
        return self.best / self.baseline if self.baseline else float("nan")


def say(text: str = "") -> None:
    print(text, flush=True)


def print_row(row: Row) -> None:
    say(
        f"  {row.backend:10} {row.workload:30} {row.best:9.2f} {row.median:9.2f} {row.unit:8}"
        f" {row.baseline:9.2f} {row.baseline_name:10} {row.ratio:7.2f}x"
    )


def header() -> None:
    say(
        f"  {'backend':10} {'op':30} {'best':>9} {'median':>9} {'unit':8}"
        f" {'baseline':>9} {'(name)':10} {'ratio':>8}"
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
        if item.op == "matmul":
            a, b = (cupy.asarray(x) for x in item.inputs)
            seconds = timed(lambda a=a, b=b: cupy.matmul(a, b), repeats, sync)
            baseline = item.work / min(seconds) / 1e9
            name = "cuBLAS"
        elif item.op == "add":
            a = cupy.asarray(item.inputs[0])
            seconds = timed(lambda a=a: a.copy(), repeats, sync)
            # a copy moves 8 bytes per element; add moves 12: compare bandwidths
            baseline = 8 * item.inputs[0].size / min(seconds) / 1e9
            name = "d2d copy"
        else:
            continue
        ours = timed(lambda item=item: backend.run(item.op, item.inputs, item.params), repeats)
        rate = item.work / min(ours) / 1e9
        rows.append(
            Row(
                backend.name,
                f"{item.op} {item.label}",
                item.unit,
                rate,
                item.work / float(np.median(ours)) / 1e9,
                name,
                baseline,
            )
        )
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
    say(f"{repeats} repeats; best and median of each; ratio = best / NumPy's best")
    found = backends()
    items = workloads(only)

    baselines, references = {}, {}
    for item in items:
        seconds = timed(item.numpy, repeats)
        baselines[item.op] = item.work / min(seconds) / 1e9
        references[item.op] = np.asarray(item.numpy())

    say()
    header()
    rows: list[Row] = []
    for backend in found:
        for item in items:
            seconds = timed(lambda b=backend, i=item: b.run(i.op, i.inputs, i.params), repeats)
            row = Row(
                backend.name,
                f"{item.op} {item.label}",
                item.unit,
                item.work / min(seconds) / 1e9,
                item.work / float(np.median(seconds)) / 1e9,
                "NumPy",
                baselines[item.op],
            )
            rows.append(row)
            print_row(row)
            check(backend, item, references[item.op])
        if backend.name.startswith("cuda"):
            for row in cuda_baselines(backend, items, repeats):
                rows.append(row)
                print_row(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
