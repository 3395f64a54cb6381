// CPU entry points: every op of ops.cuh stepped over a list of tensors in one OpenMP
// parallel region. The tensors are laid end to end and the threads split that flat range
// evenly, so one big tensor and 200 small ones cost the same per element.
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

#include "common.cuh"

namespace stepd {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 15;
// Thread ranges start on cache-line boundaries so no two threads write one line.
constexpr int64_t kAlign = 16;

template <class Op, class G>
static void run_segment(float* __restrict p, const G* __restrict g, float* const* slots,
                        int64_t lo, int64_t hi, const typename Op::Args& args) {
  float* __restrict s0 = Op::kSlots > 0 ? slots[0] : nullptr;
  float* __restrict s1 = Op::kSlots > 1 ? slots[1] : nullptr;
  float* __restrict s2 = Op::kSlots > 2 ? slots[2] : nullptr;
  const typename Op::Args a = args;  // a local copy: provably not aliased by the stores
  // Not `omp simd`: it privatises the slot array per lane and the loop stays scalar (3x
  // slower); plain auto-vectorisation scalarises the array into registers.
#pragma GCC ivdep
  for (int64_t i = lo; i < hi; ++i) {
    float s[kMaxSlots];
    if constexpr (Op::kSlots > 0) s[0] = s0[i];
    if constexpr (Op::kSlots > 1) s[1] = s1[i];
    if constexpr (Op::kSlots > 2) s[2] = s2[i];
    float pi = p[i];
    Op::apply(pi, widen(g[i]), s, a);
    p[i] = pi;
    if constexpr (Op::kSlots > 0) s0[i] = s[0];
    if constexpr (Op::kSlots > 1) s1[i] = s[1];
    if constexpr (Op::kSlots > 2) s2[i] = s[2];
  }
}

// One row per tensor, as the CUDA table: {p, g, s0, s1, s2, n} (addresses as int64).
constexpr int kRow = 3 + kMaxSlots;

// Tensor k's scalars are args + k * args_stride (stride 0: one set shared by all); every
// gradient of one call has the element type G.
template <class Op, class G>
static void run_multi(int64_t n_tensors, const int64_t* table, const float* args,
                      int64_t args_stride) {
  static_assert(sizeof(typename Op::Args) <= kMaxArgs * sizeof(float), "too many args");
  static_assert(Op::kSlots <= kMaxSlots, "too many slots");
  int64_t total = 0;
  for (int64_t k = 0; k < n_tensors; ++k) total += table[k * kRow + kRow - 1];
  const int n_threads = total >= kParallelMin ? omp_get_max_threads() : 1;
#pragma omp parallel num_threads(n_threads)
  {
    const int64_t nt = omp_get_num_threads();
    const int64_t tid = omp_get_thread_num();
    const int64_t per = ((total + nt - 1) / nt + kAlign - 1) / kAlign * kAlign;
    int64_t lo = per * tid < total ? per * tid : total;
    const int64_t hi = per * (tid + 1) < total ? per * (tid + 1) : total;
    int64_t base = 0;  // flat index of tensor k's first element
    for (int64_t k = 0; k < n_tensors && lo < hi; ++k) {
      const int64_t* row = table + k * kRow;
      const int64_t end = base + row[kRow - 1];
      if (end > lo) {
        const int64_t seg_hi = end < hi ? end : hi;
        typename Op::Args a;
        std::memcpy(&a, args + k * args_stride, sizeof(a));
        float* slots[kMaxSlots];
        for (int j = 0; j < kMaxSlots; ++j) slots[j] = reinterpret_cast<float*>(row[2 + j]);
        run_segment<Op, G>(reinterpret_cast<float*>(row[0]), reinterpret_cast<const G*>(row[1]),
                           slots, lo - base, seg_hi - base, a);
        lo = seg_hi;
      }
      base = end;
    }
  }
}

}  // namespace stepd

// Whole-array passes in parts of kPart elements (the threads' unit of work from
// kParallelMin), each part summing into independent lanes that the compiler vectorises
// without reassociating anything (one chain of adds is bound by the add's latency: a fifth
// of the speed on one thread).
namespace {
constexpr int64_t kPart = int64_t{1} << 16;

int64_t part_end(int64_t k, int64_t n) { return (k + 1) * kPart < n ? (k + 1) * kPart : n; }

// 1 when x[lo, hi) is all finite: x - x is 0 for finite x and NaN for Inf/NaN.
int span_finite(const float* x, int64_t lo, int64_t hi) {
  constexpr int kLanes = 64;
  float lanes[kLanes] = {};
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes)
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) lanes[j] += x[i + j] - x[i + j];
  float acc = 0.0f;
  for (; i < hi; ++i) acc += x[i] - x[i];
  for (int j = 0; j < kLanes; ++j) acc += lanes[j];
  return acc == 0.0f;
}

// x^2 in float64 where x is finite, else 0: Inf and NaN (all exponent bits set) become +0
// by a mask on the bits, no branch, so the loops vectorise.
inline double finite_square(float x) {
  unsigned int u;
  std::memcpy(&u, &x, sizeof u);
  u &= 0u - static_cast<unsigned int>((u & 0x7F800000u) != 0x7F800000u);
  float f;
  std::memcpy(&f, &u, sizeof f);
  const double d = static_cast<double>(f);
  return d * d;
}

template <class Term>
double span_sum(int64_t lo, int64_t hi, Term term) {
  constexpr int kLanes = 16;
  double lanes[kLanes] = {};
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes)
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) lanes[j] += term(i + j);
  double acc = 0.0;
  for (; i < hi; ++i) acc += term(i);
  for (int j = 0; j < kLanes; ++j) acc += lanes[j];
  return acc;
}

// The parts' sums added in part order: the result depends on n, not on the thread count.
template <class Term>
double total(int64_t n, Term term) {
  const int64_t parts = (n + kPart - 1) / kPart;
  std::vector<double> sums(static_cast<size_t>(parts));
#pragma omp parallel for schedule(static) if (n >= stepd::kParallelMin)
  for (int64_t k = 0; k < parts; ++k)
    sums[static_cast<size_t>(k)] = span_sum(k * kPart, part_end(k, n), term);
  double sum = 0.0;
  for (double s : sums) sum += s;
  return sum;
}
}  // namespace

extern "C" {

// 1 when every element is finite: the screen a server runs on each incoming gradient, at
// memory speed, no early exit, no branches.
int stepd_all_finite(const float* x, int64_t n) {
  if (n < stepd::kParallelMin) return span_finite(x, 0, n);
  const int64_t parts = (n + kPart - 1) / kPart;
  int bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static)
  for (int64_t k = 0; k < parts; ++k) bad |= !span_finite(x, k * kPart, part_end(k, n));
  return !bad;
}

// 1 when no element of a 16-bit float array (bfloat16 or float16 bits) is Inf or NaN: its
// exponent bits (`mask`) are never all ones.
int stepd_all_finite_16(const uint16_t* x, int64_t n, uint16_t mask) {
  int bad = 0;
#pragma omp parallel for simd reduction(| : bad) if (n >= stepd::kParallelMin)
  for (int64_t i = 0; i < n; ++i) bad |= (x[i] & mask) == mask;
  return !bad;
}

// The sums behind a store's sampled norms (service/store.py), in float64 over the finite
// entries only, as kernels/norms.py's l2_norm: sum x^2, and sum (a - b)^2 with the
// difference taken in float32 (a step's update: the new value minus a copy of the old).
double stepd_sum_sq(const float* x, int64_t n) {
  return total(n, [x](int64_t i) { return finite_square(x[i]); });
}

double stepd_diff_sum_sq(const float* a, const float* b, int64_t n) {
  return total(n, [a, b](int64_t i) { return finite_square(a[i] - b[i]); });
}

// float32 -> bfloat16 bits, rounded to nearest even as stepd/wire.py's narrow (and torch's
// .to()) rounds: add 0x7FFF plus the kept LSB, keep the top half (NaN is never a parameter:
// parameters are screened). One threaded pass, where NumPy makes four.
void stepd_narrow_bf16(const float* x, uint16_t* out, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= stepd::kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, &x[i], sizeof b);
    b += 0x7FFFu + ((b >> 16) & 1u);
    out[i] = static_cast<uint16_t>(b >> 16);
  }
}

// float32 -> float16 bits, IEEE round to nearest even (beyond the range: Inf), as NumPy's
// astype(float16), which converts one element at a time on one thread. 0 where the
// compiler has no _Float16 (GCC < 12): the caller rounds with NumPy then.
int stepd_narrow_f16(const float* x, uint16_t* out, int64_t n) {
#ifdef __FLT16_MAX__
  _Float16* half = reinterpret_cast<_Float16*>(out);
#pragma omp parallel for simd schedule(static) if (n >= stepd::kParallelMin)
  for (int64_t i = 0; i < n; ++i) half[i] = static_cast<_Float16>(x[i]);
  return 1;
#else
  (void)x, (void)out, (void)n;
  return 0;
#endif
}

// dst = src (n floats), split across the threads from kParallelMin: NumPy copies on one.
void stepd_copy(float* dst, const float* src, int64_t n) {
  const int64_t parts = (n + kPart - 1) / kPart;
#pragma omp parallel for schedule(static) if (n >= stepd::kParallelMin)
  for (int64_t k = 0; k < parts; ++k)
    std::memcpy(dst + k * kPart, src + k * kPart, sizeof(float) * (part_end(k, n) - k * kPart));
}

int stepd_max_slots() { return stepd::kMaxSlots; }
int stepd_max_args() { return stepd::kMaxArgs; }

#define STEPD_OP(name, Op)                                                                  \
  int stepd_##name##_nargs() { return static_cast<int>(sizeof(Op::Args) / sizeof(float)); } \
  int stepd_##name##_nslots() { return Op::kSlots; }                                        \
  void stepd_##name(int64_t n_tensors, const int64_t* table, const float* args,             \
                    int64_t args_stride) {                                                  \
    stepd::run_multi<Op, float>(n_tensors, table, args, args_stride);                       \
  }                                                                                         \
  void stepd_##name##_bf16(int64_t n_tensors, const int64_t* table, const float* args,      \
                           int64_t args_stride) {                                           \
    stepd::run_multi<Op, stepd::Bf16>(n_tensors, table, args, args_stride);                 \
  }                                                                                         \
  void stepd_##name##_f16(int64_t n_tensors, const int64_t* table, const float* args,       \
                          int64_t args_stride) {                                            \
    stepd::run_multi<Op, stepd::F16>(n_tensors, table, args, args_stride);                  \
  }
#include "ops.cuh"
#undef STEPD_OP

}  // extern "C"

// Blockwise 8-bit state (blockwise8.cuh): a table row per tensor {p, g, code0, code1,
// absmax0, absmax1, n}; the threads split all tensors' quantization blocks evenly, and a
// thread steps each of its blocks whole, so no block's absmax is shared between threads
// (through one BlockStepper, which holds what it prepares once per thread).
#include "blockwise8.cuh"

namespace stepd {

constexpr int kRow8 = 7;

template <class Op, class G>
static void run_blockwise(int64_t n_tensors, const int64_t* table, const QuantTables* tables,
                          const float* args, int64_t args_stride) {
  static_assert(sizeof(typename Op::Args) <= kMaxArgs * sizeof(float), "too many args");
  int64_t total = 0, blocks = 0;
  for (int64_t k = 0; k < n_tensors; ++k) {
    const int64_t n = table[k * kRow8 + kRow8 - 1];
    total += n;
    blocks += (n + kQuantBlock - 1) / kQuantBlock;
  }
  const int n_threads = total >= kParallelMin ? omp_get_max_threads() : 1;
#pragma omp parallel num_threads(n_threads)
  {
    const int64_t nt = omp_get_num_threads();
    const int64_t tid = omp_get_thread_num();
    const int64_t per = (blocks + nt - 1) / nt;
    BlockStepper<Op, G> stepper(*tables);
    int64_t lo = per * tid < blocks ? per * tid : blocks;
    const int64_t hi = per * (tid + 1) < blocks ? per * (tid + 1) : blocks;
    int64_t base = 0;  // flat index of tensor k's first block
    for (int64_t k = 0; k < n_tensors && lo < hi; ++k) {
      const int64_t* row = table + k * kRow8;
      const int64_t n = row[kRow8 - 1];
      const int64_t end = base + (n + kQuantBlock - 1) / kQuantBlock;
      if (end > lo) {
        typename Op::Args a;
        std::memcpy(&a, args + k * args_stride, sizeof(a));
        float* p = reinterpret_cast<float*>(row[0]);
        const G* g = reinterpret_cast<const G*>(row[1]);
        for (int64_t blk = lo - base; blk < (end < hi ? end : hi) - base; ++blk) {
          const int64_t first = blk * kQuantBlock;
          Block8 b;
          for (int j = 0; j < 2; ++j) {
            b.code[j] = reinterpret_cast<unsigned char*>(row[2 + j]) + first;
            b.absmax[j] = reinterpret_cast<float*>(row[4 + j]) + blk;
          }
          const int64_t len = n - first < kQuantBlock ? n - first : kQuantBlock;
          stepper.step(p + first, g + first, b, static_cast<int>(len), a);
        }
        lo = end < hi ? end : hi;
      }
      base = end;
    }
  }
}

}  // namespace stepd

extern "C" {

int stepd_quant_tables_bytes() { return static_cast<int>(sizeof(stepd::QuantTables)); }

#define STEPD_BLOCKWISE_OP(name, Op)                                                        \
  int stepd_##name##_nargs() { return static_cast<int>(sizeof(Op::Args) / sizeof(float)); } \
  int stepd_##name##_nslots() { return Op::kStates; }                                       \
  void stepd_##name(int64_t n_tensors, const int64_t* table, const void* tables,            \
                    const float* args, int64_t args_stride) {                               \
    stepd::run_blockwise<Op, float>(n_tensors, table,                                       \
                                    static_cast<const stepd::QuantTables*>(tables), args,   \
                                    args_stride);                                           \
  }                                                                                         \
  void stepd_##name##_bf16(int64_t n_tensors, const int64_t* table, const void* tables,     \
                           const float* args, int64_t args_stride) {                        \
    stepd::run_blockwise<Op, stepd::Bf16>(n_tensors, table,                                 \
                                          static_cast<const stepd::QuantTables*>(tables),   \
                                          args, args_stride);                               \
  }                                                                                         \
  void stepd_##name##_f16(int64_t n_tensors, const int64_t* table, const void* tables,      \
                          const float* args, int64_t args_stride) {                         \
    stepd::run_blockwise<Op, stepd::F16>(n_tensors, table,                                  \
                                         static_cast<const stepd::QuantTables*>(tables),    \
                                         args, args_stride);                                \
  }
#include "blockwise_ops.cuh"
#undef STEPD_BLOCKWISE_OP

}  // extern "C"
