// The multi-tensor CUDA kernel's own logic, written once for two compilers:
//   nvcc  (csrc/cuda/rmsprop_cuda.cu)  the __global__ kernel calls rmsprop_block with
//                                      blockIdx.x, threadIdx.x and blockDim.x;
//   g++   (csrc/cuda_on_host/)          a host loop calls rmsprop_block for every block index and
//                                      every thread index of every launch.
// The kernel uses no shared memory, no barriers and no warp intrinsics, and the threads of a launch
// write disjoint elements, so any order of the (block, thread) calls, the sequential host order
// included, computes exactly what the grid computes (docs/DESIGN.md section 3.4). The tests drive the
// host build through every path below: launch planning, the block-to-segment search, the 16-byte
// vector path, the scalar path and tail, and the dtype conversions.
//
// Shape of a step:
//   host    plan_launches() cuts the tensors into segments (a whole tensor, or the part of one
//           that fits in a launch) and groups them into launches; each launch's LaunchArgs (the
//           segments' pointers, sizes and first chunk, plus the step's scalars) is passed by
//           value.
//   device  one block per chunk of kChunkSize elements. Block b finds its segment by binary search
//           over the segments' first chunk, then walks the chunk: 16-byte vectors when all of the
//           chunk's pointers are 16-byte aligned, scalars otherwise and for the tail.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../rmsprop_update.h"

// Loops over the tensors of a segment (3 to 5) and over the lanes of a vector must be unrolled
// on the device: a runtime index into a per-thread array would put the array in local memory.
// tests/test_cuda_sass.py checks the compiled kernels for local-memory traffic.
#if defined(__CUDACC__)
#define RMSPROP_UNROLL _Pragma("unroll")
#else
#define RMSPROP_UNROLL _Pragma("GCC unroll 8")
#endif

namespace rmsprop_fused {
namespace multi_tensor {

// ---------------------------------------------------------------------------------------------
// Capacities
// ---------------------------------------------------------------------------------------------

// Elements per chunk (one block). A chunk holds 16384 x 20 bytes = 320 KiB of traffic for fp32
// without momentum, so the per-block fixed cost (the segment search, reading found_inf and lr) is
// amortised, while GPT-2 small (124M elements) still makes 7,686 blocks: 10 to 19 times what an
// H100 holds at once (132 SMs x 3 to 6 blocks, as registers allow), so the last, partly idle wave
// is a small part of the step. torch's 65,536 (MultiTensorApply.cuh) makes 1,995 blocks, 3 to 5
// waves. 16384 elements are a whole number of 16-byte vectors in every dtype, so every chunk of a
// 16-byte aligned tensor starts 16-byte aligned, also where a tensor is split between launches.
constexpr int64_t kChunkSize = 16384;

// Threads per block. The kernels take 37 to 72 registers a thread (fp32 plain to 16-bit centered
// with momentum; no spills), so an SM holds 3 to 6 blocks of 256 threads, each thread with one
// 16-byte load per tensor in flight: 60 to 72 KB per SM, about three times the ~20 KB that an
// H100's bandwidth x latency asks of each SM (3.35 TB/s / 132 SMs x ~800 ns), so the loop needs no
// unrolling and the block size no tuning beyond the customary 256.
constexpr int64_t kBlockDim = 256;

// gridDim.x is at most 2^31 - 1, so a launch has at most that many chunks (which also keeps the
// segments' first chunk, stored as int32_t, in range).
constexpr int64_t kMaxChunksPerLaunch = std::numeric_limits<int32_t>::max();

// Bytes moved by one vector load or store per tensor: LDG.E.128 / STG.E.128.
constexpr int64_t kVectorBytes = 16;

// Kernel parameters live in a constant bank of at most 4,096 bytes before CUDA 12.1 and 32,764
// bytes from CUDA 12.1 on (Volta and newer, driver R530 or newer; an older driver refuses the
// launch with an error, which C10_CUDA_KERNEL_LAUNCH_CHECK reports). The host build has no
// CUDA toolkit version to ask and mirrors a CUDA >= 12.1 build, the only kind current torch
// releases are built with.
constexpr int64_t kLargeKernelParamBytes = 32764;
constexpr int64_t kSmallKernelParamBytes = 4096;
#if defined(__CUDACC__) && defined(CUDART_VERSION) && CUDART_VERSION < 12010
constexpr int64_t kKernelParamBytes = kSmallKernelParamBytes;
#else
constexpr int64_t kKernelParamBytes = kLargeKernelParamBytes;
#endif

// ---------------------------------------------------------------------------------------------
// The kernel's one parameter
// ---------------------------------------------------------------------------------------------

// Everything of a launch that is not per segment.
template <typename opmath_t>
struct LaunchScalars {
  StepScalars<opmath_t> step;  // from make_step_scalars on the host
  const opmath_t* lr;          // nullptr: step.lr; else read on the device (capturable lr)
  const opmath_t* grad_scale;  // nullptr: grads are not scaled; else divided by *grad_scale
  const float* found_inf;      // nullptr: never skip; else any nonzero value skips the step
  int64_t chunk_size;
  int64_t num_segments;
};

// One launch: up to kMaxSegments segments, each `numel` elements starting at `ptr[s][d]` in the
// d-th tensor list (params, grads, square_avgs, then grad_avgs if centered, then momentum_buffers
// if momentum), whose chunks are blocks first_chunk[s] .. first_chunk[s + 1] - 1.
//
// Layout: the arrays are ordered by alignment (8-byte, 8-byte, 4-byte) so the struct has no
// padding inside. The binary search reads only first_chunk, 4 bytes a segment, so the search of
// 900 segments touches 3.6 KB of the constant bank, not the whole 32 KB; a block then reads its
// one segment's numel and pointers.
template <typename scalar_t, bool kCentered_, bool kMomentum_, int64_t kMaxSegments_>
struct LaunchArgs {
  using scalar_type = scalar_t;
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr bool kCentered = kCentered_;
  static constexpr bool kMomentum = kMomentum_;
  static constexpr int kDepth = 3 + (kCentered ? 1 : 0) + (kMomentum ? 1 : 0);
  static constexpr int64_t kMaxSegments = kMaxSegments_;

  LaunchScalars<opmath_t> scalars;
  int64_t numel[kMaxSegments];
  scalar_t* ptr[kMaxSegments][kDepth];
  int32_t first_chunk[kMaxSegments];
};

// How many segments fit in a kernel-parameter budget of `param_bytes` bytes with `depth` tensor
// lists. The fixed part is counted as LaunchScalars<double> (the larger one), so every dtype gets
// the same capacity and the same launch count. sizeof(LaunchArgs) is a multiple of 8 (it holds
// pointers), hence the budget rounded down to a multiple of 8.
//
// With 32,764 bytes: depth 3 -> 906 segments, depth 4 -> 741, depth 5 -> 627; with 4,096 bytes:
// 110, 90, 76. GPT-2 small's 148 tensors (124M elements, 7,686 chunks) therefore take ONE launch
// at depth 3, 4 and 5 with CUDA >= 12.1, and TWO at each depth with the 4 KB limit; the chunk
// limit (2^31 - 1) never binds. tests/test_cuda_kernel_on_host.py asserts these counts.
constexpr int64_t max_segments_per_launch(int64_t depth, int64_t param_bytes) {
  return (param_bytes / 8 * 8 - static_cast<int64_t>(sizeof(LaunchScalars<double>))) /
         static_cast<int64_t>(sizeof(int64_t) + depth * sizeof(void*) + sizeof(int32_t));
}

template <typename scalar_t, bool kCentered, bool kMomentum>
using ProductionLaunchArgs =
    LaunchArgs<scalar_t, kCentered, kMomentum,
               max_segments_per_launch(3 + kCentered + kMomentum, kKernelParamBytes)>;

// The capacity formula holds for both budgets, every depth and both opmath types.
template <int64_t kParamBytes, bool kCentered, bool kMomentum>
constexpr bool fits_budget() {
  constexpr int64_t kSegments = max_segments_per_launch(3 + kCentered + kMomentum, kParamBytes);
  return sizeof(LaunchArgs<double, kCentered, kMomentum, kSegments>) <= kParamBytes &&
         sizeof(LaunchArgs<float, kCentered, kMomentum, kSegments>) <= kParamBytes &&
         sizeof(LaunchArgs<double, kCentered, kMomentum, kSegments + 1>) > kParamBytes;
}
static_assert(fits_budget<kLargeKernelParamBytes, false, false>() &&
                  fits_budget<kLargeKernelParamBytes, true, false>() &&
                  fits_budget<kLargeKernelParamBytes, true, true>() &&
                  fits_budget<kSmallKernelParamBytes, false, false>() &&
                  fits_budget<kSmallKernelParamBytes, true, false>() &&
                  fits_budget<kSmallKernelParamBytes, true, true>(),
              "max_segments_per_launch must be the largest count that fits the parameter budget");

// ---------------------------------------------------------------------------------------------
// Launch planning (host only)
// ---------------------------------------------------------------------------------------------

struct LaunchLimits {
  int64_t max_tensors_per_launch;  // segments per launch: a split tensor counts in both launches
  int64_t max_chunks_per_launch;
  int64_t chunk_size;
};

// The CUDA op's limits: the segments its parameter budget holds, the grid limit, kChunkSize.
inline LaunchLimits production_limits(int64_t depth, int64_t param_bytes = kKernelParamBytes) {
  return {max_segments_per_launch(depth, param_bytes), kMaxChunksPerLaunch, kChunkSize};
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
// chunks keep their alignment). Empty tensors get no segment. Every launch but the last is full,
// in segments or in chunks.
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
// One (block, thread) of a launch (host and device)
// ---------------------------------------------------------------------------------------------

// kLanes elements of one tensor, moved by a single load or store of kLanes * sizeof(T) bytes
// (16 for the vector path, so nvcc emits LDG.E.128 / STG.E.128).
template <typename T, int kLanes>
struct alignas(sizeof(T) * kLanes) Vector {
  T lane[kLanes];
};

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

// Loads kLanes consecutive elements at `offset` of every tensor, updates them in opmath, and
// stores them back. kLanes = 1 is the scalar path. The grad is stored only when it was unscaled;
// the other tensors always change.
template <int kLanes, typename Args, bool kUnscaleGrad>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void update_lanes(
    typename Args::scalar_type* const (&ptr)[Args::kDepth], int64_t offset,
    const StepScalars<typename Args::opmath_t>& s) {
  using scalar_t = typename Args::scalar_type;
  using opmath_t = typename Args::opmath_t;
  using V = Vector<scalar_t, kLanes>;
  constexpr int kGrad = 1;
  constexpr int kGradAvg = 3;                                // present when centered
  constexpr int kMomentumBuffer = Args::kCentered ? 4 : 3;  // present when momentum

  // The casts read and write scalar_t objects through an aggregate of scalar_t, the pattern of
  // torch's aligned_vector; the caller guarantees the alignment of V. x86 tolerates a misaligned
  // vector access where the GPU faults, so the host build checks the alignment itself: the tests
  // then catch a wrong choice of path.
  V x[Args::kDepth];
  RMSPROP_UNROLL
  for (int d = 0; d < Args::kDepth; ++d) {
#if !defined(__CUDA_ARCH__)
    TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(ptr[d] + offset) % alignof(V) == 0,
                          "rmsprop_fused: misaligned ", sizeof(V), "-byte access");
#endif
    x[d] = *reinterpret_cast<const V*>(ptr[d] + offset);
  }

  RMSPROP_UNROLL
  for (int i = 0; i < kLanes; ++i) {
    opmath_t p = static_cast<opmath_t>(x[0].lane[i]);
    opmath_t g = static_cast<opmath_t>(x[kGrad].lane[i]);
    opmath_t v = static_cast<opmath_t>(x[2].lane[i]);
    opmath_t m = opmath_t(0);
    opmath_t b = opmath_t(0);
    if constexpr (Args::kCentered) m = static_cast<opmath_t>(x[kGradAvg].lane[i]);
    if constexpr (Args::kMomentum) b = static_cast<opmath_t>(x[kMomentumBuffer].lane[i]);
    rmsprop_update<UpdateVariant<Args::kCentered, Args::kMomentum, kUnscaleGrad, true>>(p, g, v, m, b,
                                                                                       s);
    x[0].lane[i] = static_cast<scalar_t>(p);
    x[kGrad].lane[i] = static_cast<scalar_t>(g);
    x[2].lane[i] = static_cast<scalar_t>(v);
    if constexpr (Args::kCentered) x[kGradAvg].lane[i] = static_cast<scalar_t>(m);
    if constexpr (Args::kMomentum) x[kMomentumBuffer].lane[i] = static_cast<scalar_t>(b);
  }

  RMSPROP_UNROLL
  for (int d = 0; d < Args::kDepth; ++d) {
    if (d != kGrad || kUnscaleGrad) *reinterpret_cast<V*>(ptr[d] + offset) = x[d];
  }
}

// What thread `thread` of block `block` (of `block_dim` threads) does in the launch `args`: the
// whole body of the __global__ kernel.
template <typename Args>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void rmsprop_block(const Args& args, int64_t block,
                                                            int64_t thread, int64_t block_dim) {
  using scalar_t = typename Args::scalar_type;
  using opmath_t = typename Args::opmath_t;
  constexpr int kLanes = static_cast<int>(kVectorBytes / sizeof(scalar_t));
  const LaunchScalars<opmath_t>& scalars = args.scalars;

  // AMP: a step with an overflowed gradient changes nothing. The flag is read here, by every
  // thread (one cached load), not on the host: no synchronisation, and a CUDA graph replays the
  // check with whatever the flag holds at replay.
  if (scalars.found_inf != nullptr && *scalars.found_inf != 0.0f) return;
  StepScalars<opmath_t> s = scalars.step;
  if (scalars.lr != nullptr) set_learning_rate(s, *scalars.lr);
  const bool unscale_grad = scalars.grad_scale != nullptr;
  if (unscale_grad) s.grad_scale = *scalars.grad_scale;

  const int64_t segment = find_segment(args.first_chunk, scalars.num_segments, block);
  const int64_t chunk_begin = (block - args.first_chunk[segment]) * scalars.chunk_size;
  const int64_t rest = args.numel[segment] - chunk_begin;
  const int64_t n = rest < scalars.chunk_size ? rest : scalars.chunk_size;

  scalar_t* ptr[Args::kDepth];
  bool aligned = true;
  RMSPROP_UNROLL
  for (int d = 0; d < Args::kDepth; ++d) {
    ptr[d] = args.ptr[segment][d] + chunk_begin;
    aligned = aligned && reinterpret_cast<uintptr_t>(ptr[d]) % kVectorBytes == 0;
  }

  // Consecutive threads take consecutive vectors (a warp moves 512 contiguous bytes per tensor
  // per instruction). Elements past the last whole vector, or all of them when some pointer is
  // not 16-byte aligned (a view at an odd offset), go one per thread, still coalesced.
  const int64_t vector_end = aligned ? n - n % kLanes : 0;
  if (unscale_grad) {
    for (int64_t i = thread * kLanes; i < vector_end; i += block_dim * kLanes) {
      update_lanes<kLanes, Args, true>(ptr, i, s);
    }
    for (int64_t i = vector_end + thread; i < n; i += block_dim) {
      update_lanes<1, Args, true>(ptr, i, s);
    }
  } else {
    for (int64_t i = thread * kLanes; i < vector_end; i += block_dim * kLanes) {
      update_lanes<kLanes, Args, false>(ptr, i, s);
    }
    for (int64_t i = vector_end + thread; i < n; i += block_dim) {
      update_lanes<1, Args, false>(ptr, i, s);
    }
  }
}

}  // namespace multi_tensor
}  // namespace rmsprop_fused
