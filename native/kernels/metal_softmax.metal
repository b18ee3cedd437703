// Numerically stable softmax over the last axis: one threadgroup per row, its threads
// striding over the row. Three passes over the row: the max (nan propagates), the sum of
// exp(x - max), then the normalised exponentials. Subtracting the row max keeps every
// exp <= 1, so nothing overflows whatever the inputs, as in the CPU backend.

#include <metal_stdlib>
using namespace metal;

#define INSTANTIATE(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;

// The threadgroup-memory size; the host dispatches a power of two of threads up to this.
constant constexpr uint MAX_GROUP = 256;

struct SoftmaxArgs {
  uint n;  // row length, >= 1
};

struct NanMax {
  float operator()(float a, float b) const { return (b > a || isnan(b)) ? b : a; }
};

struct Plus {
  float operator()(float a, float b) const { return a + b; }
};

// Combines one value per thread and hands the result to every thread; `shared` is free
// again on return, so the next call may reuse it. `threads` is a power of two.
template <typename Op>
float combine_in_group(float value, threadgroup float* shared, uint tid, uint threads) {
  shared[tid] = value;
  for (uint stride = threads / 2; stride > 0; stride /= 2) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid < stride) {
      shared[tid] = Op()(shared[tid], shared[tid + stride]);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float result = shared[0];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return result;
}

template <typename T>
[[kernel]] void softmax(
    device const T* x [[buffer(0)]],
    device T* out [[buffer(1)]],
    constant SoftmaxArgs& args [[buffer(2)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  threadgroup float shared[MAX_GROUP];
  device const T* in_row = x + row * args.n;
  device T* out_row = out + row * args.n;

  float m = -INFINITY;
  for (uint j = tid; j < args.n; j += threads) {
    m = NanMax()(m, float(in_row[j]));
  }
  m = combine_in_group<NanMax>(m, shared, tid, threads);

  float total = 0.0f;
  for (uint j = tid; j < args.n; j += threads) {
    total += precise::exp(float(in_row[j]) - m);
  }
  total = combine_in_group<Plus>(total, shared, tid, threads);

  // one division per row, then products, as the CPU backend does
  float inverse = 1.0f / total;
  for (uint j = tid; j < args.n; j += threads) {
    out_row[j] = T(precise::exp(float(in_row[j]) - m) * inverse);
  }
}

INSTANTIATE("softmax_float32", softmax, float)
