// The op schema, defined once. Implementations are registered per backend with
// TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/; the Python wrapper is
// rmsprop_fused/_extension.py, and a fake (meta) implementation for torch.compile is registered
// there too.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import rmsprop_fused._C` loads this shared object, which runs the static registrations below.
// The module itself has no attributes: the entry point is torch.ops.rmsprop_fused.rmsprop_.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rmsprop_fused, m) {
  m.def(
      "rmsprop_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "
      "Tensor(d!)[] grad_avgs, Tensor(e!)[] momentum_buffers, *, float lr, float alpha, "
      "float eps, float weight_decay, float momentum, bool centered, bool maximize, "
      "bool eps_in_sqrt, bool lr_in_momentum, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}
