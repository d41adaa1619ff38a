// float16 <-> float32 for a tile of elements at a time, with the CPU's conversion instructions
// (AVX-512F or F16C) where it has them, picked once when the extension loads. The bits are those
// of ElementCodec<c10::Half> (element_codec.h): exact widening; round to nearest even, NaN ->
// sign | 0x7E00. The codec's own selects cost the fp16 loop about twice bf16's time; the
// instructions convert 16 elements in one. (Widening quiets a signalling NaN, which the codec
// keeps signalling; every loaded value goes through arithmetic, which quiets it too, before it is
// stored, so no stored bit differs.)
#pragma once

#include <cstdint>

namespace rmsprop_fused {
namespace cpu {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The CPU kernel converts fp16 streams tile by tile (cpu_kernel.h update_half_tiles).
#define RMSPROP_CPU_HALF_TILES 1
#endif

void halves_to_floats(const uint16_t* __restrict__ halves, float* __restrict__ floats, int64_t n);
void floats_to_halves(const float* __restrict__ floats, uint16_t* __restrict__ halves, int64_t n);

}  // namespace cpu
}  // namespace rmsprop_fused
