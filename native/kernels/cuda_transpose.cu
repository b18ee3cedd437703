// 2-D transpose through 32x32 shared-memory tiles, so both the reads and the writes are
// coalesced. A transpose moves bits, never arithmetic, so it is compiled per element
// size, not per dtype: -DKM_BYTES=4 (float32, int32) or -DKM_BYTES=8 (float64, complex64).

#if KM_BYTES == 4
typedef unsigned int T;
#elif KM_BYTES == 8
typedef unsigned long long T;
#else
#error "compile with -DKM_BYTES=4 or -DKM_BYTES=8"
#endif

#define TILE 32
#define ROWS 8  // blockDim is (TILE, ROWS): each thread moves TILE / ROWS elements

// x is (rows, cols), out is (cols, rows). Tiles are walked grid-stride in both
// directions: a (2**26, 1) matrix has more row tiles than gridDim.y allows.
extern "C" __global__ void km_transpose(const T* x, T* out, long long rows, long long cols) {
    __shared__ T tile[TILE][TILE + 1];  // +1: the column reads hit distinct banks
    const long long tiles_down = (rows + TILE - 1) / TILE;
    const long long tiles_across = (cols + TILE - 1) / TILE;
    for (long long ty = blockIdx.y; ty < tiles_down; ty += gridDim.y) {
        for (long long tx = blockIdx.x; tx < tiles_across; tx += gridDim.x) {
            const long long r0 = ty * TILE, c0 = tx * TILE;
            for (int i = threadIdx.y; i < TILE; i += ROWS) {
                const long long r = r0 + i, c = c0 + threadIdx.x;
                if (r < rows && c < cols) tile[i][threadIdx.x] = x[r * cols + c];
            }
            __syncthreads();
            for (int i = threadIdx.y; i < TILE; i += ROWS) {
                const long long r = c0 + i, c = r0 + threadIdx.x;  // out's row and column
                if (r < cols && c < rows) out[r * rows + c] = tile[threadIdx.x][i];
            }
            __syncthreads();
        }
    }
}
