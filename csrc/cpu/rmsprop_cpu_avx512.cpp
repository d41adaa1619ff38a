// The CPU step for every (param, state) pair that stores 16-bit values (bfloat16 and float16
// params, float32 params with bfloat16 state) where the CPU has AVX-512 with VBMI and BF16
// (Sapphire Rapids and later Xeons, AMD Zen 4 and later; Cooper Lake, with BF16 but not VBMI, runs
// the compiler's loops), the step of 8-bit state (float32 and 16-bit params) and its block codecs
// (byte permutes to decode, gathers to encode): rmsprop_update on sixteen float32 lanes
// (simd_lanes.h), loading and storing each 16-bit stream with the conversion instructions. The
// 16-bit step is compute-bound on two cores: its vsqrtps and vdivps keep the divider busy for
// about half of it, and the compiler-vectorised loop of cpu_kernel.h spends most of the rest on
// the codecs' integer rounding (about 8 instructions a vector for every 16-bit store, 4 stores
// with centered + momentum). vcvtneps2bf16 / vcvtne2ps2bf16 and vcvtps2ph round in one, with a
// check for what they round otherwise (NaN, and subnormals for bf16); bfloat16 loads are one
// shift or mask (load_interleaved). Same bits as the codecs, so as every backend:
// tests/test_cpu_kernel.py runs both loops against the reference.
//
// Everything below the target pragma uses AVX-512 and runs only where simd_kernels_available():
// the templates are instantiated here alone (in an anonymous namespace, or on its types), so no
// AVX-512 copy of a shared inline function can take the place of the others at link time
// (tests/test_cpu_kernel.py checks that only these functions and the v4 clones use zmm registers).
#include "simd_kernel.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../state_pairs.h"
#include "prefetch.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RMSPROP_CPU_SIMD_KERNELS 1
// GCC 12's own conversion and reduction intrinsics start from an undefined vector that it then
// warns about.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "half_nans.h"
#endif

namespace rmsprop_fused {
namespace cpu {
namespace {

bool cpu_runs_simd_kernels() {
#if defined(RMSPROP_CPU_SIMD_KERNELS)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

const bool kCpuRunsSimdKernels = cpu_runs_simd_kernels();
std::atomic<bool> simd_kernels_enabled{true};

}  // namespace

const char* simd_kernels_isa() { return kCpuRunsSimdKernels ? "avx512-bf16" : ""; }

bool simd_kernels_available() {
  return kCpuRunsSimdKernels && simd_kernels_enabled.load(std::memory_order_relaxed);
}

bool set_simd_kernels_enabled(bool enabled) { return simd_kernels_enabled.exchange(enabled); }

}  // namespace cpu
}  // namespace rmsprop_fused

#if defined(RMSPROP_CPU_SIMD_KERNELS)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16")

// First included here, so that rmsprop_update and its helpers are compiled for these lanes.
#include "../rmsprop_update.h"
#include "simd_lanes.h"

namespace rmsprop_fused {
namespace cpu {
namespace {

using simd::Lanes16;

// The mask of elements [k, min(k + 16, end)): a vector of lanes, or the part of it before end.
__mmask16 lanes_before(int64_t k, int64_t end) {
  return static_cast<__mmask16>((1u << std::min<int64_t>(16, end - k)) - 1);
}

// Elements [begin, end): 32 at a time (a cache line of each 16-bit stream, two of each float32
// one), each stream prefetched prefetch_bytes() of params ahead, up to the range's last element;
// the last under 32 sixteen at a time with masked loads and stores. bfloat16 params with
// bfloat16 state take the 32 as their even and odd elements (LaneCodec load_interleaved).
template <typename param_t, typename state_t, class V, bool kVarianceState>
void update_range_simd(typename ElementCodec<param_t>::storage_t* __restrict__ param,
                       typename ElementCodec<param_t>::storage_t* __restrict__ grad,
                       typename ElementCodec<state_t>::storage_t* __restrict__ square_avg,
                       typename ElementCodec<state_t>::storage_t* __restrict__ grad_avg,
                       typename ElementCodec<state_t>::storage_t* __restrict__ momentum_buffer,
                       int64_t begin, int64_t end, const StepScalars<float>& scalars) {
  using PC = simd::LaneCodec<param_t>;
  using SC = simd::LaneCodec<state_t>;
  using P = typename PC::storage_t;
  using S = typename SC::storage_t;
  const StepScalars<Lanes16> s = convert_step_scalars<Lanes16>(scalars);
  // the elements of one vector of lanes at i, loaded (the others are 0) and updated
  struct Values {
    Lanes16 p, g, v, m, b;
  };
  const auto update = [&](int64_t i, __mmask16 mask) __attribute__((always_inline)) {
    Values x{PC::load(param + i, mask), PC::load(grad + i, mask), SC::load(square_avg + i, mask),
             Lanes16(0.0f), Lanes16(0.0f)};
    if constexpr (V::kCentered) x.m = SC::load(grad_avg + i, mask);
    if constexpr (V::kMomentum) x.b = SC::load(momentum_buffer + i, mask);
    rmsprop_update<V, kVarianceState>(x.p, x.g, x.v, x.m, x.b, s);
    return x;
  };
  const auto store = [&](int64_t i, const Values& x, __mmask16 mask) __attribute__((always_inline)) {
    PC::store(param + i, x.p, mask);
    SC::store(square_avg + i, x.v, mask);
    if constexpr (V::kUnscaleGrad) PC::store(grad + i, x.g, mask);  // the unscaled grad
    if constexpr (V::kCentered) SC::store(grad_avg + i, x.m, mask);
    if constexpr (V::kMomentum) SC::store(momentum_buffer + i, x.b, mask);
  };
  // bfloat16 params and state: 32 elements at i as their even and odd elements (a generic
  // lambda, compiled only where called)
  const auto update_interleaved = [&](auto i) __attribute__((always_inline)) {
    using BC = simd::LaneCodec<c10::BFloat16>;
    Values even, odd;
    BC::load_interleaved(param + i, even.p, odd.p);
    BC::load_interleaved(grad + i, even.g, odd.g);
    BC::load_interleaved(square_avg + i, even.v, odd.v);
    even.m = odd.m = even.b = odd.b = Lanes16(0.0f);
    if constexpr (V::kCentered) BC::load_interleaved(grad_avg + i, even.m, odd.m);
    if constexpr (V::kMomentum) BC::load_interleaved(momentum_buffer + i, even.b, odd.b);
    rmsprop_update<V, kVarianceState>(even.p, even.g, even.v, even.m, even.b, s);
    rmsprop_update<V, kVarianceState>(odd.p, odd.g, odd.v, odd.m, odd.b, s);
    BC::store_interleaved(param + i, even.p, odd.p);
    BC::store_interleaved(square_avg + i, even.v, odd.v);
    if constexpr (V::kUnscaleGrad) BC::store_interleaved(grad + i, even.g, odd.g);
    if constexpr (V::kCentered) BC::store_interleaved(grad_avg + i, even.m, odd.m);
    if constexpr (V::kMomentum) BC::store_interleaved(momentum_buffer + i, even.b, odd.b);
  };
  // 32 elements at i: each 16-bit stream written a cache line in one store
  const auto store_pair = [&](int64_t i, const Values& low,
                              const Values& high) __attribute__((always_inline)) {
    PC::store_pair(param + i, low.p, high.p);
    SC::store_pair(square_avg + i, low.v, high.v);
    if constexpr (V::kUnscaleGrad) PC::store_pair(grad + i, low.g, high.g);
    if constexpr (V::kCentered) SC::store_pair(grad_avg + i, low.m, high.m);
    if constexpr (V::kMomentum) SC::store_pair(momentum_buffer + i, low.b, high.b);
  };
  constexpr int64_t kStep = 32;
  static_assert(kStep * std::min(sizeof(P), sizeof(S)) == kCacheLineBytes,
                "32 elements are a cache line of the 16-bit streams");
  const int64_t distance = prefetch_bytes() / int64_t(sizeof(P));
  constexpr bool kWideParams = sizeof(P) == 4;
  constexpr bool kWideState = sizeof(S) == 4;
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) {
    const int64_t ahead = std::min(i + distance, end - 1);
    // a float32 stream's second line starts 16 elements on
    const int64_t lines_ahead[] = {ahead, std::min(ahead + 16, end - 1)};
    for (int64_t k = 0; k < (kWideParams ? 2 : 1); ++k) {
      prefetch_line(param, lines_ahead[k]);
      prefetch_line(grad, lines_ahead[k]);
    }
    for (int64_t k = 0; k < (kWideState ? 2 : 1); ++k) {
      prefetch_line(square_avg, lines_ahead[k]);
      if constexpr (V::kCentered) prefetch_line(grad_avg, lines_ahead[k]);
      if constexpr (V::kMomentum) prefetch_line(momentum_buffer, lines_ahead[k]);
    }
    if constexpr (std::is_same_v<param_t, c10::BFloat16> && std::is_same_v<state_t, c10::BFloat16>) {
      update_interleaved(i);
    } else {
      store_pair(i, update(i, 0xFFFF), update(i + 16, 0xFFFF));
    }
  }
  for (; i < end; i += 16) {
    const __mmask16 mask = lanes_before(i, end);
    store(i, update(i, mask), mask);
  }
}

// The mask of elements [k, min(k + 64, end)).
__mmask64 codes_before(int64_t k, int64_t end) {
  return end - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (end - k)) - 1;
}

// 64 codes at `codes` (the lanes of `lanes`; the others read code 0), dequantized with the block's
// scale into four vectors of 16 in order. For each byte of the float32 entries: two vpermi2b look
// up the codes' low 7 bits in the plane's two halves and a blend on the top bit picks one; byte and
// word unpacks then join each entry's four bytes. (Zen 4, 64 lookups: 8.4 ns, four gathers 24 ns.)
inline __attribute__((always_inline)) void decoded(const uint8_t* codes, __mmask64 lanes,
                                                   const quantization::CodePlanes& planes,
                                                   __m512 scales, __m512 (&values)[4]) {
  // The unpacks work within 128-bit lanes: the entry for code j must sit at byte
  // 16 (j / 4 % 4) + 4 (j / 16) + j % 4, so the codes are moved there first.
  const __m512i in_unpack_order = _mm512_set_epi8(
      63, 62, 61, 60, 47, 46, 45, 44, 31, 30, 29, 28, 15, 14, 13, 12, 59, 58, 57, 56, 43, 42, 41, 40,
      27, 26, 25, 24, 11, 10, 9, 8, 55, 54, 53, 52, 39, 38, 37, 36, 23, 22, 21, 20, 7, 6, 5, 4, 51,
      50, 49, 48, 35, 34, 33, 32, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i code =
      _mm512_permutexvar_epi8(in_unpack_order, _mm512_maskz_loadu_epi8(lanes, codes));
  const __mmask64 upper_half = _mm512_movepi8_mask(code);
  __m512i byte[4];
  for (int k = 0; k < 4; ++k) {
    const uint8_t* plane = planes.bytes[k];
    const __m512i lower =
        _mm512_permutex2var_epi8(_mm512_load_si512(plane), code, _mm512_load_si512(plane + 64));
    const __m512i upper =
        _mm512_permutex2var_epi8(_mm512_load_si512(plane + 128), code, _mm512_load_si512(plane + 192));
    byte[k] = _mm512_mask_blend_epi8(upper_half, lower, upper);
  }
  const __m512i low01 = _mm512_unpacklo_epi8(byte[0], byte[1]);
  const __m512i high01 = _mm512_unpackhi_epi8(byte[0], byte[1]);
  const __m512i low23 = _mm512_unpacklo_epi8(byte[2], byte[3]);
  const __m512i high23 = _mm512_unpackhi_epi8(byte[2], byte[3]);
  const __m512i entries[4] = {_mm512_unpacklo_epi16(low01, low23), _mm512_unpackhi_epi16(low01, low23),
                              _mm512_unpacklo_epi16(high01, high23),
                              _mm512_unpackhi_epi16(high01, high23)};
  for (int j = 0; j < 4; ++j) values[j] = _mm512_mul_ps(_mm512_castsi512_ps(entries[j]), scales);
}

// AbsMax::add for the lanes of `lanes`: the integer maximum of the magnitudes' bits (any order
// gives the same bits, NaN above every number).
inline __attribute__((always_inline)) __m512i with_magnitudes(__m512i largest, __mmask16 lanes,
                                                              __m512 x) {
  const __m512i magnitude = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF));
  return _mm512_mask_max_epu32(largest, lanes, largest, magnitude);
}

// encode_block once the block's AbsMax is known: the new scale, then each value's code from
// CodeTable (one gather per 16 values).
inline __attribute__((always_inline)) void encode_with_absmax(
    const float* values, int64_t count, uint8_t* codes, float* scale,
    const quantization::CodeTable& table, __m512i largest) {
  using quantization::CodeTable;
  quantization::AbsMax absmax;
  absmax.bits = _mm512_reduce_max_epu32(largest);
  const float new_scale = absmax.scale();
  *scale = new_scale;
  const bool normalizes = new_scale > 0.0f;  // normalize(): else every value is 0
  const __m512 scales = _mm512_set1_ps(new_scale);
  const __m512i low_bits = _mm512_set1_epi32(CodeTable::kLowBits);
  const __m512i low_half = _mm512_set1_epi32(0xFFFF);
  for (int64_t k = 0; k < count; k += 16) {
    const __mmask16 lanes = lanes_before(k, count);
    const __m512 x = normalizes ? _mm512_div_ps(_mm512_maskz_loadu_ps(lanes, values + k), scales)
                                : _mm512_setzero_ps();
    // CodeTable::quantize: the entry at bits >> 15, then its code below or past the threshold.
    // A NaN lane gathers nothing: its entry 0 gives code 0.
    const __m512i bits = _mm512_castps_si512(x);
    const __mmask16 numbers = _mm512_mask_cmp_ps_mask(lanes, x, x, _CMP_ORD_Q);
    const __m512i index = _mm512_srli_epi32(bits, CodeTable::kShift);
    const __m512i entry =
        _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), numbers, index, table.entries(), 4);
    const __mmask16 past = _mm512_cmp_epu32_mask(_mm512_and_si512(bits, low_bits),
                                                 _mm512_and_si512(entry, low_half), _MM_CMPINT_NLT);
    // the code in the low byte, which the narrowing store keeps
    const __m512i code = _mm512_mask_srli_epi32(_mm512_srli_epi32(entry, 16), past, entry, 24);
    _mm512_mask_cvtepi32_storeu_epi8(codes + k, lanes, code);
  }
}

// cpu_kernel.h update_quantized_blocks in one pass over each block's elements: the state decoded
// into lanes, updated with its params and grads, kept in L1 (the new scale needs the whole
// block's maximum, taken on the way) and then encoded. The same operations on the same values,
// so the same bits.
template <typename param_t, class V, bool kVarianceState>
void update_blocks_simd(typename ElementCodec<param_t>::storage_t* __restrict__ param,
                        typename ElementCodec<param_t>::storage_t* __restrict__ grad,
                        uint8_t* __restrict__ square_avg, uint8_t* __restrict__ grad_avg,
                        uint8_t* __restrict__ momentum_buffer, float* __restrict__ square_avg_scale,
                        float* __restrict__ grad_avg_scale, float* __restrict__ momentum_buffer_scale,
                        int64_t first_block, int64_t last_block, int64_t numel,
                        const StepScalars<float>& scalars, const BlockCodecTables& tables) {
  using PC = simd::LaneCodec<param_t>;
  constexpr int64_t kBlock = quantization::kQuantBlock;
  const StepScalars<Lanes16> s = convert_step_scalars<Lanes16>(scalars);
  alignas(64) float v[kBlock], m[kBlock], b[kBlock];
  const int64_t distance = prefetch_bytes() / int64_t(sizeof(typename PC::storage_t));
  const int64_t last = std::min(last_block * kBlock, numel) - 1;
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t begin = block * kBlock;
    const int64_t count = std::min(kBlock, numel - begin);
    const __m512 v_scale = _mm512_set1_ps(square_avg_scale[block]);
    const __m512 m_scale = _mm512_set1_ps(V::kCentered ? grad_avg_scale[block] : 0.0f);
    const __m512 b_scale = _mm512_set1_ps(V::kMomentum ? momentum_buffer_scale[block] : 0.0f);
    __m512i v_max = _mm512_setzero_si512(), m_max = v_max, b_max = v_max;
    for (int64_t chunk = 0; chunk < count; chunk += 64) {
      // each code stream a line ahead, prefetch_bytes() of params ahead (up to the range's last
      // element), then 64 codes of each decoded
      const int64_t at = begin + chunk;
      const __mmask64 codes = codes_before(chunk, count);
      const int64_t codes_ahead = std::min(at + distance, last);
      prefetch_line(square_avg, codes_ahead);
      if constexpr (V::kCentered) prefetch_line(grad_avg, codes_ahead);
      if constexpr (V::kMomentum) prefetch_line(momentum_buffer, codes_ahead);
      __m512 vs[4], ms[4], bs[4];
      decoded(square_avg + at, codes, *tables.unsigned_planes, v_scale, vs);
      if constexpr (V::kCentered) decoded(grad_avg + at, codes, *tables.signed_planes, m_scale, ms);
      if constexpr (V::kMomentum) {
        decoded(momentum_buffer + at, codes, *tables.signed_planes, b_scale, bs);
      }
      for (int64_t j = 0; j < 4 && chunk + 16 * j < count; ++j) {
        const int64_t k = chunk + 16 * j;
        const __mmask16 lanes = lanes_before(k, count);
        const int64_t i = begin + k;
        // the params and grads a line a step (two steps a line of 16-bit ones)
        const int64_t ahead = std::min(i + distance, last);
        prefetch_line(param, ahead);
        prefetch_line(grad, ahead);
        Lanes16 p = PC::load(param + i, lanes), g = PC::load(grad + i, lanes);
        Lanes16 vk(vs[j]), mk(0.0f), bk(0.0f);
        if constexpr (V::kCentered) mk = Lanes16(ms[j]);
        if constexpr (V::kMomentum) bk = Lanes16(bs[j]);
        rmsprop_update<V, kVarianceState>(p, g, vk, mk, bk, s);
        PC::store(param + i, p, lanes);
        if constexpr (V::kUnscaleGrad) PC::store(grad + i, g, lanes);  // the unscaled grad
        _mm512_store_ps(v + k, vk.v);
        v_max = with_magnitudes(v_max, lanes, vk.v);
        if constexpr (V::kCentered) {
          _mm512_store_ps(m + k, mk.v);
          m_max = with_magnitudes(m_max, lanes, mk.v);
        }
        if constexpr (V::kMomentum) {
          _mm512_store_ps(b + k, bk.v);
          b_max = with_magnitudes(b_max, lanes, bk.v);
        }
      }
    }
    encode_with_absmax(v, count, square_avg + begin, square_avg_scale + block, *tables.unsigned_table, v_max);
    if constexpr (V::kCentered) {
      encode_with_absmax(m, count, grad_avg + begin, grad_avg_scale + block, *tables.signed_table, m_max);
    }
    if constexpr (V::kMomentum) {
      encode_with_absmax(b, count, momentum_buffer + begin, momentum_buffer_scale + block,
                         *tables.signed_table, b_max);
    }
  }
}

// The loop for each SimdKernelFlags, numbered by its bits: centered 1, momentum 2, unscale 4,
// extended 8, variance state 16 (null where the flags cannot go together).
template <typename param_t, typename state_t, unsigned kFlags>
constexpr SimdLoop<param_t, state_t> loop_for_flags() {
  using V = UpdateVariant<(kFlags & 1) != 0, (kFlags & 2) != 0, (kFlags & 4) != 0, (kFlags & 8) != 0>;
  constexpr bool kVarianceState = (kFlags & 16) != 0;
  if constexpr (kVarianceState && !(V::kCentered && V::kExtended && can_hold_variance_state<state_t>())) {
    return nullptr;
  } else if constexpr (std::is_same_v<state_t, Blockwise8>) {
    return &update_blocks_simd<param_t, V, kVarianceState>;
  } else {
    return &update_range_simd<param_t, state_t, V, kVarianceState>;
  }
}

template <typename param_t, typename state_t, unsigned... kFlags>
constexpr std::array<SimdLoop<param_t, state_t>, sizeof...(kFlags)> loops_by_flags(
    std::integer_sequence<unsigned, kFlags...>) {
  return {loop_for_flags<param_t, state_t, kFlags>()...};
}

template <typename param_t, typename state_t>
SimdLoop<param_t, state_t> lookup(const SimdKernelFlags& f) {
  static constexpr auto kLoops =
      loops_by_flags<param_t, state_t>(std::make_integer_sequence<unsigned, 32>{});
  return kLoops[unsigned(f.centered) | unsigned(f.momentum) << 1 | unsigned(f.unscale_grad) << 2 |
                unsigned(f.extended) << 3 | unsigned(f.variance_state) << 4];
}

}  // namespace

// 8-bit state blocks: blockwise_quant.h's decode_block and encode_block, lane for lane.
void decode_block_simd(const uint8_t* codes, int64_t count, float scale,
                       const quantization::CodePlanes& planes, float* values) {
  const __m512 scales = _mm512_set1_ps(scale);
  for (int64_t chunk = 0; chunk < count; chunk += 64) {
    __m512 decoded_values[4];
    decoded(codes + chunk, codes_before(chunk, count), planes, scales, decoded_values);
    for (int64_t j = 0; j < 4 && chunk + 16 * j < count; ++j) {
      const int64_t k = chunk + 16 * j;
      _mm512_mask_storeu_ps(values + k, lanes_before(k, count), decoded_values[j]);
    }
  }
}

void encode_block_simd(const float* values, int64_t count, uint8_t* codes, float* scale,
                       const quantization::CodeTable& table) {
  __m512i largest = _mm512_setzero_si512();
  for (int64_t k = 0; k < count; k += 16) {
    const __mmask16 lanes = lanes_before(k, count);
    largest = with_magnitudes(largest, lanes, _mm512_maskz_loadu_ps(lanes, values + k));
  }
  encode_with_absmax(values, count, codes, scale, table, largest);
}

}  // namespace cpu
}  // namespace rmsprop_fused

#pragma GCC pop_options
#else
namespace rmsprop_fused {
namespace cpu {
namespace {
template <typename param_t, typename state_t>
SimdLoop<param_t, state_t> lookup(const SimdKernelFlags&) {
  return nullptr;  // never asked: simd_kernels_available() is false
}
}  // namespace
// never called: simd_kernels_available() is false
void decode_block_simd(const uint8_t*, int64_t, float, const quantization::CodePlanes&, float*) {}
void encode_block_simd(const float*, int64_t, uint8_t*, float*, const quantization::CodeTable&) {}
}  // namespace cpu
}  // namespace rmsprop_fused
#endif

namespace rmsprop_fused {
namespace cpu {

// simd_kernel.h declares simd_loop; the pairs of cpu_kernel.h kHasSimdLoop are instantiated here.
template <typename param_t, typename state_t>
SimdLoop<param_t, state_t> simd_loop(const SimdKernelFlags& f) {
  return lookup<param_t, state_t>(f);
}

#define RMSPROP_INSTANTIATE_SIMD_LOOP(P, S) \
  template SimdLoop<P, S> simd_loop<P, S>(const SimdKernelFlags&);
RMSPROP_INSTANTIATE_SIMD_LOOP(c10::BFloat16, c10::BFloat16)
RMSPROP_INSTANTIATE_SIMD_LOOP(c10::BFloat16, float)
RMSPROP_INSTANTIATE_SIMD_LOOP(c10::Half, c10::Half)
RMSPROP_INSTANTIATE_SIMD_LOOP(c10::Half, float)
RMSPROP_INSTANTIATE_SIMD_LOOP(float, c10::BFloat16)
RMSPROP_INSTANTIATE_SIMD_LOOP(c10::Half, c10::BFloat16)
RMSPROP_INSTANTIATE_SIMD_LOOP(float, Blockwise8)
RMSPROP_INSTANTIATE_SIMD_LOOP(c10::BFloat16, Blockwise8)
RMSPROP_INSTANTIATE_SIMD_LOOP(c10::Half, Blockwise8)
#undef RMSPROP_INSTANTIATE_SIMD_LOOP

}  // namespace cpu
}  // namespace rmsprop_fused
