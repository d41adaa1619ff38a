"""Clipping by global norm for the fused step: torch.nn.utils.clip_grad_norm_'s numbers, with the
coefficient left on the device for the step kernels to apply (docs/DESIGN.md section 1).

clip_grad_norm_ reads every grad for the norm, then reads and writes every grad to scale it, and
the optimizer reads them a third time. Here the norm is the only extra pass: `grad_norm` computes
it as torch does (torch._foreach_norm per (device, dtype), then the norm of the norms on the first
grad's device; on the CPU, the extension's total_norm does both in one call), `clip_coefficient`
turns it into torch's coefficient, and the step multiplies each grad by it as it reads it. No value is read on the host, so the step can be captured in a CUDA
graph or compiled.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _extension
from .functional import _PLAIN_TENSOR_TYPES

__all__ = ["grad_norm", "clip_coefficient", "check_clip_options", "NONFINITE_NORM_MESSAGE"]

NONFINITE_NORM_MESSAGE = (
    "The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
    "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
    "`error_if_nonfinite=False`"
)


def check_clip_options(max_grad_norm, norm_type) -> None:
    """ValueError for a max_grad_norm that is not a positive number, or a norm_type that is not a
    positive float or inf."""
    if max_grad_norm is not None:
        if isinstance(max_grad_norm, (bool, Tensor)) or not isinstance(max_grad_norm, numbers.Real):
            raise ValueError(f"max_grad_norm must be a positive float or None, got {max_grad_norm!r}")
        if not max_grad_norm > 0:  # NaN fails it too
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (it must be > 0)")
    if isinstance(norm_type, (bool, Tensor)) or not isinstance(norm_type, numbers.Real) or not norm_type > 0:
        raise ValueError(f"Invalid norm_type: {norm_type!r} (a positive float, e.g. 2.0, or inf)")


def _dtensor_type():
    from .functional import _DTensor

    return _DTensor


def _cpu_norm_available() -> bool:
    return _extension.load_error is None and not torch.compiler.is_compiling()


def _norms(grads: List[Tensor], norm_type: float) -> List[Tensor]:
    """Norms whose norm is the norm of all grads, one per grad or one per CPU (dtype) group,
    computed and returned in float32 (float64 for float64 grads): a float16 norm, as torch would
    return it, overflows at 65504. On the CPU torch._foreach_norm is one norm op per tensor
    (3-8 us each, most of a 148-tensor step's Python time); the extension's total_norm sums the
    small ones itself (in float64: a few ulps from torch's float32 sums)."""
    by_kind: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
    for g in grads:
        if g.numel():  # (an empty FSDP2 shard adds nothing; _foreach_norm refuses it for inf)
            by_kind.setdefault((g.device, g.dtype), []).append(g)
    norms = []
    for (device, dtype), tensors in by_kind.items():
        accumulate = torch.float64 if dtype == torch.float64 else torch.float32
        if device.type == "cpu" and _cpu_norm_available():
            norms.append(_extension._module.total_norm(tensors, float(norm_type)))
        elif dtype in (torch.float32, torch.float64):
            norms.extend(torch._foreach_norm(tensors, norm_type))
        else:
            norms.extend(torch._foreach_norm(tensors, norm_type, dtype=accumulate))
    return norms


def _combine(norms: List[Tensor], norm_type: float, device: torch.device) -> Tensor:
    """The norm of the norms, on `device`, as clip_grad_norm_ combines them (0 for none)."""
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    if not norms:
        return torch.zeros((), dtype=dtype, device=device)
    return torch.linalg.vector_norm(torch.stack([n.to(device=device, dtype=dtype) for n in norms]), norm_type)


def grad_norm(grads: Sequence[Tensor], norm_type: float = 2.0, grad_scale: Optional[Tensor] = None) -> Tensor:
    """The total norm of the grads as torch.nn.utils.get_total_norm computes it, as a 0-d tensor
    on the first grad's device. With `grad_scale` (AMP), the grads hold scaled values and the norm
    is divided by the scale: the norm of the unscaled grads, with no unscaling pass.

    DTensor grads (FSDP2) are sharded: each rank takes the norms of its shards and the partial
    results are reduced over the mesh dimensions the grads are sharded on (sums of p-th powers,
    or maxima for inf), as torch's clip_grad_norm_ does through DTensor, so every rank gets the
    norm of the whole gradient."""
    grads = list(grads)
    if not grads:
        return torch.zeros(())
    if _PLAIN_TENSOR_TYPES.issuperset(map(type, grads)) and grads[0].device.type == "cpu" and _cpu_norm_available():
        try:  # the common CPU case in one call (ValueError, before any work: a grad elsewhere)
            total = _extension._module.total_norm(grads, float(norm_type))
        except ValueError:
            pass
        else:
            return total if grad_scale is None else total / grad_scale.to(device="cpu", dtype=total.dtype)
    DTensor = _dtensor_type()
    sharded = [g for g in grads if DTensor is not None and isinstance(g, DTensor)]
    plain = [g for g in grads if not (DTensor is not None and isinstance(g, DTensor))]
    device = (sharded[0].to_local() if sharded and grads[0] is sharded[0] else grads[0]).device
    parts = []
    if plain:
        parts.append(_combine(_norms(plain, norm_type), norm_type, device))
    if sharded:
        parts.append(_sharded_norm(sharded, norm_type, device))
    total = parts[0] if len(parts) == 1 else _combine(parts, norm_type, device)
    if grad_scale is not None:
        total = total / grad_scale.to(device=device, dtype=total.dtype)
    return total


def _sharded_norm(grads: List[Tensor], norm_type: float, device: torch.device) -> Tensor:
    import torch.distributed as dist

    by_placement: Dict[tuple, List[Tensor]] = {}
    for g in grads:
        by_placement.setdefault((g.device_mesh, tuple(g.placements)), []).append(g)
    parts = []
    for (mesh, placements), tensors in by_placement.items():
        local = _combine(_norms([t.to_local() for t in tensors], norm_type), norm_type, device)
        # Reduce p-th powers (sum) or maxima over the dimensions whose ranks hold different shards.
        value = local if math.isinf(norm_type) else local**norm_type
        op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
        for dim, placement in enumerate(placements):
            if placement.is_shard():
                dist.all_reduce(value, op=op, group=mesh.get_group(dim))
        parts.append(value if math.isinf(norm_type) else value ** (1.0 / norm_type))
    return parts[0] if len(parts) == 1 else _combine(parts, norm_type, device)


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """torch's clip coefficient: min(1, max_norm / (total_norm + 1e-6)), a device tensor."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
