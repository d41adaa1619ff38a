// The CUDA update kernels for float64 params: float64 state (cuda_launch.cuh).
#include "cuda_launch.cuh"

namespace rmsprop_fused {
namespace multi_tensor {

template <>
void launch_param_dtype<double>(const Call& call, cudaStream_t stream) {
  launch_updates<double>(call, UpdateLauncher{stream});
}

}  // namespace multi_tensor
}  // namespace rmsprop_fused
