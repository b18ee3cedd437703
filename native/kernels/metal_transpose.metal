// Transpose of a (rows, cols) matrix into a new (cols, rows) one. A 16x16 threadgroup
// reads one tile row by row and writes it column by column through threadgroup memory, so
// both the reads and the writes of device memory are contiguous. The extra column of the
// tile keeps the column-wise reads of threadgroup memory off a single bank.
//
// Elements are moved as opaque 32- or 64-bit words (float32 and int32; complex64), which
// keeps every bit, nan payloads included, and needs one kernel per size, not per dtype.

#include <metal_stdlib>
using namespace metal;

#define INSTANTIATE(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;

constant constexpr uint TILE = 16;  // the host dispatches TILE x TILE threads per group

struct TransposeArgs {
  uint rows;
  uint cols;
  uint tiles_across;  // ceil(cols / TILE); the grid is one-dimensional, tiles row-major
};

template <typename T>
[[kernel]] void transpose(
    device const T* x [[buffer(0)]],
    device T* out [[buffer(1)]],
    constant TransposeArgs& args [[buffer(2)]],
    uint2 group2 [[threadgroup_position_in_grid]],
    uint2 local [[thread_position_in_threadgroup]]) {
  threadgroup T tile[TILE][TILE + 1];
  // uint2 like `local`: MSL wants one vector width across position attributes
  uint group = group2.x;
  uint row0 = (group / args.tiles_across) * TILE;
  uint col0 = (group % args.tiles_across) * TILE;

  uint r = row0 + local.y;
  uint c = col0 + local.x;
  if (r < args.rows && c < args.cols) {
    tile[local.y][local.x] = x[r * args.cols + c];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // out[j][i] = x[i][j]: this thread writes out row col0 + local.y, column row0 + local.x
  uint out_row = col0 + local.y;
  uint out_col = row0 + local.x;
  if (out_row < args.cols && out_col < args.rows) {
    out[out_row * args.rows + out_col] = tile[local.x][local.y];
  }
}

INSTANTIATE("transpose_b32", transpose, uint)
INSTANTIATE("transpose_b64", transpose, uint2)
