// How each kernel reads and writes one element of a tensor: a codec per storage type, between the
// stored bits and the arithmetic type ("opmath": float for fp32, bf16 and fp16, double for fp64).
// Every C++ kernel (CPU, CUDA and the CUDA kernel's host build) uses these, so they agree to the
// bit on every input, NaN payloads included; the Triton kernel and the reference mirror them.
//
//   load(bits)                        exact widening
//   store(x)                          round to nearest even; NaN -> the type's canonical quiet NaN
//   store_stochastic(x, random_bits)  stochastic rounding (16-bit types): rounds away from zero
//                                     with probability (|x| - |down|) / (|up| - |down|), where
//                                     down and up are the neighbours of x in the type
//
// c10::Half and c10::BFloat16 convert through memcpy bit casts and branches that keep GCC's
// vectoriser away from a whole loop; these compute c10's bits (its portable algorithms, written
// with bit casts and selects), so the CPU loops vectorise, fp16 and bf16 included.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__CUDACC__)
#define RMSPROP_HOST_DEVICE __host__ __device__
#define RMSPROP_FORCE_INLINE __forceinline__
#else
#define RMSPROP_HOST_DEVICE
#define RMSPROP_FORCE_INLINE inline __attribute__((always_inline))
#endif

namespace rmsprop_fused {

RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return __builtin_bit_cast(uint32_t, x);
#endif
}

RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  return __builtin_bit_cast(float, bits);
#endif
}

// float and double are their own storage (and never rounded stochastically).
template <typename scalar_t>
struct ElementCodec {
  using storage_t = scalar_t;
  using opmath_t = scalar_t;
  static constexpr bool kRoundsStochastically = false;
  RMSPROP_HOST_DEVICE static RMSPROP_FORCE_INLINE opmath_t load(storage_t x) { return x; }
  RMSPROP_HOST_DEVICE static RMSPROP_FORCE_INLINE storage_t store(opmath_t x) { return x; }
  RMSPROP_HOST_DEVICE static RMSPROP_FORCE_INLINE storage_t store_stochastic(opmath_t x, uint32_t) {
    return x;
  }
};

// bfloat16 is the upper half of a float32.
template <>
struct ElementCodec<c10::BFloat16> {
  using storage_t = uint16_t;
  using opmath_t = float;
  static constexpr bool kRoundsStochastically = true;
  static constexpr uint16_t kQuietNaN = 0x7FC0;
  RMSPROP_HOST_DEVICE static RMSPROP_FORCE_INLINE float load(uint16_t bits) {
    return bits_float(static_cast<uint32_t>(bits) << 16);
  }
  // c10::detail::round_to_nearest_even
  RMSPROP_HOST_DEVICE static RMSPROP_FORCE_INLINE uint16_t store(float value) {
    const uint32_t u = float_bits(value);
    const uint16_t rounded = static_cast<uint16_t>((u + (((u >> 16) & 1) + UINT32_C(0x7FFF))) >> 16);
    return value != value ? kQuietNaN : rounded;
  }
  // Adding 16 random bits below the kept ones and truncating rounds the magnitude up with
  // probability (dropped bits) / 2^16: unbiased (torchao's bf16_stochastic_round). The largest
  // finite values may round up to inf, as nearest rounding would from a little further.
  RMSPROP_HOST_DEVICE static RMSPROP_FORCE_INLINE uint16_t store_stochastic(float value,
                                                                            uint32_t random) {
    const uint32_t u = float_bits(value);
    const uint16_t rounded = static_cast<uint16_t>((u + (random & UINT32_C(0xFFFF))) >> 16);
    return value != value ? kQuietNaN : rounded;
  }
};

// IEEE half precision, by c10::detail::fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value
// (Maratyos' FP16 algorithms, which use no subnormal float arithmetic).
template <>
struct ElementCodec<c10::Half> {
  using storage_t = uint16_t;
  using opmath_t = float;
  static constexpr bool kRoundsStochastically = true;
  RMSPROP_HOST_DEVICE static RMSPROP_FORCE_INLINE float load(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & UINT32_C(0x80000000);
    const uint32_t two_w = w + w;
    // normal (and inf/nan): rebias the exponent by 0xE0 and scale by 2^-112
    const float normalized = bits_float((two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
    // subnormal: put the mantissa under the exponent of 0.5 and subtract 0.5
    const float denormalized = bits_float((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
    const uint32_t magnitude =
        two_w < (UINT32_C(1) << 27) ? float_bits(denormalized) : float_bits(normalized);
    return bits_float(sign | magnitude);
  }
  RMSPROP_HOST_DEVICE static RMSPROP_FORCE_INLINE uint16_t store(float f) {
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    const uint32_t w = float_bits(f);
    float base = (bits_float(w & UINT32_C(0x7FFFFFFF)) * scale_to_inf) * scale_to_zero;
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & UINT32_C(0x80000000);
    uint32_t bias = shl1_w & UINT32_C(0xFF000000);
    bias = bias < UINT32_C(0x71000000) ? UINT32_C(0x71000000) : bias;
    base = bits_float((bias >> 1) + UINT32_C(0x07800000)) + base;
    const uint32_t bits = float_bits(base);
    const uint32_t nonsign = ((bits >> 13) & UINT32_C(0x00007C00)) + (bits & UINT32_C(0x00000FFF));
    return static_cast<uint16_t>((sign >> 16) |
                                 (shl1_w > UINT32_C(0xFF000000) ? UINT32_C(0x7E00) : nonsign));
  }
  // The number of dropped bits varies (subnormals keep fewer), so this works on the neighbours:
  // down = x rounded toward zero, up = the next magnitude (65536 past the largest finite value,
  // so that rounding up there gives inf). |x| - |down| and |up| - |down| (a power of two) are
  // exact in float32, so `fraction` is exact, and so is the comparison with 24 random bits.
  RMSPROP_HOST_DEVICE static RMSPROP_FORCE_INLINE uint16_t store_stochastic(float value,
                                                                            uint32_t random) {
    const uint16_t nearest = store(value);
    const float magnitude = bits_float(float_bits(value) & UINT32_C(0x7FFFFFFF));
    const float nearest_magnitude = load(nearest & UINT16_C(0x7FFF));
    // nearest rounded the magnitude up: step back one (sign-magnitude bits count magnitudes)
    const uint16_t down = nearest_magnitude > magnitude ? static_cast<uint16_t>(nearest - 1) : nearest;
    const uint16_t down_magnitude_bits = down & UINT16_C(0x7FFF);
    const float down_magnitude = load(down_magnitude_bits);
    const float up_magnitude = down_magnitude_bits == UINT16_C(0x7BFF)
                                   ? 65536.0f
                                   : load(static_cast<uint16_t>(down_magnitude_bits + 1));
    const float fraction = (magnitude - down_magnitude) / (up_magnitude - down_magnitude);
    const bool round_up = static_cast<float>(random >> 8) < fraction * 16777216.0f;
    const uint16_t rounded = round_up ? static_cast<uint16_t>(down + 1) : down;
    // NaN and inf: what nearest rounding gives (canonical NaN; inf stays inf)
    return float_bits(magnitude) < UINT32_C(0x7F800000) ? rounded : nearest;
  }
};

}  // namespace rmsprop_fused
