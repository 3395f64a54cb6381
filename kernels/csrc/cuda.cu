// CUDA entry points, compiled at run time by NVRTC through CuPy (and by nvcc in CI).
// Per op: `stepd_<op>` steps one tensor with its scalars passed by value (no upload per
// step); `stepd_<op>_multi` steps a list of tensors in one launch, blockIdx.y picking the
// tensor from a device-side table (multi-tensor apply).
#include "common.cuh"

namespace stepd {

struct TensorEntry {  // mirrors the int64 rows the host uploads
  float* p;
  const void* g;  // float, Bf16 or F16 elements: the kernel's G
  float* s[kMaxSlots];
  long long n;
};

// The single-tensor kernel takes its scalars as kMaxArgs plain float parameters: every
// launcher can pass those, unlike a struct by value.
#define STEPD_FLOAT_PARAMS                                                                \
  float a0, float a1, float a2, float a3, float a4, float a5, float a6, float a7, float a8, \
      float a9, float a10, float a11
static_assert(kMaxArgs == 12, "STEPD_FLOAT_PARAMS lists kMaxArgs parameters");

template <class Op, class G>
__device__ __forceinline__ void run_grid_stride(float* p, const G* g, float* const* s,
                                                long long n, const typename Op::Args& a) {
  const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    float v[kMaxSlots];
#pragma unroll
    for (int j = 0; j < Op::kSlots; ++j) v[j] = s[j][i];
    float pi = p[i];
    Op::apply(pi, widen(g[i]), v, a);
    p[i] = pi;
#pragma unroll
    for (int j = 0; j < Op::kSlots; ++j) s[j][i] = v[j];
  }
}

template <class Op>
__device__ __forceinline__ typename Op::Args unpack(const float* v) {
  static_assert(sizeof(typename Op::Args) <= kMaxArgs * sizeof(float), "too many args");
  typename Op::Args a;
  memcpy(&a, v, sizeof(a));
  return a;
}

// A list of tensors in one launch, each gradient of element type G.
template <class Op, class G>
__device__ __forceinline__ void run_table(const TensorEntry* table, const float* args) {
  const TensorEntry e = table[blockIdx.y];
  run_grid_stride<Op, G>(e.p, static_cast<const G*>(e.g), e.s, e.n,
                         unpack<Op>(args + blockIdx.y * kMaxArgs));
}

}  // namespace stepd

// Per op: the float32 single-tensor and table kernels, and table kernels for bfloat16 and
// float16 gradients (a low-precision step of one tensor is a table of one).
#define STEPD_OP(name, Op)                                                                  \
  extern "C" __global__ void stepd_##name(float* p, const float* g, float* s0, float* s1,  \
                                          float* s2, long long n, STEPD_FLOAT_PARAMS) {     \
    float* s[stepd::kMaxSlots] = {s0, s1, s2};                                              \
    const float v[stepd::kMaxArgs] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11};    \
    stepd::run_grid_stride<Op, float>(p, g, s, n, stepd::unpack<Op>(v));                    \
  }                                                                                         \
  extern "C" __global__ void stepd_##name##_multi(const stepd::TensorEntry* table,          \
                                                  const float* args) {                      \
    stepd::run_table<Op, float>(table, args);                                               \
  }                                                                                         \
  extern "C" __global__ void stepd_##name##_multi_bf16(const stepd::TensorEntry* table,     \
                                                       const float* args) {                 \
    stepd::run_table<Op, stepd::Bf16>(table, args);                                         \
  }                                                                                         \
  extern "C" __global__ void stepd_##name##_multi_f16(const stepd::TensorEntry* table,      \
                                                      const float* args) {                  \
    stepd::run_table<Op, stepd::F16>(table, args);                                          \
  }
#include "ops.cuh"
#undef STEPD_OP
