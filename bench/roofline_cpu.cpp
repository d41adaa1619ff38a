// The CPU roofline of bench/bench_step.py: an in-place pass that reads and writes exactly the
// streams of a fused RMSprop step (param, grad and the state tensors; the codes and scales of
// 8-bit state) and does no arithmetic, run through the fused CPU step's own code. Built by
// bench/roofline.py with torch.utils.cpp_extension.load and setup.py's compiler flags.
//
// It reuses csrc/cpu/cpu_kernel.h instead of copying it: update_all (the same per-tensor setup,
// the same at::parallel_for over the same element split and grain, the same threads) and
// update_range (the same cache-line loop, the same software prefetch prefetch_bytes() ahead of
// every stream, the same x86-64-v4/v3/default clones) are instantiated for a kernel type of its
// own, whose per-element step (update_element) and 8-bit block step (update_quantized_blocks)
// are specialised here to a bitwise exclusive-or with a mask: every stream is loaded and stored,
// nothing is computed. The mask is all zeros in the benchmark (the values do not change) and
// all ones in the tests (every element of every stream must change). The compiler cannot tell
// which: it comes from the step's lr, a run-time value.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/cpu_kernel.h"

namespace rmsprop_fused {
namespace cpu {

// Unsigned words that may alias the float storage they are read through.
template <size_t kBytes> struct Word;
template <> struct Word<1> { using type = uint8_t; };
template <> struct Word<2> { typedef uint16_t __attribute__((__may_alias__)) type; };
template <> struct Word<4> { typedef uint32_t __attribute__((__may_alias__)) type; };
template <> struct Word<8> { typedef uint64_t __attribute__((__may_alias__)) type; };
template <typename T> using WordOf = typename Word<sizeof(T)>::type;

template <bool kCentered_, bool kMomentum_>
struct RooflineVariant {
  static constexpr bool kCentered = kCentered_;
  static constexpr bool kMomentum = kMomentum_;
  static constexpr bool kUnscaleGrad = false;
  static constexpr bool kExtended = false;
};

// Element types by width only: the loop moves bits, so fp16 and bf16 share one instantiation.
template <typename param_t, typename state_t, bool kCentered, bool kMomentum>
using RooflineKernel = Kernel<param_t, state_t, RooflineVariant<kCentered, kMomentum>, false, false>;

// The streams as the compiler-vectorised loop moves them (not the AVX-512 loop of 16-bit params,
// which runs rmsprop_update itself): what memory allows, with the fused step's threads and prefetch.
template <typename param_t, typename state_t, bool kCentered, bool kMomentum>
constexpr bool kHasSimdLoop<RooflineKernel<param_t, state_t, kCentered, kMomentum>> = false;

template <typename opmath_t>
inline uint64_t roofline_mask(const StepScalars<opmath_t>& s) {
  return s.lr != opmath_t(0) ? ~uint64_t(0) : uint64_t(0);
}

// One element: param ^= grad & mask, each state ^= grad & mask (truncated or widened to its width).
template <class K>
inline __attribute__((always_inline)) void roofline_element(
    typename K::P* __restrict__ param, typename K::P* __restrict__ grad,
    typename K::S* __restrict__ square_avg, typename K::S* __restrict__ grad_avg,
    typename K::S* __restrict__ momentum_buffer, int64_t i,
    const StepScalars<typename K::opmath_t>& s) {
  using PW = WordOf<typename K::P>;
  using SW = WordOf<typename K::S>;
  using V = typename K::Variant;
  const PW g = reinterpret_cast<const PW*>(grad)[i] & static_cast<PW>(roofline_mask(s));
  reinterpret_cast<PW*>(param)[i] ^= g;
  reinterpret_cast<SW*>(square_avg)[i] ^= static_cast<SW>(g);
  if constexpr (V::kCentered) reinterpret_cast<SW*>(grad_avg)[i] ^= static_cast<SW>(g);
  if constexpr (V::kMomentum) reinterpret_cast<SW*>(momentum_buffer)[i] ^= static_cast<SW>(g);
}

// 8-bit state, whole 256-element blocks [first_block, last_block) of one tensor: the codes as
// update_range streams elements (cache lines of the param stream, every stream prefetched
// prefetch_bytes() ahead), then each block's scale read and written once.
template <class K>
inline __attribute__((always_inline)) void roofline_blocks(
    typename K::P* __restrict__ param, typename K::P* __restrict__ grad,
    uint8_t* __restrict__ square_avg, uint8_t* __restrict__ grad_avg,
    uint8_t* __restrict__ momentum_buffer, float* __restrict__ square_avg_scale,
    float* __restrict__ grad_avg_scale, float* __restrict__ momentum_buffer_scale,
    int64_t first_block, int64_t last_block, int64_t numel,
    const StepScalars<typename K::opmath_t>& s) {
  using P = typename K::P;
  using V = typename K::Variant;
  constexpr int64_t kBlock = quantization::kQuantBlock;
  constexpr int64_t kLine = kCacheLineBytes / sizeof(P);
  const int64_t distance = prefetch_bytes() / int64_t(sizeof(P));
  const int64_t begin = first_block * kBlock;
  const int64_t end = std::min(last_block * kBlock, numel);
  int64_t i = begin;
  for (; i + kLine <= end; i += kLine) {
    prefetch_streams<K>(param, grad, square_avg, grad_avg, momentum_buffer,
                        std::min(i + distance, end - 1));
#pragma omp simd
    for (int64_t k = 0; k < kLine; ++k) {
      roofline_element<K>(param, grad, square_avg, grad_avg, momentum_buffer, i + k, s);
    }
  }
  for (; i < end; ++i) {
    roofline_element<K>(param, grad, square_avg, grad_avg, momentum_buffer, i, s);
  }
  const uint32_t mask = static_cast<uint32_t>(roofline_mask(s));
  using FW = WordOf<float>;
  for (int64_t block = first_block; block < last_block; ++block) {
    reinterpret_cast<FW*>(square_avg_scale)[block] ^= mask;
    if constexpr (V::kCentered) reinterpret_cast<FW*>(grad_avg_scale)[block] ^= mask;
    if constexpr (V::kMomentum) reinterpret_cast<FW*>(momentum_buffer_scale)[block] ^= mask;
  }
}

// The specialisations: update_range<RooflineKernel<...>> (cpu_kernel.h's own loop) calls
// update_element, and update_all calls update_quantized_blocks, of these kernel types.
#define ROOFLINE_ELEMENT(PT, ST, C, M)                                                        \
  template <>                                                                                 \
  inline __attribute__((always_inline)) void update_element<RooflineKernel<PT, ST, C, M>>(    \
      RooflineKernel<PT, ST, C, M>::P* __restrict__ param,                                    \
      RooflineKernel<PT, ST, C, M>::P* __restrict__ grad,                                     \
      RooflineKernel<PT, ST, C, M>::S* __restrict__ square_avg,                               \
      RooflineKernel<PT, ST, C, M>::S* __restrict__ grad_avg,                                 \
      RooflineKernel<PT, ST, C, M>::S* __restrict__ momentum_buffer, int64_t i,               \
      const StepScalars<RooflineKernel<PT, ST, C, M>::opmath_t>& s, const RoundingKeys&) {    \
    roofline_element<RooflineKernel<PT, ST, C, M>>(param, grad, square_avg, grad_avg,         \
                                                   momentum_buffer, i, s);                    \
  }

#define ROOFLINE_BLOCKS(PT, C, M)                                                              \
  template <>                                                                                  \
  RMSPROP_CPU_CLONES void update_quantized_blocks<RooflineKernel<PT, Blockwise8, C, M>>(       \
      RooflineKernel<PT, Blockwise8, C, M>::P* __restrict__ param,                             \
      RooflineKernel<PT, Blockwise8, C, M>::P* __restrict__ grad,                              \
      uint8_t* __restrict__ square_avg, uint8_t* __restrict__ grad_avg,                        \
      uint8_t* __restrict__ momentum_buffer, float* __restrict__ square_avg_scale,             \
      float* __restrict__ grad_avg_scale, float* __restrict__ momentum_buffer_scale,           \
      int64_t first_block, int64_t last_block, int64_t numel,                                  \
      const StepScalars<RooflineKernel<PT, Blockwise8, C, M>::opmath_t> s, const RoundingKeys,   \
      const BlockCodecTables&) {                                                               \
    roofline_blocks<RooflineKernel<PT, Blockwise8, C, M>>(                                     \
        param, grad, square_avg, grad_avg, momentum_buffer, square_avg_scale, grad_avg_scale,  \
        momentum_buffer_scale, first_block, last_block, numel, s);                             \
  }

#define ROOFLINE_VARIANTS(MACRO, ...) \
  MACRO(__VA_ARGS__, false, false)    \
  MACRO(__VA_ARGS__, false, true)     \
  MACRO(__VA_ARGS__, true, false)     \
  MACRO(__VA_ARGS__, true, true)

// (param width, state width) pairs the step supports: the param's own, float32, bfloat16, 8-bit.
ROOFLINE_VARIANTS(ROOFLINE_ELEMENT, double, double)
ROOFLINE_VARIANTS(ROOFLINE_ELEMENT, float, float)
ROOFLINE_VARIANTS(ROOFLINE_ELEMENT, float, c10::BFloat16)
ROOFLINE_VARIANTS(ROOFLINE_ELEMENT, c10::BFloat16, c10::BFloat16)
ROOFLINE_VARIANTS(ROOFLINE_ELEMENT, c10::BFloat16, float)
ROOFLINE_VARIANTS(ROOFLINE_BLOCKS, float)
ROOFLINE_VARIANTS(ROOFLINE_BLOCKS, c10::BFloat16)

template <typename param_t, typename state_t>
void run_roofline(const StepArgs& args, const StepScalars<at::opmath_type<param_t>>& s) {
  dispatch_flag(args.lists.centered(), [&](auto centered) {
    dispatch_flag(args.lists.has_momentum(), [&](auto momentum) {
      update_all<RooflineKernel<param_t, state_t, centered, momentum>>(args, s);
    });
  });
}

template <typename param_t>
void run_roofline_param(const StepArgs& args, bool flip) {
  StepScalars<at::opmath_type<param_t>> s{};
  s.lr = flip ? 1 : 0;  // the mask's source (roofline_mask)
  const at::Tensor& state = args.lists.square_avgs[0];
  const int64_t state_width = state.element_size();
  if (args.lists.quantized()) {
    if constexpr (sizeof(param_t) == 8) {
      TORCH_CHECK(false, "roofline_: float64 params have no 8-bit state");
    } else {
      return run_roofline<param_t, Blockwise8>(args, s);
    }
  }
  if (state_width == int64_t(sizeof(param_t))) return run_roofline<param_t, param_t>(args, s);
  if constexpr (sizeof(param_t) == 4) {
    if (state_width == 2) return run_roofline<param_t, c10::BFloat16>(args, s);
  }
  if constexpr (sizeof(param_t) == 2) {
    if (state_width == 4) return run_roofline<param_t, float>(args, s);
  }
  TORCH_CHECK(false, "roofline_: no kernel for ", state.element_size(), "-byte state with ",
              sizeof(param_t), "-byte params");
}

void check_list(at::TensorList tensors, at::TensorList params, const char* name, bool needed,
                int64_t width) {
  if (!needed) {
    TORCH_CHECK(tensors.empty(), "roofline_: ", name, " must be empty");
    return;
  }
  TORCH_CHECK(tensors.size() == params.size(), "roofline_: ", name, " has ", tensors.size(),
              " tensors for ", params.size(), " params");
  for (size_t t = 0; t < tensors.size(); ++t) {
    TORCH_CHECK(tensors[t].device().is_cpu() && tensors[t].is_contiguous() &&
                    tensors[t].numel() == params[t].numel() && tensors[t].element_size() == width,
                "roofline_: ", name, "[", t, "] must be a contiguous CPU tensor of ",
                params[t].numel(), " elements of ", width, " bytes, like the first");
  }
}

void check_scales(at::TensorList scales, at::TensorList params, bool needed, const char* name) {
  if (!needed) {
    TORCH_CHECK(scales.empty(), "roofline_: ", name, " must be empty");
    return;
  }
  TORCH_CHECK(scales.size() == params.size(), "roofline_: ", name, " has the wrong length");
  for (size_t t = 0; t < scales.size(); ++t) {
    const int64_t blocks = (params[t].numel() + quantization::kQuantBlock - 1) / quantization::kQuantBlock;
    TORCH_CHECK(scales[t].device().is_cpu() && scales[t].is_contiguous() &&
                    scales[t].scalar_type() == at::kFloat && scales[t].numel() == blocks,
                "roofline_: ", name, "[", t, "] must be ", blocks, " contiguous float32 scales");
  }
}

void roofline_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                  at::TensorList grad_avgs, at::TensorList momentum_buffers,
                  at::TensorList square_avg_scales, at::TensorList grad_avg_scales,
                  at::TensorList momentum_buffer_scales, bool flip) {
  if (params.empty()) return;
  const int64_t param_width = params[0].element_size();
  check_list(params, params, "params", true, param_width);
  check_list(grads, params, "grads", true, param_width);
  const bool centered = !grad_avgs.empty();
  const bool momentum = !momentum_buffers.empty();
  const bool quantized = !square_avg_scales.empty();
  TORCH_CHECK(!square_avgs.empty(), "roofline_: square_avgs is empty");
  const int64_t state_width = square_avgs[0].element_size();
  TORCH_CHECK(!quantized || state_width == 1, "roofline_: 8-bit state must be uint8 codes");
  check_list(square_avgs, params, "square_avgs", true, state_width);
  check_list(grad_avgs, params, "grad_avgs", centered, state_width);
  check_list(momentum_buffers, params, "momentum_buffers", momentum, state_width);
  check_scales(square_avg_scales, params, quantized, "square_avg_scales");
  check_scales(grad_avg_scales, params, quantized && centered, "grad_avg_scales");
  check_scales(momentum_buffer_scales, params, quantized && momentum, "momentum_buffer_scales");
  const StepArgs args{TensorLists{params, grads, square_avgs, grad_avgs, momentum_buffers, {},
                                  square_avg_scales, grad_avg_scales, momentum_buffer_scales},
                      Hyperparameters{}, std::nullopt, std::nullopt, std::nullopt, std::nullopt};
  switch (param_width) {
    case 8: return run_roofline_param<double>(args, flip);
    case 4: return run_roofline_param<float>(args, flip);
    case 2: return run_roofline_param<c10::BFloat16>(args, flip);
    default: TORCH_CHECK(false, "roofline_: no kernel for ", param_width, "-byte params");
  }
}

}  // namespace cpu
}  // namespace rmsprop_fused

TORCH_LIBRARY(rmsprop_fused_bench, m) {
  m.def(
      "roofline_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "
      "Tensor(d!)[] grad_avgs, Tensor(e!)[] momentum_buffers, Tensor(f!)[] square_avg_scales, "
      "Tensor(g!)[] grad_avg_scales, Tensor(h!)[] momentum_buffer_scales, bool flip) -> ()");
  // the prefetch distance of this library's copy of the loop (the step's is rmsprop_fused._C's)
  m.def("set_prefetch_bytes(int bytes) -> int", &rmsprop_fused::cpu::set_prefetch_bytes);
}

TORCH_LIBRARY_IMPL(rmsprop_fused_bench, CPU, m) {
  m.impl("roofline_", &rmsprop_fused::cpu::roofline_cpu);
}
