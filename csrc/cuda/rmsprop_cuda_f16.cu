// The CUDA update kernels for float16 params: float16, float32, bfloat16 or 8-bit state (cuda_launch.cuh).
#include "cuda_launch.cuh"

namespace rmsprop_fused {
namespace multi_tensor {

template <>
void launch_param_dtype<c10::Half>(const Call& call, cudaStream_t stream) {
  launch_updates<c10::Half>(call, UpdateLauncher{stream});
}

}  // namespace multi_tensor
}  // namespace rmsprop_fused
