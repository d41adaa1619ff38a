// The CPU step for bfloat16 params (cpu_kernel.h): bfloat16, float32 or 8-bit state.
#include "cpu_kernel.h"

namespace rmsprop_fused {
namespace cpu {

template <>
void run_param_dtype<c10::BFloat16>(const StepArgs& args, const StepScalars<float>& scalars) {
  switch (args.lists.square_avgs[0].scalar_type()) {
    case at::kBFloat16: return run_pair<c10::BFloat16, c10::BFloat16>(args, scalars);
    case at::kFloat: return run_pair<c10::BFloat16, float>(args, scalars);
    case at::kByte: return run_pair<c10::BFloat16, Blockwise8>(args, scalars);
    default: TORCH_INTERNAL_ASSERT(false, "rmsprop_fused: unchecked state dtype");
  }
}

}  // namespace cpu
}  // namespace rmsprop_fused
