// Radix-2 FFT over the last axis of complex64 rows, the fallback when CuPy's cuFFT is not
// installed: lengths must be powers of two (the host refuses others). Not templated.
//
// A bit-reversal copy, then log2(n) butterfly stages of one launch each (the launch is
// the barrier between stages), then a 1/n scale for the inverse.

// x (batch, n) -> y in bit-reversed order along each row; log2n = log2(n)
extern "C" __global__ void km_fft_bitreverse(const float2* x, float2* y, long long batch,
                                             long long n, int log2n) {
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < batch * n;
         t += (long long)gridDim.x * blockDim.x) {
        const long long row = t / n;
        const unsigned j = (unsigned)(t - row * n);
        const unsigned r = log2n == 0 ? 0u : __brev(j) >> (32 - log2n);
        y[row * n + r] = x[t];
    }
}

// the same for real float32 input, taken as complex with a zero imaginary part
extern "C" __global__ void km_fft_bitreverse_real(const float* x, float2* y, long long batch,
                                                  long long n, int log2n) {
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < batch * n;
         t += (long long)gridDim.x * blockDim.x) {
        const long long row = t / n;
        const unsigned j = (unsigned)(t - row * n);
        const unsigned r = log2n == 0 ? 0u : __brev(j) >> (32 - log2n);
        y[row * n + r] = make_float2(x[t], 0.0f);
    }
}

// One stage: butterflies of span 2*half; sign -1 forward, +1 inverse.
extern "C" __global__ void km_fft_stage(float2* y, long long batch, long long n, long long half,
                                        float sign) {
    const long long per_row = n / 2;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < batch * per_row;
         t += (long long)gridDim.x * blockDim.x) {
        const long long row = t / per_row;
        const long long k = t - row * per_row;
        const long long pos = k % half;
        const long long i = row * n + (k / half) * 2 * half + pos;
        const long long j = i + half;
        // pos / half is exact in float (half is a power of two), and sincospif takes the
        // angle in units of pi, so the twiddle carries no argument-reduction error
        float s, c;
        sincospif(float(pos) / float(half), &s, &c);
        const float2 w = make_float2(c, sign * s);
        const float2 u = y[i], v = y[j];
        const float2 vw = make_float2(v.x * w.x - v.y * w.y, v.x * w.y + v.y * w.x);
        y[i] = make_float2(u.x + vw.x, u.y + vw.y);
        y[j] = make_float2(u.x - vw.x, u.y - vw.y);
    }
}

extern "C" __global__ void km_fft_scale(float2* y, long long count, float factor) {
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < count;
         t += (long long)gridDim.x * blockDim.x) {
        y[t] = make_float2(y[t].x * factor, y[t].y * factor);
    }
}
