// The fused CPU step: one pass over each tensor (read p, g and the state once, write them once),
// with the elements of all tensors split evenly between at::parallel_for's threads. The inner
// loop is plain scalar code over __restrict__ pointers that GCC vectorises: built with -O3,
// -fno-math-errno (so sqrt vectorises), -fno-trapping-math (so the option selects become blends)
// and -ffp-contract=off (one rounding per operation, like the GPU kernels); 16-bit elements go through
// element_codec.h. tests/test_cpu_kernel.py reads the machine code to check all of this.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../rmsprop_op.h"
#include "../rmsprop_update.h"
#include "element_codec.h"

namespace rmsprop_fused {
namespace {

// Below this many elements in a whole call, one thread does the work: waking the thread pool
// costs more than it saves (at::parallel_for runs inline when the range fits in one grain).
constexpr int64_t kParallelGrain = 1 << 15;

// The tensors' data as the codec's storage type (uint16_t for the 16-bit types).
template <typename scalar_t>
struct Pointers {
  using storage_t = typename cpu::ElementCodec<scalar_t>::storage_t;
  storage_t* param;
  storage_t* grad;
  storage_t* square_avg;
  storage_t* grad_avg;
  storage_t* momentum_buffer;
};

template <typename scalar_t>
typename cpu::ElementCodec<scalar_t>::storage_t* storage_of(const at::Tensor& t) {
  return reinterpret_cast<typename cpu::ElementCodec<scalar_t>::storage_t*>(t.data_ptr<scalar_t>());
}

// The loop is compute-bound with SSE2's 4-wide sqrt and division (about 3 cycles an element, the
// speed one core can stream memory at), so it is compiled again for x86-64-v3 (AVX2) and x86-64-v4
// (AVX-512 F/BW/DQ/VL: 16-bit elements in 512-bit registers too), and the widest one the CPU has
// is picked when the extension loads (GCC function multiversioning). The clones round alike:
// -ffp-contract=off keeps FMA out of all of them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__)
#define RMSPROP_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RMSPROP_CPU_CLONES
#endif

// How far ahead of the loop each stream is prefetched. The hardware prefetcher stops at every
// 4 KiB page boundary and must retrain, and one core keeps too few misses in flight for its
// three to five streams to hide the memory latency: prefetching 1 KiB ahead took the GPT-2-small
// fp32 step of bench/bench_step.py from 59 to 53 ms (42 to 47 GB/s) on the 2-core Xeon of
// bench/results. 512 B helped less (55 ms); 2 and 4 KiB no more than 1 KiB.
constexpr int64_t kPrefetchBytes = 1024;
constexpr int64_t kCacheLineBytes = 64;

template <typename storage_t>
inline void prefetch_ahead(const storage_t* stream, int64_t i) {
  __builtin_prefetch(stream + i + kPrefetchBytes / int64_t(sizeof(storage_t)), /*rw=*/0,
                     /*locality=*/3);
}

// One element, loaded and stored through the codec.
template <typename scalar_t, bool kCentered, bool kMomentum, bool kUnscaleGrad, typename storage_t>
inline __attribute__((always_inline)) void update_element(
    storage_t* __restrict__ param, storage_t* __restrict__ grad, storage_t* __restrict__ square_avg,
    storage_t* __restrict__ grad_avg, storage_t* __restrict__ momentum_buffer, int64_t i,
    const StepScalars<at::opmath_type<scalar_t>>& scalars) {
  using Codec = cpu::ElementCodec<scalar_t>;
  using opmath_t = typename Codec::opmath_t;
  opmath_t p = Codec::load(param[i]);
  opmath_t g = Codec::load(grad[i]);
  opmath_t v = Codec::load(square_avg[i]);
  opmath_t m = kCentered ? Codec::load(grad_avg[i]) : opmath_t(0);
  opmath_t b = kMomentum ? Codec::load(momentum_buffer[i]) : opmath_t(0);
  // A copy per element, which the compiler keeps in registers, where unscale_grad is a
  // constant: without AMP there is no division by 1.
  StepScalars<opmath_t> s = scalars;
  s.unscale_grad = kUnscaleGrad;
  rmsprop_update<kCentered, kMomentum>(p, g, v, m, b, s);
  param[i] = Codec::store(p);
  square_avg[i] = Codec::store(v);
  if (kUnscaleGrad) grad[i] = Codec::store(g);
  if (kCentered) grad_avg[i] = Codec::store(m);
  if (kMomentum) momentum_buffer[i] = Codec::store(b);
}

// The pointers are __restrict__ parameters: GCC honours restrict reliably only on parameters,
// and without it the loop needs a runtime alias check per pair of its up to ten streams, more than
// the vectoriser will version for.
template <typename scalar_t, bool kCentered, bool kMomentum, bool kUnscaleGrad,
          typename storage_t = typename cpu::ElementCodec<scalar_t>::storage_t>
RMSPROP_CPU_CLONES void update_range(storage_t* __restrict__ param, storage_t* __restrict__ grad,
                                     storage_t* __restrict__ square_avg,
                                     storage_t* __restrict__ grad_avg,
                                     storage_t* __restrict__ momentum_buffer, int64_t begin,
                                     int64_t end,
                                     const StepScalars<at::opmath_type<scalar_t>> scalars) {
  static_assert(kCacheLineBytes % sizeof(storage_t) == 0);
  constexpr int64_t kLine = kCacheLineBytes / sizeof(storage_t);
  constexpr int64_t kAhead = kPrefetchBytes / sizeof(storage_t);
  // A cache line of each stream at a time, prefetching the line kPrefetchBytes ahead; the
  // prefetches stop where they would leave the range. The inner loop runs over a constant kLine
  // elements, whole vectors without a remainder. GCC unrolls so short a loop completely before its
  // loop vectoriser runs, and what is left to its straight-line vectoriser stayed scalar for
  // float64: `omp simd` (setup.py passes -fopenmp-simd) has it vectorised as a loop in every variant.
  int64_t i = begin;
  for (; i + kAhead + kLine <= end; i += kLine) {
    prefetch_ahead(param, i);
    prefetch_ahead(grad, i);
    prefetch_ahead(square_avg, i);
    if (kCentered) prefetch_ahead(grad_avg, i);
    if (kMomentum) prefetch_ahead(momentum_buffer, i);
#pragma omp simd
    for (int64_t k = 0; k < kLine; ++k) {
      update_element<scalar_t, kCentered, kMomentum, kUnscaleGrad>(
          param, grad, square_avg, grad_avg, momentum_buffer, i + k, scalars);
    }
  }
  for (; i < end; ++i) {
    update_element<scalar_t, kCentered, kMomentum, kUnscaleGrad>(
        param, grad, square_avg, grad_avg, momentum_buffer, i, scalars);
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
    pointers[t] = {storage_of<scalar_t>(lists.params[t]), storage_of<scalar_t>(lists.grads[t]),
                   storage_of<scalar_t>(lists.square_avgs[t]),
                   kCentered ? storage_of<scalar_t>(lists.grad_avgs[t]) : nullptr,
                   kMomentum ? storage_of<scalar_t>(lists.momentum_buffers[t]) : nullptr};
    starts[t + 1] = starts[t] + lists.params[t].numel();
  }
  at::parallel_for(0, starts[n], kParallelGrain, [&](int64_t begin, int64_t end) {
    // the last tensor starting at or before `begin` (zero-size tensors are skipped over)
    size_t t = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (; t < n && starts[t] < end; ++t) {
      const int64_t first = std::max(begin, starts[t]) - starts[t];
      const int64_t last = std::min(end, starts[t + 1]) - starts[t];
      if (first >= last) continue;
      const Pointers<scalar_t>& p = pointers[t];
      if (unscale_grad) {
        update_range<scalar_t, kCentered, kMomentum, true>(
            p.param, p.grad, p.square_avg, p.grad_avg, p.momentum_buffer, first, last, scalars);
      } else {
        update_range<scalar_t, kCentered, kMomentum, false>(
            p.param, p.grad, p.square_avg, p.grad_avg, p.momentum_buffer, first, last, scalars);
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
