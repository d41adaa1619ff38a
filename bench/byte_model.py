"""The byte model of a step (docs/DESIGN.md section 4): the fewest bytes one fused pass must move,
and the bytes of optimizer state kept per param, for every state format.

A fused step reads the param, the grad and each state tensor once and writes the param and each
state tensor once. For fp32 params with fp32 state that is 20, 28 or 36 bytes per element (plain,
momentum, centered + momentum); 16-bit params and state halve it. 8-bit state (rmsprop_fused's
state_dtype="8bit", bitsandbytes' 8-bit optimizers) keeps one byte per element and a float32 scale
per block of 256 elements, 1 + 4/256 = 1.0156 bytes, read and written; tensors under 4,096
elements keep float32 state. Clipping by global norm reads every grad once more, for the norm.

Every function here works per tensor, because the 8-bit rule depends on a tensor's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

import torch

from rmsprop_fused._quantization import MIN_QUANTIZED_NUMEL, QUANT_BLOCK

Shape = Tuple[int, ...]

# How an implementation keeps its state. "param": the param's own dtype (torch's RMSprop, and
# FusedRMSprop's default); the others are FusedRMSprop's state_dtype values.
STATE_FORMATS = ("param", "fp32", "bf16", "8bit")
_FORMAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass(frozen=True)
class OptionSet:
    """The options that change what a step reads and writes: the state tensors (centered adds
    grad_avg, momentum > 0 adds momentum_buffer) and clipping by global norm (a read of every grad
    for the norm)."""

    name: str
    centered: bool = False
    momentum: float = 0.0
    clip: bool = False

    def kwargs(self) -> dict:
        """torch.optim.RMSprop's arguments for these options (clipping is no argument of torch's)."""
        return {"centered": self.centered, "momentum": self.momentum}

    @property
    def state_tensors(self) -> int:
        return 1 + int(self.centered) + int(self.momentum > 0)


def state_dtype_argument(state_format: str):
    """FusedRMSprop's state_dtype for a state format."""
    if state_format not in STATE_FORMATS:
        raise ValueError(f"unknown state format {state_format!r} (one of {', '.join(STATE_FORMATS)})")
    return {"param": None, "8bit": "8bit"}.get(state_format, _FORMAT_DTYPES.get(state_format))


def why_format_does_not_apply(state_format: str, dtype: torch.dtype) -> Optional[str]:
    """None when `state_format` is a state of its own for `dtype` params (FusedRMSprop's rules:
    float64 params keep float64 state; fp32 state of fp32 params and bf16 state of bf16 params are
    the default state, timed without a suffix)."""
    if state_format == "param":
        return None
    if dtype == torch.float64:
        return "float64 params keep float64 state"
    if _FORMAT_DTYPES.get(state_format) == dtype:
        return f"{state_format} state is the {DTYPE_NAMES[dtype]} params' own (timed without the suffix)"
    return None


def storage_dtype(state_format: str, dtype: torch.dtype, numel: int) -> torch.dtype:
    """The dtype a state tensor of a `numel`-element `dtype` param is stored in."""
    if state_format == "param":
        return dtype
    if state_format == "8bit":
        return torch.uint8 if numel >= MIN_QUANTIZED_NUMEL else torch.float32
    return _FORMAT_DTYPES[state_format]


def storage_name(state_format: str, dtype: torch.dtype) -> str:
    """The state's storage, named as the formats are: "param" state of fp32 params is "fp32"."""
    return DTYPE_NAMES[dtype] if state_format == "param" else state_format


def scale_count(numel: int) -> int:
    """Float32 scales of one 8-bit state tensor: one per block of QUANT_BLOCK elements."""
    return math.ceil(numel / QUANT_BLOCK)


def state_tensor_bytes(state_format: str, dtype: torch.dtype, numel: int) -> int:
    """Bytes of one state tensor (and its scales) for a `numel`-element param."""
    stored = storage_dtype(state_format, dtype, numel)
    return numel * stored.itemsize + (4 * scale_count(numel) if stored == torch.uint8 else 0)


def _numels(shapes: Iterable[Shape]) -> Sequence[int]:
    return [math.prod(shape) for shape in shapes]


def state_bytes(shapes: Iterable[Shape], dtype: torch.dtype, options: OptionSet, state_format: str = "param") -> int:
    """Bytes of optimizer state for params of these shapes (the step counters left out: 4 bytes a
    tensor)."""
    return sum(options.state_tensors * state_tensor_bytes(state_format, dtype, n) for n in _numels(shapes))


def step_bytes(shapes: Iterable[Shape], dtype: torch.dtype, options: OptionSet, state_format: str = "param",
               grad_scale: bool = False) -> int:
    """The fewest bytes one step must move: param and grad read, param written (and the unscaled
    grad written back under a grad_scale), every state tensor read and written, and the grads read
    again for the norm when clipping."""
    total = 0
    for n in _numels(shapes):
        param_bytes = n * dtype.itemsize
        total += param_bytes * (3 + int(grad_scale) + int(options.clip))
        total += 2 * options.state_tensors * state_tensor_bytes(state_format, dtype, n)
    return total


def min_bytes_per_element(dtype: torch.dtype, centered: bool, momentum: float, grad_scale: bool = False) -> int:
    """docs/DESIGN.md section 4, state in the param's dtype: plain 20, momentum 28, centered +
    momentum 36 bytes per fp32 element (+4 with a grad_scale); half that for 16-bit tensors."""
    return step_bytes([(1,)], dtype, OptionSet("", centered, momentum), grad_scale=grad_scale)


def tensors_touched(centered: bool, momentum: float, grad_scale: bool = False) -> Tuple[int, int]:
    """(tensors read, tensors written) by one fused pass: param, grad and square_avg are read,
    param and square_avg written; grad_avg (centered) and momentum_buffer (momentum > 0) are both
    read and written; with a grad_scale the unscaled grad is written back too."""
    extra_state = int(centered) + int(momentum > 0)
    return 3 + extra_state, 2 + extra_state + int(grad_scale)
