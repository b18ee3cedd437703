// 1-D complex64 FFT over the last axis, for power-of-two lengths n: the radix-2 Stockham
// formulation (Govindaraju et al., "High Performance Discrete Fourier Transforms on
// Graphics Processors", SC 2008). The host runs log2(n) passes of `fft_stage` in one
// command buffer, ping-ponging between two buffers; no bit-reversal pass is needed. Each
// thread computes one butterfly of one row.
//
// Twiddles come from precise cospi/sinpi of k / span, a fraction with a power-of-two
// denominator and so exact in float32: no 2*pi rounded to float32 enters the angles.

#include <metal_stdlib>
using namespace metal;

#define INSTANTIATE(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;

struct FftArgs {
  uint n;       // row length, a power of two >= 2
  uint span;    // this pass's half-size Ns: 1, 2, 4, ..., n / 2
  uint total;   // butterflies in all rows: rows * n / 2
  float sign;   // -1 forward, +1 inverse
  float scale;  // 1, or 1 / n on the last pass of an inverse transform (exact: n = 2^k)
};

template <typename T>
[[kernel]] void fft_stage(
    device const T* in [[buffer(0)]],
    device T* out [[buffer(1)]],
    constant FftArgs& args [[buffer(2)]],
    uint i [[thread_position_in_grid]]) {
  if (i >= args.total) {
    return;
  }
  uint half_n = args.n / 2;
  uint row = i / half_n;
  uint j = i - row * half_n;
  device const T* src = in + row * args.n;
  device T* dst = out + row * args.n;

  uint k = j & (args.span - 1);  // j % span: span is a power of two
  float fraction = float(k) / float(args.span);
  // w = exp(sign * i * pi * k / span)
  T w = T(precise::cospi(fraction), args.sign * precise::sinpi(fraction));

  T v0 = src[j];
  T v1 = src[j + half_n];
  v1 = T(v1.x * w.x - v1.y * w.y, v1.x * w.y + v1.y * w.x);

  uint d = (j - k) * 2 + k;  // (j / span) * 2 * span + k
  dst[d] = (v0 + v1) * args.scale;
  dst[d + args.span] = (v0 - v1) * args.scale;
}

INSTANTIATE("fft_stage", fft_stage, float2)
