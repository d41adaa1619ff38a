// The ops' schemas, defined once. rmsprop_ (the step) is implemented per backend with
// TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/; its Python wrapper is
// rmsprop_fused/_extension.py, and a fake (meta) implementation for torch.compile is registered
// there too. The other ops read only metadata, or serve the tests, on every device. (The Python
// module itself, rmsprop_fused._C, is csrc/python_entry.cpp.)
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isin.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "blockwise_quant.h"
#include "cpu/simd_kernel.h"
#include "rmsprop_op.h"
#include "step_args.h"

namespace rmsprop_fused {
namespace {

bool is_supported_param_dtype(at::ScalarType dtype) {
  return is_kernel_dtype(dtype) || dtype == at::kComplexDouble || dtype == at::kComplexFloat;
}

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

// The fast path of the Python checks (functional.check_param): the index of the first param
// that is not plainly acceptable, or -1. Plainly acceptable: a strided, dense, real or complex
// param of a supported dtype that has data, is no conjugate or negative view and may be written
// here; a grad of its dtype, shape, device and memory layout (companion_matches, which the
// kernels' own checks use); whatever state it already has (None: not created yet) likewise, of
// the dtype expected_state_dtype gives, with its scale (8-bit state) and a float32 step counter;
// state that may be written. One C++ pass over all params costs well under a microsecond each,
// where reading these attributes from Python cost several. For an irregular param the Python
// checks run and say what is wrong, or accept what this does not cover (a view with gaps, a grad
// of other strides: updated through a dense copy). Callers pass plain torch.Tensor and
// nn.Parameter objects only: a tensor subclass would dispatch this op to its own handler.
// Companion lists are empty when unused (grad_avgs unless centered, scales unless 8-bit).
int64_t first_irregular(at::TensorList params, const OptionalTensors& grads,
                        const OptionalTensors& square_avgs, const OptionalTensors& grad_avgs,
                        const OptionalTensors& momentum_buffers,
                        const OptionalTensors& state_steps,
                        const OptionalTensors& square_avg_scales,
                        const OptionalTensors& grad_avg_scales,
                        const OptionalTensors& momentum_buffer_scales,
                        std::optional<at::ScalarType> state_dtype, int64_t min_quantized_numel) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, "rmsprop_fused: got ", grads.size(),
              " grads for ", n, " params");
  const bool inference_mode = c10::InferenceMode::is_enabled();
  const auto writable = [&](const at::Tensor& t) { return inference_mode || !t.is_inference(); };
  const std::pair<const OptionalTensors*, const OptionalTensors*> states[] = {
      {&square_avgs, &square_avg_scales},
      {&grad_avgs, &grad_avg_scales},
      {&momentum_buffers, &momentum_buffer_scales},
  };
  const auto present = [&](const OptionalTensors& list, int64_t i) -> std::optional<at::Tensor> {
    if (list.empty()) return std::nullopt;
    return list[i];
  };
  for (const auto* list : {&square_avgs, &grad_avgs, &momentum_buffers, &square_avg_scales,
                           &grad_avg_scales, &momentum_buffer_scales, &state_steps}) {
    if (!list->empty() && static_cast<int64_t>(list->size()) != n) return 0;
  }
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    if (!param.defined() || param.layout() != c10::kStrided || param.is_meta() ||
        !is_supported_param_dtype(param.scalar_type()) || !param.is_non_overlapping_and_dense() ||
        !is_resolved(param) || !writable(param)) {
      return i;
    }
    const std::optional<at::Tensor> grad = grads[i];
    if (!grad.has_value() || !companion_matches(param, *grad, param.scalar_type())) return i;
    const at::ScalarType expected = expected_state_dtype(param, state_dtype, min_quantized_numel);
    for (const auto& [state_list, scale_list] : states) {
      const std::optional<at::Tensor> state = present(*state_list, i);
      if (!state.has_value()) continue;
      if (!(companion_matches(param, *state, expected) && writable(*state))) return i;
      if (state->scalar_type() == at::kByte) {
        const std::optional<at::Tensor> scale = present(*scale_list, i);
        if (!scale.has_value() || !scale_matches(*state, *scale) || !writable(*scale)) return i;
      }
    }
    const std::optional<at::Tensor> step = present(state_steps, i);
    if (step.has_value() && !(step_matches(param, *step) && writable(*step))) return i;
  }
  return -1;
}

// How many elements a non-empty strided tensor spans in memory, from its first to its last
// (strides are >= 0 here).
int64_t extent(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * std::max<int64_t>(t.stride(d), 0);
  return last + 1;
}

// Every element's address of a strided tensor, as int64 (for the exact overlap test of views).
at::Tensor element_addresses(const at::Tensor& t) {
  const at::Tensor offsets = at::arange(extent(t), at::TensorOptions().dtype(at::kLong))
                                 .as_strided(t.sizes(), t.strides());
  return offsets.mul(t.element_size()).add(reinterpret_cast<int64_t>(t.const_data_ptr()));
}

// Whether two tensors share an element, for tensors whose address ranges intersect: decided by
// the ranges for dense tensors, element by element (their address sets) when either has gaps.
// Elements are taken as equally sized, as views of one storage are.
bool share_an_element(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense()) return true;
  return at::isin(element_addresses(a), element_addresses(b)).any().item<bool>();
}

// The positions, in one flat list, of the first two tensors that share memory; empty when none
// do. The Python checks run it over everything a step writes (all lists, all groups), before any
// tensor is copied or written; the op itself runs check_no_overlap on what reaches it.
std::vector<int64_t> overlapping_pair(at::TensorList tensors) {
  struct Range {
    uintptr_t begin;
    uintptr_t end;
    int64_t index;
  };
  std::vector<Range> ranges;
  ranges.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (!t.defined() || t.numel() == 0 || t.layout() != c10::kStrided || t.is_meta()) continue;
    const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    ranges.push_back({begin, begin + static_cast<uintptr_t>(extent(t) * t.element_size()),
                      static_cast<int64_t>(i)});
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin < b.begin; });
  // Sweep by start, keeping the ranges still open (usually none or one: views of one storage).
  std::vector<size_t> open;
  for (size_t k = 0; k < ranges.size(); ++k) {
    open.erase(std::remove_if(open.begin(), open.end(),
                              [&](size_t j) { return ranges[j].end <= ranges[k].begin; }),
               open.end());
    for (size_t j : open) {
      if (share_an_element(tensors[ranges[j].index], tensors[ranges[k].index])) {
        return {std::min(ranges[j].index, ranges[k].index),
                std::max(ranges[j].index, ranges[k].index)};
      }
    }
    open.push_back(k);
  }
  return {};
}

// The code maps of 8-bit state (blockwise_quant.h), for the tests and the Python mirror's check.
at::Tensor code_map(bool is_signed) {
  at::Tensor map = at::empty({quantization::kCodes}, at::TensorOptions().dtype(at::kFloat));
  std::memcpy(map.data_ptr<float>(), quantization::code_map(is_signed),
              sizeof(float) * quantization::kCodes);
  return map;
}

// The C++ quantizer on a contiguous float32 CPU tensor, as the CPU kernel encodes a block:
// (codes, scales). For the tests, which check it against a brute-force nearest-code search,
// against the branchless binary search (quantize_code) and against the reference's.
std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& values, bool is_signed) {
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == at::kFloat &&
                  values.is_contiguous(),
              "rmsprop_fused: quantize_blockwise takes a contiguous float32 CPU tensor");
  const int64_t n = values.numel();
  at::Tensor codes = at::empty(values.sizes(), values.options().dtype(at::kByte));
  at::Tensor scales = at::empty({quant_blocks(n)}, values.options());
  const float* x = values.data_ptr<float>();
  uint8_t* c = codes.data_ptr<uint8_t>();
  float* s = scales.data_ptr<float>();
  const quantization::CodeTable& table = quantization::code_table(is_signed);
  for (int64_t block = 0; block < quant_blocks(n); ++block) {
    const int64_t begin = block * quantization::kQuantBlock;
    cpu::encode_state_block(x + begin, std::min(quantization::kQuantBlock, n - begin), c + begin,
                            s + block, table);
  }
  return {codes, scales};
}

// quantize() (the binary search the GPU kernels run) of each element of a float32 CPU tensor.
at::Tensor quantize_code(const at::Tensor& values, bool is_signed) {
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == at::kFloat &&
                  values.is_contiguous(),
              "rmsprop_fused: quantize_code takes a contiguous float32 CPU tensor");
  at::Tensor codes = at::empty(values.sizes(), values.options().dtype(at::kByte));
  const float* x = values.data_ptr<float>();
  uint8_t* c = codes.data_ptr<uint8_t>();
  for (int64_t i = 0; i < values.numel(); ++i) {
    c[i] = quantization::quantize(x[i], quantization::code_map(is_signed));
  }
  return codes;
}

// The step's kernels for the Autograd and ADInplaceOrView keys, the two layers torch's own in-place
// ops pass through. The step is not differentiable (FusedRMSprop(differentiable=True) runs the
// reference backend), so autograd records nothing, as for torch.optim's steps under no_grad; the
// ADInplaceOrView layer bumps the version counter of every tensor the step writes, as it does for
// torch's in-place ops (autograd then refuses a backward through a tensor saved before the step,
// instead of computing it from the new values; in inference mode it still runs for normal
// tensors). Both redispatch unboxed: autograd's fallback for custom ops would box every list of
// every call (docs/DESIGN.md section 2).
template <bool kBumpsVersions>
void redispatch_step(c10::DispatchKeySet keys, at::TensorList params, at::TensorList grads,
                     at::TensorList square_avgs, at::TensorList grad_avgs,
                     at::TensorList momentum_buffers, at::TensorList state_steps,
                     at::TensorList square_avg_scales, at::TensorList grad_avg_scales,
                     at::TensorList momentum_buffer_scales, double lr, double alpha, double eps,
                     double weight_decay, double momentum, bool centered, bool maximize,
                     bool eps_in_sqrt, bool lr_in_momentum, bool decoupled_weight_decay,
                     bool nesterov, bool bias_correction, bool variance_state,
                     std::optional<int64_t> rounding_seed,
                     const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& clip_coef) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rmsprop_fused::rmsprop_", "")
                             .typed<OpSignature>();
  {
    std::conditional_t<kBumpsVersions, at::AutoDispatchBelowADInplaceOrView,
                       at::AutoDispatchBelowAutograd>
        below;
    op.redispatch(keys & (kBumpsVersions ? c10::after_ADInplaceOrView_keyset
                                         : c10::after_autograd_keyset),
                  params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps,
                  square_avg_scales, grad_avg_scales, momentum_buffer_scales, lr, alpha, eps,
                  weight_decay, momentum, centered, maximize, eps_in_sqrt, lr_in_momentum,
                  decoupled_weight_decay, nesterov, bias_correction, variance_state, rounding_seed,
                  lr_tensor, grad_scale, found_inf, clip_coef);
  }
  if constexpr (kBumpsVersions) {
    // (after the step: a refused one throws above, and changes nothing, versions included)
    for (const at::TensorList list :
         {params, square_avgs, grad_avgs, momentum_buffers, state_steps, square_avg_scales,
          grad_avg_scales, momentum_buffer_scales,
          grad_scale.has_value() ? grads : at::TensorList{}}) {
      for (const at::Tensor& t : list) {
        if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
      }
    }
  }
}

}  // namespace
}  // namespace rmsprop_fused

TORCH_LIBRARY_IMPL(rmsprop_fused, Autograd, m) {
  m.impl("rmsprop_", &rmsprop_fused::redispatch_step<false>);
}

TORCH_LIBRARY_IMPL(rmsprop_fused, ADInplaceOrView, m) {
  m.impl("rmsprop_", &rmsprop_fused::redispatch_step<true>);
}

TORCH_LIBRARY(rmsprop_fused, m) {
  // The step (docs/DESIGN.md sections 1 and 2). Every tensor list is mutated: params, state,
  // step counters and scales always; grads when grad_scale unscales them.
  m.def(
      "rmsprop_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "
      "Tensor(d!)[] grad_avgs, Tensor(e!)[] momentum_buffers, Tensor(f!)[] state_steps, "
      "Tensor(g!)[] square_avg_scales, Tensor(h!)[] grad_avg_scales, "
      "Tensor(i!)[] momentum_buffer_scales, *, float lr, float alpha, float eps, "
      "float weight_decay, float momentum, bool centered, bool maximize, bool eps_in_sqrt, "
      "bool lr_in_momentum, bool decoupled_weight_decay, bool nesterov, bool bias_correction, "
      "bool variance_state, int? rounding_seed=None, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None) -> ()");
  m.def(
      "first_irregular(Tensor[] params, Tensor?[] grads, Tensor?[] square_avgs, "
      "Tensor?[] grad_avgs, Tensor?[] momentum_buffers, Tensor?[] state_steps, "
      "Tensor?[] square_avg_scales, Tensor?[] grad_avg_scales, Tensor?[] momentum_buffer_scales, "
      "ScalarType? state_dtype, int min_quantized_numel) -> int",
      &rmsprop_fused::first_irregular);
  m.def("overlapping_pair(Tensor[] tensors) -> int[]", &rmsprop_fused::overlapping_pair);
  m.def("code_map(bool signed) -> Tensor", &rmsprop_fused::code_map);
  m.def("quantize_blockwise(Tensor values, bool signed) -> (Tensor, Tensor)",
        &rmsprop_fused::quantize_blockwise);
  m.def("quantize_code(Tensor values, bool signed) -> Tensor", &rmsprop_fused::quantize_code);
}
