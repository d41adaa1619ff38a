// The multi-tensor CUDA kernel's own logic, written once for two compilers:
//   nvcc  (csrc/cuda/*.cu)        the __global__ kernels call rmsprop_block and increment_steps
//                                 with blockIdx.x, threadIdx.x and blockDim.x;
//   g++   (csrc/cuda_on_host/)    a host loop calls them for every block and thread index of
//                                 every launch (one call per warp for 8-bit state: WarpLanes).
// The kernels use no shared memory and no barriers; the threads of a launch write disjoint
// elements, and the one warp-level operation (the maximum of an 8-bit block, a warp shuffle) is
// computed in the host build over the same 32 lane values. So the sequential host order computes
// exactly what the grid computes (docs/DESIGN.md section 3.4), and the tests drive the host build
// through every path below: launch planning, the block-to-segment search, the 16-byte vector
// path, the scalar path and tail, every storage codec, stochastic rounding and the 8-bit blocks.
//
// Shape of a step:
//   host    the step counters are incremented first, by their own tiny kernel (increment_steps),
//           so that the update reads the incremented count (bias correction, rounding keys).
//           plan_launches() cuts the tensors into segments (a whole tensor, or the part of one
//           that fits in a launch) and groups them into launches; each launch's LaunchArgs (the
//           segments' pointers, sizes, tensor index and first chunk, plus the step's scalars) is
//           passed by value, in a 32 KB or a 4 KB parameter budget (whichever the driver takes).
//   device  one block per chunk of kChunkSize elements. Block b finds its segment by binary search
//           over the segments' first chunk, then walks the chunk: 16-byte vectors when all of the
//           chunk's pointers are aligned, scalars otherwise and for the tail; with 8-bit state,
//           each warp owns whole 256-element quantization blocks.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../blockwise_quant.h"
#include "../element_codec.h"
#include "../rmsprop_update.h"
#include "../state_pairs.h"

// Loops over the lanes of a vector must be unrolled on the device: a runtime index into a
// per-thread array would put the array in local memory. tests/test_cuda_sass.py checks the
// compiled kernels for local-memory traffic. The host build has no such concern, and compiles
// the loops as they are (faster: it instantiates every kernel too).
#if defined(__CUDACC__)
#define RMSPROP_UNROLL _Pragma("unroll")
#else
#define RMSPROP_UNROLL
#endif

// The grid-stride loops over a chunk are kept rolled on the device: each iteration already has
// a 16-byte load per stream in flight for each of the block's 256 threads (see kBlockDim), and
// the copies nvcc would unroll (4 of the scalar tail, each with its division and square-root
// slow-path calls) only add registers, code and compile time, and made ptxas spill a register
// or two around those calls in some kernels (tests/test_cuda_sass.py finds no local memory).
#if defined(__CUDACC__)
#define RMSPROP_ROLLED _Pragma("unroll 1")
#else
#define RMSPROP_ROLLED
#endif

namespace rmsprop_fused {
namespace multi_tensor {

// ---------------------------------------------------------------------------------------------
// Capacities
// ---------------------------------------------------------------------------------------------

// Elements per chunk (one block). A chunk holds 16384 x 20 bytes = 320 KiB of traffic for fp32
// without momentum, so the per-block fixed cost (the segment search, reading found_inf, lr and
// the step count) is amortised, while GPT-2 small (124M elements) still makes 7,686 blocks: 10 to
// 19 times what an H100 holds at once (132 SMs x 3 to 6 blocks, as registers allow), so the last,
// partly idle wave is a small part of the step. torch's 65,536 (MultiTensorApply.cuh) makes 1,995
// blocks, 3 to 5 waves. 16384 elements are a whole number of 16-byte vectors in every dtype, so
// every chunk of a 16-byte aligned tensor starts 16-byte aligned, also where a tensor is split
// between launches; and 64 whole 8-bit quantization blocks, so no block straddles two chunks.
constexpr int64_t kChunkSize = 16384;
static_assert(kChunkSize % quantization::kQuantBlock == 0, "a chunk holds whole 8-bit blocks");

// Offsets within a chunk are 32-bit (one register a loop counter, 32-bit address arithmetic), so
// a chunk has at most 2^30 elements: an offset plus a block's stride stays below 2^31.
constexpr int64_t kMaxChunkSize = int64_t(1) << 30;
static_assert(kChunkSize <= kMaxChunkSize);

// Threads per block: 8 warps. The kernels take 44 to 126 registers a thread (ptxas, quoted at
// kRegisterCounts below; no spills), so an SM holds 2 to 5 blocks of 256 threads (the kernels'
// __launch_bounds__ ask for 2, kMinBlocksPerSM), each thread with one 16-byte load per tensor in
// flight: at least 2 x 256 x 3 x 16 bytes = 24 KB per SM, above the ~20 KB that an H100's
// bandwidth x latency asks of each SM (3.35 TB/s / 132 SMs x ~800 ns), so the loop needs no
// unrolling and the block size no tuning beyond the customary 256.
constexpr int64_t kBlockDim = 256;
constexpr int64_t kWarpSize = 32;
// The update kernel's __launch_bounds__ minimum (cuda_launch.cuh): 65536 / (2 x 256) = at most
// 128 registers a thread.
constexpr int kMinBlocksPerSM = 2;

// kRegisterCounts: registers a thread allocated by ptxas of nvcc 13.0 (cuobjdump
// --dump-resource-usage), min-max over centered x momentum x AMP and both parameter budgets
// (which do not differ), for each architecture of the default TORCH_CUDA_ARCH_LIST.
// tests/test_cuda_sass.py checks every number against the build when its nvcc is 13.0.
//   params    state     plain kernels              |  kExtended kernels
//   float64   float64   sm_80 56-80   sm_90 56-82   |  sm_80 62-96   sm_90 62-99
//   float32   float32   sm_80 44-67   sm_90 45-69   |  sm_80 48-78   sm_90 50-78
//   float32   bfloat16  sm_80 44-72   sm_90 46-70   |  sm_80 54-88   sm_90 54-86
//   float32   8-bit     sm_80 62-110  sm_90 64-105  |  sm_80 68-121  sm_90 70-112
//   bfloat16  bfloat16  sm_80 50-89   sm_90 51-88   |  sm_80 62-108  sm_90 63-108
//   bfloat16  float32   sm_80 52-86   sm_90 50-88   |  sm_80 62-108  sm_90 63-106
//   bfloat16  8-bit     sm_80 64-104  sm_90 68-110  |  sm_80 77-124  sm_90 79-126
//   float16   float16   sm_80 48-89   sm_90 50-89   |  sm_80 60-96   sm_90 61-96
//   float16   float32   sm_80 52-88   sm_90 51-88   |  sm_80 62-104  sm_90 62-102
//   float16   bfloat16  sm_80 49-84   sm_90 50-84   |  sm_80 62-106  sm_90 63-106
//   float16   8-bit     sm_80 66-106  sm_90 69-109  |  sm_80 78-122  sm_90 80-126

// gridDim.x is at most 2^31 - 1, so a launch has at most that many chunks (which also keeps the
// segments' first chunk, stored as int32_t, in range).
constexpr int64_t kMaxChunksPerLaunch = std::numeric_limits<int32_t>::max();

// Bytes moved by one vector load or store: LDG.E.128 / STG.E.128.
constexpr int64_t kVectorBytes = 16;

// Kernel parameters live in a constant bank of at most 4,096 bytes, or 32,764 bytes for a kernel
// built by CUDA >= 12.1 and launched on Volta or newer by a driver of CUDA >= 12.1 (R530). A
// build of 12.1 or newer can meet an older driver (minor-version compatibility), which refuses
// the large launch, so it builds every kernel for both budgets and picks one per call from the
// driver (rmsprop_cuda.cu, large_kernel_params_supported(), as torch's MultiTensorApply does);
// older toolkits build the 4 KB kernels only. The host build has both and tests both.
constexpr int64_t kLargeKernelParamBytes = 32764;
constexpr int64_t kSmallKernelParamBytes = 4096;
#if defined(__CUDACC__) && defined(CUDART_VERSION) && CUDART_VERSION < 12010
constexpr bool kLargeKernelParamsBuilt = false;
#else
constexpr bool kLargeKernelParamsBuilt = true;
#endif

// ---------------------------------------------------------------------------------------------
// What a kernel instantiation is compiled for
// ---------------------------------------------------------------------------------------------

// The compile-time facts of one kernel: the (param, state) storage pair and the UpdateVariant.
// Stochastic rounding and variance state are run-time options of the kExtended instantiation
// (uniform branches), compiled in only where the pair can use them: stochastic rounding where a
// 16-bit value is stored, variance state where the state is centered (FusedRMSprop asks for it
// with bfloat16 or 8-bit state, and its small tensors keep their variance in float32 then).
template <typename param_t, typename state_t, class Variant_>
struct Kernel {
  using ParamCodec = ElementCodec<param_t>;
  using P = typename ParamCodec::storage_t;
  static constexpr bool kQuantized = std::is_same_v<state_t, Blockwise8>;
  using StateCodec = ElementCodec<std::conditional_t<kQuantized, float, state_t>>;
  using S = std::conditional_t<kQuantized, uint8_t, typename StateCodec::storage_t>;
  using opmath_t = at::opmath_type<param_t>;
  using Variant = Variant_;
  static constexpr bool kStochastic = Variant::kExtended && stores_16_bit<param_t, state_t>();
  static constexpr bool kVarianceState = Variant::kExtended && Variant::kCentered;
  // Elements per vector: 16 bytes of the param.
  static constexpr int kLanes = static_cast<int>(kVectorBytes / sizeof(P));
  // The segment's pointers (LaunchArgs::ptr): param, grad, square_avg, [grad_avg],
  // [momentum_buffer], then with 8-bit state one scale array per state tensor, then the step
  // counter.
  static constexpr int kStates = 1 + (Variant::kCentered ? 1 : 0) + (Variant::kMomentum ? 1 : 0);
  static constexpr int kDepth = 2 + kStates;
  static constexpr int kScales = kQuantized ? kStates : 0;
  static constexpr int kPointers = kDepth + kScales + 1;
  static constexpr int kStepPointer = kPointers - 1;
};

// ---------------------------------------------------------------------------------------------
// The kernel's one parameter
// ---------------------------------------------------------------------------------------------

// Everything of a launch that is not per segment.
template <typename opmath_t>
struct LaunchScalars {
  StepScalars<opmath_t> step;  // from make_step_scalars on the host
  const opmath_t* lr;          // nullptr: step.lr; else read on the device (capturable lr)
  const opmath_t* grad_scale;  // AMP: grads are divided by *grad_scale (kUnscaleGrad kernels)
  const opmath_t* clip_coef;   // nullptr: no clipping; else grads are multiplied by *clip_coef
  const float* found_inf;      // nullptr: never skip; else any nonzero value skips the step
  int64_t rounding_seed;       // stochastic rounding's seed (when `stochastic`)
  int64_t chunk_size;
  int64_t num_segments;
  bool stochastic;             // round 16-bit stores stochastically (kExtended kernels)
  bool variance_state;         // square_avgs hold the variance (kExtended, centered kernels)
};

// One launch: up to kMaxSegments segments, each `numel` elements of the tensor at index
// `tensor[s]` of the op's lists, from its element `begin[s]` on, whose chunks are blocks
// first_chunk[s] .. first_chunk[s + 1] - 1, with its pointers (Kernel::kPointers of them, already
// offset to element `begin[s]`) in ptr[s].
//
// Layout: the arrays are ordered by alignment (8-byte, then 4-byte) so the struct has no padding
// inside. The binary search reads only first_chunk, 4 bytes a segment, so the search of 500
// segments touches 2 KB of the constant bank, not the whole 32 KB; a block then reads its one
// segment's numel, begin, tensor and pointers.
template <class Kernel_, int64_t kMaxSegments_>
struct LaunchArgs {
  using K = Kernel_;
  using opmath_t = typename K::opmath_t;
  static constexpr int64_t kMaxSegments = kMaxSegments_;

  LaunchScalars<opmath_t> scalars;
  int64_t numel[kMaxSegments];
  int64_t begin[kMaxSegments];
  void* ptr[kMaxSegments][K::kPointers];
  int32_t first_chunk[kMaxSegments];
  int32_t tensor[kMaxSegments];
};

// The pointers of a segment: the tensors, the scales of 8-bit state, the step counter.
constexpr int64_t segment_pointers(int64_t depth, bool quantized) {
  return depth + (quantized ? depth - 2 : 0) + 1;
}

// Bytes of LaunchArgs per segment with `pointers` pointers: numel, begin, the pointers,
// first_chunk and tensor.
constexpr int64_t segment_bytes(int64_t pointers) {
  return 2 * static_cast<int64_t>(sizeof(int64_t)) + pointers * static_cast<int64_t>(sizeof(void*)) +
         2 * static_cast<int64_t>(sizeof(int32_t));
}

// How many segments fit in a kernel-parameter budget of `param_bytes` bytes. The fixed part is
// counted as LaunchScalars<double> (the larger one), so every dtype gets the same capacity and
// the same launch count. sizeof(LaunchArgs) is a multiple of 8 (it holds pointers), hence the
// budget rounded down to a multiple of 8.
//
// sizeof(LaunchScalars<double>) = 176 bytes. With 32,764 bytes: depth 3 -> 581 segments, depth 4
// -> 509, depth 5 -> 452; with 8-bit state 509, 407, 339. With 4,096 bytes: 70, 61, 54; 8-bit
// 61, 49, 40. GPT-2 small's 148 tensors (124M elements, 7,686 chunks) therefore take ONE launch
// at every depth with the 32 KB budget, and THREE (FOUR with 8-bit state at depths 4 and 5) with 4 KB;
// the chunk limit (2^31 - 1) never binds. tests/test_cuda_kernel_on_host.py asserts these counts.
constexpr int64_t max_segments_per_launch(int64_t pointers, int64_t param_bytes) {
  return (param_bytes / 8 * 8 - static_cast<int64_t>(sizeof(LaunchScalars<double>))) /
         segment_bytes(pointers);
}

template <class K, int64_t kParamBytes>
using BudgetLaunchArgs = LaunchArgs<K, max_segments_per_launch(K::kPointers, kParamBytes)>;

// The capacity formula holds for both budgets, every pointer count and both opmath types, and
// is the largest count that fits (counted with the larger LaunchScalars<double>).
template <int64_t kParamBytes, class Double, class Float>
constexpr bool fits_budget() {
  static_assert(Double::kPointers == Float::kPointers);
  constexpr int64_t kSegments = max_segments_per_launch(Double::kPointers, kParamBytes);
  return sizeof(LaunchArgs<Double, kSegments>) <= kParamBytes &&
         sizeof(LaunchArgs<Float, kSegments>) <= kParamBytes &&
         sizeof(LaunchArgs<Double, kSegments + 1>) > kParamBytes &&
         sizeof(LaunchArgs<Double, kSegments>) - sizeof(LaunchScalars<double>) ==
             static_cast<size_t>(kSegments * segment_bytes(Double::kPointers));
}
template <bool kCentered, bool kMomentum>
constexpr bool fits_both_budgets() {
  using V = UpdateVariant<kCentered, kMomentum, false, false>;
  using Plain64 = Kernel<double, double, V>;
  using Plain32 = Kernel<float, float, V>;
  using Bits8As64 = Kernel<double, Blockwise8, V>;  // a layout only: no such kernel exists
  using Bits8 = Kernel<float, Blockwise8, V>;
  return fits_budget<kLargeKernelParamBytes, Plain64, Plain32>() &&
         fits_budget<kSmallKernelParamBytes, Plain64, Plain32>() &&
         fits_budget<kLargeKernelParamBytes, Bits8As64, Bits8>() &&
         fits_budget<kSmallKernelParamBytes, Bits8As64, Bits8>();
}
static_assert(sizeof(LaunchScalars<double>) == 176, "update the capacities quoted above");
static_assert(fits_both_budgets<false, false>() && fits_both_budgets<true, false>() &&
                  fits_both_budgets<false, true>() && fits_both_budgets<true, true>(),
              "max_segments_per_launch must be the largest count that fits the parameter budget");

// The step counters a launch of increment_steps adds 1 to: as many pointers as the budget holds.
template <int64_t kMaxCounters_>
struct StepCounterArgs {
  static constexpr int64_t kMaxCounters = kMaxCounters_;
  const float* found_inf;  // nullptr: never skip
  int64_t count;
  float* step[kMaxCounters];
};

constexpr int64_t max_counters_per_launch(int64_t param_bytes) {
  return (param_bytes / 8 * 8 - 2 * static_cast<int64_t>(sizeof(int64_t))) /
         static_cast<int64_t>(sizeof(float*));
}

template <int64_t kParamBytes>
using BudgetStepCounterArgs = StepCounterArgs<max_counters_per_launch(kParamBytes)>;
static_assert(sizeof(BudgetStepCounterArgs<kLargeKernelParamBytes>) <= kLargeKernelParamBytes &&
              sizeof(BudgetStepCounterArgs<kSmallKernelParamBytes>) <= kSmallKernelParamBytes);

// Threads per block of increment_steps: one counter each.
constexpr int64_t kStepCounterBlockDim = 128;

// ---------------------------------------------------------------------------------------------
// Launch planning (host only)
// ---------------------------------------------------------------------------------------------

struct LaunchLimits {
  int64_t max_tensors_per_launch;  // segments per launch: a split tensor counts in both launches
  int64_t max_chunks_per_launch;
  int64_t chunk_size;
};

// The CUDA op's limits: the segments its parameter budget holds, the grid limit, kChunkSize.
inline LaunchLimits production_limits(int64_t pointers, int64_t param_bytes) {
  return {max_segments_per_launch(pointers, param_bytes), kMaxChunksPerLaunch, kChunkSize};
}

struct Segment {
  int64_t tensor;       // index into the op's lists
  int64_t begin;        // first element of the tensor in this segment
  int64_t numel;
  int64_t first_chunk;  // block index of the segment's first chunk in its launch
};

struct Launch {
  std::vector<Segment> segments;
  int64_t num_chunks = 0;  // the launch's grid size
};

// Greedy: tensors in order, each cut into chunks; a launch is closed when it holds
// max_tensors_per_launch segments or max_chunks_per_launch chunks, and a tensor that does not fit
// the rest of a launch continues as a new segment in the next one (at a chunk boundary, so its
// chunks keep their alignment and their 8-bit blocks). Empty tensors get no segment. Every launch
// but the last is full, in segments or in chunks.
inline std::vector<Launch> plan_launches(const std::vector<int64_t>& numels,
                                         const LaunchLimits& limits) {
  std::vector<Launch> launches;
  Launch current;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t begin = 0; begin < numels[t];) {
      if (static_cast<int64_t>(current.segments.size()) == limits.max_tensors_per_launch ||
          current.num_chunks == limits.max_chunks_per_launch) {
        launches.push_back(std::move(current));
        current = Launch{};
      }
      const int64_t left = numels[t] - begin;
      const int64_t chunks = std::min((left + limits.chunk_size - 1) / limits.chunk_size,
                                      limits.max_chunks_per_launch - current.num_chunks);
      const int64_t numel = std::min(left, chunks * limits.chunk_size);
      current.segments.push_back({static_cast<int64_t>(t), begin, numel, current.num_chunks});
      current.num_chunks += chunks;
      begin += numel;
    }
  }
  if (!current.segments.empty()) launches.push_back(std::move(current));
  return launches;
}

// ---------------------------------------------------------------------------------------------
// Loads and stores (host and device)
// ---------------------------------------------------------------------------------------------

// kN elements of one tensor moved by a single load or store of kN * sizeof(T) bytes (16 for the
// vector path, so nvcc emits LDG.E.128 / STG.E.128).
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Pack {
  T lane[kN];
};

// A load of kN elements goes in pieces of at most 16 bytes: float32 state of a 16-bit param's
// 8-lane vector is two LDG.E.128, bfloat16 state of a float32 param's 4 lanes one LDG.E.64.
template <typename T, int kN>
constexpr int piece_lanes() {
  return kN * sizeof(T) <= kVectorBytes ? kN : static_cast<int>(kVectorBytes / sizeof(T));
}

// The alignment the vector path needs of a pointer to T (vectors sit at multiples of kN elements
// from the chunk's start, so the chunk's start being aligned is enough).
template <typename T, int kN>
constexpr uintptr_t pack_alignment() {
  return sizeof(T) * piece_lanes<T, kN>();
}

template <typename T, int kN>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE bool is_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % pack_alignment<T, kN>() == 0;
}

// The casts read and write T objects through an aggregate of T, the pattern of torch's
// aligned_vector; the caller guarantees the alignment. x86 tolerates a misaligned vector access
// where the GPU faults, so the host build checks the alignment itself: the tests then catch a
// wrong choice of path.
template <int kN, typename T>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void load_pack(const T* p, T (&out)[kN]) {
  constexpr int kPiece = piece_lanes<T, kN>();
  using Piece = Pack<T, kPiece>;
#if !defined(__CUDA_ARCH__)
  TORCH_INTERNAL_ASSERT((is_aligned<T, kN>(p)), "rmsprop_fused: misaligned ", sizeof(Piece),
                        "-byte access");
#endif
  RMSPROP_UNROLL
  for (int k = 0; k < kN / kPiece; ++k) {
    const Piece x = reinterpret_cast<const Piece*>(p)[k];
    RMSPROP_UNROLL
    for (int j = 0; j < kPiece; ++j) out[k * kPiece + j] = x.lane[j];
  }
}

template <int kN, typename T>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void store_pack(T* p, const T (&in)[kN]) {
  constexpr int kPiece = piece_lanes<T, kN>();
  using Piece = Pack<T, kPiece>;
#if !defined(__CUDA_ARCH__)
  TORCH_INTERNAL_ASSERT((is_aligned<T, kN>(p)), "rmsprop_fused: misaligned ", sizeof(Piece),
                        "-byte access");
#endif
  RMSPROP_UNROLL
  for (int k = 0; k < kN / kPiece; ++k) {
    Piece x;
    RMSPROP_UNROLL
    for (int j = 0; j < kPiece; ++j) x.lane[j] = in[k * kPiece + j];
    reinterpret_cast<Piece*>(p)[k] = x;
  }
}

// kN elements from p[0], of which the first `present` exist: one pack when all do and the
// pointer is aligned (`whole`), else element by element. Missing elements read as zero bits.
template <int kN, typename T>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void load_elements(const T* p, bool whole, int present,
                                                            T (&out)[kN]) {
  if (whole) {
    load_pack<kN>(p, out);
  } else {
    RMSPROP_UNROLL
    for (int j = 0; j < kN; ++j) out[j] = j < present ? p[j] : T(0);
  }
}

template <int kN, typename T>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void store_elements(T* p, bool whole, int present,
                                                             const T (&in)[kN]) {
  if (whole) {
    store_pack<kN>(p, in);
  } else {
    RMSPROP_UNROLL
    for (int j = 0; j < kN; ++j) {
      if (j < present) p[j] = in[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One element (host and device)
// ---------------------------------------------------------------------------------------------

// The keys of the random streams of one tensor's step (stochastic rounding).
struct RoundingKeys {
  uint32_t param = 0;
  uint32_t square_avg = 0;
  uint32_t grad_avg = 0;
  uint32_t momentum_buffer = 0;
};

RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE RoundingKeys rounding_keys(int64_t seed, int64_t tensor,
                                                                    uint32_t count) {
  return {rounding_key(seed, tensor, count, kParamStream),
          rounding_key(seed, tensor, count, kSquareAvgStream),
          rounding_key(seed, tensor, count, kGradAvgStream),
          rounding_key(seed, tensor, count, kMomentumBufferStream)};
}

// What one block's elements share: the step's scalars with this block's lr, scales and bias
// correction, the run-time options of kExtended kernels, and the segment's rounding keys.
template <typename opmath_t>
struct BlockScalars {
  StepScalars<opmath_t> s;
  bool stochastic;
  bool variance_state;
  RoundingKeys keys;
};

// A value stored through its codec: rounded to nearest, or stochastically where the kernel can
// and the call asks for it (a uniform branch on the device), with the element's random bits.
template <class Codec, bool kCanRoundStochastically>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE typename Codec::storage_t store_value(
    typename Codec::opmath_t x, bool stochastic, uint32_t key, int64_t index) {
  if constexpr (kCanRoundStochastically && Codec::kRoundsStochastically) {
    if (stochastic) return Codec::store_stochastic(x, random_bits(key, index));
  }
  return Codec::store(x);
}

// One element in opmath: rmsprop_update, in its variance form under variance_state (square_avg
// holds the variance; a uniform branch).
template <class K>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void update_values(typename K::opmath_t& p,
                                                            typename K::opmath_t& g,
                                                            typename K::opmath_t& v,
                                                            typename K::opmath_t& m,
                                                            typename K::opmath_t& b,
                                                            const BlockScalars<typename K::opmath_t>& bs) {
  if constexpr (K::kVarianceState) {
    if (bs.variance_state) {
      rmsprop_update<typename K::Variant, true>(p, g, v, m, b, bs.s);
      return;
    }
  }
  rmsprop_update<typename K::Variant>(p, g, v, m, b, bs.s);
}

// The pointers of a chunk (or of an 8-bit block), typed.
template <class K>
struct Pointers {
  typename K::P* param;
  typename K::P* grad;
  typename K::S* square_avg;
  typename K::S* grad_avg;         // centered
  typename K::S* momentum_buffer;  // momentum
  float* square_avg_scale;         // 8-bit state
  float* grad_avg_scale;
  float* momentum_buffer_scale;

  // Every tensor's pointer advanced by `elements`, its scales by as many 8-bit blocks.
  RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE Pointers advanced(int64_t elements) const {
    Pointers q = *this;
    q.param += elements;
    q.grad += elements;
    q.square_avg += elements;
    if constexpr (K::Variant::kCentered) q.grad_avg += elements;
    if constexpr (K::Variant::kMomentum) q.momentum_buffer += elements;
    if constexpr (K::kQuantized) {
      const int64_t blocks = elements / quantization::kQuantBlock;
      q.square_avg_scale += blocks;
      if constexpr (K::Variant::kCentered) q.grad_avg_scale += blocks;
      if constexpr (K::Variant::kMomentum) q.momentum_buffer_scale += blocks;
    }
    return q;
  }

  // Whether every tensor's pointer is aligned for the vector path of kN elements.
  template <int kN>
  RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE bool aligned() const {
    using P = typename K::P;
    using S = typename K::S;
    bool ok = is_aligned<P, kN>(param) && is_aligned<P, kN>(grad) && is_aligned<S, kN>(square_avg);
    if constexpr (K::Variant::kCentered) ok = ok && is_aligned<S, kN>(grad_avg);
    if constexpr (K::Variant::kMomentum) ok = ok && is_aligned<S, kN>(momentum_buffer);
    return ok;
  }
};

// Loads kN consecutive elements at `offset` of every tensor (element `index` of the tensor is at
// offset 0), updates them in opmath, and stores them back. kN = 1 is the scalar path. The grad is
// stored only when it was unscaled; the other tensors always change.
template <int kN, class K>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void update_elements(
    const Pointers<K>& ptr, int32_t offset, int64_t index,
    const BlockScalars<typename K::opmath_t>& bs) {
  using V = typename K::Variant;
  using PC = typename K::ParamCodec;
  using SC = typename K::StateCodec;
  using opmath_t = typename K::opmath_t;
  typename K::P p[kN], g[kN];
  typename K::S v[kN], m[kN], b[kN];
  load_pack<kN>(ptr.param + offset, p);
  load_pack<kN>(ptr.grad + offset, g);
  load_pack<kN>(ptr.square_avg + offset, v);
  if constexpr (V::kCentered) load_pack<kN>(ptr.grad_avg + offset, m);
  if constexpr (V::kMomentum) load_pack<kN>(ptr.momentum_buffer + offset, b);

  RMSPROP_UNROLL
  for (int i = 0; i < kN; ++i) {
    opmath_t fp = PC::load(p[i]);
    opmath_t fg = PC::load(g[i]);
    opmath_t fv = SC::load(v[i]);
    opmath_t fm = V::kCentered ? SC::load(m[i]) : opmath_t(0);
    opmath_t fb = V::kMomentum ? SC::load(b[i]) : opmath_t(0);
    update_values<K>(fp, fg, fv, fm, fb, bs);
    const int64_t at = index + i;
    p[i] = store_value<PC, K::kStochastic>(fp, bs.stochastic, bs.keys.param, at);
    if constexpr (V::kUnscaleGrad) g[i] = PC::store(fg);  // the unscaled grad, to nearest
    v[i] = store_value<SC, K::kStochastic>(fv, bs.stochastic, bs.keys.square_avg, at);
    if constexpr (V::kCentered) {
      m[i] = store_value<SC, K::kStochastic>(fm, bs.stochastic, bs.keys.grad_avg, at);
    }
    if constexpr (V::kMomentum) {
      b[i] = store_value<SC, K::kStochastic>(fb, bs.stochastic, bs.keys.momentum_buffer, at);
    }
  }

  store_pack<kN>(ptr.param + offset, p);
  if constexpr (V::kUnscaleGrad) store_pack<kN>(ptr.grad + offset, g);
  store_pack<kN>(ptr.square_avg + offset, v);
  if constexpr (V::kCentered) store_pack<kN>(ptr.grad_avg + offset, m);
  if constexpr (V::kMomentum) store_pack<kN>(ptr.momentum_buffer + offset, b);
}

// ---------------------------------------------------------------------------------------------
// 8-bit blocks: one warp per 256 elements (host and device)
// ---------------------------------------------------------------------------------------------

// The lanes of a warp that one call of update_quant_block computes. On the device, one: the
// calling thread's, and the block maximum is a warp reduction. In the host build, all 32 in turn
// (rmsprop_block is called once per warp), and the maximum is taken over the 32 lane values the
// warp would reduce; an integer maximum is the same in any order, so both give the same bits.
struct WarpLanes {
#if defined(__CUDA_ARCH__)
  static constexpr int kCount = 1;
  int lane;  // threadIdx.x % 32
  __device__ RMSPROP_FORCE_INLINE int lane_id(int) const { return lane; }
  __device__ RMSPROP_FORCE_INLINE bool writes_scales() const { return lane == 0; }
  __device__ RMSPROP_FORCE_INLINE uint32_t max(const uint32_t (&bits)[kCount]) const {
    // Every lane of the warp gets here for every block (the loop over blocks is warp-uniform).
#if __CUDA_ARCH__ >= 800
    return __reduce_max_sync(0xFFFFFFFFu, bits[0]);
#else
    uint32_t x = bits[0];
    RMSPROP_UNROLL
    for (int d = 16; d >= 1; d /= 2) {
      const uint32_t y = __shfl_xor_sync(0xFFFFFFFFu, x, d);
      x = y > x ? y : x;
    }
    return x;
#endif
  }
#else
  static constexpr int kCount = static_cast<int>(kWarpSize);
  int lane_id(int k) const { return k; }
  bool writes_scales() const { return true; }
  uint32_t max(const uint32_t (&bits)[kCount]) const {
    uint32_t x = 0;
    for (int k = 0; k < kCount; ++k) x = bits[k] > x ? bits[k] : x;
    return x;
  }
#endif
};

// Threads of a block that one call of rmsprop_block stands for in the host build: a warp with
// 8-bit state (WarpLanes), else one. (On the device every thread calls it.)
template <class K>
constexpr int64_t host_threads_per_call() {
  return K::kQuantized ? kWarpSize : 1;
}

// One 8-bit block of `count` <= 256 elements (element `index` of the tensor is its first):
// decode the state with the old scales, update every element, store param (and grad), then
// encode the new state under the new scales, the maxima over the block. Lane l holds the
// elements j * 32 * kLanes + l * kLanes + [0, kLanes) for j < kVectors (one 16-byte vector of
// the param each: a warp's loads are 512 contiguous bytes), 8 in all. The old scales are read
// before the warp reduction and the new ones written after it by lane 0, so no lane reads a new
// scale; each lane writes only the codes it read.
template <class K>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void update_quant_block(
    const Pointers<K>& ptr, int32_t count, int64_t index, bool aligned,
    const BlockScalars<typename K::opmath_t>& bs, const WarpLanes& lanes) {
  using V = typename K::Variant;
  using PC = typename K::ParamCodec;
  using P = typename K::P;
  using quantization::AbsMax;
  constexpr int kL = K::kLanes;
  constexpr int kVectors = static_cast<int>(quantization::kQuantBlock / (kWarpSize * kL));
  constexpr int kPerLane = kVectors * kL;
  constexpr int kW = WarpLanes::kCount;
  static_assert(kVectors * kL * kWarpSize == quantization::kQuantBlock);
  const float* const unsigned_map = quantization::code_map(false);
  const float* const signed_map = quantization::code_map(true);
  const float v_scale = ptr.square_avg_scale[0];
  const float m_scale = V::kCentered ? ptr.grad_avg_scale[0] : 0.0f;
  const float b_scale = V::kMomentum ? ptr.momentum_buffer_scale[0] : 0.0f;

  float new_v[kW][kPerLane], new_m[kW][kPerLane], new_b[kW][kPerLane];
  uint32_t v_max[kW], m_max[kW], b_max[kW];
  for (int w = 0; w < kW; ++w) {
    const int lane = lanes.lane_id(w);
    AbsMax vm, mm, bm;
    RMSPROP_UNROLL
    for (int j = 0; j < kVectors; ++j) {
      const int at = (j * static_cast<int>(kWarpSize) + lane) * kL;
      const int present = count - at < kL ? (count - at > 0 ? count - at : 0) : kL;
      const bool whole = aligned && present == kL;
      P p[kL], g[kL];
      uint8_t cv[kL], cm[kL], cb[kL];
      load_elements<kL>(ptr.param + at, whole, present, p);
      load_elements<kL>(ptr.grad + at, whole, present, g);
      load_elements<kL>(ptr.square_avg + at, whole, present, cv);
      if constexpr (V::kCentered) load_elements<kL>(ptr.grad_avg + at, whole, present, cm);
      if constexpr (V::kMomentum) load_elements<kL>(ptr.momentum_buffer + at, whole, present, cb);
      RMSPROP_UNROLL
      for (int e = 0; e < kL; ++e) {
        float fp = PC::load(p[e]);
        float fg = PC::load(g[e]);
        float fv = quantization::dequantize(cv[e], v_scale, unsigned_map);
        float fm = V::kCentered ? quantization::dequantize(cm[e], m_scale, signed_map) : 0.0f;
        float fb = V::kMomentum ? quantization::dequantize(cb[e], b_scale, signed_map) : 0.0f;
        update_values<K>(fp, fg, fv, fm, fb, bs);
        p[e] = store_value<PC, K::kStochastic>(fp, bs.stochastic, bs.keys.param, index + at + e);
        if constexpr (V::kUnscaleGrad) g[e] = PC::store(fg);
        // Missing elements (past the end of a last, partial block) take no part in the maxima.
        const bool here = e < present;
        new_v[w][j * kL + e] = fv;
        vm.add(here ? fv : 0.0f);
        if constexpr (V::kCentered) {
          new_m[w][j * kL + e] = fm;
          mm.add(here ? fm : 0.0f);
        }
        if constexpr (V::kMomentum) {
          new_b[w][j * kL + e] = fb;
          bm.add(here ? fb : 0.0f);
        }
      }
      store_elements<kL>(ptr.param + at, whole, present, p);
      if constexpr (V::kUnscaleGrad) store_elements<kL>(ptr.grad + at, whole, present, g);
    }
    v_max[w] = vm.bits;
    m_max[w] = mm.bits;
    b_max[w] = bm.bits;
  }

  // The new scales: the block's largest magnitudes (a NaN if the block holds one).
  const float v_new_scale = AbsMax{lanes.max(v_max)}.scale();
  const float m_new_scale = V::kCentered ? AbsMax{lanes.max(m_max)}.scale() : 0.0f;
  const float b_new_scale = V::kMomentum ? AbsMax{lanes.max(b_max)}.scale() : 0.0f;
  if (lanes.writes_scales()) {
    ptr.square_avg_scale[0] = v_new_scale;
    if constexpr (V::kCentered) ptr.grad_avg_scale[0] = m_new_scale;
    if constexpr (V::kMomentum) ptr.momentum_buffer_scale[0] = b_new_scale;
  }

  for (int w = 0; w < kW; ++w) {
    const int lane = lanes.lane_id(w);
    RMSPROP_UNROLL
    for (int j = 0; j < kVectors; ++j) {
      const int at = (j * static_cast<int>(kWarpSize) + lane) * kL;
      const int present = count - at < kL ? (count - at > 0 ? count - at : 0) : kL;
      const bool whole = aligned && present == kL;
      uint8_t cv[kL], cm[kL], cb[kL];
      RMSPROP_UNROLL
      for (int e = 0; e < kL; ++e) {
        cv[e] = quantization::quantize(
            quantization::normalize(new_v[w][j * kL + e], v_new_scale), unsigned_map);
        if constexpr (V::kCentered) {
          cm[e] = quantization::quantize(
              quantization::normalize(new_m[w][j * kL + e], m_new_scale), signed_map);
        }
        if constexpr (V::kMomentum) {
          cb[e] = quantization::quantize(
              quantization::normalize(new_b[w][j * kL + e], b_new_scale), signed_map);
        }
      }
      store_elements<kL>(ptr.square_avg + at, whole, present, cv);
      if constexpr (V::kCentered) store_elements<kL>(ptr.grad_avg + at, whole, present, cm);
      if constexpr (V::kMomentum) store_elements<kL>(ptr.momentum_buffer + at, whole, present, cb);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One (block, thread) of a launch (host and device)
// ---------------------------------------------------------------------------------------------

// The segment whose chunks include `block`: the last s with first_chunk[s] <= block (first_chunk
// starts at 0 and strictly increases, since every segment has at least one chunk).
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE int64_t find_segment(const int32_t* first_chunk,
                                                              int64_t num_segments,
                                                              int64_t block) {
  int64_t lo = 0;
  int64_t hi = num_segments - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (first_chunk[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// What thread `thread` of block `block` (of `block_dim` threads) does in the launch `args`: the
// whole body of the update kernel. (In the host build, with 8-bit state, the whole warp that
// starts at `thread`.)
template <class Args>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void rmsprop_block(const Args& args, int64_t block,
                                                            int64_t thread, int64_t block_dim) {
  using K = typename Args::K;
  using V = typename K::Variant;
  using opmath_t = typename K::opmath_t;
  constexpr int kL = K::kLanes;
  const LaunchScalars<opmath_t>& scalars = args.scalars;

  // AMP: a step with an overflowed gradient changes nothing. The flag is read here, by every
  // thread (one cached load), not on the host: no synchronisation, and a CUDA graph replays the
  // check with whatever the flag holds at replay.
  if (scalars.found_inf != nullptr && *scalars.found_inf != 0.0f) return;
  BlockScalars<opmath_t> bs{scalars.step, false, false, {}};
  if (scalars.lr != nullptr) set_learning_rate(bs.s, *scalars.lr);
  if constexpr (V::kUnscaleGrad) bs.s.grad_scale = *scalars.grad_scale;

  const int64_t segment = find_segment(args.first_chunk, scalars.num_segments, block);
  const int64_t chunk_begin = (block - args.first_chunk[segment]) * scalars.chunk_size;
  const int64_t rest = args.numel[segment] - chunk_begin;
  // the chunk's elements, and the element of the tensor it starts at (int32: kMaxChunkSize)
  const int32_t n = static_cast<int32_t>(rest < scalars.chunk_size ? rest : scalars.chunk_size);
  const int64_t index = args.begin[segment] + chunk_begin;
  const int32_t first = static_cast<int32_t>(thread);
  const int32_t threads = static_cast<int32_t>(block_dim);

  if constexpr (V::kExtended) {
    // The rare options, read per block: the clip coefficient, and from the tensor's (already
    // incremented) step count its bias correction and rounding keys.
    if (scalars.clip_coef != nullptr) bs.s.clip_coef = *scalars.clip_coef;
    bs.stochastic = K::kStochastic && scalars.stochastic;
    bs.variance_state = K::kVarianceState && scalars.variance_state;
    if (bs.s.use_bias_correction || bs.stochastic) {
      const float step = *static_cast<const float*>(args.ptr[segment][K::kStepPointer]);
      if (bs.s.use_bias_correction) {
        bs.s.bias_correction = bias_correction_at<opmath_t>(bs.s.alpha_double, step);
      }
      if (bs.stochastic) {
        bs.keys = rounding_keys(scalars.rounding_seed, args.tensor[segment], step_count(step));
      }
    }
  }

  void* const* const p = args.ptr[segment];
  Pointers<K> ptr{};
  ptr.param = static_cast<typename K::P*>(p[0]);
  ptr.grad = static_cast<typename K::P*>(p[1]);
  ptr.square_avg = static_cast<typename K::S*>(p[2]);
  if constexpr (V::kCentered) ptr.grad_avg = static_cast<typename K::S*>(p[3]);
  if constexpr (V::kMomentum) ptr.momentum_buffer = static_cast<typename K::S*>(p[K::kDepth - 1]);
  if constexpr (K::kQuantized) {
    ptr.square_avg_scale = static_cast<float*>(p[K::kDepth]);
    if constexpr (V::kCentered) ptr.grad_avg_scale = static_cast<float*>(p[K::kDepth + 1]);
    if constexpr (V::kMomentum) {
      ptr.momentum_buffer_scale = static_cast<float*>(p[K::kDepth + K::kScales - 1]);
    }
  }
  ptr = ptr.advanced(chunk_begin);
  const bool aligned = ptr.template aligned<kL>();

  if constexpr (K::kQuantized) {
    // Warp w takes the chunk's 8-bit blocks w, w + warps, ... (the loop is warp-uniform, as the
    // reduction in update_quant_block needs).
    constexpr int32_t kBlock = static_cast<int32_t>(quantization::kQuantBlock);
    constexpr int32_t kWarp = static_cast<int32_t>(kWarpSize);
    const int32_t blocks = (n + kBlock - 1) / kBlock;
#if defined(__CUDA_ARCH__)
    const WarpLanes lanes{first % kWarp};
#else
    const WarpLanes lanes{};
#endif
    RMSPROP_ROLLED
    for (int32_t q = first / kWarp; q < blocks; q += threads / kWarp) {
      const int32_t count = n - q * kBlock < kBlock ? n - q * kBlock : kBlock;
      update_quant_block<K>(ptr.advanced(q * kBlock), count, index + q * kBlock, aligned, bs,
                            lanes);
    }
  } else {
    // Consecutive threads take consecutive vectors (a warp moves 512 contiguous bytes of the
    // param per instruction). Elements past the last whole vector, or all of them when some
    // pointer is not aligned (a view at an odd offset), go one per thread, still coalesced.
    const int32_t vector_end = aligned ? n - n % kL : 0;
    RMSPROP_ROLLED
    for (int32_t i = first * kL; i < vector_end; i += threads * kL) {
      update_elements<kL, K>(ptr, i, index + i, bs);
    }
    RMSPROP_ROLLED
    for (int32_t i = vector_end + first; i < n; i += threads) {
      update_elements<1, K>(ptr, i, index + i, bs);
    }
  }
}

// Thread `thread` of the grid of increment_steps: adds 1 to its counter unless found_inf (torch's
// `step += 1` on a float32 tensor). It runs before the update launches, on the same stream, so
// every block of every launch reads the incremented count.
template <class Args>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void increment_steps(const Args& args, int64_t thread) {
  if (thread >= args.count) return;
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
  float* const step = args.step[thread];
  *step = *step + 1.0f;
}

}  // namespace multi_tensor
}  // namespace rmsprop_fused
