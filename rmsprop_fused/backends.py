"""Which implementation updates a (device, dtype) group, and why the others cannot.

    reference  plain PyTorch ops, any device, any floating dtype (the oracle; always available)
    cpu        the compiled C++ kernel, CPU tensors: float64, float32, float16, bfloat16
    cuda       the compiled multi-tensor CUDA kernel: float64, float32, float16, bfloat16
    triton     the Triton kernel, CUDA tensors (CPU tensors under TRITON_INTERPRET=1):
               float32, float16, bfloat16

Every backend keeps state in the param's dtype, in float32 or bfloat16 for 16-bit params,
bfloat16 for float32 params, or as 8-bit blockwise codes (uint8) for float32 and 16-bit params.

"auto" takes, per group, the first available of: cpu (CPU tensors); cuda, then triton (CUDA
tensors); and the reference otherwise.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from . import _extension
from ._reference import rmsprop_reference
from .errors import BackendUnavailableError

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# State dtypes other than the param's own, by param dtype (csrc/rmsprop_op.h is_supported_state_dtype).
OTHER_STATE_DTYPES = {
    torch.float32: (torch.bfloat16, torch.uint8),
    torch.float16: (torch.float32, torch.bfloat16, torch.uint8),
    torch.bfloat16: (torch.float32, torch.uint8),
    torch.float64: (),
}
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def check_name(backend) -> None:
    """Raises ValueError unless `backend` is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (expected one of {', '.join(map(repr, BACKENDS))})")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _triton_reason(device: torch.device, dtype: Optional[torch.dtype]) -> Optional[str]:
    from . import _triton_backend  # imports triton lazily: it is optional and slow to import

    if dtype is not None and dtype not in TRITON_DTYPES:
        return f"the Triton kernel supports float32, float16 and bfloat16, not {_dtype_name(dtype)}"
    return _triton_backend.unavailable_reason(device)


def _state_reason(dtype: Optional[torch.dtype], state_dtype: Optional[torch.dtype]) -> Optional[str]:
    if dtype is None or state_dtype is None or state_dtype == dtype or state_dtype in OTHER_STATE_DTYPES.get(dtype, ()):
        return None
    return f"{_dtype_name(dtype)} params cannot keep {_dtype_name(state_dtype)} state"


@functools.lru_cache(maxsize=None)
def unavailable_reason(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                       state_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when `backend` can update `dtype` tensors with `state_dtype` state on `device` here;
    else the reason it cannot. dtype=None asks about the device alone, state_dtype=None about
    state of the param's dtype."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"the {backend!r} backend updates {backend.upper()} tensors, not {device.type} tensors"
        if dtype is not None and dtype not in KERNEL_DTYPES:
            return f"the C++ kernels support float64, float32, float16 and bfloat16, not {_dtype_name(dtype)}"
        return _state_reason(dtype, state_dtype) or _extension.unavailable_reason(device)
    if backend == "triton":
        return _state_reason(dtype, state_dtype) or _triton_reason(device, dtype)
    check_name(backend)  # raises for a name that is no backend
    raise ValueError("unavailable_reason() asks about one implementation, not 'auto'")


# Under torch.compile the choice is made eagerly at trace time (and baked into the graph): it
# depends only on what is installed and which GPU is present, never on tensor values.
@torch.compiler.assume_constant_result
def select(backend: str, device: torch.device, dtype: torch.dtype, state_dtype: Optional[torch.dtype] = None) -> str:
    """The backend that updates a (device, dtype, state dtype) group; raises
    BackendUnavailableError when an explicitly requested one cannot, saying why."""
    if backend == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ()):
            if unavailable_reason(candidate, device, dtype, state_dtype) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(backend, device, dtype, state_dtype)
    if reason is not None:
        state = "" if state_dtype in (None, dtype) else f" with {_dtype_name(state_dtype)} state"
        raise BackendUnavailableError(
            f"backend={backend!r} cannot update {_dtype_name(dtype)} tensors{state} on {device}: {reason}"
        )
    return backend


def implementation(name: str) -> Callable[..., None]:
    """The function implementing the functional signature for a selected backend."""
    if name == "reference":
        return rmsprop_reference
    if name in ("cpu", "cuda"):
        return _extension.rmsprop_extension
    if name == "triton":
        from ._triton_backend import rmsprop_triton

        return rmsprop_triton
    raise ValueError(f"Invalid backend: {name!r}")
