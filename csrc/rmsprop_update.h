// The per-element RMSprop update, written once. The CPU kernel (csrc/cpu), the CUDA kernel
// (csrc/cuda) and the host build of the CUDA kernel used by the tests all include this header,
// so the CPU tests exercise exactly the arithmetic that runs on the GPU.
//
// Order of operations is torch.optim.RMSprop's single-tensor path (torch/optim/rmsprop.py),
// operation by operation, each rounded once: with FMA contraction disabled (-ffp-contract=off on
// the host, --fmad=false for nvcc) every backend computes the same bits. (torch's own CPU kernels
// fuse some of these multiply-adds and take a sqrt that is not always correctly rounded, so they
// agree with this to a few ulps.)
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define RMSPROP_HOST_DEVICE __host__ __device__
#define RMSPROP_FORCE_INLINE __forceinline__
#else
#define RMSPROP_HOST_DEVICE
#define RMSPROP_FORCE_INLINE inline __attribute__((always_inline))
#endif

namespace rmsprop_fused {

// The hyperparameters of one step in the arithmetic type ("opmath": float for fp16, bf16 and
// fp32 tensors, double for fp64). Built once on the host by make_step_scalars; lr and grad_scale
// may be overwritten on the device from tensors (capturable lr, AMP scale) before the update.
template <typename opmath_t>
struct StepScalars {
  opmath_t lr;
  opmath_t alpha;
  opmath_t one_minus_alpha;   // rounded once from double, as torch passes `1 - alpha`
  opmath_t lerp_one_minus_w;  // opmath(1) - one_minus_alpha, torch's lerp for large weights
  opmath_t eps_inside_root;   // eps when eps_in_sqrt, else 0 (x + 0 == x exactly)
  opmath_t eps_outside_root;  // 0 when eps_in_sqrt, else eps
  opmath_t weight_decay;
  opmath_t momentum;
  opmath_t grad_scale;        // grads are divided by it when unscale_grad is set
  bool maximize;
  bool has_weight_decay;      // torch skips `g + wd * p` entirely when wd == 0 (matters for inf p)
  bool lerp_weight_small;     // torch's lerp picks its formula by |weight| < 0.5
  bool lr_in_momentum;
  bool unscale_grad;
};

template <typename opmath_t>
inline StepScalars<opmath_t> make_step_scalars(double lr, double alpha, double eps,
                                               double weight_decay, double momentum,
                                               bool maximize, bool eps_in_sqrt,
                                               bool lr_in_momentum) {
  StepScalars<opmath_t> s;
  s.lr = static_cast<opmath_t>(lr);
  s.alpha = static_cast<opmath_t>(alpha);
  s.one_minus_alpha = static_cast<opmath_t>(1.0 - alpha);
  s.lerp_one_minus_w = opmath_t(1) - s.one_minus_alpha;
  s.lerp_weight_small = std::abs(s.one_minus_alpha) < opmath_t(0.5);
  s.eps_inside_root = eps_in_sqrt ? static_cast<opmath_t>(eps) : opmath_t(0);
  s.eps_outside_root = eps_in_sqrt ? opmath_t(0) : static_cast<opmath_t>(eps);
  s.weight_decay = static_cast<opmath_t>(weight_decay);
  s.has_weight_decay = weight_decay != 0.0;
  s.momentum = static_cast<opmath_t>(momentum);
  s.grad_scale = opmath_t(1);
  s.maximize = maximize;
  s.lr_in_momentum = lr_in_momentum;
  s.unscale_grad = false;
  return s;
}

// `cond ? a : b` for a condition that is the same for every element (an option). On the GPU a
// uniform branch; on the host a bitwise blend, which GCC vectorises: a select on a bool read from
// memory stops its vectoriser once a loop holds more of them than it will unswitch. Same bits.
template <typename T>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE T select(bool cond, T a, T b) {
#if defined(__CUDA_ARCH__)
  return cond ? a : b;
#else
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(T) == sizeof(Bits), "select blends 32- and 64-bit floats");
  const Bits mask = Bits(0) - static_cast<Bits>(cond);  // all ones when cond
  return __builtin_bit_cast(T, (__builtin_bit_cast(Bits, a) & mask) |
                                   (__builtin_bit_cast(Bits, b) & ~mask));
#endif
}

RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE float square_root(float x) { return ::sqrtf(x); }
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE double square_root(double x) { return ::sqrt(x); }

// One element. `grad` is replaced by the unscaled gradient (what AMP writes back); `grad_avg`
// is touched only when kCentered, `momentum_buffer` only when kMomentum.
template <bool kCentered, bool kMomentum, typename T>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void rmsprop_update(T& param, T& grad, T& square_avg,
                                                             T& grad_avg, T& momentum_buffer,
                                                             const StepScalars<T>& s) {
  grad = select(s.unscale_grad, grad / s.grad_scale, grad);
  T g = select(s.maximize, -grad, grad);
  g = select(s.has_weight_decay, g + s.weight_decay * param, g);  // grad.add(param, alpha=wd)

  // square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
  square_avg = square_avg * s.alpha;
  square_avg = square_avg + s.one_minus_alpha * g * g;

  T var = square_avg;
  if (kCentered) {
    // grad_avg.lerp_(g, 1 - alpha), with torch's two-sided formula
    grad_avg = select(s.lerp_weight_small, grad_avg + s.one_minus_alpha * (g - grad_avg),
                      g - (g - grad_avg) * s.lerp_one_minus_w);
    // square_avg.addcmul(grad_avg, grad_avg, value=-1). torch computes it as one fused
    // multiply-add (its AVX2/AVX-512 and CUDA kernels), so +inf - m*m stays +inf for a finite m
    // even where m*m overflows; two roundings would give inf - inf = NaN. Finite results are the
    // same either way.
    const T inf = static_cast<T>(INFINITY);
    const bool finite_grad_avg = grad_avg < inf && grad_avg > -inf;  // false for NaN too
    var = (square_avg == inf && finite_grad_avg) ? square_avg : square_avg - grad_avg * grad_avg;
  }
  const T denom = square_root(var + s.eps_inside_root) + s.eps_outside_root;

  if (kMomentum) {
    // torch: buf.mul_(momentum).addcdiv_(g, denom); param.add_(buf, alpha=-lr)
    // TF/Keras/timm: buf = momentum * buf + lr * g / denom; param -= buf
    const T lr_into_buffer = s.lr_in_momentum ? s.lr : T(1);
    const T lr_onto_param = s.lr_in_momentum ? T(1) : s.lr;
    momentum_buffer = momentum_buffer * s.momentum;
    momentum_buffer = momentum_buffer + (lr_into_buffer * g) / denom;
    param = param - lr_onto_param * momentum_buffer;
  } else {
    param = param - (s.lr * g) / denom;  // param.addcdiv_(g, denom, value=-lr)
  }
}

}  // namespace rmsprop_fused
