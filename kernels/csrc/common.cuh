// Shared by every update header: compiled by NVRTC/nvcc for the GPU and by the host
// compiler for the CPU, so the per-element arithmetic is the same source on both.
//
// Contract of an op (one struct per algorithm variant, in <algorithm>.cuh):
//   static constexpr int kSlots;   // state buffers per element, 0..kMaxSlots, in a fixed order
//   struct Args { float ...; };    // host-computed scalars, floats only (layout == float[N])
//   static void apply(float& p, float g, float* s, const Args& a);   // s: the kSlots values
// The gradient may be stored as float32, bfloat16 or float16 (see widen below); apply always
// sees it as float32.
// Both compilers run with contraction off (-ffp-contract=off / --fmad=false) and IEEE sqrt and
// division, so CPU and GPU produce the same bits for the same inputs.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define STEPD_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#include <cstdint>
#define STEPD_HD inline __attribute__((always_inline))
#endif

namespace stepd {

constexpr int kMaxSlots = 3;
constexpr int kMaxArgs = 12;

// sign(x) with sign(0) = 0, branch-free so it vectorises.
STEPD_HD float sign(float x) { return static_cast<float>((x > 0.0f) - (x < 0.0f)); }

STEPD_HD float bits_to_float(unsigned int u) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Gradient element types: the kernels read a gradient in the model's precision and widen
// each element in registers (exactly: every bfloat16 and float16 value is a float32 value),
// so a low-precision gradient costs half the reads and no separate cast pass.
struct Bf16 {  // bfloat16 bits: the upper half of a float32
  unsigned short bits;
};
struct F16 {  // IEEE binary16 bits
  unsigned short bits;
};

STEPD_HD float widen(float g) { return g; }
STEPD_HD float widen(Bf16 g) { return bits_to_float(static_cast<unsigned int>(g.bits) << 16); }
STEPD_HD float widen(F16 g) {
  const unsigned int h = g.bits;
  const unsigned int sign = (h & 0x8000u) << 16;
  const unsigned int exponent = (h >> 10) & 0x1Fu;
  const unsigned int mantissa = h & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa x 2^-24, exact in float32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));  // Inf/NaN
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

}  // namespace stepd
