// Tiled shared-memory matrix product, the fallback when CuPy's cuBLAS is not installed:
// -DKM_T=float|double.
//
// c[i] = a[i] @ b[i] for row-major (M,K) x (K,N) matrices and each batch i (a 2-D product
// is a batch of one). Each 16x16 block computes a 32x32 tile of c, 2x2 outputs per
// thread, staging 32-wide strips of a and b through shared memory.

#ifndef KM_T
#error "compile with -DKM_T=<element type>"
#endif
typedef KM_T T;

#define TILE 32
#define THREADS 16  // per side; each thread owns TILE / THREADS = 2 rows and 2 columns

// One 32x32 tile of c = a @ b, at (row0, col0).
__device__ __forceinline__ void tile_product(const T* a, const T* b, T* c, long long m,
                                             long long n, long long k, long long row0,
                                             long long col0, T (*a_tile)[TILE + 1],
                                             T (*b_tile)[TILE + 1]) {
    const int tx = threadIdx.x, ty = threadIdx.y;
    T acc[2][2] = {{T(0), T(0)}, {T(0), T(0)}};
    for (long long k0 = 0; k0 < k; k0 += TILE) {
        // 256 threads load the two 32x32 strips, 4 elements each; zeros past the edges
        for (int e = ty * THREADS + tx; e < TILE * TILE; e += THREADS * THREADS) {
            const int r = e / TILE, q = e % TILE;
            const long long ar = row0 + r, ac = k0 + q;
            a_tile[r][q] = (ar < m && ac < k) ? a[ar * k + ac] : T(0);
            const long long br = k0 + r, bc = col0 + q;
            b_tile[r][q] = (br < k && bc < n) ? b[br * n + bc] : T(0);
        }
        __syncthreads();
#pragma unroll 8
        for (int q = 0; q < TILE; ++q) {
            const T a0 = a_tile[ty][q], a1 = a_tile[ty + THREADS][q];
            const T b0 = b_tile[q][tx], b1 = b_tile[q][tx + THREADS];
            acc[0][0] = fma(a0, b0, acc[0][0]);
            acc[0][1] = fma(a0, b1, acc[0][1]);
            acc[1][0] = fma(a1, b0, acc[1][0]);
            acc[1][1] = fma(a1, b1, acc[1][1]);
        }
        __syncthreads();  // the strips are overwritten next step
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const long long r = row0 + ty + i * THREADS, q = col0 + tx + j * THREADS;
            if (r < m && q < n) c[r * n + q] = acc[i][j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS * THREADS)
    km_matmul_tiled(const T* a, const T* b, T* c, long long batches, long long m, long long n,
                    long long k) {
    __shared__ T a_tile[TILE][TILE + 1];  // +1: no bank conflicts on the column reads
    __shared__ T b_tile[TILE][TILE + 1];
    const long long col0 = (long long)blockIdx.x * TILE;
    // batches and row tiles are walked grid-stride: gridDim.y and .z stop at 65535
    for (long long batch = blockIdx.z; batch < batches; batch += gridDim.z) {
        for (long long row0 = (long long)blockIdx.y * TILE; row0 < m;
             row0 += (long long)gridDim.y * TILE) {
            tile_product(a + batch * m * k, b + batch * k * n, c + batch * m * n, m, n, k,
                         row0, col0, a_tile, b_tile);
        }
    }
}
