// Reductions (sum, max, mean) over an axis of a C-contiguous tensor seen as (P, R, Q),
// R reduced, and softmax over the last axis. Build options:
//   -D T=<float|double|int|long>  the input type
//   -D SUM_ACC=<double|float|long>  what sums accumulate in (int64 for integers; float64
//                               for floats when the device has fp64)
//   -D SUM_OUT, -D MEAN_OUT     output types of sum and mean (integers: long and double)
//   -D T_MIN=<INT_MIN|LONG_MIN> with INTEGER: T's least value
//   -D WIDE=<double|float>     the type of a mean's division and softmax's sum
//   -D INTEGER, -D HAVE_FP64
//   -D LOCAL=<n>               the work-group size (a power of two)
//
// Two passes: `partial_*` splits each reduced row into `chunks` pieces, one work-group per
// piece, so a single long row still spreads over every compute unit; `finish_*` combines
// a row's partials, one work-item per output.

#ifdef HAVE_FP64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif

#define SUM_IDENTITY ((SUM_ACC)0)
#define SUM(a, b) ((a) + (b))

#ifdef INTEGER
#define MAX_IDENTITY T_MIN
#define MAX(a, b) max(a, b)
#else
#define MAX_IDENTITY ((T)-INFINITY)
// nan wins, as in np.max: once m is nan, "v > m" is false and m stays nan
#define MAX(m, v) (((v) > (m) || isnan(v)) ? (v) : (m))
#endif

#define PARTIAL(name, ACC, IDENTITY, COMBINE)                                              \
    __kernel __attribute__((reqd_work_group_size(LOCAL, 1, 1))) void name(                 \
        __global const T *x, __global ACC *partial, const uint rows, const uint cols,      \
        const uint chunk, const uint chunks) {                                             \
        __local ACC scratch[LOCAL];                                                        \
        const uint lid = get_local_id(0);                                                  \
        const size_t group = get_group_id(0);                                              \
        const size_t line = group / chunks; /* = p * cols + q */                           \
        const uint start = (uint)(group % chunks) * chunk;                                 \
        const uint end = min(start + chunk, rows);                                         \
        const size_t p = line / cols, q = line % cols;                                     \
        __global const T *base = x + p * rows * cols + q;                                  \
        ACC acc = IDENTITY;                                                                \
        for (uint r = start + lid; r < end; r += LOCAL) acc = COMBINE(acc, (ACC)base[(size_t)r * cols]); \
        scratch[lid] = acc;                                                                \
        barrier(CLK_LOCAL_MEM_FENCE);                                                      \
        for (uint s = LOCAL / 2; s > 0; s >>= 1) {                                         \
            if (lid < s) scratch[lid] = COMBINE(scratch[lid], scratch[lid + s]);           \
            barrier(CLK_LOCAL_MEM_FENCE);                                                  \
        }                                                                                  \
        if (lid == 0) partial[group] = scratch[0];                                         \
    }

PARTIAL(partial_sum, SUM_ACC, SUM_IDENTITY, SUM)
PARTIAL(partial_max, T, MAX_IDENTITY, MAX)

__kernel void finish_sum(__global const SUM_ACC *partial, __global SUM_OUT *out,
                         const uint chunks, const uint outputs) {
    size_t i = get_global_id(0);
    if (i >= outputs) return;
    SUM_ACC acc = partial[i * chunks];
    for (uint c = 1; c < chunks; c++) acc += partial[i * chunks + c];
    out[i] = (SUM_OUT)acc;
}

__kernel void finish_mean(__global const SUM_ACC *partial, __global MEAN_OUT *out,
                          const uint chunks, const uint outputs, const uint count) {
    size_t i = get_global_id(0);
    if (i >= outputs) return;
    SUM_ACC acc = partial[i * chunks];
    for (uint c = 1; c < chunks; c++) acc += partial[i * chunks + c];
    out[i] = (MEAN_OUT)((WIDE)acc / (WIDE)count);
}

__kernel void finish_max(__global const T *partial, __global T *out, const uint chunks,
                         const uint outputs) {
    size_t i = get_global_id(0);
    if (i >= outputs) return;
    T acc = partial[i * chunks];
    for (uint c = 1; c < chunks; c++) acc = MAX(acc, partial[i * chunks + c]);
    out[i] = acc;
}

#ifndef INTEGER
// One work-group per row of length n. Subtracting the row's max keeps every exp <= 1: no
// overflow, whatever the inputs; the sum runs in WIDE.
__kernel __attribute__((reqd_work_group_size(LOCAL, 1, 1))) void softmax(
    __global const T *x, __global T *out, const uint n) {
    __local WIDE scratch[LOCAL];
    const uint lid = get_local_id(0);
    const size_t row = get_group_id(0);
    x += row * n;
    out += row * n;

    T m = MAX_IDENTITY;
    for (uint j = lid; j < n; j += LOCAL) m = MAX(m, x[j]);
    scratch[lid] = m;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint s = LOCAL / 2; s > 0; s >>= 1) {
        if (lid < s) scratch[lid] = MAX(scratch[lid], scratch[lid + s]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    m = (T)scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);

    WIDE total = 0;
    for (uint j = lid; j < n; j += LOCAL) {
        T e = exp(x[j] - m);
        out[j] = e;
        total += e;
    }
    scratch[lid] = total;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint s = LOCAL / 2; s > 0; s >>= 1) {
        if (lid < s) scratch[lid] += scratch[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const WIDE inverse = (WIDE)1 / scratch[0];
    for (uint j = lid; j < n; j += LOCAL) out[j] = (T)((WIDE)out[j] * inverse);
}
#endif
