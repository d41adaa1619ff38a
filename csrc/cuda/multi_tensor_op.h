// From the op's arguments to the launches: the host side of the multi-tensor kernel, shared by
// the CUDA op (rmsprop_cuda.cu, whose launcher enqueues the kernel) and the host build of the
// kernel (csrc/cuda_on_host/, whose launcher runs every block and thread in a loop). The dtype and
// option dispatch, the scalar tensors, the plan and every launch's LaunchArgs are therefore the
// same code in production and in the tests.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "../rmsprop_op.h"
#include "../rmsprop_update.h"
#include "multi_tensor_kernel.h"

namespace rmsprop_fused {
namespace multi_tensor {

// Calls f(std::bool_constant<centered>{}, std::bool_constant<momentum>{}), so that each option
// combination is one instantiation of the kernel, with the unused tensor lists compiled out.
template <typename F>
void dispatch_options(bool centered, bool momentum, F&& f) {
  if (centered && momentum) {
    f(std::true_type{}, std::true_type{});
  } else if (centered) {
    f(std::true_type{}, std::false_type{});
  } else if (momentum) {
    f(std::false_type{}, std::true_type{});
  } else {
    f(std::false_type{}, std::false_type{});
  }
}

// found_inf as the kernel reads it, float32. GradScaler's float32 flag is used as it is; a flag of
// another dtype becomes (found_inf != 0) as float32 on its device, so that a nonzero float64 flag
// too small for float32 still skips the step.
inline at::Tensor found_inf_as_float(const at::Tensor& found_inf) {
  return found_inf.scalar_type() == at::kFloat ? found_inf : found_inf.ne(0).to(at::kFloat);
}

// Runs one step over lists that passed check_op_args, in as few launches as `limits` allow;
// returns the number of launches. `launch(args, num_blocks)` is called once per launch, in order,
// with a ProductionLaunchArgs (by const reference) and its grid size.
//
// Nothing here waits for the device: lr_tensor and grad_scale are converted to the opmath dtype
// (and found_inf to float32) by device ops on the current stream when their dtype differs (.to()
// returns the tensor itself when it does not), and the kernel reads them. The converted tensors
// are freed after the launches are enqueued; the caching allocator hands their memory to later
// work on the same stream only, which runs after the kernels.
template <typename Launcher>
int64_t rmsprop_multi_tensor(const StepArgs& step_args, const LaunchLimits& limits,
                             Launcher&& launch) {
  const TensorLists& lists = step_args.lists;
  const Hyperparameters& h = step_args.hyper;
  const std::optional<at::Tensor>& lr_tensor = step_args.lr_tensor;
  const std::optional<at::Tensor>& grad_scale = step_args.grad_scale;
  const std::optional<at::Tensor>& found_inf = step_args.found_inf;
  // Interim: the options below are being ported to this kernel.
  TORCH_CHECK(lists.square_avgs.empty() ||
                  lists.square_avgs[0].scalar_type() == lists.params[0].scalar_type(),
              "rmsprop_fused: the CUDA kernel keeps state in the params' dtype (for now)");
  TORCH_CHECK(!h.bias_correction && !h.rounding_seed.has_value() && !h.variance_state &&
                  !step_args.clip_coef.has_value(),
              "rmsprop_fused: the CUDA kernel does not have bias_correction, stochastic rounding, "
              "variance_state and clip_coef yet");
  if (lists.counts_steps() && !lists.params.empty()) {
    if (found_inf.has_value()) {
      at::_foreach_add_(lists.state_steps, found_inf->eq(0).to(at::kFloat));
    } else {
      at::_foreach_add_(lists.state_steps, 1.0);
    }
  }
  std::vector<int64_t> numels;
  numels.reserve(lists.params.size());
  for (const at::Tensor& p : lists.params) numels.push_back(p.numel());
  const std::vector<Launch> plan = plan_launches(numels, limits);
  if (plan.empty()) return 0;  // no tensor has an element

  // The lists in the order of LaunchArgs::ptr: params, grads, square_avgs, [grad_avgs],
  // [momentum_buffers].
  std::vector<at::TensorList> tensor_lists{lists.params, lists.grads, lists.square_avgs};
  if (lists.centered()) tensor_lists.push_back(lists.grad_avgs);
  if (lists.has_momentum()) tensor_lists.push_back(lists.momentum_buffers);

  const at::ScalarType dtype = lists.params[0].scalar_type();
  const at::ScalarType opmath = at::toOpMathType(dtype);
  const std::optional<at::Tensor> device_lr =
      lr_tensor.has_value() ? std::optional<at::Tensor>(lr_tensor->to(opmath)) : std::nullopt;
  const std::optional<at::Tensor> device_grad_scale =
      grad_scale.has_value() ? std::optional<at::Tensor>(grad_scale->to(opmath)) : std::nullopt;
  const std::optional<at::Tensor> device_found_inf =
      found_inf.has_value() ? std::optional<at::Tensor>(found_inf_as_float(*found_inf))
                            : std::nullopt;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rmsprop_fused_multi_tensor",
                                  [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    LaunchScalars<opmath_t> scalars{};
    scalars.step = make_step_scalars<opmath_t>(
        h.lr, h.alpha, h.eps, h.weight_decay, h.momentum, h.maximize, h.eps_in_sqrt,
        h.lr_in_momentum, h.decoupled_weight_decay, h.nesterov, h.bias_correction, false);
    scalars.lr = device_lr ? device_lr->const_data_ptr<opmath_t>() : nullptr;
    scalars.grad_scale = device_grad_scale ? device_grad_scale->const_data_ptr<opmath_t>()
                                           : nullptr;
    scalars.found_inf = device_found_inf ? device_found_inf->const_data_ptr<float>() : nullptr;
    scalars.chunk_size = limits.chunk_size;

    dispatch_options(lists.centered(), lists.has_momentum(), [&](auto centered, auto momentum) {
      using Args = ProductionLaunchArgs<scalar_t, decltype(centered)::value,
                                        decltype(momentum)::value>;
      TORCH_INTERNAL_ASSERT(limits.max_tensors_per_launch <= Args::kMaxSegments);
      for (const Launch& l : plan) {
        Args args{};  // zero-filled: the unused tail of the arrays is passed as defined bytes
        args.scalars = scalars;
        args.scalars.num_segments = static_cast<int64_t>(l.segments.size());
        for (size_t k = 0; k < l.segments.size(); ++k) {
          const Segment& seg = l.segments[k];
          args.numel[k] = seg.numel;
          args.first_chunk[k] = static_cast<int32_t>(seg.first_chunk);
          for (int d = 0; d < Args::kDepth; ++d) {
            args.ptr[k][d] = tensor_lists[d][seg.tensor].data_ptr<scalar_t>() + seg.begin;
          }
        }
        launch(args, l.num_chunks);
      }
    });
  });
  return static_cast<int64_t>(plan.size());
}

}  // namespace multi_tensor
}  // namespace rmsprop_fused
