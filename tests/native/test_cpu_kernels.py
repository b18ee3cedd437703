"""The CPU backend against NumPy references, op by op.

Every op runs on each dtype it supports, over edge shapes (0-d, (1,), empty, odd sizes,
sizes large enough for the parallel path) and awkward layouts (read-only, strided,
transposed). Exact IEEE operations (add, relu, max, transpose...) must match NumPy bit
for bit; the rest are held to error bounds derived from the arithmetic they do.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kernelmesh.core import ops
from kernelmesh.native import cpu

FLOATS = ["float32", "float64"]
NUMERIC = ["float32", "float64", "int32"]
PARALLEL = cpu._PARALLEL_FROM  # elements from which the parallel twin runs
SIZES = [1, 7, 1023, PARALLEL + 3, 1 << 20]
LAYOUTS = ["contiguous", "readonly", "strided", "transposed"]


def random(shape, dtype, rng, low=-100, high=100) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "i":
        return rng.integers(low, high, size=shape, dtype=dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.uniform(low, high, size=shape).astype(dtype)


def laid_out(x: np.ndarray, layout: str) -> np.ndarray:
    """The same values as x, stored as asked; never writable except 'contiguous'."""
    if layout == "contiguous":
        return x.copy()
    if layout == "readonly":
        y = x.copy()
    elif layout == "strided":  # every other element of a bigger buffer
        big = np.zeros((2 * max(1, x.size),), x.dtype)
        big[::2][: x.size] = x.reshape(-1)
        y = big[::2][: x.size].reshape(x.shape)
    elif layout == "transposed":  # Fortran order: the transpose of a C-ordered buffer
        y = np.asfortranarray(x)
    else:
        raise AssertionError(layout)
    y.setflags(write=False)
    return y


def run1(op, inputs, params=None) -> np.ndarray:
    """Runs op through the catalog (as the server does) and the backend."""
    call = ops.validate(op, [ops.TensorMeta(x.dtype.name, x.shape) for x in inputs], params or {})
    before = [x.copy() for x in inputs]
    (out,) = cpu.run(op, inputs, call.params)
    (meta,) = call.outputs
    assert out.dtype.name == meta.dtype and out.shape == meta.shape
    assert out.flags.c_contiguous and out.flags.writeable
    for x, copy in zip(inputs, before, strict=True):
        np.testing.assert_array_equal(x, copy)  # never written
        assert not np.shares_memory(out, x)  # a fresh output
    return out


def exact(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    np.testing.assert_array_equal(got, want, strict=True)


def eps(dtype) -> float:
    return float(np.finfo(dtype).eps)


# --------------------------------------------------------------------------
# The catalog and the backend agree
# --------------------------------------------------------------------------


def test_supported_dtypes_match_the_catalog():
    assert set(cpu.SUPPORTED_DTYPES) == set(ops.CATALOG)
    for name, spec in ops.CATALOG.items():
        assert cpu.SUPPORTED_DTYPES[name] == frozenset(spec.dtypes), name


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="no op 'nope'"):
        cpu.run("nope", [np.ones(2, np.float32)], {})


# --------------------------------------------------------------------------
# Binary elementwise
# --------------------------------------------------------------------------

BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}
BINARY_CASES = [(op, d) for op in BINARY for d in NUMERIC if op != "div" or d != "int32"]


def binary_reference(op, a, b) -> np.ndarray:
    shape = a.shape if a.shape == b.shape or b.shape in ((), (1,)) else b.shape
    with np.errstate(all="ignore"):
        return BINARY[op](a, b).reshape(shape)


@pytest.mark.parametrize(("op", "dtype"), BINARY_CASES)
@pytest.mark.parametrize("size", SIZES)
def test_binary_same_shape_matches_numpy_exactly(op, dtype, size):
    rng = np.random.default_rng(size)
    a, b = random(size, dtype, rng), random(size, dtype, rng, 1, 50)
    exact(run1(op, [a, b]), binary_reference(op, a, b))


@pytest.mark.parametrize(("op", "dtype"), BINARY_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_binary_any_layout_matches_numpy_exactly(op, dtype, layout):
    rng = np.random.default_rng(1)
    a, b = random((33, 65), dtype, rng), random((33, 65), dtype, rng, 1, 50)
    a, b = laid_out(a, layout), laid_out(b, layout)
    exact(run1(op, [a, b]), binary_reference(op, a, b))


@pytest.mark.parametrize(("op", "dtype"), BINARY_CASES)
@pytest.mark.parametrize("scalar_shape", [(), (1,)])
@pytest.mark.parametrize("scalar_first", [False, True])
@pytest.mark.parametrize("size", [5, PARALLEL + 5])
def test_binary_scalar_operand_on_either_side(op, dtype, scalar_shape, scalar_first, size):
    rng = np.random.default_rng(2)
    tensor = laid_out(random((size,), dtype, rng, 1, 50), "readonly")
    scalar = random(scalar_shape, dtype, rng, 1, 50)
    a, b = (scalar, tensor) if scalar_first else (tensor, scalar)
    got = run1(op, [a, b])
    assert got.shape == (size,)
    exact(got, binary_reference(op, a, b))


@pytest.mark.parametrize(("op", "dtype"), BINARY_CASES)
@pytest.mark.parametrize(("sa", "sb"), [((), ()), ((), (1,)), ((1,), ()), ((1,), (1,))])
def test_binary_two_scalars_take_the_first_shape(op, dtype, sa, sb):
    a, b = np.full(sa, 6, dtype), np.full(sb, 3, dtype)
    got = run1(op, [a, b])
    assert got.shape == sa
    exact(got, binary_reference(op, a, b))


@pytest.mark.parametrize(("op", "dtype"), BINARY_CASES)
def test_binary_empty_tensors(op, dtype):
    a = np.zeros((3, 0), dtype)
    exact(run1(op, [a, a]), a.copy())
    exact(run1(op, [a, np.ones((), dtype)]), binary_reference(op, a, np.ones((), dtype)))


@pytest.mark.parametrize("dtype", FLOATS)
def test_div_by_zero_follows_ieee(dtype):
    a = np.array([1, -1, 0, np.inf, np.nan], dtype)
    b = np.zeros(5, dtype)
    exact(run1("div", [a, b]), np.array([np.inf, -np.inf, np.nan, np.inf, np.nan], dtype))


def test_int32_add_wraps_like_numpy():
    a = np.array([np.iinfo(np.int32).max, np.iinfo(np.int32).min], np.int32)
    exact(run1("add", [a, np.ones((), np.int32)]), a + np.int32(1))
    exact(run1("sub", [a, a[::-1].copy()]), a - a[::-1])


# --------------------------------------------------------------------------
# Unary elementwise
# --------------------------------------------------------------------------

SPECIAL = [0.0, -0.0, 1.5, -1.5, np.inf, -np.inf, np.nan, 80.0, -80.0, 1e-30, -1e-30]


@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("size", SIZES)
def test_relu_matches_numpy_maximum(dtype, size):
    x = random(size, dtype, np.random.default_rng(size))
    exact(run1("relu", [x]), np.maximum(x, 0))


@pytest.mark.parametrize("dtype", FLOATS)
def test_relu_keeps_nan_and_inf(dtype):
    x = np.array(SPECIAL, dtype)
    exact(run1("relu", [x]), np.maximum(x, 0))


@pytest.mark.parametrize("op", ["relu", "exp", "gelu"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(), (1,), (0,), (2, 0), (17, 31)])
def test_unary_any_shape_and_layout(op, dtype, layout, shape):
    x = laid_out(random(shape, dtype, np.random.default_rng(3), -5, 5), layout)
    got = run1(op, [x])
    if op == "gelu":
        assert_gelu_close(got, x)
    else:
        exact(got, np.maximum(x, 0) if op == "relu" else np.exp(x))


def gelu_reference(x) -> np.ndarray:
    wide = x.astype(np.float64)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * wide * (1.0 + erf(wide / math.sqrt(2.0)))


def assert_gelu_close(got, x):
    """Within a few ulps of |x|: 1 + erf(x / sqrt 2) cancels for negative x, so the error
    of gelu is bounded by eps * |x|, not by eps * |gelu(x)|."""
    want = gelu_reference(x)
    assert got.dtype == x.dtype and got.shape == x.shape
    with np.errstate(invalid="ignore"):
        error = np.abs(got - want)
    agree = (error <= 2 * eps(x.dtype) * np.abs(x.astype(np.float64))) | (got == want)
    assert np.all(agree | (np.isnan(got) & np.isnan(want)))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("size", SIZES)
def test_exp_matches_numpy(dtype, size):
    x = random(size, dtype, np.random.default_rng(size), -80, 80)
    exact(run1("exp", [x]), np.exp(x))


@pytest.mark.parametrize("dtype", FLOATS)
def test_exp_of_special_values(dtype):
    x = np.array([*SPECIAL, 1000.0, -1000.0], dtype)
    got = run1("exp", [x])
    with np.errstate(over="ignore"):
        exact(got, np.exp(x))
    assert got[-2] == np.inf and got[-1] == 0


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("size", [1, 7, 1023, 5000])
def test_gelu_matches_the_erf_formula(dtype, size):
    x = random(size, dtype, np.random.default_rng(size), -6, 6)
    assert_gelu_close(run1("gelu", [x]), x)


@pytest.mark.parametrize("dtype", FLOATS)
def test_gelu_of_special_values(dtype):
    x = np.array([0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 40.0, -40.0], dtype)
    got = run1("gelu", [x])
    want = np.array([0.0, 0.8413447460685429, -0.15865525393145707, np.inf, np.nan, np.nan, 40, 0])
    np.testing.assert_allclose(got, want.astype(dtype), rtol=eps(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("factor", [2.5, -0.1, 0.0])
def test_scale_multiplies_in_the_input_dtype(dtype, size, factor):
    x = random(size, dtype, np.random.default_rng(size))
    exact(run1("scale", [x], {"factor": factor}), x * factor)


@pytest.mark.parametrize("dtype", FLOATS)
def test_scale_strided_readonly_and_0d(dtype):
    x = laid_out(random((9, 4), dtype, np.random.default_rng(4)), "strided")
    exact(run1("scale", [x], {"factor": 3}), x * 3.0)
    exact(run1("scale", [np.array(2, dtype)], {"factor": 1.5}), np.array(3, dtype))


# --------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------


def reduction_reference(op, x, axis, keepdims) -> np.ndarray:
    return np.asarray(getattr(np, op)(x, axis=axis, keepdims=keepdims))


def assert_sum_close(op, got, x, axis, keepdims):
    """float sums: within the float64 error of a float64 sum, then one rounding."""
    want = reduction_reference(op, x.astype(np.float64), axis, keepdims)
    magnitude = reduction_reference(op, np.abs(x.astype(np.float64)), axis, keepdims)
    assert got.dtype == reduction_reference(op, x, axis, keepdims).dtype
    tolerance = eps(got.dtype) * np.abs(want) + 1e-12 * magnitude
    assert np.all(np.abs(got - want) <= tolerance), np.max(np.abs(got - want) - tolerance)


def check_reduction(op, x, axis=None, keepdims=False):
    params = {} if axis is None else {"axis": axis}
    if keepdims:
        params["keepdims"] = True
    got = run1(op, [x], params)
    if op == "max" or x.dtype.kind == "i":
        # max is exact; integer sums are exact in int64; int means are one float64 division
        want = reduction_reference(op, x, axis, keepdims)
        if op == "mean":
            np.testing.assert_allclose(got, want, rtol=eps(np.float64), strict=True)
        else:
            exact(got, want)
    else:
        assert_sum_close(op, got, x, axis, keepdims)


@pytest.mark.parametrize("op", ["sum", "max", "mean"])
@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("size", SIZES)
def test_reduce_all_axes(op, dtype, size):
    check_reduction(op, random(size, dtype, np.random.default_rng(size)))


@pytest.mark.parametrize("op", ["sum", "max", "mean"])
@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((5, 7), 0),
        ((5, 7), 1),
        ((5, 7), -1),
        ((3, 1023, 5), 1),
        ((3, 1023, 5), -3),
        ((2, 3, 4, 5), 2),
        ((1, 1 << 17), 1),  # one long row: split into chunks across the pool
        ((1 << 17, 3), 0),  # tall and thin
        ((256, 257), 0),
        ((4, 1 << 15), 1),
        ((4, 1 << 15), 0),
        ((1, 1), 0),
    ],
)
@pytest.mark.parametrize("keepdims", [False, True])
def test_reduce_one_axis(op, dtype, shape, axis, keepdims):
    x = random(shape, dtype, np.random.default_rng(len(shape)))
    check_reduction(op, x, axis, keepdims)


@pytest.mark.parametrize("op", ["sum", "max", "mean"])
@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_reduce_any_layout(op, dtype, layout, axis):
    x = laid_out(random((37, 23), dtype, np.random.default_rng(5)), layout)
    check_reduction(op, x, axis)


@pytest.mark.parametrize("op", ["sum", "max", "mean"])
@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("keepdims", [False, True])
def test_reduce_0d_input(op, dtype, keepdims):
    check_reduction(op, np.array(-7, dtype), None, keepdims)


@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize(("shape", "axis"), [((0,), None), ((3, 0), None), ((3, 0), 1)])
def test_sum_of_empty_is_zero(dtype, shape, axis):
    check_reduction("sum", np.zeros(shape, dtype), axis)


@pytest.mark.parametrize("op", ["sum", "max", "mean"])
@pytest.mark.parametrize("dtype", NUMERIC)
def test_reduce_to_an_empty_output(op, dtype):
    # the reduced extent has elements; the kept ones have none
    x = np.zeros((0, 4), dtype)
    check_reduction(op, x, 1, False)
    check_reduction(op, x, 1, True)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("where", [0, 5, PARALLEL + 1, (1 << 17) - 1])
@pytest.mark.parametrize("axis", [None, 0])
def test_max_propagates_nan(dtype, where, axis):
    x = random((1 << 17,), dtype, np.random.default_rng(6))
    x[where] = np.nan
    x = x.reshape(1 << 16, 2) if axis == 0 else x
    got = run1("max", [x], {} if axis is None else {"axis": axis})
    exact(got, reduction_reference("max", x, axis, False))
    assert np.isnan(got).any()


@pytest.mark.parametrize("dtype", FLOATS)
def test_max_of_infinities_and_negatives(dtype):
    exact(run1("max", [np.array([-np.inf, -3, -1e30], dtype)]), np.array(-3, dtype))
    exact(run1("max", [np.array([-np.inf, np.inf], dtype)]), np.array(np.inf, dtype))
    exact(run1("max", [np.full(5, -np.inf, dtype)]), np.array(-np.inf, dtype))


def test_int32_sum_widens_to_int64_without_overflow():
    x = np.full(1 << 17, np.iinfo(np.int32).max, np.int32)
    got = run1("sum", [x])
    assert got.dtype == np.int64 and int(got) == (1 << 17) * np.iinfo(np.int32).max


def test_float32_sum_is_accurate_over_many_elements():
    # a float32 running sum would stall at 2**24; ours accumulates in float64
    x = np.ones(1 << 25, np.float32)
    assert run1("sum", [x]) == np.float32(1 << 25)
    assert run1("mean", [x]) == np.float32(1)


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9),
        elements=st.floats(-1e6, 1e6, allow_nan=False),
    ),
    op=st.sampled_from(["sum", "max", "mean"]),
    data=st.data(),
)
def test_reductions_on_random_shapes_and_axes(x, op, data):
    axis = data.draw(st.none() | st.integers(-x.ndim, x.ndim - 1))
    check_reduction(op, x, axis, data.draw(st.booleans()))


# --------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------


def softmax_reference(x) -> np.ndarray:
    if x.size == 0:
        return x.copy()
    wide = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        e = np.exp(wide - wide.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(x.dtype)


# x - max rounds to half an ulp of |x - max| (up to 60 here), which exp turns into a
# relative error of up to 60 * eps / 2: about 4e-6 in float32, 7e-15 in float64.
SOFTMAX_RTOL = {"float32": 1e-5, "float64": 1e-12}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "shape", [(1,), (7,), (3, 1), (5, 1023), (1, 1 << 17), (1 << 12, 16), (2, 3, 4), (4, 0)]
)
def test_softmax_matches_reference(dtype, shape):
    x = random(shape, dtype, np.random.default_rng(7), -30, 30)
    got = run1("softmax", [x])
    np.testing.assert_allclose(got, softmax_reference(x), rtol=SOFTMAX_RTOL[dtype], atol=1e-30)
    if got.size:
        np.testing.assert_allclose(got.sum(axis=-1), 1, rtol=1e-5)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_softmax_any_layout(dtype, layout):
    x = laid_out(random((31, 17), dtype, np.random.default_rng(8), -5, 5), layout)
    got = run1("softmax", [x])
    np.testing.assert_allclose(got, softmax_reference(x), rtol=SOFTMAX_RTOL[dtype], atol=1e-30)


@pytest.mark.parametrize("dtype", FLOATS)
def test_softmax_is_stable_for_large_inputs(dtype):
    x = np.array([[1000, 1001, 1002], [-1000, -1001, -1002]], dtype)
    got = run1("softmax", [x])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, softmax_reference(x), rtol=SOFTMAX_RTOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
def test_softmax_row_with_nan_or_inf(dtype):
    x = np.array([[0, np.nan, 1], [0, np.inf, 1], [0, -np.inf, 1]], dtype)
    got = run1("softmax", [x])
    np.testing.assert_allclose(got, softmax_reference(x), rtol=SOFTMAX_RTOL[dtype])


# --------------------------------------------------------------------------
# matmul and transpose
# --------------------------------------------------------------------------


def assert_dot_close(got, want, bound, depth, dtype):
    """Within the worst-case rounding of a length-`depth` dot product: depth * eps * |a||b|."""
    assert got.dtype == np.dtype(dtype) and got.shape == want.shape
    assert np.all(np.abs(got - want) <= (depth + 2) * eps(dtype) * bound)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    ("sa", "sb"),
    [
        ((1, 1), (1, 1)),
        ((3, 5), (5, 7)),
        ((64, 1023), (1023, 33)),
        ((0, 4), (4, 3)),
        ((3, 0), (0, 4)),
        ((4, 3, 5), (4, 5, 2)),
        ((2, 1, 1), (2, 1, 1)),
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "readonly", "transposed"])
def test_matmul_matches_float64_reference(dtype, sa, sb, layout):
    rng = np.random.default_rng(9)
    a, b = laid_out(random(sa, dtype, rng, -1, 1), layout), random(sb, dtype, rng, -1, 1)
    got = run1("matmul", [a, b])
    want = a.astype(np.float64) @ b.astype(np.float64)
    assert_dot_close(got, want, np.abs(a.astype(np.float64)) @ np.abs(b), sa[-1], dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "complex64"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (0, 3), (7, 1023), (300, 301)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_transpose_copies_the_transposed_matrix(dtype, shape, layout):
    x = laid_out(random(shape, dtype, np.random.default_rng(10)), layout)
    got = run1("transpose", [x])
    exact(got, np.ascontiguousarray(x.T))


# --------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------


def conv2d_reference(x, w, stride, padding) -> np.ndarray:
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


CONV_CASES = [
    # x shape, w shape, stride, padding
    ((1, 1, 5, 5), (1, 1, 3, 3), 1, 0),
    ((2, 3, 8, 9), (4, 3, 3, 3), 1, 1),
    ((2, 3, 9, 8), (5, 3, 3, 2), [2, 1], [0, 2]),
    ((1, 2, 7, 7), (3, 2, 7, 7), 1, 0),  # kernel as big as the image: 1x1 output
    ((3, 4, 6, 6), (2, 4, 1, 1), 1, 0),  # 1x1 kernel: the matmul-only path
    ((1, 4, 6, 6), (2, 4, 1, 1), 2, 1),  # 1x1 kernel with stride and padding
    ((1, 1, 1, 1), (1, 1, 1, 1), 1, 0),
    ((2, 3, 33, 17), (8, 3, 5, 3), 3, 2),
    ((0, 3, 5, 5), (2, 3, 3, 3), 1, 0),  # empty batch
    ((1, 3, 5, 5), (0, 3, 3, 3), 1, 0),  # no output channels
    ((2, 0, 5, 5), (2, 0, 3, 3), 1, 1),  # no input channels: all zeros
    ((1, 2, 2, 2), (1, 2, 3, 3), 1, 1),  # padding wider than the image
]


def check_conv2d(x, w, stride, padding):
    params = {"stride": stride, "padding": padding}
    got = run1("conv2d", [x, w], params)
    norm = ops.validate(
        "conv2d", [ops.TensorMeta(t.dtype.name, t.shape) for t in (x, w)], params
    ).params
    want = conv2d_reference(x, w, norm["stride"], norm["padding"])
    bound = conv2d_reference(np.abs(x), np.abs(w), norm["stride"], norm["padding"])
    assert_dot_close(got, want, bound, math.prod(w.shape[1:]), x.dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("xs", "ws", "stride", "padding"), CONV_CASES)
def test_conv2d_matches_the_definition(dtype, xs, ws, stride, padding):
    rng = np.random.default_rng(11)
    check_conv2d(random(xs, dtype, rng, -1, 1), random(ws, dtype, rng, -1, 1), stride, padding)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", ["readonly", "strided", "transposed"])
def test_conv2d_any_layout(dtype, layout):
    rng = np.random.default_rng(12)
    x = laid_out(random((2, 3, 10, 11), dtype, rng, -1, 1), layout)
    w = laid_out(random((4, 3, 3, 3), dtype, rng, -1, 1), layout)
    check_conv2d(x, w, [1, 2], 1)


@pytest.mark.parametrize("tiles", ["images", "rows"])
def test_conv2d_splits_big_work_into_tiles(monkeypatch, tiles):
    # a small budget forces several tiles of whole images, or bands of output rows
    # one image's columns: (2 * 3 * 3) x (9 * 7) = 1134 elements
    monkeypatch.setattr(cpu, "_IM2COL_BUDGET", 2500 if tiles == "images" else 100)
    rng = np.random.default_rng(13)
    x, w = random((5, 2, 9, 7), "float64", rng, -1, 1), random((3, 2, 3, 3), "float64", rng)
    check_conv2d(x, w, 1, 1)


# --------------------------------------------------------------------------
# fft
# --------------------------------------------------------------------------


def assert_fft_close(got, x, inverse):
    wide = x.astype(np.complex128)
    want = np.fft.ifft(wide) if inverse else np.fft.fft(wide)
    n = x.shape[-1]
    # pocketfft's error grows like log2(n) ulps of the input's magnitude
    scale = np.sum(np.abs(wide), axis=-1, keepdims=True) / (n if inverse else 1)
    tolerance = 4 * (1 + math.log2(n)) * eps(np.float32) * scale
    assert got.dtype == np.complex64
    assert np.all(np.abs(got - want) <= tolerance)


@pytest.mark.parametrize("dtype", ["complex64", "float32"])
@pytest.mark.parametrize("shape", [(1,), (7,), (1023,), (1024,), (3, 5), (2, 3, 64), (0, 8)])
@pytest.mark.parametrize("inverse", [False, True])
def test_fft_matches_numpy(dtype, shape, inverse):
    x = random(shape, dtype, np.random.default_rng(14), -1, 1)
    assert_fft_close(run1("fft", [x], {"inverse": inverse}), x, inverse)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fft_any_layout(layout):
    x = laid_out(random((6, 16), "complex64", np.random.default_rng(15)), layout)
    assert_fft_close(run1("fft", [x]), x, False)


def test_fft_then_inverse_round_trips():
    x = random((4, 256), "complex64", np.random.default_rng(16))
    back = run1("fft", [run1("fft", [x])], {"inverse": True})
    np.testing.assert_allclose(back, x, atol=1e-5)


# --------------------------------------------------------------------------
# warmup
# --------------------------------------------------------------------------


def test_after_warmup_no_call_compiles_anything():
    """Every (kernel, signature) that run uses, serial and parallel, is warmed up."""
    cpu.warmup()
    compiled = {
        id(k): (len(k.serial.signatures), len(k.parallel.signatures)) for k in cpu._Kernel.instances
    }
    assert all(s > 0 and s == p for s, p in compiled.values())
    rng = np.random.default_rng(17)
    for op, dtypes in cpu.SUPPORTED_DTYPES.items():
        for dtype, size, layout in itertools.product(dtypes, (3, 1 << 16), LAYOUTS):
            x = laid_out(random((size // 4 + 1, 4), dtype, rng, 1, 9), layout)
            inputs, params = [x], [{}]
            if op in BINARY:
                inputs = [x, x[:1, :1].reshape(1)]
            elif op == "matmul":
                inputs = [x.T, x]
            elif op == "conv2d":
                inputs, params = (
                    [x.reshape(1, 1, -1, 4), np.ones((2, 1, 3, 3), dtype)],
                    [{"padding": 1}],
                )
            elif op == "scale":
                params = [{"factor": 2}]
            elif op in ("sum", "max", "mean"):
                params = [{}, {"axis": 0}, {"axis": 1}]
            for p in params:
                run1(op, inputs, p)
    after = {
        id(k): (len(k.serial.signatures), len(k.parallel.signatures)) for k in cpu._Kernel.instances
    }
    assert after == compiled


def test_warmup_reports_every_step_and_stamps_numbas_cache():
    steps: list[str] = []
    cpu.warmup(steps.append, jobs=1)
    assert len(steps) == cpu.warmup_steps()
    assert steps[0] == "add float32" and steps[-1].endswith("(parallel)")
    assert cpu._warm_stamp().exists()  # the next warm-up only loads
