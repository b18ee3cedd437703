// out = x.T for a row-major (rows, cols) matrix. Build options:
//   -D T=<uint|ulong>: only the element's size matters, so float32 and int32 share one
//   binary, and float64 and complex64 another.
//
// A TILE x TILE block goes through local memory, so both the reads of x and the writes
// of out run along rows.

#define TILE 16

__kernel __attribute__((reqd_work_group_size(TILE, TILE, 1))) void transpose(
    __global const T *x, __global T *out, const uint rows, const uint cols) {
    __local T tile[TILE][TILE + 1];  // + 1: the column reads do not share a bank
    const uint tx = get_local_id(0), ty = get_local_id(1);
    const uint c = get_group_id(0) * TILE + tx, r = get_group_id(1) * TILE + ty;
    if (r < rows && c < cols) tile[ty][tx] = x[(size_t)r * cols + c];
    barrier(CLK_LOCAL_MEM_FENCE);
    // out's (row, col) = (c', r') with the tile's roles swapped
    const uint out_r = get_group_id(0) * TILE + ty, out_c = get_group_id(1) * TILE + tx;
    if (out_r < cols && out_c < rows) out[(size_t)out_r * rows + out_c] = tile[tx][ty];
}
