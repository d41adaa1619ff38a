// The fused CPU step: one pass over each tensor (read p, g and the state once, write them once),
// with the elements of all tensors split evenly between at::parallel_for's threads. The inner loop is plain
// scalar code over __restrict__ pointers that GCC vectorises (built with -O3 -fno-math-errno so
// that sqrt vectorises too, and -ffp-contract=off so it rounds exactly like torch's CPU ops).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../rmsprop_op.h"
#include "../rmsprop_update.h"

namespace rmsprop_fused {
namespace {

// Below this many elements in a whole call, one thread does the work: waking the thread pool
// costs more than it saves (at::parallel_for runs inline when the range fits in one grain).
constexpr int64_t kParallelGrain = 1 << 15;

template <typename scalar_t>
struct Pointers {
  scalar_t* __restrict__ param;
  scalar_t* __restrict__ grad;
  scalar_t* __restrict__ square_avg;
  scalar_t* __restrict__ grad_avg;
  scalar_t* __restrict__ momentum_buffer;
};

// The loop is compute-bound with SSE2's 4-wide sqrt and division (about 3 cycles an element, the
// speed one core can stream memory at), so it is compiled again for AVX2 and AVX-512 and the
// widest one the CPU has is picked when the extension loads (GCC function multiversioning). The
// clones round alike: -ffp-contract=off keeps FMA out of all of them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__)
#define RMSPROP_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RMSPROP_CPU_CLONES
#endif

template <typename scalar_t, bool kCentered, bool kMomentum, bool kUnscaleGrad>
RMSPROP_CPU_CLONES void update_range(const Pointers<scalar_t> ptr, int64_t begin, int64_t end,
                                     StepScalars<at::opmath_type<scalar_t>> scalars) {
  using opmath_t = at::opmath_type<scalar_t>;
  scalars.unscale_grad = kUnscaleGrad;  // a constant: no division by 1 when there is no AMP scale
  scalar_t* __restrict__ param = ptr.param;
  scalar_t* __restrict__ grad = ptr.grad;
  scalar_t* __restrict__ square_avg = ptr.square_avg;
  scalar_t* __restrict__ grad_avg = ptr.grad_avg;
  scalar_t* __restrict__ momentum_buffer = ptr.momentum_buffer;
  for (int64_t i = begin; i < end; ++i) {
    opmath_t p = static_cast<opmath_t>(param[i]);
    opmath_t g = static_cast<opmath_t>(grad[i]);
    opmath_t v = static_cast<opmath_t>(square_avg[i]);
    opmath_t m = kCentered ? static_cast<opmath_t>(grad_avg[i]) : opmath_t(0);
    opmath_t b = kMomentum ? static_cast<opmath_t>(momentum_buffer[i]) : opmath_t(0);
    rmsprop_update<kCentered, kMomentum>(p, g, v, m, b, scalars);
    param[i] = static_cast<scalar_t>(p);
    square_avg[i] = static_cast<scalar_t>(v);
    if (kUnscaleGrad) grad[i] = static_cast<scalar_t>(g);
    if (kCentered) grad_avg[i] = static_cast<scalar_t>(m);
    if (kMomentum) momentum_buffer[i] = static_cast<scalar_t>(b);
  }
}

template <typename scalar_t, bool kCentered, bool kMomentum>
void update_all(const TensorLists& lists, const StepScalars<at::opmath_type<scalar_t>>& scalars,
                bool unscale_grad) {
  // All tensors are treated as one range of elements, split evenly between the threads: a
  // thread's share may start and end in the middle of a tensor, so one huge embedding and
  // thousands of small biases balance alike.
  const size_t n = lists.params.size();
  std::vector<Pointers<scalar_t>> pointers(n);
  std::vector<int64_t> starts(n + 1, 0);  // starts[t]: index of tensor t's first element
  for (size_t t = 0; t < n; ++t) {
    pointers[t] = {lists.params[t].data_ptr<scalar_t>(), lists.grads[t].data_ptr<scalar_t>(),
                   lists.square_avgs[t].data_ptr<scalar_t>(),
                   kCentered ? lists.grad_avgs[t].data_ptr<scalar_t>() : nullptr,
                   kMomentum ? lists.momentum_buffers[t].data_ptr<scalar_t>() : nullptr};
    starts[t + 1] = starts[t] + lists.params[t].numel();
  }
  at::parallel_for(0, starts[n], kParallelGrain, [&](int64_t begin, int64_t end) {
    // the last tensor starting at or before `begin` (zero-size tensors are skipped over)
    size_t t = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (; t < n && starts[t] < end; ++t) {
      const int64_t first = std::max(begin, starts[t]) - starts[t];
      const int64_t last = std::min(end, starts[t + 1]) - starts[t];
      if (first >= last) continue;
      if (unscale_grad) {
        update_range<scalar_t, kCentered, kMomentum, true>(pointers[t], first, last, scalars);
      } else {
        update_range<scalar_t, kCentered, kMomentum, false>(pointers[t], first, last, scalars);
      }
    }
  });
}

void rmsprop_cpu_(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                  at::TensorList grad_avgs, at::TensorList momentum_buffers, double lr,
                  double alpha, double eps, double weight_decay, double momentum, bool centered,
                  bool maximize, bool eps_in_sqrt, bool lr_in_momentum,
                  const std::optional<at::Tensor>& lr_tensor,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf) {
  const TensorLists lists{params, grads, square_avgs, grad_avgs, momentum_buffers};
  check_op_args(lists, centered, momentum, lr_tensor, grad_scale, found_inf, c10::DeviceType::CPU);
  if (params.empty()) return;
  // Any nonzero found_inf (GradScaler sums the flags of several devices) skips the whole step.
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;
  if (lr_tensor.has_value()) lr = lr_tensor->item<double>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "rmsprop_fused_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto scalars = make_step_scalars<opmath_t>(lr, alpha, eps, weight_decay, momentum, maximize,
                                               eps_in_sqrt, lr_in_momentum);
    if (grad_scale.has_value()) {
      scalars.unscale_grad = true;
      scalars.grad_scale = static_cast<opmath_t>(grad_scale->item<double>());
    }
    const bool unscale_grad = grad_scale.has_value();
    if (centered && momentum > 0) {
      update_all<scalar_t, true, true>(lists, scalars, unscale_grad);
    } else if (centered) {
      update_all<scalar_t, true, false>(lists, scalars, unscale_grad);
    } else if (momentum > 0) {
      update_all<scalar_t, false, true>(lists, scalars, unscale_grad);
    } else {
      update_all<scalar_t, false, false>(lists, scalars, unscale_grad);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rmsprop_fused, CPU, m) { m.impl("rmsprop_", &rmsprop_cpu_); }

}  // namespace rmsprop_fused
