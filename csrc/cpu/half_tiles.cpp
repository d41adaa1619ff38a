// The tile conversions of half_tiles.h: one version per instruction set, the widest the CPU has
// picked once, when the extension loads.
#include "half_tiles.h"

#include <c10/util/Half.h>

#include "../element_codec.h"

#if defined(RMSPROP_CPU_HALF_TILES)
// GCC 12's own intrinsics (_mm512_cvtph_ps, _mm256_cvtph_ps) start from an undefined vector that
// it then warns about.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "half_nans.h"
#endif

namespace rmsprop_fused {
namespace cpu {
namespace {

using HalfCodec = ElementCodec<c10::Half>;

void halves_to_floats_portable(const uint16_t* __restrict__ halves, float* __restrict__ floats,
                               int64_t n) {
  for (int64_t k = 0; k < n; ++k) floats[k] = HalfCodec::load(halves[k]);
}

void floats_to_halves_portable(const float* __restrict__ floats, uint16_t* __restrict__ halves,
                               int64_t n) {
  for (int64_t k = 0; k < n; ++k) halves[k] = HalfCodec::store(floats[k]);
}

#if defined(RMSPROP_CPU_HALF_TILES)
// NaNs made the codec's first (half_nans.h)
constexpr int kNearestEven = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

__attribute__((target("avx512f"))) void halves_to_floats_avx512(
    const uint16_t* __restrict__ halves, float* __restrict__ floats, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(halves + k));
    _mm512_storeu_ps(floats + k, _mm512_cvtph_ps(h));
  }
  halves_to_floats_portable(halves + k, floats + k, n - k);
}

__attribute__((target("avx512f"))) void floats_to_halves_avx512(
    const float* __restrict__ floats, uint16_t* __restrict__ halves, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 y = quiet_nans_for_vcvtps2ph(_mm512_loadu_ps(floats + k));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(halves + k), _mm512_cvtps_ph(y, kNearestEven));
  }
  floats_to_halves_portable(floats + k, halves + k, n - k);
}

__attribute__((target("avx,f16c"))) void halves_to_floats_f16c(
    const uint16_t* __restrict__ halves, float* __restrict__ floats, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(halves + k));
    _mm256_storeu_ps(floats + k, _mm256_cvtph_ps(h));
  }
  halves_to_floats_portable(halves + k, floats + k, n - k);
}

__attribute__((target("avx,f16c"))) void floats_to_halves_f16c(
    const float* __restrict__ floats, uint16_t* __restrict__ halves, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 y = quiet_nans_for_vcvtps2ph(_mm256_loadu_ps(floats + k));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(halves + k), _mm256_cvtps_ph(y, kNearestEven));
  }
  floats_to_halves_portable(floats + k, halves + k, n - k);
}
#endif

struct Conversions {
  void (*to_floats)(const uint16_t* __restrict__, float* __restrict__, int64_t);
  void (*to_halves)(const float* __restrict__, uint16_t* __restrict__, int64_t);
};

Conversions pick_conversions() {
#if defined(RMSPROP_CPU_HALF_TILES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    return {halves_to_floats_avx512, floats_to_halves_avx512};
  }
  if (__builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c")) {
    return {halves_to_floats_f16c, floats_to_halves_f16c};
  }
#endif
  return {halves_to_floats_portable, floats_to_halves_portable};
}

const Conversions kConversions = pick_conversions();

}  // namespace

void halves_to_floats(const uint16_t* __restrict__ halves, float* __restrict__ floats, int64_t n) {
  kConversions.to_floats(halves, floats, n);
}

void floats_to_halves(const float* __restrict__ floats, uint16_t* __restrict__ halves, int64_t n) {
  kConversions.to_halves(floats, halves, n);
}

}  // namespace cpu
}  // namespace rmsprop_fused
