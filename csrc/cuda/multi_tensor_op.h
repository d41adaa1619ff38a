// From the op's arguments to the launches: the host side of the multi-tensor kernel, shared by
// the CUDA op (csrc/cuda/*.cu, whose launchers enqueue the kernels) and the host build of the
// kernel (csrc/cuda_on_host/, whose launchers run every block and thread in a loop). The scalar
// tensors, the step counters, the plan, the dtype and option dispatch and every launch's
// LaunchArgs are therefore the same code in production and in the tests.
//
//   rmsprop_multi_tensor   one step: prepare_call, increment_step_counters, then the update
//                          launches of the params' dtype (launch_updates<param_t>, instantiated
//                          in one translation unit per param dtype, so that they compile in
//                          parallel).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "../rmsprop_update.h"
#include "../step_args.h"
#include "../state_pairs.h"
#include "multi_tensor_kernel.h"

namespace rmsprop_fused {
namespace multi_tensor {

// Every kernel comes in two variants: kExtended, with the rare options (those of
// StepScalars::plain(), stochastic rounding, variance state) compiled in as uniform branches,
// and a plain one for the common step that uses none of them. The rare options are not free on
// the device even when off. The plain kernels take -8 to 22 fewer registers than the kExtended
// ones of the same (pair, centered, momentum, AMP) (the columns of kRegisterCounts in
// multi_tensor_kernel.h; ptxas gives a few plain ones more), and their own code has 0.7 to 3.2
// times fewer instructions per element update (SASS of sm_80 and sm_90: a branch around each
// option, a division sequence per bias correction, a hash and a stochastic store per 16-bit
// stream; below 1 for some kernels since the variance form went in, not yet looked into), both
// measured with nvcc 13.0 and
// checked by tests/test_cuda_sass.py. Registers cost occupancy, which the memory-bound loop can
// spare; instructions matter where the 8-bit kernels are concerned, which at 10 to 18 bytes an
// element and three 8-step code searches issue about as many instructions an element as an
// H100's bandwidth leaves time for. Both variants exist in both parameter budgets, since CUDA
// graphs are captured with the 4 KB one (rmsprop_cuda.cu). What cannot run is not instantiated:
// pairs outside STATE_PAIRS, stochastic rounding where no 16-bit value is stored, variance state
// without centered.

// found_inf as the kernels read it, float32. GradScaler's float32 flag is used as it is; a flag
// of another dtype becomes (found_inf != 0) as float32 on its device, so that a nonzero float64
// flag too small for float32 still skips the step.
inline at::Tensor found_inf_as_float(const at::Tensor& found_inf) {
  return found_inf.scalar_type() == at::kFloat ? found_inf : found_inf.ne(0).to(at::kFloat);
}

// A call of the op as the launches see it: its arguments, the parameter budget (which variant of
// LaunchArgs), the limits, the plan, and the device scalars in the dtypes the kernels read.
//
// Nothing here waits for the device: lr_tensor, grad_scale and clip_coef are converted to the
// opmath dtype (and found_inf to float32) by device ops on the current stream when their dtype
// differs (.to() returns the tensor itself when it does not), and the kernels read them. The
// converted tensors are freed after the launches are enqueued; the caching allocator hands their
// memory to later work on the same stream only, which runs after the kernels.
struct Call {
  const StepArgs* args;
  int64_t param_bytes;  // kLargeKernelParamBytes or kSmallKernelParamBytes
  LaunchLimits limits;
  std::vector<Launch> plan;
  std::optional<at::Tensor> lr;
  std::optional<at::Tensor> grad_scale;
  std::optional<at::Tensor> clip_coef;
  std::optional<at::Tensor> found_inf;
};

// The pointers per segment of the call's kernels (LaunchArgs::ptr).
inline int64_t call_pointers(const TensorLists& lists) {
  return segment_pointers(lists.depth(), lists.quantized());
}

inline Call prepare_call(const StepArgs& args, int64_t param_bytes, const LaunchLimits& limits) {
  const TensorLists& lists = args.lists;
  TORCH_INTERNAL_ASSERT(param_bytes == kSmallKernelParamBytes ||
                        (param_bytes == kLargeKernelParamBytes && kLargeKernelParamsBuilt));
  TORCH_INTERNAL_ASSERT(limits.max_tensors_per_launch <=
                        max_segments_per_launch(call_pointers(lists), param_bytes));
  // 8-bit blocks must not straddle chunks (nor so a tensor's split between launches).
  TORCH_INTERNAL_ASSERT(!lists.quantized() || limits.chunk_size % quantization::kQuantBlock == 0);
  std::vector<int64_t> numels;
  numels.reserve(lists.params.size());
  for (const at::Tensor& p : lists.params) numels.push_back(p.numel());

  const at::ScalarType opmath = at::toOpMathType(lists.params[0].scalar_type());
  const auto in_opmath = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t.has_value()) return std::nullopt;
    return t->to(opmath);
  };
  Call call{&args, param_bytes, limits, plan_launches(numels, limits), in_opmath(args.lr_tensor),
            in_opmath(args.grad_scale), in_opmath(args.clip_coef), std::nullopt};
  if (args.found_inf.has_value()) call.found_inf = found_inf_as_float(*args.found_inf);
  return call;
}

template <int64_t kBytes>
using Budget = std::integral_constant<int64_t, kBytes>;

// Calls f(Budget<param_bytes>{}): the LaunchArgs variant of the call's parameter budget.
template <typename F>
void dispatch_budget(int64_t param_bytes, F&& f) {
  if (param_bytes == kLargeKernelParamBytes) {
    if constexpr (kLargeKernelParamsBuilt) {
      f(Budget<kLargeKernelParamBytes>{});
      return;
    }
    TORCH_INTERNAL_ASSERT(false, "rmsprop_fused: this build has no 32 KB kernels");
  }
  TORCH_INTERNAL_ASSERT(param_bytes == kSmallKernelParamBytes);
  f(Budget<kSmallKernelParamBytes>{});
}

// The step counters +1 (unless found_inf), on the device, before any update launch reads them.
// `launch(args, num_blocks)` runs increment_steps over num_blocks x kStepCounterBlockDim threads.
template <class Launcher>
void increment_step_counters(const Call& call, Launcher&& launch) {
  const at::TensorList steps = call.args->lists.state_steps;
  if (steps.empty()) return;
  dispatch_budget(call.param_bytes, [&](auto budget) {
    using Args = BudgetStepCounterArgs<decltype(budget)::value>;
    const int64_t n = static_cast<int64_t>(steps.size());
    for (int64_t first = 0; first < n; first += Args::kMaxCounters) {
      Args args{};
      args.found_inf = call.found_inf ? call.found_inf->const_data_ptr<float>() : nullptr;
      args.count = std::min(Args::kMaxCounters, n - first);
      for (int64_t k = 0; k < args.count; ++k) {
        args.step[k] = static_cast<float*>(steps[first + k].data_ptr());
      }
      launch(args, (args.count + kStepCounterBlockDim - 1) / kStepCounterBlockDim);
    }
  });
}

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename state_t>
constexpr at::ScalarType state_scalar_type() {
  if constexpr (std::is_same_v<state_t, Blockwise8>) {
    return at::kByte;
  } else {
    return c10::CppTypeToScalarType<state_t>::value;
  }
}

// Calls f(TypeTag<state_t>{}) for the call's state dtype: the pairs of STATE_PAIRS only.
template <typename param_t, typename F>
void dispatch_state_dtype(at::ScalarType state, F&& f) {
  bool found = false;
  const auto try_one = [&](auto tag) {
    using state_t = typename decltype(tag)::type;
    if constexpr (is_state_pair<param_t, state_t>()) {
      if (!found && state == state_scalar_type<state_t>()) {
        found = true;
        f(tag);
      }
    }
  };
  try_one(TypeTag<param_t>{});
  try_one(TypeTag<float>{});
  try_one(TypeTag<c10::BFloat16>{});
  try_one(TypeTag<Blockwise8>{});
  TORCH_INTERNAL_ASSERT(found, "rmsprop_fused: check_op_args let through state ", state);
}

// The call's launches for one (param, state) pair: the kernel variant for its options, then one
// LaunchArgs per planned launch. `launch(args, num_blocks)` is called once per launch, in order.
template <typename param_t, typename state_t, class Launcher>
void launch_pair(const Call& call, Launcher&& launch) {
  using opmath_t = at::opmath_type<param_t>;
  const StepArgs& step_args = *call.args;
  const TensorLists& lists = step_args.lists;
  const Hyperparameters& h = step_args.hyper;
  if (call.plan.empty()) return;  // no tensor has an element

  LaunchScalars<opmath_t> scalars{};
  scalars.step = make_step_scalars<opmath_t>(
      h.lr, h.alpha, h.eps, h.weight_decay, h.momentum, h.maximize, h.eps_in_sqrt,
      h.lr_in_momentum, h.decoupled_weight_decay, h.nesterov, h.bias_correction,
      step_args.clip_coef.has_value());
  scalars.lr = call.lr ? call.lr->const_data_ptr<opmath_t>() : nullptr;
  scalars.grad_scale = call.grad_scale ? call.grad_scale->const_data_ptr<opmath_t>() : nullptr;
  scalars.clip_coef = call.clip_coef ? call.clip_coef->const_data_ptr<opmath_t>() : nullptr;
  scalars.found_inf = call.found_inf ? call.found_inf->const_data_ptr<float>() : nullptr;
  scalars.rounding_seed = h.rounding_seed.value_or(0);
  scalars.stochastic = h.rounding_seed.has_value();
  scalars.variance_state = h.variance_state;
  scalars.chunk_size = call.limits.chunk_size;
  const bool extended = !scalars.step.plain() || scalars.stochastic || scalars.variance_state;

  // The lists in the order of LaunchArgs::ptr, with the element size each pointer advances by
  // per element of a segment's `begin` (the scales by one float per 256 elements).
  std::vector<at::TensorList> tensor_lists{lists.params, lists.grads, lists.square_avgs};
  if (lists.centered()) tensor_lists.push_back(lists.grad_avgs);
  if (lists.has_momentum()) tensor_lists.push_back(lists.momentum_buffers);
  if (lists.quantized()) {
    tensor_lists.push_back(lists.square_avg_scales);
    if (lists.centered()) tensor_lists.push_back(lists.grad_avg_scales);
    if (lists.has_momentum()) tensor_lists.push_back(lists.momentum_buffer_scales);
  }
  const size_t depth = static_cast<size_t>(lists.depth());
  const auto pointer_at = [&](size_t d, const Segment& seg) -> void* {
    const at::Tensor& t = tensor_lists[d][seg.tensor];
    const int64_t offset = d < depth ? seg.begin : seg.begin / quantization::kQuantBlock;
    return static_cast<char*>(t.data_ptr()) + offset * t.element_size();
  };

  dispatch_budget(call.param_bytes, [&](auto budget) {
    constexpr int64_t kParamBytes = decltype(budget)::value;
    dispatch_flag(lists.centered(), [&](auto centered) {
      dispatch_flag(lists.has_momentum(), [&](auto momentum) {
        dispatch_flag(step_args.grad_scale.has_value(), [&](auto unscale) {
          dispatch_flag(extended, [&](auto extended_) {
            using K = Kernel<param_t, state_t,
                             UpdateVariant<decltype(centered)::value, decltype(momentum)::value,
                                           decltype(unscale)::value, decltype(extended_)::value>>;
            using Args = BudgetLaunchArgs<K, kParamBytes>;
            TORCH_INTERNAL_ASSERT(static_cast<int64_t>(tensor_lists.size()) + 1 == K::kPointers);
            TORCH_INTERNAL_ASSERT(call.limits.max_tensors_per_launch <= Args::kMaxSegments);
            for (const Launch& l : call.plan) {
              Args args{};  // zero-filled: the unused tail of the arrays is passed as defined bytes
              args.scalars = scalars;
              args.scalars.num_segments = static_cast<int64_t>(l.segments.size());
              for (size_t k = 0; k < l.segments.size(); ++k) {
                const Segment& seg = l.segments[k];
                args.numel[k] = seg.numel;
                args.begin[k] = seg.begin;
                args.first_chunk[k] = static_cast<int32_t>(seg.first_chunk);
                args.tensor[k] = static_cast<int32_t>(seg.tensor);
                for (size_t d = 0; d < tensor_lists.size(); ++d) args.ptr[k][d] = pointer_at(d, seg);
                args.ptr[k][K::kStepPointer] =
                    lists.counts_steps() ? lists.state_steps[seg.tensor].data_ptr() : nullptr;
              }
              launch(args, l.num_chunks);
            }
          });
        });
      });
    });
  });
}

// The update launches of a call whose params are param_t: instantiated once per param dtype, in
// its own translation unit (rmsprop_cuda_<dtype>.cu, rmsprop_cuda_on_host_<dtype>.cpp).
template <typename param_t, class Launcher>
void launch_updates(const Call& call, Launcher&& launch) {
  dispatch_state_dtype<param_t>(call.args->lists.square_avgs[0].scalar_type(), [&](auto tag) {
    launch_pair<param_t, typename decltype(tag)::type>(call, launch);
  });
}

// Calls f(TypeTag<param_t>{}) for a kernel dtype.
template <typename F>
void dispatch_param_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kDouble: return f(TypeTag<double>{});
    case at::kFloat: return f(TypeTag<float>{});
    case at::kHalf: return f(TypeTag<c10::Half>{});
    case at::kBFloat16: return f(TypeTag<c10::BFloat16>{});
    default: TORCH_INTERNAL_ASSERT(false, "rmsprop_fused: check_op_args let through ", dtype);
  }
}

// One step over lists that passed check_op_args (and have params), in as few launches as
// `limits` allow within `param_bytes` of kernel parameters; returns the number of update
// launches. `increment(args, num_blocks)` runs increment_steps; `update(TypeTag<param_t>{},
// call)` the update launches of the params' dtype (launch_updates<param_t>).
template <class Increment, class Update>
int64_t rmsprop_multi_tensor(const StepArgs& args, int64_t param_bytes, const LaunchLimits& limits,
                             Increment&& increment, Update&& update) {
  const Call call = prepare_call(args, param_bytes, limits);
  increment_step_counters(call, increment);
  dispatch_param_dtype(args.lists.params[0].scalar_type(), [&](auto tag) { update(tag, call); });
  return static_cast<int64_t>(call.plan.size());
}

}  // namespace multi_tensor
}  // namespace rmsprop_fused
