"""Inputs, option sets and dtype tolerances shared by the tests.

Tolerances, from the arithmetic (every backend computes in opmath with one rounding per torch
op; torch's own CPU sqrt is within one ulp, not always correctly rounded):
  float64 / float32  one step differs by a few roundings: ULPS_PER_STEP units in the last place
                     of the tensor's largest magnitude (absolute) and of each element (relative).
  bfloat16 / float16 both sides round nearly equal float32 values once: at most one ulp of the
                     16-bit dtype at the element's magnitude.
"""

from __future__ import annotations

import itertools
import math
import random

import torch

import rmsprop_fused
from rmsprop_fused import backends
from rmsprop_fused.functional import rmsprop

ULPS_PER_STEP = 4
LOW_PRECISION = (torch.float16, torch.bfloat16)
MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
SMALLEST_SUBNORMAL = {torch.float64: 2.0**-1074, torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}

# Every combination of the options that change the arithmetic.
OPTION_MATRIX = [
    dict(centered=centered, momentum=momentum, weight_decay=wd, maximize=maximize,
         eps_in_sqrt=eps_in_sqrt, lr_in_momentum=lr_in_momentum)
    for centered, momentum, wd, maximize, eps_in_sqrt, lr_in_momentum in itertools.product(
        (False, True), (0.0, 0.9), (0.0, 0.1), (False, True), (False, True), (False, True))
    if momentum > 0 or not lr_in_momentum  # lr_in_momentum only matters with momentum
]


def option_id(options: dict) -> str:
    parts = [k if v is True else f"{k}={v}" for k, v in options.items() if v not in (False, 0.0)]
    return "-".join(parts) or "plain"


def available(backend: str, device: str = "cpu", dtype=torch.float32) -> bool:
    return backends.unavailable_reason(backend, torch.device(device), dtype) is None


def make_lists(sizes, dtype, device="cpu", *, centered=False, momentum=0.0, seed=0, offset=0):
    """Fresh random params, grads and state for the given sizes. State is what a few steps
    leave behind (v > m**2 so the centered variance is positive); `offset` makes every tensor a
    view that starts `offset` elements into its storage (misaligned for the vector path)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(n, kind):
        if kind == "normal":
            x = torch.randn(n + offset, generator=gen, dtype=torch.float64)
        else:
            x = torch.rand(n + offset, generator=gen, dtype=torch.float64)
        return x.to(dtype=dtype, device=device)[offset:]

    lists = {k: [] for k in ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers")}
    for n in sizes:
        lists["params"].append(draw(n, "normal"))
        lists["grads"].append(draw(n, "normal"))
        grad_avg = draw(n, "normal") * 0.1
        square_avg = draw(n, "uniform") + grad_avg.float().square().to(dtype) + 0.01
        lists["square_avgs"].append(square_avg)
        if centered:
            lists["grad_avgs"].append(grad_avg)
        if momentum > 0:
            lists["momentum_buffers"].append(draw(n, "normal") * 0.1)
    return lists


def fresh_seed() -> int:
    """A new seed for every test run; printed, so a failing run shows it (pytest's captured stdout)."""
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    return seed


def clone_keeping_offset(t: torch.Tensor) -> torch.Tensor:
    """A copy of a contiguous tensor that starts as far into a fresh storage as `t` starts into
    its own: a misaligned view stays misaligned (Tensor.clone() would align it)."""
    offset = t.storage_offset()
    storage = torch.empty(offset + t.numel(), dtype=t.dtype, device=t.device)
    return storage[offset:].view(t.shape).copy_(t)


def clone_lists(lists: dict) -> dict:
    return {k: [clone_keeping_offset(t) for t in v] for k, v in lists.items()}


def step(lists: dict, backend: str, lr=0.01, alpha=0.99, eps=1e-8, **options) -> None:
    rmsprop(
        lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"], lists["momentum_buffers"],
        lr=lr, alpha=alpha, eps=eps, backend=backend, **options,
    )


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise spacing of `dtype` at |x| (computed in float64)."""
    mantissa, exponent = torch.frexp(x.double().abs())
    spacing = torch.ldexp(torch.ones_like(mantissa), exponent - 1 - MANTISSA_BITS[dtype])
    return spacing.clamp_min(SMALLEST_SUBNORMAL[dtype])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, steps: int = 1, name: str = "") -> None:
    """actual == expected within the dtype's tolerance (module docstring) after `steps` steps."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, expected.dtype)
    if actual.numel() == 0:
        return
    dtype = actual.dtype
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    same_nan = torch.isnan(a) == torch.isnan(e)
    assert bool(same_nan.all()), f"{name}: NaN in different places"
    a, e = a.nan_to_num(0.0), e.nan_to_num(0.0)
    if dtype in LOW_PRECISION:
        # one rounding of float32 values a few float32 roundings apart (x steps for drift)
        scale = e.abs().max()
        tol = steps * (ulp(torch.maximum(a.abs(), e.abs()), dtype)
                       + ULPS_PER_STEP * ulp(scale.expand_as(e), torch.float32))
    else:
        scale = e.abs().max()
        tol = steps * ULPS_PER_STEP * (ulp(e, dtype) + ulp(scale.expand_as(e), dtype))
    err = (a - e).abs()
    worst = int(torch.argmax(err - tol))
    assert bool((err <= tol).all()), (
        f"{name}: {int((err > tol).sum())} of {err.numel()} elements off; worst at {worst}: "
        f"{a.flatten()[worst].item()!r} vs {e.flatten()[worst].item()!r} (tolerance {tol.flatten()[worst].item():.3g})"
    )


def assert_lists_close(actual: dict, expected: dict, *, steps: int = 1) -> None:
    for key in expected:
        assert len(actual[key]) == len(expected[key])
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            assert_close(a, e, steps=steps, name=f"{key}[{i}]")


def assert_lists_equal(actual: dict, expected: dict) -> None:
    """Bitwise equality, on any devices (where two implementations share their arithmetic)."""
    for key in expected:
        assert len(actual[key]) == len(expected[key])
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            assert torch.equal(a.cpu(), e.cpu()), f"{key}[{i}] differs"
