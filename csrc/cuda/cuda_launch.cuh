// The __global__ kernels and their launchers, shared by the CUDA translation units: the op
// (rmsprop_cuda.cu: checks, step counters, the parameter budget) and one per param dtype
// (rmsprop_cuda_<dtype>.cu: the update kernels of its state dtypes, compiled in parallel). The
// kernels' bodies are multi_tensor_kernel.h, shared with the host build.
//
// Built with --fmad=false (setup.py) and IEEE division and square root (nvcc's defaults without
// --use_fast_math), so the kernels round exactly where the host build and the CPU kernel do.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "multi_tensor_kernel.h"
#include "multi_tensor_op.h"

// The kernels take the address of their by-value parameter and index it at run time (the segment
// search, a segment's pointers). __grid_constant__ (CUDA 11.7+, sm_70+) declares the parameter
// read-only, so it is read in place, in the constant bank where the launch put it. Without the
// annotation the compiler may copy a parameter whose address is taken (up to 32 KB here) to local
// memory, and older nvcc releases do. tests/test_cuda_sass.py checks that no kernel touches local
// memory.
#if defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 11 || (__CUDACC_VER_MAJOR__ == 11 && __CUDACC_VER_MINOR__ >= 7))
#define RMSPROP_GRID_CONSTANT __grid_constant__
#else
#define RMSPROP_GRID_CONSTANT
#endif

namespace rmsprop_fused {
namespace multi_tensor {

// At least two blocks of kBlockDim threads an SM (kMinBlocksPerSM), so at most 128 registers a
// thread. Without a minimum, ptxas held some kernels to 40, 64 or 80 registers (a step of
// occupancy) and spilled a few bytes to local memory to get there; with it, none spills, and two
// blocks still keep enough loads in flight (see kBlockDim).
template <class Args>
__global__ void __launch_bounds__(kBlockDim, kMinBlocksPerSM)
    rmsprop_multi_tensor_kernel(const RMSPROP_GRID_CONSTANT Args args) {
  rmsprop_block(args, blockIdx.x, threadIdx.x, blockDim.x);
}

template <class Args>
__global__ void __launch_bounds__(kStepCounterBlockDim)
    step_counter_kernel(const RMSPROP_GRID_CONSTANT Args args) {
  increment_steps(args, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
}

// Enqueues a launch of the update kernel (launch_updates' `launch`) on `stream`.
struct UpdateLauncher {
  cudaStream_t stream;
  template <class Args>
  void operator()(const Args& args, int64_t num_blocks) const {
    static_assert(sizeof(Args) <= kLargeKernelParamBytes,
                  "the launch metadata must fit the kernel-parameter limit");
    // num_blocks <= kMaxChunksPerLaunch = 2^31 - 1, the limit of gridDim.x.
    rmsprop_multi_tensor_kernel<Args>
        <<<static_cast<unsigned int>(num_blocks), kBlockDim, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The update launches of a call whose params are param_t: defined in rmsprop_cuda_<dtype>.cu.
template <typename param_t>
void launch_param_dtype(const Call& call, cudaStream_t stream);
template <>
void launch_param_dtype<double>(const Call& call, cudaStream_t stream);
template <>
void launch_param_dtype<float>(const Call& call, cudaStream_t stream);
template <>
void launch_param_dtype<c10::Half>(const Call& call, cudaStream_t stream);
template <>
void launch_param_dtype<c10::BFloat16>(const Call& call, cudaStream_t stream);

}  // namespace multi_tensor
}  // namespace rmsprop_fused
