// sum, mean and max over one axis (or all axes), compiled once per dtype:
// -DKM_T=float|double (with -DKM_FLOAT) or -DKM_T=int.
//
// The input is seen as (P, R, Q) with R reduced; the host picks the layout:
// - Q == 1 ("rows"): the reduced elements are contiguous. Each row is cut into chunks,
//   one block per chunk, so a single huge row (axis=None) still fills the device; a
//   second kernel folds each row's chunk partials.
// - Q > 1 ("cols"): one thread per (p, chunk, q), neighbouring threads on neighbouring
//   q, so every load is coalesced; again a second kernel folds the chunks.
//
// Accumulation and output types follow the CPU backend (and NumPy): floats accumulate in
// double and return their own dtype; int32 sums to int64 and averages to float64.

#ifndef KM_T
#error "compile with -DKM_T=<element type>"
#endif
typedef KM_T T;

#ifdef KM_FLOAT
typedef double Acc;
typedef T SumOut;
typedef T MeanOut;
#else
typedef long long Acc;
typedef long long SumOut;
typedef double MeanOut;
#endif

#define FULL_MASK 0xffffffffu

struct SumOp {
    __device__ __forceinline__ Acc operator()(Acc a, Acc b) const { return a + b; }
    // the value idle lanes contribute
    __device__ __forceinline__ Acc neutral(Acc) const { return Acc(0); }
};

struct MaxOp {
    // nan propagates: once the running max is nan it stays nan, and a nan operand wins
    __device__ __forceinline__ T operator()(T a, T b) const {
        return (b > a || b != b) ? b : a;
    }
    // max has no portable identity for every T; any element of the set will do
    __device__ __forceinline__ T neutral(T any) const { return any; }
};

// The block's reduction of v, valid in thread 0. blockDim.x must be a multiple of 32.
template <typename V, typename Op>
__device__ V block_reduce(V v, Op op) {
    __shared__ V warp_results[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        v = op(v, __shfl_down_sync(FULL_MASK, v, offset));
    if (lane == 0) warp_results[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        v = lane < warps ? warp_results[lane] : op.neutral(warp_results[0]);
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1)
            v = op(v, __shfl_down_sync(FULL_MASK, v, offset));
    }
    __syncthreads();  // warp_results is reused by the caller's next iteration
    return v;
}

// --- Q == 1: x is (rows, n); part is (rows, chunks) -------------------------------

extern "C" __global__ void km_sum_rows_partial(const T* x, Acc* part, long long rows,
                                               long long n, long long chunk, long long chunks) {
    for (long long t = blockIdx.x; t < rows * chunks; t += gridDim.x) {
        const long long r = t / chunks;
        const long long lo = (t - r * chunks) * chunk;
        const long long hi = min(n, lo + chunk);
        const T* row = x + r * n;
        Acc s = 0;
        for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) s += Acc(row[i]);
        s = block_reduce(s, SumOp());
        if (threadIdx.x == 0) part[t] = s;
    }
}

extern "C" __global__ void km_max_rows_partial(const T* x, T* part, long long rows,
                                               long long n, long long chunk, long long chunks) {
    for (long long t = blockIdx.x; t < rows * chunks; t += gridDim.x) {
        const long long r = t / chunks;
        const long long lo = (t - r * chunks) * chunk;
        const long long hi = min(n, lo + chunk);
        const T* row = x + r * n;
        T m = row[lo];  // lo < n: the host never makes an empty chunk
        for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) m = MaxOp()(m, row[i]);
        m = block_reduce(m, MaxOp());
        if (threadIdx.x == 0) part[t] = m;
    }
}

template <typename V, typename Op>
__device__ __forceinline__ V fold_row(const V* part, long long chunks, Op op) {
    V v = part[0];
    for (long long c = threadIdx.x; c < chunks; c += blockDim.x) v = op(v, part[c]);
    return v;
}

// One block per row folds its chunk partials.
extern "C" __global__ void km_sum_rows_final(const Acc* part, SumOut* out, long long rows,
                                             long long chunks) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const Acc* p = part + r * chunks;
        Acc s = 0;
        for (long long c = threadIdx.x; c < chunks; c += blockDim.x) s += p[c];
        s = block_reduce(s, SumOp());
        if (threadIdx.x == 0) out[r] = SumOut(s);
    }
}

extern "C" __global__ void km_mean_rows_final(const Acc* part, MeanOut* out, long long rows,
                                              long long chunks, long long n) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const Acc* p = part + r * chunks;
        Acc s = 0;
        for (long long c = threadIdx.x; c < chunks; c += blockDim.x) s += p[c];
        s = block_reduce(s, SumOp());
        if (threadIdx.x == 0) out[r] = MeanOut(double(s) / double(n));
    }
}

extern "C" __global__ void km_max_rows_final(const T* part, T* out, long long rows,
                                             long long chunks) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        T m = fold_row(part + r * chunks, chunks, MaxOp());
        m = block_reduce(m, MaxOp());
        if (threadIdx.x == 0) out[r] = m;
    }
}

// --- Q > 1: x is (planes, n, cols); part is (planes, chunks, cols) ------------------

extern "C" __global__ void km_sum_cols_partial(const T* x, Acc* part, long long planes,
                                               long long n, long long cols, long long chunk,
                                               long long chunks) {
    const long long tasks = planes * chunks * cols;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < tasks;
         t += (long long)gridDim.x * blockDim.x) {
        const long long q = t % cols;
        const long long pc = t / cols;
        const long long p = pc / chunks;
        const long long lo = (pc - p * chunks) * chunk;
        const long long hi = min(n, lo + chunk);
        const T* column = x + p * n * cols + q;
        Acc s = 0;
        for (long long r = lo; r < hi; ++r) s += Acc(column[r * cols]);
        part[t] = s;
    }
}

extern "C" __global__ void km_max_cols_partial(const T* x, T* part, long long planes,
                                               long long n, long long cols, long long chunk,
                                               long long chunks) {
    const long long tasks = planes * chunks * cols;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < tasks;
         t += (long long)gridDim.x * blockDim.x) {
        const long long q = t % cols;
        const long long pc = t / cols;
        const long long p = pc / chunks;
        const long long lo = (pc - p * chunks) * chunk;
        const long long hi = min(n, lo + chunk);
        const T* column = x + p * n * cols + q;
        T m = column[lo * cols];
        for (long long r = lo + 1; r < hi; ++r) m = MaxOp()(m, column[r * cols]);
        part[t] = m;
    }
}

extern "C" __global__ void km_sum_cols_final(const Acc* part, SumOut* out, long long planes,
                                             long long cols, long long chunks) {
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < planes * cols;
         t += (long long)gridDim.x * blockDim.x) {
        const long long p = t / cols;
        const Acc* column = part + p * chunks * cols + (t - p * cols);
        Acc s = 0;
        for (long long c = 0; c < chunks; ++c) s += column[c * cols];
        out[t] = SumOut(s);
    }
}

extern "C" __global__ void km_mean_cols_final(const Acc* part, MeanOut* out, long long planes,
                                              long long cols, long long chunks, long long n) {
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < planes * cols;
         t += (long long)gridDim.x * blockDim.x) {
        const long long p = t / cols;
        const Acc* column = part + p * chunks * cols + (t - p * cols);
        Acc s = 0;
        for (long long c = 0; c < chunks; ++c) s += column[c * cols];
        out[t] = MeanOut(double(s) / double(n));
    }
}

extern "C" __global__ void km_max_cols_final(const T* part, T* out, long long planes,
                                             long long cols, long long chunks) {
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < planes * cols;
         t += (long long)gridDim.x * blockDim.x) {
        const long long p = t / cols;
        const T* column = part + p * chunks * cols + (t - p * cols);
        T m = column[0];
        for (long long c = 1; c < chunks; ++c) m = MaxOp()(m, column[c * cols]);
        out[t] = m;
    }
}
