// The CPU step's loops written with AVX-512 lanes (rmsprop_cpu_avx512.cpp: every pair that
// stores 16-bit values, and 8-bit state), declared without the instructions they use:
// cpu_kernel.h takes them where the CPU has them.
#pragma once

#include <cstdint>

#include "../blockwise_quant.h"
#include "../element_codec.h"
#include "../state_pairs.h"

namespace rmsprop_fused {

template <typename opmath_t>
struct StepScalars;

namespace cpu {

// What a loop instantiation is specialised on (cpu_kernel.h Kernel, less what this loop lacks:
// stochastic rounding stays with the compiler-vectorised loops).
struct SimdKernelFlags {
  bool centered;
  bool momentum;
  bool unscale_grad;
  bool extended;
  bool variance_state;
};

// Elements [begin, end) of one tensor: params, grads, square_avgs, grad_avgs, momentum_buffers.
template <typename param_t, typename state_t>
using SimdRangeFn = void (*)(typename ElementCodec<param_t>::storage_t*,
                             typename ElementCodec<param_t>::storage_t*,
                             typename ElementCodec<state_t>::storage_t*,
                             typename ElementCodec<state_t>::storage_t*,
                             typename ElementCodec<state_t>::storage_t*, int64_t, int64_t,
                             const StepScalars<float>&);

// The code maps and tables of 8-bit state, passed in by the caller: the AVX-512 file must not
// instantiate an inline function that other files share (code_table), see its top.
struct BlockCodecTables {
  const float* unsigned_map;
  const float* signed_map;
  const quantization::CodeTable* unsigned_table;
  const quantization::CodeTable* signed_table;
  const quantization::CodePlanes* unsigned_planes;
  const quantization::CodePlanes* signed_planes;
};

// Whole 256-element blocks [first_block, last_block) of one tensor of numel elements with 8-bit
// state: params, grads, the three code streams, their three scale streams.
template <typename param_t>
using SimdBlocksFn = void (*)(typename ElementCodec<param_t>::storage_t*,
                              typename ElementCodec<param_t>::storage_t*, uint8_t*, uint8_t*,
                              uint8_t*, float*, float*, float*, int64_t, int64_t, int64_t,
                              const StepScalars<float>&, const BlockCodecTables&);

// The AVX-512 loop of a (param, state) pair: over elements, or over the blocks of 8-bit state.
template <typename param_t, typename state_t>
struct SimdLoopOf {
  using type = SimdRangeFn<param_t, state_t>;
};
template <typename param_t>
struct SimdLoopOf<param_t, Blockwise8> {
  using type = SimdBlocksFn<param_t>;
};
template <typename param_t, typename state_t>
using SimdLoop = typename SimdLoopOf<param_t, state_t>::type;

// "avx512-bf16" where the build has the AVX-512 loops and this CPU runs them (AVX-512 F/BW/VL/DQ,
// VBMI and BF16, the registers saved by the OS), else "".
const char* simd_kernels_isa();
// Whether the step uses them: where they run, unless set_simd_kernels_enabled(false) (the tests
// compare both loops); returns the previous setting.
bool simd_kernels_available();
bool set_simd_kernels_enabled(bool enabled);

// The loop for a (param, state) pair that has one (cpu_kernel.h kHasSimdLoop); call only where
// simd_kernels_available().
template <typename param_t, typename state_t>
SimdLoop<param_t, state_t> simd_loop(const SimdKernelFlags& flags);

// decode_block and encode_block of blockwise_quant.h with AVX-512 (the map's entries by byte
// permutes from its CodePlanes, 64 codes at a time; CodeTable's by gathers, 16 at a time): the
// same operations, so the same codes and values. Call only where simd_kernels_available().
void decode_block_simd(const uint8_t* codes, int64_t count, float scale,
                       const quantization::CodePlanes& planes, float* values);
void encode_block_simd(const float* values, int64_t count, uint8_t* codes, float* scale,
                       const quantization::CodeTable& table);

// The block codecs of the CPU step and of the quantize_blockwise op: the AVX-512 ones where they
// run, else blockwise_quant.h's.
inline void decode_state_block(const uint8_t* codes, int64_t count, float scale, const float* map,
                               const quantization::CodePlanes& planes, float* values) {
  if (simd_kernels_available()) {
    decode_block_simd(codes, count, scale, planes, values);
  } else {
    quantization::decode_block(codes, count, scale, map, values);
  }
}

inline void encode_state_block(const float* values, int64_t count, uint8_t* codes, float* scale,
                               const quantization::CodeTable& table) {
  if (simd_kernels_available()) {
    encode_block_simd(values, count, codes, scale, table);
  } else {
    quantization::encode_block(values, count, codes, scale, table);
  }
}

}  // namespace cpu
}  // namespace rmsprop_fused
