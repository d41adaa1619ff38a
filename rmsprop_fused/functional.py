"""The functional form of the fused RMSprop step: one signature, every backend.

:func:`rmsprop` validates everything, then groups the tensors by (device, dtype, state dtype)
(complex tensors as ``torch.view_as_real`` pairs, DTensors as their local shards) and hands each
group to the backend chosen for it. Each backend implements exactly the signature of
:func:`rmsprop` minus ``differentiable`` and ``backend``, on one group of dense tensors that
share their param's memory layout: a param with gaps (a strided view) or a grad or state tensor
laid out otherwise is updated through a dense copy, written back after the step.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _extension, _quantization, backends
from .errors import InvalidInputError, SparseGradientError

__all__ = ["rmsprop", "check_hyperparameters", "check_param", "first_irregular", "overlapping_pair"]

STATE_NAMES = ("square_avgs", "grad_avgs", "momentum_buffers")
SCALE_NAMES = ("square_avg_scales", "grad_avg_scales", "momentum_buffer_scales")
# The op's tensor lists, in its order (csrc/rmsprop_op.cpp).
LIST_NAMES = ("params", "grads") + STATE_NAMES + ("state_steps",) + SCALE_NAMES
# How FusedRMSprop names the tensors in its messages ("param group 1, param 3: grad is ...").
OPTIMIZER_LABELS = {
    "params": "param", "grads": "grad", "square_avgs": "state['square_avg']",
    "grad_avgs": "state['grad_avg']", "momentum_buffers": "state['momentum_buffer']",
    "state_steps": "state['step']", "square_avg_scales": "state['square_avg_scale']",
    "grad_avg_scales": "state['grad_avg_scale']", "momentum_buffer_scales": "state['momentum_buffer_scale']",
}


class Lists(NamedTuple):
    """The tensor lists of a step, in the op's order; an option's lists are empty when it is off
    (grad_avgs unless centered, the scales unless the state is 8-bit, state_steps when steps are
    counted elsewhere)."""

    params: list
    grads: list
    square_avgs: list
    grad_avgs: list
    momentum_buffers: list
    state_steps: list
    square_avg_scales: list
    grad_avg_scales: list
    momentum_buffer_scales: list


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


# float and int pass the type checks below without numbers.Real's isinstance (an ABC's, about 1 us)
_BUILTIN_REALS = (float, int)


def check_hyperparameters(lr, alpha, eps, weight_decay, momentum, *, initial_scale=0.0, nesterov=False,
                          bias_correction=False, check_tensor_lr=False):
    """torch.optim.RMSprop's checks and messages (NaN fails them too: `not 0.0 <= nan`), and
    those of the options torch's RMSprop lacks. A tensor lr's value is checked when it is on the
    CPU (reading it costs no device sync) or when check_tensor_lr is set (a host sync for a
    device tensor)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.is_floating_point():
            raise ValueError(f"Tensor lr must be a floating-point tensor, got dtype {lr.dtype}")
        readable = check_tensor_lr or (lr.device.type == "cpu" and not torch.compiler.is_compiling())
        if readable and not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
    elif type(lr) not in _BUILTIN_REALS and not isinstance(lr, numbers.Real):
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
        if type(value) not in _BUILTIN_REALS and (isinstance(value, Tensor) or not isinstance(value, numbers.Real)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not 0.0 <= value:
            raise ValueError(f"Invalid {label}: {value}")
    if not math.isfinite(initial_scale):
        raise ValueError(f"Invalid initial_scale value: {initial_scale}")
    if nesterov and momentum <= 0:
        raise ValueError("Nesterov momentum requires a momentum > 0")  # torch.optim.SGD's rule
    if bias_correction and not alpha < 1:
        raise ValueError(f"bias_correction divides by 1 - alpha**step, which is 0 or negative for alpha={alpha}")


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
    """A tensor's name in a message: "grads[3]", or as the optimizer sees it, given `where` =
    (group index, param index[, {list name: label}])."""
    if where is None:
        return f"{name}[{index}]"
    group_index, param_index, *labels = where
    label = (labels[0] if labels else OPTIMIZER_LABELS)[name]
    return f"param group {group_index}, param {param_index}: {label}"


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


def _extent(t: Tensor) -> int:
    """How many elements a strided tensor spans in memory, from its first to its last (strides
    >= 0, as every tensor here has)."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def _has_internal_overlap(t: Tensor) -> bool:
    """Some element is reached by two indices (expand, as_strided with stride 0): an in-place
    update of it is undefined, and torch's in-place ops refuse it too."""
    if t.numel() <= 1 or _is_dense(t):
        return False
    extent = _extent(t)
    return extent < t.numel() or torch.unique(
        torch.arange(extent, device="cpu").as_strided(t.shape, t.stride())).numel() < t.numel()


def _check_companion(index: int, name: str, param: Tensor, t, *, dtype: torch.dtype, as_state: bool,
                     where: Optional[tuple]) -> bool:
    """Checks a grad or state tensor against its param; returns whether the kernels can walk it
    as it is (same memory layout as the param), else it is updated through a dense copy."""
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
    if t.device != param.device or t.dtype != dtype or t.shape != param.shape:
        kind = "state tensor" if as_state else "gradient"
        state = "" if dtype == param.dtype else f" with {str(dtype).replace('torch.', '')} state"
        raise InvalidInputError(index, f"{label} ({kind}) is {_describe(t)} but the param is {_describe(param)}{state}")
    if as_state and _has_internal_overlap(t):
        raise InvalidInputError(index, f"{label} has overlapping elements (strides {t.stride()} for shape {tuple(t.shape)})")
    return _same_layout(param, t)


_PLAIN_TENSOR_TYPES = frozenset((Tensor, torch.nn.Parameter))
_PLAIN_TENSOR_TYPES_OR_NONE = _PLAIN_TENSOR_TYPES | {type(None)}


def first_irregular(params, grads, square_avgs=(), grad_avgs=(), momentum_buffers=(), state_steps=(),
                    square_avg_scales=(), grad_avg_scales=(), momentum_buffer_scales=(), state_dtype=None) -> int:
    """The index of the first param that needs the full checks of :func:`check_param`, or -1 when
    every param plainly passes them. Pass the lists the step will use, in the op's order (a
    :class:`Lists` unpacks into them: ``grad_avgs`` only when centered, ``momentum_buffers`` only
    with momentum, scales only for 8-bit state), None for state not created yet, and the
    requested ``state_dtype`` (None, a dtype or "8bit").

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
    companions = (grads, square_avgs, grad_avgs, momentum_buffers, state_steps, square_avg_scales, grad_avg_scales,
                  momentum_buffer_scales)
    if not all(_PLAIN_TENSOR_TYPES_OR_NONE.issuperset(map(type, tensors)) for tensors in companions):
        return 0
    return torch.ops.rmsprop_fused.first_irregular(params, *companions, *expected_state_dtype_arguments(state_dtype))


def expected_state_dtype_arguments(state_dtype) -> tuple:
    """A requested state dtype (None, a dtype or "8bit") as the C++ checks take it
    (csrc/rmsprop_op.h expected_state_dtype): (the dtype or None, the least numel quantized)."""
    if state_dtype == _quantization.EIGHT_BIT:
        return torch.uint8, _quantization.MIN_QUANTIZED_NUMEL
    return state_dtype, 0


def check_param(index: int, param, grad, square_avg=None, grad_avg=None, momentum_buffer=None, *,
                scales=(None, None, None), step=None, state_dtype=None, where: Optional[tuple] = None) -> bool:
    """Checks one param against its grad and whatever state it has (None: not created yet); the
    state must have the dtype ``state_dtype`` asks for (_quantization.expected_state_dtype), 8-bit
    state its scales. Raises InvalidInputError (a ValueError) or SparseGradientError (a
    RuntimeError, with torch's message), both carrying `index`. Messages name the tensors by list
    and index ("grads[3]"), or, given `where` = (group index, param index[, labels]), as the
    optimizer sees them ("param group 1, param 3: grad"). Returns True when the kernels can walk
    every tensor as it is, False when the param is a view with gaps or a grad or state tensor is
    laid out otherwise (the step then updates a dense copy). :func:`first_irregular` says which
    params need this."""
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
    if _has_internal_overlap(param):
        raise InvalidInputError(
            index, f"{name} has overlapping elements (strides {param.stride()} for shape {tuple(param.shape)}): "
            "an in-place update of it is undefined"
        )
    walkable = _is_dense(param)
    walkable &= _check_companion(index, "grads", param, grad, dtype=param.dtype, as_state=False, where=where)
    state_type = _quantization.expected_state_dtype(param, state_dtype)
    for state_name, scale_name, t, scale in zip(STATE_NAMES, SCALE_NAMES, (square_avg, grad_avg, momentum_buffer), scales):
        if t is None:
            continue
        same_layout = _check_companion(index, state_name, param, t, dtype=state_type, as_state=True, where=where)
        if t.dtype == torch.uint8:
            if not same_layout or not _is_dense(param):
                raise InvalidInputError(
                    index, f"{_label(index, state_name, where)} holds 8-bit codes laid out with strides {t.stride()}, "
                    f"not as its param ({param.stride()}): its 256-element blocks follow memory order and cannot be "
                    "moved (8-bit state is created laid out as its param)"
                )
            _check_scale(index, scale_name, t, scale, where)
        walkable &= same_layout
    if step is not None:
        label = _label(index, "state_steps", where)
        if not isinstance(step, Tensor) or step.dtype != torch.float32 or step.numel() != 1 or step.device != param.device:
            got = _describe(step) if isinstance(step, Tensor) else type(step).__name__
            raise InvalidInputError(index, f"{label} must be a one-element float32 tensor on {param.device}, got {got}")
        _check_writable(index, label, step)
    return walkable


def _check_scale(index, name, state, scale, where):
    label = _label(index, name, where)
    blocks = -(-state.numel() // _quantization.QUANT_BLOCK)
    if (not isinstance(scale, Tensor) or scale.dtype != torch.float32 or scale.shape != (blocks,)
            or scale.device != state.device or not scale.is_contiguous()):
        got = f"{_describe(scale)} with strides {scale.stride()}" if isinstance(scale, Tensor) else type(scale).__name__
        raise InvalidInputError(
            index, f"{label} must be a contiguous float32 tensor of shape ({blocks},) on {state.device} "
            f"(one scale per 256 elements of the 8-bit state), got {got}"
        )
    _check_writable(index, label, scale)


def overlapping_pair(tensors: Sequence[Tensor]) -> Optional[tuple]:
    """The positions of the first two tensors of the list that share memory, or None. In C++
    when the extension is loaded (csrc/rmsprop_op.cpp overlapping_pair); here otherwise."""
    if _extension.load_error is None and _PLAIN_TENSOR_TYPES.issuperset(map(type, tensors)):
        pair = torch.ops.rmsprop_fused.overlapping_pair(tensors)
        return tuple(pair) if pair else None
    spans = []
    for i, t in enumerate(tensors):
        if t.numel() == 0 or t.is_meta:
            continue
        begin = t.data_ptr()
        spans.append((begin, begin + _extent(t) * t.element_size(), i))
    spans.sort()
    open_spans: list = []
    for begin, end, i in spans:
        open_spans = [s for s in open_spans if s[1] > begin]
        for _, _, j in open_spans:
            a, b = tensors[j], tensors[i]
            if (_is_dense(a) and _is_dense(b)) or bool(torch.isin(_addresses(a), _addresses(b)).any()):
                return (min(i, j), max(i, j))
        open_spans.append((begin, end, i))
    return None


def _addresses(t: Tensor) -> Tensor:
    offsets = torch.arange(_extent(t), dtype=torch.int64).as_strided(t.shape, t.stride())
    return offsets * t.element_size() + t.data_ptr()


def check_no_overlap(lists: Lists, *, where=None) -> None:
    """Refuses two tensors of the step that share memory (a tensor listed twice, p.grad = p, a
    state tensor that is a view of a param, overlapping views), naming both: on a GPU two blocks
    would write the same bytes at once. `where(list name, index)` gives the optimizer's names.
    (Not while torch.compile traces: fake tensors have no addresses; the op checks the real ones.)"""
    if torch.compiler.is_compiling():
        return
    entries = [(name, i, t) for name, tensors in zip(LIST_NAMES, lists) for i, t in enumerate(tensors)
               if isinstance(t, Tensor) and t.layout == torch.strided]
    flat = [t for _, _, t in entries]
    if not _PLAIN_TENSOR_TYPES.issuperset(map(type, flat)):  # DTensor shards: their local tensors
        flat = [_local(t) for t in flat]
    pair = overlapping_pair(flat)
    if pair is None:
        return
    (name_a, a, _), (name_b, b, _) = entries[pair[0]], entries[pair[1]]
    label = (lambda n, i: _label(i, n, None)) if where is None else where
    raise InvalidInputError(
        a, f"{label(name_a, a)} and {label(name_b, b)} share memory: every tensor a step writes must have its "
        "own (the same tensor twice, a grad that is its param, or views of one tensor that overlap)"
    )


def _local(t):
    return t.to_local() if _DTensor is not None and isinstance(t, _DTensor) else t


_VARIANCE_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)
# complex -> its real dtype (torch.dtype.to_real, which Dynamo cannot trace).
_REAL_DTYPE = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def _check_variance_state_dtypes(square_avgs) -> None:
    """The variance is kept in float32, bfloat16 or 8-bit state (the kernels' variance form is
    instantiated for those alone; a complex state counts as its real dtype)."""
    for i, s in enumerate(square_avgs):
        dtype = _REAL_DTYPE.get(s.dtype, s.dtype) if isinstance(s, Tensor) else None
        if dtype is not None and dtype not in _VARIANCE_STATE_DTYPES:
            raise InvalidInputError(i, f"square_avgs[{i}] is {str(dtype).replace('torch.', '')}: variance_state keeps the "
                                       "variance in float32, bfloat16 or 8-bit state")


def _check_lists(lists: Lists, centered, momentum):
    n = len(lists.params)
    expected = {
        "grads": n, "square_avgs": n, "grad_avgs": n if centered else 0, "momentum_buffers": n if momentum > 0 else 0,
    }
    for name, want in expected.items():
        got = len(getattr(lists, name))
        if got != want:
            why = {"grad_avgs": f" (centered={centered})", "momentum_buffers": f" (momentum={momentum})"}.get(name, "")
            raise ValueError(f"got {got} {name} for {n} params{why}; expected {want}")
    if len(lists.state_steps) not in (0, n):
        raise ValueError(f"got {len(lists.state_steps)} state_steps for {n} params; expected none or {n}")
    for state_name, scale_name in zip(STATE_NAMES, SCALE_NAMES):
        states, scales = getattr(lists, state_name), getattr(lists, scale_name)
        if len(scales) not in (0, len(states)):
            raise ValueError(f"got {len(scales)} {scale_name} for {len(states)} {state_name}; expected none or {len(states)}")
    # check_param reads None as state not created yet (the optimizer creates it after the checks);
    # the functional form creates nothing, so it needs every state tensor.
    for name in STATE_NAMES + ("state_steps",):
        missing = next((i for i, t in enumerate(getattr(lists, name)) if t is None), None)
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
    state_steps: Sequence[Tensor] = (),
    square_avg_scales: Sequence[Tensor] = (),
    grad_avg_scales: Sequence[Tensor] = (),
    momentum_buffer_scales: Sequence[Tensor] = (),
    lr: Union[float, Tensor] = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    eps_in_sqrt: bool = False,
    lr_in_momentum: bool = False,
    decoupled_weight_decay: bool = False,
    nesterov: bool = False,
    bias_correction: bool = False,
    variance_state: bool = False,
    rounding_seed: Optional[int] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    clip_coef: Optional[Tensor] = None,
    differentiable: bool = False,
    backend: str = "auto",
) -> None:
    r"""Applies one RMSprop step in place to lists of tensors (docs/DESIGN.md section 1).

    ``grad_avgs`` is used when ``centered`` and ``momentum_buffers`` when ``momentum > 0``; pass
    empty lists otherwise (torch.optim.RMSprop's state has the same shape). State tensors may be
    the params' dtype, float32 or bfloat16 (for 16-bit or float32 params), or uint8 codes of 8-bit
    blockwise state with a float32 scale per 256 elements in the matching ``*_scales`` list.
    ``state_steps`` (float32 one-element counters) are incremented by the step, unless
    ``found_inf`` skips it; ``bias_correction`` and stochastic rounding (``rounding_seed``) need
    them. ``variance_state``: ``square_avgs`` hold ``square_avg - grad_avg**2`` (centered).

    ``lr`` may be a float or a 1-element tensor, read on the device when it lives on the params'
    device (no host sync). With ``grad_scale``, grads are divided by it inside the update and the
    unscaled grads are written back; ``clip_coef`` multiplies the grads (not written back); any
    nonzero ``found_inf`` leaves every tensor untouched. With ``differentiable``, autograd records
    the step (the reference backend computes it).

    Everything is validated before anything is written: a refused call changes nothing.
    """
    lists = Lists(list(params), list(grads), list(square_avgs), list(grad_avgs), list(momentum_buffers),
                  list(state_steps), list(square_avg_scales), list(grad_avg_scales), list(momentum_buffer_scales))
    check_hyperparameters(lr, alpha, eps, weight_decay, momentum, nesterov=nesterov, bias_correction=bias_correction)
    backends.check_name(backend)
    quantized = bool(lists.square_avg_scales)
    _check_lists(lists, centered, momentum)
    if (bias_correction or rounding_seed is not None) and lists.params and not lists.state_steps:
        raise ValueError("bias_correction and stochastic rounding read each param's step count: pass state_steps")
    if variance_state and not centered:
        raise ValueError("variance_state holds square_avg - grad_avg**2 and needs centered=True")
    if variance_state:
        _check_variance_state_dtypes(lists.square_avgs)
    if differentiable and (quantized or rounding_seed is not None or grad_scale is not None or found_inf is not None):
        raise ValueError("differentiable=True takes none of 8-bit state, stochastic rounding and AMP's grad_scale/found_inf")
    active = lists._replace(
        grad_avgs=lists.grad_avgs if centered else [], momentum_buffers=lists.momentum_buffers if momentum > 0 else [],
    )
    first = first_irregular(*active, state_dtype=_requested_state_dtype(active))
    copies = []
    if first >= 0:
        for i in range(first, len(lists.params)):
            states = [t[i] if t else None for t in (active.square_avgs, active.grad_avgs, active.momentum_buffers)]
            scales = [t[i] if t else None for t in (active.square_avg_scales, active.grad_avg_scales, active.momentum_buffer_scales)]
            if not check_param(i, lists.params[i], lists.grads[i], *states, scales=scales,
                               step=active.state_steps[i] if active.state_steps else None,
                               state_dtype=_requested_state_dtype(active, i)):
                copies.append(i)
    _check_scalar_tensor("grad_scale", grad_scale)
    _check_scalar_tensor("found_inf", found_inf)
    _check_scalar_tensor("clip_coef", clip_coef)
    apply_checked(
        active, dense_copies=copies, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
        centered=centered, maximize=maximize, eps_in_sqrt=eps_in_sqrt, lr_in_momentum=lr_in_momentum,
        decoupled_weight_decay=decoupled_weight_decay, nesterov=nesterov, bias_correction=bias_correction,
        variance_state=variance_state, rounding_seed=rounding_seed, grad_scale=grad_scale, found_inf=found_inf,
        clip_coef=clip_coef, differentiable=differentiable, backend=backend,
    )


def _requested_state_dtype(lists: Lists, index: Optional[int] = None):
    """The functional form takes state as it comes: a param's state dtype is what its square_avg
    holds, where that is one the kernels keep for the param's dtype (uint8: 8-bit codes, at any
    size), else the param's own, which the checks then ask of it. With `index` None: the dtype of
    every square_avg, or None when they differ (the full checks then look at each param)."""
    if not lists.square_avgs:
        return None
    if index is None:
        dtypes = {t.dtype for t in lists.square_avgs if isinstance(t, Tensor)}
        return dtypes.pop() if len(dtypes) == 1 else None
    state, param = lists.square_avgs[index], lists.params[index]
    if isinstance(state, Tensor) and isinstance(param, Tensor) and state.dtype in backends.OTHER_STATE_DTYPES.get(param.dtype, ()):
        return state.dtype
    return None


def apply_checked(lists: Lists, *, dense_copies=(), lr, alpha, eps, weight_decay, momentum, centered, maximize,
                  eps_in_sqrt, lr_in_momentum, decoupled_weight_decay, nesterov, bias_correction, variance_state,
                  rounding_seed, grad_scale, found_inf, clip_coef, differentiable=False, backend="auto",
                  overlap_checked=False, where=None) -> None:
    """The step for inputs that already passed the checks of :func:`rmsprop` (the optimizer checks
    them itself, before it creates state), with the options' lists empty where unused.
    `dense_copies`: the params that check_param found the kernels cannot walk as they are.
    Backends are resolved and the tensors checked for shared memory (unless `overlap_checked`)
    for every group before the first group is updated, so an unavailable backend or an overlap
    also changes nothing. (The op checks what reaches it again: it is an entry of its own.)"""
    plan = _plan(lists, differentiable, backend)
    if not overlap_checked:
        check_no_overlap(lists, where=where)
    writebacks = ()
    if dense_copies:
        lists, writebacks = _with_dense_copies(lists, dense_copies, write_grads=grad_scale is not None)
        plan = _plan(lists, differentiable, backend)
    for device, name, group_lists in plan:
        rounds = _stores_16_bit(group_lists.params[0].dtype, group_lists.square_avgs[0].dtype)
        seed = rounding_seed if rounding_seed is not None and rounds else None
        backends.implementation(name)(
            *group_lists,
            lr=_lr_for(lr, device),
            alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
            maximize=maximize, eps_in_sqrt=eps_in_sqrt, lr_in_momentum=lr_in_momentum,
            decoupled_weight_decay=decoupled_weight_decay, nesterov=nesterov, bias_correction=bias_correction,
            variance_state=variance_state, rounding_seed=seed,
            grad_scale=_on(grad_scale, device), found_inf=_on(found_inf, device), clip_coef=_on(clip_coef, device),
        )
    for original, copy in writebacks:
        original.copy_(copy)


def _plan(lists: Lists, differentiable: bool, backend: str) -> list:
    """[(device, backend name, group lists)] for the (device, dtype, state dtype) groups."""
    groups = _one_group(lists)
    if groups is None:
        groups = _groups(lists)
    plan = []
    for (device, dtype, state_dtype), group_lists in groups.items():
        name = "reference" if differentiable else backends.select(backend, device, dtype, state_dtype)
        plan.append((device, name, group_lists))
    return plan


def _stores_16_bit(param_dtype: torch.dtype, state_dtype) -> bool:
    """Whether a group of these params and state stores any float16 or bfloat16 value (stochastic
    rounding has work); `state_dtype` may also be an optimizer's None or "8bit"."""
    return param_dtype in (torch.float16, torch.bfloat16) or state_dtype == torch.bfloat16


def _one_group(lists: Lists) -> Optional[dict]:
    """The usual case: real params of plain types, all of one device and dtype and state dtype,
    are one group, and the lists go to the backend as they are (no per-tensor list building).
    None otherwise."""
    params = lists.params
    if not params or torch.compiler.is_compiling() or not _PLAIN_TENSOR_TYPES.issuperset(map(type, params)):
        return None  # (Dynamo traces the per-tensor grouping of any torch; sets of types, not before 2.6)
    kinds = {(p.device, p.dtype) for p in params}
    state_dtypes = {t.dtype for t in lists.square_avgs}
    if len(kinds) != 1 or len(state_dtypes) != 1:
        return None
    ((device, dtype),), (state_dtype,) = kinds, state_dtypes
    if dtype.is_complex:
        return None
    if state_dtype != torch.uint8 and lists.square_avg_scales:
        lists = lists._replace(square_avg_scales=[], grad_avg_scales=[], momentum_buffer_scales=[])
    return {(device, dtype, state_dtype): lists}


def _groups(lists: Lists) -> dict:
    """{(device, dtype, state dtype): Lists}, complex tensors as view_as_real pairs and DTensors
    as their local shards."""
    groups: dict = {}
    present = [name for name, tensors in zip(LIST_NAMES, lists) if tensors]
    for i, param in enumerate(lists.params):
        tensors = {name: getattr(lists, name)[i] for name in present}
        if _DTensor is not None and isinstance(param, _DTensor):
            tensors = {name: _local_shard(i, name, t, param) for name, t in tensors.items()}
        if tensors["params"].is_complex():
            tensors = {name: torch.view_as_real(t) if t.is_complex() else t for name, t in tensors.items()}
        p = tensors["params"]
        key = (p.device, p.dtype, tensors["square_avgs"].dtype)
        if key[2] != torch.uint8:  # scales belong to 8-bit state only (an 8-bit group's small tensors have none)
            tensors = {name: t for name, t in tensors.items() if name not in SCALE_NAMES}
        group = groups.setdefault(key, Lists(*([] for _ in LIST_NAMES)))
        for name, t in tensors.items():
            getattr(group, name).append(t)
    return groups


def _local_shard(index: int, name: str, t, reference):
    """A DTensor's local shard; DTensors must all share the param's mesh and placements, since the
    update is elementwise and runs on each rank's shard. (A step counter is a plain tensor.)"""
    if name == "state_steps" and not isinstance(t, _DTensor):
        return t
    if not (isinstance(t, _DTensor) and isinstance(reference, _DTensor)):
        raise InvalidInputError(index, f"{name}[{index}] and params[{index}] must both be DTensors or both plain tensors")
    if t.device_mesh != reference.device_mesh or t.placements != reference.placements:
        raise InvalidInputError(
            index, f"{name}[{index}] is placed {t.placements} but params[{index}] is placed "
            f"{reference.placements}; the elementwise update needs identical sharding"
        )
    return t.to_local()


def _with_dense_copies(lists: Lists, indices, *, write_grads: bool):
    """The lists with the tensors of the given params that the kernels cannot walk replaced by
    dense copies laid out as the param's state is (torch.empty_like's preserve_format: the param's
    own strides when it is dense, contiguous or channels_last when it has gaps), and the
    (original, copy) pairs to write back after the step: every copy of a param or state tensor,
    and of a grad when AMP writes the unscaled grad back."""
    lists = Lists(*(list(tensors) for tensors in lists))
    writebacks = []
    for i in indices:
        param = lists.params[i]
        walk = param if _is_dense(param) else torch.empty_like(param).copy_(param)
        if walk is not param:
            lists.params[i] = walk
            writebacks.append((param, walk))
        for name in ("grads",) + STATE_NAMES:
            tensors = getattr(lists, name)
            if not tensors or _same_layout(walk, tensors[i]):
                continue
            original = tensors[i]
            tensors[i] = torch.empty_like(walk, dtype=original.dtype).copy_(original)
            if name != "grads" or write_grads:
                writebacks.append((original, tensors[i]))
    return lists, writebacks


def _lr_for(lr, device: torch.device):
    """A tensor lr is read on the device when it lives there (capturable, no sync); a tensor
    elsewhere is read once on the host, as torch.optim does."""
    if isinstance(lr, Tensor):
        return lr if lr.device == device or lr.requires_grad else lr.item()
    return float(lr)


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)
