// The per-element RMSprop update, written once (docs/DESIGN.md section 1 states it in words). The
// CPU kernel (csrc/cpu), the CUDA kernel (csrc/cuda) and the host build of the CUDA kernel used by
// the tests all include this header, so the CPU tests exercise exactly the arithmetic that runs on
// the GPU; the Triton kernel and the reference follow it operation for operation.
//
// Order of operations is torch.optim.RMSprop's single-tensor path (torch/optim/rmsprop.py),
// operation by operation, each rounded once: with FMA contraction disabled (-ffp-contract=off on
// the host, --fmad=false for nvcc) every backend computes the same bits. (torch's own CPU kernels
// fuse some of these multiply-adds and take a sqrt that is not always correctly rounded, so they
// agree with this to a few ulps.) The options torch does not have (decoupled weight decay,
// Nesterov momentum, bias correction, clipping) follow timm, optax and torch.nn.utils.
//
// Storage is not this header's business: the kernels load every element into opmath through a
// codec (element_codec.h, blockwise_quant.h), call rmsprop_update, and store through the codec.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "element_codec.h"

namespace rmsprop_fused {

// The hyperparameters of one step in the arithmetic type ("opmath": float for fp16, bf16 and
// fp32 tensors, double for fp64). Built once on the host by make_step_scalars; the values that may
// come from device tensors (a capturable lr, the AMP scale, the clip coefficient) are overwritten
// where the kernel reads them, lr through set_learning_rate. bias_correction is per tensor: the
// kernels set it from each tensor's step count (bias_correction_at) before updating its elements.
template <typename opmath_t>
struct StepScalars {
  opmath_t lr;
  opmath_t alpha;
  opmath_t one_minus_alpha;   // rounded once from double, as torch passes `1 - alpha`
  opmath_t lerp_one_minus_w;  // opmath(1) - one_minus_alpha, torch's lerp for large weights
  opmath_t eps_inside_root;   // eps when eps_in_sqrt, else 0 (x + 0 == x exactly)
  opmath_t eps_outside_root;  // 0 when eps_in_sqrt, else eps (+0 for an eps of -0.0)
  opmath_t weight_decay;
  opmath_t momentum;
  opmath_t grad_scale;        // AMP: grads are divided by it (kernels built with kUnscaleGrad)
  opmath_t clip_coef;         // clipping by global norm: grads are multiplied by it
  opmath_t decay_factor;      // 1 - lr * weight_decay, the decoupled decay (set_learning_rate)
  opmath_t bias_correction;   // 1 - alpha^step of the tensor being updated
  double alpha_double;        // alpha as given, for the power in bias_correction_at
  bool maximize;
  bool coupled_weight_decay;    // g += wd * p; torch skips it entirely when wd == 0 (inf p)
  bool decoupled_weight_decay;  // p *= 1 - lr * wd before the update (timm, Keras, AdamW)
  bool lerp_weight_small;       // torch's lerp picks its formula by |weight| < 0.5
  bool lr_in_momentum;
  bool nesterov;
  bool use_bias_correction;
  bool clip;
  // Whether the step is torch's common one: the options above that have a cost per element all
  // off, eps outside the root, lr applied to the param, and lerp's formula for weights under 0.5
  // (alpha > 0.5). Kernels then run their kExtended = false instantiation, with the rest compiled
  // out (rmsprop_update: the same bits, an operation or a blend fewer where each is dropped).
  RMSPROP_HOST_DEVICE bool plain() const {
    return !maximize && !coupled_weight_decay && !decoupled_weight_decay && !nesterov &&
           !use_bias_correction && !clip && eps_inside_root == opmath_t(0) && !lr_in_momentum &&
           lerp_weight_small;
  }
};

// The same scalars in another arithmetic type of the same precision (the CPU's SIMD lanes, each
// value broadcast): every field, so extend it with the struct.
template <typename To, typename From>
inline StepScalars<To> convert_step_scalars(const StepScalars<From>& s) {
  StepScalars<To> t;
  t.lr = To(s.lr);
  t.alpha = To(s.alpha);
  t.one_minus_alpha = To(s.one_minus_alpha);
  t.lerp_one_minus_w = To(s.lerp_one_minus_w);
  t.eps_inside_root = To(s.eps_inside_root);
  t.eps_outside_root = To(s.eps_outside_root);
  t.weight_decay = To(s.weight_decay);
  t.momentum = To(s.momentum);
  t.grad_scale = To(s.grad_scale);
  t.clip_coef = To(s.clip_coef);
  t.decay_factor = To(s.decay_factor);
  t.bias_correction = To(s.bias_correction);
  t.alpha_double = s.alpha_double;
  t.maximize = s.maximize;
  t.coupled_weight_decay = s.coupled_weight_decay;
  t.decoupled_weight_decay = s.decoupled_weight_decay;
  t.lerp_weight_small = s.lerp_weight_small;
  t.lr_in_momentum = s.lr_in_momentum;
  t.nesterov = s.nesterov;
  t.use_bias_correction = s.use_bias_correction;
  t.clip = s.clip;
  return t;
}

// lr and what is derived from it. (1 - lr * wd) is computed in opmath from the opmath lr, the
// same way for a float lr (here, on the host) and a tensor lr (on the device), so both agree.
template <typename opmath_t>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void set_learning_rate(StepScalars<opmath_t>& s,
                                                                opmath_t lr) {
  s.lr = lr;
  s.decay_factor = opmath_t(1) - lr * s.weight_decay;
}

template <typename opmath_t>
inline StepScalars<opmath_t> make_step_scalars(double lr, double alpha, double eps,
                                               double weight_decay, double momentum,
                                               bool maximize, bool eps_in_sqrt,
                                               bool lr_in_momentum, bool decoupled_weight_decay,
                                               bool nesterov, bool bias_correction, bool clip) {
  StepScalars<opmath_t> s{};
  s.alpha = static_cast<opmath_t>(alpha);
  s.one_minus_alpha = static_cast<opmath_t>(1.0 - alpha);
  s.lerp_one_minus_w = opmath_t(1) - s.one_minus_alpha;
  s.lerp_weight_small = std::abs(s.one_minus_alpha) < opmath_t(0.5);
  s.eps_inside_root = eps_in_sqrt ? static_cast<opmath_t>(eps) : opmath_t(0);
  // An eps of -0.0 is +0 here: sqrt(var) + eps then equals sqrt(var + 0) + eps also at var = -0,
  // which lets the plain kernels drop the + 0 inside the root.
  s.eps_outside_root = eps_in_sqrt || eps == 0.0 ? opmath_t(0) : static_cast<opmath_t>(eps);
  s.weight_decay = static_cast<opmath_t>(weight_decay);
  s.momentum = static_cast<opmath_t>(momentum);
  s.grad_scale = opmath_t(1);
  s.clip_coef = opmath_t(1);
  s.bias_correction = opmath_t(1);
  s.alpha_double = alpha;
  s.maximize = maximize;
  // Decided on the double: a weight decay that rounds to 0 in float32 still adds 0 * p.
  s.coupled_weight_decay = weight_decay != 0.0 && !decoupled_weight_decay;
  s.decoupled_weight_decay = weight_decay != 0.0 && decoupled_weight_decay;
  s.lr_in_momentum = lr_in_momentum;
  s.nesterov = nesterov;
  s.use_bias_correction = bias_correction;
  s.clip = clip;
  set_learning_rate(s, static_cast<opmath_t>(lr));
  return s;
}

// The compile-time facts of a kernel instantiation: which state a step has, whether the grads
// are unscaled (AMP: a division per element and a write-back), and whether the options of
// StepScalars::plain() may be on. Each kernel is instantiated for the combinations it needs.
template <bool kCentered_, bool kMomentum_, bool kUnscaleGrad_, bool kExtended_>
struct UpdateVariant {
  static constexpr bool kCentered = kCentered_;
  static constexpr bool kMomentum = kMomentum_;
  static constexpr bool kUnscaleGrad = kUnscaleGrad_;
  static constexpr bool kExtended = kExtended_;
};

// Calls f(std::bool_constant<flag>{}): how a kernel picks its instantiation at run time.
template <typename F>
void dispatch_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
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

// f(x) where an option is on, x where it is off: on the GPU f is not evaluated when off (a
// uniform branch skips it); on the host both are computed and blended, as select does.
template <typename T, typename F>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE T apply_if(bool cond, T x, F&& f) {
#if defined(__CUDA_ARCH__)
  return cond ? f(x) : x;
#else
  return select(cond, f(x), x);
#endif
}

// `cond ? a : b` for a condition of the element itself. The CPU's explicit SIMD lanes
// (cpu/simd_lanes.h) overload it for a lane mask, as they overload the operators and square_root.
template <typename T>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE T where(bool cond, T a, T b) {
  return cond ? a : b;
}

// fix(x), for a correction that only a NaN of x can need (fix must return x wherever x is a
// number): the CPU's SIMD lanes overload it to skip fix when no lane is NaN, a branch in place
// of the compares and blend of every vector.
template <typename T, typename F>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE T repair_nans(T x, F&& fix) {
  return fix(x);
}

RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE float square_root(float x) { return ::sqrtf(x); }
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE double square_root(double x) { return ::sqrt(x); }

// ---------------------------------------------------------------------------------------------
// Per-tensor values: the bias correction and the random stream of stochastic rounding
// ---------------------------------------------------------------------------------------------

// A step counter (a float32 tensor, as torch keeps it) as an integer; clamped to [0, 2^32 - 1].
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE uint32_t step_count(float step) {
  return step >= 4294967040.0f ? UINT32_C(0xFFFFFFFF)
                               : (step > 0.0f ? static_cast<uint32_t>(step) : UINT32_C(0));
}

// base^exponent by squaring in double, over a fixed 32 bits: every multiplication is correctly
// rounded and the sequence depends only on the exponent, so every backend computes the same bits
// (pow() differs between math libraries).
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE double power_by_squaring(double base, uint32_t exponent) {
  double result = 1.0;
  for (int bit = 0; bit < 32; ++bit) {
    if ((exponent >> bit) & 1u) result = result * base;
    base = base * base;
  }
  return result;
}

// 1 - alpha^step, the divisor of both averages with bias correction (optax scale_by_rms /
// scale_by_stddev); `step` is the tensor's counter after this step's increment.
template <typename opmath_t>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE opmath_t bias_correction_at(double alpha, float step) {
  return static_cast<opmath_t>(1.0 - power_by_squaring(alpha, step_count(step)));
}

// A 32-bit integer hash (lowbias32 by C. Wellons, whose multipliers are under 2^31, so that the
// reference computes it exactly in int64 arithmetic).
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= UINT32_C(0x21F0AAAD);
  x ^= x >> 15;
  x *= UINT32_C(0x735A2D97);
  x ^= x >> 15;
  return x;
}

// The streams of stochastic rounding: one per tensor a step rounds.
enum RoundingStream : uint32_t {
  kParamStream = 0,
  kSquareAvgStream = 1,
  kGradAvgStream = 2,
  kMomentumBufferStream = 3,
};

// The key of one stream of the tensor at `tensor_index` of a call, at the tensor's step count:
// the same seed, lists and steps give the same random bits on every backend.
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE uint32_t rounding_key(int64_t seed, int64_t tensor_index,
                                                               uint32_t step, uint32_t stream) {
  const uint64_t seed_bits = static_cast<uint64_t>(seed);
  uint32_t key = mix32(static_cast<uint32_t>(tensor_index) * 4u + stream);
  key = mix32(key ^ step);
  key = mix32(key ^ static_cast<uint32_t>(seed_bits >> 32));
  return mix32(key ^ static_cast<uint32_t>(seed_bits));
}

// The random bits of element `index` of a stream.
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE uint32_t random_bits(uint32_t key, int64_t index) {
  const uint64_t i = static_cast<uint64_t>(index);
  return mix32(static_cast<uint32_t>(i) ^ (key + static_cast<uint32_t>(i >> 32)));
}

// ---------------------------------------------------------------------------------------------
// Centered state in low precision
// ---------------------------------------------------------------------------------------------

// With state_dtype bfloat16 or "8bit" and centered=True, the second moment is stored as the
// variance w = square_avg - grad_avg^2: the variance is often a small part of square_avg, and
// rounding both averages to 8 or 16 bits apart would leave v - m^2 all error, or negative
// (docs/DESIGN.md section 1). The update then works on w itself (kVarianceState):
//   w' = v' - m'^2 = alpha * w + alpha * (1 - alpha) * (g - m)^2
// (m the old grad_avg), which cannot go negative, where rebuilding v = w + m^2 and taking
// v' - m'^2 cancels to rounding noise, of either sign, once w has been rounded to 0 next to a
// large m. With bias correction the corrected variance v'/c - (m'/c)^2 needs v' = w' + m'^2; it
// is >= 0 in exact arithmetic (a weighted variance) and is clamped at 0.
template <typename T>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE T clamped_at_zero(T x) {
  return where(x < T(0), T(0), x);  // NaN stays NaN
}

// ---------------------------------------------------------------------------------------------
// One element
// ---------------------------------------------------------------------------------------------

// One element, in opmath. `grad` is replaced by the unscaled gradient (what AMP writes back; the
// clip coefficient is applied after, and not written back); `grad_avg` is touched only when
// kCentered, `momentum_buffer` only when kMomentum.
// kVarianceState (with kCentered): `square_avg` holds the variance w, in and out (above).
template <class Variant, bool kVarianceState = false, typename T>
RMSPROP_HOST_DEVICE RMSPROP_FORCE_INLINE void rmsprop_update(T& param, T& grad, T& square_avg,
                                                             T& grad_avg, T& momentum_buffer,
                                                             const StepScalars<T>& s) {
  static_assert(!kVarianceState || Variant::kCentered, "the variance form is centered state");
  if constexpr (Variant::kUnscaleGrad) grad = grad / s.grad_scale;
  T g = grad;
  T p = param;
  if constexpr (Variant::kExtended) {
    g = apply_if(s.clip, g, [&](T x) { return x * s.clip_coef; });  // clip_grad_norm_'s mul_
    g = select(s.maximize, -g, g);
    g = apply_if(s.coupled_weight_decay, g, [&](T x) { return x + s.weight_decay * p; });
    p = apply_if(s.decoupled_weight_decay, p, [&](T x) { return x * s.decay_factor; });
  }

  if constexpr (kVarianceState) {
    // w = alpha * w + alpha * (1 - alpha) * (g - m)^2, before m moves; alpha * (1 - alpha) is
    // the product of the two rounded scalars, rounded (hoisted out of every loop)
    const T deviation = g - grad_avg;
    square_avg = square_avg * s.alpha;
    square_avg = square_avg + (s.alpha * s.one_minus_alpha) * (deviation * deviation);
  } else {
    // square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    square_avg = square_avg * s.alpha;
    square_avg = square_avg + s.one_minus_alpha * g * g;
  }

  T v = square_avg;
  T m = T(0);
  if constexpr (Variant::kCentered) {
    // grad_avg.lerp_(g, 1 - alpha), with torch's two-sided formula (plain steps: the first)
    const T small_weight_lerp = grad_avg + s.one_minus_alpha * (g - grad_avg);
    if constexpr (Variant::kExtended) {
      grad_avg = select(s.lerp_weight_small, small_weight_lerp, g - (g - grad_avg) * s.lerp_one_minus_w);
    } else {
      grad_avg = small_weight_lerp;
    }
    m = grad_avg;
  }
  if constexpr (Variant::kExtended) {
    // the variance form's v' = w' + m'^2, which bias correction needs (above)
    if constexpr (kVarianceState) v = apply_if(s.use_bias_correction, v, [&](T w) { return w + m * m; });
    // optax's bias correction: both averages divided by 1 - alpha^step
    v = apply_if(s.use_bias_correction, v, [&](T x) { return x / s.bias_correction; });
    if constexpr (Variant::kCentered) {
      m = apply_if(s.use_bias_correction, m, [&](T x) { return x / s.bias_correction; });
    }
  }
  T var = v;
  if constexpr (kVarianceState) {
    // w' itself; bias-corrected, v'/c - (m'/c)^2, clamped at 0 (above)
    if constexpr (Variant::kExtended) {
      var = apply_if(s.use_bias_correction, v, [&](T x) { return clamped_at_zero(x - m * m); });
    }
  } else if constexpr (Variant::kCentered) {
    // square_avg.addcmul(grad_avg, grad_avg, value=-1). torch computes it as one fused
    // multiply-add (its AVX2/AVX-512 and CUDA kernels), so +inf - m*m stays +inf for a finite m
    // even where m*m overflows; two roundings would give inf - inf = NaN. Finite results are the
    // same either way, so only a NaN difference needs the check.
    var = repair_nans(v - m * m, [&](T difference) {
      const T inf = static_cast<T>(INFINITY);
      const auto finite_m = m < inf && m > -inf;  // false for NaN too
      return where(v == inf && finite_m, v, difference);
    });
  }
  // Plain steps leave out the + eps_inside_root, 0 there: the root of var + 0 and of var differ
  // only at var = -0 (+0 and -0), and adding eps_outside_root, never -0, makes both the same.
  T radicand = var;
  if constexpr (Variant::kExtended) radicand = var + s.eps_inside_root;
  const T denom = square_root(radicand) + s.eps_outside_root;

  if constexpr (Variant::kMomentum) {
    // torch: buf.mul_(momentum).addcdiv_(g, denom); param.add_(buf, alpha=-lr)
    // TF/Keras/timm: buf = momentum * buf + lr * g / denom; param -= buf
    // Nesterov (torch SGD, optax trace): the step is u + momentum * buf instead of buf
    const T lr_into_buffer = s.lr_in_momentum ? s.lr : T(1);
    const T lr_onto_param = s.lr_in_momentum ? T(1) : s.lr;
    T numerator = g;  // plain steps: lr_into_buffer is 1, and 1 * g is g
    if constexpr (Variant::kExtended) numerator = lr_into_buffer * g;
    const T u = numerator / denom;
    momentum_buffer = momentum_buffer * s.momentum;
    momentum_buffer = momentum_buffer + u;
    T direction = momentum_buffer;
    if constexpr (Variant::kExtended) {
      direction = apply_if(s.nesterov, direction, [&](T b) { return u + s.momentum * b; });
    }
    param = p - lr_onto_param * direction;
  } else {
    param = p - (s.lr * g) / denom;  // param.addcdiv_(g, denom, value=-lr)
  }
}

}  // namespace rmsprop_fused
