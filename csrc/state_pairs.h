// The (param, state) storage pairs the kernels are built for, as compile-time rules shared by the
// CPU kernel (cpu/cpu_kernel.h, and its AVX-512 loop, which cannot include ATen) and the CUDA
// kernel (cuda/multi_tensor_op.h): which pairs exist, and which options each can take. The
// run-time check of a call's dtypes is rmsprop_op.h is_supported_state_dtype, the Python table
// backends.py OTHER_STATE_DTYPES (the tests' list: tests/common.py STATE_PAIRS).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace rmsprop_fused {

// Marks a call's state as 8-bit blockwise: uint8 codes plus a float32 scale per 256 elements.
struct Blockwise8 {};

template <typename T>
constexpr bool is_16_bit_float() {
  return std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;
}

// A param dtype's own state, float32 state for 16-bit params, bfloat16 state for float32 and
// float16 params, 8-bit state for every param dtype but float64.
template <typename param_t, typename state_t>
constexpr bool is_state_pair() {
  if constexpr (std::is_same_v<param_t, state_t>) return true;
  if constexpr (std::is_same_v<state_t, float>) return is_16_bit_float<param_t>();
  if constexpr (std::is_same_v<state_t, c10::BFloat16>) {
    return std::is_same_v<param_t, float> || std::is_same_v<param_t, c10::Half>;
  }
  if constexpr (std::is_same_v<state_t, Blockwise8>) return !std::is_same_v<param_t, double>;
  return false;
}

// Whether a pair stores any 16-bit value: where stochastic rounding has work.
template <typename param_t, typename state_t>
constexpr bool stores_16_bit() {
  return is_16_bit_float<param_t>() || std::is_same_v<state_t, c10::BFloat16>;
}

// Variance state (centered state kept as square_avg - grad_avg^2) is asked for with state_dtype
// bfloat16 or "8bit"; the small tensors of an 8-bit group keep it in float32.
template <typename state_t>
constexpr bool can_hold_variance_state() {
  return std::is_same_v<state_t, c10::BFloat16> || std::is_same_v<state_t, Blockwise8> ||
         std::is_same_v<state_t, float>;
}

}  // namespace rmsprop_fused
