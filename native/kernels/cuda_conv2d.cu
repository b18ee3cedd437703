// 2-D cross-correlation (PyTorch's conv2d, NCHW, no bias): -DKM_T=float|double.
//
// With CuPy the host runs im2col here and the product on cuBLAS, as the CPU backend does
// with BLAS; without it, the direct kernel computes one output element per thread.

#ifndef KM_T
#error "compile with -DKM_T=<element type>"
#endif
typedef KM_T T;

// The shape of one convolution, passed as plain scalars (not a struct, whose padding the
// host would have to mirror): input (n, c, h, w), weights (o, c, kh, kw), stride,
// padding, output (oh, ow).
#define CONV_PARAMS                                                                       \
    long long n, long long c, long long h, long long w, long long o, long long kh,        \
        long long kw, long long sh, long long sw, long long ph, long long pw, long long oh, \
        long long ow

// cols[b, (ci, i, j), (oy, ox)] = padded x[n0 + b, ci, oy*sh + i - ph, ox*sw + j - pw] for
// b < images: then out[n0 + b] = weights (o, c*kh*kw) @ cols[b].
extern "C" __global__ void km_im2col(const T* x, T* cols, long long n0, long long images,
                                     CONV_PARAMS) {
    const long long pixels = oh * ow;
    const long long window = c * kh * kw;
    const long long total = images * window * pixels;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const long long pixel = t % pixels;
        const long long row = (t / pixels) % window;
        const long long b = t / (pixels * window);
        const long long ci = row / (kh * kw);
        const long long i = (row / kw) % kh;
        const long long j = row % kw;
        const long long iy = (pixel / ow) * sh + i - ph;
        const long long ix = (pixel % ow) * sw + j - pw;
        const bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
        cols[t] = inside ? x[(((n0 + b) * c + ci) * h + iy) * w + ix] : T(0);
    }
}

extern "C" __global__ void km_conv2d_direct(const T* x, const T* weights, T* out,
                                            CONV_PARAMS) {
    const long long total = n * o * oh * ow;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const long long ox = t % ow;
        const long long oy = (t / ow) % oh;
        const long long oc = (t / (ow * oh)) % o;
        const long long b = t / (ow * oh * o);
        T acc = T(0);
        for (long long ci = 0; ci < c; ++ci) {
            const T* image = x + (b * c + ci) * h * w;
            const T* kernel = weights + (oc * c + ci) * kh * kw;
            for (long long i = 0; i < kh; ++i) {
                const long long iy = oy * sh + i - ph;
                if (iy < 0 || iy >= h) continue;
                for (long long j = 0; j < kw; ++j) {
                    const long long ix = ox * sw + j - pw;
                    if (ix < 0 || ix >= w) continue;
                    acc = fma(image[iy * w + ix], kernel[i * kw + j], acc);
                }
            }
        }
        out[t] = acc;
    }
}
