// LSTM gate math shared by the CPU and CUDA kernels: one definition of the cell forward and backward.
//
// Gate order i, f, g, o as in torch.nn.LSTM. Forward of one hidden unit:
//   i = sigmoid(zi), f = sigmoid(zf), g = tanh(zg), o = sigmoid(zo)
//   c = f * c_prev + i * g,  h = o * tanh(c)
// The backward takes the activated gates (stored by the forward), c and c_prev and returns the
// gradients of the four pre-activations and of c_prev.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTMSC_HD __host__ __device__ __forceinline__
#elif defined(_MSC_VER)
#define FASTMSC_HD __forceinline
#else
// Always inlined so that the gate math lands inside each target_clones variant of the CPU loops
// (and is vectorised at that variant's width) instead of being called at the baseline ISA.
#define FASTMSC_HD inline __attribute__((always_inline))
#endif

namespace fastmsc {

#if !defined(__CUDA_ARCH__)
// exp for float written so that GCC/Clang vectorise a loop calling it (no libm call, no branches):
// Cody-Waite range reduction x = n*ln2 + r, a degree-6 polynomial for exp(r) on [-ln2/2, ln2/2]
// (Cephes expf coefficients, about 1 ulp), and 2^n built in the exponent bits.
FASTMSC_HD float exp_vectorizable(float x) {
  // Clamp so that n stays in [-126, 127] and 2^n is a normal float; NaN passes through the polynomial.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round-to-nearest by the 1.5 * 2^23 trick (vectorises to two adds; no -ffast-math anywhere).
  const float shifter = 12582912.0f;
  float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
#endif

FASTMSC_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_vectorizable(x);
#endif
}

FASTMSC_HD double exp_(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

template <typename T>
FASTMSC_HD T sigmoid_(T x) {
  return T(1) / (T(1) + exp_(-x));
}

// tanh(x) = 2 * sigmoid(2x) - 1: absolute error about one float ulp of 1, enough for gates and
// cell outputs that are later added to O(1) quantities.
template <typename T>
FASTMSC_HD T tanh_(T x) {
  return T(2) / (T(1) + exp_(T(-2) * x)) - T(1);
}

// Forward of one hidden unit. In: pre-activations zi..zo, c_prev. Out: activated gates, c, h.
template <typename T>
FASTMSC_HD void cell_forward(T zi, T zf, T zg, T zo, T c_prev, T& i, T& f, T& g, T& o, T& c, T& h) {
  i = sigmoid_(zi);
  f = sigmoid_(zf);
  g = tanh_(zg);
  o = sigmoid_(zo);
  c = f * c_prev + i * g;
  h = o * tanh_(c);
}

// Backward of one hidden unit. In: activated gates, c, c_prev, dh (total gradient reaching h),
// dc (gradient reaching c from the next step). Out: pre-activation gradients and dc_prev.
template <typename T>
FASTMSC_HD void cell_backward(T i, T f, T g, T o, T c, T c_prev, T dh, T dc, T& dzi, T& dzf, T& dzg, T& dzo,
                              T& dc_prev) {
  const T tc = tanh_(c);
  const T dc_total = dc + dh * o * (T(1) - tc * tc);
  dzo = dh * tc * o * (T(1) - o);
  dzi = dc_total * g * i * (T(1) - i);
  dzg = dc_total * i * (T(1) - g * g);
  dzf = dc_total * c_prev * f * (T(1) - f);
  dc_prev = dc_total * f;
}

}  // namespace fastmsc
