// 2-D cross-correlation, NCHW, no bias, as PyTorch's conv2d: one thread per output
// element, looping over the input channels and the kernel window. Padding reads as
// zeros that really take part in the products (0 * inf is nan, as in the CPU backend's
// im2col + matmul), rather than being skipped.

#include <metal_stdlib>
using namespace metal;

#define INSTANTIATE(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;

struct Conv2dArgs {
  uint batch;
  uint channels;
  uint height;
  uint width;
  uint out_channels;
  uint kernel_h;
  uint kernel_w;
  uint stride_h;
  uint stride_w;
  uint pad_h;
  uint pad_w;
  uint out_h;
  uint out_w;
};

template <typename T>
[[kernel]] void conv2d(
    device const T* x [[buffer(0)]],
    device const T* w [[buffer(1)]],
    device T* out [[buffer(2)]],
    constant Conv2dArgs& args [[buffer(3)]],
    uint i [[thread_position_in_grid]]) {
  if (i >= args.batch * args.out_channels * args.out_h * args.out_w) {
    return;
  }
  uint ox = i % args.out_w;
  uint rest = i / args.out_w;
  uint oy = rest % args.out_h;
  rest /= args.out_h;
  uint o = rest % args.out_channels;
  uint b = rest / args.out_channels;

  int y0 = int(oy * args.stride_h) - int(args.pad_h);
  int x0 = int(ox * args.stride_w) - int(args.pad_w);
  T acc = T(0);
  for (uint c = 0; c < args.channels; ++c) {
    device const T* image = x + (b * args.channels + c) * args.height * args.width;
    device const T* weights = w + (o * args.channels + c) * args.kernel_h * args.kernel_w;
    for (uint ky = 0; ky < args.kernel_h; ++ky) {
      int iy = y0 + int(ky);
      bool row_inside = iy >= 0 && iy < int(args.height);
      for (uint kx = 0; kx < args.kernel_w; ++kx) {
        int ix = x0 + int(kx);
        bool inside = row_inside && ix >= 0 && ix < int(args.width);
        T v = inside ? image[uint(iy) * args.width + uint(ix)] : T(0);
        acc = fma(v, weights[ky * args.kernel_w + kx], acc);
      }
    }
  }
  out[i] = acc;
}

INSTANTIATE("conv2d_float32", conv2d, float)
