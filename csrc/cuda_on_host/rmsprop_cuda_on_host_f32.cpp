// The host build of the CUDA update kernels for float32 params (host_launch.h).
#include "host_launch.h"

namespace rmsprop_fused {
namespace multi_tensor {

template <>
void launch_param_dtype_on_host<float>(const Call& call, int64_t block_dim) {
  launch_updates<float>(call, HostUpdateLauncher{block_dim});
}

}  // namespace multi_tensor
}  // namespace rmsprop_fused
