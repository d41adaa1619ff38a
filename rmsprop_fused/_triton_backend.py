"""The `triton` backend: the fused RMSprop step as one Triton kernel launch per (device, param dtype,
state dtype) group.

Layout. A launch updates every tensor of the group. It reads int64 metadata that lives on the
tensors' device and is built once for a given set of tensors (:class:`_LaunchPlan`):

    table   [n_tensors, 11]  data pointers of param, grad, square_avg, grad_avg, momentum_buffer,
                             the three scales of 8-bit state and the step counter (0 where a list
                             is empty, and then never read), numel, and the tensor's program count
    blocks  [n_blocks, 3]    for each program: its tensor's row in the table, the first element
                             of that tensor it updates, and whether the block is "fast"
    done    [n_tensors]      programs of each tensor finished in this launch (step counters)

Program i updates elements [start, start + BLOCK_SIZE) of tensor blocks[i, 0], as a
[BLOCK_SIZE // 256, 256] tile: one row per block of 8-bit state, whose scale is the row's
maximum (docs/DESIGN.md section 1), so that a program owns whole quantization blocks and needs no
other program's values; the other state formats are elementwise and use the same tile. A
zero-size tensor owns no block, unless the call counts steps: it then owns one empty program,
which counts its step. Block starts are int64, so tensors of more than 2**31 elements are fine. A
fast block lies wholly inside its tensor, whose element pointers are all 16-byte aligned: it is
updated without a mask, with 16-byte loads and stores. The others (a tensor's last block, every
block of a misaligned view) are masked at the tensor's end.

Arithmetic. The kernel computes csrc/rmsprop_update.h operation for operation, in float32 for
float32, float16 and bfloat16 tensors, with one rounding per operation:
  * division and square root are the IEEE ones (div_rn, sqrt_rn): Triton's `/` and `tl.sqrt`
    are approximate on NVIDIA GPUs;
  * the launch disables FMA contraction (enable_fp_fusion=False), as the C++ kernels are built
    with -ffp-contract=off and --fmad=false: `a * b + c` is rounded twice, as torch's ops do;
  * the scalars are rounded to float32 on the host exactly as make_step_scalars rounds them, and
    what the C++ derives from the (possibly device) lr, 1 - lr * weight_decay, in the kernel;
  * every element goes through the codecs of csrc/element_codec.h and csrc/blockwise_quant.h,
    written here on the bits: 16-bit values move as uint16 and are widened and rounded (to
    nearest even, or stochastically) by c10's algorithms, NaN to the canonical 0x7FC0 / 0x7E00,
    so neither Triton's interpreter nor the GPU's conversion instructions decide any bit;
  * the per-tensor values (bias correction 1 - alpha^step in float64 by squaring, the keys of the
    random streams of stochastic rounding) come from each tensor's step counter, read on the
    device.
So the kernel computes the same bits as the C++ kernels and the reference. The tests check that
against both with the kernel in Triton's interpreter (NumPy float32 arithmetic, IEEE like the
GPU's rn instructions), against the CUDA op when a GPU is there, and compile every variant for
sm_80 and sm_90 (no GPU needed) to read the machine code.

Step counters. The op increments each tensor's counter unless found_inf says skip, and the step
reads the incremented value. Every program of a tensor reads the old counter and adds 1 itself;
the last of them to finish (an atomic count in `done`, reset by that program) writes it back, so
no program can read a counter another has already written. One launch, no host sync, and a CUDA
graph replays it (the metadata is kept alive for it).

Variants. What changes the per-element work or memory traffic is a constexpr of the kernel (the
param and state formats, centered, momentum, AMP's grad write-back, stochastic rounding), as in
the C++ kernels (docs/DESIGN.md section 2); the other options are runtime booleans, branches that
every thread of a program takes alike: maximize, the weight decay's kind, Nesterov, bias
correction, clipping, the variance form, counting steps, and the two that only read a scalar once
per program (found_inf, a tensor lr). That makes 144 variants (:data:`VARIANT_AXES`), which
tests/test_triton_aot.py compiles for two architectures in a few minutes; with found_inf and the
lr's kind as constexprs too it would be 576, too many to compile in CI. No runtime argument is
specialised on its value or alignment, so the compiled variants are exactly those.

Triton is optional: this module imports without it, and unavailable_reason() then says so.
Kernels run on CUDA tensors; on CPU tensors only in Triton's interpreter, which is chosen by
TRITON_INTERPRET=1 when this module is imported (when `triton.jit` builds the kernel).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import struct
from typing import List, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _quantization
from ._reference import round_to_dtype

try:
    import triton
    import triton.language as tl
except ImportError as error:  # Triton is an optional dependency
    triton = None
    _IMPORT_ERROR: Optional[str] = (
        "Triton is not installed" if isinstance(error, ModuleNotFoundError) and error.name == "triton"
        else f"Triton failed to import ({error})"
    )
else:
    _IMPORT_ERROR = None

__all__ = ["unavailable_reason", "rmsprop_triton"]

# Elements per program and warps per program: 2048 over 8 warps is 8 elements per thread, one or
# two 16-byte accesses per stream on the aligned path, and 8 blocks of 8-bit state, one per warp.
# Chosen without a GPU to measure on, from the compiled code alone (tests/test_triton_aot.py
# records the registers of every variant). To be tuned on a GPU, reporting effective GB/s against
# the copy bandwidth (docs/DESIGN.md section 4). In Triton's interpreter, which runs the programs
# one after another and each as NumPy array operations, a large block also keeps the CPU tests
# quick.
BLOCK_SIZE = 2048
NUM_WARPS = 8
# The register limit given to ptxas. Without one, ptxas picks a limit of its own for an occupancy
# it guesses at (80 or 128 registers for 256 threads) and spills to local memory to meet it, in
# some variants and not others; with it, no variant spills, and each uses what it needs (the
# heaviest, float16 with stochastic rounding, about 250 on sm_90: tests/test_triton_aot.py).
MAX_REGISTERS = 255
QUANT_BLOCK = _quantization.QUANT_BLOCK  # 8-bit state: one scale per 256 elements (a tile row)
assert BLOCK_SIZE % QUANT_BLOCK == 0
assert (1 << 32) % BLOCK_SIZE == 0  # a block's elements share the high word of their index

# The pointer table: one row per tensor of the group. The width is fixed, whatever the options,
# so that the kernel's column indices are compile-time constants; a column the options do not use
# holds 0 and is never read.
(_PARAM, _GRAD, _SQUARE_AVG, _GRAD_AVG, _MOMENTUM_BUFFER, _SQUARE_AVG_SCALE, _GRAD_AVG_SCALE,
 _MOMENTUM_BUFFER_SCALE, _STEP, _NUMEL, _PROGRAMS) = range(11)
_TABLE_WIDTH = 11
# The column of each of the functional entry's lists (functional.LIST_NAMES, the op's order).
_COLUMNS = dict(
    params=_PARAM, grads=_GRAD, square_avgs=_SQUARE_AVG, grad_avgs=_GRAD_AVG, momentum_buffers=_MOMENTUM_BUFFER,
    state_steps=_STEP, square_avg_scales=_SQUARE_AVG_SCALE, grad_avg_scales=_GRAD_AVG_SCALE,
    momentum_buffer_scales=_MOMENTUM_BUFFER_SCALE,
)
# The lists whose elements the kernel streams (the alignment of the fast path is theirs).
_ELEMENT_LISTS = ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers")
# The block map: one row per program, (table row, first element, fast). `fast` is 1 when the
# block lies wholly inside its tensor and all of that tensor's element pointers are 16-byte
# aligned: the kernel then updates it without a mask and with 16-byte accesses.
_BLOCK_MAP_WIDTH = 3
_ALIGNMENT = 16  # bytes

# Launch plans (metadata on the device), most recently used last. A training loop steps the same
# tensors every time, so it hits one entry per group.
_PLAN_CACHE_SIZE = 16
_plan_cache: "collections.OrderedDict[tuple, _LaunchPlan]" = collections.OrderedDict()
# Plans used while a CUDA graph was being captured: the graph reads them on every replay, so they
# are never freed (evicting one from the cache would leave the graph reading freed memory).
_captured_plans: dict = {}

# The constexprs that select a compiled variant, and the values each takes: every combination of a
# (param, state) pair the op supports is a variant the launcher can produce, except stochastic
# rounding where nothing is 16-bit. The dtype names stand for the tl dtypes; "uint8" is 8-bit
# blockwise state.
VARIANT_AXES = dict(
    PARAM=("float32", "float16", "bfloat16"),
    STATE=("float32", "float16", "bfloat16", "uint8"),
    CENTERED=(False, True),
    MOMENTUM=(False, True),
    UNSCALE_GRAD=(False, True),
    STOCHASTIC=(False, True),
)


class StepScalars(NamedTuple):
    """csrc/rmsprop_update.h StepScalars as the kernel holds them: float32 scalars and runtime
    booleans (every thread of a program branches on them alike). Built in the kernel from its
    arguments; a tensor lr, the AMP scale and the clip coefficient are read on the device."""

    lr: object
    alpha: object
    one_minus_alpha: object
    lerp_one_minus_w: object
    eps_inside_root: object
    eps_outside_root: object
    weight_decay: object
    momentum: object
    grad_scale: object
    clip_coef: object
    decay_factor: object
    bias_correction: object
    maximize: object
    coupled_weight_decay: object
    decoupled_weight_decay: object
    lerp_weight_small: object
    lr_in_momentum: object
    nesterov: object
    use_bias_correction: object
    clip: object
    variance_state: object


class RoundingKeys(NamedTuple):
    """The keys of the four random streams of a tensor's step (stochastic rounding)."""

    param: object
    square_avg: object
    grad_avg: object
    momentum_buffer: object


# Every runtime argument of the kernel, which Triton must not specialise on its value (an int of 1
# would become a constant, one divisible by 16 another variant) nor on its alignment.
_RUNTIME_ARGUMENTS = (
    "table", "blocks", "done", "unsigned_map", "signed_map", "lr", "lr_tensor", "grad_scale", "found_inf",
    "clip_coef", "alpha", "one_minus_alpha", "lerp_one_minus_w", "eps_inside_root", "eps_outside_root",
    "weight_decay", "momentum", "alpha_low", "alpha_high", "seed_low", "seed_high", "maximize",
    "coupled_weight_decay", "decoupled_weight_decay", "lerp_weight_small", "lr_in_momentum", "nesterov",
    "bias_correction", "clip", "variance_state", "counts_steps", "has_found_inf", "lr_from_tensor",
)


if triton is not None:

    # ------------------------------------------------------------------------------ codecs

    # 16-bit patterns are held in uint32 (the upper half zero). Integer arithmetic that wraps on
    # purpose is written as shifts or with sanitize_overflow=False, so that Triton's overflow
    # checks (its interpreter's, or a debug build's) stay quiet and cost nothing.

    @triton.jit
    def _half_to_float(h):
        """ElementCodec<c10::Half>::load (c10's fp16_ieee_to_fp32_value): normal values rebias
        the exponent and scale by 2^-112, exactly; subnormals put the mantissa under the exponent
        of 0.5 and subtract 0.5, exactly."""
        w = h << 16
        sign = w & 0x80000000
        two_w = w << 1
        normalized = ((two_w >> 4) + (0xE0 << 23)).to(tl.float32, bitcast=True) * 1.925929944387236e-34  # 2^-112
        denormalized = ((two_w >> 17) | (126 << 23)).to(tl.float32, bitcast=True) - 0.5
        magnitude = tl.where(two_w < (1 << 27), denormalized, normalized).to(tl.uint32, bitcast=True)
        return (sign | magnitude).to(tl.float32, bitcast=True)

    @triton.jit
    def _float_to_half(f):
        """ElementCodec<c10::Half>::store (c10's fp16_ieee_from_fp32_value): the float32 addition
        rounds the mantissa to nearest even; NaN -> 0x7E00 (keeping its sign)."""
        w = f.to(tl.uint32, bitcast=True)
        base = ((w & 0x7FFFFFFF).to(tl.float32, bitcast=True) * 5.192296858534828e33) * 7.703719777548943e-34  # 2^112, 2^-110
        shl1_w = w << 1
        sign = w & 0x80000000
        bias = shl1_w & 0xFF000000
        bias = tl.where(bias < 0x71000000, 0x71000000, bias)
        base = ((bias >> 1) + 0x07800000).to(tl.float32, bitcast=True) + base
        bits = base.to(tl.uint32, bitcast=True)
        nonsign = ((bits >> 13) & 0x00007C00) + (bits & 0x00000FFF)
        return (sign >> 16) | tl.where(shl1_w > 0xFF000000, 0x7E00, nonsign)

    @triton.jit
    def _float_to_bfloat16(value):
        """ElementCodec<c10::BFloat16>::store (c10's round_to_nearest_even), NaN -> 0x7FC0."""
        u = value.to(tl.uint32, bitcast=True)
        rounded = tl.add(u, ((u >> 16) & 1) + 0x7FFF, sanitize_overflow=False) >> 16
        return tl.where(value != value, 0x7FC0, rounded)

    @triton.jit
    def _bfloat16_stochastic(value, random):
        """ElementCodec<c10::BFloat16>::store_stochastic: 16 random bits added below the kept ones,
        then truncation (torchao's bf16_stochastic_round)."""
        rounded = tl.add(value.to(tl.uint32, bitcast=True), random & 0xFFFF, sanitize_overflow=False) >> 16
        return tl.where(value != value, 0x7FC0, rounded)

    @triton.jit
    def _half_stochastic(value, random):
        """ElementCodec<c10::Half>::store_stochastic: rounds the magnitude up with probability
        (|x| - |down|) / (|up| - |down|), every quantity exact in float32, compared with 24
        random bits."""
        nearest = _float_to_half(value)
        magnitude_bits = value.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        magnitude = magnitude_bits.to(tl.float32, bitcast=True)
        # nearest rounded the magnitude up: step back one (sign-magnitude bits count magnitudes)
        down = tl.where(_half_to_float(nearest & 0x7FFF) > magnitude, nearest - 1, nearest)
        down_magnitude_bits = down & 0x7FFF
        down_magnitude = _half_to_float(down_magnitude_bits)
        up_magnitude = tl.where(down_magnitude_bits == 0x7BFF, 65536.0, _half_to_float(down_magnitude_bits + 1))
        # the span is a power of two, so dividing by it is multiplying by its reciprocal, exactly
        # (the fraction is in [0, 1) and far from subnormal): the same bits as the codec's
        # division, without a division's registers
        span_exponent = (up_magnitude - down_magnitude).to(tl.uint32, bitcast=True) & 0x7F800000
        reciprocal = ((254 << 23) - span_exponent).to(tl.float32, bitcast=True)
        fraction = (magnitude - down_magnitude) * reciprocal
        round_up = (random >> 8).to(tl.float32) < fraction * 16777216.0
        rounded = tl.where(round_up, down + 1, down)
        # NaN and inf: what nearest rounding gives (canonical NaN; inf stays inf)
        return tl.where(magnitude_bits < 0x7F800000, rounded, nearest)

    @triton.jit
    def _storage_pointers(entry, column, start, lanes, FORMAT: tl.constexpr, ALIGNED: tl.constexpr):
        """Pointers to elements `start + lanes` of the tensor whose data pointer is in `column`
        of the table row at `entry`, typed as the storage moves: float32, uint8 codes, and 16-bit
        values as their bits. `start` is an int64 scalar (tensors may exceed 2**31 elements);
        `lanes` are int32 offsets within the block, so that each address costs one add to a
        64-bit base."""
        address = tl.load(entry + column)
        if FORMAT == tl.float32:
            base = address.to(tl.pointer_type(tl.float32))
        elif FORMAT == tl.uint8:
            base = address.to(tl.pointer_type(tl.uint8))
        else:
            base = address.to(tl.pointer_type(tl.uint16))
        pointers = (base + start) + lanes
        if ALIGNED:
            # The host checked the alignment (the block map's `fast`), which Triton cannot see
            # through a pointer loaded from memory; with it, it emits 16-byte loads and stores.
            pointers = tl.multiple_of(pointers, [16, 16])
        return pointers

    @triton.jit
    def _load(pointers, mask, FORMAT: tl.constexpr):
        """Elements as float32 (ElementCodec::load): exact widening."""
        stored = tl.load(pointers, mask=mask)
        if FORMAT == tl.float32:
            return stored
        elif FORMAT == tl.bfloat16:
            return (stored.to(tl.uint32) << 16).to(tl.float32, bitcast=True)  # the upper half of a float32
        else:
            return _half_to_float(stored.to(tl.uint32))

    @triton.jit
    def _mix32(x):
        """rmsprop_update.h mix32 (lowbias32) on uint32: multiplications wrap modulo 2^32."""
        x ^= x >> 16
        x = tl.mul(x, 0x21F0AAAD, sanitize_overflow=False)
        x ^= x >> 15
        x = tl.mul(x, 0x735A2D97, sanitize_overflow=False)
        x ^= x >> 15
        return x

    @triton.jit
    def _random_bits(block_key, index_low):
        """rmsprop_update.h random_bits of elements `index` of a stream, mix32(low(index) ^ (key +
        high(index))), given the stream's key plus the block's high word (_update_block) and the
        low words: 32-bit lanes, where int64 indices held two registers an element through the
        stores."""
        return _mix32(index_low ^ block_key)

    @triton.jit
    def _store(pointers, value, mask, key, index, FORMAT: tl.constexpr, STOCHASTIC: tl.constexpr):
        """A float32 value stored through its codec: float32 as it is; 16-bit values rounded to
        nearest even, or with STOCHASTIC from the stream `key` at `index`."""
        if FORMAT == tl.float32:
            tl.store(pointers, value, mask=mask)
        else:
            if STOCHASTIC:
                random = _random_bits(key, index)
                if FORMAT == tl.bfloat16:
                    bits = _bfloat16_stochastic(value, random)
                else:
                    bits = _half_stochastic(value, random)
            else:
                if FORMAT == tl.bfloat16:
                    bits = _float_to_bfloat16(value)
                else:
                    bits = _float_to_half(value)
            tl.store(pointers, bits.to(tl.uint16), mask=mask)

    # ------------------------------------------------------------------- 8-bit blockwise state

    @triton.jit
    def _dequantize(codes, scales, code_map):
        """blockwise_quant.h dequantize for a tile: map[code] * its row's scale."""
        return tl.load(code_map + codes.to(tl.int32)) * scales[:, None]

    @triton.jit
    def _quantize_rows(values, mask, code_map):
        """The codes and the scales of a tile of new state, one scale per row (256 elements):
        AbsMax over the magnitudes' bits (a NaN or an inf anywhere makes the scale NaN), normalize,
        then the nearest code by blockwise_quant.h's branchless 8-step search and distance
        comparison."""
        magnitude_bits = (values.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int32, bitcast=True)
        if mask is not None:
            magnitude_bits = tl.where(mask, magnitude_bits, 0)  # elements past the tensor's end
        largest = tl.max(magnitude_bits, axis=1)
        scales = tl.where(largest >= 0x7F800000, 0x7FC00000, largest).to(tl.float32, bitcast=True)
        row_scales = scales[:, None]
        normalized = tl.where(row_scales > 0.0, tl.math.div_rn(values, row_scales), 0.0)
        below = tl.zeros(values.shape, dtype=tl.int32)
        for k in tl.static_range(8):  # floor_code: the largest i with map[i] <= x (0 for NaN)
            below += tl.where(tl.load(code_map + (below + (128 >> k))) <= normalized, 128 >> k, 0)
        above = tl.minimum(below + 1, 255)
        distance_below = normalized - tl.load(code_map + below)
        distance_above = tl.load(code_map + above) - normalized
        codes = tl.where(distance_above < distance_below, above, below)
        return codes.to(tl.uint8), scales

    @triton.jit
    def _load_state(entry, column, scale_column, start, lanes, mask, row_mask, code_map,
                    STATE: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
        """A state tile in float32, and its pointers: elements, or 8-bit codes decoded with the
        scales of the tile's rows."""
        pointers = _storage_pointers(entry, column, start, lanes, STATE, ALIGNED)
        if STATE == tl.uint8:
            scale_pointers = tl.load(entry + scale_column).to(tl.pointer_type(tl.float32)) + (start >> 8)
            scale_pointers += tl.arange(0, ROWS)
            scales = tl.load(scale_pointers, mask=row_mask)
            return _dequantize(tl.load(pointers, mask=mask), scales, code_map), pointers, scale_pointers
        else:
            return _load(pointers, mask, STATE), pointers, pointers

    @triton.jit
    def _store_state(pointers, scale_pointers, value, mask, row_mask, code_map, key, index,
                     STATE: tl.constexpr, STOCHASTIC: tl.constexpr):
        if STATE == tl.uint8:
            codes, scales = _quantize_rows(value, mask, code_map)
            tl.store(pointers, codes, mask=mask)
            tl.store(scale_pointers, scales, mask=row_mask)
        else:
            _store(pointers, value, mask, key, index, STATE, STOCHASTIC)

    # ------------------------------------------------------------------------ per-tensor values

    @triton.jit
    def _step_count(step):
        """rmsprop_update.h step_count: a float32 counter as a uint32, clamped to [0, 2^32 - 1]
        (NaN: 0)."""
        positive = tl.where(step > 0.0, step, 0.0)
        in_range = tl.where(positive < 4294967040.0, positive, 0.0)  # converted only when it fits
        return tl.where(step >= 4294967040.0, 0xFFFFFFFF, in_range.to(tl.uint32))

    @triton.jit
    def _bias_correction_at(alpha_low, alpha_high, count):
        """rmsprop_update.h bias_correction_at: 1 - alpha^count, the power by squaring in float64
        over a fixed 32 bits, rounded once to float32. alpha's float64 bits come in two int32
        halves (Triton passes float arguments as float32)."""
        alpha_bits = (alpha_high.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | alpha_low.to(
            tl.uint32, bitcast=True).to(tl.uint64)
        base = alpha_bits.to(tl.float64, bitcast=True)
        result = tl.full([], 1.0, tl.float64)
        for bit in tl.static_range(32):
            result = tl.where(((count >> bit) & 1) != 0, result * base, result)
            base = base * base
        return (1.0 - result).to(tl.float32)

    @triton.jit
    def _rounding_key(seed_low, seed_high, tensor_index, count, stream: tl.constexpr):
        """rmsprop_update.h rounding_key for the tensor at `tensor_index` of the call."""
        key = _mix32(tl.add(tensor_index.to(tl.uint32) << 2, stream, sanitize_overflow=False))
        key = _mix32(key ^ count)
        key = _mix32(key ^ seed_high.to(tl.uint32, bitcast=True))
        return _mix32(key ^ seed_low.to(tl.uint32, bitcast=True))

    # ------------------------------------------------------------------------------ the update

    @triton.jit
    def _rmsprop_update(param, grad, square_avg, grad_avg, momentum_buffer, s,
                        CENTERED: tl.constexpr, MOMENTUM: tl.constexpr, UNSCALE_GRAD: tl.constexpr,
                        VARIANCE_FORM: tl.constexpr):
        """rmsprop_update.h rmsprop_update, one float32 operation (one rounding) at a time, in its
        order; returns (param, grad, square_avg, grad_avg, momentum_buffer), grad unscaled."""
        if UNSCALE_GRAD:
            grad = tl.math.div_rn(grad, s.grad_scale)
        g = grad
        p = param
        if s.clip:
            g = g * s.clip_coef  # clip_grad_norm_'s mul_
        if s.maximize:
            g = -g
        if s.coupled_weight_decay:
            g = g + s.weight_decay * p
        if s.decoupled_weight_decay:
            p = p * s.decay_factor

        # square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha); in the variance form (square_avg
        # holds w: rmsprop_update.h), alpha * w + alpha * (1 - alpha) * (g - m)^2, before m moves
        # (selects, not branches: two copies of the rest of the update spilled registers)
        square_avg = square_avg * s.alpha
        if VARIANCE_FORM:  # (centered, and a state format that may hold the variance)
            deviation = g - grad_avg
            square_avg = square_avg + tl.where(s.variance_state,
                                               (s.alpha * s.one_minus_alpha) * (deviation * deviation),
                                               s.one_minus_alpha * g * g)
        else:
            square_avg = square_avg + s.one_minus_alpha * g * g

        v = square_avg
        if CENTERED:
            # grad_avg.lerp_(g, 1 - alpha), with torch's two-sided formula
            if s.lerp_weight_small:
                grad_avg = grad_avg + s.one_minus_alpha * (g - grad_avg)
            else:
                grad_avg = g - (g - grad_avg) * s.lerp_one_minus_w
            m = grad_avg
        if s.use_bias_correction:  # optax's: both averages divided by 1 - alpha^step
            if VARIANCE_FORM:
                v = tl.where(s.variance_state, v + m * m, v)  # v' = w' + m'^2, which bias correction needs
            v = tl.math.div_rn(v, s.bias_correction)
            if CENTERED:
                m = tl.math.div_rn(m, s.bias_correction)
        var = v
        if VARIANCE_FORM:
            difference = v - m * m
            # variance form: w' itself; bias-corrected, v'/c - (m'/c)^2 clamped at 0 (NaN kept)
            variance = tl.where(s.use_bias_correction, tl.where(difference < 0.0, 0.0, difference), v)
            # square_avg.addcmul(grad_avg, grad_avg, value=-1); +inf - m*m stays +inf for a finite
            # m even where m*m overflows, as torch's fused multiply-add gives (rmsprop_update.h)
            finite_m = (m < float("inf")) & (m > float("-inf"))
            var = tl.where(s.variance_state, variance, tl.where((v == float("inf")) & finite_m, v, difference))
        elif CENTERED:
            finite_m = (m < float("inf")) & (m > float("-inf"))
            var = tl.where((v == float("inf")) & finite_m, v, v - m * m)
        denom = tl.math.sqrt_rn(var + s.eps_inside_root) + s.eps_outside_root

        if MOMENTUM:
            # torch: buf = momentum * buf + g / denom; param -= lr * buf
            # TF/Keras/timm: buf = momentum * buf + lr * g / denom; param -= buf
            # Nesterov (torch SGD, optax trace): the step is u + momentum * buf instead of buf
            lr_into_buffer = tl.where(s.lr_in_momentum, s.lr, 1.0)
            lr_onto_param = tl.where(s.lr_in_momentum, 1.0, s.lr)
            u = tl.math.div_rn(lr_into_buffer * g, denom)
            momentum_buffer = momentum_buffer * s.momentum
            momentum_buffer = momentum_buffer + u
            direction = momentum_buffer
            if s.nesterov:
                direction = u + s.momentum * momentum_buffer
            param = p - lr_onto_param * direction
        else:
            param = p - tl.math.div_rn(s.lr * g, denom)  # param.addcdiv_(g, denom, value=-lr)
        return param, grad, square_avg, grad_avg, momentum_buffer

    @triton.jit
    def _update_block(entry, start, lanes, mask, row_mask, s, keys, unsigned_map, signed_map,
                      PARAM: tl.constexpr, STATE: tl.constexpr, CENTERED: tl.constexpr,
                      MOMENTUM: tl.constexpr, UNSCALE_GRAD: tl.constexpr, STOCHASTIC: tl.constexpr,
                      ALIGNED: tl.constexpr, ROWS: tl.constexpr):
        """Elements `start + lanes` of the tensor whose table row starts at `entry`, where `mask`
        (None: all of them); `row_mask` says which tile rows exist (8-bit scales)."""
        # Every load before any store, as the C++ kernels do.
        param_ptrs = _storage_pointers(entry, 0, start, lanes, PARAM, ALIGNED)  # columns: _TABLE_WIDTH
        grad_ptrs = _storage_pointers(entry, 1, start, lanes, PARAM, ALIGNED)
        p = _load(param_ptrs, mask, PARAM)
        grad = _load(grad_ptrs, mask, PARAM)
        v, v_ptrs, v_scale_ptrs = _load_state(entry, 2, 5, start, lanes, mask, row_mask, unsigned_map,
                                              STATE, ALIGNED, ROWS)
        m = v  # placeholders where the state is absent: never stored
        b = v
        if CENTERED:
            m, m_ptrs, m_scale_ptrs = _load_state(entry, 3, 6, start, lanes, mask, row_mask, signed_map,
                                                  STATE, ALIGNED, ROWS)
        if MOMENTUM:
            b, b_ptrs, b_scale_ptrs = _load_state(entry, 4, 7, start, lanes, mask, row_mask, signed_map,
                                                  STATE, ALIGNED, ROWS)

        # fp16 state never holds the variance (csrc/cpu/cpu_kernel.h can_hold_variance_state)
        VARIANCE_FORM: tl.constexpr = CENTERED and STATE != tl.float16
        p, grad, v, m, b = _rmsprop_update(p, grad, v, m, b, s, CENTERED, MOMENTUM, UNSCALE_GRAD, VARIANCE_FORM)

        # The elements' indices in their tensor (their random bits). A block starts at a multiple
        # of BLOCK_SIZE, which divides 2**32, so its elements share the high word of their index.
        index = start.to(tl.uint32) + lanes.to(tl.uint32)
        high = (start >> 32).to(tl.uint32)
        keys = RoundingKeys(tl.add(keys.param, high, sanitize_overflow=False),
                            tl.add(keys.square_avg, high, sanitize_overflow=False),
                            tl.add(keys.grad_avg, high, sanitize_overflow=False),
                            tl.add(keys.momentum_buffer, high, sanitize_overflow=False))
        _store(param_ptrs, p, mask, keys.param, index, PARAM, STOCHASTIC)
        _store_state(v_ptrs, v_scale_ptrs, v, mask, row_mask, unsigned_map, keys.square_avg, index,
                     STATE, STOCHASTIC)
        if UNSCALE_GRAD:
            _store(grad_ptrs, grad, mask, keys.param, index, PARAM, False)  # AMP: to nearest, always
        if CENTERED:
            _store_state(m_ptrs, m_scale_ptrs, m, mask, row_mask, signed_map, keys.grad_avg, index,
                         STATE, STOCHASTIC)
        if MOMENTUM:
            _store_state(b_ptrs, b_scale_ptrs, b, mask, row_mask, signed_map, keys.momentum_buffer, index,
                         STATE, STOCHASTIC)

    @triton.jit(do_not_specialize=_RUNTIME_ARGUMENTS, do_not_specialize_on_alignment=_RUNTIME_ARGUMENTS)
    def _rmsprop_kernel(
        table,  # int64 [n_tensors, TABLE_WIDTH]: data pointers, numel and program count per tensor
        blocks,  # int64 [n_blocks, BLOCK_MAP_WIDTH]: (table row, first element, fast) per program
        done,  # int64 [n_tensors]: programs finished, per tensor (step counters); zeros between launches
        unsigned_map,  # float32 [256]: the code map of square_avg (8-bit state)
        signed_map,  # float32 [256]: the code map of grad_avg and momentum_buffer (8-bit state)
        lr,  # the learning rate as a float32, unless lr_from_tensor
        lr_tensor,  # float32 [1]: the learning rate, read when lr_from_tensor
        grad_scale,  # float32 [1], read when UNSCALE_GRAD: grads are divided by it
        found_inf,  # float32 [1], read when has_found_inf: nonzero skips the whole step
        clip_coef,  # float32 [1], read when `clip`: grads are multiplied by it
        alpha,  # this and the rest of the floats: float32, from make_step_scalars (_step_scalars)
        one_minus_alpha,
        lerp_one_minus_w,
        eps_inside_root,
        eps_outside_root,
        weight_decay,
        momentum,
        alpha_low,  # int32: the low and high halves of alpha's float64 bits (bias correction)
        alpha_high,
        seed_low,  # int32: the low and high halves of the rounding seed's 64 bits
        seed_high,
        maximize,  # booleans: the options that are uniform branches
        coupled_weight_decay,
        decoupled_weight_decay,
        lerp_weight_small,
        lr_in_momentum,
        nesterov,
        bias_correction,
        clip,
        variance_state,
        counts_steps,  # state_steps were given: read them, increment them
        has_found_inf,
        lr_from_tensor,
        PARAM: tl.constexpr,  # tl.float32, tl.float16 or tl.bfloat16: params and grads
        STATE: tl.constexpr,  # the same, or tl.uint8: 8-bit blockwise codes with scales
        CENTERED: tl.constexpr,
        MOMENTUM: tl.constexpr,
        UNSCALE_GRAD: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        TABLE_WIDTH: tl.constexpr,
        BLOCK_MAP_WIDTH: tl.constexpr,
    ):
        block = blocks + tl.program_id(0).to(tl.int64) * BLOCK_MAP_WIDTH
        row = tl.load(block + 0)
        start = tl.load(block + 1)
        fast = tl.load(block + 2)
        entry = table + row * TABLE_WIDTH

        if has_found_inf:
            # Any nonzero flag skips the step (GradScaler sums the flags of several devices), and
            # so does NaN: `!=` is an unordered compare. The whole program returns before it reads
            # anything else, step counters included: no host sync, and a branch that all its
            # threads take alike.
            if tl.load(found_inf) != 0:
                return

        # set_learning_rate: the decoupled decay factor in float32 from the float32 lr, the same
        # way for a float lr and for one read on the device (no host sync, capturable).
        lr = tl.cast(lr, tl.float32)
        if lr_from_tensor:
            lr = tl.load(lr_tensor)
        weight_decay = tl.cast(weight_decay, tl.float32)
        decay_factor = 1.0 - lr * weight_decay
        grad_scale_value = 1.0
        if UNSCALE_GRAD:
            grad_scale_value = tl.load(grad_scale)
        clip_value = tl.full([], 1.0, tl.float32)
        if clip:
            clip_value = tl.load(clip_coef)

        # The tensor's step count after this step's increment, as the C++ op reads it.
        step = tl.full([], 0.0, tl.float32)
        step_pointer = tl.load(entry + 8).to(tl.pointer_type(tl.float32))
        if counts_steps:
            step = tl.load(step_pointer) + 1.0  # torch's `step += 1` on a float32 tensor
        count = _step_count(step)
        correction = tl.full([], 1.0, tl.float32)
        if bias_correction:
            correction = _bias_correction_at(alpha_low, alpha_high, count)
        zero_key = tl.full([], 0, tl.uint32)
        keys = RoundingKeys(zero_key, zero_key, zero_key, zero_key)
        if STOCHASTIC:
            keys = RoundingKeys(
                _rounding_key(seed_low, seed_high, row, count, 0), _rounding_key(seed_low, seed_high, row, count, 1),
                _rounding_key(seed_low, seed_high, row, count, 2), _rounding_key(seed_low, seed_high, row, count, 3),
            )
        s = StepScalars(
            lr, tl.cast(alpha, tl.float32), tl.cast(one_minus_alpha, tl.float32),
            tl.cast(lerp_one_minus_w, tl.float32), tl.cast(eps_inside_root, tl.float32),
            tl.cast(eps_outside_root, tl.float32), weight_decay, tl.cast(momentum, tl.float32),
            grad_scale_value, clip_value, decay_factor, correction, maximize, coupled_weight_decay,
            decoupled_weight_decay, lerp_weight_small, lr_in_momentum, nesterov, bias_correction, clip,
            variance_state,
        )

        # The tile: a row per 256 elements (a block of 8-bit state), int32 offsets in the block.
        ROWS: tl.constexpr = BLOCK_SIZE // 256
        tile_rows = tl.arange(0, ROWS)
        lanes = tile_rows[:, None] * 256 + tl.arange(0, 256)[None, :]
        # One branch per program, taken by all its threads alike. The two calls differ only in
        # what Triton can prove about the accesses: a whole, aligned block needs no bounds mask
        # (a mask against a size loaded from memory would keep every access scalar) and may use
        # 16-byte vectors; a tensor's last block, or any block of a misaligned view, is masked.
        if fast != 0:
            _update_block(entry, start, lanes, None, None, s, keys, unsigned_map, signed_map, PARAM, STATE,
                          CENTERED, MOMENTUM, UNSCALE_GRAD, STOCHASTIC, True, ROWS)
        else:
            # How many of the block's elements exist: at most BLOCK_SIZE, so int32 will do.
            remaining = tl.minimum(tl.load(entry + 9) - start, BLOCK_SIZE).to(tl.int32)
            _update_block(entry, start, lanes, lanes < remaining, tile_rows * 256 < remaining, s, keys,
                          unsigned_map, signed_map, PARAM, STATE, CENTERED, MOMENTUM, UNSCALE_GRAD,
                          STOCHASTIC, False, ROWS)

        if counts_steps:
            # The last program of this tensor to finish writes its counter back. Every thread of
            # this program has read the counter before the barrier, and the atomic (acq_rel, GPU
            # scope) orders this program's reads before any later program's write.
            tl.debug_barrier()
            finished = tl.atomic_add(done + row, 1)
            if finished == tl.load(entry + 10) - 1:
                tl.store(step_pointer, step)
                tl.store(done + row, 0)  # ready for the next launch (or CUDA graph replay)


# Whether `triton.jit` built an interpreted kernel (it reads TRITON_INTERPRET when the kernel is
# defined, i.e. when this module is imported; later changes to the variable have no effect).
_INTERPRETED = triton is not None and not isinstance(_rmsprop_kernel, triton.runtime.JITFunction)


_FORMATS = (
    {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.uint8: tl.uint8}
    if triton is not None else {}
)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the Triton kernel can update tensors on `device` here, else the reason."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type == "cpu":
        if _INTERPRETED:
            return None
        return "CPU tensors need TRITON_INTERPRET=1 set before rmsprop_fused's Triton module is imported"
    if device.type != "cuda":
        return f"the Triton kernel updates CUDA tensors, not {device.type} tensors"
    if _INTERPRETED:
        # The interpreter would dereference the table's device pointers on the host.
        return ("TRITON_INTERPRET=1 was set when rmsprop_fused's Triton module was imported, so its "
                "kernel runs in Triton's CPU interpreter, which cannot update CUDA tensors")
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


_float32 = functools.partial(round_to_dtype, dtype=torch.float32)


def _int32_halves(bits: int) -> tuple:
    """The low and high 32 bits of a 64-bit pattern, each as a signed int32 value (an int32
    argument whatever the bits, so the kernel's signature never changes)."""
    signed = lambda half: half - (1 << 32) if half >= 1 << 31 else half
    return signed(bits & 0xFFFFFFFF), signed((bits >> 32) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=64)
def _step_scalars(alpha: float, eps: float, weight_decay: float, momentum: float, eps_in_sqrt: bool,
                  decoupled_weight_decay: bool) -> dict:
    """The scalars of make_step_scalars in csrc/rmsprop_update.h, rounded to float32 the same
    way, and the flags it derives from them."""
    one_minus_alpha = _float32(1.0 - alpha)  # torch passes `1 - alpha`: rounded once, from double
    alpha_low, alpha_high = _int32_halves(struct.unpack("<Q", struct.pack("<d", alpha))[0])
    return dict(
        alpha=_float32(alpha),
        one_minus_alpha=one_minus_alpha,
        # float32(1) - one_minus_alpha, a float32 subtraction: computing it in double and rounding
        # once gives the same float32 (double has more than 2 * 24 + 2 bits, so no double rounding).
        lerp_one_minus_w=_float32(1.0 - one_minus_alpha),
        eps_inside_root=_float32(eps) if eps_in_sqrt else 0.0,  # x + 0 == x: the unused one is 0
        eps_outside_root=0.0 if eps_in_sqrt else _float32(eps),
        weight_decay=_float32(weight_decay),
        momentum=_float32(momentum),
        alpha_low=alpha_low,
        alpha_high=alpha_high,
        lerp_weight_small=abs(one_minus_alpha) < 0.5,  # torch's lerp picks its formula by |weight|
        # Decided on the double: a weight decay that rounds to 0 in float32 still adds 0 * p
        # (torch skips `g + wd * p` when wd == 0, which matters for an inf p).
        coupled_weight_decay=weight_decay != 0.0 and not decoupled_weight_decay,
        decoupled_weight_decay=weight_decay != 0.0 and decoupled_weight_decay,
    )


class _LaunchPlan:
    """The pointer table, block map and per-tensor program counters of one set of tensors, on
    their device (module docstring). All three live in one int64 allocation, so building a plan
    costs one host-to-device copy."""

    def __init__(self, lists: dict, device: torch.device, block_size: int):
        params = lists["params"]
        n = len(params)
        table = torch.zeros(n, _TABLE_WIDTH, dtype=torch.int64)
        for name, tensors in lists.items():
            table[:, _COLUMNS[name]] = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
        numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
        element_columns = [_COLUMNS[name] for name in _ELEMENT_LISTS if name in lists]
        aligned = (table[:, element_columns] % _ALIGNMENT == 0).all(dim=1)

        blocks_per_tensor = (numels + block_size - 1) // block_size
        if "state_steps" in lists:
            blocks_per_tensor.clamp_(min=1)  # a zero-size tensor's program counts its step
        table[:, _NUMEL] = numels
        table[:, _PROGRAMS] = blocks_per_tensor
        rows = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), blocks_per_tensor)
        first_block_of_row = torch.cumsum(blocks_per_tensor, 0) - blocks_per_tensor
        starts = (torch.arange(rows.numel(), dtype=torch.int64) - first_block_of_row[rows]) * block_size
        # A whole block of an aligned tensor starts aligned too: block_size * element size is a
        # multiple of 16 bytes.
        fast = aligned[rows] & (starts + block_size <= numels[rows])
        blocks = torch.stack([rows, starts, fast.to(torch.int64)], dim=1)

        metadata = torch.cat([table.flatten(), blocks.flatten(), torch.zeros(n, dtype=torch.int64)]).to(device)
        self.metadata = metadata
        # The stream the caching allocator gave the metadata to (record_use)
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.table = metadata[: table.numel()]
        self.blocks = metadata[table.numel(): table.numel() + blocks.numel()]
        self.done = metadata[table.numel() + blocks.numel():]
        # A float32 tensor on the device for the pointer arguments the variant does not read.
        self.unused = metadata.view(torch.float32)
        self.n_blocks = rows.numel()

    def record_use(self) -> None:
        """Marks the metadata as read by the current stream's next work: on a stream other than
        the one it was allocated on, the allocator must not reuse its memory, once the cache lets
        the plan go, before that stream is done with it (Tensor.record_stream)."""
        if self.stream is not None:
            stream = torch.cuda.current_stream(self.metadata.device)
            if stream != self.stream:
                self.metadata.record_stream(stream)


def _launch_plan(lists: dict, device: torch.device) -> _LaunchPlan:
    """The cached plan for these tensors where they are now, built on first use.

    The key holds every data pointer and size, so a plan is reused exactly while the table it
    holds is right: replacing any tensor by one elsewhere in memory (a new param, state loaded
    from a checkpoint, `module.to()`) builds a new plan."""
    params = lists["params"]
    key = (
        device, BLOCK_SIZE, tuple(lists),
        tuple(t.data_ptr() for tensors in lists.values() for t in tensors),
        tuple(p.numel() for p in params),
    )
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    plan = _plan_cache.get(key)
    if plan is None:
        if capturing:
            raise RuntimeError(
                "the Triton backend builds the pointer table of a set of tensors on their first step, "
                "with a host-to-device copy that a CUDA graph cannot capture: run one step with "
                "these tensors before capturing (as for any optimizer warm-up). Tensors allocated "
                "inside the capture have addresses no step has seen: with backward() captured too, "
                "keep the grads with zero_grad(set_to_none=False)"
            )
        plan = _LaunchPlan(lists, device, BLOCK_SIZE)
        _plan_cache[key] = plan
        if len(_plan_cache) > _PLAN_CACHE_SIZE:
            _plan_cache.popitem(last=False)
    else:
        _plan_cache.move_to_end(key)
    if capturing:
        _captured_plans[key] = plan  # (kept for good: no stream needs recording)
    else:
        plan.record_use()
    return plan


def _as_float32(t: Optional[Tensor]) -> Optional[Tensor]:
    """A one-element device tensor as the kernel reads it, float32: converted on the device (to
    nearest, as the C++ op's static_cast<float> of its value) when it is another dtype, so that
    the kernel's signature does not depend on it."""
    return t if t is None or t.dtype == torch.float32 else t.to(torch.float32)


class Launch(NamedTuple):
    """One launch of the kernel: `_rmsprop_kernel[grid](*args, **kwargs)`."""

    grid: tuple
    args: tuple
    kwargs: dict


def kernel_launch(
    params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, square_avg_scales, grad_avg_scales,
    momentum_buffer_scales, *, lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt,
    lr_in_momentum, decoupled_weight_decay, nesterov, bias_correction, variance_state, rounding_seed,
    grad_scale=None, found_inf=None, clip_coef=None,
) -> Optional[Launch]:
    """What :func:`rmsprop_triton` launches for one group (its arguments), or None when there is
    nothing to do. The ahead-of-time compile test takes its variants from here."""
    if not params:
        return None
    named = dict(params=params, grads=grads, square_avgs=square_avgs, grad_avgs=grad_avgs,
                 momentum_buffers=momentum_buffers, state_steps=state_steps, square_avg_scales=square_avg_scales,
                 grad_avg_scales=grad_avg_scales, momentum_buffer_scales=momentum_buffer_scales)
    lists = {name: list(tensors) for name, tensors in named.items() if len(tensors)}
    device = params[0].device
    plan = _launch_plan(lists, device)
    if plan.n_blocks == 0:
        return None  # only zero-size tensors, and no step counters

    state_dtype = square_avgs[0].dtype
    maps = ((_quantization.code_map(False, device), _quantization.code_map(True, device))
            if state_dtype == torch.uint8 else (plan.unused, plan.unused))
    lr_from_tensor = isinstance(lr, Tensor)
    grad_scale, clip_coef = _as_float32(grad_scale), _as_float32(clip_coef)
    if found_inf is not None and found_inf.dtype != torch.float32:
        found_inf = found_inf.ne(0).to(torch.float32)  # a tiny float64 flag must not round to 0
    seed_low, seed_high = _int32_halves((rounding_seed or 0) & 0xFFFFFFFFFFFFFFFF)
    # A pointer argument the kernel does not read (its flag is off) still needs a float32 tensor.
    optional = lambda t: plan.unused if t is None else t
    args = (
        plan.table, plan.blocks, plan.done, *maps,
        0.0 if lr_from_tensor else _float32(lr),
        _as_float32(lr) if lr_from_tensor else plan.unused,
        optional(grad_scale), optional(found_inf), optional(clip_coef),
    )
    kwargs = dict(
        **_step_scalars(alpha, eps, weight_decay, momentum, eps_in_sqrt, decoupled_weight_decay),
        seed_low=seed_low, seed_high=seed_high, maximize=maximize, lr_in_momentum=lr_in_momentum,
        nesterov=nesterov, bias_correction=bias_correction, clip=clip_coef is not None,
        variance_state=variance_state, counts_steps=bool(state_steps), has_found_inf=found_inf is not None,
        lr_from_tensor=lr_from_tensor,
        PARAM=_FORMATS[params[0].dtype], STATE=_FORMATS[state_dtype], CENTERED=centered, MOMENTUM=momentum > 0,
        UNSCALE_GRAD=grad_scale is not None, STOCHASTIC=rounding_seed is not None,
        BLOCK_SIZE=BLOCK_SIZE, TABLE_WIDTH=_TABLE_WIDTH, BLOCK_MAP_WIDTH=_BLOCK_MAP_WIDTH,
        num_warps=NUM_WARPS, enable_fp_fusion=False, maxnreg=MAX_REGISTERS,
    )
    return Launch((plan.n_blocks,), args, kwargs)


def rmsprop_triton(
    params: List[Tensor],
    grads: List[Tensor],
    square_avgs: List[Tensor],
    grad_avgs: List[Tensor],
    momentum_buffers: List[Tensor],
    state_steps: List[Tensor],
    square_avg_scales: List[Tensor],
    grad_avg_scales: List[Tensor],
    momentum_buffer_scales: List[Tensor],
    *,
    lr: Union[float, Tensor],
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    eps_in_sqrt: bool,
    lr_in_momentum: bool,
    decoupled_weight_decay: bool,
    nesterov: bool,
    bias_correction: bool,
    variance_state: bool,
    rounding_seed: Optional[int],
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    clip_coef: Optional[Tensor] = None,
) -> None:
    """One RMSprop step on one (device, param dtype, state dtype) group, already validated by
    :func:`rmsprop_fused.functional.rmsprop` (the signature of the functional entry): a single
    kernel launch, which reads a tensor lr, grad_scale, found_inf, clip_coef and the step counters
    on the device, and increments the counters unless found_inf is nonzero."""
    launch = kernel_launch(
        params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, square_avg_scales, grad_avg_scales,
        momentum_buffer_scales, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
        centered=centered, maximize=maximize, eps_in_sqrt=eps_in_sqrt, lr_in_momentum=lr_in_momentum,
        decoupled_weight_decay=decoupled_weight_decay, nesterov=nesterov, bias_correction=bias_correction,
        variance_state=variance_state, rounding_seed=rounding_seed, grad_scale=grad_scale, found_inf=found_inf,
        clip_coef=clip_coef,
    )
    if launch is None:
        return
    device = params[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _rmsprop_kernel[launch.grid](*launch.args, **launch.kwargs)
    # The kernel writes through pointers: bump the version counters, as the C++ op does.
    written = (params, square_avgs, grad_avgs, momentum_buffers, state_steps, square_avg_scales, grad_avg_scales,
               momentum_buffer_scales, grads if grad_scale is not None else ())
    _increment_versions([t for tensors in written for t in tensors])


def _increment_versions(tensors: List[Tensor]) -> None:
    """torch.autograd.graph.increment_version of each tensor, in one call where torch takes a list."""
    if _INCREMENT_VERSION_TAKES_LISTS:
        torch.autograd.graph.increment_version(tensors)
    else:
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _increment_version_takes_lists() -> bool:
    try:
        torch.autograd.graph.increment_version([torch.empty(0)])
    except TypeError:  # (an older torch takes one tensor)
        return False
    return True


_INCREMENT_VERSION_TAKES_LISTS = _increment_version_takes_lists()
