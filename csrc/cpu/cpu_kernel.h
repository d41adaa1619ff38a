// The fused CPU step: one pass over each tensor (read p, g and the state once, write them once),
// with the elements of all tensors split evenly between at::parallel_for's threads. The inner
// loops are plain scalar code over __restrict__ pointers that GCC vectorises: built with -O3,
// -fno-math-errno (so sqrt vectorises), -fno-trapping-math (so the option selects become blends)
// and -ffp-contract=off (one rounding per operation, like the GPU kernels); every element goes
// through element_codec.h, and 8-bit state through blockwise_quant.h.
// tests/test_cpu_kernel.py reads the machine code to check all of this.
//
// The step is instantiated per (param dtype, state dtype) in one translation unit each
// (rmsprop_cpu_<dtype>.cpp, compiled in parallel), and within one for every UpdateVariant plus
// the stochastic-rounding and variance-state flags that the pair can use.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../blockwise_quant.h"
#include "../element_codec.h"
#include "../step_args.h"
#include "../rmsprop_update.h"
#include "../state_pairs.h"
#include "half_tiles.h"
#include "prefetch.h"
#include "simd_kernel.h"

namespace rmsprop_fused {
namespace cpu {

// Below this many elements in a whole call, one thread does the work: waking the thread pool
// costs more than it saves (at::parallel_for runs inline when the range fits in one grain).
constexpr int64_t kParallelGrain = 1 << 15;

// The loop is compute-bound with SSE2's 4-wide sqrt and division (about 3 cycles an element, the
// speed one core can stream memory at), so it is compiled again for x86-64-v3 (AVX2) and x86-64-v4
// (AVX-512 F/BW/DQ/VL: 16-bit elements in 512-bit registers too), and the widest one the CPU has
// is picked when the extension loads (GCC function multiversioning). The clones round alike:
// -ffp-contract=off keeps FMA out of all of them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__)
#define RMSPROP_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RMSPROP_CPU_CLONES
#endif

// Everything a loop instantiation is specialised on.
template <typename param_t, typename state_t, class Variant_, bool kStochastic_,
          bool kVarianceState_>
struct Kernel {
  using ParamCodec = ElementCodec<param_t>;
  using P = typename ParamCodec::storage_t;
  static constexpr bool kQuantized = std::is_same_v<state_t, Blockwise8>;
  using StateCodec = ElementCodec<std::conditional_t<kQuantized, float, state_t>>;
  using S = std::conditional_t<kQuantized, uint8_t, typename StateCodec::storage_t>;
  using opmath_t = at::opmath_type<param_t>;
  using param_type = param_t;
  using state_type = state_t;
  using Variant = Variant_;
  static constexpr bool kStochastic = kStochastic_;
  static constexpr bool kVarianceState = kVarianceState_;
};

// Element `at` of each stream kernel K reads: a loop calls it prefetch_bytes() ahead of itself,
// up to its range's last element (a select, not a branch).
template <class K>
inline __attribute__((always_inline)) void prefetch_streams(
    const typename K::P* param, const typename K::P* grad, const typename K::S* square_avg,
    const typename K::S* grad_avg, const typename K::S* momentum_buffer, int64_t at) {
  prefetch_line(param, at);
  prefetch_line(grad, at);
  prefetch_line(square_avg, at);
  if constexpr (K::Variant::kCentered) prefetch_line(grad_avg, at);
  if constexpr (K::Variant::kMomentum) prefetch_line(momentum_buffer, at);
}

// The keys of the random streams of one tensor's step (stochastic rounding).
struct RoundingKeys {
  uint32_t param = 0;
  uint32_t square_avg = 0;
  uint32_t grad_avg = 0;
  uint32_t momentum_buffer = 0;
};

// A value stored through its codec: rounded to nearest, or stochastically where the kernel does
// that and the type is 16-bit.
template <class Codec, bool kStochastic>
inline __attribute__((always_inline)) typename Codec::storage_t store(
    typename Codec::opmath_t x, uint32_t key, int64_t index) {
  if constexpr (kStochastic && Codec::kRoundsStochastically) {
    return Codec::store_stochastic(x, random_bits(key, index));
  } else {
    return Codec::store(x);
  }
}

// One element of a tensor whose state is stored as elements (not 8-bit blocks).
template <class K>
inline __attribute__((always_inline)) void update_element(
    typename K::P* __restrict__ param, typename K::P* __restrict__ grad,
    typename K::S* __restrict__ square_avg, typename K::S* __restrict__ grad_avg,
    typename K::S* __restrict__ momentum_buffer, int64_t i,
    const StepScalars<typename K::opmath_t>& s, const RoundingKeys& keys) {
  using PC = typename K::ParamCodec;
  using SC = typename K::StateCodec;
  using V = typename K::Variant;
  using opmath_t = typename K::opmath_t;
  opmath_t p = PC::load(param[i]);
  opmath_t g = PC::load(grad[i]);
  opmath_t v = SC::load(square_avg[i]);
  opmath_t m = V::kCentered ? SC::load(grad_avg[i]) : opmath_t(0);
  opmath_t b = V::kMomentum ? SC::load(momentum_buffer[i]) : opmath_t(0);
  rmsprop_update<V, K::kVarianceState>(p, g, v, m, b, s);
  param[i] = store<PC, K::kStochastic>(p, keys.param, i);
  square_avg[i] = store<SC, K::kStochastic>(v, keys.square_avg, i);
  if constexpr (V::kUnscaleGrad) grad[i] = PC::store(g);  // the unscaled grad, rounded to nearest
  if constexpr (V::kCentered) grad_avg[i] = store<SC, K::kStochastic>(m, keys.grad_avg, i);
  if constexpr (V::kMomentum) {
    momentum_buffer[i] = store<SC, K::kStochastic>(b, keys.momentum_buffer, i);
  }
}

// The element kernel of the float32 values of an fp16 kernel's tile (update_half_tiles): float
// params, and float state where the kernel's state is fp16. The opmath (float) is the same, so
// each element computes the same bits.
template <class K>
using TileKernel =
    Kernel<float, std::conditional_t<std::is_same_v<typename K::state_type, c10::Half>, float,
                                     typename K::state_type>,
           typename K::Variant, false, K::kVarianceState>;

template <class K>
constexpr bool kConvertsHalfTiles =
#if defined(RMSPROP_CPU_HALF_TILES)
    std::is_same_v<typename K::ParamCodec, ElementCodec<c10::Half>> && !K::kStochastic &&
    !K::kQuantized;
#else
    false;
#endif

// Elements [begin, end) of one tensor of an fp16 kernel, kTile at a time: its fp16 streams
// converted to float32 with the CPU's conversion instructions (half_tiles.h), updated in L1, and
// converted back. (Stochastic rounding keeps the codec: it works on the rounded neighbours.)
template <class K>
inline __attribute__((always_inline)) void update_half_tiles(
    uint16_t* __restrict__ param, uint16_t* __restrict__ grad, typename K::S* __restrict__ square_avg,
    typename K::S* __restrict__ grad_avg, typename K::S* __restrict__ momentum_buffer,
    int64_t begin, int64_t end, const StepScalars<float>& scalars) {
  using V = typename K::Variant;
  using T = TileKernel<K>;
  constexpr bool kHalfState = std::is_same_v<typename K::state_type, c10::Half>;
  constexpr int64_t kTile = 512;
  constexpr int64_t kLine = kCacheLineBytes / sizeof(uint16_t);
  const int64_t distance = prefetch_bytes() / int64_t(sizeof(uint16_t));
  alignas(64) float p[kTile], g[kTile], v[kTile], m[kTile], b[kTile];
  const RoundingKeys no_keys;
  for (int64_t i = begin; i < end; i += kTile) {
    const int64_t n = std::min(kTile, end - i);
    halves_to_floats(param + i, p, n);
    halves_to_floats(grad + i, g, n);
    // where the state is fp16 it is converted too; other state is read and written in place
    typename T::S* sv = reinterpret_cast<typename T::S*>(square_avg + i);
    typename T::S* sm = reinterpret_cast<typename T::S*>(V::kCentered ? grad_avg + i : nullptr);
    typename T::S* sb = reinterpret_cast<typename T::S*>(V::kMomentum ? momentum_buffer + i : nullptr);
    if constexpr (kHalfState) {
      halves_to_floats(square_avg + i, sv = v, n);
      if constexpr (V::kCentered) halves_to_floats(grad_avg + i, sm = m, n);
      if constexpr (V::kMomentum) halves_to_floats(momentum_buffer + i, sb = b, n);
    }
    int64_t k = 0;
    for (; k + kLine <= n; k += kLine) {
      prefetch_streams<K>(param, grad, square_avg, grad_avg, momentum_buffer,
                          std::min(i + k + distance, end - 1));
#pragma omp simd
      for (int64_t e = 0; e < kLine; ++e) update_element<T>(p, g, sv, sm, sb, k + e, scalars, no_keys);
    }
    for (; k < n; ++k) update_element<T>(p, g, sv, sm, sb, k, scalars, no_keys);
    floats_to_halves(p, param + i, n);
    if constexpr (V::kUnscaleGrad) floats_to_halves(g, grad + i, n);
    if constexpr (kHalfState) {
      floats_to_halves(v, square_avg + i, n);
      if constexpr (V::kCentered) floats_to_halves(m, grad_avg + i, n);
      if constexpr (V::kMomentum) floats_to_halves(b, momentum_buffer + i, n);
    }
  }
}

// Elements [begin, end) of one tensor. The pointers are __restrict__ parameters: GCC honours
// restrict reliably only on parameters, and without it the loop needs a runtime alias check per
// pair of its up to ten streams, more than the vectoriser will version for.
template <class K>
RMSPROP_CPU_CLONES void update_range(typename K::P* __restrict__ param,
                                     typename K::P* __restrict__ grad,
                                     typename K::S* __restrict__ square_avg,
                                     typename K::S* __restrict__ grad_avg,
                                     typename K::S* __restrict__ momentum_buffer, int64_t begin,
                                     int64_t end, const StepScalars<typename K::opmath_t> scalars,
                                     const RoundingKeys keys) {
  using P = typename K::P;
  if constexpr (kConvertsHalfTiles<K>) {
    update_half_tiles<K>(param, grad, square_avg, grad_avg, momentum_buffer, begin, end, scalars);
    return;
  }
  static_assert(kCacheLineBytes % sizeof(P) == 0);
  constexpr int64_t kLine = kCacheLineBytes / sizeof(P);
  const int64_t distance = prefetch_bytes() / int64_t(sizeof(P));
  // A cache line of the param stream at a time, prefetching each stream prefetch_bytes() ahead.
  // The inner loop runs over a constant kLine elements, whole vectors without a remainder. GCC
  // unrolls so short a loop completely before its loop vectoriser runs, and what is left to its
  // straight-line vectoriser stayed scalar for float64: `omp simd` (setup.py passes
  // -fopenmp-simd) has it vectorised as a loop in every variant.
  int64_t i = begin;
  for (; i + kLine <= end; i += kLine) {
    prefetch_streams<K>(param, grad, square_avg, grad_avg, momentum_buffer,
                        std::min(i + distance, end - 1));
#pragma omp simd
    for (int64_t k = 0; k < kLine; ++k) {
      update_element<K>(param, grad, square_avg, grad_avg, momentum_buffer, i + k, scalars, keys);
    }
  }
  for (; i < end; ++i) {
    update_element<K>(param, grad, square_avg, grad_avg, momentum_buffer, i, scalars, keys);
  }
}

// Whether the AVX-512 loop (rmsprop_cpu_avx512.cpp) has this kernel, with nearest rounding: every
// pair that stores a 16-bit stream (the compiler's loop spends much of its time in the codecs'
// integer rounding; float32 with float32 state it streams at the memory's speed), and 8-bit
// state (its codecs gather from tables, which GCC's tuning keeps out of its own loops).
template <class K>
constexpr bool kHasSimdLoop =
    !K::kStochastic && (K::kQuantized ? !std::is_same_v<typename K::param_type, double>
                                      : stores_16_bit<typename K::param_type, typename K::state_type>());

// Whole 256-element blocks [first_block, last_block) of one tensor with 8-bit state: decode the
// block's state with its old scales, update every element, then encode the new state with the new
// scales (the maxima of the updated block), all in one pass over the block. Decoding and encoding
// read code tables: with AVX-512 where the CPU has it (simd_kernel.h), else element by element
// (GCC's tuning keeps gathers out of its own loops); the update between them works on the block's
// decoded values in L1 and vectorises as update_range does. Where the CPU has the AVX-512 loops,
// update_blocks_simd (rmsprop_cpu_avx512.cpp) runs instead, but for stochastic rounding.
template <class K>
RMSPROP_CPU_CLONES void update_quantized_blocks(
    typename K::P* __restrict__ param, typename K::P* __restrict__ grad,
    uint8_t* __restrict__ square_avg, uint8_t* __restrict__ grad_avg,
    uint8_t* __restrict__ momentum_buffer, float* __restrict__ square_avg_scale,
    float* __restrict__ grad_avg_scale, float* __restrict__ momentum_buffer_scale,
    int64_t first_block, int64_t last_block, int64_t numel,
    const StepScalars<typename K::opmath_t> s, const RoundingKeys keys,
    const BlockCodecTables& tables) {
  using PC = typename K::ParamCodec;
  using V = typename K::Variant;
  constexpr int64_t kBlock = quantization::kQuantBlock;
  float v[kBlock];
  float m[kBlock];
  float b[kBlock];
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t begin = block * kBlock;
    const int64_t count = std::min(kBlock, numel - begin);
    decode_state_block(square_avg + begin, count, square_avg_scale[block], tables.unsigned_map,
                       *tables.unsigned_planes, v);
    if constexpr (V::kCentered) {
      decode_state_block(grad_avg + begin, count, grad_avg_scale[block], tables.signed_map,
                         *tables.signed_planes, m);
    }
    if constexpr (V::kMomentum) {
      decode_state_block(momentum_buffer + begin, count, momentum_buffer_scale[block],
                         tables.signed_map, *tables.signed_planes, b);
    }
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i = begin + k;
      float p = PC::load(param[i]);
      float g = PC::load(grad[i]);
      float vk = v[k];
      float mk = V::kCentered ? m[k] : 0.0f;
      float bk = V::kMomentum ? b[k] : 0.0f;
      rmsprop_update<V, K::kVarianceState>(p, g, vk, mk, bk, s);
      param[i] = store<PC, K::kStochastic>(p, keys.param, i);
      if constexpr (V::kUnscaleGrad) grad[i] = PC::store(g);
      v[k] = vk;
      if (V::kCentered) m[k] = mk;
      if (V::kMomentum) b[k] = bk;
    }
    encode_state_block(v, count, square_avg + begin, square_avg_scale + block, *tables.unsigned_table);
    if constexpr (V::kCentered) {
      encode_state_block(m, count, grad_avg + begin, grad_avg_scale + block, *tables.signed_table);
    }
    if constexpr (V::kMomentum) {
      encode_state_block(b, count, momentum_buffer + begin, momentum_buffer_scale + block,
                         *tables.signed_table);
    }
  }
}

// One tensor of a call: its data as storage types, and what its step needs.
template <class K>
struct TensorWork {
  typename K::P* param;
  typename K::P* grad;
  typename K::S* square_avg;
  typename K::S* grad_avg;
  typename K::S* momentum_buffer;
  float* square_avg_scale;
  float* grad_avg_scale;
  float* momentum_buffer_scale;
  int64_t numel;
  typename K::opmath_t bias_correction;
  RoundingKeys keys;
};

template <typename T>
T* data_as(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// The step over all tensors of a call, with the per-tensor values (bias correction, rounding
// keys) taken from each tensor's step counter, already incremented by the caller.
template <class K>
void update_all(const StepArgs& args, const StepScalars<typename K::opmath_t>& scalars) {
  using V = typename K::Variant;
  const TensorLists& lists = args.lists;
  const size_t n = lists.params.size();
  std::vector<TensorWork<K>> work(n);
  // Units the threads split: elements, or 256-element blocks of 8-bit state (a block's scale is
  // the maximum over the whole block, so one thread updates a block whole).
  constexpr int64_t kUnit = K::kQuantized ? quantization::kQuantBlock : 1;
  std::vector<int64_t> starts(n + 1, 0);  // starts[t]: the unit tensor t starts at
  for (size_t t = 0; t < n; ++t) {
    TensorWork<K>& w = work[t];
    w.param = data_as<typename K::P>(lists.params[t]);
    w.grad = data_as<typename K::P>(lists.grads[t]);
    w.square_avg = data_as<typename K::S>(lists.square_avgs[t]);
    w.grad_avg = V::kCentered ? data_as<typename K::S>(lists.grad_avgs[t]) : nullptr;
    w.momentum_buffer = V::kMomentum ? data_as<typename K::S>(lists.momentum_buffers[t]) : nullptr;
    if constexpr (K::kQuantized) {
      w.square_avg_scale = data_as<float>(lists.square_avg_scales[t]);
      w.grad_avg_scale = V::kCentered ? data_as<float>(lists.grad_avg_scales[t]) : nullptr;
      w.momentum_buffer_scale =
          V::kMomentum ? data_as<float>(lists.momentum_buffer_scales[t]) : nullptr;
    }
    w.numel = lists.params[t].numel();
    const float step = lists.counts_steps() ? *data_as<float>(lists.state_steps[t]) : 0.0f;
    w.bias_correction = args.hyper.bias_correction
                            ? bias_correction_at<typename K::opmath_t>(args.hyper.alpha, step)
                            : typename K::opmath_t(1);
    if constexpr (K::kStochastic) {
      const int64_t seed = *args.hyper.rounding_seed;
      const uint32_t count = step_count(step);
      w.keys = {rounding_key(seed, t, count, kParamStream),
                rounding_key(seed, t, count, kSquareAvgStream),
                rounding_key(seed, t, count, kGradAvgStream),
                rounding_key(seed, t, count, kMomentumBufferStream)};
    }
    starts[t + 1] = starts[t] + (w.numel + kUnit - 1) / kUnit;
  }
  // the AVX-512 loop where the CPU has it, else update_range or update_quantized_blocks
  SimdLoop<typename K::param_type, typename K::state_type> simd_loop_fn = nullptr;
  if constexpr (kHasSimdLoop<K>) {
    if (simd_kernels_available()) {
      simd_loop_fn = simd_loop<typename K::param_type, typename K::state_type>(
          {V::kCentered, V::kMomentum, V::kUnscaleGrad, V::kExtended, K::kVarianceState});
      TORCH_INTERNAL_ASSERT(simd_loop_fn != nullptr, "rmsprop_fused: no AVX-512 loop for a kernel");
    }
  }
  // (the tables are built on first use: only for 8-bit state)
  const BlockCodecTables tables =
      K::kQuantized ? BlockCodecTables{quantization::code_map(false), quantization::code_map(true),
                                       &quantization::code_table(false), &quantization::code_table(true),
                                       &quantization::code_planes(false), &quantization::code_planes(true)}
                    : BlockCodecTables{};
  at::parallel_for(0, starts[n], std::max<int64_t>(1, kParallelGrain / kUnit),
                   [&](int64_t begin, int64_t end) {
    // the last tensor starting at or before `begin` (zero-size tensors are skipped over)
    size_t t = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (; t < n && starts[t] < end; ++t) {
      const int64_t first = std::max(begin, starts[t]) - starts[t];
      const int64_t last = std::min(end, starts[t + 1]) - starts[t];
      if (first >= last) continue;
      const TensorWork<K>& w = work[t];
      StepScalars<typename K::opmath_t> s = scalars;
      s.bias_correction = w.bias_correction;
      if constexpr (K::kQuantized) {
        if constexpr (kHasSimdLoop<K>) {
          if (simd_loop_fn != nullptr) {
            simd_loop_fn(w.param, w.grad, w.square_avg, w.grad_avg, w.momentum_buffer,
                         w.square_avg_scale, w.grad_avg_scale, w.momentum_buffer_scale, first, last,
                         w.numel, s, tables);
            continue;
          }
        }
        update_quantized_blocks<K>(w.param, w.grad, w.square_avg, w.grad_avg, w.momentum_buffer,
                                   w.square_avg_scale, w.grad_avg_scale, w.momentum_buffer_scale,
                                   first, last, w.numel, s, w.keys, tables);
      } else {
        if constexpr (kHasSimdLoop<K>) {
          if (simd_loop_fn != nullptr) {
            simd_loop_fn(w.param, w.grad, w.square_avg, w.grad_avg, w.momentum_buffer, first, last, s);
            continue;
          }
        }
        update_range<K>(w.param, w.grad, w.square_avg, w.grad_avg, w.momentum_buffer, first,
                        last, s, w.keys);
      }
    }
  });
}

// The step for one (param dtype, state dtype) pair: picks the instantiation for the options.
template <typename param_t, typename state_t>
void run_pair(const StepArgs& args, const StepScalars<at::opmath_type<param_t>>& scalars) {
  const Hyperparameters& h = args.hyper;
  const bool stochastic = h.rounding_seed.has_value();
  const bool unscale = args.grad_scale.has_value();
  // Stochastic rounding and variance state run in the extended instantiations only, which keeps
  // the number of instantiations down where they are not used.
  const bool extended = !scalars.plain() || stochastic || h.variance_state;
  dispatch_flag(h.centered, [&](auto centered) {
    dispatch_flag(h.momentum > 0, [&](auto momentum) {
      dispatch_flag(unscale, [&](auto unscale_grad) {
        dispatch_flag(extended, [&](auto extended_) {
          using V = UpdateVariant<centered, momentum, unscale_grad, extended_>;
          if constexpr (!extended_) {
            update_all<Kernel<param_t, state_t, V, false, false>>(args, scalars);
          } else {
            dispatch_flag(stochastic, [&](auto sr) {
              dispatch_flag(h.variance_state, [&](auto variance) {
                if constexpr ((sr && !stores_16_bit<param_t, state_t>()) ||
                              (variance && !(centered && can_hold_variance_state<state_t>()))) {
                  TORCH_INTERNAL_ASSERT(false, "rmsprop_fused: check_op_args let through an "
                                               "option this state cannot take");
                } else {
                  update_all<Kernel<param_t, state_t, V, sr, variance>>(args, scalars);
                }
              });
            });
          }
        });
      });
    });
  });
}

// The step for one param dtype, every state dtype it can keep: defined in
// rmsprop_cpu_<dtype>.cpp, one translation unit each, so that they compile in parallel.
template <typename param_t>
void run_param_dtype(const StepArgs& args, const StepScalars<at::opmath_type<param_t>>& scalars);
template <>
void run_param_dtype<double>(const StepArgs& args, const StepScalars<double>& scalars);
template <>
void run_param_dtype<float>(const StepArgs& args, const StepScalars<float>& scalars);
template <>
void run_param_dtype<c10::Half>(const StepArgs& args, const StepScalars<float>& scalars);
template <>
void run_param_dtype<c10::BFloat16>(const StepArgs& args, const StepScalars<float>& scalars);

}  // namespace cpu
}  // namespace rmsprop_fused
