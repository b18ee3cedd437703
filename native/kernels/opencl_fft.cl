// 1-D complex64 FFT over the rows of a (rows, n) array, n a power of two: log2(n)
// radix-2 Stockham passes, ping-ponging between two buffers. Stockham reorders as it
// goes, so no bit-reversal pass is needed. No build options.

// One pass: sub-transforms of length ns (1, 2, 4, ... n/2) are merged pairwise into
// length 2 * ns. Work-item i of a row (0 <= i < n/2) reads x[i] and x[i + n/2] and writes
// y[j] and y[j + ns]. `sign` is -1 forward, +1 inverse; `scale` is 1 except on the last
// pass of an inverse transform (1/n, as numpy.fft.ifft).
__kernel void radix2(__global const float2 *x, __global float2 *y, const uint n,
                     const uint ns, const float sign, const float scale, const ulong total) {
    const size_t gid = get_global_id(0);
    if (gid >= total) return;
    const uint half_n = n >> 1;
    const size_t row = gid / half_n;
    const uint i = gid % half_n;
    x += row * n;
    y += row * n;
    const uint k = i & (ns - 1);
    // sinpi/cospi of an exact fraction k/ns: accurate twiddles, even for long transforms
    const float turn = sign * (float)k / (float)ns;
    const float c = cospi(turn), s = sinpi(turn);
    const float2 a = x[i], v = x[i + half_n];
    const float2 b = (float2)(v.x * c - v.y * s, v.x * s + v.y * c);
    const uint j = ((i - k) << 1) + k;
    y[j] = (a + b) * scale;
    y[j + ns] = (a - b) * scale;
}

// float32 input is taken as real: imaginary parts zero.
__kernel void real_to_complex(__global const float *x, __global float2 *y, const ulong n) {
    const size_t i = get_global_id(0);
    if (i < n) y[i] = (float2)(x[i], 0.0f);
}
