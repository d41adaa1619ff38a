// The arguments of one call of rmsprop_fused::rmsprop_, gathered in one struct, and the op's C++
// signature, written once (op_entry). The kernels see only this; the checks every implementation
// runs first are in rmsprop_op.h, the schema in rmsprop_op.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <type_traits>

namespace rmsprop_fused {

// The op's tensor lists. grad_avgs is empty unless centered, momentum_buffers unless momentum > 0
// (torch.optim.RMSprop's state has the same shape). The state lists hold the param's dtype, or
// the call's state dtype: float32, bfloat16, or uint8 codes of 8-bit blockwise state, each with a
// float32 scale per block of 256 in the matching *_scales list (empty otherwise). state_steps,
// float32 one-element counters, is empty when the caller counts steps itself; when given, the
// op adds 1 to each (unless found_inf) and reads it for bias correction and stochastic rounding.
struct TensorLists {
  at::TensorList params;
  at::TensorList grads;
  at::TensorList square_avgs;
  at::TensorList grad_avgs;
  at::TensorList momentum_buffers;
  at::TensorList state_steps;
  at::TensorList square_avg_scales;
  at::TensorList grad_avg_scales;
  at::TensorList momentum_buffer_scales;
  bool centered() const { return !grad_avgs.empty(); }
  bool has_momentum() const { return !momentum_buffers.empty(); }
  bool counts_steps() const { return !state_steps.empty(); }
  bool quantized() const { return !square_avg_scales.empty(); }
  // Tensors per element a kernel reads: param, grad and the state lists.
  int64_t depth() const { return 3 + (centered() ? 1 : 0) + (has_momentum() ? 1 : 0); }
};

struct Hyperparameters {
  double lr;
  double alpha;
  double eps;
  double weight_decay;
  double momentum;
  bool centered;
  bool maximize;
  bool eps_in_sqrt;
  bool lr_in_momentum;
  bool decoupled_weight_decay;
  bool nesterov;
  bool bias_correction;
  bool variance_state;                 // square_avgs hold square_avg - grad_avg^2 (centered)
  std::optional<int64_t> rounding_seed;  // stochastic rounding of 16-bit stores when set
};

// Everything one call of the op carries.
struct StepArgs {
  TensorLists lists;
  Hyperparameters hyper;
  std::optional<at::Tensor> lr_tensor;   // read on the device instead of hyper.lr
  std::optional<at::Tensor> grad_scale;  // AMP: grads are divided by it and written back
  std::optional<at::Tensor> found_inf;   // any nonzero value: nothing changes
  std::optional<at::Tensor> clip_coef;   // grads are multiplied by it (clipping by global norm)
};

// The op's C++ signature, as the dispatcher's typed calls spell it (csrc/python_entry.cpp).
using OpSignature = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                         at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                         at::TensorList, double, double, double, double, double, bool, bool, bool,
                         bool, bool, bool, bool, bool, std::optional<int64_t>,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

// The op's C++ signature, written once: an implementation is a function of the StepArgs, and
// registers op_entry<itself> (TORCH_LIBRARY_IMPL needs a function of the schema's arguments).
template <void (*Implementation)(const StepArgs&)>
void op_entry(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
              at::TensorList grad_avgs, at::TensorList momentum_buffers,
              at::TensorList state_steps, at::TensorList square_avg_scales,
              at::TensorList grad_avg_scales, at::TensorList momentum_buffer_scales, double lr,
              double alpha, double eps, double weight_decay, double momentum, bool centered,
              bool maximize, bool eps_in_sqrt, bool lr_in_momentum, bool decoupled_weight_decay,
              bool nesterov, bool bias_correction, bool variance_state,
              std::optional<int64_t> rounding_seed, const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& clip_coef) {
  Implementation(StepArgs{
      TensorLists{params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps,
                  square_avg_scales, grad_avg_scales, momentum_buffer_scales},
      Hyperparameters{lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt,
                      lr_in_momentum, decoupled_weight_decay, nesterov, bias_correction,
                      variance_state, rounding_seed},
      lr_tensor, grad_scale, found_inf, clip_coef});
}
static_assert(std::is_same_v<decltype(op_entry<nullptr>), OpSignature>,
              "op_entry and OpSignature must spell the same signature");

}  // namespace rmsprop_fused
