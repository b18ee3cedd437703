// sum, max and mean over one axis or all axes. The host sees the C-contiguous input as
// (planes, n, cols) and reduces the middle extent n, giving planes * cols outputs:
//
// - *_group: one threadgroup per output; its threads stride over n and combine in
//   threadgroup memory. For few outputs over long extents.
// - *_thread: one thread per output, looping over n; adjacent threads read adjacent
//   columns. For many outputs over short extents, where a whole threadgroup per output
//   would sit mostly idle.
//
// Accumulators: int32 sums in 64-bit `long` (NumPy's int32 sum is int64); float32 sums
// in float32 with Kahan compensation per thread (Metal has no float64; the CPU backend
// sums in float64 and rounds once, and compensation keeps us within a few ulp of it).
// int32 mean is sum_int32 followed by the host's float64 division of the exact int64
// sum, so it matches the CPU backend bit for bit.

#include <metal_stdlib>
using namespace metal;

#define INSTANTIATE(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;

// The *_group kernels' threadgroup-memory size; the host dispatches a power of two of
// threads no larger than this.
constant constexpr uint MAX_GROUP = 256;

struct ReduceArgs {
  uint planes;
  uint n;  // the reduced extent, >= 1
  uint cols;
};

inline bool is_nan(float v) { return isnan(v); }
inline bool is_nan(int) { return false; }
inline bool is_nan(long) { return false; }

// max's identity: below every value (n >= 1, so it never reaches an output alone)
inline float lowest(float) { return -INFINITY; }
inline int lowest(int) { return -2147483647 - 1; }
inline long lowest(long) { return -9223372036854775807L - 1; }

struct SumFloat {
  typedef float In;
  typedef float Acc;
  typedef float Out;
  // Kahan's compensated sum, plus the plain sum: compensation turns inf - inf into nan,
  // so once the plain sum is not finite (an inf or nan input, or overflow) it is the
  // answer, as IEEE addition gives it.
  struct State {
    float sum;
    float compensation;
    float plain;
  };
  static State start() { return State{0.0f, 0.0f, 0.0f}; }
  static void add(thread State& s, float v) {
    float y = v - s.compensation;
    float t = s.sum + y;
    s.compensation = (t - s.sum) - y;
    s.sum = t;
    s.plain += v;
  }
  static float finish(State s) { return isfinite(s.plain) ? s.sum : s.plain; }
  static float combine(float a, float b) { return a + b; }
  static float result(float acc, uint) { return acc; }
};

struct MeanFloat : SumFloat {
  static float result(float acc, uint n) { return acc / float(n); }
};

// integer sums in 64 bits; an int64 sum that overflows wraps, as NumPy's does
template <typename I>
struct SumInt {
  typedef I In;
  typedef long Acc;
  typedef long Out;
  typedef long State;
  static State start() { return 0; }
  static void add(thread State& s, I v) {
    s = as_type<long>(as_type<ulong>(s) + as_type<ulong>(long(v)));
  }
  static long finish(State s) { return s; }
  static long combine(long a, long b) { return as_type<long>(as_type<ulong>(a) + as_type<ulong>(b)); }
  static long result(long acc, uint) { return acc; }
};

template <typename T>
struct Max {
  typedef T In;
  typedef T Acc;
  typedef T Out;
  typedef T State;
  static State start() { return lowest(T(0)); }
  // nan propagates, as in np.max: once the running max is nan, nothing compares above it
  static T combine(T a, T b) { return (b > a || is_nan(b)) ? b : a; }
  static void add(thread State& s, T v) { s = combine(s, v); }
  static T finish(State s) { return s; }
  static T result(T acc, uint) { return acc; }
};

// Combines one value per thread; every thread gets the result. `shared` holds
// `threads` entries, `threads` is a power of two.
template <typename Op>
typename Op::Acc combine_in_group(
    typename Op::Acc value, threadgroup typename Op::Acc* shared, uint tid, uint threads) {
  shared[tid] = value;
  for (uint stride = threads / 2; stride > 0; stride /= 2) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid < stride) {
      shared[tid] = Op::combine(shared[tid], shared[tid + stride]);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return shared[0];
}

template <typename Op>
[[kernel]] void reduce_group(
    device const typename Op::In* x [[buffer(0)]],
    device typename Op::Out* out [[buffer(1)]],
    constant ReduceArgs& args [[buffer(2)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  threadgroup typename Op::Acc shared[MAX_GROUP];
  uint plane = group / args.cols;
  uint col = group - plane * args.cols;
  device const typename Op::In* first = x + plane * args.n * args.cols + col;
  typename Op::State state = Op::start();
  for (uint r = tid; r < args.n; r += threads) {
    Op::add(state, first[r * args.cols]);
  }
  typename Op::Acc acc = combine_in_group<Op>(Op::finish(state), shared, tid, threads);
  if (tid == 0) {
    out[group] = Op::result(acc, args.n);
  }
}

template <typename Op>
[[kernel]] void reduce_thread(
    device const typename Op::In* x [[buffer(0)]],
    device typename Op::Out* out [[buffer(1)]],
    constant ReduceArgs& args [[buffer(2)]],
    uint i [[thread_position_in_grid]]) {
  if (i >= args.planes * args.cols) {
    return;
  }
  uint plane = i / args.cols;
  uint col = i - plane * args.cols;
  device const typename Op::In* first = x + plane * args.n * args.cols + col;
  typename Op::State state = Op::start();
  for (uint r = 0; r < args.n; ++r) {
    Op::add(state, first[r * args.cols]);
  }
  out[i] = Op::result(Op::finish(state), args.n);
}

// clang-format off
INSTANTIATE("sum_float32_group", reduce_group, SumFloat)
INSTANTIATE("sum_float32_thread", reduce_thread, SumFloat)
INSTANTIATE("mean_float32_group", reduce_group, MeanFloat)
INSTANTIATE("mean_float32_thread", reduce_thread, MeanFloat)
INSTANTIATE("sum_int32_group", reduce_group, SumInt<int>)
INSTANTIATE("sum_int32_thread", reduce_thread, SumInt<int>)
INSTANTIATE("sum_int64_group", reduce_group, SumInt<long>)
INSTANTIATE("sum_int64_thread", reduce_thread, SumInt<long>)
INSTANTIATE("max_float32_group", reduce_group, Max<float>)
INSTANTIATE("max_float32_thread", reduce_thread, Max<float>)
INSTANTIATE("max_int32_group", reduce_group, Max<int>)
INSTANTIATE("max_int32_thread", reduce_thread, Max<int>)
INSTANTIATE("max_int64_group", reduce_group, Max<long>)
INSTANTIATE("max_int64_thread", reduce_thread, Max<long>)
// clang-format on
