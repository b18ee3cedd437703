"""CPU backend: Numba kernels where they beat NumPy on this machine, NumPy where it wins.

`run` takes inputs already validated against the op catalog (``kernelmesh.core.ops``)
and params already normalised. Inputs may be read-only (``np.frombuffer`` on a protobuf
bytes object) and non-contiguous; they are never written, and every output is freshly
allocated.

Where each op runs, and why (measured on the 2-core dev machine, 2**24 elements):

- elementwise add/sub/mul/div/relu/scale/gelu, reductions, softmax, transpose, im2col:
  Numba, ``prange`` over both cores. NumPy's ufuncs and reductions run on one core, and
  its int32 sum widens to int64 slowly; a parallel loop writing into ``np.empty`` wins
  (about 1.5x for add, 2x or more for sums).
- exp: NumPy. Its SIMD exp on one core keeps up with Numba's scalar exp on two.
- matmul and conv2d's product: NumPy's BLAS (OpenBLAS), far ahead of any Numba loop.
- fft: NumPy's pocketfft, which keeps complex64 in NumPy 2.

Every kernel is compiled twice from one source (see `_Kernel`): a parallel version, and a
serial one for small inputs, so a tiny task costs well under a microsecond of kernel
overhead instead of waking the thread pool. `warmup` compiles, or loads from Numba's
on-disk cache, every signature `run` uses.
"""

from __future__ import annotations

import math
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numba
import numpy as np
from numba import njit, prange

__all__ = ["SUPPORTED_DTYPES", "run", "warmup"]

_FLOATS = frozenset({"float32", "float64"})
_NUMERIC = frozenset({"float32", "float64", "int32"})

SUPPORTED_DTYPES: Mapping[str, frozenset[str]] = types.MappingProxyType(
    {
        "add": _NUMERIC,
        "sub": _NUMERIC,
        "mul": _NUMERIC,
        "div": _FLOATS,
        "relu": _NUMERIC,
        "gelu": _FLOATS,
        "exp": _FLOATS,
        "scale": _FLOATS,
        "sum": _NUMERIC,
        "max": _NUMERIC,
        "mean": _NUMERIC,
        "softmax": _FLOATS,
        "matmul": _FLOATS,
        "transpose": frozenset({"float32", "float64", "int32", "complex64"}),
        "conv2d": _FLOATS,
        "fft": frozenset({"complex64", "float32"}),
    }
)

# error_model="numpy": float division by zero gives inf/nan as in NumPy, instead of
# Numba's default of raising ZeroDivisionError.
_JIT = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}

# Below this much work a kernel runs serially: waking the pool costs about 2 us, as much
# as adding 32 Ki floats on one core. Transcendental kernels repay it sooner.
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
# Q > 1: "cols" kernels add whole rows of length Q, which vectorises.
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
    part = np.empty(rows * chunks, out.dtype)
    for t in prange(rows * chunks):
        r = t // chunks
        lo = (t - r * chunks) * _CHUNK
        part[t] = 0
        s = part[t]  # zero in the accumulating dtype
        for i in range(lo, min(n, lo + _CHUNK)):
            s += x[r, i]
        part[t] = s
    for r in range(rows):
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
        hi = min(cols, lo + _QBLOCK)
        for q in range(lo, hi):
            out[p, q] = x[p, 0, q]
        for r in range(1, n):
            for q in range(lo, hi):
                out[p, q] += x[p, r, q]


@njit(**_JIT)
def _first_nan(x, r, lo, hi):
    for i in range(lo, hi):
        if x[r, i] != x[r, i]:
            return x[r, i]
    return x[r, lo]


@_kernel()
def _max_rows(x, out):
    # x (P, R) with R >= 1; out (P,) in x's dtype
    rows, n = x.shape
    chunks = (n + _CHUNK - 1) // _CHUNK
    part = np.empty(rows * chunks, out.dtype)
    for t in prange(rows * chunks):
        r = t // chunks
        lo = (t - r * chunks) * _CHUNK
        hi = min(n, lo + _CHUNK)
        m = x[r, lo]
        seen_nan = False
        for i in range(lo, hi):
            v = x[r, i]
            # a select and a flag, not a branch on nan: the loop vectorises
            m = v if v > m else m
            seen_nan |= v != v
        part[t] = _first_nan(x, r, lo, hi) if seen_nan else m
    for r in range(rows):
        m = part[r * chunks]
        for c in range(1, chunks):
            v = part[r * chunks + c]
            if v > m or v != v:
                m = v
        out[r] = m


@_kernel()
def _max_cols(x, out):
    # x (P, R, Q) with R >= 1; out (P, Q) in x's dtype
    planes, n, cols = x.shape
    blocks = (cols + _QBLOCK - 1) // _QBLOCK
    for t in prange(planes * blocks):
        p = t // blocks
        lo = (t - p * blocks) * _QBLOCK
        hi = min(cols, lo + _QBLOCK)
        for q in range(lo, hi):
            out[p, q] = x[p, 0, q]
        for r in range(1, n):
            for q in range(lo, hi):
                v = x[p, r, q]
                m = out[p, q]
                out[p, q] = v if v > m or v != v else m


# --------------------------------------------------------------------------
# softmax, transpose, im2col
# --------------------------------------------------------------------------


@_kernel(_PARALLEL_FROM_HEAVY)
def _softmax(x, out):
    # x, out (rows, n) with n >= 1; one row per task, so each row stays in cache
    rows, n = x.shape
    for r in prange(rows):
        m = x[r, 0]
        for j in range(n):
            v = x[r, j]
            m = v if v > m or v != v else m
        # subtracting the row max keeps exp <= 1: no overflow, whatever the inputs
        total = 0.0
        for j in range(n):
            e = math.exp(x[r, j] - m)
            out[r, j] = e
            total += e
        inverse = 1.0 / total
        for j in range(n):
            out[r, j] *= inverse


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
        c = row // (kh * kw)
        i = (row // kw) % kh
        j = row % kw
        for k in range(pixels):
            oy = y0 + k // ow
            ox = k % ow
            iy = oy * sh + i - ph
            ix = ox * sw + j - pw
            if 0 <= iy < height and 0 <= ix < width:
                cols[b, row, k] = x[n0 + b, c, iy, ix]
            else:
                cols[b, row, k] = 0


# --------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------


def _binary(kernel: _Kernel) -> Callable[[Sequence[np.ndarray], Mapping[str, Any]], np.ndarray]:
    def op(inputs: Sequence[np.ndarray], params: Mapping[str, Any]) -> np.ndarray:
        a, b = inputs
        scalar_b = b.shape in ((), (1,))
        shape = a.shape if a.shape == b.shape or scalar_b else b.shape
        out = np.empty(shape, a.dtype)
        kernel(out.size, _flat(a), _flat(b), out.reshape(-1))
        return out

    return op


def _unary(kernel: _Kernel) -> Callable[[Sequence[np.ndarray], Mapping[str, Any]], np.ndarray]:
    def op(inputs: Sequence[np.ndarray], params: Mapping[str, Any]) -> np.ndarray:
        (x,) = inputs
        out = np.empty(x.shape, x.dtype)
        kernel(out.size, _flat(x), out.reshape(-1))
        return out

    return op


def _op_scale(inputs: Sequence[np.ndarray], params: Mapping[str, Any]) -> np.ndarray:
    (x,) = inputs
    out = np.empty(x.shape, x.dtype)
    # the factor in x's dtype, as NumPy's x * factor computes it for a Python float
    _scale(out.size, _flat(x), x.dtype.type(params["factor"]), out.reshape(-1))
    return out


def _op_exp(inputs: Sequence[np.ndarray], params: Mapping[str, Any]) -> np.ndarray:
    (x,) = inputs
    out = np.empty(x.shape, x.dtype)  # out=: an array even for 0-d x, never a NumPy scalar
    with np.errstate(over="ignore", under="ignore"):  # exp(1000) is inf, as asked
        np.exp(x, out=out)
    return out


def _reduce(inputs: Sequence[np.ndarray], params: Mapping[str, Any], op: str) -> np.ndarray:
    (x,) = inputs
    axis, keepdims = params.get("axis"), bool(params.get("keepdims", False))
    if axis is not None:
        axis %= x.ndim
    axes = range(x.ndim) if axis is None else (axis,)
    kept = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
    shape = kept if keepdims else tuple(d for a, d in enumerate(x.shape) if a not in axes)
    # sum and mean accumulate in int64 or float64 (exact, or far more accurate than float32);
    # outputs follow NumPy: sum of int32 is int64, mean of int32 is float64.
    integer = x.dtype.kind == "i"
    if op == "max":
        dtype = acc_dtype = x.dtype
    else:
        acc_dtype = np.dtype(np.int64 if integer else np.float64)
        dtype = x.dtype if not integer else acc_dtype if op == "sum" else np.dtype(np.float64)

    if axis is None:
        planes, n, cols = 1, x.size, 1
    else:
        planes, n, cols = math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1 :])
    if planes * n * cols == 0:
        # an empty extent reaches here only for sum (0) or with an empty output
        return np.zeros(shape, dtype)

    flat = _flat(x)
    if cols == 1:
        acc = np.empty(planes, acc_dtype)
        kernel = _max_rows if op == "max" else _sum_rows
        kernel(flat.size, flat.reshape(planes, n), acc)
    else:
        acc = np.empty((planes, cols), acc_dtype)
        kernel = _max_cols if op == "max" else _sum_cols
        kernel(flat.size, flat.reshape(planes, n, cols), acc)
    if op == "mean":
        acc = acc / n
    return acc.astype(dtype, copy=False).reshape(shape)


def _op_softmax(inputs: Sequence[np.ndarray], params: Mapping[str, Any]) -> np.ndarray:
    (x,) = inputs
    out = np.empty(x.shape, x.dtype)
    if out.size == 0:
        return out
    n = x.shape[-1]
    rows = out.size // n
    # one row per task: a single row stays on one core, whatever its length
    _softmax(out.size if rows > 1 else 0, _flat(x).reshape(rows, n), out.reshape(rows, n))
    return out


def _op_matmul(inputs: Sequence[np.ndarray], params: Mapping[str, Any]) -> np.ndarray:
    a, b = inputs
    return np.ascontiguousarray(np.matmul(a, b))  # a no-op unless NumPy kept a strided layout


def _op_transpose(inputs: Sequence[np.ndarray], params: Mapping[str, Any]) -> np.ndarray:
    (x,) = inputs
    if x.T.flags.c_contiguous or not x.flags.c_contiguous:
        # x.T is already laid out in order (a plain copy), or x is a strided view that
        # NumPy reads in one pass; tiling would first need a contiguous copy.
        return np.array(x.T, order="C")  # a copy even when x.T is contiguous
    out = np.empty((x.shape[1], x.shape[0]), x.dtype)
    _transpose(x.size, _kernel_input(x), out)
    return out


# Elements of im2col columns built at once: bounds the scratch memory to 128 MiB of
# float64 while keeping each matmul large enough for BLAS to run at full speed.
_IM2COL_BUDGET = 1 << 24


def _op_conv2d(inputs: Sequence[np.ndarray], params: Mapping[str, Any]) -> np.ndarray:
    x, w = inputs
    (sh, sw), (ph, pw) = params["stride"], params["padding"]
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    out = np.empty((n, o, oh, ow), x.dtype)
    if out.size == 0:
        return out
    window = c * kh * kw
    weights = np.ascontiguousarray(w).reshape(o, window)
    if window == 0:
        out.fill(0)
        return out
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


def _op_fft(inputs: Sequence[np.ndarray], params: Mapping[str, Any]) -> np.ndarray:
    (x,) = inputs
    transform = np.fft.ifft if params.get("inverse", False) else np.fft.fft
    # C order even for a Fortran-ordered x (pocketfft keeps the input's layout)
    return np.ascontiguousarray(transform(x, axis=-1), dtype=np.complex64)


_OPS: Mapping[str, Callable[[Sequence[np.ndarray], Mapping[str, Any]], np.ndarray]] = {
    "add": _binary(_add),
    "sub": _binary(_sub),
    "mul": _binary(_mul),
    "div": _binary(_div),
    "relu": _unary(_relu),
    "gelu": _unary(_gelu),
    "exp": _op_exp,
    "scale": _op_scale,
    "sum": lambda inputs, params: _reduce(inputs, params, "sum"),
    "max": lambda inputs, params: _reduce(inputs, params, "max"),
    "mean": lambda inputs, params: _reduce(inputs, params, "mean"),
    "softmax": _op_softmax,
    "matmul": _op_matmul,
    "transpose": _op_transpose,
    "conv2d": _op_conv2d,
    "fft": _op_fft,
}


def run(op: str, inputs: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[np.ndarray]:
    """Runs one op on validated inputs and normalised params; returns fresh outputs."""
    try:
        kernel = _OPS[op]
    except KeyError:
        raise ValueError(f"the cpu backend has no op {op!r}") from None
    return [kernel(inputs, params)]


def _warmup_calls() -> list[tuple[str, list[np.ndarray], dict[str, Any]]]:
    """Small calls that together reach every kernel with every dtype it runs."""
    calls: list[tuple[str, list[np.ndarray], dict[str, Any]]] = []
    for op, dtypes in SUPPORTED_DTYPES.items():
        for dtype in sorted(dtypes):
            x = np.ones((2, 3), dtype)
            if op in ("add", "sub", "mul", "div", "matmul"):
                other = x.T.copy() if op == "matmul" else x
                calls.append((op, [x, other], {}))
            elif op in ("sum", "max", "mean"):
                for axis in (None, 0):  # the "rows" and the "cols" kernel
                    calls.append((op, [x], {"axis": axis, "keepdims": False}))
            elif op == "conv2d":
                image, weights = np.ones((1, 1, 3, 3), dtype), np.ones((1, 1, 2, 2), dtype)
                calls.append((op, [image, weights], {"stride": (1, 1), "padding": (0, 0)}))
            else:
                calls.append((op, [x], {"factor": 2.0, "inverse": False}))
    return calls


def warmup() -> None:
    """Compiles, or loads from Numba's on-disk cache, every kernel signature `run` uses."""
    for op, inputs, params in _warmup_calls():
        run(op, inputs, params)  # small: compiles each serial twin
    for kernel in _Kernel.instances:
        kernel.compile_parallel_like_serial()
