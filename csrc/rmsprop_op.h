// Argument checking shared by every implementation of rmsprop_fused::rmsprop_ (CPU, CUDA and the
// host build of the CUDA kernel). Everything is checked before anything is written: a refused
// call leaves every tensor as it was.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <optional>
#include <string>

namespace rmsprop_fused {

// The op's tensor arguments. grad_avgs is empty unless centered, momentum_buffers is empty
// unless momentum > 0 (torch.optim.RMSprop's state has the same shape).
struct TensorLists {
  at::TensorList params;
  at::TensorList grads;
  at::TensorList square_avgs;
  at::TensorList grad_avgs;
  at::TensorList momentum_buffers;
  bool centered() const { return !grad_avgs.empty(); }
  bool has_momentum() const { return !momentum_buffers.empty(); }
  int64_t depth() const { return 3 + (centered() ? 1 : 0) + (has_momentum() ? 1 : 0); }
};

// Two dense tensors of the same shape put element i at the same flat offset iff their strides
// agree on every dimension of size > 1.
inline bool same_memory_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) return true;
  const auto sizes = a.sizes();
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (sizes[d] > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// A conjugate or negative view keeps the original values in memory and a flag to apply on
// reading; a kernel that updates memory would lose the flag. (The op's checks of it are a
// backstop: the op sees real tensors only, which carry no conjugate flag, and torch's Negative
// fallback refuses a negative view in a mutable list before any kernel runs. first_irregular,
// registered for every dispatch key, does see both.)
inline bool is_resolved(const at::Tensor& t) { return !t.is_conj() && !t.is_neg(); }

// What check_companion requires of a grad or state tensor, as a predicate.
inline bool companion_matches(const at::Tensor& param, const at::Tensor& t) {
  return t.defined() && t.layout() == c10::kStrided && t.device() == param.device() &&
         t.scalar_type() == param.scalar_type() && t.sizes() == param.sizes() &&
         same_memory_layout(param, t) && is_resolved(t);
}

inline void check_companion(const at::Tensor& param, const at::Tensor& t, const char* list,
                            size_t i) {
  if (companion_matches(param, t)) return;
  TORCH_CHECK(t.defined(), "rmsprop_fused: ", list, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == c10::kStrided, "rmsprop_fused: ", list, "[", i,
              "] has layout ", t.layout(), "; RMSprop does not support sparse gradients");
  TORCH_CHECK(t.device() == param.device(), "rmsprop_fused: ", list, "[", i, "] is on ",
              t.device(), " but params[", i, "] is on ", param.device());
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), "rmsprop_fused: ", list, "[", i,
              "] has dtype ", t.scalar_type(), " but params[", i, "] has dtype ",
              param.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes(), "rmsprop_fused: ", list, "[", i, "] has shape ",
              t.sizes(), " but params[", i, "] has shape ", param.sizes());
  TORCH_CHECK(same_memory_layout(param, t), "rmsprop_fused: ", list, "[", i, "] has strides ",
              t.strides(), " but params[", i, "] has strides ", param.strides());
  TORCH_CHECK(is_resolved(t), "rmsprop_fused: ", list, "[", i,
              "] is a conjugate or negative view; materialise it (resolve_conj, resolve_neg)");
}

inline void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name,
                                const c10::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, "rmsprop_fused: ", name, " must have one element, got ",
              t->numel());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "rmsprop_fused: ", name,
              " must be a floating-point tensor, got ", t->scalar_type());
  TORCH_CHECK(t->device() == device, "rmsprop_fused: ", name, " is on ", t->device(),
              " but the params are on ", device);
}

// Checks that the lists describe one (device, dtype) group of dense, matching tensors of a
// supported dtype on `device_type`.
inline void check_op_args(const TensorLists& l, bool centered, double momentum,
                          const std::optional<at::Tensor>& lr_tensor,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf,
                          c10::DeviceType device_type) {
  const size_t n = l.params.size();
  TORCH_CHECK(l.grads.size() == n && l.square_avgs.size() == n,
              "rmsprop_fused: got ", n, " params, ", l.grads.size(), " grads and ",
              l.square_avgs.size(), " square_avgs; the lists must have equal lengths");
  TORCH_CHECK(l.grad_avgs.size() == (centered ? n : 0), "rmsprop_fused: got ",
              l.grad_avgs.size(), " grad_avgs for ", n, " params with centered=", centered);
  TORCH_CHECK(l.momentum_buffers.size() == (momentum > 0 ? n : 0), "rmsprop_fused: got ",
              l.momentum_buffers.size(), " momentum_buffers for ", n,
              " params with momentum=", momentum);
  if (n == 0) return;

  const at::Tensor& first = l.params[0];
  TORCH_CHECK(first.defined(), "rmsprop_fused: params[0] is undefined");
  TORCH_CHECK(first.device().type() == device_type, "rmsprop_fused: this implementation runs on ",
              device_type, " tensors, got params on ", first.device());
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "rmsprop_fused: unsupported dtype ", dtype,
              " (float64, float32, float16 and bfloat16 are supported; complex params go "
              "through torch.view_as_real)");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = l.params[i];
    TORCH_CHECK(p.defined(), "rmsprop_fused: params[", i, "] is undefined");
    TORCH_CHECK(p.layout() == c10::kStrided, "rmsprop_fused: params[", i, "] has layout ",
                p.layout(), "; only strided params are supported");
    TORCH_CHECK(p.device() == first.device() && p.scalar_type() == dtype,
                "rmsprop_fused: params[", i, "] is ", p.scalar_type(), " on ", p.device(),
                " but params[0] is ", dtype, " on ", first.device(),
                "; one call updates one (device, dtype) group");
    TORCH_CHECK(is_resolved(p), "rmsprop_fused: params[", i,
                "] is a conjugate or negative view; materialise it (resolve_conj, resolve_neg)");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "rmsprop_fused: params[", i,
                "] is not dense (strides ", p.strides(), " for shape ", p.sizes(),
                "): the fused update needs non-overlapping, gap-free memory");
    check_companion(p, l.grads[i], "grads", i);
    check_companion(p, l.square_avgs[i], "square_avgs", i);
    if (centered) check_companion(p, l.grad_avgs[i], "grad_avgs", i);
    if (momentum > 0) check_companion(p, l.momentum_buffers[i], "momentum_buffers", i);
  }
  check_scalar_tensor(lr_tensor, "lr_tensor", first.device());
  check_scalar_tensor(grad_scale, "grad_scale", first.device());
  check_scalar_tensor(found_inf, "found_inf", first.device());
}

}  // namespace rmsprop_fused
