// The host build's "launch": every block of the grid, and every thread of a block, one after
// another (for 8-bit state one call per warp, which computes the warp's 32 lanes: WarpLanes in
// multi_tensor_kernel.h). The kernels have no shared memory and no barriers, so this order
// computes what the GPU's grid computes (docs/DESIGN.md section 3.4).
#pragma once

#include <cstdint>

#include "../cuda/multi_tensor_kernel.h"
#include "../cuda/multi_tensor_op.h"

namespace rmsprop_fused {
namespace multi_tensor {

struct HostUpdateLauncher {
  int64_t block_dim;
  template <class Args>
  void operator()(const Args& args, int64_t num_blocks) const {
    constexpr int64_t kStep = host_threads_per_call<typename Args::K>();
    for (int64_t block = 0; block < num_blocks; ++block) {
      for (int64_t thread = 0; thread < block_dim; thread += kStep) {
        rmsprop_block(args, block, thread, block_dim);
      }
    }
  }
};

// The update launches of a call whose params are param_t: defined in
// rmsprop_cuda_on_host_<dtype>.cpp, one translation unit each, as the CUDA op's are.
template <typename param_t>
void launch_param_dtype_on_host(const Call& call, int64_t block_dim);
template <>
void launch_param_dtype_on_host<double>(const Call& call, int64_t block_dim);
template <>
void launch_param_dtype_on_host<float>(const Call& call, int64_t block_dim);
template <>
void launch_param_dtype_on_host<c10::Half>(const Call& call, int64_t block_dim);
template <>
void launch_param_dtype_on_host<c10::BFloat16>(const Call& call, int64_t block_dim);

}  // namespace multi_tensor
}  // namespace rmsprop_fused
