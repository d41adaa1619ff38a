// The argument checks every implementation of rmsprop_fused::rmsprop_ (CPU, CUDA, the host build
// of the CUDA kernel) runs before it writes anything: a refused call leaves every tensor as it
// was, and raises ValueError (TORCH_CHECK_VALUE), which FusedRMSprop's fast path tells from a
// failure inside a kernel. The arguments are in step_args.h, the schema in rmsprop_op.cpp; docs/DESIGN.md section 2
// explains them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "blockwise_quant.h"
#include "step_args.h"

namespace rmsprop_fused {

// The dtypes the kernels compute on, and the state dtypes each can keep.
inline bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

inline bool is_supported_state_dtype(at::ScalarType param, at::ScalarType state) {
  if (state == param) return is_kernel_dtype(param);
  switch (state) {
    case at::kFloat: return param == at::kHalf || param == at::kBFloat16;
    case at::kBFloat16: return param == at::kFloat || param == at::kHalf;
    case at::kByte: return param == at::kFloat || param == at::kHalf || param == at::kBFloat16;
    default: return false;
  }
}

// The number of 256-element blocks (and so of scales) of an 8-bit state tensor of `numel`.
inline int64_t quant_blocks(int64_t numel) {
  return (numel + quantization::kQuantBlock - 1) / quantization::kQuantBlock;
}

// The dtype of a param's state for a requested state dtype (none: the param's own): uint8 codes
// for 8-bit state, except below `min_quantized_numel` elements, which keep float32 (FusedRMSprop
// passes _quantization.py's MIN_QUANTIZED_NUMEL: biases and norms stay float32, as in bitsandbytes
// and torchao; the functional form 0, taking 8-bit state of any size). _quantization.py mirrors it.
inline at::ScalarType expected_state_dtype(const at::Tensor& param,
                                           std::optional<at::ScalarType> requested,
                                           int64_t min_quantized_numel) {
  if (!requested.has_value()) return param.scalar_type();
  if (*requested == at::kByte && param.numel() < min_quantized_numel) return at::kFloat;
  return *requested;
}

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

// What check_companion requires of a grad (dtype = the param's) or a state tensor (dtype = the
// call's state dtype), as a predicate.
inline bool companion_matches(const at::Tensor& param, const at::Tensor& t, at::ScalarType dtype) {
  return t.defined() && t.layout() == c10::kStrided && t.device() == param.device() &&
         t.scalar_type() == dtype && t.sizes() == param.sizes() && same_memory_layout(param, t) &&
         is_resolved(t);
}

// What check_scale and the step counters' check require, as predicates.
inline bool scale_matches(const at::Tensor& state, const at::Tensor& scale) {
  return scale.defined() && scale.layout() == c10::kStrided && scale.device() == state.device() &&
         scale.scalar_type() == at::kFloat && scale.dim() == 1 &&
         scale.numel() == quant_blocks(state.numel()) && scale.is_contiguous();
}

inline bool step_matches(const at::Tensor& param, const at::Tensor& step) {
  return step.defined() && step.layout() == c10::kStrided && step.device() == param.device() &&
         step.scalar_type() == at::kFloat && step.numel() == 1;
}

inline void check_companion(const at::Tensor& param, const at::Tensor& t, at::ScalarType dtype,
                            const char* list, size_t i) {
  if (companion_matches(param, t, dtype)) return;
  TORCH_CHECK_VALUE(t.defined(), "rmsprop_fused: ", list, "[", i, "] is undefined");
  TORCH_CHECK_VALUE(t.layout() == c10::kStrided, "rmsprop_fused: ", list, "[", i,
              "] has layout ", t.layout(),
              std::strcmp(list, "grads") == 0 ? "; RMSprop does not support sparse gradients"
                                               : "; state must be strided like its param");
  TORCH_CHECK_VALUE(t.device() == param.device(), "rmsprop_fused: ", list, "[", i, "] is on ",
              t.device(), " but params[", i, "] is on ", param.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "rmsprop_fused: ", list, "[", i, "] has dtype ",
              t.scalar_type(), " but this call's ", list, " are ", dtype);
  TORCH_CHECK_VALUE(t.sizes() == param.sizes(), "rmsprop_fused: ", list, "[", i, "] has shape ",
              t.sizes(), " but params[", i, "] has shape ", param.sizes());
  TORCH_CHECK_VALUE(same_memory_layout(param, t), "rmsprop_fused: ", list, "[", i, "] has strides ",
              t.strides(), " but params[", i, "] has strides ", param.strides());
  TORCH_CHECK_VALUE(is_resolved(t), "rmsprop_fused: ", list, "[", i,
              "] is a conjugate or negative view; materialise it (resolve_conj, resolve_neg)");
}

inline void check_scale(const at::Tensor& state, const at::Tensor& scale, const char* list,
                        size_t i) {
  TORCH_CHECK_VALUE(scale_matches(state, scale), "rmsprop_fused: ", list, "[", i,
              "] must be a contiguous float32 tensor of ", quant_blocks(state.numel()),
              " elements (one per 256 of the state's ", state.numel(), ") on ", state.device(),
              ", got ", scale.defined() ? scale.toString() : std::string("undefined"), " ",
              scale.defined() ? scale.sizes() : c10::IntArrayRef{}, " with strides ",
              scale.defined() ? scale.strides() : c10::IntArrayRef{});
}

inline void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name,
                                const c10::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->numel() == 1, "rmsprop_fused: ", name, " must have one element, got ",
              t->numel());
  TORCH_CHECK_VALUE(at::isFloatingType(t->scalar_type()), "rmsprop_fused: ", name,
              " must be a floating-point tensor, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == device, "rmsprop_fused: ", name, " is on ", t->device(),
              " but the params are on ", device);
}

// The name of a tensor of the op's lists, for error messages.
struct TensorName {
  const char* list;
  size_t index;
};

// The bytes a dense tensor occupies, [begin, end).
using ByteRange = std::pair<uintptr_t, uintptr_t>;

inline ByteRange byte_range(const at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {begin, begin + static_cast<uintptr_t>(t.numel() * t.element_size())};
}

// The byte ranges of these dense tensors, appended to `ranges` (none for an empty tensor: no
// memory, nothing to race on).
inline void append_byte_ranges(at::TensorList tensors, std::vector<ByteRange>& ranges) {
  for (const at::Tensor& t : tensors) {
    if (t.numel() != 0) ranges.push_back(byte_range(t));
  }
}

// Whether any two of these ranges intersect (sorts them): sorted by start, a range overlaps an
// earlier one iff it starts before the furthest end so far.
inline bool byte_ranges_overlap(std::vector<ByteRange>& ranges) {
  std::sort(ranges.begin(), ranges.end());
  uintptr_t furthest_end = 0;
  for (size_t k = 0; k < ranges.size(); ++k) {
    if (k > 0 && ranges[k].first < furthest_end) return true;
    furthest_end = std::max(furthest_end, ranges[k].second);
  }
  return false;
}

// Refuses any two of the call's mutable tensors that share memory (a tensor listed twice,
// p.grad = p, state that is a view of a param, overlapping views): on a GPU two blocks would
// write the same bytes at once. Every tensor the op writes is dense (checked first), so its bytes
// are exactly [data_ptr, data_ptr + numel * itemsize), and one sort of those ranges finds any
// overlap: O(n log n) for n tensors, about 0.2 ms for 10,000 (docs/DESIGN.md section 2). The
// ranges carry no names, which keeps the sort's elements small (it is a third of a small step's
// checks); a refusal finds the two tensors again, in list order.
inline void check_no_overlap(const TensorLists& lists) {
  const std::pair<const char*, at::TensorList> named[] = {
      {"params", lists.params},
      {"grads", lists.grads},
      {"square_avgs", lists.square_avgs},
      {"grad_avgs", lists.grad_avgs},
      {"momentum_buffers", lists.momentum_buffers},
      {"state_steps", lists.state_steps},
      {"square_avg_scales", lists.square_avg_scales},
      {"grad_avg_scales", lists.grad_avg_scales},
      {"momentum_buffer_scales", lists.momentum_buffer_scales},
  };
  size_t count = 0;
  for (const auto& entry : named) count += entry.second.size();
  std::vector<ByteRange> ranges;
  ranges.reserve(count);
  for (const auto& entry : named) append_byte_ranges(entry.second, ranges);
  if (C10_LIKELY(!byte_ranges_overlap(ranges))) return;
  // The first tensor, in list order, that shares memory with an earlier one, and that one: the
  // earlier ranges, by start, are disjoint (else the search stops sooner), so the one that starts
  // last before a range's end is the only one to test.
  std::map<uintptr_t, std::pair<uintptr_t, TensorName>> earlier;  // begin -> (end, name)
  for (const auto& [list, tensors] : named) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].numel() == 0) continue;
      const ByteRange r = byte_range(tensors[i]);
      auto last_before_end = earlier.lower_bound(r.second);
      if (last_before_end != earlier.begin()) {
        const auto& [end, name] = std::prev(last_before_end)->second;
        TORCH_CHECK_VALUE(end <= r.first, "rmsprop_fused: ", name.list, "[", name.index, "] and ",
                          list, "[", i, "] share memory; every tensor a step writes must have "
                          "its own (a tensor listed twice, a grad that is its param, a view of "
                          "another tensor)");
      }
      earlier.emplace(r.first, std::make_pair(r.second, TensorName{list, i}));
    }
  }
  TORCH_INTERNAL_ASSERT(false, "rmsprop_fused: the sort found shared memory, the names did not");
}

// Checks that the lists describe one (device, param dtype, state dtype) group of dense, matching,
// non-overlapping tensors of supported dtypes on `device_type`, with consistent options.
// `check_overlap` false leaves out check_no_overlap, for a caller that tests these tensors with
// others for shared memory itself before any write (csrc/python_entry.cpp step_all).
inline void check_op_args(const StepArgs& args, c10::DeviceType device_type,
                          bool check_overlap = true) {
  const TensorLists& l = args.lists;
  const Hyperparameters& h = args.hyper;
  const size_t n = l.params.size();
  TORCH_CHECK_VALUE(l.grads.size() == n && l.square_avgs.size() == n,
              "rmsprop_fused: got ", n, " params, ", l.grads.size(), " grads and ",
              l.square_avgs.size(), " square_avgs; the lists must have equal lengths");
  TORCH_CHECK_VALUE(l.grad_avgs.size() == (h.centered ? n : 0), "rmsprop_fused: got ",
              l.grad_avgs.size(), " grad_avgs for ", n, " params with centered=", h.centered);
  TORCH_CHECK_VALUE(l.momentum_buffers.size() == (h.momentum > 0 ? n : 0), "rmsprop_fused: got ",
              l.momentum_buffers.size(), " momentum_buffers for ", n,
              " params with momentum=", h.momentum);
  TORCH_CHECK_VALUE(l.state_steps.empty() || l.state_steps.size() == n, "rmsprop_fused: got ",
              l.state_steps.size(), " state_steps for ", n, " params (pass none or one each)");
  TORCH_CHECK_VALUE(!h.nesterov || h.momentum > 0,
              "rmsprop_fused: Nesterov momentum requires a momentum > 0");
  TORCH_CHECK_VALUE(!h.variance_state || h.centered,
              "rmsprop_fused: variance_state holds square_avg - grad_avg^2 and needs centered=True");
  TORCH_CHECK_VALUE(!h.bias_correction || h.alpha < 1.0, "rmsprop_fused: bias_correction divides by ",
              "1 - alpha^step, which is 0 or negative for alpha=", h.alpha);
  TORCH_CHECK_VALUE(!(h.bias_correction || h.rounding_seed.has_value()) || l.counts_steps() || n == 0,
              "rmsprop_fused: bias_correction and stochastic rounding read each tensor's step "
              "count: pass state_steps");
  if (n == 0) {
    TORCH_CHECK_VALUE(l.state_steps.empty() && l.square_avg_scales.empty() &&
                    l.grad_avg_scales.empty() && l.momentum_buffer_scales.empty(),
                "rmsprop_fused: got state_steps or scales for no params");
    return;
  }

  const at::Tensor& first = l.params[0];
  TORCH_CHECK_VALUE(first.defined(), "rmsprop_fused: params[0] is undefined");
  TORCH_CHECK_VALUE(first.device().type() == device_type, "rmsprop_fused: this implementation runs on ",
              device_type, " tensors, got params on ", first.device());
  const auto dtype = first.scalar_type();
  TORCH_CHECK_VALUE(is_kernel_dtype(dtype), "rmsprop_fused: unsupported dtype ", dtype,
              " (float64, float32, float16 and bfloat16 are supported; complex params go "
              "through torch.view_as_real)");
  TORCH_CHECK_VALUE(l.square_avgs[0].defined(), "rmsprop_fused: square_avgs[0] is undefined");
  const auto state_dtype = l.square_avgs[0].scalar_type();
  TORCH_CHECK_VALUE(is_supported_state_dtype(dtype, state_dtype), "rmsprop_fused: ", dtype,
              " params with ", state_dtype, " state are not supported (the state is the "
              "param's dtype; float32 or bfloat16 for 16-bit params, bfloat16 for float32 ones; "
              "uint8 codes with scales for float32, float16 and bfloat16 ones)");
  const bool quantized = state_dtype == at::kByte;
  const size_t scales_expected = quantized ? n : 0;
  TORCH_CHECK_VALUE(l.square_avg_scales.size() == scales_expected &&
                  l.grad_avg_scales.size() == (h.centered ? scales_expected : 0) &&
                  l.momentum_buffer_scales.size() == (h.momentum > 0 ? scales_expected : 0),
              "rmsprop_fused: ", state_dtype, " state takes ", quantized ? "one scale tensor" : "no scales",
              " per state tensor; got ", l.square_avg_scales.size(), ", ", l.grad_avg_scales.size(),
              " and ", l.momentum_buffer_scales.size(), " for ", n, " params");
  TORCH_CHECK_VALUE(!h.rounding_seed.has_value() || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  state_dtype == at::kBFloat16,
              "rmsprop_fused: stochastic rounding rounds float16 and bfloat16 values; this call "
              "stores none (", dtype, " params, ", state_dtype, " state)");
  TORCH_CHECK_VALUE(!h.variance_state || state_dtype == at::kFloat || state_dtype == at::kBFloat16 ||
                  quantized,
              "rmsprop_fused: variance_state keeps the variance in float32, bfloat16 or 8-bit "
              "state; this call's state is ", state_dtype);

  // torch refuses in-place updates of inference tensors outside inference mode; the kernels write
  // through data pointers and would not.
  const bool inference_mode = c10::InferenceMode::is_enabled();
  const auto check_writable = [&](const at::Tensor& t, const char* list, size_t i) {
    TORCH_CHECK_VALUE(inference_mode || !t.is_inference(), "rmsprop_fused: ", list, "[", i,
                      "] is an inference tensor, which cannot be updated outside inference mode");
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = l.params[i];
    TORCH_CHECK_VALUE(p.defined(), "rmsprop_fused: params[", i, "] is undefined");
    TORCH_CHECK_VALUE(p.layout() == c10::kStrided, "rmsprop_fused: params[", i, "] has layout ",
                p.layout(), "; only strided params are supported");
    TORCH_CHECK_VALUE(p.device() == first.device() && p.scalar_type() == dtype,
                "rmsprop_fused: params[", i, "] is ", p.scalar_type(), " on ", p.device(),
                " but params[0] is ", dtype, " on ", first.device(),
                "; one call updates one (device, dtype) group");
    TORCH_CHECK_VALUE(is_resolved(p), "rmsprop_fused: params[", i,
                "] is a conjugate or negative view; materialise it (resolve_conj, resolve_neg)");
    TORCH_CHECK_VALUE(p.is_non_overlapping_and_dense(), "rmsprop_fused: params[", i,
                "] is not dense (strides ", p.strides(), " for shape ", p.sizes(),
                "): the op needs non-overlapping, gap-free memory (FusedRMSprop and the "
                "functional rmsprop() update such params through a dense copy)");
    check_writable(p, "params", i);
    check_companion(p, l.grads[i], dtype, "grads", i);
    if (args.grad_scale.has_value()) check_writable(l.grads[i], "grads", i);
    check_companion(p, l.square_avgs[i], state_dtype, "square_avgs", i);
    check_writable(l.square_avgs[i], "square_avgs", i);
    if (h.centered) check_writable(l.grad_avgs[i], "grad_avgs", i);
    if (h.momentum > 0) check_writable(l.momentum_buffers[i], "momentum_buffers", i);
    if (h.centered) check_companion(p, l.grad_avgs[i], state_dtype, "grad_avgs", i);
    if (h.momentum > 0) check_companion(p, l.momentum_buffers[i], state_dtype, "momentum_buffers", i);
    if (quantized) {
      check_scale(l.square_avgs[i], l.square_avg_scales[i], "square_avg_scales", i);
      check_writable(l.square_avg_scales[i], "square_avg_scales", i);
      if (h.centered) {
        check_scale(l.grad_avgs[i], l.grad_avg_scales[i], "grad_avg_scales", i);
        check_writable(l.grad_avg_scales[i], "grad_avg_scales", i);
      }
      if (h.momentum > 0) {
        check_scale(l.momentum_buffers[i], l.momentum_buffer_scales[i], "momentum_buffer_scales", i);
        check_writable(l.momentum_buffer_scales[i], "momentum_buffer_scales", i);
      }
    }
    if (l.counts_steps()) {
      TORCH_CHECK_VALUE(step_matches(p, l.state_steps[i]), "rmsprop_fused: state_steps[", i,
                  "] must be a one-element float32 tensor on ", p.device(), ", got ",
                  l.state_steps[i].defined() ? l.state_steps[i].toString() : std::string("undefined"));
      check_writable(l.state_steps[i], "state_steps", i);
    }
  }
  check_scalar_tensor(args.lr_tensor, "lr_tensor", first.device());
  check_scalar_tensor(args.grad_scale, "grad_scale", first.device());
  check_scalar_tensor(args.found_inf, "found_inf", first.device());
  check_scalar_tensor(args.clip_coef, "clip_coef", first.device());
  if (check_overlap) check_no_overlap(l);
}

}  // namespace rmsprop_fused
