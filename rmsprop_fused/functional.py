"""The functional form of the fused RMSprop step: one signature, every backend.

:func:`rmsprop` validates everything, then groups the tensors by (device, dtype) (complex tensors
as ``torch.view_as_real`` pairs, DTensors as their local shards) and hands each group to the
backend chosen for it. Each backend implements exactly the signature of :func:`rmsprop` minus
``backend``, on one (device, dtype) group.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _extension, backends
from .errors import InvalidInputError, SparseGradientError

__all__ = ["rmsprop", "check_hyperparameters", "check_param", "first_irregular"]

STATE_NAMES = ("square_avgs", "grad_avgs", "momentum_buffers")
# How FusedRMSprop names the tensors in its messages ("param group 1, param 3: grad is ...").
_OPTIMIZER_LABELS = {
    "params": "param", "grads": "grad", "square_avgs": "state['square_avg']",
    "grad_avgs": "state['grad_avg']", "momentum_buffers": "state['momentum_buffer']",
}


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


_DTensor = _dtensor_type() if torch.distributed.is_available() else None


def check_hyperparameters(lr, alpha, eps, weight_decay, momentum, *, initial_scale=0.0, check_tensor_lr=False):
    """torch.optim.RMSprop's checks and messages (NaN fails them too: `not 0.0 <= nan`).
    A tensor lr's value is checked when it is on the CPU (reading it costs no device sync) or
    when check_tensor_lr is set (a host sync for a device tensor)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.is_floating_point():
            raise ValueError(f"Tensor lr must be a floating-point tensor, got dtype {lr.dtype}")
        readable = check_tensor_lr or (lr.device.type == "cpu" and not torch.compiler.is_compiling())
        if readable and not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
    elif not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a float or a 1-element tensor, got {type(lr).__name__}")
    elif not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    for name, value, label in (
        ("eps", eps, "epsilon value"),
        ("momentum", momentum, "momentum value"),
        ("weight_decay", weight_decay, "weight_decay value"),
        ("alpha", alpha, "alpha value"),
        ("initial_scale", initial_scale, "initial_scale value"),
    ):
        if isinstance(value, Tensor) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not 0.0 <= value:
            raise ValueError(f"Invalid {label}: {value}")
    if not math.isfinite(initial_scale):
        raise ValueError(f"Invalid initial_scale value: {initial_scale}")


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and gap-free (contiguous in some dimension order, e.g. channels_last)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Element i of both sits at the same flat offset (strides agree wherever size > 1)."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _describe(t: Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)} on {t.device}"


def _label(index: int, name: str, where: Optional[tuple]) -> str:
    if where is None:
        return f"{name}[{index}]"
    group_index, param_index = where
    return f"param group {group_index}, param {param_index}: {_OPTIMIZER_LABELS[name]}"


def _check_resolved(index: int, label: str, t: Tensor) -> None:
    """A conjugate or negative view (torch.conj, torch._neg_view) keeps the original values in
    memory and a flag to apply on reading; the kernels update memory, so the flag would be lost.
    (Not while torch.compile traces: Dynamo cannot trace is_conj() or is_neg().)"""
    if torch.compiler.is_compiling():
        return
    if t.is_conj():
        raise InvalidInputError(index, f"{label} is a conjugate view (torch.conj); materialise it with .resolve_conj()")
    if t.is_neg():
        raise InvalidInputError(
            index, f"{label} is a negative view (as x.conj().imag is); materialise it with .resolve_neg()"
        )


def _check_companion(index: int, name: str, param: Tensor, t, *, as_state: bool, where: Optional[tuple]) -> None:
    label = _label(index, name, where)
    if not isinstance(t, Tensor):
        raise InvalidInputError(index, f"{label} is a {type(t).__name__}, not a tensor")
    _check_resolved(index, label, t)
    if t.layout != torch.strided:
        if name == "grads":
            raise SparseGradientError(index, f"RMSprop does not support sparse gradients ({label} has layout {t.layout})")
        raise InvalidInputError(index, f"{label} has layout {t.layout}; state must be strided like its param")
    if as_state:
        _check_writable(index, label, t)
    if t.device != param.device or t.dtype != param.dtype or t.shape != param.shape:
        kind = "state tensor" if as_state else "gradient"
        raise InvalidInputError(index, f"{label} ({kind}) is {_describe(t)} but the param is {_describe(param)}")
    if not _same_layout(param, t):
        raise InvalidInputError(
            index, f"{label} has strides {t.stride()} but the param has strides {param.stride()} "
            "(the fused update walks param, grad and state in the same memory order)"
        )


def _check_writable(index: int, label: str, t: Tensor) -> None:
    """torch refuses in-place updates of inference tensors outside inference mode; the compiled
    kernels write through data pointers and would not, so they are refused here, before any write.
    (Not while torch.compile traces: Dynamo cannot trace is_inference(), and compiled code runs
    on the tensors the trace was guarded on.)"""
    if torch.compiler.is_compiling():
        return
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise InvalidInputError(
            index, f"{label} is an inference tensor (created under torch.inference_mode()), which cannot "
            "be updated in place outside inference mode; clone it first"
        )


_PLAIN_TENSOR_TYPES = frozenset((Tensor, torch.nn.Parameter))
_PLAIN_TENSOR_TYPES_OR_NONE = _PLAIN_TENSOR_TYPES | {type(None)}


def first_irregular(params, grads, square_avgs=(), grad_avgs=(), momentum_buffers=()) -> int:
    """The index of the first param that needs the full checks of :func:`check_param`, or -1 when
    every param plainly passes them. Pass the lists the step will use (``grad_avgs`` only when
    centered, ``momentum_buffers`` only with momentum) and None for state not created yet.

    This is the Python cost of a step per param, so the common case is decided in C++
    (``rmsprop_fused::first_irregular``, csrc/rmsprop_op.cpp) in one pass over all params. Without
    the extension, while torch.compile traces, or when a list holds anything but plain tensors and
    parameters (DTensor, other subclasses), the answer is 0: everything takes the full checks."""
    if not params:
        return -1
    if _extension.load_error is not None or torch.compiler.is_compiling():
        return 0
    if not _PLAIN_TENSOR_TYPES.issuperset(map(type, params)):
        return 0
    companions = (grads, square_avgs, grad_avgs, momentum_buffers)
    if not all(_PLAIN_TENSOR_TYPES_OR_NONE.issuperset(map(type, tensors)) for tensors in companions):
        return 0
    return torch.ops.rmsprop_fused.first_irregular(params, *companions)


def check_param(index: int, param, grad, square_avg=None, grad_avg=None, momentum_buffer=None, *,
                where: Optional[tuple] = None) -> None:
    """Checks one param against its grad and whatever state it has (None: not created yet).
    Raises InvalidInputError (a ValueError) or SparseGradientError (a RuntimeError, with torch's
    message), both carrying `index`. Messages name the tensors by list and index
    ("grads[3]"), or, given `where` = (group index, param index), as the optimizer sees them
    ("param group 1, param 3: grad"). :func:`first_irregular` says which params need this."""
    name = _label(index, "params", where)
    if not isinstance(param, Tensor):
        raise InvalidInputError(index, f"{name} is a {type(param).__name__}, not a tensor")
    if param.is_meta:
        raise InvalidInputError(
            index, f"{name} is on the meta device and has no data to update "
            "(materialise the module first, e.g. module.to_empty(device=...))"
        )
    if param.layout != torch.strided:
        raise InvalidInputError(index, f"{name} has layout {param.layout}; only strided params are supported")
    if not (param.is_floating_point() or param.is_complex()):
        raise InvalidInputError(index, f"{name} has dtype {param.dtype}; RMSprop updates floating-point params")
    _check_writable(index, name, param)
    _check_resolved(index, name, param)
    _check_companion(index, "grads", param, grad, as_state=False, where=where)
    if not _is_dense(param):
        raise InvalidInputError(
            index, f"{name} is not dense (shape {tuple(param.shape)}, strides {param.stride()}): "
            "the fused update needs non-overlapping, gap-free memory; make it contiguous"
        )
    for state_name, t in zip(STATE_NAMES, (square_avg, grad_avg, momentum_buffer)):
        if t is not None:
            _check_companion(index, state_name, param, t, as_state=True, where=where)


def _local(index: int, name: str, t, reference):
    """A DTensor's local shard; DTensors must all share the param's mesh and placements, since the
    update is elementwise and runs on each rank's shard."""
    if _DTensor is None or not (isinstance(t, _DTensor) or isinstance(reference, _DTensor)):
        return t
    if not (isinstance(t, _DTensor) and isinstance(reference, _DTensor)):
        raise InvalidInputError(index, f"{name}[{index}] and params[{index}] must both be DTensors or both plain tensors")
    if t.device_mesh != reference.device_mesh or t.placements != reference.placements:
        raise InvalidInputError(
            index, f"{name}[{index}] is placed {t.placements} but params[{index}] is placed "
            f"{reference.placements}; the elementwise update needs identical sharding"
        )
    return t.to_local()


def _check_lists(params, grads, square_avgs, grad_avgs, momentum_buffers, centered, momentum):
    n = len(params)
    expected = {"grads": n, "square_avgs": n, "grad_avgs": n if centered else 0, "momentum_buffers": n if momentum > 0 else 0}
    for (name, want), got in zip(expected.items(), (grads, square_avgs, grad_avgs, momentum_buffers)):
        if len(got) != want:
            why = {"grad_avgs": f" (centered={centered})", "momentum_buffers": f" (momentum={momentum})"}.get(name, "")
            raise ValueError(f"got {len(got)} {name} for {n} params{why}; expected {want}")
    # check_param reads None as state not created yet (the optimizer creates it after the checks);
    # the functional form creates nothing, so it needs every state tensor.
    for name, states in zip(STATE_NAMES, (square_avgs, grad_avgs, momentum_buffers)):
        missing = next((i for i, t in enumerate(states) if t is None), None)
        if missing is not None:
            raise InvalidInputError(
                missing, f"{name}[{missing}] is None: the functional form needs every state tensor "
                "(zeros before the first step, as torch.optim.RMSprop creates them)"
            )


def _check_scalar_tensor(name: str, t) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"{name} must be a 1-element floating-point tensor or None, got {t!r}")


def rmsprop(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
    grad_avgs: Sequence[Tensor] = (),
    momentum_buffers: Sequence[Tensor] = (),
    *,
    lr: Union[float, Tensor] = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    eps_in_sqrt: bool = False,
    lr_in_momentum: bool = False,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    backend: str = "auto",
) -> None:
    r"""Applies one RMSprop step in place to lists of tensors (docs/DESIGN.md section 1).

    ``grad_avgs`` is used when ``centered`` and ``momentum_buffers`` when ``momentum > 0``; pass
    empty lists otherwise (torch.optim.RMSprop's state has the same shape). ``lr`` may be a float
    or a 1-element tensor, read on the device when it lives on the params' device (no host
    sync). With ``grad_scale``, grads are divided by it inside the update and the unscaled grads
    are written back; any nonzero ``found_inf`` leaves every tensor untouched.

    Everything is validated before anything is written: a refused call changes nothing.
    """
    check_hyperparameters(lr, alpha, eps, weight_decay, momentum)
    backends.check_name(backend)
    _check_lists(params, grads, square_avgs, grad_avgs, momentum_buffers, centered, momentum)
    first = first_irregular(
        params, grads, square_avgs, grad_avgs if centered else (), momentum_buffers if momentum > 0 else ()
    )
    if first >= 0:
        for i in range(first, len(params)):
            check_param(
                i, params[i], grads[i], square_avgs[i],
                grad_avgs[i] if centered else None, momentum_buffers[i] if momentum > 0 else None,
            )
    _check_scalar_tensor("grad_scale", grad_scale)
    _check_scalar_tensor("found_inf", found_inf)
    apply_checked(
        params, grads, square_avgs, grad_avgs, momentum_buffers, lr=lr, alpha=alpha, eps=eps,
        weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize,
        eps_in_sqrt=eps_in_sqrt, lr_in_momentum=lr_in_momentum, grad_scale=grad_scale,
        found_inf=found_inf, backend=backend,
    )


def apply_checked(params, grads, square_avgs, grad_avgs, momentum_buffers, *, lr, alpha, eps,
                  weight_decay, momentum, centered, maximize, eps_in_sqrt, lr_in_momentum,
                  grad_scale, found_inf, backend) -> None:
    """The step for inputs that already passed the checks of :func:`rmsprop` (the optimizer
    checks them itself, before it creates state). Backends are resolved for every group before
    the first group is updated, so an unavailable backend also changes nothing."""
    groups = _one_group(params, grads, square_avgs, grad_avgs, momentum_buffers, centered, momentum)
    if groups is None:
        groups = _groups(params, grads, square_avgs, grad_avgs, momentum_buffers, centered, momentum)
    plan = [(device, backends.select(backend, device, dtype), lists) for (device, dtype), lists in groups.items()]
    for device, name, lists in plan:
        backends.implementation(name)(
            *lists,
            lr=_lr_for(lr, device),
            alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
            maximize=maximize, eps_in_sqrt=eps_in_sqrt, lr_in_momentum=lr_in_momentum,
            grad_scale=_on(grad_scale, device), found_inf=_on(found_inf, device),
        )


def _one_group(params, grads, square_avgs, grad_avgs, momentum_buffers, centered, momentum) -> Optional[dict]:
    """The usual case: real params of plain types, all of one device and dtype, are one group,
    and the lists go to the backend as they are (no per-tensor list building). None otherwise."""
    if not params or torch.compiler.is_compiling() or not _PLAIN_TENSOR_TYPES.issuperset(map(type, params)):
        return None  # (Dynamo traces the per-tensor grouping of any torch; sets of types, not before 2.6)
    kinds = {(p.device, p.dtype) for p in params}
    if len(kinds) != 1:
        return None
    (kind,) = kinds
    if kind[1].is_complex:
        return None
    return {kind: [params, grads, square_avgs, grad_avgs if centered else [], momentum_buffers if momentum > 0 else []]}


def _groups(params, grads, square_avgs, grad_avgs, momentum_buffers, centered, momentum) -> dict:
    """{(device, dtype): the five lists}, complex tensors as view_as_real pairs and DTensors as
    their local shards."""
    groups: dict = {}
    for i, param in enumerate(params):
        tensors = [param, grads[i], square_avgs[i]]
        if centered:
            tensors.append(grad_avgs[i])
        if momentum > 0:
            tensors.append(momentum_buffers[i])
        if _DTensor is not None and isinstance(param, _DTensor):
            names = ("params", "grads") + STATE_NAMES[: len(tensors) - 2]
            tensors = [_local(i, name, t, param) for name, t in zip(names, tensors)]
        if tensors[0].is_complex():
            tensors = [torch.view_as_real(t) for t in tensors]
        group = groups.setdefault((tensors[0].device, tensors[0].dtype), [[] for _ in range(5)])
        for lst, t in zip(group, tensors[:3]):
            lst.append(t)
        if centered:
            group[3].append(tensors[3])
        if momentum > 0:
            group[4].append(tensors[-1])
    return groups


def _lr_for(lr, device: torch.device):
    """A tensor lr is read on the device when it lives there (capturable, no sync); a tensor
    elsewhere is read once on the host, as torch.optim does."""
    if isinstance(lr, Tensor):
        return lr if lr.device == device else lr.item()
    return float(lr)


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)
