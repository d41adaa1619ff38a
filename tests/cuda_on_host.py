"""The host build of the CUDA kernel (rmsprop_fused._cuda_on_host, csrc/cuda_on_host/): loading
it, and calling its two ops with the arguments of tests/common.py's `step`."""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from common import OPTION_MATRIX, STATE_PAIRS, same_bits
from rmsprop_fused import _extension

# The two kernel-parameter budgets the CUDA op has a LaunchArgs variant for (the 32 KB one when
# the driver takes it, csrc/cuda/multi_tensor_kernel.h).
LARGE_PARAM_BYTES = 32764
SMALL_PARAM_BYTES = 4096


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

_LIMITS = ("max_tensors_per_launch", "max_chunks_per_launch", "chunk_size", "block_dim", "kernel_param_bytes")


def step_on_host(lists: dict, lr=0.01, alpha=0.99, eps=1e-8, *, weight_decay=0.0, momentum=0.0,
                 centered=False, maximize=False, eps_in_sqrt=False, lr_in_momentum=False,
                 decoupled_weight_decay=False, nesterov=False, bias_correction=False, variance_state=False,
                 rounding_seed=None, grad_scale=None, found_inf=None, clip_coef=None, **limits) -> int:
    """One step of the CUDA kernel's code on CPU tensors, with the lists of tests/common.py's
    make_lists (state_steps and scales included); returns the number of update launches.
    `limits`: max_tensors_per_launch, max_chunks_per_launch, chunk_size, block_dim and
    kernel_param_bytes (the CUDA op's values, and its 32 KB budget, when left out)."""
    assert set(limits) <= set(_LIMITS), set(limits) - set(_LIMITS)
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    return torch.ops.rmsprop_fused.rmsprop_cuda_on_host_(
        lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"], lists["momentum_buffers"],
        lists.get("state_steps", []), lists.get("square_avg_scales", []), lists.get("grad_avg_scales", []),
        lists.get("momentum_buffer_scales", []),
        lr=0.0 if lr_tensor is not None else float(lr), alpha=alpha, eps=eps, weight_decay=weight_decay,
        momentum=momentum, centered=centered, maximize=maximize, eps_in_sqrt=eps_in_sqrt,
        lr_in_momentum=lr_in_momentum, decoupled_weight_decay=decoupled_weight_decay, nesterov=nesterov,
        bias_correction=bias_correction, variance_state=variance_state, rounding_seed=rounding_seed,
        lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, **limits,
    )


def launch_count(numels, depth: int, kernel_param_bytes: Optional[int] = None, *, quantized: bool = False) -> int:
    """Update launches the CUDA op makes for tensors of these sizes (depth = 3 + centered +
    momentum; quantized: 8-bit state, whose scales take room in each launch's parameters)."""
    return torch.ops.rmsprop_fused.cuda_launch_count(list(numels), depth, quantized, kernel_param_bytes)


# The dtypes in which a NaN of one backend matches any NaN of another (assert_lists_match).
# float32 and float64 values are stored as computed, with the payload the hardware gives an
# invalid operation (x86's default NaN is 0xFFC00000, an NVIDIA GPU's 0x7FFFFFFF): the NaN of
# sqrt(v - m*m) where bias correction makes the centered variance negative, say. float16's
# store (c10's algorithm, element_codec.h) keeps that NaN's sign: 0xFE00 from x86, 0x7E00 from
# a GPU. bfloat16's store, 8-bit codes and their scales canonicalise NaN.
HARDWARE_NANS = (torch.float32, torch.float64, torch.float16)
# The reference's nearest rounding to bfloat16 (Tensor.to) keeps a NaN's sign, where the codec
# stores 0x7FC0 (and its float16 rounding stores 0x7E00 where the codec keeps the sign).
REFERENCE_NANS = HARDWARE_NANS + (torch.bfloat16,)


def assert_lists_match(actual: dict, expected: dict, any_nan=HARDWARE_NANS) -> None:
    """Bit for bit, except that in a param or state tensor of a dtype in `any_nan` a NaN matches
    any NaN (the NaNs' places must match). 8-bit codes and their scales, which canonicalise NaN
    (blockwise_quant.h), and everything else are compared bit for bit."""
    for key in expected:
        assert len(actual[key]) == len(expected[key]), key
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            a, e = a.detach().cpu(), e.detach().cpu()
            assert a.dtype == e.dtype and a.shape == e.shape, f"{key}[{i}]: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
            if a.dtype in any_nan and not key.endswith("_scales"):
                a_nan, e_nan = torch.isnan(a), torch.isnan(e)
                assert torch.equal(a_nan, e_nan), f"{key}[{i}]: NaN in different places"
                a, e = torch.where(a_nan, 0.0, a), torch.where(e_nan, 0.0, e)
            if not same_bits(a, e):
                differ = int((a.double() != e.double()).sum())
                raise AssertionError(f"{key}[{i}] differs ({differ} of {e.numel()} elements)")


def option_cases():
    """A quarter of OPTION_MATRIX for each pair, rotated from pair to pair: option j goes to pair i
    when j % 4 == (i + j // 4) % 4. Each pair then gets 12 option sets that take every option both
    ways and every (centered, momentum) kernel variant, and every option set runs with 2 or 3
    pairs (asserted below). The full cross product (528 cases) took a minute and a half of CI on
    two cores, for kernels whose variants these cases already reach: the options are run-time
    values of one kernel per (pair, centered, momentum, AMP, extended); the CPU tests cover the
    whole matrix against the reference. (tests/test_cuda.py runs the same cases on a GPU.)"""
    cases = [(pair, options) for i, pair in enumerate(STATE_PAIRS)
             for j, options in enumerate(OPTION_MATRIX) if j % 4 == (i + j // 4) % 4]
    for pair in STATE_PAIRS:
        mine = [options for p, options in cases if p == pair]
        assert all(len({o[k] for o in mine}) == 2 for k in OPTION_MATRIX[0]), pair
        assert len({(o["centered"], o["momentum"]) for o in mine}) == 4, pair
    assert all(any(o is options for _, o in cases) for options in OPTION_MATRIX)
    return cases


OPTION_CASES = option_cases()
