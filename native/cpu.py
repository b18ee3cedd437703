"""CPU backend: Numba kernels where they beat NumPy on this machine, NumPy where it wins.

`run` takes inputs already validated against the op catalog (``kernelmesh.core.ops``)
and params already normalised. Inputs may be read-only (``np.frombuffer`` on a protobuf
bytes object) and non-contiguous; they are never written, and every output is a fresh
C-contiguous array.

Where each op runs, and why (2-core dev machine, 2**24 elements, against NumPy 2.4):

- add/sub/mul/div/relu/scale/gelu, softmax, transpose: Numba, ``prange`` over both
  cores, writing into ``np.empty``. NumPy runs these on one core: add is 1.2-1.5x
  faster here, relu 1.6-2.3x, softmax 1.5-3x, transpose 2.3-2.7x.
- sum/mean, and max along the innermost axis or all axes: Numba, 1.1-3.5x (NumPy's int32
  sum is slow to widen to int64). max along an outer axis: NumPy, whose SIMD max is 2-4x
  faster than the loop Numba vectorises.
- exp: NumPy. Its SIMD exp on one core keeps up with Numba's scalar exp on two.
- matmul: NumPy's BLAS (OpenBLAS). conv2d: im2col in Numba, then one batched BLAS
  matmul: 35-50 GFLOP/s, against 6 for a parallel direct loop in Numba.
- fft: NumPy's pocketfft, which keeps complex64 in NumPy 2.

Every Numba kernel is compiled twice from one source (see `_Kernel`): parallel, and serial
for small inputs, so a tiny task never pays to wake the thread pool. `warmup` compiles,
or loads from Numba's on-disk cache, every signature `run` uses.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import sys
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numba
import numpy as np
from numba import njit, prange

from kernelmesh.native import cpu_info
from kernelmesh.native.backend import (
    CATALOG_DTYPES,
    Device,
    DeviceProperties,
    OpCall,
    OpFn,
    TensorSpec,
    op_table,
    reduction_plan,
)

__all__ = ["NAME", "SUPPORTED_DTYPES", "CpuDevice", "available", "devices", "run", "warmup"]

NAME = "cpu"

# After a parallel loop, Numba's OpenMP workers spin for their next job (GNU OpenMP's
# default is 300000 spins, milliseconds of a core) and starve the BLAS threads of the
# matmul that follows: conv2d's im2col + matmul ran 40 ms instead of 28. A short spin
# keeps back-to-back kernel launches just as fast. Read when the OpenMP pool starts, so
# only effective before the first parallel launch; the caller's own setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# Every op of the catalog, for every dtype it is defined for.
SUPPORTED_DTYPES: Mapping[str, frozenset[str]] = CATALOG_DTYPES

# error_model="numpy": float division by zero gives inf/nan as in NumPy, instead of
# Numba's default of raising ZeroDivisionError.
_JIT = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}

# Below this many elements a kernel runs its serial twin: waking the pool costs about
# 2 us, and add breaks even near 32 Ki elements. Transcendental kernels repay it sooner.
_PARALLEL_FROM = 1 << 15
_PARALLEL_FROM_HEAVY = 1 << 11


# --------------------------------------------------------------------------
# Kernel plumbing
# --------------------------------------------------------------------------

_launch_lock = threading.Lock()
_serialise_launches = True  # until the first launch shows which threading layer Numba chose


def _launch(kernel: Callable[..., Any], args: tuple) -> Any:
    global _serialise_launches
    if not _serialise_launches:
        return kernel(*args)
    with _launch_lock:
        result = kernel(*args)
        # Numba falls back to its "workqueue" layer when neither TBB nor OpenMP is
        # installed; that layer aborts the process if two threads launch at once.
        _serialise_launches = numba.threading_layer() == "workqueue"
    return result


class _Kernel:
    """One kernel source compiled twice: with ``prange`` spread over the thread pool, and
    serially (``prange`` runs as ``range``) for work too small to repay waking the pool.

    The serial twin is a copy of the function under its own name, so that Numba's
    on-disk cache, which keys entries by qualified name but not by compile flags, keeps
    the two apart.
    """

    instances: list[_Kernel] = []

    def __init__(self, fn: Callable[..., None], parallel_from: int, fastmath: Any) -> None:
        options = {**_JIT, "fastmath": fastmath}
        self.parallel = njit(parallel=True, **options)(fn)
        twin = types.FunctionType(
            fn.__code__, fn.__globals__, f"{fn.__name__}_serial", fn.__defaults__, fn.__closure__
        )
        twin.__qualname__ = f"{fn.__qualname__}_serial"
        twin.__module__ = fn.__module__
        self.serial = njit(**options)(twin)
        self.parallel_from = parallel_from
        _Kernel.instances.append(self)

    def __call__(self, work: int, *args: Any) -> None:
        if work < self.parallel_from:
            self.serial(*args)
        else:
            _launch(self.parallel, args)

    def compile_parallel_like_serial(self) -> None:
        for signature in self.serial.signatures:
            self.parallel.compile(signature)


def _kernel(
    parallel_from: int = _PARALLEL_FROM, fastmath: Any = False
) -> Callable[[Callable[..., None]], _Kernel]:
    return lambda fn: _Kernel(fn, parallel_from, fastmath)


def _kernel_input(x: np.ndarray, shape: int | tuple[int, ...] | None = None) -> np.ndarray:
    """A read-only, aligned, C-contiguous view of x, reshaped if asked (a copy only when
    x is not C-contiguous, aligned and native-endian).

    Kernels only ever see read-only arrays: Numba types read-only and writable arrays
    apart, so one kind halves the signatures to compile.
    """
    flags = x.flags
    if not (flags.c_contiguous and flags.aligned and x.dtype.isnative):
        x = np.array(x, dtype=x.dtype.newbyteorder("="), order="C")
    view = x.view() if shape is None else x.reshape(shape)
    view.flags.writeable = False
    return view


def _flat(x: np.ndarray) -> np.ndarray:
    return _kernel_input(x, -1)


# --------------------------------------------------------------------------
# Elementwise kernels. A one-element operand is a scalar: it is read once,
# outside the loop, so the loop over the other operand vectorises.
# --------------------------------------------------------------------------


@_kernel()
def _add(a, b, out):
    n = out.size
    if a.size == n and b.size == n:
        for i in prange(n):
            out[i] = a[i] + b[i]
    elif b.size == 1:
        s = b[0]
        for i in prange(n):
            out[i] = a[i] + s
    else:
        s = a[0]
        for i in prange(n):
            out[i] = s + b[i]


@_kernel()
def _sub(a, b, out):
    n = out.size
    if a.size == n and b.size == n:
        for i in prange(n):
            out[i] = a[i] - b[i]
    elif b.size == 1:
        s = b[0]
        for i in prange(n):
            out[i] = a[i] - s
    else:
        s = a[0]
        for i in prange(n):
            out[i] = s - b[i]


@_kernel()
def _mul(a, b, out):
    n = out.size
    if a.size == n and b.size == n:
        for i in prange(n):
            out[i] = a[i] * b[i]
    elif b.size == 1:
        s = b[0]
        for i in prange(n):
            out[i] = a[i] * s
    else:
        s = a[0]
        for i in prange(n):
            out[i] = s * b[i]


@_kernel()
def _div(a, b, out):
    n = out.size
    if a.size == n and b.size == n:
        for i in prange(n):
            out[i] = a[i] / b[i]
    elif b.size == 1:
        s = b[0]
        for i in prange(n):
            out[i] = a[i] / s
    else:
        s = a[0]
        for i in prange(n):
            out[i] = s / b[i]


@_kernel()
def _relu(x, out):
    for i in prange(x.size):
        v = x[i]
        # "not v < 0" rather than "v > 0": nan stays nan, as in np.maximum(x, 0)
        out[i] = v if not v < 0 else 0


@_kernel()
def _scale(x, factor, out):
    for i in prange(x.size):
        out[i] = x[i] * factor


_SQRT2 = math.sqrt(2.0)


@_kernel(_PARALLEL_FROM_HEAVY)
def _gelu(x, out):
    for i in prange(x.size):
        # in float64 even for float32: libm's erf is as fast there and exact to float32
        v = np.float64(x[i])
        out[i] = 0.5 * v * (1.0 + math.erf(v / _SQRT2))


# --------------------------------------------------------------------------
# Reductions, over a C-contiguous input seen as (P, R, Q) with R reduced.
# Q == 1 (the reduced axis is innermost, or all axes): "rows" kernels split
# each row into chunks, so one long row still spreads over the pool.
# Q > 1: the "cols" kernel adds whole rows of length Q, which vectorises. max
# over Q > 1 stays with NumPy: LLVM does not vectorise a nan-propagating
# elementwise max here, and NumPy's SIMD one is 2-4x faster than ours.
#
# Loops run over 1-D slices (a row, a chunk) rather than indexing the 2-D or
# 3-D array: inside a prange body that is what lets LLVM vectorise them
# (measured 4x faster for the float32 sum).
# --------------------------------------------------------------------------

_CHUNK = 1 << 14  # elements of one row per parallel task
_QBLOCK = 512  # columns per parallel task


# reassoc only (no nnan/ninf): lets LLVM keep several partial sums in SIMD lanes, the
# same licence NumPy's pairwise sum takes; inf and nan behave as in IEEE arithmetic.
@_kernel(fastmath={"reassoc"})
def _sum_rows(x, out):
    # x (P, R) with R >= 1; out (P,) in the accumulating dtype (float64 or int64)
    rows, n = x.shape
    chunks = (n + _CHUNK - 1) // _CHUNK
    part = np.zeros(rows * chunks, out.dtype)
    for t in prange(rows * chunks):
        r = t // chunks
        lo = (t - r * chunks) * _CHUNK
        chunk = x[r, lo : lo + _CHUNK]
        s = part[t]
        for i in range(chunk.size):
            s += chunk[i]
        part[t] = s
    for r in range(rows):
        # a loop, not part[...].sum(): under parallel=True Numba would launch the pool
        # for every row's .sum()
        s = part[r * chunks]
        for c in range(1, chunks):
            s += part[r * chunks + c]
        out[r] = s


@_kernel()
def _sum_cols(x, out):
    # x (P, R, Q) with R >= 1; out (P, Q) in the accumulating dtype
    planes, n, cols = x.shape
    blocks = (cols + _QBLOCK - 1) // _QBLOCK
    for t in prange(planes * blocks):
        p = t // blocks
        lo = (t - p * blocks) * _QBLOCK
        acc = out[p, lo : lo + _QBLOCK]
        first = x[p, 0, lo : lo + _QBLOCK]
        for q in range(acc.size):
            acc[q] = first[q]
        for r in range(1, n):
            row = x[p, r, lo : lo + _QBLOCK]
            for q in range(acc.size):
                acc[q] += row[q]


@njit(**_JIT)
def _nan_max(values):
    # max that propagates nan, as np.max does; a branch, for short or rare inputs
    m = values[0]
    for v in values:
        if v > m or v != v:
            m = v
    return m


@_kernel()
def _max_rows(x, out):
    # x (P, R) with R >= 1; out (P,) in x's dtype
    rows, n = x.shape
    chunks = (n + _CHUNK - 1) // _CHUNK
    part = np.empty(rows * chunks, out.dtype)
    for t in prange(rows * chunks):
        r = t // chunks
        lo = (t - r * chunks) * _CHUNK
        chunk = x[r, lo : lo + _CHUNK]
        m = chunk[0]
        seen_nan = False
        for i in range(chunk.size):
            v = chunk[i]
            # a select and a flag rather than a branch on nan: the loop vectorises
            m = v if v > m else m
            seen_nan |= v != v
        part[t] = _nan_max(chunk) if seen_nan else m
    for r in range(rows):
        out[r] = _nan_max(part[r * chunks : (r + 1) * chunks])


# --------------------------------------------------------------------------
# softmax, transpose, im2col
# --------------------------------------------------------------------------


# softmax of a large input runs in blocks of rows that stay in cache, each block through
# NumPy's own ufuncs in place (max, subtract, exp, sum, divide): no temporaries, each
# block read from memory once, and NumPy's exp, SIMD on every CPU NumPy supports. A Numba
# loop calling exp cannot match it: LLVM vectorises libm's exp only with Intel's SVML
# (x86 only), and the scalar exp made the fused one-pass Numba kernel 0.45-0.58x NumPy
# on a 2-core Xeon. Threads do not help either: the passes are memory-bound and, on a
# loaded machine, a parallel region waits for its slowest thread.
# Small inputs run one fused serial Numba pass, cheaper than a dozen ufunc calls.
_SOFTMAX_BLOCK_BYTES = 1 << 20
_SOFTMAX_FUSED_BELOW = 1 << 13  # elements


@njit(**_JIT)
def _softmax_small(x, out):
    # x, out (rows, n) with n >= 1
    for r in range(x.shape[0]):
        row, result = x[r], out[r]
        m = _nan_max(row)
        # subtracting the row max keeps exp <= 1: no overflow, whatever the inputs
        total = 0.0
        for j in range(row.size):
            e = math.exp(row[j] - m)
            result[j] = e
            total += e
        inverse = 1.0 / total
        for j in range(row.size):
            result[j] *= inverse


@_kernel()
def _transpose(x, out):
    # Square tiles: each tile's reads and writes both stay within a few cache lines.
    rows, cols = x.shape
    tile = 32
    tiles_down = (rows + tile - 1) // tile
    tiles_across = (cols + tile - 1) // tile
    for t in prange(tiles_down * tiles_across):
        i0 = (t // tiles_across) * tile
        j0 = (t % tiles_across) * tile
        for i in range(i0, min(rows, i0 + tile)):
            for j in range(j0, min(cols, j0 + tile)):
                out[j, i] = x[i, j]


@_kernel()
def _im2col(x, n0, y0, kh, kw, sh, sw, ph, pw, ow, cols):
    # cols[b, (c, i, j), k] = padded x[n0 + b, c, oy * sh + i, ox * sw + j] for output
    # pixel (oy, ox) = divmod(y0 * ow + k, ow): one matmul with the weights then gives
    # every output pixel of the images (or rows of an image) in this tile.
    height, width = x.shape[2], x.shape[3]
    images, window, pixels = cols.shape
    for t in prange(images * window):
        b = t // window
        row = t - b * window
        c, i, j = row // (kh * kw), (row // kw) % kh, row % kw
        image, dest = x[n0 + b, c], cols[b, row]
        # output columns whose input column j + ox * sw - pw lies inside the image; the
        # rest read padding. Bounds per row, not per pixel, keep the copy loop branch-free.
        first = min(ow, max(0, (pw - j + sw - 1) // sw))
        stop = max(first, min(ow, (width - 1 - j + pw) // sw + 1))
        for yy in range(pixels // ow):
            line = dest[yy * ow : (yy + 1) * ow]
            iy = (y0 + yy) * sh + i - ph
            if iy < 0 or iy >= height:
                line[:] = 0
                continue
            source = image[iy]
            line[:first] = 0
            for ox in range(first, stop):
                line[ox] = source[ox * sw + j - pw]
            line[stop:] = 0


# --------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------


def _binary(kernel: _Kernel) -> OpFn:
    def op(call: OpCall) -> np.ndarray:
        a, b = call.inputs
        result = call.out.empty()
        kernel(result.size, _flat(a), _flat(b), result.reshape(-1))
        return result

    return op


def _unary(kernel: _Kernel) -> OpFn:
    def op(call: OpCall) -> np.ndarray:
        result = call.out.empty()
        kernel(result.size, _flat(call.x), result.reshape(-1))
        return result

    return op


def _op_scale(call: OpCall) -> np.ndarray:
    x, result = call.x, call.out.empty()
    # the factor in x's dtype, as NumPy's x * factor computes it for a Python float
    _scale(result.size, _flat(x), x.dtype.type(call.params["factor"]), result.reshape(-1))
    return result


def _op_exp(call: OpCall) -> np.ndarray:
    result = call.out.empty()  # out=: an array even for 0-d x, never a NumPy scalar
    with np.errstate(over="ignore", under="ignore"):  # exp(1000) is inf, as asked
        np.exp(call.x, out=result)
    return result


def _reduce(op: str) -> OpFn:
    return lambda call: _reduction(op, call.x, call.params)


def _reduction(op: str, x: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    # sum and mean accumulate in int64 or float64 (plan.acc_dtype); outputs follow NumPy
    plan = reduction_plan(x, params, op)
    planes, n, cols = plan.planes, plan.n, plan.cols

    if cols == 1:
        acc = np.empty(planes, plan.acc_dtype)
        kernel = _max_rows if op == "max" else _sum_rows
        kernel(x.size, _kernel_input(x, (planes, n)), acc)
    elif op == "max":
        return np.ascontiguousarray(np.max(x, axis=plan.axis, keepdims=plan.keepdims))
    else:
        acc = np.empty((planes, cols), plan.acc_dtype)
        _sum_cols(x.size, _kernel_input(x, (planes, n, cols)), acc)
    if op == "mean":
        acc = acc / n
    return acc.astype(plan.dtype, copy=False).reshape(plan.shape)


def _op_softmax(call: OpCall) -> np.ndarray:
    x, result = call.x, call.out.empty()
    n = x.shape[-1]
    rows = result.size // n
    x2, out2 = _kernel_input(x, (rows, n)), result.reshape(rows, n)
    if result.size < _SOFTMAX_FUSED_BELOW:
        _softmax_small(x2, out2)
        return result
    block = max(1, _SOFTMAX_BLOCK_BYTES // (n * x.itemsize))
    # x - max is inf - inf = nan in a row holding inf, as in NumPy: no warning wanted
    with np.errstate(invalid="ignore", under="ignore"):
        for r0 in range(0, rows, block):
            xb, ob = x2[r0 : r0 + block], out2[r0 : r0 + block]
            np.subtract(xb, xb.max(axis=-1, keepdims=True), out=ob)
            np.exp(ob, out=ob)
            np.divide(ob, ob.sum(axis=-1, keepdims=True), out=ob)
    return result


def _op_matmul(call: OpCall) -> np.ndarray:
    a, b = call.inputs
    return np.ascontiguousarray(np.matmul(a, b))  # a no-op unless NumPy kept a strided layout


def _op_transpose(call: OpCall) -> np.ndarray:
    x = call.x
    if x.T.flags.c_contiguous or not x.flags.c_contiguous:
        # x.T is already laid out in order (a plain copy), or x is a strided view that
        # NumPy reads in one pass; tiling would first need a contiguous copy.
        return np.array(x.T, order="C")  # a copy even when x.T is contiguous
    result = call.out.empty()
    _transpose(x.size, _kernel_input(x), result)
    return result


# Elements of im2col columns built at once: bounds the scratch memory to 128 MiB of
# float64 while keeping each matmul large enough for BLAS to run at full speed.
_IM2COL_BUDGET = 1 << 24


def _op_conv2d(call: OpCall) -> np.ndarray:
    (x, w), g = call.inputs, call.conv2d()
    n, c, h, wd, o, kh, kw, sh, sw, ph, pw, oh, ow = g.astuple()
    window = g.window
    weights = np.ascontiguousarray(w).reshape(o, window)
    out = call.out.empty()
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        # a 1x1 convolution is already a matmul over channels: no im2col needed
        np.matmul(weights, np.ascontiguousarray(x).reshape(n, c, h * wd), out=out.reshape(n, o, -1))
        return out

    xk = _kernel_input(x)
    per_image = window * oh * ow
    if per_image <= _IM2COL_BUDGET:
        # whole images per tile: the matmul writes straight into the output
        images = max(1, _IM2COL_BUDGET // per_image)
        flat_out = out.reshape(n, o, oh * ow)
        for n0 in range(0, n, images):
            tile = min(images, n - n0)
            cols = np.empty((tile, window, oh * ow), x.dtype)
            _im2col(cols.size, xk, n0, 0, kh, kw, sh, sw, ph, pw, ow, cols)
            np.matmul(weights, cols, out=flat_out[n0 : n0 + tile])
    else:
        # one image is too big for the budget: tiles of output rows
        rows = max(1, _IM2COL_BUDGET // (window * ow))
        for b in range(n):
            for y0 in range(0, oh, rows):
                band = min(rows, oh - y0)
                cols = np.empty((1, window, band * ow), x.dtype)
                _im2col(cols.size, xk, b, y0, kh, kw, sh, sw, ph, pw, ow, cols)
                out[b, :, y0 : y0 + band, :] = (weights @ cols[0]).reshape(o, band, ow)
    return out


def _op_fft(call: OpCall) -> np.ndarray:
    x = call.x
    transform = np.fft.ifft if call.params.get("inverse", False) else np.fft.fft
    # C order even for a Fortran-ordered x (pocketfft keeps the input's layout)
    return np.ascontiguousarray(transform(x, axis=-1), dtype=np.complex64)


_ELEMENTWISE: Mapping[str, _Kernel] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "div": _div,
    "relu": _relu,
    "gelu": _gelu,
}
# The elementwise ops that run as _binary/_unary of their kernel (no _op_<name> of
# their own): a planned call of one of these runs its kernel directly (`planned_bare`).
_PLAIN_ELEMENTWISE = {n: k for n, k in _ELEMENTWISE.items() if f"_op_{n}" not in globals()}
_OPS: Mapping[str, OpFn] = op_table(
    globals(),
    lambda name: _binary(_ELEMENTWISE[name]),
    lambda name: _unary(_ELEMENTWISE[name]),
    _reduce,
)


def run(
    op: str,
    inputs: Sequence[np.ndarray],
    params: Mapping[str, Any],
    outputs: Sequence[Any] | None = None,
) -> list[np.ndarray]:
    """Runs one op on validated inputs and normalised params (`CpuDevice.run` of this
    host's device); returns fresh outputs."""
    return _device().run(op, inputs, params, outputs)


def _warmup_calls() -> list[tuple[str, list[np.ndarray], dict[str, Any]]]:
    """Small calls that together reach every kernel with every dtype it runs."""
    calls: list[tuple[str, list[np.ndarray], dict[str, Any]]] = []
    for op, dtypes in SUPPORTED_DTYPES.items():
        for dtype in sorted(dtypes):
            x = np.ones((2, 3), dtype)
            if op in ("add", "sub", "mul", "div"):
                calls.append((op, [x, x], {}))
            elif op == "matmul":
                calls.append((op, [x, x.T.copy()], {}))
            elif op in ("sum", "max", "mean"):
                for axis in (None, 0):  # reduce along rows, and along columns
                    calls.append((op, [x], {"axis": axis, "keepdims": False}))
            elif op == "conv2d":
                image, weights = np.ones((1, 1, 3, 3), dtype), np.ones((1, 1, 2, 2), dtype)
                calls.append((op, [image, weights], {"stride": (1, 1), "padding": (0, 0)}))
            elif op == "scale":
                calls.append((op, [x], {"factor": 2.0}))
            elif op == "fft":
                calls.append((op, [x], {"inverse": False}))
            else:
                calls.append((op, [x], {}))
    return calls


def warmup(progress: Callable[[str], None] | None = None, jobs: int | None = None) -> None:
    """Compiles, or loads from Numba's on-disk cache, every kernel signature `run` uses;
    `progress` hears each step ("sum int64", "_add (parallel)") as it starts.

    Compiling is single-threaded and takes most of a minute on two cores, so when the
    cache is cold (no stamp of a finished warm-up of this source, Numba and CPU) it is
    spread over `jobs` fresh processes that fill the on-disk cache; this process then
    only loads. `kernelmesh warmup` runs this ahead of time. The default,
    ``$KERNELMESH_COMPILE_JOBS`` or half the cores, leaves room for the rest of the
    machine: on a loaded 2-core machine two compiling processes took longer than one."""
    stamp = _warm_stamp()
    if jobs is None:
        default = max(1, (os.cpu_count() or 1) // 2)
        jobs = 1 if stamp.exists() else int(os.environ.get("KERNELMESH_COMPILE_JOBS", default))
    if jobs > 1:
        _compile_in_processes(jobs, progress)
    for op, inputs, params in _warmup_calls():
        if progress is not None:
            progress(f"{op} {inputs[0].dtype.name}")
        run(op, inputs, params)  # small: compiles each serial twin
    for kernel in _Kernel.instances:
        if progress is not None:
            progress(f"{kernel.parallel.__name__} (parallel)")
        kernel.compile_parallel_like_serial()
    with contextlib.suppress(OSError):  # a read-only cache costs a slower warm-up, no more
        stamp.touch()


def warmup_steps() -> int:
    """How many steps `warmup` reports through `progress` (for "12/60" counts)."""
    return len(_warmup_calls()) + len(_Kernel.instances)


def _warm_stamp() -> Path:
    """A file in Numba's cache folder whose presence says a warm-up of exactly this
    source, Numba, Python and CPU finished (Numba keys its own entries likewise)."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for part in (numba.__version__, sys.version, cpu_info.cpu_info().model):
        digest.update(part.encode())
    folder = Path(_add.serial._cache._cache_path)
    return folder / f"kernelmesh-cpu-warm-{digest.hexdigest()[:16]}"


def _compile_ops(ops: Sequence[str]) -> int:
    """In a worker process: compiles (into the on-disk cache) every kernel the warm-up
    calls of `ops` reach, serial and parallel; returns how many calls it made."""
    calls = [call for call in _warmup_calls() if call[0] in ops]
    for op, inputs, params in calls:
        run(op, inputs, params)
    for kernel in _Kernel.instances:
        kernel.compile_parallel_like_serial()
    return len(calls)


def _compile_in_processes(jobs: int, progress: Callable[[str], None] | None) -> None:
    """Fills Numba's cache from `jobs` fresh processes, each compiling a share of the ops
    (spawned, not forked: the caller may be a server with gRPC threads running)."""
    import concurrent.futures
    import multiprocessing

    ops = list(SUPPORTED_DTYPES)
    shares = [ops[i::jobs] for i in range(jobs)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(_compile_ops, share): share for share in shares if share}
        for future in concurrent.futures.as_completed(futures):
            future.result()
            if progress is not None:
                progress(f"compiled {', '.join(futures[future])} in a worker process")


# --------------------------------------------------------------------------
# The backend interface (native/backend.py). The CPU needs no allocator or
# compiler: NumPy owns the memory and Numba compiles (and caches) on its own.
# --------------------------------------------------------------------------


class _ThreadBudget:
    """Shares the usable cores among the CPU ops running at once.

    Each op may start Numba's pool and BLAS's pool, each sized to every core by default,
    and the server runs several ops at once: on 2 cores, two ops of conv2d (im2col in
    Numba, then a BLAS matmul) had 8 threads spinning on 2 cores, and conv2d's BLAS
    matmul on a loaded 2-core machine took 44 ms at median on one thread but 159 ms on
    two (a descheduled worker stalls the others). So with n ops running, each gets
    cores // n Numba threads (a per-thread setting), and BLAS (one process-wide pool) all
    cores for a lone op, one thread once ops overlap. Limits change only when the count
    does, so a lone tiny task pays a counter update and nothing more."""

    def __init__(self, cores: int) -> None:
        self.cores = max(1, cores)
        self.running = 0
        self._lock = threading.Lock()
        self._local = threading.local()  # the Numba thread count to restore, per thread
        self._blas_threads = 0  # as last set; 0: not set yet
        self._blas: Any = None

    def __enter__(self) -> None:
        with self._lock:
            self.running += 1
            running = self.running
            self._limit_blas(self.cores if running == 1 else 1)
        restore = 0
        if running > 1:
            restore = numba.get_num_threads()
            numba.set_num_threads(max(1, min(self.cores // running, restore)))
        self._local.restore = restore

    def __exit__(self, *exc_info: object) -> None:
        if self._local.restore:
            numba.set_num_threads(self._local.restore)
        with self._lock:
            self.running -= 1

    def _limit_blas(self, threads: int) -> None:
        if threads == self._blas_threads:
            return
        if self._blas is None:
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController().select(user_api="blas")
        self._blas.limit(limits=threads)
        self._blas_threads = threads


_budget = _ThreadBudget(cpu_info.cpu_info().threads)
# Calls over fewer elements (inputs and output) skip the budget: below the serial
# kernels' threshold, and below the size at which OpenBLAS splits a matmul across threads.
_BUDGET_FROM = 1 << 14
_UNBUDGETED = contextlib.nullcontext()


class CpuDevice(Device):
    """The host's cores, running the kernels of this module."""

    ops: ClassVar[Mapping[str, OpFn]] = _OPS

    def running(self, call: OpCall) -> contextlib.AbstractContextManager[Any]:
        if not self.needs_running(call.op, call.out.size + sum(x.size for x in call.inputs)):
            return _UNBUDGETED
        return _budget

    def needs_running(self, op: str, elements: int) -> bool:
        # A call this small runs the serial twins (and BLAS's single-threaded small-matrix
        # path): it starts no pool, so it needs no share of the cores, nor the budget's
        # lock, nor a BLAS limit flipped to one thread and back for a few microseconds.
        return elements >= _BUDGET_FROM

    def planned_bare(
        self, op: str, fn: OpFn, params: Mapping[str, Any], out: TensorSpec
    ) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
        # A tiny elementwise call (below the parallel threshold) is what _binary and
        # _unary do, without the OpCall around it and its Python layers: microseconds a
        # tiny RunTask notices.
        kernel = _PLAIN_ELEMENTWISE.get(op)
        if kernel is None or out.size >= kernel.parallel_from:
            return super().planned_bare(op, fn, params, out)
        serial, shape, dtype = kernel.serial, out.shape, out.dtype

        def elementwise(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
            result = np.empty(shape, dtype)
            serial(*[_flat(x) for x in inputs], result.reshape(-1))
            return [result]

        return elementwise

    def memory_available_bytes(self) -> int:
        return cpu_info.memory_available_bytes()

    def warmup(self, progress: Callable[[str], None] | None = None) -> None:
        warmup(progress)

    def warmup_steps(self) -> int:
        return warmup_steps()


def available() -> str | None:
    return None  # NumPy and Numba are dependencies: the CPU backend always runs


@functools.cache
def _device() -> CpuDevice:
    (device,) = devices()
    return device


def devices() -> list[CpuDevice]:
    info = cpu_info.cpu_info()
    properties = DeviceProperties(
        kind=NAME,
        index=0,
        model=info.model,
        vendor=info.vendor,
        driver_version=f"numba-{numba.__version__} numpy-{np.__version__}",
        compute_units=info.cores,
        max_work_group_size=0,
        memory_total_bytes=info.memory_total_bytes,
        supports_fp64=True,
        supports_fp16=False,
        threads=info.threads,
        features=info.features,
        fingerprint=f"{info.model} numba-{numba.__version__}",
    )
    return [CpuDevice(properties, SUPPORTED_DTYPES)]
