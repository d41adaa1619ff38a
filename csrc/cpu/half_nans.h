// vcvtps2ph rounds float32 to float16 as ElementCodec<c10::Half> does, subnormals included, but
// keeps the top of a NaN's payload; the codec's NaN is sign | 0x7E00, which is what the
// instruction gives for the float NaN sign | 0x7FC00000. So NaNs are replaced by that first.
// Used by the fp16 tiles (half_tiles.cpp) and the AVX-512 loop's codec (simd_lanes.h); each
// function carries its own target, so it inlines into any caller compiled with that or more.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace rmsprop_fused {
namespace cpu {

inline constexpr int32_t kSignBit = INT32_MIN;
inline constexpr int32_t kQuietNanForHalf = 0x7FC00000;

__attribute__((target("avx512f"), always_inline)) inline __m512 quiet_nans_for_vcvtps2ph(__m512 x) {
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i canonical = _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(kSignBit)),
                                            _mm512_set1_epi32(kQuietNanForHalf));
  return _mm512_mask_mov_ps(x, nan, _mm512_castsi512_ps(canonical));
}

__attribute__((target("avx,f16c"), always_inline)) inline __m256 quiet_nans_for_vcvtps2ph(__m256 x) {
  const __m256 canonical = _mm256_or_ps(_mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(kSignBit))),
                                        _mm256_castsi256_ps(_mm256_set1_epi32(kQuietNanForHalf)));
  return _mm256_blendv_ps(x, canonical, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

}  // namespace cpu
}  // namespace rmsprop_fused
