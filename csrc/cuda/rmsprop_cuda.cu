// The CUDA implementation of rmsprop_fused::rmsprop_: every tensor of a (device, dtype) group in
// as few launches as the kernel-parameter limit allows (one for GPT-2 small at every depth; see
// max_segments_per_launch). The kernel's logic is in multi_tensor_kernel.h and the host side in
// multi_tensor_op.h, both shared with the host build that the tests run without a GPU; this file
// adds only what needs CUDA: the __global__ entry point, the device guard, the stream and the
// launch check.
//
// Built with --fmad=false (setup.py) and IEEE division and square root (nvcc's defaults without
// --use_fast_math), so the kernel rounds exactly where the host build and the CPU kernel do.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>

#include "../rmsprop_op.h"
#include "multi_tensor_kernel.h"
#include "multi_tensor_op.h"

// The kernel takes the address of its by-value parameter and indexes it at run time (the segment
// search). __grid_constant__ (CUDA 11.7+, sm_70+) declares the parameter read-only, so it is read
// in place, in the constant bank where the launch put it. Without the annotation the compiler may
// copy a parameter whose address is taken (up to 32 KB here) to local memory, and older nvcc
// releases do; nvcc 13 happens not to for this kernel, and the annotation makes that a guarantee.
// tests/test_cuda_sass.py checks that no kernel touches local memory.
#if defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 11 || (__CUDACC_VER_MAJOR__ == 11 && __CUDACC_VER_MINOR__ >= 7))
#define RMSPROP_GRID_CONSTANT __grid_constant__
#else
#define RMSPROP_GRID_CONSTANT
#endif

namespace rmsprop_fused {
namespace {

template <typename Args>
__global__ void __launch_bounds__(multi_tensor::kBlockDim)
    rmsprop_multi_tensor_kernel(const RMSPROP_GRID_CONSTANT Args args) {
  multi_tensor::rmsprop_block(args, blockIdx.x, threadIdx.x, blockDim.x);
}

void rmsprop_cuda(const StepArgs& step) {
  check_op_args(step, c10::DeviceType::CUDA);
  if (step.lists.params.empty()) return;

  // The kernel runs on the params' GPU, in the order of that GPU's current stream (the one a
  // CUDA graph capture or a user's `with torch.cuda.stream(...)` set).
  const c10::cuda::CUDAGuard device_guard(step.lists.params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  multi_tensor::rmsprop_multi_tensor(
      step, multi_tensor::production_limits(step.lists.depth()),
      [stream](const auto& args, int64_t num_blocks) {
        using Args = std::decay_t<decltype(args)>;
        static_assert(sizeof(Args) <= multi_tensor::kKernelParamBytes,
                      "the launch metadata must fit the kernel-parameter limit");
        // num_blocks <= kMaxChunksPerLaunch = 2^31 - 1, the limit of gridDim.x.
        rmsprop_multi_tensor_kernel<Args>
            <<<static_cast<unsigned int>(num_blocks), multi_tensor::kBlockDim, 0, stream>>>(args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(rmsprop_fused, CUDA, m) { m.impl("rmsprop_", &op_entry<&rmsprop_cuda>); }

}  // namespace rmsprop_fused
