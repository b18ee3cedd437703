"""The op catalog and the validation of a call against it.

Every task passes through :func:`validate` before any tensor is allocated: it
checks dtypes, shapes and params against the op's signature, normalises the
params (defaults, integer coercion, negative axes) and infers the outputs, so
the executor can size its buffers and refuse oversized work up front. Nothing
here allocates arrays of the caller's shapes; sizes are Python integers.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, SupportsInt, TypeGuard, cast

__all__ = [
    "CATALOG",
    "FieldViolation",
    "Limits",
    "OpSpec",
    "OpValidationError",
    "ParamSpec",
    "ParamType",
    "TensorMeta",
    "ValidatedCall",
    "list_ops",
    "validate",
]


class ParamType(Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    INTS = "ints"  # an int or a list of ints


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class OpValidationError(ValueError):
    """A call that does not fit its op's signature; carries every violation found."""

    def __init__(self, violations: list[FieldViolation]):
        self.violations = list(violations)
        super().__init__("; ".join(v.description for v in self.violations))


@dataclass(frozen=True)
class TensorMeta:
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: ParamType
    required: bool = False
    default: object = None
    description: str = ""


@dataclass(frozen=True)
class OpSpec:
    name: str
    kind: str  # "elementwise" | "reduction" | "linalg" | "nn" | "spectral"
    description: str
    num_inputs: int
    dtypes: tuple[str, ...]
    params: tuple[ParamSpec, ...]
    shape_rule: str


@dataclass(frozen=True)
class Limits:
    max_elements: int = 1 << 26  # per input tensor and per output tensor
    max_total_elements: int = 1 << 27  # all inputs + outputs of one task


@dataclass(frozen=True)
class ValidatedCall:
    op: OpSpec
    inputs: tuple[TensorMeta, ...]
    params: dict[str, object]
    outputs: tuple[TensorMeta, ...]


# --------------------------------------------------------------------------
# The catalog
# --------------------------------------------------------------------------

_FLOATS = ("float32", "float64")
_NUMERIC = ("float32", "float64", "int32", "int64")
_INTEGERS = ("int32", "int64")

_AXIS = ParamSpec(
    "axis",
    ParamType.INT,
    description="Axis to reduce; negative counts from the end. Absent: reduce all axes.",
)
_KEEPDIMS = ParamSpec(
    "keepdims",
    ParamType.BOOL,
    default=False,
    description="Keep reduced axes as length 1.",
)
_STRIDE = ParamSpec(
    "stride",
    ParamType.INTS,
    default=1,
    description="Step of the window: an int or [h, w], each >= 1 and at most the padded "
    "input's extent on that side.",
)
_PADDING = ParamSpec(
    "padding",
    ParamType.INTS,
    default=0,
    description="Zeros added on each side: an int or [h, w], each >= 0 and at most the "
    "kernel's extent on that side.",
)

_BINARY_RULE = "(...) op (...) -> (...): same shape, or one operand a scalar of shape () or (1,)"
_UNARY_RULE = "(...) -> (...)"
_REDUCTION_RULE = (
    "(d0,...,dn) -> the shape without the axis (or () for all axes); keepdims keeps it as 1"
)


def _binary(name: str, dtypes: tuple[str, ...], what: str) -> OpSpec:
    return OpSpec(name, "elementwise", what, 2, dtypes, (), _BINARY_RULE)


def _reduction(name: str, what: str) -> OpSpec:
    return OpSpec(name, "reduction", what, 1, _NUMERIC, (_AXIS, _KEEPDIMS), _REDUCTION_RULE)


_SPECS: tuple[OpSpec, ...] = (
    _binary("add", _NUMERIC, "Elementwise a + b."),
    _binary("sub", _NUMERIC, "Elementwise a - b."),
    _binary("mul", _NUMERIC, "Elementwise a * b."),
    _binary("div", _FLOATS, "Elementwise a / b; division by zero gives inf or nan (IEEE 754)."),
    OpSpec("relu", "elementwise", "max(x, 0); nan stays nan.", 1, _NUMERIC, (), _UNARY_RULE),
    OpSpec(
        "gelu",
        "elementwise",
        "Exact GELU: 0.5 * x * (1 + erf(x / sqrt(2))).",
        1,
        _FLOATS,
        (),
        _UNARY_RULE,
    ),
    OpSpec("exp", "elementwise", "Elementwise e**x.", 1, _FLOATS, (), _UNARY_RULE),
    OpSpec(
        "scale",
        "elementwise",
        "Elementwise x * factor.",
        1,
        _FLOATS,
        (ParamSpec("factor", ParamType.FLOAT, required=True, description="The multiplier."),),
        _UNARY_RULE,
    ),
    _reduction("sum", "Sum over an axis or all axes; integers sum to int64."),
    _reduction("max", "Maximum over an axis or all axes; nan propagates."),
    _reduction("mean", "Mean over an axis or all axes; integers average to float64."),
    OpSpec(
        "softmax",
        "nn",
        "Numerically stable softmax over the last axis.",
        1,
        _FLOATS,
        (),
        "(..., N) -> (..., N), ndim >= 1",
    ),
    OpSpec(
        "matmul",
        "linalg",
        "Matrix product, optionally batched.",
        2,
        _FLOATS,
        (),
        "(M,K) x (K,N) -> (M,N); (B,M,K) x (B,K,N) -> (B,M,N)",
    ),
    OpSpec(
        "transpose",
        "linalg",
        "Transpose of a matrix, as a new C-contiguous tensor.",
        1,
        ("float32", "float64", "int32", "int64", "complex64"),
        (),
        "(M,N) -> (N,M)",
    ),
    OpSpec(
        "conv2d",
        "nn",
        "2-D cross-correlation (as PyTorch's conv2d), no bias.",
        2,
        _FLOATS,
        (_STRIDE, _PADDING),
        "(N,C,H,W) x (O,C,KH,KW) -> (N,O,(H+2*ph-KH)//sh+1,(W+2*pw-KW)//sw+1)",
    ),
    OpSpec(
        "fft",
        "spectral",
        "1-D discrete Fourier transform over the last axis; float32 input is taken as real.",
        1,
        ("complex64", "float32"),
        (
            ParamSpec(
                "inverse",
                ParamType.BOOL,
                default=False,
                description="Compute the inverse transform (scaled by 1/n).",
            ),
        ),
        "(..., N) -> (..., N) complex64, N >= 1",
    ),
)

CATALOG: Mapping[str, OpSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})

# Why a dtype is refused, where the plain "allowed: ..." list would leave a user guessing.
_DTYPE_REASONS: Mapping[tuple[str, str], str] = {
    ("div", integer): "integer division is ambiguous (floor or truncate?), cast to float32 or "
    "float64 first"
    for integer in _INTEGERS
}


def unknown_op_description(op: str) -> str:
    """Names the closest ops of the catalog (difflib), then every op."""
    known = ", ".join(sorted(CATALOG))
    close = difflib.get_close_matches(op.lower(), CATALOG, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"op {op!r} is unknown{hint} (known ops: {known})"


def list_ops() -> list[OpSpec]:
    """The catalog, sorted by op name."""
    return sorted(CATALOG.values(), key=lambda spec: spec.name)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


class _Violations:
    """The violations found so far, in the order found."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))


_Metas = tuple[TensorMeta, ...]
# Params after their checks: each holds its type's value, or _INVALID.
_Params = dict[str, Any]
_Infer = Callable[[OpSpec, _Metas, _Params, _Violations], _Metas]


def validate(
    op: str,
    inputs: Sequence[TensorMeta],
    params: Mapping[str, object],
    limits: Limits = Limits(),
) -> ValidatedCall:
    """Check a call against the catalog; return it normalised, with inferred outputs.

    Raises OpValidationError carrying every violation found.
    """
    spec = CATALOG.get(op)
    if spec is None:
        raise OpValidationError([FieldViolation("op", unknown_op_description(op))])

    errors = _Violations()
    inputs = tuple(inputs)
    count_ok = len(inputs) == spec.num_inputs
    if not count_ok:
        errors.add(
            "inputs",
            f"{spec.name} takes {_count(spec.num_inputs, 'input')}, got {len(inputs)}",
        )

    shapes_ok = all([_check_input(spec, i, t, limits, errors) for i, t in enumerate(inputs)])
    if shapes_ok:  # tuples of Python ints, whatever sequence or integer type came in
        inputs = tuple(TensorMeta(t.dtype, tuple(int(d) for d in t.shape)) for t in inputs)
    norm = _check_params(spec, params, errors)

    # The shape rules run whenever the shapes can be read, so one reply names
    # every problem; a param that failed its type check shows up as _INVALID.
    outputs: tuple[TensorMeta, ...] = ()
    if count_ok and shapes_ok:
        outputs = _INFER[spec.name](spec, inputs, norm, errors)
        # An oversized input already explains an oversized output or total.
        if all(t.size <= limits.max_elements for t in inputs):
            _check_output_limits(inputs, outputs, limits, errors)

    if errors.items:
        raise OpValidationError(errors.items)
    return ValidatedCall(spec, inputs, norm, outputs)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _all_integers(shape: tuple[object, ...]) -> TypeGuard[tuple[int, ...]]:
    return all(not isinstance(d, bool) and isinstance(d, numbers.Integral) for d in shape)


def _check_input(spec: OpSpec, i: int, t: TensorMeta, limits: Limits, errors: _Violations) -> bool:
    """Checks one input's dtype, dims and size; returns whether its shape is usable."""
    if t.dtype not in spec.dtypes:
        reason = _DTYPE_REASONS.get((spec.name, t.dtype))
        errors.add(
            f"inputs[{i}].dtype",
            f"inputs[{i}].dtype {t.dtype!r} is not supported by {spec.name}"
            + (f": {reason}" if reason else "")
            + f"; allowed: {', '.join(spec.dtypes)}"
            + (f" (convert first, e.g. x.astype({spec.dtypes[0]!r}))" if not reason else ""),
        )
    shape: tuple[object, ...] = tuple(t.shape)  # from the wire: checked here
    if not _all_integers(shape):
        errors.add(f"inputs[{i}].shape", f"inputs[{i}].shape {shape} must hold integers")
        return False
    if any(d < 0 for d in shape):
        errors.add(
            f"inputs[{i}].shape",
            f"inputs[{i}].shape {shape} has a negative dimension; dims must be >= 0",
        )
        return False
    size = math.prod(int(d) for d in shape)
    if size > limits.max_elements:
        errors.add(
            f"inputs[{i}].shape",
            f"inputs[{i}].shape {shape} holds {size} elements, over the limit of "
            f"{limits.max_elements} elements per tensor",
        )
    return True


def _check_output_limits(
    inputs: tuple[TensorMeta, ...],
    outputs: tuple[TensorMeta, ...],
    limits: Limits,
    errors: _Violations,
) -> None:
    for j, out in enumerate(outputs):
        if out.size > limits.max_elements:
            errors.add(
                "inputs",
                f"output {j} of shape {out.shape} would hold {out.size} elements, over the limit "
                f"of {limits.max_elements} elements per tensor",
            )
    total = sum(t.size for t in inputs) + sum(t.size for t in outputs)
    if outputs and total > limits.max_total_elements:
        errors.add(
            "inputs",
            f"inputs and outputs together hold {total} elements, over the limit of "
            f"{limits.max_total_elements} elements per task",
        )


# --- params ---------------------------------------------------------------


_INVALID = object()  # a param that failed its check; shape rules that need it stand down


def _check_params(
    spec: OpSpec, params: Mapping[str, object], errors: _Violations
) -> dict[str, object]:
    """Normalise params: every declared one present, defaults filled, numbers coerced."""
    declared = {p.name: p for p in spec.params}
    for name in params:
        if name not in declared:
            takes = ", ".join(declared) if declared else "no parameters"
            errors.add(
                f"params.{name}",
                f"params.{name}: unknown parameter; op {spec.name} takes {takes}",
            )

    norm: dict[str, object] = {}
    for p in spec.params:
        value = params.get(p.name)
        if value is None:  # absent, or an explicit null from a Struct
            if p.required:
                errors.add(
                    f"params.{p.name}",
                    f"params.{p.name} is required by {spec.name} ({p.type.value}: {p.description})",
                )
                norm[p.name] = _INVALID
            else:
                norm[p.name] = None if p.default is None else _coerce(p, p.default)
            continue
        try:
            norm[p.name] = _coerce(p, value)
        except ValueError as exc:
            errors.add(f"params.{p.name}", f"params.{p.name} {exc}")
            norm[p.name] = _INVALID
    return norm


def _coerce(p: ParamSpec, value: object) -> object:
    if p.type is ParamType.INT:
        return _as_int(value)
    if p.type is ParamType.FLOAT:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"must be a number, got {_show(value)}")
        try:
            return float(value)
        except OverflowError:  # an int beyond float64's range
            raise ValueError(f"is out of the float64 range, got {value!r}") from None
    if p.type is ParamType.BOOL:
        # bool only: 0/1 or "true" would hide a mistake on the caller's side
        if not isinstance(value, bool) and type(value).__name__ != "bool_":
            raise ValueError(f"must be true or false, got {_show(value)}")
        return bool(value)
    # INTS: kept as a tuple here; ops that need a fixed length expand it
    items = value if isinstance(value, (list, tuple)) else [value]
    ints = []
    for i, item in enumerate(items):
        try:
            ints.append(_as_int(item))
        except _OutOfRange as exc:
            at = f" (item {i})" if isinstance(value, (list, tuple)) else ""
            raise ValueError(f"{exc}{at}") from None
        except ValueError:
            raise ValueError(
                f"must be an integer or a list of integers, got {_show(value)}"
            ) from None
    return tuple(ints)


# Integer params travel to kernels as int64 (and Struct numbers are doubles, so
# 1e300 reads as an integer): anything beyond is refused here, not by a kernel.
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class _OutOfRange(ValueError):
    pass


def _as_int(value: object) -> int:
    # Struct carries every number as a double, so 2.0 means 2.
    if not isinstance(value, bool) and isinstance(value, numbers.Integral):
        number = int(value)
    elif (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and float(value).is_integer()
    ):
        number = int(cast(SupportsInt, value))  # numbers.Real does not declare __int__
    else:
        raise ValueError(f"must be an integer, got {_show(value)}")
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise _OutOfRange(f"must fit in a 64-bit integer, got {value!r:.40}")
    return number


def _show(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


# --- shape and dtype rules, one per kind ----------------------------------


def _same_dtype(spec: OpSpec, inputs: tuple[TensorMeta, ...], errors: _Violations) -> None:
    """Reports inputs whose dtype differs from the first one's."""
    if any(t.dtype not in spec.dtypes for t in inputs):
        return  # already reported by _check_input; a mismatch would say it twice
    first = inputs[0].dtype
    for i, t in enumerate(inputs[1:], start=1):
        if t.dtype != first:
            errors.add(
                f"inputs[{i}].dtype",
                f"inputs[{i}].dtype {t.dtype!r} differs from inputs[0].dtype {first!r}; "
                f"{spec.name} takes inputs of one dtype (cast one of them)",
            )


def _is_scalar(shape: tuple[int, ...]) -> bool:
    return shape == () or shape == (1,)


def _infer_binary(spec: OpSpec, inputs: _Metas, params: _Params, errors: _Violations) -> _Metas:
    a, b = inputs
    _same_dtype(spec, inputs, errors)
    if a.shape == b.shape or _is_scalar(b.shape):
        shape = a.shape
    elif _is_scalar(a.shape):
        shape = b.shape
    else:
        errors.add(
            "inputs[1].shape",
            f"inputs[1].shape {b.shape} does not match inputs[0].shape {a.shape}; {spec.name} "
            "takes two tensors of the same shape, or one scalar operand of shape () or (1,) "
            "(no other broadcasting)",
        )
        return ()
    return (TensorMeta(a.dtype, shape),)


def _infer_unary(spec: OpSpec, inputs: _Metas, params: _Params, errors: _Violations) -> _Metas:
    (x,) = inputs
    return (TensorMeta(x.dtype, x.shape),)


def _infer_reduction(spec: OpSpec, inputs: _Metas, params: _Params, errors: _Violations) -> _Metas:
    (x,) = inputs
    ndim = len(x.shape)
    axis = params["axis"]
    if axis is _INVALID or params["keepdims"] is _INVALID:
        return ()
    if axis is not None:
        if not -ndim <= axis < ndim:
            valid = f"in [{-ndim}, {ndim - 1}]" if ndim else "absent (a 0-d tensor has no axes)"
            errors.add(
                "params.axis",
                f"params.axis {axis} is out of range for a {ndim}-d input; it must be {valid}",
            )
            return ()
        axis %= ndim
        params["axis"] = axis
        axes: tuple[int, ...] = (axis,)
    else:
        axes = tuple(range(ndim))

    extent = math.prod(x.shape[a] for a in axes)
    if extent == 0 and spec.name in ("max", "mean"):
        errors.add(
            "inputs[0].shape",
            f"{spec.name} over an empty extent is undefined: inputs[0].shape {x.shape} has "
            f"no elements along {'axis ' + str(axis) if axis is not None else 'its axes'}",
        )
        return ()

    if params["keepdims"]:
        shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
    else:
        shape = tuple(d for a, d in enumerate(x.shape) if a not in axes)
    dtype = x.dtype
    if x.dtype in _INTEGERS and spec.name == "sum":
        dtype = "int64"
    elif x.dtype in _INTEGERS and spec.name == "mean":
        dtype = "float64"
    return (TensorMeta(dtype, shape),)


def _infer_softmax(spec: OpSpec, inputs: _Metas, params: _Params, errors: _Violations) -> _Metas:
    (x,) = inputs
    if len(x.shape) < 1:
        errors.add(
            "inputs[0].shape",
            "inputs[0].shape () is 0-d; softmax runs over the last axis and needs ndim >= 1",
        )
        return ()
    return (TensorMeta(x.dtype, x.shape),)


def _infer_matmul(spec: OpSpec, inputs: _Metas, params: _Params, errors: _Violations) -> _Metas:
    a, b = inputs
    _same_dtype(spec, inputs, errors)
    if len(a.shape) not in (2, 3):
        errors.add(
            "inputs[0].shape",
            f"inputs[0].shape {a.shape} must be 2-d (M,K) or 3-d (B,M,K)",
        )
        return ()
    if len(b.shape) != len(a.shape):
        want = "(K,N)" if len(a.shape) == 2 else "(B,K,N)"
        errors.add(
            "inputs[1].shape",
            f"inputs[1].shape {b.shape} must be {len(a.shape)}-d {want} to match inputs[0].shape "
            f"{a.shape}",
        )
        return ()
    ok = True
    if a.shape[-1] != b.shape[-2]:
        errors.add(
            "inputs[1].shape",
            f"inner dimensions differ: inputs[0].shape {a.shape} has K={a.shape[-1]} but "
            f"inputs[1].shape {b.shape} has K={b.shape[-2]}",
        )
        ok = False
    if len(a.shape) == 3 and a.shape[0] != b.shape[0]:
        errors.add(
            "inputs[1].shape",
            f"batch dimensions differ: inputs[0].shape {a.shape} has B={a.shape[0]} but "
            f"inputs[1].shape {b.shape} has B={b.shape[0]} (no broadcasting)",
        )
        ok = False
    if not ok:
        return ()
    return (TensorMeta(a.dtype, (*a.shape[:-1], b.shape[-1])),)


def _infer_transpose(spec: OpSpec, inputs: _Metas, params: _Params, errors: _Violations) -> _Metas:
    (x,) = inputs
    if len(x.shape) != 2:
        errors.add(
            "inputs[0].shape", f"inputs[0].shape {x.shape} must be 2-d; transpose takes a matrix"
        )
        return ()
    return (TensorMeta(x.dtype, (x.shape[1], x.shape[0])),)


def _pair(params: _Params, name: str, minimum: int, errors: _Violations) -> tuple[int, ...] | None:
    value: tuple[int, ...] = params[name]
    if value is _INVALID:
        return None
    if len(value) == 1:
        value = value * 2
    if len(value) != 2 or min(value) < minimum:
        errors.add(
            f"params.{name}",
            f"params.{name} {list(value)} must be an integer or [h, w], each >= {minimum}",
        )
        return None
    params[name] = value
    return value


def _infer_conv2d(spec: OpSpec, inputs: _Metas, params: _Params, errors: _Violations) -> _Metas:
    x, w = inputs
    _same_dtype(spec, inputs, errors)
    stride = _pair(params, "stride", 1, errors)
    padding = _pair(params, "padding", 0, errors)
    shapes_ok = True
    if len(x.shape) != 4:
        errors.add("inputs[0].shape", f"inputs[0].shape {x.shape} must be 4-d (N,C,H,W)")
        shapes_ok = False
    if len(w.shape) != 4:
        errors.add("inputs[1].shape", f"inputs[1].shape {w.shape} must be 4-d (O,C,KH,KW)")
        shapes_ok = False
    if not shapes_ok:
        return ()
    n, c, h, wd = x.shape
    o, wc, kh, kw = w.shape
    if wc != c:
        errors.add(
            "inputs[1].shape",
            f"inputs[1].shape {w.shape} has C={wc} input channels but inputs[0].shape {x.shape} "
            f"has C={c}",
        )
        shapes_ok = False
    if kh < 1 or kw < 1:
        errors.add(
            "inputs[1].shape",
            f"inputs[1].shape {w.shape} has an empty kernel window; KH and KW must be >= 1",
        )
        shapes_ok = False
    if not (shapes_ok and stride and padding):
        return ()
    (sh, sw), (ph, pw) = stride, padding
    # Padding past the kernel only adds outputs that see nothing but zeros; the
    # bound keeps every index a kernel computes (32-bit on some backends) small.
    if ph > kh or pw > kw:
        errors.add(
            "params.padding",
            f"params.padding {list(padding)} is wider than the {kh}x{kw} kernel of "
            f"inputs[1].shape {w.shape}; each side must be at most the kernel's extent",
        )
        return ()
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (wd + 2 * pw - kw) // sw + 1
    if oh < 1 or ow < 1:
        errors.add(
            "inputs[1].shape",
            f"the {kh}x{kw} kernel of inputs[1].shape {w.shape} does not fit the padded "
            f"{h + 2 * ph}x{wd + 2 * pw} input (padding {list(padding)}); the output would be "
            f"{oh}x{ow}, and each side must be >= 1",
        )
        return ()
    # A step past the padded input reads one window either way.
    if sh > h + 2 * ph or sw > wd + 2 * pw:
        errors.add(
            "params.stride",
            f"params.stride {list(stride)} is longer than the padded {h + 2 * ph}x"
            f"{wd + 2 * pw} input; each side must be at most the padded input's extent",
        )
        return ()
    return (TensorMeta(x.dtype, (n, o, oh, ow)),)


def _infer_fft(spec: OpSpec, inputs: _Metas, params: _Params, errors: _Violations) -> _Metas:
    (x,) = inputs
    if len(x.shape) < 1 or x.shape[-1] == 0:
        errors.add(
            "inputs[0].shape",
            f"inputs[0].shape {x.shape} has no points along a last axis; fft needs ndim >= 1 "
            "and a last dimension >= 1",
        )
        return ()
    return (TensorMeta("complex64", x.shape),)


_INFER: Mapping[str, _Infer] = MappingProxyType(
    {
        "add": _infer_binary,
        "sub": _infer_binary,
        "mul": _infer_binary,
        "div": _infer_binary,
        "relu": _infer_unary,
        "gelu": _infer_unary,
        "exp": _infer_unary,
        "scale": _infer_unary,
        "sum": _infer_reduction,
        "max": _infer_reduction,
        "mean": _infer_reduction,
        "softmax": _infer_softmax,
        "matmul": _infer_matmul,
        "transpose": _infer_transpose,
        "conv2d": _infer_conv2d,
        "fft": _infer_fft,
    }
)
