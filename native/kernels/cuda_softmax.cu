// Numerically stable softmax over the last axis, one block per row:
// -DKM_T=float|double.
//
// Three passes over the row (max, sum of exp, scale), the same arithmetic as the CPU
// backend: exp in the element type, the total in double.

#ifndef KM_T
#error "compile with -DKM_T=<element type>"
#endif
typedef KM_T T;

#define FULL_MASK 0xffffffffu

struct SumOp {
    __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
    __device__ __forceinline__ double neutral(double) const { return 0.0; }
};

struct MaxOp {
    // nan propagates, as np.max does: a nan row gives a nan softmax
    __device__ __forceinline__ T operator()(T a, T b) const {
        return (b > a || b != b) ? b : a;
    }
    __device__ __forceinline__ T neutral(T any) const { return any; }
};

// The block's reduction of v, handed to every thread. blockDim.x: a multiple of 32.
template <typename V, typename Op>
__device__ V block_allreduce(V v, Op op) {
    __shared__ V warp_results[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        v = op(v, __shfl_down_sync(FULL_MASK, v, offset));
    if (lane == 0) warp_results[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? warp_results[lane] : op.neutral(warp_results[0]);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        v = op(v, __shfl_xor_sync(FULL_MASK, v, offset));  // xor: every lane gets the total
    __syncthreads();  // warp_results is reused by the next call
    return v;
}

extern "C" __global__ void km_softmax(const T* x, T* out, long long rows, long long n) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = x + r * n;
        T* result = out + r * n;

        T m = row[0];
        for (long long i = threadIdx.x; i < n; i += blockDim.x) m = MaxOp()(m, row[i]);
        m = block_allreduce(m, MaxOp());

        // subtracting the row max keeps every exp <= 1: no overflow, whatever the inputs
        double total = 0.0;
        for (long long i = threadIdx.x; i < n; i += blockDim.x) {
            const T e = exp(row[i] - m);
            result[i] = e;
            total += double(e);
        }
        total = block_allreduce(total, SumOp());

        const double inverse = 1.0 / total;
        // each thread rescales only the elements it wrote itself: no barrier needed
        for (long long i = threadIdx.x; i < n; i += blockDim.x)
            result[i] = T(double(result[i]) * inverse);
    }
}
