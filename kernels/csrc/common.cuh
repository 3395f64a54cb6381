// Shared by every update header: compiled by NVRTC/nvcc for the GPU and by the host
// compiler for the CPU, so the per-element arithmetic is the same source on both.
//
// Contract of an op (one struct per algorithm variant, in <algorithm>.cuh):
//   static constexpr int kSlots;   // state buffers per element, 0..kMaxSlots, in a fixed order
//   struct Args { float ...; };    // host-computed scalars, floats only (layout == float[N])
//   static void apply(float& p, float g, float* s, const Args& a);   // s: the kSlots values
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

}  // namespace stepd
