// The CPU implementation of rmsprop_fused::rmsprop_: checks, the AMP skip, the step counters, the
// step's scalars, then the kernel of the params' dtype (cpu_kernel.h, instantiated per dtype in
// rmsprop_cpu_<dtype>.cpp).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../rmsprop_op.h"
#include "../rmsprop_update.h"
#include "cpu_kernel.h"

namespace rmsprop_fused {
namespace {

void rmsprop_cpu(const StepArgs& args) {
  check_op_args(args, c10::DeviceType::CPU);
  const TensorLists& lists = args.lists;
  const Hyperparameters& h = args.hyper;
  if (lists.params.empty()) return;
  // Any nonzero found_inf (GradScaler sums the flags of several devices) skips the whole step,
  // step counters included.
  if (args.found_inf.has_value() && args.found_inf->item<double>() != 0.0) return;
  for (const at::Tensor& step : lists.state_steps) {
    float* count = static_cast<float*>(step.data_ptr());
    *count = *count + 1.0f;  // torch's step += 1 on a float32 tensor
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lists.params[0].scalar_type(),
                                  "rmsprop_fused_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto scalars = make_step_scalars<opmath_t>(
        h.lr, h.alpha, h.eps, h.weight_decay, h.momentum, h.maximize, h.eps_in_sqrt,
        h.lr_in_momentum, h.decoupled_weight_decay, h.nesterov, h.bias_correction,
        args.clip_coef.has_value());
    if (args.lr_tensor.has_value()) {
      set_learning_rate(scalars, static_cast<opmath_t>(args.lr_tensor->item<double>()));
    }
    if (args.grad_scale.has_value()) {
      scalars.grad_scale = static_cast<opmath_t>(args.grad_scale->item<double>());
    }
    if (args.clip_coef.has_value()) {
      scalars.clip_coef = static_cast<opmath_t>(args.clip_coef->item<double>());
    }
    cpu::run_param_dtype<scalar_t>(args, scalars);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rmsprop_fused, CPU, m) { m.impl("rmsprop_", &op_entry<&rmsprop_cpu>); }

}  // namespace rmsprop_fused
