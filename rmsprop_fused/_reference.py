"""The reference backend: docs/DESIGN.md section 1 in plain PyTorch ops, one tensor at a time.

It is the oracle every kernel is tested against, and the fallback where no kernel is available.
Each line is one elementwise torch op in the order torch.optim.RMSprop uses, computed in opmath
(float32 for 16-bit tensors, so the result is rounded once) and without host synchronisation:
found_inf and a tensor lr are used as device tensors, never read with .item().
"""

from __future__ import annotations

import torch


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def round_to_dtype(x: float, dtype: torch.dtype) -> float:
    """x rounded to float32 or float64 as static_cast from double rounds it: to nearest even, inf
    beyond the largest finite value (host arithmetic, no device involved). The Triton backend
    rounds its float32 scalars with this too."""
    return torch.tensor(x, dtype=dtype).item()


@torch.no_grad()
def rmsprop_reference(
    params, grads, square_avgs, grad_avgs, momentum_buffers, *, lr, alpha, eps, weight_decay,
    momentum, centered, maximize, eps_in_sqrt, lr_in_momentum, grad_scale=None, found_inf=None,
) -> None:
    if not params:
        return
    opmath = opmath_dtype(params[0].dtype)
    device = params[0].device
    if isinstance(lr, torch.Tensor):
        lr = lr.to(device=device, dtype=opmath)
    if grad_scale is not None:
        grad_scale = grad_scale.to(device=device, dtype=opmath)
    skip = None if found_inf is None else (found_inf.to(device) != 0)
    # grad_avg.lerp_(g, 1 - alpha) with the weight and 1 - weight rounded to opmath, as torch does
    lerp_weight = round_to_dtype(1 - alpha, opmath)
    lerp_weight_small = abs(lerp_weight) < 0.5
    lerp_one_minus_weight = round_to_dtype(1 - lerp_weight, opmath)

    for i, param in enumerate(params):
        p = param.to(opmath)
        grad = grads[i].to(opmath)
        v = square_avgs[i].to(opmath)

        if grad_scale is not None:
            grad = grad / grad_scale
        g = -grad if maximize else grad
        if weight_decay != 0:
            g = g + weight_decay * p

        v = v * alpha
        v = v + (1 - alpha) * g * g
        var = v
        if centered:
            m = grad_avgs[i].to(opmath)
            # torch's lerp_(g, w), written out without the FMA its vectorised CPU kernel uses
            if lerp_weight_small:
                m = m + lerp_weight * (g - m)
            else:
                m = g - (g - m) * lerp_one_minus_weight
            # +inf - m*m stays +inf for a finite m even where m*m overflows, as in torch (whose
            # CPU and CUDA addcmul compute it as one fused multiply-add); see rmsprop_update.h
            var = torch.where(torch.isposinf(v) & torch.isfinite(m), v, v - m * m)
        denom = (var + eps).sqrt() if eps_in_sqrt else var.sqrt() + eps

        if momentum > 0:
            b = momentum_buffers[i].to(opmath)
            b = b * momentum
            if lr_in_momentum:
                b = b + (lr * g) / denom
                p = p - b
            else:
                b = b + g / denom
                p = p - lr * b
        else:
            p = p - (lr * g) / denom

        updates = [(param, p), (square_avgs[i], v)]
        if grad_scale is not None:
            updates.append((grads[i], grad))  # AMP: the unscaled grad is written back
        if centered:
            updates.append((grad_avgs[i], m))
        if momentum > 0:
            updates.append((momentum_buffers[i], b))
        for target, value in updates:
            if skip is not None:
                # select in the storage dtype, so that a skipped tensor keeps its exact bits (a
                # bfloat16 NaN taken through float32 and back can come out as another NaN)
                value = torch.where(skip, target, value.to(target.dtype))
            target.copy_(value)
