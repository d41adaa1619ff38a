// The CUDA implementation of rmsprop_fused::rmsprop_: every tensor of a (device, dtype, state
// dtype) group in as few launches as the kernel-parameter budget allows (one for GPT-2 small at
// every depth with the 32 KB budget; see max_segments_per_launch), after one small launch that
// counts the step. The kernels' logic is in multi_tensor_kernel.h and the host side in
// multi_tensor_op.h, both shared with the host build that the tests run without a GPU; this file
// adds only what needs CUDA: the device guard, the stream, the driver's parameter budget, and the
// step counters' launcher. The update kernels are instantiated per param dtype in
// rmsprop_cuda_<dtype>.cu.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../rmsprop_op.h"
#include "cuda_launch.cuh"

namespace rmsprop_fused {
namespace {

// Whether a launch on `device`, on `stream`, may pass 32,764 bytes of parameters: the kernels
// were built by CUDA >= 12.1 (else only the 4 KB ones exist), the driver is of CUDA >= 12.1 (an
// older one, which a 12.x build meets through minor-version compatibility, refuses the launch),
// the GPU is Volta or newer, and no CUDA graph is being captured on the stream: the conditions of
// torch's at::native::supports_large_kernel_arg (ATen/native/cuda/MultiTensorApply.cpp). The
// last one keeps graphs away from kernel nodes of more than 4 KB of parameters, which some CUDA
// releases mishandle (openxla/xla#19252: cudaGraphAddKernelNode crashes on them); so captured
// steps run the 4 KB kernels, which exist in every variant the 32 KB ones do.
bool large_kernel_params_supported(c10::DeviceIndex device, cudaStream_t stream) {
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
  static const bool driver_supports = [] {
    int driver = 0;
    C10_CUDA_CHECK(cudaDriverGetVersion(&driver));
    return driver >= 12010;
  }();
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  return driver_supports && major >= 7 && capture == cudaStreamCaptureStatusNone;
#else
  (void)device;
  (void)stream;
  return false;
#endif
}

void rmsprop_cuda(const StepArgs& step) {
  check_op_args(step, c10::DeviceType::CUDA);
  if (step.lists.params.empty()) return;

  // The kernels run on the params' GPU, in the order of that GPU's current stream (the one a
  // CUDA graph capture or a user's `with torch.cuda.stream(...)` set).
  const c10::cuda::CUDAGuard device_guard(step.lists.params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t param_bytes = large_kernel_params_supported(step.lists.params[0].get_device(), stream)
                                  ? multi_tensor::kLargeKernelParamBytes
                                  : multi_tensor::kSmallKernelParamBytes;
  multi_tensor::rmsprop_multi_tensor(
      step, param_bytes,
      multi_tensor::production_limits(multi_tensor::call_pointers(step.lists), param_bytes),
      [stream](const auto& args, int64_t num_blocks) {
        using Args = std::decay_t<decltype(args)>;
        multi_tensor::step_counter_kernel<Args>
            <<<static_cast<unsigned int>(num_blocks), multi_tensor::kStepCounterBlockDim, 0,
               stream>>>(args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      [stream](auto tag, const multi_tensor::Call& call) {
        multi_tensor::launch_param_dtype<typename decltype(tag)::type>(call, stream);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(rmsprop_fused, CUDA, m) { m.impl("rmsprop_", &op_entry<&rmsprop_cuda>); }

}  // namespace rmsprop_fused
