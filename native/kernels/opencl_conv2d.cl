// im2col for conv2d (NCHW, cross-correlation as PyTorch's). Build options:
//   -D T=<float|double>, -D HAVE_FP64
//
// cols[b, (c, i, j), (oy - y0) * ow + ox] = padded x[n0 + b, c, oy * sh + i, ox * sw + j]
// for the output rows oy in [y0, y0 + band): one matmul of the (O, C*KH*KW) weights with
// these columns then gives every output pixel of the tile.

#ifdef HAVE_FP64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif

__kernel void im2col(__global const T *x, __global T *cols, const uint images, const uint n0,
                     const uint y0, const uint band, const uint channels, const uint height,
                     const uint width, const uint kh, const uint kw, const uint sh,
                     const uint sw, const uint ph, const uint pw, const uint ow) {
    const size_t pixels = (size_t)band * ow;
    const size_t window = (size_t)channels * kh * kw;
    const size_t t = get_global_id(0);
    if (t >= images * window * pixels) return;
    const size_t k = t % pixels;
    const size_t row = (t / pixels) % window;
    const size_t b = t / (pixels * window);
    const uint c = row / (kh * kw), i = (row / kw) % kh, j = row % kw;
    const uint oy = y0 + k / ow, ox = k % ow;
    // unsigned wrap-around turns a position left of or above the image into a huge
    // one, so one comparison per axis checks both edges
    const uint iy = oy * sh + i - ph, ix = ox * sw + j - pw;
    T v = 0;
    if (iy < height && ix < width)
        v = x[(((n0 + b) * channels + c) * (size_t)height + iy) * width + ix];
    cols[t] = v;
}
