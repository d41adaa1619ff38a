// total_norm.h: small tensors summed here in double, large ones by at::linalg_vector_norm (its
// vectorised, parallel kernel), combined as the norm of the norms is (sums of p-th powers, or the
// maximum for inf), with NaN propagated as torch propagates it.
#include "total_norm.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

namespace rmsprop_fused {
namespace cpu {
namespace {

// Below this a tensor is summed by the loop here (a few microseconds at most).
constexpr int64_t kTotalNormLoopNumel = 4096;

// What the norm accumulates: sum |x|^p, or max |x| (NaN once any |x| is NaN).
struct PowerSum {
  double p;
  bool is_inf;
  double value = 0.0;
  void add_magnitude(double a) {
    if (is_inf) {
      value = (a > value || std::isnan(a)) && !std::isnan(value) ? a : value;
    } else if (p == 2.0) {
      value += a * a;
    } else if (p == 1.0) {
      value += a;
    } else {
      value += std::pow(a, p);
    }
  }
  // The norm of a whole tensor, as one more term.
  void add_norm(double norm) { add_magnitude(norm); }
  double norm() const {
    if (is_inf || p == 1.0) return value;
    return p == 2.0 ? std::sqrt(value) : std::pow(value, 1.0 / p);
  }
};

}  // namespace

at::Tensor total_norm(const std::vector<at::Tensor>& tensors, double norm_type) {
  TORCH_CHECK_VALUE(!tensors.empty(), "rmsprop_fused: total_norm of no tensors");
  TORCH_CHECK_VALUE(norm_type > 0, "rmsprop_fused: total_norm: norm_type must be > 0, got ",
                    norm_type);
  at::ScalarType accumulate = at::kFloat;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK_VALUE(t.device().is_cpu() && at::isFloatingType(t.scalar_type()),
                      "rmsprop_fused: total_norm takes floating CPU tensors, got a ",
                      t.scalar_type(), " tensor on ", t.device());
    if (t.scalar_type() == at::kDouble) accumulate = at::kDouble;
  }
  PowerSum sum{norm_type, std::isinf(norm_type)};
  for (const at::Tensor& t : tensors) {
    if (t.numel() >= kTotalNormLoopNumel || !t.is_contiguous()) {
      const at::ScalarType in = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      sum.add_norm(at::linalg_vector_norm(t, norm_type, std::nullopt, false, in).item<double>());
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "total_norm", [&] {
      const scalar_t* data = t.const_data_ptr<scalar_t>();
      for (int64_t i = 0, n = t.numel(); i < n; ++i) {
        sum.add_magnitude(std::abs(static_cast<double>(data[i])));
      }
    });
  }
  return at::scalar_tensor(sum.norm(), at::TensorOptions().dtype(accumulate));
}

}  // namespace cpu
}  // namespace rmsprop_fused
