"""The host build of the CUDA kernel (rmsprop_fused._cuda_on_host, csrc/cuda_on_host/): loading
it, and calling its two ops with the arguments of tests/common.py's `step`."""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from rmsprop_fused import _extension


def _load() -> Optional[str]:
    # Loaded only when rmsprop_fused._C is (same build, same torch: _extension checked
    # _build_info.json before importing anything compiled).
    if _extension.load_error is not None:
        return _extension.load_error
    try:
        importlib.import_module("rmsprop_fused._cuda_on_host")
    except (ImportError, OSError) as e:
        return f"the host build of the CUDA kernel failed to load ({e})"
    return None


UNAVAILABLE_REASON = _load()


def step_on_host(lists: dict, lr=0.01, alpha=0.99, eps=1e-8, *, weight_decay=0.0, momentum=0.0,
                 centered=False, maximize=False, eps_in_sqrt=False, lr_in_momentum=False,
                 grad_scale=None, found_inf=None, **limits) -> int:
    """One step of the CUDA kernel's code on CPU tensors; returns the number of launches.
    `limits`: max_tensors_per_launch, max_chunks_per_launch, chunk_size, block_dim (the CUDA op's
    values when left out)."""
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    return torch.ops.rmsprop_fused.rmsprop_cuda_on_host_(
        lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"], lists["momentum_buffers"],
        lr=0.0 if lr_tensor is not None else float(lr), alpha=alpha, eps=eps, weight_decay=weight_decay,
        momentum=momentum, centered=centered, maximize=maximize, eps_in_sqrt=eps_in_sqrt,
        lr_in_momentum=lr_in_momentum, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
        **limits,
    )


def launch_count(numels, depth: int, kernel_param_bytes: Optional[int] = None) -> int:
    """Launches the CUDA op makes for tensors of these sizes (depth = 3 + centered + momentum)."""
    return torch.ops.rmsprop_fused.cuda_launch_count(list(numels), depth, kernel_param_bytes)
