"""8-bit blockwise state and stochastic rounding, on their own: the code maps, the quantizer
against a brute-force nearest-code search, the accuracy of 8-bit state over many steps, and the
unbiasedness of stochastic rounding. (Every backend's step with these is compared bit for bit
with the reference in the backends' own test files.)"""

from __future__ import annotations

import math

import pytest
import torch

from rmsprop_fused import _quantization as q
from common import available, fresh_seed, make_lists, step

needs_extension = pytest.mark.skipif(not available("cpu"), reason="the C++ extension is not built")


def _bitsandbytes_dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes.functional.create_dynamic_map (bitsandbytes 0.44-0.50), copied verbatim
    except for names: the independent statement of the map that _quantization.dynamic_map must
    reproduce."""
    data = []
    max_exponent_bits, total_bits = 7, 8
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    assert additional_items == 0
    data.append(0)
    data.append(1.0)
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_code_maps_are_bitsandbytes_dynamic_maps(signed):
    expected = _bitsandbytes_dynamic_map(signed)
    ours = q.dynamic_map(signed)
    assert torch.equal(ours.view(torch.int32), expected.view(torch.int32))
    assert ours.numel() == 256 and bool((ours[1:] > ours[:-1]).all()), "sorted, no duplicates"
    assert int((ours == 0).sum()) == 1 and ours[-1] == 1.0
    assert ours[0] == (-0.99296875 if signed else 0.0)  # bitsandbytes' signed map has no -1


@needs_extension
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_kernels_tables_hold_the_same_maps(signed):
    """csrc/blockwise_quant.h writes the maps as literals; they must be the generator's bits."""
    table = torch.ops.rmsprop_fused.code_map(signed)
    assert torch.equal(table.view(torch.int32), q.dynamic_map(signed).view(torch.int32))


def _brute_force_codes(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """argmin over all 256 float32 distances |x - code[j]|; the first (lowest) on a tie; NaN -> 0."""
    distances = (x[:, None] - code[None, :]).abs()
    codes = distances.argmin(dim=1)
    return torch.where(torch.isnan(x), 0, codes).to(torch.uint8)


def _hard_values(code: torch.Tensor, seed: int) -> torch.Tensor:
    """Every entry, the midpoints between neighbours and the floats next to them (where rounding
    decides), zeros, +-1, values beyond the map, NaN, inf, and random values at every scale."""
    gen = torch.Generator().manual_seed(seed)
    midpoints = (code[1:] + code[:-1]) / 2
    near = torch.cat([midpoints, code])
    up = torch.nextafter(near, torch.tensor(math.inf))
    down = torch.nextafter(near, torch.tensor(-math.inf))
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 1e-30, -1e-30, math.inf, -math.inf, math.nan])
    scales = 10.0 ** torch.randint(-9, 1, (20000,), generator=gen).float()
    random = (torch.rand(20000, generator=gen) * 2 - 1) * scales
    return torch.cat([near, up, down, special, random])


def _encode_with_scale_one(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """The CPU kernel's codes of x (values in [-1, 1]), through block encodes whose scale is 1: 255
    of them and a 1 in each block."""
    rows = torch.cat([x, torch.zeros((-x.numel()) % 255)]).view(-1, 255)
    blocks = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1).reshape(-1)
    codes, scales = torch.ops.rmsprop_fused.quantize_blockwise(blocks, signed)
    assert bool((scales == 1).all())
    return codes.view(-1, 256)[:, :255].reshape(-1)[: x.numel()]


@needs_extension
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("cpu_loop", ["simd-loop", "compiler-loop"], indirect=True)
def test_quantizers_pick_the_nearest_code(signed, cpu_loop):
    """Three quantizers must agree with a brute-force search: the reference's (torch ops), the
    GPU kernels' branchless binary search, and the CPU kernel's bucket table (CodeTable), element
    by element and in AVX-512 lanes."""
    code = q.dynamic_map(signed)
    x = _hard_values(code, fresh_seed())
    x = x[~torch.isinf(x)]  # a normalised value x / max|x| is finite, or NaN (then code 0)
    expected = _brute_force_codes(x, code)
    assert torch.equal(q.quantize(x, code), expected)
    assert torch.equal(torch.ops.rmsprop_fused.quantize_code(x, signed), expected)
    # the CPU kernel's path (CodeTable): every value in [-1, 1]
    inside = x[torch.isfinite(x) & (x.abs() <= 1)]
    assert torch.equal(_encode_with_scale_one(inside, signed), _brute_force_codes(inside, code))


CODE_TABLE_SHIFT = 15  # blockwise_quant.h CodeTable: buckets of 2^15 consecutive float bit patterns


@needs_extension
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("cpu_loop", ["simd-loop", "compiler-loop"], indirect=True)
def test_the_cpu_code_table_is_the_binary_search(signed, cpu_loop):
    """The CPU encoders' table (one code below and one past a threshold in each bucket of float
    bit patterns) against the binary search and nearest_code it is built from, over [-1, 1] of
    both signs: both ends and the first 64 patterns past either side of every bucket's boundary,
    every 127th pattern from a random offset, and the 64 floats either side of every midpoint
    between neighbouring entries (where the thresholds are): 25M values."""
    code = q.dynamic_map(signed)
    one = 0x3F800000  # 1.0f
    starts = torch.arange(0, one + 1, 1 << CODE_TABLE_SHIFT, dtype=torch.int64)
    edges = (starts[:, None] + torch.arange(-64, 64)[None, :]).reshape(-1)
    offset = int(torch.randint(127, (1,), generator=torch.Generator().manual_seed(fresh_seed())))
    sweep = torch.arange(offset, one + 1, 127, dtype=torch.int64)
    midpoints = ((code[1:] + code[:-1]) / 2).abs().view(torch.int32).to(torch.int64)
    around = (midpoints[:, None] + torch.arange(-64, 65)[None, :]).reshape(-1)
    magnitudes = torch.cat([edges, sweep, around]).clamp(0, one).to(torch.int32)
    x = torch.cat([magnitudes, magnitudes | torch.tensor(-2**31, dtype=torch.int32)]).view(torch.float32)
    expected = torch.ops.rmsprop_fused.quantize_code(x, signed)
    actual = _encode_with_scale_one(x, signed)
    wrong = (actual != expected).nonzero().flatten()
    assert wrong.numel() == 0, f"{wrong.numel()} codes differ, first at {x[wrong[:5]].tolist()}"


@needs_extension
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("cpu_loop", ["simd-loop", "compiler-loop"], indirect=True)
def test_blockwise_quantization_of_the_kernels_and_the_reference_agree(signed, cpu_loop):
    gen = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(5 * 256 + 77, generator=gen) * torch.logspace(-6, 2, 5 * 256 + 77)
    x[300] = math.nan  # one NaN: that block's scale is NaN, the others are untouched
    x[768:1024] = 0.0  # an all-zero block (the fourth): scale 0, every code the one of 0.0
    x[1100] = -math.inf  # an inf: that block (the fifth) is NaN too, not inf and -inf
    values = x if signed else x.abs()
    codes, scales = torch.ops.rmsprop_fused.quantize_blockwise(values, signed)
    ref_codes, ref_scales = q.quantize_blockwise(values, signed)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales.view(torch.int32), ref_scales.view(torch.int32))
    assert torch.isnan(scales[[1, 4]]).all() and not torch.isnan(scales[[0, 2, 3, 5]]).any()
    decoded = q.dequantize_blockwise(codes, scales, signed)
    assert torch.isnan(decoded[1024:1280]).all() and torch.isfinite(decoded[1280:]).all()
    assert scales[3] == 0 and bool((codes[768:1024] == int((q.dynamic_map(signed) == 0).nonzero())).all())


def test_dequantized_values_are_within_half_a_code_gap():
    """The rounding error of one quantization: at most half the gap between the two map entries
    around the normalised value, times the block's scale; below the signed map's lowest entry
    (-0.99297: it has no -1), the distance to that entry."""
    gen = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(64 * 256, generator=gen) * torch.rand(64 * 256, generator=gen) ** 4
    codes, scales = q.quantize_blockwise(x, signed=True)
    back = q.dequantize_blockwise(codes, scales, signed=True)
    code = q.dynamic_map(True)
    scale = scales.repeat_interleave(256)
    normalized = x / scale
    below = torch.searchsorted(code, normalized, right=True).clamp(1, 255) - 1
    allowed = torch.maximum((code[below + 1] - code[below]) / 2, (code[0] - normalized).clamp(min=0)) * scale
    rounding = 2 * torch.finfo(torch.float32).eps * x.abs()  # of map * scale, and of the difference
    assert bool(((back - x).abs() <= allowed + rounding).all())


# ---------------------------------------------------------------------------------- accuracy


# The compiled CPU kernel where it is built (it computes the reference's bits: tests/test_cpu_kernel.py)
BACKEND = "cpu" if available("cpu") else "reference"


def _run_50_steps(state_dtype, centered, momentum, seed):
    """A 64K-element float32 param (256 blocks), random gradients of a few magnitudes, 50 steps."""
    torch.manual_seed(seed)
    lists = make_lists([1 << 16], torch.float32, centered=centered, momentum=momentum, state_dtype=state_dtype,
                       steps=True, seed=seed, variance_state=centered and state_dtype == torch.uint8)
    gen = torch.Generator().manual_seed(seed + 1)
    scale = torch.logspace(-3, 0, 1 << 16)[torch.randperm(1 << 16, generator=gen)]
    for _ in range(50):
        lists["grads"][0].copy_(torch.randn(1 << 16, generator=gen) * scale)
        step(lists, BACKEND, lr=1e-3, alpha=0.9, centered=centered, momentum=momentum,
             variance_state=centered and state_dtype == torch.uint8)
    return lists


@pytest.mark.parametrize("centered, momentum", [(False, 0.0), (False, 0.9), (True, 0.9)], ids=["plain", "momentum", "centered-momentum"])
def test_8bit_state_after_50_steps_is_close_to_float32_state(centered, momentum):
    """As bitsandbytes' tests judge its 8-bit optimizers: after 50 steps of random gradients
    (magnitudes spread over three decades inside every block) the dequantized state is compared
    with a float32-state run from the same start, where the state is at least a tenth of its
    block's largest magnitude. The bounds come from the maps: between 0.1 and 1 the unsigned map
    has 128 entries and the signed one 64, 0.9/128 and 0.9/64 apart, so one quantization is off by
    at most half that, relative to 0.1: 3.5% (square_avg) and 7% (grad_avg, momentum_buffer).
    Every step quantizes again, and the averages keep a decaying sum of those errors
    (alpha = 0.9): the median must stay within one quantization's bound and the 99th percentile
    within three. A step's update then differs by about half the error of square_avg (the
    update divides by its root) and by the error of the momentum buffer: a few percent, so the
    params part by at most a tenth of how far they moved, on average and at all but the worst
    0.1% of elements. The worst of 65,536 has a heavy tail (1,150 seeds: up to 0.078 of the largest
    move, the extreme-value fit putting 1e-4 of runs past 0.1): it is held within a quarter."""
    seed = fresh_seed()
    full = _run_50_steps(torch.float32, centered, momentum, seed)
    eight = _run_50_steps(torch.uint8, centered, momentum, seed)
    names = ["square_avgs"] + (["grad_avgs"] if centered else []) + (["momentum_buffers"] if momentum else [])
    for name in names:
        signed = name != "square_avgs"
        values = q.dequantize_blockwise(eight[name][0], eight[name[:-1] + "_scales"][0], signed)
        expected = full[name][0]
        if name == "square_avgs" and centered:  # stored as the variance
            m = q.dequantize_blockwise(eight["grad_avgs"][0], eight["grad_avg_scales"][0], True)
            values = values + m * m
        one_quantization = 0.9 / (64 if signed else 128) / 2 / 0.1
        block_max = expected.abs().view(-1, 256).amax(dim=1).repeat_interleave(256)
        significant = expected.abs() >= 0.1 * block_max
        relative = ((values - expected).abs() / expected.abs())[significant]
        median, p99 = relative.quantile(torch.tensor([0.5, 0.99])).tolist()
        assert median <= one_quantization and p99 <= 3 * one_quantization, (name, median, p99, one_quantization)
    start = make_lists([1 << 16], torch.float32, centered=centered, momentum=momentum, steps=True, seed=seed)["params"][0]
    moved = (full["params"][0] - start).abs()
    drift = (eight["params"][0] - full["params"][0]).abs()
    p999 = float(drift.quantile(0.999))
    assert float(drift.mean()) <= 0.1 * float(moved.mean()), (float(drift.mean()), float(moved.mean()))
    assert p999 <= 0.1 * float(moved.max()) and float(drift.max()) <= 0.25 * float(moved.max()), (
        p999, float(drift.max()), float(moved.max()))


# ---------------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_stochastic_rounding_is_unbiased(dtype):
    """Rounding one value N times with independent random bits: the mean of the results is the
    value, within a bound from the sample count. Each rounding is `down` or `up` (one ulp u
    apart), so the mean's standard deviation is at most u / (2 sqrt(N)); 6 sigma leaves a false
    failure at about 1e-9. The fraction rounded up must also be the value's position between
    the two."""
    n = 1 << 16
    gen = torch.Generator().manual_seed(fresh_seed())
    values = torch.tensor([1.0 + 1 / 3, -2.7182817, 3.1e-3, 70000.5 if dtype == torch.bfloat16 else 60000.3,
                           1e-6 if dtype == torch.float16 else 1e-30])  # (an fp16 subnormal, a tiny bf16)
    for x in values:
        random = torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)
        rounded = q.stochastic_round(x.expand(n).contiguous(), random, dtype).double()
        down, up = rounded.min(), rounded.max()
        ulp = float(up - down)
        assert ulp > 0 and float(down) <= float(x) <= float(up)
        assert abs(float(rounded.mean()) - float(x)) <= 6 * ulp / (2 * math.sqrt(n)), (float(x), float(rounded.mean()))
        fraction_up = float((rounded == up).double().mean())
        expected = (float(x) - float(down)) / ulp
        assert abs(fraction_up - expected) <= 6 * 0.5 / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_stochastic_rounding_keeps_representable_values_and_non_finite_ones(dtype):
    values = torch.tensor([0.0, -0.0, 1.0, -0.5, 2.0**-14, math.inf, -math.inf, 65504.0]).to(dtype).float()
    random = torch.randint(0, 2**32, values.shape, dtype=torch.int64)
    assert torch.equal(q.stochastic_round(values, random, dtype).float().view(torch.int32), values.view(torch.int32))
    nan = q.stochastic_round(torch.tensor([math.nan]), torch.tensor([12345]), dtype)
    assert nan.view(torch.int16).item() == (0x7FC0 if dtype == torch.bfloat16 else 0x7E00)


def test_random_stream_depends_on_seed_tensor_step_and_stream():
    """Different seeds, tensors, steps or streams give (almost surely) different bits; the same
    give the same."""
    step = torch.tensor(3.0)
    base = q.random_bits(q.rounding_key(7, 0, step, 0), 4096)
    assert torch.equal(base, q.random_bits(q.rounding_key(7, 0, step, 0), 4096))
    for key in (q.rounding_key(8, 0, step, 0), q.rounding_key(7, 1, step, 0), q.rounding_key(7, 0, step + 1, 0),
                q.rounding_key(7, 0, step, 1)):
        other = q.random_bits(key, 4096)
        assert float((other == base).float().mean()) < 0.01
    assert 0 <= int(base.min()) and int(base.max()) < 2**32
    # uniform enough: each of the 16 top-bit buckets holds about 1/16 of 4096 values
    counts = torch.bincount(base >> 28, minlength=16).float()
    assert float(counts.min()) > 4096 / 16 * 0.6


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_an_inf_in_new_8bit_state_makes_its_block_nan(backend):
    """An inf grad makes grad_avg inf there: its block's scale is NaN, as a NaN's is, so the whole
    block decodes to NaN (an inf scale would decode that element of the signed map to -inf, the
    others to 0 * inf); the other blocks are finite, and both backends store the same bits."""
    if not available(backend):
        pytest.skip(f"backend {backend!r} is not available here")
    options = dict(centered=True, momentum=0.9, variance_state=True)
    lists = make_lists([3 * 256 + 40], torch.float32, centered=True, momentum=0.9, seed=fresh_seed(),
                       state_dtype=torch.uint8, variance_state=True)
    lists["grads"][0][256 + 7] = math.inf
    expected = {k: [t.clone() for t in v] for k, v in lists.items()}
    step(expected, "reference", **options)
    step(lists, backend, **options)
    scales = lists["grad_avg_scales"][0]
    assert torch.isnan(scales[1]) and torch.isfinite(scales[[0, 2, 3]]).all()
    decoded = q.dequantize_blockwise(lists["grad_avgs"][0], scales, signed=True)
    assert torch.isnan(decoded[256:512]).all() and torch.isfinite(decoded[:256]).all()
    for key in ("grad_avgs", "grad_avg_scales", "square_avgs", "square_avg_scales"):
        assert torch.equal(lists[key][0].view(torch.uint8), expected[key][0].view(torch.uint8)), key
