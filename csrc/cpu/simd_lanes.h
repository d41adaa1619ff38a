// Sixteen float32 lanes of an AVX-512 register as an arithmetic type, so that rmsprop_update
// (rmsprop_update.h), written once for every backend, runs on them unchanged: each operator is
// one IEEE operation per lane (vaddps, vmulps, vdivps, vsqrtps: correctly rounded, like the
// scalar code; FMA contraction is off), comparisons give lane masks, `where` blends on them, and
// conditions of an option (select, apply_if) blend on a mask of all lanes or none.
// With the codecs below (loads and stores of float32, bfloat16 and float16 lanes, with the
// conversion instructions) this is the CPU step of rmsprop_cpu_avx512.cpp.
//
// Include only under `#pragma GCC target` with AVX-512 F/BW/VL/DQ/VBMI and BF16 (that file): every
// function here is inline and uses those instructions.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../element_codec.h"
#include "half_nans.h"

namespace rmsprop_fused {
namespace cpu {
namespace simd {

struct Mask16 {
  __mmask16 bits;
};

inline __attribute__((always_inline)) Mask16 operator&&(Mask16 a, Mask16 b) {
  return {static_cast<__mmask16>(a.bits & b.bits)};
}

struct Lanes16 {
  __m512 v;
  Lanes16() = default;
  explicit Lanes16(__m512 x) : v(x) {}
  explicit Lanes16(float x) : v(_mm512_set1_ps(x)) {}
};

#define RMSPROP_LANES_INLINE inline __attribute__((always_inline))

RMSPROP_LANES_INLINE Lanes16 operator+(Lanes16 a, Lanes16 b) { return Lanes16(_mm512_add_ps(a.v, b.v)); }
RMSPROP_LANES_INLINE Lanes16 operator-(Lanes16 a, Lanes16 b) { return Lanes16(_mm512_sub_ps(a.v, b.v)); }
RMSPROP_LANES_INLINE Lanes16 operator*(Lanes16 a, Lanes16 b) { return Lanes16(_mm512_mul_ps(a.v, b.v)); }
RMSPROP_LANES_INLINE Lanes16 operator/(Lanes16 a, Lanes16 b) { return Lanes16(_mm512_div_ps(a.v, b.v)); }
// -x flips the sign bit, NaN included, as the scalar negation does
RMSPROP_LANES_INLINE Lanes16 operator-(Lanes16 a) {
  return Lanes16(_mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN))));
}
// ordered comparisons: false where either side is NaN, as in C++
RMSPROP_LANES_INLINE Mask16 operator<(Lanes16 a, Lanes16 b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
RMSPROP_LANES_INLINE Mask16 operator>(Lanes16 a, Lanes16 b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
RMSPROP_LANES_INLINE Mask16 operator==(Lanes16 a, Lanes16 b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ)}; }

RMSPROP_LANES_INLINE Lanes16 where(Mask16 cond, Lanes16 a, Lanes16 b) {
  return Lanes16(_mm512_mask_blend_ps(cond.bits, b.v, a.v));
}
// a blend on a mask of all or no lanes (GCC turns `cond ? a : b` on these structs into a select
// through memory)
RMSPROP_LANES_INLINE Lanes16 select(bool cond, Lanes16 a, Lanes16 b) {
  return Lanes16(_mm512_mask_blend_ps(static_cast<__mmask16>(-static_cast<int>(cond)), b.v, a.v));
}
template <typename F>
RMSPROP_LANES_INLINE Lanes16 apply_if(bool cond, Lanes16 x, F&& f) {
  return select(cond, f(x), x);
}
RMSPROP_LANES_INLINE Lanes16 square_root(Lanes16 x) { return Lanes16(_mm512_sqrt_ps(x.v)); }
// the lanes of x that hold a NaN
RMSPROP_LANES_INLINE __mmask16 nan_lanes(Lanes16 x) { return _mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q); }
// rmsprop_update.h's repair_nans: fix only for a vector with a NaN lane (one compare and a branch)
template <typename F>
RMSPROP_LANES_INLINE Lanes16 repair_nans(Lanes16 x, F&& fix) {
  if (__builtin_expect(nan_lanes(x) == 0, 1)) return x;
  return fix(x);
}

// Loads and stores of up to 16 consecutive elements (the lanes of `mask`; the others load 0 and
// are not stored), with the bits of ElementCodec<T> (element_codec.h).
template <typename T>
struct LaneCodec;

template <>
struct LaneCodec<float> {
  using storage_t = float;
  static RMSPROP_LANES_INLINE Lanes16 load(const float* p, __mmask16 mask) {
    return Lanes16(_mm512_maskz_loadu_ps(mask, p));
  }
  static RMSPROP_LANES_INLINE void store(float* p, Lanes16 x, __mmask16 mask) {
    _mm512_mask_storeu_ps(p, mask, x.v);
  }
  static RMSPROP_LANES_INLINE void store_pair(float* p, Lanes16 low, Lanes16 high) {
    _mm512_storeu_ps(p, low.v);
    _mm512_storeu_ps(p + 16, high.v);
  }
};

// The stores of a 16-bit codec, from its `rounded` (sixteen lanes to sixteen 16-bit values) and
// `rounded_pair` (thirty-two: low's, then high's, with one check for both vectors of what the
// instruction would round otherwise than the codec); a codec may write its pair itself.
template <class Codec>
struct SixteenBitStores {
  static RMSPROP_LANES_INLINE void store(uint16_t* p, Lanes16 x, __mmask16 mask) {
    _mm256_mask_storeu_epi16(p, mask, Codec::rounded(x));
  }
  // 32 elements, a whole cache line when aligned, in one store
  static RMSPROP_LANES_INLINE void store_pair(uint16_t* p, Lanes16 low, Lanes16 high) {
    _mm512_storeu_si512(p, Codec::rounded_pair(low, high));
  }
};

RMSPROP_LANES_INLINE __m512i concatenated(__m256i low, __m256i high) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}

// vcvtneps2bf16 rounds to nearest even as the codec does, but treats subnormal inputs as zero and
// keeps a NaN's payload: a vector that holds either (vfpclassps) is rounded as the codec does.
template <>
struct LaneCodec<c10::BFloat16> : SixteenBitStores<LaneCodec<c10::BFloat16>> {
  using storage_t = uint16_t;
  static RMSPROP_LANES_INLINE Lanes16 load(const uint16_t* p, __mmask16 mask) {
    const __m512i widened = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
    return Lanes16(_mm512_castsi512_ps(_mm512_slli_epi32(widened, 16)));
  }
  // vfpclassps: the lanes the instruction would round otherwise than the codec
  static RMSPROP_LANES_INLINE __mmask16 not_for_the_instruction(Lanes16 x) {
    constexpr int kQuietNan = 0x01, kSubnormal = 0x20, kSignallingNan = 0x80;
    return _mm512_fpclass_ps_mask(x.v, kQuietNan | kSubnormal | kSignallingNan);
  }
  // the codec's rounding, in the low 16 bits of each 32-bit lane
  static RMSPROP_LANES_INLINE __m512i codec_rounded(Lanes16 x) {
    const __m512i u = _mm512_castps_si512(x.v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i nearest =
        _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = nan_lanes(x);
    return _mm512_mask_blend_epi32(nan, nearest, _mm512_set1_epi32(ElementCodec<c10::BFloat16>::kQuietNaN));
  }
  static RMSPROP_LANES_INLINE __m256i rounded(Lanes16 x) {
    if (__builtin_expect(not_for_the_instruction(x) == 0, 1)) return (__m256i)_mm512_cvtneps_pbh(x.v);
    return _mm512_cvtepi32_epi16(codec_rounded(x));
  }
  static RMSPROP_LANES_INLINE __m512i rounded_pair(Lanes16 low, Lanes16 high) {
    // kortestw: whether either mask has a lane, without moving them to general registers
    if (__builtin_expect(_kortestz_mask16_u8(not_for_the_instruction(low), not_for_the_instruction(high)), 1)) {
      return (__m512i)_mm512_cvtne2ps_pbh(high.v, low.v);
    }
    return concatenated(_mm512_cvtepi32_epi16(codec_rounded(low)), _mm512_cvtepi32_epi16(codec_rounded(high)));
  }
  // 32 elements as their even and odd ones: a bfloat16 is the top half of a float32, so the even
  // elements of a 64-byte load are its 32-bit lanes shifted left, the odd ones the lanes masked
  // (one instruction for 16 elements, where widening them in order takes two). Elementwise
  // arithmetic does not mind the order, if every stream has it.
  static RMSPROP_LANES_INLINE void load_interleaved(const uint16_t* p, Lanes16& even, Lanes16& odd) {
    const __m512i pairs = _mm512_loadu_si512(p);
    even = Lanes16(_mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)));
    odd = Lanes16(_mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(int32_t(0xFFFF0000u)))));
  }
  static RMSPROP_LANES_INLINE void store_interleaved(uint16_t* p, Lanes16 even, Lanes16 odd) {
    // words 0-15 the even elements, 16-31 the odd ones, then back in order
    const __m512i in_order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    _mm512_storeu_si512(p, _mm512_permutexvar_epi16(in_order, rounded_pair(even, odd)));
  }
};

// vcvtps2ph rounds as the codec does, subnormals included, once NaNs are the codec's (half_nans.h).
template <>
struct LaneCodec<c10::Half> : SixteenBitStores<LaneCodec<c10::Half>> {
  using storage_t = uint16_t;
  static RMSPROP_LANES_INLINE Lanes16 load(const uint16_t* p, __mmask16 mask) {
    return Lanes16(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p)));
  }
  static RMSPROP_LANES_INLINE __m256i converted(__m512 x) {
    return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // NaNs are made canonical only in a vector that has one (a branch, not a blend in every store)
  static RMSPROP_LANES_INLINE __m256i rounded(Lanes16 x) {
    if (__builtin_expect(nan_lanes(x) == 0, 1)) return converted(x.v);
    return converted(quiet_nans_for_vcvtps2ph(x.v));
  }
  // 32 elements as two 32-byte stores of the two conversions: joining them into one register
  // first (vinserti64x4) cost a vector-port instruction a stream, 1-4% of the step with momentum
  // (bf16's vcvtne2ps2bf16 rounds both vectors into one register by itself). An unordered
  // comparison of the two vectors finds a NaN in either.
  static RMSPROP_LANES_INLINE void store_pair(uint16_t* p, Lanes16 low, Lanes16 high) {
    if (__builtin_expect(_mm512_cmp_ps_mask(low.v, high.v, _CMP_UNORD_Q) != 0, 0)) {
      low = Lanes16(quiet_nans_for_vcvtps2ph(low.v));
      high = Lanes16(quiet_nans_for_vcvtps2ph(high.v));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), converted(low.v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16), converted(high.v));
  }
};

#undef RMSPROP_LANES_INLINE

}  // namespace simd
}  // namespace cpu
}  // namespace rmsprop_fused
