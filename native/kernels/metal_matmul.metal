// Matrix product, optionally batched: (B, M, K) x (B, K, N) -> (B, M, N), B = 1 for 2-D.
// Each 16x16 threadgroup computes one 16x16 tile of one output matrix, staging 16x16
// tiles of A and B through threadgroup memory so each input element is read from device
// memory once per tile rather than once per product. Accumulates in float32 with fma,
// as float32 BLAS does.
//
// The grid is one-dimensional (batch, tile row, tile column flattened): a batch of many
// small matrices then never meets a per-dimension limit on the grid's y or z.

#include <metal_stdlib>
using namespace metal;

#define INSTANTIATE(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;

constant constexpr uint TILE = 16;  // the host dispatches TILE x TILE threads per group

struct MatmulArgs {
  uint m;
  uint n;
  uint k;
  uint tiles_m;  // ceil(m / TILE)
  uint tiles_n;  // ceil(n / TILE)
};

template <typename T>
[[kernel]] void matmul(
    device const T* a [[buffer(0)]],
    device const T* b [[buffer(1)]],
    device T* out [[buffer(2)]],
    constant MatmulArgs& args [[buffer(3)]],
    uint2 group2 [[threadgroup_position_in_grid]],
    uint2 local [[thread_position_in_threadgroup]]) {
  threadgroup T a_tile[TILE][TILE];
  threadgroup T b_tile[TILE][TILE];

  uint per_matrix = args.tiles_m * args.tiles_n;
  // uint2 like `local`: MSL wants one vector width across position attributes
  uint group = group2.x;
  uint batch = group / per_matrix;
  uint tile = group - batch * per_matrix;
  uint row = (tile / args.tiles_n) * TILE + local.y;
  uint col = (tile % args.tiles_n) * TILE + local.x;
  device const T* a_matrix = a + batch * args.m * args.k;
  device const T* b_matrix = b + batch * args.k * args.n;

  T acc = T(0);
  for (uint k0 = 0; k0 < args.k; k0 += TILE) {
    // Out-of-range entries are zero, and only ever meet other zeros or feed an output
    // that is not written: a zero never multiplies a real inf or nan into a result.
    uint ka = k0 + local.x;
    uint kb = k0 + local.y;
    a_tile[local.y][local.x] = (row < args.m && ka < args.k) ? a_matrix[row * args.k + ka] : T(0);
    b_tile[local.y][local.x] = (kb < args.k && col < args.n) ? b_matrix[kb * args.n + col] : T(0);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint t = 0; t < TILE; ++t) {
      acc = fma(a_tile[local.y][t], b_tile[t][local.x], acc);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (row < args.m && col < args.n) {
    out[batch * args.m * args.n + row * args.n + col] = acc;
  }
}

INSTANTIATE("matmul_float32", matmul, float)
