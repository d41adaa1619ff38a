// The norm of many CPU tensors together, for clipping (rmsprop_fused/clipping.py): torch's
// _foreach_norm is one norm op per tensor on the CPU (3-8 us each); this walks the small ones
// directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace rmsprop_fused {
namespace cpu {

// The norm of order norm_type (> 0, or inf) of all elements of `tensors` (floating CPU tensors),
// as a 0-d tensor in float32, or float64 when any tensor is float64 (as torch's norm of the norms
// would promote). Tensors of at least 4,096 elements, or not contiguous, are normed by torch's
// own op. ValueError, before any work, for a tensor elsewhere or of another dtype.
at::Tensor total_norm(const std::vector<at::Tensor>& tensors, double norm_type);

}  // namespace cpu
}  // namespace rmsprop_fused
