// The CPU step for float16 params (cpu_kernel.h): float16, float32, bfloat16 or 8-bit state.
#include "cpu_kernel.h"

namespace rmsprop_fused {
namespace cpu {

template <>
void run_param_dtype<c10::Half>(const StepArgs& args, const StepScalars<float>& scalars) {
  switch (args.lists.square_avgs[0].scalar_type()) {
    case at::kHalf: return run_pair<c10::Half, c10::Half>(args, scalars);
    case at::kFloat: return run_pair<c10::Half, float>(args, scalars);
    case at::kBFloat16: return run_pair<c10::Half, c10::BFloat16>(args, scalars);
    case at::kByte: return run_pair<c10::Half, Blockwise8>(args, scalars);
    default: TORCH_INTERNAL_ASSERT(false, "rmsprop_fused: unchecked state dtype");
  }
}

}  // namespace cpu
}  // namespace rmsprop_fused
