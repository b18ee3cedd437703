// Elementwise ops for one dtype. Build options:
//   -D T=<float|double|int|long>  the element type
//   -D INTEGER                 T is an integer type (no div, exp, gelu, scale)
//   -D UT=<uint|ulong>         with INTEGER: T's unsigned twin
//   -D WIDE=<double|float>     the type gelu computes in (double when the device has fp64)
//   -D HAVE_FP64               the device has cl_khr_fp64
// Every kernel takes the element count n and ignores work-items past it, so the host
// may round the global size up to a whole number of work-groups.

#ifdef HAVE_FP64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif

#ifdef INTEGER
// Signed overflow is undefined in OpenCL C; unsigned arithmetic wraps, as NumPy's int32
// and int64 do, and its low bits are the two's-complement result.
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define AS_T CAT(as_, T)
#define AS_UT CAT(as_, UT)
#define ADD(a, b) AS_T(AS_UT(a) + AS_UT(b))
#define SUB(a, b) AS_T(AS_UT(a) - AS_UT(b))
#define MUL(a, b) AS_T(AS_UT(a) * AS_UT(b))
#else
#define ADD(a, b) ((a) + (b))
#define SUB(a, b) ((a) - (b))
#define MUL(a, b) ((a) * (b))
#define DIV(a, b) ((a) / (b))
#endif

// Three kernels per binary op: both operands tensors, or one a scalar (one element) that
// is read once, so the loop over the other operand stays a plain stream.
#define BINARY(name, OP)                                                                  \
    __kernel void name##_tt(__global const T *a, __global const T *b, __global T *out,   \
                            const ulong n) {                                              \
        size_t i = get_global_id(0);                                                      \
        if (i < n) out[i] = OP(a[i], b[i]);                                               \
    }                                                                                     \
    __kernel void name##_ts(__global const T *a, __global const T *b, __global T *out,   \
                            const ulong n) {                                              \
        size_t i = get_global_id(0);                                                      \
        if (i < n) out[i] = OP(a[i], b[0]);                                               \
    }                                                                                     \
    __kernel void name##_st(__global const T *a, __global const T *b, __global T *out,   \
                            const ulong n) {                                              \
        size_t i = get_global_id(0);                                                      \
        if (i < n) out[i] = OP(a[0], b[i]);                                               \
    }

BINARY(add, ADD)
BINARY(sub, SUB)
BINARY(mul, MUL)

__kernel void relu(__global const T *x, __global T *out, const ulong n) {
    size_t i = get_global_id(0);
    if (i < n) {
        T v = x[i];
        // "v < 0 ? 0 : v" rather than max(v, 0): nan stays nan, as in np.maximum(x, 0)
        out[i] = v < 0 ? (T)0 : v;
    }
}

#ifndef INTEGER
BINARY(div, DIV)

__kernel void scale(__global const T *x, const T factor, __global T *out, const ulong n) {
    size_t i = get_global_id(0);
    if (i < n) out[i] = x[i] * factor;
}

__kernel void exp_(__global const T *x, __global T *out, const ulong n) {
    size_t i = get_global_id(0);
    if (i < n) out[i] = exp(x[i]);
}

__kernel void gelu(__global const T *x, __global T *out, const ulong n) {
    size_t i = get_global_id(0);
    if (i < n) {
        // the exact (erf) form, in WIDE: for negative x, 1 + erf(..) cancels, and float32's
        // erf alone would lose most of gelu's significant digits there
        WIDE v = (WIDE)x[i];
        out[i] = (T)((WIDE)0.5 * v * ((WIDE)1 + erf(v * (WIDE)M_SQRT1_2)));
    }
}
#endif
