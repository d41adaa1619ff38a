// The CUDA update kernels for bfloat16 params: bfloat16, float32 or 8-bit state (cuda_launch.cuh).
#include "cuda_launch.cuh"

namespace rmsprop_fused {
namespace multi_tensor {

template <>
void launch_param_dtype<c10::BFloat16>(const Call& call, cudaStream_t stream) {
  launch_updates<c10::BFloat16>(call, UpdateLauncher{stream});
}

}  // namespace multi_tensor
}  // namespace rmsprop_fused
