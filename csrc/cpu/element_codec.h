// Loads and stores of the CPU kernel's elements as opmath values, written so that GCC vectorises
// them. c10::Half and c10::BFloat16 convert through memcpy bit casts and branches that keep the
// vectoriser away from the whole loop; these compute exactly the same bits (c10's portable
// algorithms, written with __builtin_bit_cast and selects), so the CPU kernel, torch's own
// conversions and the GPU kernels agree to the bit.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace rmsprop_fused {
namespace cpu {

// float and double are their own storage.
template <typename scalar_t>
struct ElementCodec {
  using storage_t = scalar_t;
  using opmath_t = scalar_t;
  static inline opmath_t load(storage_t x) { return x; }
  static inline storage_t store(opmath_t x) { return x; }
};

// bfloat16 is the upper half of a float32.
template <>
struct ElementCodec<c10::BFloat16> {
  using storage_t = uint16_t;
  using opmath_t = float;
  static inline float load(uint16_t bits) {
    return __builtin_bit_cast(float, static_cast<uint32_t>(bits) << 16);
  }
  // Round to nearest even; NaN becomes the canonical quiet NaN (c10::detail::round_to_nearest_even).
  static inline uint16_t store(float value) {
    const uint32_t u = __builtin_bit_cast(uint32_t, value);
    const uint16_t rounded = static_cast<uint16_t>((u + (((u >> 16) & 1) + UINT32_C(0x7FFF))) >> 16);
    return value != value ? UINT16_C(0x7FC0) : rounded;
  }
};

// IEEE half precision, by c10::detail::fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value
// (Maratyos' FP16 algorithms, which use no subnormal float arithmetic).
template <>
struct ElementCodec<c10::Half> {
  using storage_t = uint16_t;
  using opmath_t = float;
  static inline float load(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & UINT32_C(0x80000000);
    const uint32_t two_w = w + w;
    // normal (and inf/nan): rebias the exponent by 0xE0 and scale by 2^-112
    const float normalized =
        __builtin_bit_cast(float, (two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
    // subnormal: put the mantissa under the exponent of 0.5 and subtract 0.5
    const float denormalized =
        __builtin_bit_cast(float, (two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
    const uint32_t magnitude = two_w < (UINT32_C(1) << 27) ? __builtin_bit_cast(uint32_t, denormalized)
                                                             : __builtin_bit_cast(uint32_t, normalized);
    return __builtin_bit_cast(float, sign | magnitude);
  }
  static inline uint16_t store(float f) {
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    const uint32_t w = __builtin_bit_cast(uint32_t, f);
    float base = (__builtin_bit_cast(float, w & UINT32_C(0x7FFFFFFF)) * scale_to_inf) * scale_to_zero;
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & UINT32_C(0x80000000);
    uint32_t bias = shl1_w & UINT32_C(0xFF000000);
    bias = bias < UINT32_C(0x71000000) ? UINT32_C(0x71000000) : bias;
    base = __builtin_bit_cast(float, (bias >> 1) + UINT32_C(0x07800000)) + base;
    const uint32_t bits = __builtin_bit_cast(uint32_t, base);
    const uint32_t nonsign = ((bits >> 13) & UINT32_C(0x00007C00)) + (bits & UINT32_C(0x00000FFF));
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT32_C(0x7E00) : nonsign));
  }
};

}  // namespace cpu
}  // namespace rmsprop_fused
