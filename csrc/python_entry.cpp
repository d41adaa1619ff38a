// The Python module rmsprop_fused._C: loading it runs the ops' registrations (csrc/rmsprop_op.cpp
// and the kernels' TORCH_LIBRARY_IMPLs), and it has two eager entries to the same op.
// torch.ops.rmsprop_fused.rmsprop_ converts each tensor of its lists through the boxed calling
// convention (about 0.2 us a tensor: 180 us of a GPT-2 step's Python side, for six lists of 148
// tensors). step_ takes the lists with pybind11's casters (about 0.07 us a tensor) and calls the
// op through the dispatcher, unboxed: the same kernels, the same dispatch keys (Autograd and
// ADInplaceOrView, then CPU, CUDA or Meta), only a cheaper way in. StepLists keeps a step's
// params and state lists converted once, for FusedRMSprop's fast step, which then converts only
// the grads of each step. torch.compile still sees torch.ops (Dynamo cannot trace a pybind11
// function).
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/prefetch.h"
#include "cpu/simd_kernel.h"
#include "cpu/total_norm.h"
#include "rmsprop_op.h"
#include "step_args.h"

namespace {

using Tensors = std::vector<at::Tensor>;

void step_(const Tensors& params, const Tensors& grads, const Tensors& square_avgs,
           const Tensors& grad_avgs, const Tensors& momentum_buffers, const Tensors& state_steps,
           const Tensors& square_avg_scales, const Tensors& grad_avg_scales,
           const Tensors& momentum_buffer_scales, double lr, double alpha, double eps,
           double weight_decay, double momentum, bool centered, bool maximize, bool eps_in_sqrt,
           bool lr_in_momentum, bool decoupled_weight_decay, bool nesterov, bool bias_correction,
           bool variance_state, std::optional<int64_t> rounding_seed,
           const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
           const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rmsprop_fused::rmsprop_", "")
                             .typed<rmsprop_fused::OpSignature>();
  op.call(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, square_avg_scales,
          grad_avg_scales, momentum_buffer_scales, lr, alpha, eps, weight_decay, momentum, centered,
          maximize, eps_in_sqrt, lr_in_momentum, decoupled_weight_decay, nesterov, bias_correction,
          variance_state, rounding_seed, lr_tensor, grad_scale, found_inf, clip_coef);
}

// The lists of a step that do not change from one step to the next (the params, their state and
// its 8-bit scales), held converted; step() adds the grads and the scalars and calls the op, which
// checks everything, these tensors included, as on any call. call<true> runs the checks alone,
// but for shared memory, which step_all (its caller) tests across all its calls before it writes
// any. Both first check that each param's state has the dtype its group asks for
// (expected_state_dtype, as first_irregular): the op takes any state dtype its kernels update,
// and a param's dtype may change under the lists (module.to() swaps .data).
class StepLists {
 public:
  StepLists(Tensors params, Tensors square_avgs, Tensors grad_avgs, Tensors momentum_buffers,
            Tensors state_steps, Tensors square_avg_scales, Tensors grad_avg_scales,
            Tensors momentum_buffer_scales, std::optional<at::ScalarType> requested_state_dtype,
            int64_t min_quantized_numel)
      : params_(std::move(params)),
        square_avgs_(std::move(square_avgs)),
        grad_avgs_(std::move(grad_avgs)),
        momentum_buffers_(std::move(momentum_buffers)),
        state_steps_(std::move(state_steps)),
        square_avg_scales_(std::move(square_avg_scales)),
        grad_avg_scales_(std::move(grad_avg_scales)),
        momentum_buffer_scales_(std::move(momentum_buffer_scales)),
        requested_state_dtype_(requested_state_dtype),
        min_quantized_numel_(min_quantized_numel) {}

  // step() (kCheckOnly false) and its checks alone: the grads, then every scalar of the schema in
  // its order.
  template <bool kCheckOnly>
  void call(const Tensors& grads, double lr, double alpha, double eps, double weight_decay,
            double momentum, bool centered, bool maximize, bool eps_in_sqrt, bool lr_in_momentum,
            bool decoupled_weight_decay, bool nesterov, bool bias_correction, bool variance_state,
            std::optional<int64_t> rounding_seed, const std::optional<at::Tensor>& lr_tensor,
            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
            const std::optional<at::Tensor>& clip_coef) const {
    for (size_t i = 0; i < params_.size() && i < square_avgs_.size(); ++i) {
      const at::ScalarType expected = rmsprop_fused::expected_state_dtype(
          params_[i], requested_state_dtype_, min_quantized_numel_);
      TORCH_CHECK_VALUE(square_avgs_[i].scalar_type() == expected, "rmsprop_fused: square_avgs[", i,
                        "] is ", square_avgs_[i].scalar_type(), " but the state_dtype asked for ",
                        "keeps ", expected, " for params[", i, "] (", params_[i].scalar_type(),
                        ", ", params_[i].numel(), " elements)");
    }
    if constexpr (kCheckOnly) {
      const rmsprop_fused::StepArgs args{
          rmsprop_fused::TensorLists{params_, grads, square_avgs_, grad_avgs_, momentum_buffers_,
                                     state_steps_, square_avg_scales_, grad_avg_scales_,
                                     momentum_buffer_scales_},
          rmsprop_fused::Hyperparameters{lr, alpha, eps, weight_decay, momentum, centered,
                                         maximize, eps_in_sqrt, lr_in_momentum,
                                         decoupled_weight_decay, nesterov, bias_correction,
                                         variance_state, rounding_seed},
          lr_tensor, grad_scale, found_inf, clip_coef};
      // (no overlap test: step_all's, across all its calls, covers this one's)
      rmsprop_fused::check_op_args(
          args, params_.empty() ? c10::DeviceType::CPU : params_.front().device().type(),
          /*check_overlap=*/false);
    } else {
      step_(params_, grads, square_avgs_, grad_avgs_, momentum_buffers_, state_steps_,
            square_avg_scales_, grad_avg_scales_, momentum_buffer_scales_, lr, alpha, eps,
            weight_decay, momentum, centered, maximize, eps_in_sqrt, lr_in_momentum,
            decoupled_weight_decay, nesterov, bias_correction, variance_state, rounding_seed,
            lr_tensor, grad_scale, found_inf, clip_coef);
    }
  }

  // The byte ranges of the held tensors and of `grads` (all dense once call<true> passed).
  void append_byte_ranges(const Tensors& grads, std::vector<rmsprop_fused::ByteRange>& out) const {
    for (const Tensors* list : {&params_, &grads, &square_avgs_, &grad_avgs_, &momentum_buffers_,
                                &state_steps_, &square_avg_scales_, &grad_avg_scales_,
                                &momentum_buffer_scales_}) {
      rmsprop_fused::append_byte_ranges(*list, out);
    }
  }

 private:
  Tensors params_, square_avgs_, grad_avgs_, momentum_buffers_, state_steps_;
  Tensors square_avg_scales_, grad_avg_scales_, momentum_buffer_scales_;  // 8-bit state only
  std::optional<at::ScalarType> requested_state_dtype_;  // expected_state_dtype's arguments
  int64_t min_quantized_numel_;
};

// The scalars of one call, as StepLists.call takes them after the grads.
using CallScalars =
    std::tuple<double, double, double, double, double, bool, bool, bool, bool, bool, bool, bool,
               bool, std::optional<int64_t>, std::optional<at::Tensor>, std::optional<at::Tensor>,
               std::optional<at::Tensor>, std::optional<at::Tensor>>;

// A step of several calls (param groups, an 8-bit group's parts), atomic as one call is: every
// call is checked (StepLists::call<true>), then all the calls' tensors for shared memory (the op
// checks one call's), and only then does any call run. A refusal is a ValueError, before any
// write; the grads are converted once.
void step_all(const std::vector<const StepLists*>& calls, const std::vector<Tensors>& grads,
              const std::vector<CallScalars>& scalars) {
  TORCH_CHECK_VALUE(calls.size() == grads.size() && calls.size() == scalars.size(),
                    "rmsprop_fused: ", calls.size(), " calls but ", grads.size(),
                    " lists of grads and ", scalars.size(), " of scalars");
  for (const StepLists* call : calls) {
    TORCH_CHECK_VALUE(call != nullptr, "rmsprop_fused: a call is None");
  }
  const auto run = [&](auto check_only) {
    for (size_t c = 0; c < calls.size(); ++c) {
      std::apply([&](const auto&... args) {
        calls[c]->template call<decltype(check_only)::value>(grads[c], args...);
      }, scalars[c]);
    }
  };
  run(std::true_type{});
  std::vector<rmsprop_fused::ByteRange> ranges;
  for (size_t c = 0; c < calls.size(); ++c) calls[c]->append_byte_ranges(grads[c], ranges);
  TORCH_CHECK_VALUE(!rmsprop_fused::byte_ranges_overlap(ranges),
                    "rmsprop_fused: two tensors of these calls share memory");
  run(std::false_type{});
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rmsprop_fused's compiled ops (torch.ops.rmsprop_fused.*) and an eager entry to the step";
  // The lists are converted while the GIL is held; the kernels run without it.
  m.def("step_", &step_, "torch.ops.rmsprop_fused.rmsprop_, called with lists of tensors "
        "(positional: the nine lists, then every scalar of the schema in its order)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("total_norm", &rmsprop_fused::cpu::total_norm,
        "The norm of order norm_type of all elements of floating CPU tensors (a 0-d float32 "
        "tensor, float64 if any is float64): clipping's norm without one op call per tensor",
        pybind11::arg("tensors"), pybind11::arg("norm_type"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("cpu_simd_isa", &rmsprop_fused::cpu::simd_kernels_isa,
        "The instructions of the CPU step's own SIMD loops (16-bit values, 8-bit state) where this CPU runs "
        "it (\"avx512-bf16\"), else \"\" (the compiler-vectorised loop)");
  m.def("_set_cpu_simd", &rmsprop_fused::cpu::set_simd_kernels_enabled,
        "Testing aid: whether the CPU step may use its SIMD loop (default True); returns the "
        "previous setting", pybind11::arg("enabled"));
  m.def("cpu_prefetch_bytes", &rmsprop_fused::cpu::prefetch_bytes,
        "How far ahead of the CPU step's loops each stream is prefetched, in bytes of params");
  m.def("_set_cpu_prefetch_bytes", &rmsprop_fused::cpu::set_prefetch_bytes,
        "Benchmark aid (bench/prefetch_sweep.py): sets cpu_prefetch_bytes (a multiple of 64 from 0 "
        "to 16384); returns the previous distance", pybind11::arg("bytes"));
  pybind11::class_<StepLists>(m, "StepLists",
                              "A step's params, square_avgs, grad_avgs, momentum_buffers, "
                              "state_steps and the three lists of 8-bit scales, converted once, "
                              "and the state dtype asked for (as first_irregular takes it)")
      .def(pybind11::init<Tensors, Tensors, Tensors, Tensors, Tensors, Tensors, Tensors, Tensors,
                          std::optional<at::ScalarType>, int64_t>())
      .def("step", &StepLists::call<false>, "step_ with these lists and the given grads "
           "(positional: the grads, then every scalar of the schema in its order)",
           pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("step_all", &step_all,
        "Several StepLists' steps, all checked (each call's checks, then shared memory across "
        "them) before any runs: the calls, their grads, and each call's scalars after the grads",
        pybind11::arg("calls"), pybind11::arg("grads"), pybind11::arg("scalars"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
