"""The op catalog and `validate`: shape and dtype inference, and every kind of violation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kernelmesh.core.ops import (
    CATALOG,
    FieldViolation,
    Limits,
    OpValidationError,
    ParamType,
    TensorMeta,
    list_ops,
    validate,
)

DEFAULT_LIMITS = Limits()


def t(dtype: str, *shape: int) -> TensorMeta:
    return TensorMeta(dtype, tuple(shape))


def violations(op, inputs, params=None, limits=DEFAULT_LIMITS) -> list[FieldViolation]:
    with pytest.raises(OpValidationError) as info:
        validate(op, inputs, params or {}, limits)
    return info.value.violations


def fields(op, inputs, params=None, limits=DEFAULT_LIMITS) -> list[str]:
    return [v.field for v in violations(op, inputs, params, limits)]


def output(op, inputs, params=None) -> TensorMeta:
    (out,) = validate(op, inputs, params or {}).outputs
    return out


# --------------------------------------------------------------------------
# The catalog
# --------------------------------------------------------------------------


def test_list_ops_is_the_whole_catalog_sorted_by_name():
    names = [spec.name for spec in list_ops()]
    assert names == sorted(CATALOG)
    assert set(names) == {
        "add", "sub", "mul", "div", "relu", "gelu", "exp", "scale", "sum", "max", "mean",
        "softmax", "matmul", "transpose", "conv2d", "fft",
    }  # fmt: skip


def test_catalog_entries_are_described():
    kinds = {"elementwise", "reduction", "linalg", "nn", "spectral"}
    for name, spec in CATALOG.items():
        assert spec.name == name and spec.kind in kinds
        assert spec.description and spec.shape_rule and spec.dtypes
        assert all(p.description for p in spec.params)


def test_catalog_is_read_only():
    with pytest.raises(TypeError):
        CATALOG["add"] = CATALOG["sub"]  # type: ignore[index]


def test_tensor_meta_size_counts_elements():
    assert t("float32").size == 1
    assert t("float32", 3, 4).size == 12
    assert t("float32", 3, 0).size == 0


def test_error_message_joins_the_descriptions():
    error = OpValidationError([FieldViolation("a", "first"), FieldViolation("b", "second")])
    assert str(error) == "first; second"
    assert isinstance(error, ValueError)


# --------------------------------------------------------------------------
# Inference, op by op
# --------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_binary_same_shape_keeps_shape_and_dtype(op, dtype):
    assert output(op, [t(dtype, 2, 3), t(dtype, 2, 3)]) == t(dtype, 2, 3)


@pytest.mark.parametrize("op", ["add", "sub", "mul"])
def test_binary_accepts_int32_except_div(op):
    assert output(op, [t("int32", 5), t("int32", 5)]) == t("int32", 5)


@pytest.mark.parametrize("scalar", [(), (1,)])
def test_binary_scalar_operand_takes_the_other_shape(scalar):
    assert output("sub", [t("float32", 4, 5), t("float32", *scalar)]).shape == (4, 5)
    assert output("sub", [t("float32", *scalar), t("float32", 4, 5)]).shape == (4, 5)


@pytest.mark.parametrize(("a", "b"), [((), (1,)), ((1,), ()), ((), ()), ((1,), (1,))])
def test_binary_two_scalars_take_the_first_shape(a, b):
    assert output("add", [t("float64", *a), t("float64", *b)]).shape == a


def test_binary_empty_tensors_are_valid():
    assert output("add", [t("float32", 0, 3), t("float32", 0, 3)]).shape == (0, 3)
    assert output("mul", [t("float32", 0), t("float32")]).shape == (0,)


@pytest.mark.parametrize(
    ("op", "dtype"),
    [("relu", "int32"), ("relu", "float32"), ("gelu", "float64"), ("exp", "float32")],
)
def test_unary_keeps_shape_and_dtype(op, dtype):
    assert output(op, [t(dtype, 7, 1, 3)]) == t(dtype, 7, 1, 3)
    assert output(op, [t(dtype)]) == t(dtype)


def test_scale_takes_a_float_factor():
    call = validate("scale", [t("float32", 3)], {"factor": 2})
    assert call.outputs == (t("float32", 3),)
    assert call.params == {"factor": 2.0} and isinstance(call.params["factor"], float)


@pytest.mark.parametrize(
    ("op", "dtype", "want"),
    [
        ("sum", "float32", "float32"),
        ("sum", "float64", "float64"),
        ("sum", "int32", "int64"),
        ("max", "int32", "int32"),
        ("max", "float32", "float32"),
        ("mean", "int32", "float64"),
        ("mean", "float32", "float32"),
        ("sum", "int64", "int64"),
        ("max", "int64", "int64"),
        ("mean", "int64", "float64"),
    ],
)
def test_reduction_output_dtype_follows_numpy(op, dtype, want):
    assert output(op, [t(dtype, 2, 3)]).dtype == want


def test_reduction_without_axis_reduces_everything():
    call = validate("sum", [t("float32", 2, 3, 4)], {})
    assert call.outputs == (t("float32"),)
    assert call.params == {"axis": None, "keepdims": False}


def test_reduction_keepdims_without_axis_keeps_every_axis_as_one():
    assert output("max", [t("float32", 2, 3, 4)], {"keepdims": True}).shape == (1, 1, 1)


@pytest.mark.parametrize(
    ("axis", "keepdims", "shape"),
    [(0, False, (3, 4)), (1, False, (2, 4)), (2, True, (2, 3, 1)), (1, True, (2, 1, 4))],
)
def test_reduction_over_one_axis(axis, keepdims, shape):
    assert (
        output("mean", [t("float64", 2, 3, 4)], {"axis": axis, "keepdims": keepdims}).shape == shape
    )


def test_negative_axis_is_normalised():
    call = validate("sum", [t("float32", 2, 3, 4)], {"axis": -1})
    assert call.params["axis"] == 2
    assert call.outputs[0].shape == (2, 3)


def test_integral_float_axis_is_coerced_to_int():
    # protobuf Struct carries every number as a double
    call = validate("sum", [t("float32", 2, 3)], {"axis": 1.0})
    assert call.params["axis"] == 1 and type(call.params["axis"]) is int


def test_sum_of_an_empty_extent_is_allowed():
    assert output("sum", [t("float32", 3, 0)], {"axis": 1}).shape == (3,)
    assert output("sum", [t("int32", 0)]).shape == ()


def test_max_over_a_nonempty_axis_of_an_empty_tensor_is_allowed():
    # the reduced extent has 4 elements; the output simply has none
    assert output("max", [t("float32", 0, 4)], {"axis": 1}).shape == (0,)


def test_softmax_keeps_shape():
    assert output("softmax", [t("float32", 4, 10)]) == t("float32", 4, 10)
    assert output("softmax", [t("float64", 5)]) == t("float64", 5)


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [((2, 3), (3, 4), (2, 4)), ((5, 2, 3), (5, 3, 7), (5, 2, 7)), ((0, 3), (3, 2), (0, 2))],
)
def test_matmul_shapes(a, b, want):
    assert output("matmul", [t("float32", *a), t("float32", *b)]) == t("float32", *want)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "complex64"])
def test_transpose_swaps_the_two_axes(dtype):
    assert output("transpose", [t(dtype, 2, 5)]) == t(dtype, 5, 2)


@pytest.mark.parametrize(
    ("params", "want", "stride", "padding"),
    [
        ({}, (2, 4, 6, 6), (1, 1), (0, 0)),
        ({"stride": 2, "padding": 1}, (2, 4, 4, 4), (2, 2), (1, 1)),
        ({"stride": [2.0, 1.0], "padding": [0, 2]}, (2, 4, 3, 10), (2, 1), (0, 2)),
    ],
)
def test_conv2d_output_shape_and_normalised_params(params, want, stride, padding):
    call = validate("conv2d", [t("float32", 2, 3, 8, 8), t("float32", 4, 3, 3, 3)], params)
    assert call.outputs == (t("float32", *want),)
    assert call.params == {"stride": stride, "padding": padding}


@pytest.mark.parametrize("dtype", ["complex64", "float32"])
def test_fft_outputs_complex64_of_the_same_shape(dtype):
    call = validate("fft", [t(dtype, 3, 16)], {"inverse": True})
    assert call.outputs == (t("complex64", 3, 16),)
    assert call.params == {"inverse": True}


def test_defaults_are_filled_in():
    assert validate("fft", [t("complex64", 4)], {}).params == {"inverse": False}


def test_explicit_null_param_means_absent():
    assert validate("sum", [t("float32", 2)], {"axis": None}).params["axis"] is None


def test_validated_call_carries_spec_and_inputs():
    inputs = [t("float32", 2, 3), t("float32", 3, 4)]
    call = validate("matmul", inputs, {})
    assert call.op is CATALOG["matmul"] and call.inputs == tuple(inputs)


# --------------------------------------------------------------------------
# Violations, kind by kind
# --------------------------------------------------------------------------


def test_unknown_op_names_the_known_ops():
    (violation,) = violations("frobnicate", [t("float32", 1)])
    assert violation.field == "op"
    assert "frobnicate" in violation.description and "matmul, max" in violation.description


@pytest.mark.parametrize(("op", "count"), [("add", 1), ("add", 3), ("relu", 2), ("matmul", 0)])
def test_wrong_input_count(op, count):
    (violation,) = violations(op, [t("float32", 2)] * count)
    assert violation.field == "inputs"
    assert f"got {count}" in violation.description


def test_unsupported_dtype_lists_the_allowed_ones():
    (violation,) = violations("exp", [t("int32", 3)])
    assert violation.field == "inputs[0].dtype"
    assert "float32, float64" in violation.description
    assert "x.astype('float32')" in violation.description  # how to convert, by example


def test_int64_is_accepted_by_elementwise_ops_and_reductions():
    for op in ("add", "sub", "mul"):
        assert output(op, [t("int64", 3), t("int64", 3)]).dtype == "int64"
    assert output("relu", [t("int64", 3)]).dtype == "int64"
    assert output("transpose", [t("int64", 2, 3)]) == t("int64", 3, 2)
    (violation,) = violations("div", [t("int64", 3), t("int64", 3)])[:1]
    assert "integer division is ambiguous" in violation.description


def test_unknown_dtype_name_is_a_violation():
    assert fields("relu", [t("float16", 3)]) == ["inputs[0].dtype"]


def test_int32_division_is_refused_with_its_reason():
    found = violations("div", [t("int32", 3), t("int32", 3)])
    assert [v.field for v in found] == ["inputs[0].dtype", "inputs[1].dtype"]
    assert "integer division is ambiguous" in found[0].description
    assert "cast to float32 or float64" in found[0].description


def test_mismatched_dtypes_name_the_second_input():
    (violation,) = violations("add", [t("float32", 3), t("float64", 3)])
    assert violation.field == "inputs[1].dtype"
    assert "float64" in violation.description and "float32" in violation.description


def test_unsupported_dtype_is_not_also_reported_as_a_mismatch():
    assert fields("add", [t("float32", 3), t("complex64", 3)]) == ["inputs[1].dtype"]


def test_shape_mismatch_explains_the_broadcasting_rule():
    (violation,) = violations("mul", [t("float32", 3, 4), t("float32", 4)])
    assert violation.field == "inputs[1].shape"
    assert "scalar operand of shape () or (1,)" in violation.description


@pytest.mark.parametrize("other", [(1, 1), (3, 1), (1, 4)])
def test_no_broadcasting_beyond_a_scalar_operand(other):
    assert fields("add", [t("float32", 3, 4), t("float32", *other)]) == ["inputs[1].shape"]


def test_negative_dimension_is_a_violation():
    (violation,) = violations("relu", [t("float32", 3, -1)])
    assert violation.field == "inputs[0].shape"
    assert ">= 0" in violation.description


def test_unknown_param_names_the_accepted_ones():
    (violation,) = violations("sum", [t("float32", 3)], {"foo": 1})
    assert violation.field == "params.foo"
    assert violation.description == "params.foo: unknown parameter; op sum takes axis, keepdims"


def test_unknown_param_on_an_op_without_params():
    (violation,) = violations("relu", [t("float32", 3)], {"axis": 0})
    assert "takes no parameters" in violation.description


@pytest.mark.parametrize("axis", [1.5, "1", True, [1], float("nan")])
def test_non_integer_int_param(axis):
    (violation,) = violations("sum", [t("float32", 3, 4)], {"axis": axis})
    assert violation.field == "params.axis"
    assert violation.description.startswith("params.axis must be an integer")


@pytest.mark.parametrize("keepdims", [1, 0, "true", None])
def test_bool_param_accepts_bools_only(keepdims):
    if keepdims is None:  # null: absent, the default applies
        assert validate("sum", [t("float32", 3)], {"keepdims": None}).params["keepdims"] is False
        return
    assert fields("sum", [t("float32", 3)], {"keepdims": keepdims}) == ["params.keepdims"]


@pytest.mark.parametrize("factor", ["2", True, [2.0], 10**400])
def test_float_param_must_be_a_number(factor):
    assert fields("scale", [t("float32", 3)], {"factor": factor}) == ["params.factor"]


def test_missing_required_param():
    (violation,) = violations("scale", [t("float32", 3)], {})
    assert violation.field == "params.factor"
    assert "required" in violation.description


@pytest.mark.parametrize(
    ("shape", "axis"), [((3, 4), 2), ((3, 4), -3), ((5,), 1), ((), 0), ((), -1)]
)
def test_axis_out_of_range(shape, axis):
    (violation,) = violations("max", [t("float32", *shape)], {"axis": axis})
    assert violation.field == "params.axis"
    assert "out of range" in violation.description


@pytest.mark.parametrize("op", ["max", "mean"])
@pytest.mark.parametrize(
    ("shape", "axis"), [((0,), None), ((3, 0), None), ((3, 0), 1), ((0, 2), 0)]
)
def test_max_and_mean_over_an_empty_extent(op, shape, axis):
    params = {} if axis is None else {"axis": axis}
    (violation,) = violations(op, [t("float32", *shape)], params)
    assert violation.field == "inputs[0].shape"
    assert "empty" in violation.description


@pytest.mark.parametrize("op", ["softmax", "fft"])
def test_last_axis_ops_need_a_dimension(op):
    assert fields(op, [t("float32")]) == ["inputs[0].shape"]


def test_fft_needs_at_least_one_point():
    assert fields("fft", [t("complex64", 4, 0)]) == ["inputs[0].shape"]


@pytest.mark.parametrize(
    ("a", "b"), [((2, 3), (4, 5)), ((2, 2, 3), (3, 3, 4)), ((2, 3), (2, 3, 4)), ((2, 3), (3,))]
)
def test_matmul_shape_mismatch_names_the_second_input(a, b):
    assert fields("matmul", [t("float32", *a), t("float32", *b)]) == ["inputs[1].shape"]


def test_matmul_mismatched_batch_and_inner_dims_are_both_reported():
    found = fields("matmul", [t("float32", 2, 2, 3), t("float32", 3, 4, 4)])
    assert found == ["inputs[1].shape", "inputs[1].shape"]


@pytest.mark.parametrize("shape", [(3,), (1, 2, 3, 4)])
def test_matmul_first_input_must_be_2d_or_3d(shape):
    assert fields("matmul", [t("float32", *shape), t("float32", 3, 3)]) == ["inputs[0].shape"]


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4), ()])
def test_transpose_takes_matrices_only(shape):
    assert fields("transpose", [t("float32", *shape)]) == ["inputs[0].shape"]


def test_conv2d_channel_mismatch():
    (violation,) = violations("conv2d", [t("float32", 1, 3, 8, 8), t("float32", 4, 2, 3, 3)])
    assert violation.field == "inputs[1].shape"
    assert "C=2" in violation.description and "C=3" in violation.description


def test_conv2d_kernel_larger_than_padded_input():
    (violation,) = violations(
        "conv2d", [t("float32", 1, 1, 4, 4), t("float32", 1, 1, 7, 7)], {"padding": 1}
    )
    assert violation.field == "inputs[1].shape"
    assert "does not fit" in violation.description


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"stride": 0}, "params.stride"),
        ({"stride": [1, 2, 3]}, "params.stride"),
        ({"stride": [1.5, 1]}, "params.stride"),
        ({"padding": -1}, "params.padding"),
        ({"padding": [0, -2]}, "params.padding"),
        ({"padding": True}, "params.padding"),
    ],
)
def test_conv2d_bad_stride_or_padding(params, field):
    assert fields("conv2d", [t("float32", 1, 1, 8, 8), t("float32", 1, 1, 3, 3)], params) == [field]


@pytest.mark.parametrize(
    "params",
    [
        {"stride": 2**63},
        {"stride": 1e300},
        {"stride": [1e300, 2]},
        {"stride": [1, -(2**63) - 1]},
        {"padding": 2**63},
        {"padding": 1e300},
        {"padding": [0, 1e300]},
    ],
)
def test_conv2d_stride_or_padding_past_int64_is_named(params):
    (violation,) = violations(
        "conv2d", [t("float32", 1, 1, 8, 8), t("float32", 1, 1, 3, 3)], params
    )
    assert violation.field == f"params.{next(iter(params))}"
    assert "64-bit integer" in violation.description


@pytest.mark.parametrize("axis", [2**63, 1e300, -(2**63) - 1])
def test_an_axis_past_int64_is_named(axis):
    (violation,) = violations("sum", [t("float32", 2, 2)], {"axis": axis})
    assert violation.field == "params.axis" and "64-bit integer" in violation.description


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"stride": 2**62}, "params.stride", "longer than the padded 8x8 input"),
        ({"stride": [1, 9]}, "params.stride", "longer than the padded 8x8 input"),
        ({"stride": 11, "padding": 1}, "params.stride", "padded 10x10"),
        ({"padding": 2**62}, "params.padding", "wider than the 3x3 kernel"),
        ({"padding": [3, 4]}, "params.padding", "wider than the 3x3 kernel"),
    ],
)
def test_conv2d_stride_and_padding_are_bounded_by_the_input_and_kernel(params, field, words):
    (violation,) = violations(
        "conv2d", [t("float32", 1, 1, 8, 8), t("float32", 1, 1, 3, 3)], params
    )
    assert violation.field == field and words in violation.description


def test_conv2d_stride_and_padding_at_their_bounds_are_valid():
    x, w = t("float32", 1, 1, 8, 8), t("float32", 1, 1, 3, 3)
    assert output("conv2d", [x, w], {"stride": 8}).shape == (1, 1, 1, 1)
    assert output("conv2d", [x, w], {"stride": [10, 1], "padding": [1, 3]}).shape == (1, 1, 1, 12)


@pytest.mark.parametrize(
    ("x", "w", "field"),
    [((1, 8, 8), (1, 1, 3, 3), "inputs[0].shape"), ((1, 1, 8, 8), (1, 3, 3), "inputs[1].shape")],
)
def test_conv2d_takes_4d_tensors(x, w, field):
    assert fields("conv2d", [t("float32", *x), t("float32", *w)]) == [field]


def test_all_violations_are_reported_at_once():
    found = fields(
        "add",
        [t("float32", 3), t("float64", 4)],
        {"alpha": 1},
    )
    assert sorted(found) == ["inputs[1].dtype", "inputs[1].shape", "params.alpha"]


def test_bad_params_do_not_hide_shape_problems():
    found = fields("conv2d", [t("float32", 1, 3, 8, 8), t("float32", 4, 2, 3, 3)], {"stride": 0})
    assert sorted(found) == ["inputs[1].shape", "params.stride"]


# --------------------------------------------------------------------------
# Limits: checked on sizes alone, before anything is allocated
# --------------------------------------------------------------------------


def test_oversized_input_is_refused_without_allocating():
    started = time.perf_counter()
    found = violations("relu", [t("float32", 1 << 40)])
    # Allocating (filling) 4 TiB would take minutes; 2 s leaves a loaded machine room.
    assert time.perf_counter() - started < 2.0
    assert [v.field for v in found] == ["inputs[0].shape"]
    assert str(Limits().max_elements) in found[0].description


def test_oversized_output_is_refused_without_allocating():
    # two small inputs whose product would be 2**40 elements
    started = time.perf_counter()
    found = violations("matmul", [t("float32", 1 << 20, 1), t("float32", 1, 1 << 20)])
    assert time.perf_counter() - started < 2.0
    assert [v.field for v in found] == ["inputs", "inputs"]  # the output, and the total
    assert "output 0" in found[0].description
    assert str(Limits().max_elements) in found[0].description


def test_limits_are_configurable_and_inclusive():
    limits = Limits(max_elements=12, max_total_elements=100)
    validate("relu", [t("float32", 3, 4)], {}, limits)  # exactly at the limit
    assert fields("relu", [t("float32", 13)], limits=limits) == ["inputs[0].shape"]


def test_total_elements_limit():
    limits = Limits(max_elements=100, max_total_elements=250)
    (violation,) = violations("add", [t("float32", 100), t("float32", 100)], limits=limits)
    assert violation.field == "inputs"
    assert "250" in violation.description


def test_each_oversized_input_gets_its_own_violation():
    limits = Limits(max_elements=10)
    found = fields("add", [t("float32", 11), t("float32", 11)], limits=limits)
    assert found == ["inputs[0].shape", "inputs[1].shape"]


# --------------------------------------------------------------------------
# Param types as the catalog declares them
# --------------------------------------------------------------------------


def test_param_specs_declare_types_and_defaults():
    conv = {p.name: p for p in CATALOG["conv2d"].params}
    assert conv["stride"].type is ParamType.INTS and conv["stride"].default == 1
    assert conv["padding"].type is ParamType.INTS and conv["padding"].default == 0
    (factor,) = CATALOG["scale"].params
    assert factor.type is ParamType.FLOAT and factor.required
    reduction = {p.name: p for p in CATALOG["sum"].params}
    assert reduction["axis"].type is ParamType.INT and not reduction["axis"].required
    assert reduction["keepdims"].default is False


def test_shapes_are_normalised_to_tuples_of_ints():
    call = validate("add", [TensorMeta("float32", [np.int64(2), 3]), t("float32")], {})
    assert call.inputs[0].shape == (2, 3) and type(call.inputs[0].shape[0]) is int
    assert call.outputs == (t("float32", 2, 3),)
