// CUDA entry points, compiled at run time by NVRTC (kernels/backends/cuda_source.py; and by
// nvcc in CI). Per op: `stepd_<op>` steps one tensor with its scalars passed by value (no
// upload per step); `stepd_<op>_multi` steps a list of tensors in one launch in fixed-size
// chunks (multi-tensor apply, as apex's): each block takes one (tensor, first element)
// entry of a device-side work table, so a large tensor gets blocks in proportion to its
// size and an empty one gets none.
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

struct ChunkEntry {  // one block's work: elements [start, start + chunk) of one tensor
  long long tensor;
  long long start;
};

template <class Op, class G>
__device__ __forceinline__ void step_element(float* p, const G* g, float* const* s,
                                             long long i, const typename Op::Args& a) {
  float v[kMaxSlots];
#pragma unroll
  for (int j = 0; j < Op::kSlots; ++j) v[j] = s[j][i];
  float pi = p[i];
  Op::apply(pi, widen(g[i]), v, a);
  p[i] = pi;
#pragma unroll
  for (int j = 0; j < Op::kSlots; ++j) s[j][i] = v[j];
}

template <class Op, class G>
__device__ __forceinline__ void run_grid_stride(float* p, const G* g, float* const* s,
                                                long long n, const typename Op::Args& a) {
  const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    step_element<Op, G>(p, g, s, i, a);
  }
}

template <class Op>
__device__ __forceinline__ typename Op::Args unpack(const float* v) {
  static_assert(sizeof(typename Op::Args) <= kMaxArgs * sizeof(float), "too many args");
  typename Op::Args a;
  memcpy(&a, v, sizeof(a));
  return a;
}

// A list of tensors in one launch, each gradient of element type G: block b steps chunk
// `work[b]` of `tensors[work[b].tensor]` (at most `chunk` elements) with that tensor's args.
template <class Op, class G>
__device__ __forceinline__ void run_chunk(const TensorEntry* tensors, const ChunkEntry* work,
                                          const float* args, long long chunk) {
  const ChunkEntry w = work[blockIdx.x];
  const TensorEntry e = tensors[w.tensor];
  const typename Op::Args a = unpack<Op>(args + w.tensor * kMaxArgs);
  const long long end = w.start + chunk < e.n ? w.start + chunk : e.n;
  const G* g = static_cast<const G*>(e.g);
  for (long long i = w.start + threadIdx.x; i < end; i += blockDim.x) {
    step_element<Op, G>(e.p, g, e.s, i, a);
  }
}

}  // namespace stepd

#define STEPD_MULTI_PARAMS                                                                 \
  const stepd::TensorEntry *tensors, const stepd::ChunkEntry *work, const float *args,     \
      long long chunk

// Per op: the float32 single-tensor and chunked-table kernels, and chunked-table kernels for
// bfloat16 and float16 gradients (a low-precision step of one tensor is a table of one).
#define STEPD_OP(name, Op)                                                                  \
  extern "C" __global__ void stepd_##name(float* p, const float* g, float* s0, float* s1,  \
                                          float* s2, long long n, STEPD_FLOAT_PARAMS) {     \
    float* s[stepd::kMaxSlots] = {s0, s1, s2};                                              \
    const float v[stepd::kMaxArgs] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11};    \
    stepd::run_grid_stride<Op, float>(p, g, s, n, stepd::unpack<Op>(v));                    \
  }                                                                                         \
  extern "C" __global__ void stepd_##name##_multi(STEPD_MULTI_PARAMS) {                     \
    stepd::run_chunk<Op, float>(tensors, work, args, chunk);                                \
  }                                                                                         \
  extern "C" __global__ void stepd_##name##_multi_bf16(STEPD_MULTI_PARAMS) {                \
    stepd::run_chunk<Op, stepd::Bf16>(tensors, work, args, chunk);                          \
  }                                                                                         \
  extern "C" __global__ void stepd_##name##_multi_f16(STEPD_MULTI_PARAMS) {                 \
    stepd::run_chunk<Op, stepd::F16>(tensors, work, args, chunk);                           \
  }
#include "ops.cuh"
#undef STEPD_OP
#undef STEPD_MULTI_PARAMS

// Blockwise 8-bit ops (blockwise8.cuh): one CUDA block of kQuantBlock threads per
// quantization block. `tensors` holds a row per tensor {p, g, code0, code1, absmax0,
// absmax1, n} and `work` one (tensor, first block) row per CUDA block; `tables` is the
// host-built QuantTables on the device.
#include "blockwise8.cuh"

namespace stepd {

struct Tensor8 {  // mirrors the int64 rows the host uploads
  float* p;
  const void* g;
  unsigned char* code[2];
  float* absmax[2];
  long long n;
};

template <class Op, class G>
__device__ __forceinline__ void run_blockwise(const Tensor8* tensors, const ChunkEntry* work,
                                              const QuantTables* tables, const float* args) {
  const ChunkEntry w = work[blockIdx.x];
  const Tensor8 e = tensors[w.tensor];
  const typename Op::Args a = unpack<Op>(args + w.tensor * kMaxArgs);
  const long long first = w.start * kQuantBlock;
  Block8 b;
  for (int j = 0; j < 2; ++j) {
    b.code[j] = e.code[j] + first;
    b.absmax[j] = e.absmax[j] + w.start;
  }
  const long long left = e.n - first;
  step_block_device<Op, G>(e.p + first, static_cast<const G*>(e.g) + first, b,
                           left < kQuantBlock ? left : kQuantBlock, *tables, a);
}

}  // namespace stepd

#define STEPD_BLOCKWISE_PARAMS                                                              \
  const stepd::Tensor8 *tensors, const stepd::ChunkEntry *work,                            \
      const stepd::QuantTables *tables, const float *args

#define STEPD_BLOCKWISE_OP(name, Op)                                                        \
  extern "C" __global__ void stepd_##name(STEPD_BLOCKWISE_PARAMS) {                         \
    stepd::run_blockwise<Op, float>(tensors, work, tables, args);                           \
  }                                                                                         \
  extern "C" __global__ void stepd_##name##_bf16(STEPD_BLOCKWISE_PARAMS) {                  \
    stepd::run_blockwise<Op, stepd::Bf16>(tensors, work, tables, args);                     \
  }                                                                                         \
  extern "C" __global__ void stepd_##name##_f16(STEPD_BLOCKWISE_PARAMS) {                   \
    stepd::run_blockwise<Op, stepd::F16>(tensors, work, tables, args);                      \
  }
#include "blockwise_ops.cuh"
#undef STEPD_BLOCKWISE_OP
#undef STEPD_BLOCKWISE_PARAMS
