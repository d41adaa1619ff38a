"""Inputs, option sets and dtype tolerances shared by the tests.

Every backend (the reference, the CPU op, the CUDA kernel's code, Triton) computes the same bits
(docs/DESIGN.md section 1), so backends are compared with assert_lists_equal. Against torch and
other libraries, which round differently (FMAs, a sqrt that is 1 ulp off now and then, other
association), the tolerances follow from the arithmetic:
  float64 / float32  one step differs by a few roundings: ULPS_PER_STEP units in the last place
                     of the tensor's largest magnitude (absolute) and of each element (relative).
  bfloat16 / float16 both sides round nearly equal float32 values once: at most one ulp of the
                     16-bit dtype at the element's magnitude.
"""

from __future__ import annotations

import itertools
import math
import os
import random

import torch

import rmsprop_fused
from rmsprop_fused import backends
from rmsprop_fused.functional import rmsprop

ULPS_PER_STEP = 4
LOW_PRECISION = (torch.float16, torch.bfloat16)
MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
SMALLEST_SUBNORMAL = {torch.float64: 2.0**-1074, torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}

# Every combination of torch's options that change the arithmetic.
OPTION_MATRIX = [
    dict(centered=centered, momentum=momentum, weight_decay=wd, maximize=maximize,
         eps_in_sqrt=eps_in_sqrt, lr_in_momentum=lr_in_momentum)
    for centered, momentum, wd, maximize, eps_in_sqrt, lr_in_momentum in itertools.product(
        (False, True), (0.0, 0.9), (0.0, 0.1), (False, True), (False, True), (False, True))
    if momentum > 0 or not lr_in_momentum  # lr_in_momentum only matters with momentum
]

# The options torch's RMSprop lacks, each with and without centered and momentum (they need the
# step counters: make_lists(..., steps=True)).
EXTENDED_OPTIONS = [
    dict(centered=centered, momentum=momentum, **extra)
    for centered, momentum in itertools.product((False, True), (0.0, 0.9))
    for extra in (
        dict(weight_decay=0.1, decoupled_weight_decay=True),
        dict(bias_correction=True),
        dict(bias_correction=True, weight_decay=0.1, maximize=True, eps_in_sqrt=True),
        dict(nesterov=True), dict(nesterov=True, lr_in_momentum=True),
    )
    if momentum > 0 or not extra.get("nesterov")
]

# (param dtype, state dtype) pairs every kernel supports; torch.uint8 is 8-bit blockwise state.
STATE_PAIRS = [
    (torch.float64, torch.float64), (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
    (torch.float32, torch.uint8), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.uint8), (torch.float16, torch.float16), (torch.float16, torch.float32),
    (torch.float16, torch.bfloat16), (torch.float16, torch.uint8),
]


def pair_id(pair) -> str:
    return "-".join(str(d).replace("torch.", "").replace("uint8", "8bit") for d in pair)


def option_id(options: dict) -> str:
    parts = [k if v is True else f"{k}={v}" for k, v in options.items() if v not in (False, 0.0)]
    return "-".join(parts) or "plain"


def available(backend: str, device: str = "cpu", dtype=torch.float32) -> bool:
    return backends.unavailable_reason(backend, torch.device(device), dtype) is None


LIST_KEYS = ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "state_steps",
             "square_avg_scales", "grad_avg_scales", "momentum_buffer_scales")


def make_lists(sizes, dtype, device="cpu", *, centered=False, momentum=0.0, seed=0, offset=0,
               state_dtype=None, steps=False, variance_state=False):
    """Fresh random params, grads and state for the given sizes. State is what a few steps
    leave behind (v > m**2 so the centered variance is positive), in `state_dtype` (default the
    params' dtype; torch.uint8 for 8-bit blockwise codes with their scales); with
    `variance_state` square_avgs hold v - m**2. `steps` adds step counters between 0 and 40.
    `offset` makes every tensor a view that starts `offset` elements into its storage
    (misaligned for the vector path; not with 8-bit state)."""
    from rmsprop_fused import _quantization

    gen = torch.Generator().manual_seed(seed)
    state_dtype = state_dtype or dtype

    def draw(n, kind):
        if kind == "normal":
            return torch.randn(n + offset, generator=gen, dtype=torch.float64)
        return torch.rand(n + offset, generator=gen, dtype=torch.float64)

    def place(x, dtype):  # converted, then sliced: the view keeps the offset into its storage
        return x.to(dtype=dtype, device=device)[offset:]

    lists = {k: [] for k in LIST_KEYS}
    for n in sizes:
        lists["params"].append(place(draw(n, "normal"), dtype))
        lists["grads"].append(place(draw(n, "normal"), dtype))
        grad_avg = draw(n, "normal") * 0.1
        square_avg = draw(n, "uniform") + grad_avg.square() + 0.01
        if variance_state:
            square_avg = square_avg - grad_avg.square()
        states = [("square_avgs", square_avg, False, True), ("grad_avgs", grad_avg, True, centered),
                  ("momentum_buffers", draw(n, "normal") * 0.1, True, momentum > 0)]
        for name, value, signed, used in states:
            if not used:
                continue
            if state_dtype == torch.uint8:
                assert offset == 0, "8-bit state is laid out as its param"
                codes, scales = _quantization.quantize_blockwise(value.float()[offset:], signed)
                lists[name].append(codes.to(device))
                lists[name[:-1] + "_scales"].append(scales.to(device))
            else:
                lists[name].append(place(value, state_dtype))
        if steps:
            lists["state_steps"].append(torch.tensor(float(torch.randint(0, 40, (), generator=gen)), device=device))
    return lists


def fresh_seed() -> int:
    """A new seed for every test run, or RMSPROP_FUSED_TEST_SEED's to rerun a failure; printed, so
    a failing run shows it (pytest's captured stdout)."""
    seed = int(os.environ.get("RMSPROP_FUSED_TEST_SEED") or random.randrange(2**31))
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
        state_steps=lists.get("state_steps", ()), square_avg_scales=lists.get("square_avg_scales", ()),
        grad_avg_scales=lists.get("grad_avg_scales", ()),
        momentum_buffer_scales=lists.get("momentum_buffer_scales", ()),
        lr=lr, alpha=alpha, eps=eps, backend=backend, **options,
    )


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise spacing of `dtype` at |x| (computed in float64)."""
    mantissa, exponent = torch.frexp(x.double().abs())
    spacing = torch.ldexp(torch.ones_like(mantissa), exponent - 1 - MANTISSA_BITS[dtype])
    return spacing.clamp_min(SMALLEST_SUBNORMAL[dtype])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, steps: int = 1, name: str = "",
                 magnitude: float = 0.0) -> None:
    """actual == expected within the dtype's tolerance (module docstring) after `steps` steps;
    `magnitude`, when larger than the tensor's largest, is that of the values rounded on the way
    (an update larger than the param it moves)."""
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
        scale = e.abs().max().clamp_min(magnitude)
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


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality on any devices, the sign of zero included, except that any NaN equals any
    NaN: the payload and sign of a float32 or float64 NaN are the hardware's (x86's square root of
    a negative number is -NaN, a GPU's +NaN); 16-bit stores make every NaN the canonical one."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        nan = torch.isnan(a)
        if not torch.equal(nan, torch.isnan(b)):
            return False
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.contiguous().view(bits)[~nan], b.contiguous().view(bits)[~nan])
    return torch.equal(a, b)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, *, name: str = "") -> None:
    """same_bits, with how many elements differ and the first of them when not."""
    if same_bits(actual, expected):
        return
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert a.dtype == e.dtype and a.shape == e.shape, f"{name}: {a.dtype} {tuple(a.shape)} against {e.dtype} {tuple(e.shape)}"
    differ = ((a != e) & ~(torch.isnan(a) & torch.isnan(e))) | (torch.isnan(a) != torch.isnan(e))
    differ = differ | ((a == e) & (torch.signbit(a) != torch.signbit(e)))  # -0.0 against 0.0
    first = tuple(differ.nonzero()[0].tolist()) if differ.any() else ()
    raise AssertionError(f"{name}: {int(differ.sum())} of {e.numel()} elements differ, first at {first}: "
                         f"{a[first].item() if first else ''} against {e[first].item() if first else ''}")


def assert_lists_equal(actual: dict, expected: dict) -> None:
    """Bitwise equality, on any devices: every backend computes the same bits."""
    for key in expected:
        assert len(actual[key]) == len(expected[key]), key
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            if not same_bits(a, e):
                differ = (a.detach().cpu().double() != e.detach().cpu().double()).sum().item() if a.shape == e.shape else "all"
                raise AssertionError(f"{key}[{i}] differs ({differ} of {e.numel()} elements)")
