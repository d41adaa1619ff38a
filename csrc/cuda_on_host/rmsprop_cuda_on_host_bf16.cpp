// The host build of the CUDA update kernels for bfloat16 params (host_launch.h).
#include "host_launch.h"

namespace rmsprop_fused {
namespace multi_tensor {

template <>
void launch_param_dtype_on_host<c10::BFloat16>(const Call& call, int64_t block_dim) {
  launch_updates<c10::BFloat16>(call, HostUpdateLauncher{block_dim});
}

}  // namespace multi_tensor
}  // namespace rmsprop_fused
