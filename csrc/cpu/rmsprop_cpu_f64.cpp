// The CPU step for float64 params (cpu_kernel.h): float64 state only.
#include "cpu_kernel.h"

namespace rmsprop_fused {
namespace cpu {

template <>
void run_param_dtype<double>(const StepArgs& args, const StepScalars<double>& scalars) {
  run_pair<double, double>(args, scalars);
}

}  // namespace cpu
}  // namespace rmsprop_fused
