// 8-bit optimizer state, blockwise quantized as bitsandbytes does (Dettmers et al. 2022):
// each state slot is one uint8 code per element plus one float32 absmax per block of
// kQuantBlock elements; a code indexes a 256-entry dynamic map in [-1, 1] (signed for a
// momentum, unsigned for a second moment) and the value is code_value * absmax.
//
// A step of one block, in one pass over memory: dequantize every element's state, run the
// wrapped float32 op (Adam, Lion, SGD momentum: the same apply as the 32-bit kernels), keep
// the new state in registers / a local array while taking the block's new absmax, then
// requantize against that absmax. The parameter update uses the unquantized new state.
//
// Quantizing is round-to-nearest code (a tie goes to the lower code): the code of y is the
// number of midpoints between consecutive map values below y. No search: the host builds,
// per map and sign of y, a table indexed by |y|'s exponent and top 8 mantissa bits (an
// interval narrower than any gap between midpoints, checked on the host) holding the count
// below the interval and the low 15 bits of the one midpoint inside it, if any; comparing
// y's low bits with those finishes the count: one table read per element (an AVX-512
// gather on the CPU, 16 elements at a time).
#pragma once
#include "adam.cuh"
#include "common.cuh"
#include "lion.cuh"
#include "sgd.cuh"
#if defined(__AVX512F__) && !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
#include <immintrin.h>
#endif

namespace stepd {

constexpr int kQuantBlock = 256;
constexpr int kLutMantissaBits = 8;
constexpr int kLutMinExponent = 127 - 24;  // |y| below 2^-24 shares the first interval
constexpr int kLutEntries = 25 << kLutMantissaBits;  // exponents 2^-24 .. 2^0
constexpr int kSignedMap = 0, kUnsignedMap = 1;

// Built by the host (kernels/blockwise.py): layout is the contract, plain arrays only.
struct QuantTables {
  float code[2][256];                  // [map]: the dynamic maps, ascending
  unsigned int lut[2][2][kLutEntries];  // [map][y < 0]: count | midpoint's low bits << 8
};

STEPD_HD unsigned int float_to_bits(float f) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
  return __float_as_uint(f);
#else
  unsigned int u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// The nearest code of x / absmax (|x| <= absmax; absmax 0: the whole block is 0). For
// y >= 0 the midpoint inside the interval is below y when y's low bits are above its; for
// y < 0, when |y|'s are below: both as one unsigned comparison, the negative side's bits
// complemented (an entry with no midpoint inside never compares above). Branch-free, so
// it vectorises. -0 takes the negative table, whose first entry agrees with the positive.
STEPD_HD unsigned char quantize(const unsigned int* __restrict__ lut, float x, float absmax) {
  const float y = x / (absmax > 0.0f ? absmax : 1.0f);
  const unsigned int bits = float_to_bits(y);
  const unsigned int magnitude = bits & 0x7FFFFFFFu;
  int key = static_cast<int>(magnitude >> (23 - kLutMantissaBits)) -
            (kLutMinExponent << kLutMantissaBits);
  key = key < 0 ? 0 : (key >= kLutEntries ? kLutEntries - 1 : key);
  const unsigned int negative = 0u - (bits >> 31);  // all ones for y < 0
  const unsigned int entry = lut[key + (negative & kLutEntries)];
  const unsigned int low = (magnitude & ((1u << (23 - kLutMantissaBits)) - 1)) ^ negative;
  const unsigned int mid = (entry >> 8) ^ negative;
  return static_cast<unsigned char>((entry & 0xFFu) + (low > mid));
}

// An 8-bit variant of a float32 op with one or two state slots: slot 0 (a momentum) on
// the signed map, slot 1 (a second moment, never negative) on the unsigned one.
template <class InnerOp>
struct Blockwise8 {
  using Inner = InnerOp;
  static constexpr int kStates = Inner::kSlots;
  static_assert(kStates == 1 || kStates == 2, "one or two quantized slots");
  using Args = typename Inner::Args;
  STEPD_HD static int map_of(int slot) { return slot == 0 ? kSignedMap : kUnsignedMap; }
};

// The 8-bit state of one block: codes and absmax per quantized slot (this block's entries).
struct Block8 {
  unsigned char* code[2];
  float* absmax[2];
};

#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
// The CPU build: a block of n <= kQuantBlock elements on one thread (the CPU's unit of
// work), in three loops over the block held in local arrays: dequantize; update, and the
// new absmax (a max of |s| taken on the bits: for non-negative floats their order is the
// integers'); requantize. The update loop is auto-vectorised; the other two are spelled
// with AVX-512 where the compiler targets it (GCC 12 emulates their table reads element by
// element), and cost about as much as the update (Adam: a square root and two divisions
// per element), so every vector operation in them counts:
// - dequantizing with AVX512-VBMI is a byte shuffle, no memory read: the map as four
//   256-byte planes (one per byte of a float) in 16 registers, 64 codes looked up per
//   plane with two 128-entry two-register permutes and a blend, the bytes then
//   interleaved back into floats; with AVX-512F alone a gather, 16 codes at a time;
// - requantizing is quantize() above, 16 lanes at a time, trimmed (Quantizer16), its table
//   read a gather, and 64 codes narrowed with two byte permutes. Its division stays: the
//   loop is bound by its vector operations, not by the divider, and every exact
//   replacement measured (x times a double reciprocal) costs more of them.
// Pipelining blocks (requantizing one while updating the next) was slower too. The
// results are the portable loops', bit for bit; the tails go through those.
#if defined(__AVX512F__)
#define STEPD_BLOCKWISE_AVX512 1
#if defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define STEPD_BLOCKWISE_VBMI 1
#endif
#endif

// The map of one slot, ready for dequantize_block: with VBMI its byte planes in registers
// (built once per thread and call, not per block).
struct DequantMap {
  const float* map;
#ifdef STEPD_BLOCKWISE_VBMI
  __m512i plane[4][4];  // [byte of the float][codes 64 q .. 64 q + 63]
#endif

  explicit DequantMap(const float* m) : map(m) {
#ifdef STEPD_BLOCKWISE_VBMI
    alignas(64) unsigned char bytes[4][256];
    for (int c = 0; c < 256; ++c) {
      const unsigned int u = float_to_bits(m[c]);
      for (int k = 0; k < 4; ++k) bytes[k][c] = static_cast<unsigned char>(u >> (8 * k));
    }
    for (int k = 0; k < 4; ++k)
      for (int q = 0; q < 4; ++q) plane[k][q] = _mm512_load_si512(bytes[k] + 64 * q);
#endif
  }
};

#ifdef STEPD_BLOCKWISE_VBMI
// 64 codes: each byte plane looked up with two 128-entry permutes (the code's low 7 bits)
// and a blend on its top bit; then bytes 0,1 and 2,3 interleave into 16-bit pairs and
// those into floats. The interleaves work within 128-bit lanes, so the codes are first
// reordered (a 4x4 transpose of 4-byte groups) for the floats to come out in order.
inline void dequantize64(float* __restrict__ values, const unsigned char* __restrict__ codes,
                         const DequantMap& d, __m512 scale) {
  // position 16 L + 4 r + q (lane L, output vector r, q < 4) takes code 16 r + 4 L + q
  const __m512i order = _mm512_set_epi8(
      63, 62, 61, 60, 47, 46, 45, 44, 31, 30, 29, 28, 15, 14, 13, 12,  //
      59, 58, 57, 56, 43, 42, 41, 40, 27, 26, 25, 24, 11, 10, 9, 8,    //
      55, 54, 53, 52, 39, 38, 37, 36, 23, 22, 21, 20, 7, 6, 5, 4,      //
      51, 50, 49, 48, 35, 34, 33, 32, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i index = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(codes));
  const __mmask64 high = _mm512_movepi8_mask(index);
  __m512i byte[4];
  for (int k = 0; k < 4; ++k) {
    const __m512i low_half = _mm512_permutex2var_epi8(d.plane[k][0], index, d.plane[k][1]);
    const __m512i high_half = _mm512_permutex2var_epi8(d.plane[k][2], index, d.plane[k][3]);
    byte[k] = _mm512_mask_blend_epi8(high, low_half, high_half);
  }
  const __m512i b01_lo = _mm512_unpacklo_epi8(byte[0], byte[1]);
  const __m512i b01_hi = _mm512_unpackhi_epi8(byte[0], byte[1]);
  const __m512i b23_lo = _mm512_unpacklo_epi8(byte[2], byte[3]);
  const __m512i b23_hi = _mm512_unpackhi_epi8(byte[2], byte[3]);
  const __m512i word[4] = {
      _mm512_unpacklo_epi16(b01_lo, b23_lo), _mm512_unpackhi_epi16(b01_lo, b23_lo),
      _mm512_unpacklo_epi16(b01_hi, b23_hi), _mm512_unpackhi_epi16(b01_hi, b23_hi)};
  for (int r = 0; r < 4; ++r)
    _mm512_storeu_ps(values + 16 * r, _mm512_mul_ps(_mm512_castsi512_ps(word[r]), scale));
}
#endif

// codes -> float values of one block.
inline void dequantize_block(float* __restrict__ values, const unsigned char* __restrict__ codes,
                             const DequantMap& d, float scale, int n) {
  int i = 0;
#ifdef STEPD_BLOCKWISE_AVX512
  const __m512 vscale = _mm512_set1_ps(scale);
#ifdef STEPD_BLOCKWISE_VBMI
  for (; i + 64 <= n; i += 64) dequantize64(values + i, codes + i, d, vscale);
#endif
  for (; i + 16 <= n; i += 16) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i));
    const __m512 value = _mm512_i32gather_ps(_mm512_cvtepu8_epi32(packed), d.map, 4);
    _mm512_storeu_ps(values + i, _mm512_mul_ps(value, vscale));
  }
#endif
  for (; i < n; ++i) values[i] = d.map[codes[i]] * scale;
}

#ifdef STEPD_BLOCKWISE_AVX512
// quantize() for 16 values, with fewer operations, given |y| <= 1 (|x| <= absmax): the
// lower clamp on the magnitude and no upper one; the table's first key folded into its
// base address; the sign as a mask for the table's half. The code is the entry's low byte
// plus one where y is above the midpoint (count + 1 <= 255 whenever a midpoint lies above),
// left in each 32-bit lane for the caller to narrow. On the unsigned map (kNonNegative) a
// y below +0 (-0 included: its bits as an integer) takes +0's code, 0, as it should (every
// midpoint is above 0), and the positive half of the table does for all.
template <bool kNonNegative>
struct Quantizer16 {
  __m512 divisor;
  const int* table;  // lut, less the first key (never read below lut)
  explicit Quantizer16(const unsigned int* lut, float absmax)
      : divisor(_mm512_set1_ps(absmax > 0.0f ? absmax : 1.0f)),
        table(reinterpret_cast<const int*>(
            reinterpret_cast<__UINTPTR_TYPE__>(lut) -
            sizeof(unsigned int) * (kLutMinExponent << kLutMantissaBits))) {}

  __m512i operator()(const float* __restrict__ values) const {
    const __m512i low_mask = _mm512_set1_epi32((1 << (23 - kLutMantissaBits)) - 1);
    const __m512i bits = _mm512_castps_si512(_mm512_div_ps(_mm512_loadu_ps(values), divisor));
    const __m512i magnitude = kNonNegative
                                  ? _mm512_max_epi32(bits, _mm512_setzero_si512())
                                  : _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
    __m512i index = _mm512_srli_epi32(
        _mm512_max_epu32(magnitude, _mm512_set1_epi32(kLutMinExponent << 23)),
        23 - kLutMantissaBits);
    if constexpr (kNonNegative) {
      const __m512i entry = _mm512_i32gather_epi32(index, table, 4);
      const __mmask16 above = _mm512_cmpgt_epu32_mask(_mm512_and_si512(magnitude, low_mask),
                                                      _mm512_srli_epi32(entry, 8));
      return _mm512_mask_add_epi32(entry, above, entry, _mm512_set1_epi32(1));
    }
    const __mmask16 is_negative = _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512());
    index = _mm512_mask_add_epi32(index, is_negative, index, _mm512_set1_epi32(kLutEntries));
    const __m512i entry = _mm512_i32gather_epi32(index, table, 4);
    const __m512i negative = _mm512_srai_epi32(bits, 31);
    // (magnitude & low bits) ^ negative, and the midpoint's low bits ^ negative
    const __m512i low = _mm512_ternarylogic_epi32(magnitude, low_mask, negative, 0x6A);
    const __m512i mid = _mm512_xor_si512(_mm512_srli_epi32(entry, 8), negative);
    const __mmask16 above = _mm512_cmpgt_epu32_mask(low, mid);
    return _mm512_mask_add_epi32(entry, above, entry, _mm512_set1_epi32(1));
  }
};
#endif

// float values -> codes of one block, against its new absmax, on map kMap.
template <int kMap>
inline void quantize_block(unsigned char* __restrict__ codes, const float* __restrict__ values,
                           const unsigned int* __restrict__ lut, float absmax, int n) {
  int i = 0;
#ifdef STEPD_BLOCKWISE_AVX512
  const Quantizer16<kMap == kUnsignedMap> quantize16(lut, absmax);
#ifdef STEPD_BLOCKWISE_VBMI
  // 64 codes narrowed at once: the low bytes of two vectors' lanes by one permute each
  const __m512i low_bytes = _mm512_set_epi8(
      124, 120, 116, 112, 108, 104, 100, 96, 92, 88, 84, 80, 76, 72, 68, 64,  //
      60, 56, 52, 48, 44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4, 0,            //
      124, 120, 116, 112, 108, 104, 100, 96, 92, 88, 84, 80, 76, 72, 68, 64,  //
      60, 56, 52, 48, 44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4, 0);
  for (; i + 64 <= n; i += 64) {
    const __m512i ab =
        _mm512_permutex2var_epi8(quantize16(values + i), low_bytes, quantize16(values + i + 16));
    const __m512i cd = _mm512_permutex2var_epi8(quantize16(values + i + 32), low_bytes,
                                                quantize16(values + i + 48));
    _mm512_storeu_si512(codes + i, _mm512_inserti64x4(ab, _mm512_castsi512_si256(cd), 1));
  }
#endif
  for (; i + 16 <= n; i += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i),
                     _mm512_cvtepi32_epi8(quantize16(values + i)));
#endif
  for (; i < n; ++i) codes[i] = quantize(lut, values[i], absmax);
}

// Steps a thread's blocks, one call per block, with the dequantizing maps made once.
// Slot 0 is on the signed map and slot 1 on the unsigned one (Blockwise8::map_of).
template <class Op, class G>
class BlockStepper {
 public:
  explicit BlockStepper(const QuantTables& t)
      : t_(t), map_{DequantMap(t.code[kSignedMap]), DequantMap(t.code[kUnsignedMap])} {}

  void step(float* __restrict__ p, const G* __restrict__ g, const Block8& b, int n,
            const typename Op::Args& a) {
    constexpr int S = Op::kStates;
    alignas(64) float state0[kQuantBlock];
    alignas(64) float state1[S > 1 ? kQuantBlock : 1];
    dequantize_block(state0, b.code[0], map_[0], *b.absmax[0], n);
    if constexpr (S > 1) dequantize_block(state1, b.code[1], map_[1], *b.absmax[1], n);
    unsigned int top0 = 0, top1 = 0;
    for (int i = 0; i < n; ++i) {
      float s[kMaxSlots];
      s[0] = state0[i];
      if constexpr (S > 1) s[1] = state1[i];
      float pi = p[i];
      Op::Inner::apply(pi, widen(g[i]), s, a);
      p[i] = pi;
      state0[i] = s[0];
      const unsigned int m0 = float_to_bits(s[0]) & 0x7FFFFFFFu;
      top0 = top0 < m0 ? m0 : top0;
      if constexpr (S > 1) {
        state1[i] = s[1];
        const unsigned int m1 = float_to_bits(s[1]) & 0x7FFFFFFFu;
        top1 = top1 < m1 ? m1 : top1;
      }
    }
    *b.absmax[0] = bits_to_float(top0);
    quantize_block<kSignedMap>(b.code[0], state0, t_.lut[kSignedMap][0], *b.absmax[0], n);
    if constexpr (S > 1) {
      *b.absmax[1] = bits_to_float(top1);
      quantize_block<kUnsignedMap>(b.code[1], state1, t_.lut[kUnsignedMap][0], *b.absmax[1], n);
    }
  }

 private:
  const QuantTables& t_;
  DequantMap map_[2];
};
#endif  // CPU only

using Adam8 = Blockwise8<Adam>;
using Lion8 = Blockwise8<Lion>;
using SgdMomentum8 = Blockwise8<SgdMomentum>;

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// One block of kQuantBlock threads per quantization block, one element per thread: the new
// state stays in a register while the block agrees on its absmax (warp shuffles, then one
// shared word per warp); max is exact in any order, so the result is the CPU's bit for bit.
template <class Op, class G>
__device__ __forceinline__ void step_block_device(float* p, const G* g, const Block8& b,
                                                  long long n, const QuantTables& t,
                                                  const typename Op::Args& a) {
  constexpr int S = Op::kStates;
  constexpr int kWarps = kQuantBlock / 32;
  __shared__ float warp_top[S][kWarps];
  const int i = threadIdx.x;
  const bool live = i < n;
  float s[kMaxSlots] = {0.0f, 0.0f, 0.0f};
  if (live) {
    for (int j = 0; j < S; ++j) s[j] = t.code[Op::map_of(j)][b.code[j][i]] * *b.absmax[j];
    float pi = p[i];
    Op::Inner::apply(pi, widen(g[i]), s, a);
    p[i] = pi;
  }
  float top[S];
  for (int j = 0; j < S; ++j) {
    float m = live ? fabsf(s[j]) : 0.0f;
    for (int lane = 16; lane > 0; lane >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, lane));
    if ((i & 31) == 0) warp_top[j][i >> 5] = m;
  }
  __syncthreads();  // every thread has read its old absmax before thread 0 writes the new
  for (int j = 0; j < S; ++j) {
    float m = 0.0f;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, warp_top[j][w]);
    top[j] = m;
  }
  if (i == 0)
    for (int j = 0; j < S; ++j) *b.absmax[j] = top[j];
  if (live)
    for (int j = 0; j < S; ++j) b.code[j][i] = quantize(t.lut[Op::map_of(j)][0], s[j], top[j]);
}
#endif

}  // namespace stepd

