"""Low-precision state and stochastic rounding in plain PyTorch ops: the mirror of
csrc/blockwise_quant.h, csrc/element_codec.h and the random stream of csrc/rmsprop_update.h.

The reference backend computes with these, FusedRMSprop converts state with them (a torch
state_dict loaded into 8-bit state, and back), and the tests check the C++ kernels and the Triton
kernel against them bit for bit. Everything works on any device and never reads a value on the
host.

8-bit blockwise state (docs/DESIGN.md section 1): a state tensor is stored as uint8 codes, laid
out as its param (same shape and strides), and one float32 scale per block of 256 consecutive
elements in memory order; the scale is the block's largest magnitude and a code is the index of
the nearest entry of a 256-value code map of x / scale. The maps are bitsandbytes' dynamic maps.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor

QUANT_BLOCK = 256
# Smaller tensors keep float32 state under state_dtype="8bit": they cost little memory (the
# optimizer passes this to the op's checks, csrc/rmsprop_op.h expected_state_dtype).
MIN_QUANTIZED_NUMEL = 4096
EIGHT_BIT = "8bit"
_MASK32 = 0xFFFFFFFF
_QUIET_NAN_BITS = 0x7FC00000


def dynamic_map(signed: bool) -> Tensor:
    """bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)
    (bitsandbytes/functional.py): for each decade 10^(i-6), i = 0..6, the midpoints of a
    linspace(0.1, 1) of 2^i (signed, both signs) or 2^(i+1) (unsigned) steps, plus 0 and 1,
    sorted. float32, on the CPU; csrc/blockwise_quant.h holds the same values."""
    values = []
    for i in range(7):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            values += (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def code_map(signed: bool, device: torch.device) -> Tensor:
    return dynamic_map(signed).to(device)


def expected_state_dtype(param: Tensor, state_dtype) -> torch.dtype:
    """The dtype of a param's state tensors for a requested state dtype (None: the param's own):
    uint8 codes for "8bit", except that tensors under MIN_QUANTIZED_NUMEL elements keep float32
    (csrc/rmsprop_op.h expected_state_dtype); a dtype as it is (torch.uint8: codes at any size,
    as the functional form takes them)."""
    if state_dtype is None:
        return param.dtype
    if state_dtype == EIGHT_BIT:
        return torch.uint8 if param.numel() >= MIN_QUANTIZED_NUMEL else torch.float32
    return state_dtype


def memory_order(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor's elements in the order they sit in memory (the order the
    kernels walk them, and the order the blocks of 8-bit state follow)."""
    if t.is_contiguous():
        return t.reshape(-1)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _blocks(flat: Tensor, fill: float = 0.0) -> Tensor:
    """[n_blocks, QUANT_BLOCK]: the last block padded with `fill`."""
    pad = (-flat.numel()) % QUANT_BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_full((pad,), fill)])
    return flat.view(-1, QUANT_BLOCK)


def block_scales(flat: Tensor) -> Tensor:
    """Each block's largest magnitude, NaN (canonical) when it holds a NaN or an inf: the maximum
    of the magnitudes' bit patterns (blockwise_quant.h AbsMax)."""
    magnitude_bits = _blocks(flat.float()).view(torch.int32) & 0x7FFFFFFF
    largest = magnitude_bits.amax(dim=1)
    largest = torch.where(largest >= 0x7F800000, torch.full_like(largest, _QUIET_NAN_BITS), largest)
    return largest.view(torch.float32)


def quantize(x: Tensor, code: Tensor) -> Tensor:
    """The index of the entry of `code` nearest to each x, the lower one on a tie: the branchless
    binary search of blockwise_quant.h (floor_code, quantize), comparison for comparison."""
    x = x.reshape(-1)
    entry = lambda index: code.index_select(0, index)  # (much faster than code[index] on the CPU)
    below = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    step = 128
    while step >= 1:
        below = below + torch.where(entry(below + step) <= x, step, 0)
        step //= 2
    above = torch.clamp(below + 1, max=255)
    take_above = (entry(above) - x) < (x - entry(below))
    return torch.where(take_above, above, below).to(torch.uint8)


def quantize_blockwise(values: Tensor, signed: bool) -> Tuple[Tensor, Tensor]:
    """(codes laid out as `values`, scales) of a dense float tensor's 8-bit state."""
    flat = memory_order(values).float()
    scales = block_scales(flat)
    blocks = _blocks(flat)
    normalized = torch.where(scales[:, None] > 0, blocks / scales[:, None], 0.0)
    codes = quantize(normalized, code_map(signed, values.device))[: flat.numel()]
    out = torch.empty_like(values, dtype=torch.uint8)
    memory_order(out).copy_(codes)
    return out, scales


def dequantize_blockwise(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """The float32 values of 8-bit state, laid out as `codes`."""
    flat_codes = memory_order(codes).long()
    scale_of_element = scales.repeat_interleave(QUANT_BLOCK)[: flat_codes.numel()]
    values = code_map(signed, codes.device).index_select(0, flat_codes) * scale_of_element
    out = torch.empty_like(codes, dtype=torch.float32)
    memory_order(out).copy_(values)
    return out


# ----------------------------------------------------------------------------- rounding


def round_to_bfloat16(x: Tensor) -> Tensor:
    """float32 -> bfloat16 to nearest even, NaN -> 0x7FC0 (element_codec.h)."""
    bits = x.view(torch.int32).long() & _MASK32
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    rounded = torch.where(torch.isnan(x), 0x7FC0, rounded & 0xFFFF)
    return _as_16_bit(rounded, torch.bfloat16)


def round_to_float16(x: Tensor) -> Tensor:
    """float32 -> float16 to nearest even, NaN -> 0x7E00 (element_codec.h, c10's algorithm)."""
    out = x.to(torch.float16)  # round to nearest even, as IEEE conversions are
    return torch.where(torch.isnan(x), _as_16_bit(torch.full_like(x, 0x7E00, dtype=torch.int64), torch.float16), out)


def stochastic_round(x: Tensor, random: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 -> bfloat16 or float16 rounded stochastically with the given 32 random bits per
    element (int64 tensor in [0, 2^32)): ElementCodec::store_stochastic."""
    if dtype == torch.bfloat16:
        bits = x.view(torch.int32).long() & _MASK32
        rounded = ((bits + (random & 0xFFFF)) >> 16) & 0xFFFF
        return torch.where(torch.isnan(x), _as_16_bit(torch.full_like(rounded, 0x7FC0), torch.bfloat16),
                           _as_16_bit(rounded, torch.bfloat16))
    nearest = round_to_float16(x)
    nearest_bits = _bits_16(nearest)
    magnitude = x.abs()
    nearest_magnitude = _as_16_bit(nearest_bits & 0x7FFF, torch.float16).float()
    down = torch.where(nearest_magnitude > magnitude, nearest_bits - 1, nearest_bits)
    down_magnitude_bits = down & 0x7FFF
    down_magnitude = _as_16_bit(down_magnitude_bits, torch.float16).float()
    up_magnitude = torch.where(
        down_magnitude_bits == 0x7BFF, 65536.0, _as_16_bit(down_magnitude_bits + 1, torch.float16).float()
    )
    fraction = (magnitude - down_magnitude) / (up_magnitude - down_magnitude)
    round_up = (random >> 8).float() < fraction * 16777216.0
    rounded = torch.where(round_up, down + 1, down)
    return torch.where(torch.isfinite(x), _as_16_bit(rounded, torch.float16), nearest)


def _bits_16(t: Tensor) -> Tensor:
    return t.view(torch.int16).long() & 0xFFFF


def _as_16_bit(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """int64 tensor of 16-bit patterns -> a tensor of `dtype` with those bits."""
    signed = torch.where(bits >= 0x8000, bits - 0x10000, bits)
    return signed.to(torch.int16).view(dtype)


# ----------------------------------------------------------------------------- random stream


def mix32(x: Tensor) -> Tensor:
    """rmsprop_update.h mix32 on int64 tensors holding uint32 values (its multipliers are under
    2^31, so the products fit in int64 and the masked results are the uint32 ones)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def step_count(step: Tensor) -> Tensor:
    """rmsprop_update.h step_count: a float32 counter as an int64 in [0, 2^32 - 1], NaN as 0."""
    count = torch.where(step > 0, step.double(), 0.0).clamp(max=4294967040.0).long()
    return torch.where(step >= 4294967040.0, torch.full_like(count, _MASK32), count)


def rounding_key(seed: int, tensor_index: int, step: Tensor, stream: int) -> Tensor:
    """rmsprop_update.h rounding_key, for a step counter tensor (float32, one element) on its
    device; returns a one-element int64 tensor."""
    count = step_count(step)
    seed_bits = seed & 0xFFFFFFFFFFFFFFFF
    key = mix32(torch.full_like(count, (tensor_index * 4 + stream) & _MASK32))
    key = mix32(key ^ count)
    key = mix32(key ^ (seed_bits >> 32))
    return mix32(key ^ (seed_bits & _MASK32))


def random_bits(key: Tensor, numel: int) -> Tensor:
    """rmsprop_update.h random_bits for elements 0 .. numel - 1 of a stream (memory order)."""
    index = torch.arange(numel, dtype=torch.int64, device=key.device)
    return mix32((index & _MASK32) ^ ((key + (index >> 32)) & _MASK32))


def bias_correction(alpha: float, step: Tensor) -> Tensor:
    """1 - alpha^step in float64 by squaring over 32 bits (rmsprop_update.h power_by_squaring),
    for a step counter tensor; float64, on the counter's device."""
    count = step_count(step)
    result = torch.ones_like(count, dtype=torch.float64)
    base = torch.full_like(result, alpha)
    for bit in range(32):
        result = torch.where(((count >> bit) & 1) == 1, result * base, result)
        base = base * base
    return 1.0 - result
