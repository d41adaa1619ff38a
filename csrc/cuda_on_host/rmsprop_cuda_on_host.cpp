// The CUDA kernel's own source (csrc/cuda/multi_tensor_kernel.h and multi_tensor_op.h) compiled
// for the host, so the tests check the GPU code path on machines without a GPU
// (tests/test_cuda_kernel_on_host.py). Two ops, on CPU tensors:
//
//   rmsprop_cuda_on_host_   rmsprop_'s arguments plus the planning knobs; counts the steps and
//                           plans exactly as the CUDA op does, then for every launch calls
//                           rmsprop_block for every block index and every thread index (every
//                           warp, for 8-bit state) in a loop. Returns the number of update
//                           launches. A knob left None takes the CUDA op's value;
//                           kernel_param_bytes picks the LaunchArgs variant (32,764 or 4,096
//                           bytes, both of which the CUDA op has).
//   cuda_launch_count       the update launch count of the CUDA op's planner for tensors of the
//                           given sizes at a depth (3 + centered + momentum), with or without
//                           8-bit state, for a kernel-parameter budget (default 32,764 bytes).
//
// The schemas are a fragment of the rmsprop_fused library defined in csrc/rmsprop_op.cpp; this
// module can be loaded with or without rmsprop_fused._C. The update launches are instantiated per
// param dtype in rmsprop_cuda_on_host_<dtype>.cpp, as the CUDA op's are.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "../rmsprop_op.h"
#include "host_launch.h"

extern "C" {
// `import rmsprop_fused._cuda_on_host` loads this shared object, which registers the ops below.
PyObject* PyInit__cuda_on_host(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda_on_host", nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}

namespace rmsprop_fused {
namespace {

using multi_tensor::LaunchLimits;

constexpr int64_t kMaxThreadsPerBlock = 1024;  // CUDA's limit on blockDim.x

void check_budget(int64_t param_bytes) {
  TORCH_CHECK(param_bytes == multi_tensor::kLargeKernelParamBytes ||
                  param_bytes == multi_tensor::kSmallKernelParamBytes,
              "rmsprop_fused: kernel_param_bytes must be ", multi_tensor::kLargeKernelParamBytes,
              " or ", multi_tensor::kSmallKernelParamBytes, " (the two LaunchArgs budgets), got ",
              param_bytes);
}

void check_limits(const LaunchLimits& limits, const TensorLists& lists, int64_t param_bytes,
                  int64_t block_dim) {
  const int64_t capacity =
      multi_tensor::max_segments_per_launch(multi_tensor::call_pointers(lists), param_bytes);
  TORCH_CHECK(limits.max_tensors_per_launch >= 1 && limits.max_tensors_per_launch <= capacity,
              "rmsprop_fused: max_tensors_per_launch must be in [1, ", capacity,
              "] (what one launch's ", param_bytes, " bytes of parameters hold at depth ",
              lists.depth(), lists.quantized() ? " with 8-bit state" : "", "), got ",
              limits.max_tensors_per_launch);
  TORCH_CHECK(limits.max_chunks_per_launch >= 1 &&
                  limits.max_chunks_per_launch <= multi_tensor::kMaxChunksPerLaunch,
              "rmsprop_fused: max_chunks_per_launch must be in [1, ",
              multi_tensor::kMaxChunksPerLaunch, "] (the grid limit), got ",
              limits.max_chunks_per_launch);
  TORCH_CHECK(limits.chunk_size >= 1 && limits.chunk_size <= multi_tensor::kMaxChunkSize,
              "rmsprop_fused: chunk_size must be in [1, 2^30] (32-bit offsets in a chunk), got ",
              limits.chunk_size);
  TORCH_CHECK(block_dim >= 1 && block_dim <= kMaxThreadsPerBlock,
              "rmsprop_fused: block_dim must be in [1, ", kMaxThreadsPerBlock, "], got ",
              block_dim);
  if (lists.quantized()) {
    TORCH_CHECK(limits.chunk_size % quantization::kQuantBlock == 0,
                "rmsprop_fused: with 8-bit state chunk_size must be a multiple of ",
                quantization::kQuantBlock, " (whole blocks per chunk), got ", limits.chunk_size);
    TORCH_CHECK(block_dim % multi_tensor::kWarpSize == 0,
                "rmsprop_fused: with 8-bit state block_dim must be a multiple of ",
                multi_tensor::kWarpSize, " (whole warps), got ", block_dim);
  }
}

int64_t rmsprop_cuda_on_host_(
    at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
    at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList state_steps,
    at::TensorList square_avg_scales, at::TensorList grad_avg_scales,
    at::TensorList momentum_buffer_scales, double lr, double alpha, double eps,
    double weight_decay, double momentum, bool centered, bool maximize, bool eps_in_sqrt,
    bool lr_in_momentum, bool decoupled_weight_decay, bool nesterov, bool bias_correction,
    bool variance_state, std::optional<int64_t> rounding_seed,
    const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
    std::optional<int64_t> max_tensors_per_launch, std::optional<int64_t> max_chunks_per_launch,
    std::optional<int64_t> chunk_size, std::optional<int64_t> block_dim,
    std::optional<int64_t> kernel_param_bytes) {
  const StepArgs step{
      TensorLists{params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps,
                  square_avg_scales, grad_avg_scales, momentum_buffer_scales},
      Hyperparameters{lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt,
                      lr_in_momentum, decoupled_weight_decay, nesterov, bias_correction,
                      variance_state, rounding_seed},
      lr_tensor, grad_scale, found_inf, clip_coef};
  const int64_t param_bytes = kernel_param_bytes.value_or(multi_tensor::kLargeKernelParamBytes);
  check_budget(param_bytes);
  check_op_args(step, c10::DeviceType::CPU);
  const TensorLists& lists = step.lists;
  if (lists.params.empty()) return 0;
  const LaunchLimits production =
      multi_tensor::production_limits(multi_tensor::call_pointers(lists), param_bytes);
  const LaunchLimits limits{max_tensors_per_launch.value_or(production.max_tensors_per_launch),
                            max_chunks_per_launch.value_or(production.max_chunks_per_launch),
                            chunk_size.value_or(production.chunk_size)};
  const int64_t threads = block_dim.value_or(multi_tensor::kBlockDim);
  check_limits(limits, lists, param_bytes, threads);

  return multi_tensor::rmsprop_multi_tensor(
      step, param_bytes, limits,
      [](const auto& args, int64_t num_blocks) {
        for (int64_t t = 0; t < num_blocks * multi_tensor::kStepCounterBlockDim; ++t) {
          multi_tensor::increment_steps(args, t);
        }
      },
      [threads](auto tag, const multi_tensor::Call& call) {
        multi_tensor::launch_param_dtype_on_host<typename decltype(tag)::type>(call, threads);
      });
}

int64_t cuda_launch_count(c10::IntArrayRef numels, int64_t depth, bool quantized,
                          std::optional<int64_t> kernel_param_bytes) {
  TORCH_CHECK(depth >= 3 && depth <= 5, "rmsprop_fused: depth must be 3, 4 or 5, got ", depth);
  const int64_t bytes = kernel_param_bytes.value_or(multi_tensor::kLargeKernelParamBytes);
  check_budget(bytes);
  for (const int64_t n : numels) {
    TORCH_CHECK(n >= 0, "rmsprop_fused: numels must be >= 0, got ", n);
  }
  const int64_t pointers = multi_tensor::segment_pointers(depth, quantized);
  return static_cast<int64_t>(
      multi_tensor::plan_launches(numels.vec(), multi_tensor::production_limits(pointers, bytes))
          .size());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rmsprop_fused, m) {
  m.def(
      "rmsprop_cuda_on_host_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "
      "Tensor(d!)[] grad_avgs, Tensor(e!)[] momentum_buffers, Tensor(f!)[] state_steps, "
      "Tensor(g!)[] square_avg_scales, Tensor(h!)[] grad_avg_scales, "
      "Tensor(i!)[] momentum_buffer_scales, *, float lr, float alpha, float eps, "
      "float weight_decay, float momentum, bool centered, bool maximize, bool eps_in_sqrt, "
      "bool lr_in_momentum, bool decoupled_weight_decay, bool nesterov, bool bias_correction, "
      "bool variance_state, int? rounding_seed=None, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None, "
      "int? max_tensors_per_launch=None, int? max_chunks_per_launch=None, int? chunk_size=None, "
      "int? block_dim=None, int? kernel_param_bytes=None) -> int");
  m.def(
      "cuda_launch_count(int[] numels, int depth, bool quantized=False, "
      "int? kernel_param_bytes=None) -> int",
      &cuda_launch_count);
}

TORCH_LIBRARY_IMPL(rmsprop_fused, CPU, m) {
  m.impl("rmsprop_cuda_on_host_", &rmsprop_cuda_on_host_);
}

}  // namespace rmsprop_fused
