"""The reference backend: docs/DESIGN.md section 1 in plain PyTorch ops, one tensor at a time.

It is the oracle every kernel is tested against, and the fallback where no kernel is available.
Each line is one elementwise torch op in the order of csrc/rmsprop_update.h, computed in opmath
(float32 for 16-bit tensors, so the result is rounded once, and each op rounded as the kernels
round it: it computes their bits) and without host synchronisation:
found_inf, a tensor lr, the clip coefficient and the step counters are used as device tensors,
never read with .item(). State in another dtype, 8-bit state and stochastic rounding go through
_quantization.py, the mirror of the kernels' codecs. With grad mode on (differentiable=True),
autograd records the step.
"""

from __future__ import annotations

import torch

from . import _quantization as q


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def round_to_dtype(x: float, dtype: torch.dtype) -> float:
    """x rounded to float32 or float64 as static_cast from double rounds it: to nearest even, inf
    beyond the largest finite value (host arithmetic, no device involved). The Triton backend
    rounds its float32 scalars with this too."""
    return torch.tensor(x, dtype=dtype).item()


_STREAMS = {"params": 0, "square_avgs": 1, "grad_avgs": 2, "momentum_buffers": 3}  # RoundingStream


def rmsprop_reference(
    params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, square_avg_scales,
    grad_avg_scales, momentum_buffer_scales, *, lr, alpha, eps, weight_decay, momentum, centered,
    maximize, eps_in_sqrt, lr_in_momentum, decoupled_weight_decay, nesterov, bias_correction,
    variance_state, rounding_seed, grad_scale=None, found_inf=None, clip_coef=None,
) -> None:
    if not params:
        return
    opmath = opmath_dtype(params[0].dtype)
    device = params[0].device
    quantized = square_avgs[0].dtype == torch.uint8
    # Stochastic rounding and 8-bit blocks follow memory order, so those steps work on 1-D views
    # of every tensor in memory order (the layouts agree: the functional entry sees to that).
    flat = quantized or rounding_seed is not None
    view = q.memory_order if flat else (lambda t: t)
    if isinstance(lr, torch.Tensor):
        lr = lr.to(device=device, dtype=opmath)
    if grad_scale is not None:
        grad_scale = grad_scale.to(device=device, dtype=opmath)
    if clip_coef is not None:
        clip_coef = clip_coef.to(device=device, dtype=opmath)
    skip = None if found_inf is None else (found_inf.to(device) != 0)
    # grad_avg.lerp_(g, 1 - alpha) with the weight and 1 - weight rounded to opmath, as torch does
    lerp_weight = round_to_dtype(1 - alpha, opmath)
    lerp_weight_small = abs(lerp_weight) < 0.5
    lerp_one_minus_weight = round_to_dtype(1 - lerp_weight, opmath)
    # the variance form's alpha * (1 - alpha): the product of the two rounded scalars, rounded
    alpha_times_one_minus_alpha = round_to_dtype(round_to_dtype(alpha, opmath) * lerp_weight, opmath)
    # p * (1 - lr * wd), the factor computed in opmath from the opmath lr (set_learning_rate)
    lr_opmath = lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=opmath, device=device)
    decay_factor = 1 - lr_opmath * torch.tensor(weight_decay, dtype=opmath, device=device)

    for i, param in enumerate(params):
        updates = []  # (target, new value in its dtype)
        if state_steps:
            step = state_steps[i] + (1.0 if skip is None else (~skip).to(torch.float32))
            updates.append((state_steps[i], step))
        p = view(param).to(opmath)
        grad = view(grads[i]).to(opmath)
        v = _load_state(square_avgs, square_avg_scales, i, view, signed=False)
        m = _load_state(grad_avgs, grad_avg_scales, i, view, signed=True) if centered else None

        if grad_scale is not None:
            grad = grad / grad_scale
        g = grad if clip_coef is None else grad * clip_coef
        g = -g if maximize else g
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * decay_factor
            else:
                g = g + weight_decay * p

        if variance_state:  # v holds the variance w (rmsprop_update.h, the variance form)
            deviation = g - m
            v = v * alpha
            v = v + alpha_times_one_minus_alpha * (deviation * deviation)
        else:
            v = v * alpha
            v = v + (1 - alpha) * g * g
        v_hat = v
        if centered:
            # torch's lerp_(g, w), written out without the FMA its vectorised CPU kernel uses
            if lerp_weight_small:
                m = m + lerp_weight * (g - m)
            else:
                m = g - (g - m) * lerp_one_minus_weight
        m_hat = m
        if bias_correction:
            correction = q.bias_correction(alpha, step).to(opmath)
            v_hat = (v + m * m if variance_state else v) / correction
            m_hat = m / correction if centered else None
        var = v_hat
        if variance_state:
            if bias_correction:  # v'/c - (m'/c)^2, clamped at 0 (NaN kept)
                var = v_hat - m_hat * m_hat
                var = torch.where(var < 0, 0.0, var)
        elif centered:
            # +inf - m*m stays +inf for a finite m even where m*m overflows, as in torch (whose
            # CPU and CUDA addcmul compute it as one fused multiply-add); see rmsprop_update.h
            var = torch.where(torch.isposinf(v_hat) & torch.isfinite(m_hat), v_hat, v_hat - m_hat * m_hat)
        denom = _sqrt(var + eps) if eps_in_sqrt else _sqrt(var) + eps

        if momentum > 0:
            b = _load_state(momentum_buffers, momentum_buffer_scales, i, view, signed=True)
            u = (lr * g) / denom if lr_in_momentum else g / denom
            b = b * momentum
            b = b + u
            direction = u + momentum * b if nesterov else b
            p = p - direction if lr_in_momentum else p - lr * direction
        else:
            p = p - (lr * g) / denom

        key = (lambda name: q.rounding_key(rounding_seed, i, step, _STREAMS[name])) if rounding_seed is not None else None
        updates.append((view(param), _rounded(p, param.dtype, key and key("params"))))
        if grad_scale is not None:
            updates.append((view(grads[i]), grad.to(grads[i].dtype)))  # AMP: the unscaled grad is kept
        updates += _stored(square_avgs, square_avg_scales, i, view, v, False, key and key("square_avgs"))
        if centered:
            updates += _stored(grad_avgs, grad_avg_scales, i, view, m, True, key and key("grad_avgs"))
        if momentum > 0:
            updates += _stored(momentum_buffers, momentum_buffer_scales, i, view, b, True,
                               key and key("momentum_buffers"))
        for target, value in updates:
            if skip is not None:
                # select in the storage dtype, so that a skipped tensor keeps its exact bits (a
                # bfloat16 NaN taken through float32 and back can come out as another NaN)
                value = torch.where(skip, target, value)
            target.copy_(value)


def _sqrt(x):
    """The correctly rounded square root, as the kernels take it. torch's CPU sqrt is not always
    (MKL's vectorised one is 1 ulp off for about 1 in 120 values): a float32 root is taken in
    float64 and rounded (exact, since 53 >= 2 * 24 + 2 bits, and still with a float64 root 1 ulp
    off), a float64 one on the CPU by NumPy (the CPU's sqrt instruction). Under autograd, and on
    GPUs (whose sqrt is IEEE), torch's own."""
    if x.dtype == torch.float32:
        return x.double().sqrt().float()
    if x.device.type == "cpu" and not x.requires_grad:
        import numpy

        return torch.from_numpy(numpy.sqrt(x.numpy()))
    return x.sqrt()


def _load_state(states, scales, i, view, *, signed):
    """A state tensor in opmath (float32 for 8-bit and 16-bit state, its own for float64)."""
    state = states[i]
    if state.dtype == torch.uint8:
        return view(q.dequantize_blockwise(state, scales[i], signed))
    return view(state).to(torch.float64 if state.dtype == torch.float64 else torch.float32)


def _rounded(value, dtype, key):
    """value (opmath) in `dtype`: rounded to nearest, or stochastically with the stream `key`."""
    if key is not None and dtype in (torch.float16, torch.bfloat16):
        return q.stochastic_round(value, q.random_bits(key, value.numel()), dtype)
    return value.to(dtype)


def _stored(states, scales, i, view, value, signed, key):
    """The (target, new value) pairs that store a state tensor: its codes and scale for 8-bit
    state, else the value in the state's dtype."""
    state = states[i]
    if state.dtype == torch.uint8:
        codes, new_scales = q.quantize_blockwise(value, signed)  # value is memory-order already
        return [(view(state), codes), (scales[i], new_scales)]
    return [(view(state), _rounded(value, state.dtype, key))]
