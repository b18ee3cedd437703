// Elementwise ops: one thread per output element. The host rounds the grid up to whole
// threadgroups, so every kernel ignores threads past n.
//
// Built with fast math off (MTLCompileOptions / -fno-fast-math): nan and inf follow IEEE
// 754 as in NumPy, which fast math would let the compiler assume away.

#include <metal_stdlib>
using namespace metal;

#define INSTANTIATE(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;

// a_step and b_step are 1 for a whole operand and 0 for a scalar one (shape () or (1,)),
// so one kernel serves every operand layout the catalog allows.
struct BinaryArgs {
  uint n;
  uint a_step;
  uint b_step;
};

struct UnaryArgs {
  uint n;
  float factor;  // scale only
};

// int32 and int64 wrap on overflow as NumPy's do. Signed overflow is undefined in C++ and
// so in MSL; unsigned arithmetic wraps, and its low bits are the two's-complement result.
struct Add {
  float operator()(float a, float b) const { return a + b; }
  int operator()(int a, int b) const { return as_type<int>(as_type<uint>(a) + as_type<uint>(b)); }
  long operator()(long a, long b) const {
    return as_type<long>(as_type<ulong>(a) + as_type<ulong>(b));
  }
};

struct Sub {
  float operator()(float a, float b) const { return a - b; }
  int operator()(int a, int b) const { return as_type<int>(as_type<uint>(a) - as_type<uint>(b)); }
  long operator()(long a, long b) const {
    return as_type<long>(as_type<ulong>(a) - as_type<ulong>(b));
  }
};

struct Mul {
  float operator()(float a, float b) const { return a * b; }
  int operator()(int a, int b) const { return as_type<int>(as_type<uint>(a) * as_type<uint>(b)); }
  long operator()(long a, long b) const {
    return as_type<long>(as_type<ulong>(a) * as_type<ulong>(b));
  }
};

struct Div {
  float operator()(float a, float b) const { return a / b; }  // x/0 is +-inf or nan
};

template <typename T, typename Op>
[[kernel]] void binary(
    device const T* a [[buffer(0)]],
    device const T* b [[buffer(1)]],
    device T* out [[buffer(2)]],
    constant BinaryArgs& args [[buffer(3)]],
    uint i [[thread_position_in_grid]]) {
  if (i >= args.n) {
    return;
  }
  out[i] = Op()(a[i * args.a_step], b[i * args.b_step]);
}

struct Relu {
  // "x < 0 ? 0 : x" rather than max(x, 0): nan stays nan, as in np.maximum(x, 0)
  template <typename T>
  T operator()(T x, constant UnaryArgs&) const { return x < T(0) ? T(0) : x; }
};

struct Exp {
  float operator()(float x, constant UnaryArgs&) const { return precise::exp(x); }
};

struct Scale {
  float operator()(float x, constant UnaryArgs& args) const { return x * args.factor; }
};

// erfc(|x| / sqrt 2), to a few ulp of relative error over the whole range: the Chebyshev
// fit "erfcc" of Numerical Recipes (MSL has no erf). Relative accuracy matters: for very
// negative x, gelu is 0.5 * x * erfc(|x| / sqrt 2), a tiny number that 1 + erf(x / sqrt 2)
// would lose to cancellation. The Gaussian factor exp(-x^2 / 2) is taken from x itself
// (x * x, its rounding error recovered with fma, halved exactly) rather than from the
// rounded z = |x| / sqrt 2: that keeps the error near 5e-7 instead of 2e-5 at |x| = 12.
inline float erfc_of_abs_over_sqrt2(float ax) {
  if (!(ax < 16.0f)) {
    return 0.0f;  // erfc(16 / sqrt 2) < 1e-57: zero in float32 (and nan stays with x)
  }
  float z = ax * 0.70710678118654752f;
  float t = 1.0f / (1.0f + 0.5f * z);
  float poly = -1.26551223f +
      t * (1.00002368f +
      t * (0.37409196f +
      t * (0.09678418f +
      t * (-0.18628806f +
      t * (0.27886807f +
      t * (-1.13520398f +
      t * (1.48851587f +
      t * (-0.82215223f +
      t * 0.17087277f))))))));
  float xx = ax * ax;
  float xx_error = fma(ax, ax, -xx);  // ax * ax == xx + xx_error exactly
  return t * precise::exp(poly) * precise::exp(-0.5f * xx) * (1.0f - 0.5f * xx_error);
}

struct Gelu {
  // exact GELU, 0.5 * x * (1 + erf(x / sqrt 2)), written with erfc:
  // 1 + erf(x / sqrt 2) is 2 - erfc(|x| / sqrt 2) for x >= 0 and erfc(|x| / sqrt 2) below.
  float operator()(float x, constant UnaryArgs&) const {
    float c = erfc_of_abs_over_sqrt2(fabs(x));
    return 0.5f * x * (x >= 0.0f ? 2.0f - c : c);
  }
};

template <typename T, typename Op>
[[kernel]] void unary(
    device const T* x [[buffer(0)]],
    device T* out [[buffer(1)]],
    constant UnaryArgs& args [[buffer(2)]],
    uint i [[thread_position_in_grid]]) {
  if (i >= args.n) {
    return;
  }
  out[i] = Op()(x[i], args);
}

// clang-format off
INSTANTIATE("add_float32", binary, float, Add)
INSTANTIATE("add_int32", binary, int, Add)
INSTANTIATE("sub_float32", binary, float, Sub)
INSTANTIATE("sub_int32", binary, int, Sub)
INSTANTIATE("mul_float32", binary, float, Mul)
INSTANTIATE("mul_int32", binary, int, Mul)
INSTANTIATE("div_float32", binary, float, Div)
INSTANTIATE("relu_float32", unary, float, Relu)
INSTANTIATE("relu_int32", unary, int, Relu)
INSTANTIATE("add_int64", binary, long, Add)
INSTANTIATE("sub_int64", binary, long, Sub)
INSTANTIATE("mul_int64", binary, long, Mul)
INSTANTIATE("relu_int64", unary, long, Relu)
INSTANTIATE("exp_float32", unary, float, Exp)
INSTANTIATE("scale_float32", unary, float, Scale)
INSTANTIATE("gelu_float32", unary, float, Gelu)
// clang-format on
