// C = A @ B for row-major matrices, batched over the third global dimension. Build options:
//   -D T=<float|double>, -D HAVE_FP64
//
// Each work-group computes a TM x TN tile of C from TM x TK and TK x TN tiles of A and B
// staged in local memory; each of its 8 x 8 work-items holds a WM x WN block of C in
// registers, so every value read from local memory feeds WN (or WM) multiply-adds.
// Leading dimensions, offsets and batch strides are arguments, so conv2d can multiply
// its weights (batch stride 0) into a band of its output in place.

#ifdef HAVE_FP64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif

#define TM 64
#define TN 64
#define TK 16
#define WX 8  // work-items across (columns of C)
#define WY 8  // work-items down (rows of C)
#define WM (TM / WY)
#define WN (TN / WX)

__kernel __attribute__((reqd_work_group_size(WX, WY, 1))) void matmul(
    __global const T *A, const ulong a_offset, const uint lda, const ulong a_batch,
    __global const T *B, const ulong b_offset, const uint ldb, const ulong b_batch,
    __global T *C, const ulong c_offset, const uint ldc, const ulong c_batch,
    const uint M, const uint N, const uint K) {
    __local T As[TM][TK];
    __local T Bs[TK][TN + 1];  // + 1: columns read down a row do not share a bank
    const uint tx = get_local_id(0), ty = get_local_id(1);
    const uint lid = ty * WX + tx;
    const uint row0 = get_group_id(1) * TM, col0 = get_group_id(0) * TN;
    const size_t batch = get_global_id(2);
    A += a_offset + batch * a_batch;
    B += b_offset + batch * b_batch;
    C += c_offset + batch * c_batch;

    T acc[WM][WN];
    for (uint i = 0; i < WM; i++)
        for (uint j = 0; j < WN; j++) acc[i][j] = 0;

    for (uint k0 = 0; k0 < K; k0 += TK) {
        // zeros past the matrix edges: the inner loop then needs no bounds checks
        for (uint e = lid; e < TM * TK; e += WX * WY) {
            uint r = e / TK, c = e % TK;
            uint gr = row0 + r, gc = k0 + c;
            As[r][c] = (gr < M && gc < K) ? A[(size_t)gr * lda + gc] : (T)0;
        }
        for (uint e = lid; e < TK * TN; e += WX * WY) {
            uint r = e / TN, c = e % TN;
            uint gr = k0 + r, gc = col0 + c;
            Bs[r][c] = (gr < K && gc < N) ? B[(size_t)gr * ldb + gc] : (T)0;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (uint k = 0; k < TK; k++) {
            T b[WN];
            for (uint j = 0; j < WN; j++) b[j] = Bs[k][tx + j * WX];
            for (uint i = 0; i < WM; i++) {
                T a = As[ty + i * WY][k];
                for (uint j = 0; j < WN; j++) acc[i][j] += a * b[j];
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    for (uint i = 0; i < WM; i++) {
        uint r = row0 + ty + i * WY;
        for (uint j = 0; j < WN; j++) {
            uint c = col0 + tx + j * WX;
            if (r < M && c < N) C[(size_t)r * ldc + c] = acc[i][j];
        }
    }
}
