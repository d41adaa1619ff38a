// The ops' schemas, defined once. rmsprop_ (the step) is implemented per backend with
// TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/; its Python wrapper is
// rmsprop_fused/_extension.py, and a fake (meta) implementation for torch.compile is registered
// there too. first_irregular (below) reads only metadata and serves every device.
#include <Python.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <optional>

#include "rmsprop_op.h"

extern "C" {
// `import rmsprop_fused._C` loads this shared object, which runs the static registrations below.
// The module itself has no attributes: the entry points are torch.ops.rmsprop_fused.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace rmsprop_fused {
namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: case at::kFloat: case at::kHalf: case at::kBFloat16:
    case at::kComplexDouble: case at::kComplexFloat:
      return true;
    default:
      return false;
  }
}

// The fast path of the Python checks (functional.check_param): the index of the first param
// that is not plainly acceptable, or -1. Plainly acceptable: a strided, dense, real or complex
// param of a supported dtype that has data, is no conjugate or negative view and may be written
// here; a grad, and whatever state it already has (None: not created yet), of its dtype, shape,
// device and memory layout (companion_matches, which the kernels' own checks use); state that may
// be written. One C++ pass over all params costs well under a microsecond each, where reading
// these attributes from Python cost several. For an irregular param the Python checks run and say
// what is wrong, or accept what this does not cover. Callers pass plain torch.Tensor and
// nn.Parameter objects only: a tensor subclass would dispatch this op to its own handler.
// Companion lists are empty when unused (grad_avgs unless centered, say).
int64_t first_irregular(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                        const c10::List<std::optional<at::Tensor>>& square_avgs,
                        const c10::List<std::optional<at::Tensor>>& grad_avgs,
                        const c10::List<std::optional<at::Tensor>>& momentum_buffers) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, "rmsprop_fused: got ", grads.size(),
              " grads for ", n, " params");
  const bool inference_mode = c10::InferenceMode::is_enabled();
  const auto writable = [&](const at::Tensor& t) { return inference_mode || !t.is_inference(); };
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    if (!param.defined() || param.layout() != c10::kStrided || param.is_meta() ||
        !is_supported_dtype(param.scalar_type()) || !param.is_non_overlapping_and_dense() ||
        !is_resolved(param) || !writable(param)) {
      return i;
    }
    const std::optional<at::Tensor> grad = grads[i];
    if (!grad.has_value() || !companion_matches(param, *grad)) return i;
    for (const auto* states : {&square_avgs, &grad_avgs, &momentum_buffers}) {
      if (states->empty()) continue;
      if (static_cast<int64_t>(states->size()) != n) return i;
      const std::optional<at::Tensor> state = (*states)[i];
      if (state.has_value() && !(companion_matches(param, *state) && writable(*state))) return i;
    }
  }
  return -1;
}

}  // namespace
}  // namespace rmsprop_fused

TORCH_LIBRARY(rmsprop_fused, m) {
  m.def(
      "rmsprop_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "
      "Tensor(d!)[] grad_avgs, Tensor(e!)[] momentum_buffers, *, float lr, float alpha, "
      "float eps, float weight_decay, float momentum, bool centered, bool maximize, "
      "bool eps_in_sqrt, bool lr_in_momentum, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "first_irregular(Tensor[] params, Tensor?[] grads, Tensor?[] square_avgs, "
      "Tensor?[] grad_avgs, Tensor?[] momentum_buffers) -> int",
      &rmsprop_fused::first_irregular);
}
