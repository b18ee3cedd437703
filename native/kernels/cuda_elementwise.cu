// Elementwise ops, compiled once per dtype: -DKM_T=float|double|int, plus -DKM_FLOAT for
// the floating types (the transcendental ops exist only there). The macro is not plain T:
// nvcc's implicitly included headers name template parameters T.
//
// Every kernel is a grid-stride loop. The contiguous paths move four elements per thread
// through one aligned vector access: buffers come straight from cuMemAlloc (256-byte
// aligned), so only the tail of n % 4 elements runs one element at a time.

#ifndef KM_T
#error "compile with -DKM_T=<element type>"
#endif
typedef KM_T T;

struct __align__(4 * sizeof(T)) Vec4 {
    T v[4];
};

__device__ __forceinline__ long long first_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long grid_stride() {
    return (long long)gridDim.x * blockDim.x;
}

template <typename F>
__device__ __forceinline__ void map_unary(const T* __restrict__ x, T* __restrict__ out,
                                          long long n, F f) {
    const long long n4 = n / 4;
    const Vec4* x4 = reinterpret_cast<const Vec4*>(x);
    Vec4* out4 = reinterpret_cast<Vec4*>(out);
    for (long long i = first_index(); i < n4; i += grid_stride()) {
        Vec4 v = x4[i];
#pragma unroll
        for (int k = 0; k < 4; ++k) v.v[k] = f(v.v[k]);
        out4[i] = v;
    }
    for (long long i = 4 * n4 + first_index(); i < n; i += grid_stride()) out[i] = f(x[i]);
}

// a_step / b_step are 1 for a full operand and 0 for a one-element (scalar) operand.
template <typename F>
__device__ __forceinline__ void map_binary(const T* __restrict__ a, const T* __restrict__ b,
                                           T* __restrict__ out, long long n, int a_step,
                                           int b_step, F f) {
    if (a_step == 1 && b_step == 1) {
        const long long n4 = n / 4;
        const Vec4* a4 = reinterpret_cast<const Vec4*>(a);
        const Vec4* b4 = reinterpret_cast<const Vec4*>(b);
        Vec4* out4 = reinterpret_cast<Vec4*>(out);
        for (long long i = first_index(); i < n4; i += grid_stride()) {
            Vec4 u = a4[i];
            const Vec4 w = b4[i];
#pragma unroll
            for (int k = 0; k < 4; ++k) u.v[k] = f(u.v[k], w.v[k]);
            out4[i] = u;
        }
        for (long long i = 4 * n4 + first_index(); i < n; i += grid_stride())
            out[i] = f(a[i], b[i]);
        return;
    }
    // a scalar operand: read it once, outside the loop
    if (a_step == 0 && b_step == 0) {
        for (long long i = first_index(); i < n; i += grid_stride()) out[i] = f(a[0], b[0]);
    } else if (b_step == 0) {
        const T s = b[0];
        map_unary(a, out, n, [s, f](T v) { return f(v, s); });
    } else {
        const T s = a[0];
        map_unary(b, out, n, [s, f](T v) { return f(s, v); });
    }
}

extern "C" __global__ void km_add(const T* a, const T* b, T* out, long long n, int a_step,
                                  int b_step) {
    map_binary(a, b, out, n, a_step, b_step, [](T u, T v) { return u + v; });
}

extern "C" __global__ void km_sub(const T* a, const T* b, T* out, long long n, int a_step,
                                  int b_step) {
    map_binary(a, b, out, n, a_step, b_step, [](T u, T v) { return u - v; });
}

extern "C" __global__ void km_mul(const T* a, const T* b, T* out, long long n, int a_step,
                                  int b_step) {
    map_binary(a, b, out, n, a_step, b_step, [](T u, T v) { return u * v; });
}

extern "C" __global__ void km_relu(const T* x, T* out, long long n) {
    // "v < 0 ? 0 : v", not max(v, 0): nan stays nan, as in the CPU backend and NumPy
    map_unary(x, out, n, [](T v) { return v < T(0) ? T(0) : v; });
}

#ifdef KM_FLOAT

extern "C" __global__ void km_div(const T* a, const T* b, T* out, long long n, int a_step,
                                  int b_step) {
    // IEEE division (nvcc's default -prec-div=true): x/0 is inf or nan, as in NumPy
    map_binary(a, b, out, n, a_step, b_step, [](T u, T v) { return u / v; });
}

extern "C" __global__ void km_scale(const T* x, T* out, long long n, T factor) {
    map_unary(x, out, n, [factor](T v) { return v * factor; });
}

extern "C" __global__ void km_exp(const T* x, T* out, long long n) {
    map_unary(x, out, n, [](T v) { return exp(v); });
}

extern "C" __global__ void km_gelu(const T* x, T* out, long long n) {
    // 0.5 x (1 + erf(x/sqrt2)) written as 0.5 x erfc(-x/sqrt2): the same value, without
    // the cancellation of 1 + erf(..) near -1 that loses every digit for x < -4 in float.
    const T rsqrt2 = T(0.70710678118654752440);
    map_unary(x, out, n, [rsqrt2](T v) { return T(0.5) * v * erfc(-v * rsqrt2); });
}

#endif
