"""Backend-neutral op cases with NumPy references, shared by the device backends' suites
(OpenCL, CUDA, Metal).

`cases()` covers every op of the catalog with every dtype the CPU backend runs, over the
edge cases that break kernels: size-1 dims, odd sizes that are no multiple of a
work-group, sizes spanning many work-groups (100_003 elements), scalar operands, empty
extents where the catalog allows them, strided and transposed (non-contiguous) inputs,
nan and inf, batched matmul, conv2d with stride and padding, fft lengths 1 to 1024 and
the inverse transform. Params are normalised by `kernelmesh.core.ops.validate`, exactly
as the server hands them to a backend.

`reference` computes in NumPy alone (never one of our backends), in float64 or
complex128 where rounding matters; `tolerance` holds each op to a bound derived from the
arithmetic it does; `assert_matches` checks dtype, shape, layout and values.

A backend that cannot run some case (a float64 case on a device without fp64, an fft
length it refuses) skips it in its own suite, saying why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kernelmesh.core import ops
from kernelmesh.native import cpu

__all__ = ["OpCase", "assert_matches", "cases", "reference", "tolerance"]


@dataclass(frozen=True)
class OpCase:
    id: str
    op: str
    inputs: tuple[np.ndarray, ...]
    params: dict
    dtype: str  # the first input's dtype


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def _random(shape, dtype: str, rng: np.random.Generator, low=-10.0, high=10.0) -> np.ndarray:
    kind = np.dtype(dtype).kind
    if kind == "i":
        return rng.integers(int(low), int(high), size=shape, dtype=np.dtype(dtype))
    if kind == "c":
        real = rng.uniform(low, high, size=shape) + 1j * rng.uniform(low, high, size=shape)
        return real.astype(dtype)
    return rng.uniform(low, high, size=shape).astype(dtype)


def _strided(x: np.ndarray) -> np.ndarray:
    """The same values as x, every other element of a bigger read-only buffer."""
    big = np.zeros(2 * max(1, x.size), x.dtype)
    big[::2][: x.size] = x.reshape(-1)
    view = big[::2][: x.size].reshape(x.shape)
    view.flags.writeable = False
    return view


def _transposed(x: np.ndarray) -> np.ndarray:
    """The same values as x, in Fortran order (the transpose of a C-ordered buffer)."""
    view = np.asfortranarray(x)
    view.flags.writeable = False
    return view


_INTEGERS = ("int32", "int64")
_SPECIAL = [0.0, -0.0, 1.5, -1.5, np.inf, -np.inf, np.nan, 80.0, -80.0, 1e-30, -1e-30]


# --------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------


class _Builder:
    def __init__(self) -> None:
        self.cases: list[OpCase] = []
        self.rng = np.random.default_rng(20240607)

    def add(self, op: str, label: str, inputs: list[np.ndarray], params: dict | None = None):
        metas = [ops.TensorMeta(x.dtype.name, tuple(x.shape)) for x in inputs]
        call = ops.validate(op, metas, params or {})  # raises if the case itself is wrong
        dtype = inputs[0].dtype.name
        self.cases.append(OpCase(f"{op}-{dtype}-{label}", op, tuple(inputs), call.params, dtype))

    def random(self, shape, dtype, low=-10.0, high=10.0) -> np.ndarray:
        return _random(shape, dtype, self.rng, low, high)


class _Labelled:
    """A builder that prefixes every label it adds."""

    def __init__(self, builder: _Builder, prefix: str) -> None:
        self.builder, self.prefix = builder, prefix

    def add(self, op: str, label: str, inputs: list[np.ndarray], params: dict | None = None):
        self.builder.add(op, self.prefix + label, inputs, params)

    def random(self, shape, dtype, low=-10.0, high=10.0) -> np.ndarray:
        return self.builder.random(shape, dtype, low, high)


def _binary_cases(b: _Builder, op: str, dtype: str) -> None:
    # positive divisors keep div's values finite; its zero divisors have their own case
    lo, hi = (1, 50) if op == "div" else (-50, 50)
    for n in (1, 7, 1023, 100_003):
        b.add(op, f"n{n}", [b.random(n, dtype), b.random(n, dtype, lo, hi)])
    b.add(op, "2d", [b.random((33, 65), dtype), b.random((33, 65), dtype, lo, hi)])
    x, y = b.random((33, 65), dtype), b.random((33, 65), dtype, lo, hi)
    b.add(op, "strided", [_strided(x), _strided(y)])
    b.add(op, "transposed", [_transposed(x), y])
    for shape in ((), (1,)):
        tail = "0d" if shape == () else "1"
        b.add(op, f"scalar-right-{tail}", [b.random(1001, dtype), b.random(shape, dtype, 1, 9)])
        b.add(
            op, f"scalar-left-{tail}", [b.random(shape, dtype, 1, 9), b.random(1001, dtype, lo, hi)]
        )
    b.add(op, "two-scalars", [b.random((), dtype, 1, 9), b.random((1,), dtype, 1, 9)])
    b.add(op, "empty", [np.zeros((3, 0), dtype), np.zeros((3, 0), dtype)])
    b.add(op, "empty-scalar", [np.zeros((0,), dtype), np.ones((), dtype)])
    if dtype in _INTEGERS:
        info = np.iinfo(dtype)
        top = np.array([info.max, info.min, 7], dtype)
        b.add(op, "wraps", [top, top[::-1].copy()])
    else:
        special = np.array(_SPECIAL, dtype)
        b.add(op, "special", [special, special[::-1].copy()])
        if op == "div":
            a = np.array([1, -1, 0, np.inf, np.nan], dtype)
            b.add(op, "by-zero", [a, np.zeros(5, dtype)])


def _unary_cases(b: _Builder, op: str, dtype: str, params: dict | None = None) -> None:
    if params:  # scale: one set of cases per factor
        b = _Labelled(b, f"f{params['factor']}-")
    lo, hi = (-6, 6) if op == "gelu" else (-80, 80) if op == "exp" else (-100, 100)
    for n in (1, 7, 1023, 100_003):
        b.add(op, f"n{n}", [b.random(n, dtype, lo, hi)], params)
    x = b.random((17, 31), dtype, lo, hi)
    b.add(op, "0d", [b.random((), dtype, lo, hi)], params)
    b.add(op, "strided", [_strided(x)], params)
    b.add(op, "transposed", [_transposed(x)], params)
    b.add(op, "empty", [np.zeros((2, 0), dtype)], params)
    if dtype not in _INTEGERS:
        extra = [1000.0, -1000.0] if op == "exp" else [40.0, -40.0]
        b.add(op, "special", [np.array([*_SPECIAL, *extra], dtype)], params)


_REDUCTION_SHAPES = [
    ((1,), None),
    ((7,), None),
    ((100_003,), None),
    ((5, 7), 0),
    ((5, 7), 1),
    ((3, 1023, 5), 1),
    ((2, 3, 4, 5), 2),
    ((1, 1 << 17), 1),  # one long row: split over many work-groups
    ((1 << 15, 3), 0),  # tall and thin
    ((256, 257), 0),
    ((1, 1), 0),
]


def _reduction_cases(b: _Builder, op: str, dtype: str) -> None:
    for shape, axis in _REDUCTION_SHAPES:
        for keepdims in (False, True):
            label = f"{'x'.join(map(str, shape))}-axis{axis}" + ("-keep" if keepdims else "")
            params = (
                {"keepdims": keepdims} if axis is None else {"axis": axis, "keepdims": keepdims}
            )
            b.add(op, label, [b.random(shape, dtype, -100, 100)], params)
    x = b.random((37, 23), dtype, -100, 100)
    b.add(op, "strided-axis1", [_strided(x)], {"axis": 1})
    b.add(op, "transposed-axis0", [_transposed(x)], {"axis": 0})
    b.add(op, "transposed-all", [_transposed(x)])
    b.add(op, "0d", [np.array(-7, dtype)])
    b.add(op, "negative-axis", [b.random((4, 6), dtype)], {"axis": -1})
    b.add(op, "empty-output", [np.zeros((0, 4), dtype)], {"axis": 1})
    if op == "sum":
        b.add(op, "empty-all", [np.zeros((3, 0), dtype)])
        b.add(op, "empty-axis", [np.zeros((3, 0), dtype)], {"axis": 1})
    if dtype == "int32" and op != "max":
        # 2**17 * (2**31 - 1) overflows int32 but not the int64 accumulator
        b.add(op, "no-overflow", [np.full(1 << 17, np.iinfo(np.int32).max, np.int32)])
    if dtype == "int64" and op != "max":
        # sums of int64 wrap as NumPy's do (no wider accumulator): a sum that needs all 64 bits
        b.add(op, "large", [np.full(1 << 10, np.iinfo(np.int64).max >> 12, np.int64)])
    if dtype not in _INTEGERS and op == "max":
        for where in (0, 5, 100_002):
            x = b.random(100_003, dtype)
            x[where] = np.nan
            b.add(op, f"nan-at-{where}", [x])
        x = b.random((300, 2), dtype)
        x[123, 1] = np.nan
        b.add(op, "nan-axis0", [x], {"axis": 0})
        b.add(op, "infinities", [np.array([-np.inf, -3, -1e30], dtype)])
        b.add(op, "all-minus-inf", [np.full(5, -np.inf, dtype)])
    if dtype == "float32" and op in ("sum", "mean"):
        # a float32 running sum stalls at 2**24; the reference says 2**22 exactly
        b.add(op, "many-ones", [np.ones(1 << 22, np.float32)])


def _softmax_cases(b: _Builder, dtype: str) -> None:
    for shape in [(1,), (7,), (3, 1), (5, 1023), (1, 1 << 17), (1 << 12, 16), (2, 3, 4), (4, 0)]:
        b.add("softmax", "x".join(map(str, shape)), [b.random(shape, dtype, -30, 30)])
    x = b.random((31, 17), dtype, -5, 5)
    b.add("softmax", "strided", [_strided(x)])
    b.add("softmax", "transposed", [_transposed(x)])
    big = np.array([[1000, 1001, 1002], [-1000, -1001, -1002]], dtype)
    b.add("softmax", "large-values", [big])
    special = np.array([[0, np.nan, 1], [0, np.inf, 1], [0, -np.inf, 1]], dtype)
    b.add("softmax", "nan-inf-rows", [special])


def _matmul_cases(b: _Builder, dtype: str) -> None:
    shapes = [
        ((1, 1), (1, 1)),
        ((3, 5), (5, 7)),
        ((64, 1023), (1023, 33)),
        ((129, 65), (65, 97)),
        ((0, 4), (4, 3)),
        ((3, 0), (0, 4)),
        ((4, 3, 5), (4, 5, 2)),
        ((2, 1, 1), (2, 1, 1)),
        ((3, 40, 33), (3, 33, 50)),
    ]
    for sa, sb in shapes:
        label = f"{'x'.join(map(str, sa))}@{'x'.join(map(str, sb))}"
        b.add("matmul", label, [b.random(sa, dtype, -1, 1), b.random(sb, dtype, -1, 1)])
    a, w = b.random((45, 31), dtype, -1, 1), b.random((31, 19), dtype, -1, 1)
    b.add("matmul", "transposed", [_transposed(a), _transposed(w)])
    b.add("matmul", "strided", [_strided(a), w])


def _transpose_cases(b: _Builder, dtype: str) -> None:
    for shape in [(1, 1), (1, 9), (9, 1), (0, 3), (7, 1023), (300, 301)]:
        b.add("transpose", "x".join(map(str, shape)), [b.random(shape, dtype, -100, 100)])
    x = b.random((33, 17), dtype, -100, 100)
    b.add("transpose", "strided", [_strided(x)])
    b.add("transpose", "transposed", [_transposed(x)])


_CONV_CASES = [
    # x shape, w shape, stride, padding
    ((1, 1, 5, 5), (1, 1, 3, 3), 1, 0),
    ((2, 3, 8, 9), (4, 3, 3, 3), 1, 1),
    ((2, 3, 9, 8), (5, 3, 3, 2), [2, 1], [0, 2]),
    ((1, 2, 7, 7), (3, 2, 7, 7), 1, 0),  # kernel as big as the image: 1x1 output
    ((3, 4, 6, 6), (2, 4, 1, 1), 1, 0),  # 1x1 kernel
    ((1, 4, 6, 6), (2, 4, 1, 1), 2, 1),  # 1x1 kernel with stride and padding
    ((1, 1, 1, 1), (1, 1, 1, 1), 1, 0),
    ((2, 3, 33, 17), (8, 3, 5, 3), 3, 2),
    ((2, 16, 32, 32), (32, 16, 3, 3), 1, 1),  # more than one matmul tile each way
    ((0, 3, 5, 5), (2, 3, 3, 3), 1, 0),  # empty batch
    ((1, 3, 5, 5), (0, 3, 3, 3), 1, 0),  # no output channels
    ((2, 0, 5, 5), (2, 0, 3, 3), 1, 1),  # no input channels: all zeros
    ((1, 2, 2, 2), (1, 2, 3, 3), 1, 1),  # padding wider than the image
]


def _conv2d_cases(b: _Builder, dtype: str) -> None:
    for xs, ws, stride, padding in _CONV_CASES:
        label = f"{'x'.join(map(str, xs))}*{'x'.join(map(str, ws))}-s{stride}-p{padding}"
        x, w = b.random(xs, dtype, -1, 1), b.random(ws, dtype, -1, 1)
        b.add("conv2d", label.replace(" ", ""), [x, w], {"stride": stride, "padding": padding})
    x, w = b.random((2, 3, 10, 11), dtype, -1, 1), b.random((4, 3, 3, 3), dtype, -1, 1)
    b.add("conv2d", "strided", [_strided(x), _strided(w)], {"stride": [1, 2], "padding": 1})
    b.add("conv2d", "transposed", [_transposed(x), _transposed(w)], {"padding": 1})


def _fft_cases(b: _Builder, dtype: str) -> None:
    for shape in [(1,), (2,), (8,), (1024,), (3, 16), (2, 3, 64), (0, 8), (5, 1)]:
        for inverse in (False, True):
            label = "x".join(map(str, shape)) + ("-inverse" if inverse else "")
            b.add("fft", label, [b.random(shape, dtype, -1, 1)], {"inverse": inverse})
    x = b.random((6, 16), dtype, -1, 1)
    b.add("fft", "strided", [_strided(x)])
    b.add("fft", "transposed", [_transposed(x)])


def cases() -> list[OpCase]:
    """Every op x every dtype the CPU backend runs, over edge shapes and layouts."""
    b = _Builder()
    for op, dtypes in cpu.SUPPORTED_DTYPES.items():
        for dtype in sorted(dtypes):
            if op in ("add", "sub", "mul", "div"):
                _binary_cases(b, op, dtype)
            elif op in ("relu", "gelu", "exp"):
                _unary_cases(b, op, dtype)
            elif op == "scale":
                for factor in (2.5, -0.1, 0.0):
                    _unary_cases(b, op, dtype, {"factor": factor})
            elif op in ("sum", "max", "mean"):
                _reduction_cases(b, op, dtype)
            elif op == "softmax":
                _softmax_cases(b, dtype)
            elif op == "matmul":
                _matmul_cases(b, dtype)
            elif op == "transpose":
                _transpose_cases(b, dtype)
            elif op == "conv2d":
                _conv2d_cases(b, dtype)
            elif op == "fft":
                _fft_cases(b, dtype)
            else:
                raise AssertionError(f"no cases for op {op!r}")
    ids = [case.id for case in b.cases]
    assert len(set(ids)) == len(ids), "case ids must be unique"
    return b.cases


# --------------------------------------------------------------------------
# References: NumPy only
# --------------------------------------------------------------------------


def _output_dtype(case: OpCase) -> np.dtype:
    metas = [ops.TensorMeta(x.dtype.name, tuple(x.shape)) for x in case.inputs]
    (out,) = ops.validate(case.op, metas, case.params).outputs
    return np.dtype(out.dtype)


def _binary_reference(case: OpCase) -> np.ndarray:
    a, b = case.inputs
    fn = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[case.op]
    shape = a.shape if a.shape == b.shape or b.shape in ((), (1,)) else b.shape
    with np.errstate(all="ignore"):
        return np.asarray(fn(a, b)).reshape(shape)


def _gelu(x: np.ndarray) -> np.ndarray:
    wide = x.astype(np.float64)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return (0.5 * wide * (1.0 + erf(wide / math.sqrt(2.0)))).astype(x.dtype)


def _reduction_reference(case: OpCase) -> np.ndarray:
    (x,) = case.inputs
    axis, keepdims = case.params["axis"], case.params["keepdims"]
    dtype = _output_dtype(case)
    if case.op == "max":
        return np.asarray(np.max(x, axis=axis, keepdims=keepdims))
    wide = x.astype(np.int64 if x.dtype.kind == "i" else np.float64)
    fn = np.sum if case.op == "sum" else np.mean
    return np.asarray(fn(wide, axis=axis, keepdims=keepdims)).astype(dtype)


def _softmax(x: np.ndarray) -> np.ndarray:
    if x.size == 0:
        return x.copy()
    wide = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        e = np.exp(wide - wide.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(x.dtype)


def _conv2d(x: np.ndarray, w: np.ndarray, stride, padding) -> np.ndarray:
    """Cross-correlation by its definition, in float64: one einsum per kernel tap."""
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    padded = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    padded[:, :, ph : ph + h, pw : pw + wd] = x
    out = np.zeros((n, o, oh, ow))
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i : i + sh * oh : sh, j : j + sw * ow : sw]
            out += np.einsum("nchw,oc->nohw", window, w[:, :, i, j].astype(np.float64))
    return out


def _fft(x: np.ndarray, inverse: bool) -> np.ndarray:
    wide = x.astype(np.complex128)
    return (np.fft.ifft(wide) if inverse else np.fft.fft(wide)).astype(np.complex64)


_REFERENCES: dict[str, Callable[[OpCase], np.ndarray]] = {
    "add": _binary_reference,
    "sub": _binary_reference,
    "mul": _binary_reference,
    "div": _binary_reference,
    "relu": lambda c: np.maximum(c.inputs[0], 0),
    "gelu": lambda c: _gelu(c.inputs[0]),
    "exp": lambda c: np.exp(c.inputs[0].astype(np.float64)).astype(c.inputs[0].dtype),
    "scale": lambda c: c.inputs[0] * c.inputs[0].dtype.type(c.params["factor"]),
    "sum": _reduction_reference,
    "max": _reduction_reference,
    "mean": _reduction_reference,
    "softmax": lambda c: _softmax(c.inputs[0]),
    "matmul": lambda c: (c.inputs[0].astype(np.float64) @ c.inputs[1]).astype(c.dtype),
    "transpose": lambda c: c.inputs[0].T,
    "conv2d": lambda c: _conv2d(*c.inputs, c.params["stride"], c.params["padding"]).astype(c.dtype),
    "fft": lambda c: _fft(c.inputs[0], c.params["inverse"]),
}


def reference(case: OpCase) -> list[np.ndarray]:
    """The expected outputs, from NumPy alone."""
    with np.errstate(all="ignore"):
        out = np.asarray(_REFERENCES[case.op](case))
    # np.array, not np.ascontiguousarray: the latter turns a 0-d result into shape (1,)
    return [np.array(out, dtype=_output_dtype(case), order="C")]


# --------------------------------------------------------------------------
# Tolerances
# --------------------------------------------------------------------------

# Exact IEEE operations: any correct kernel matches NumPy bit for bit.
_EXACT = {"add", "sub", "mul", "div", "relu", "scale", "max", "transpose"}


def _eps(dtype) -> float:
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        dtype = np.dtype(np.float32)
    return float(np.finfo(dtype).eps) if dtype.kind == "f" else 0.0


def _finite_max(x: np.ndarray) -> float:
    finite = np.abs(x[np.isfinite(x)]) if x.size else x
    return float(finite.max()) if finite.size else 0.0


def tolerance(case: OpCase) -> tuple[float, float]:
    """(rtol, atol) for this case: 0, 0 means bit-exact."""
    op, x = case.op, case.inputs[0]
    eps = _eps(_output_dtype(case))
    if op in _EXACT or (op == "sum" and case.dtype in _INTEGERS):  # int64 sums are exact
        return 0.0, 0.0
    if op == "mean" and case.dtype in _INTEGERS:
        return 2 * eps, 0.0  # an exact int64 sum, then one float64 division
    if op == "exp":
        return 4 * eps, 0.0  # OpenCL allows exp 3 ulp; libm and SIMD exps differ by 1-2
    if op == "gelu":
        # 1 + erf(x / sqrt 2) cancels for negative x: the error is bounded by eps * |x|
        return 4 * eps, 4 * eps * _finite_max(x)
    if op in ("sum", "mean"):
        # A float64 accumulator (or a pairwise float32 one on devices without fp64)
        # rounds once at the end; allow log2(n) roundings of the magnitude to cover
        # the pairwise case.
        axis = case.params["axis"]
        wide = np.abs(x.astype(np.float64))
        magnitude = float(np.max(np.sum(wide, axis=axis))) if wide.size else 0.0
        n = x.size if axis is None else x.shape[axis]
        if op == "mean" and n:
            magnitude /= n
        return eps, (1 + math.log2(max(n, 1))) * eps * magnitude
    if op == "softmax":
        # x - max rounds to half an ulp of |x - max| (up to 60 here), which exp turns into
        # a relative error of up to 30 ulp; the row's sum adds its own rounding on rows
        # of 10**5 elements
        return (1e-5 if case.dtype == "float32" else 1e-12), 1e-30
    if op in ("matmul", "conv2d"):
        # worst-case rounding of a length-`depth` dot product: depth * eps * |a||b|
        a, w = (np.abs(t.astype(np.float64)) for t in case.inputs)
        if op == "matmul":
            depth, bound = a.shape[-1], (a @ w) if a.size and w.size else np.zeros(0)
        else:
            depth = math.prod(w.shape[1:])
            bound = _conv2d(a, w, case.params["stride"], case.params["padding"])
        return 0.0, (depth + 2) * eps * (float(bound.max()) if bound.size else 0.0)
    if op == "fft":
        n = x.shape[-1]
        wide = np.abs(x.astype(np.complex128))
        scale = float(np.max(np.sum(wide, axis=-1))) if wide.size else 0.0
        if case.params["inverse"]:
            scale /= n
        # error grows like log2(n) ulps of the input's magnitude, for any radix-2 FFT
        return 0.0, 4 * (1 + math.log2(n)) * eps * scale
    raise AssertionError(f"no tolerance for op {op!r}")


def assert_matches(case: OpCase, outputs: list[np.ndarray]) -> None:
    """outputs are what a backend's run returned for case: one fresh C-contiguous array
    with the reference's dtype and shape, and values within `tolerance`."""
    (want,) = reference(case)
    assert len(outputs) == 1, f"{case.id}: {len(outputs)} outputs, want 1"
    (got,) = outputs
    assert isinstance(got, np.ndarray), f"{case.id}: output is {type(got).__name__}"
    assert got.dtype == want.dtype, f"{case.id}: dtype {got.dtype}, want {want.dtype}"
    assert got.shape == want.shape, f"{case.id}: shape {got.shape}, want {want.shape}"
    assert got.flags.c_contiguous, f"{case.id}: output is not C-contiguous"
    rtol, atol = tolerance(case)
    if rtol == 0 and atol == 0:
        np.testing.assert_array_equal(got, want, err_msg=case.id, strict=True)
    else:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=case.id)
