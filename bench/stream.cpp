// The roofline for a fused optimizer step: read four float streams, write three back, in
// place, with the same OpenMP partitioning as the kernels (AdamW's access pattern: p, m, v
// read-modify-write, g read-only; 28 bytes per element).
#include <cstdint>
#include <omp.h>

extern "C" void stream_r4w3(float* __restrict a, float* __restrict b, float* __restrict c,
                            const float* __restrict d, int64_t n, float s) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float x = d[i];
    a[i] = a[i] * s + x;
    b[i] = b[i] * s - x;
    c[i] = c[i] * s + x * s;
  }
}
