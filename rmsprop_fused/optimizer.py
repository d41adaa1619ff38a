"""FusedRMSprop: torch.optim.RMSprop's interface, state and numbers, one fused pass per step."""

from __future__ import annotations

import collections
import operator
from typing import Any, Dict, List, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _extension, backends, clipping
from . import _quantization as quantization
from .errors import BackendUnavailableError
from .functional import (
    _PLAIN_TENSOR_TYPES, _REAL_DTYPE, OPTIMIZER_LABELS, SCALE_NAMES, STATE_NAMES, Lists, _on, _stores_16_bit, apply_checked,
    _groups, check_hyperparameters, check_no_overlap, check_param, expected_state_dtype_arguments, first_irregular,
)

__all__ = ["FusedRMSprop"]

# With variance state the second moment is kept as the variance, under its own key
# (csrc/rmsprop_update.h, the variance form).
_VARIANCE_KEY = "grad_var"
_SCALE_SUFFIX = "_scale"
_STATE_DTYPES = (None, torch.float32, torch.bfloat16, quantization.EIGHT_BIT)
_NO_STATE: dict = {}
_OUR_DEFAULTS = {
    "eps_in_sqrt": False, "initial_scale": 0.0, "lr_in_momentum": False, "decoupled_weight_decay": False,
    "nesterov": False, "bias_correction": False, "state_dtype": None, "stochastic_rounding": False,
    "rounding_seed": 0, "backend": "auto",
}


class _Changes:
    """A counter of the changes to an optimizer's state, shared by its containers."""

    __slots__ = ("count",)

    def __init__(self):
        self.count = 0


class _ParamState(dict):
    """A param's state dict, counting its changes (a state tensor added, replaced or removed) in
    the optimizer's counter. Changes inside a tensor need no count: the kernels read it as it is,
    and the op checks its metadata at every step."""

    __slots__ = ("_changes",)

    def __init__(self, changes: _Changes, items=()):
        super().__init__(items)
        self._changes = changes

    def __reduce__(self):  # pickled as the plain dict it is to torch.optim
        return (dict, (dict(self),))

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changes.count += 1

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changes.count += 1

    def pop(self, *args):
        self._changes.count += 1
        return super().pop(*args)

    def popitem(self):
        self._changes.count += 1
        return super().popitem()

    def clear(self):
        self._changes.count += 1
        super().clear()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changes.count += 1

    def setdefault(self, key, default=None):
        self._changes.count += 1
        return super().setdefault(key, default)

    def __ior__(self, other):  # dict's own |= would bypass update
        self.update(other)
        return self


class _StateByParam(collections.defaultdict):
    """optimizer.state: torch's defaultdict(dict) of each param's state dict, counting every change
    to it or to the dicts it holds (_ParamState), so that the fast step reuses the lists it built
    (and converted) while nothing changed. Any dict put in is held as a _ParamState."""

    def __init__(self, items=()):
        super().__init__(None)
        self.changes = _Changes()
        self.update(items)

    @property
    def version(self) -> int:
        return self.changes.count

    def __missing__(self, key):
        self[key] = _ParamState(self.changes)
        return super().__getitem__(key)

    def __reduce__(self):  # pickled as torch.optim's defaultdict(dict), of plain dicts
        return (_plain_state, (dict(self),))

    def __setitem__(self, key, value):
        if not isinstance(value, _ParamState) or value._changes is not self.changes:
            value = _ParamState(self.changes, value)
        super().__setitem__(key, value)
        self.changes.count += 1

    def __delitem__(self, key):
        super().__delitem__(key)
        self.changes.count += 1

    def pop(self, *args):
        self.changes.count += 1
        return super().pop(*args)

    def popitem(self):
        self.changes.count += 1
        return super().popitem()

    def clear(self):
        self.changes.count += 1
        super().clear()

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]

    def __ior__(self, other):
        self.update(other)
        return self


def _plain_state(items: dict) -> collections.defaultdict:
    return collections.defaultdict(dict, {k: dict(v) for k, v in items.items()})


class _FastPart(NamedTuple):
    """One call of a group's fast step: its params (in the group's order), their state dtype, and
    the converted lists (rmsprop_fused._C.StepLists). A group has a part per (device, param dtype,
    state dtype), split by the full path's own functional._groups, so that each tensor has the
    same index in its call, and rounds alike: usually one, two in an 8-bit group with tensors
    under MIN_QUANTIZED_NUMEL, which keep float32 state."""

    params: list
    state_dtype: torch.dtype
    handle: Any


class _FastLists(NamedTuple):
    """What the fast step keeps of a group between steps: the params, state_dtype, state version
    and keys it was built for, and its parts."""

    params: list
    state_dtype: Any
    version: int
    keys: dict
    parts: tuple


class _FastCall(NamedTuple):
    """One call of the fast step (a group's part): its converted lists, this step's grads, the
    scalars of the op's schema up to the lr tensor, and the device the AMP and clipping tensors
    go to."""

    handle: Any
    grads: list
    scalars: tuple
    device: torch.device

    def scalars_after_grads(self, grad_scale, found_inf, clip_coef) -> tuple:
        """StepLists.step's positional arguments after the grads (step_all's scalars of a call)."""
        return (*self.scalars, _on(grad_scale, self.device), _on(found_inf, self.device), _on(clip_coef, self.device))


class _Clip(NamedTuple):
    """A step's clipping: the total norm of its grads and the coefficient they are scaled by."""

    norm: Tensor
    coefficient: Tensor


class _Gathered(NamedTuple):
    """What a step updates in one param group: the params that have a grad and the lists of the
    step (functional.Lists, None where state is not created yet), the indices of the params that
    take a dense copy, and the group's state keys."""

    lists: Lists
    dense_copies: list
    keys: dict

    def lacks_state(self) -> bool:
        """Whether a state tensor, step counter or 8-bit scale is not created yet (in an 8-bit
        group, tensors under MIN_QUANTIZED_NUMEL keep float32 state, which has no scales)."""
        l = self.lists
        if any(t is None for tensors in (l.square_avgs, l.grad_avgs, l.momentum_buffers, l.state_steps) for t in tensors):
            return True
        return any(scale is None and state.dtype == torch.uint8
                   for states, scales in ((l.square_avgs, l.square_avg_scales), (l.grad_avgs, l.grad_avg_scales),
                                          (l.momentum_buffers, l.momentum_buffer_scales))
                   for state, scale in zip(states, scales))


def _same_state_dtype(a, b) -> bool:
    """Whether two state_dtype options are the same (None, a dtype or "8bit": `==` alone would
    compare a dtype with a string)."""
    return a is b or (type(a) is type(b) and a == b)


def _uses_variance_state(group: dict) -> bool:
    return bool(group["centered"]) and group["state_dtype"] in (torch.bfloat16, quantization.EIGHT_BIT)


def _state_keys(group: dict) -> Dict[str, str]:
    """{list name: state key} for the lists the group's options use."""
    keys = {"square_avgs": _VARIANCE_KEY if _uses_variance_state(group) else "square_avg"}
    if group["centered"]:
        keys["grad_avgs"] = "grad_avg"
    if group["momentum"] > 0:
        keys["momentum_buffers"] = "momentum_buffer"
    return keys


class FusedRMSprop(Optimizer):
    r"""RMSprop whose step is one fused pass over all parameters of a (device, dtype) group.

    A drop-in replacement for :class:`torch.optim.RMSprop`: the same arguments, defaults,
    validation, state keys (``step``, ``square_avg``, ``momentum_buffer``, ``grad_avg``) and
    numbers, so state_dicts move between the two both ways. Per element, with ``g`` the gradient
    (docs/DESIGN.md section 1 gives every option's place):

    .. code-block:: text

        g = g * clip_coef (max_grad_norm);  g = -g if maximize
        g = g + weight_decay * p            (or p = p * (1 - lr * weight_decay), decoupled)
        v = alpha * v + (1 - alpha) * g * g
        if centered:  m = lerp(m, g, 1 - alpha)
        v, m = v / (1 - alpha**step), m / (1 - alpha**step)     (bias_correction)
        var = v - m * m if centered else v
        denom = sqrt(var) + eps              (eps_in_sqrt=False, torch)
              = sqrt(var + eps)              (eps_in_sqrt=True: d2l, TF1, Keras, optax, timm)
        if momentum > 0:
            u = g / denom                    (lr * g / denom with lr_in_momentum)
            b = momentum * b + u
            d = u + momentum * b if nesterov else b
            p = p - lr * d                   (p - d with lr_in_momentum)
        else:
            p = p - lr * g / denom

    fp16 and bf16 params are computed in float32 and rounded once (no NaN for a zero gradient,
    unlike torch.optim.RMSprop on fp16), float64 in float64.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or Tensor): learning rate (default: 1e-2).
        alpha (float): smoothing constant of the square average (default: 0.99).
        eps (float): added to the denominator for numerical stability (default: 1e-8).
        weight_decay (float): weight decay, an L2 penalty added to the gradient (default: 0).
        momentum (float): momentum factor (default: 0).
        centered (bool): divide by an estimate of the gradient's variance (default: False).
        capturable (bool): the step may be captured in a CUDA graph (default: False); a tensor
            lr must then live on the params' device, where every replay reads it. The step never
            synchronises with the host either way.
        foreach (bool, optional): accepted for compatibility with torch.optim.RMSprop and
            ignored: the step is always one fused pass (default: None).
        maximize (bool): maximize the objective instead of minimizing it (default: False).
        differentiable (bool): autograd records the step, as torch's differentiable RMSprop
            does (for meta-learning, learned learning rates): it runs the reference backend, on
            params that are not leaves requiring grad (default: False).
        eps_in_sqrt (bool): eps inside the square root, as d2l, TF1, Keras, optax and timm's
            RMSpropTF do (default: False, torch's eps outside the root).
        initial_scale (float): the value square_avg starts at: 0 for torch/Keras/d2l, 1 for
            TF1 and timm's RMSpropTF (default: 0).
        lr_in_momentum (bool): accumulate lr * g / denom in the momentum buffer and subtract the
            buffer, as TF, Keras and timm do (default: False, torch's lr applied to the buffer).
        decoupled_weight_decay (bool): decay the params, p = p * (1 - lr * weight_decay), before
            the update instead of adding weight_decay * p to the gradient (torch.optim.Adam's
            name; timm RMSpropTF(decoupled_decay=True), Keras 3's weight_decay) (default: False).
        nesterov (bool): Nesterov momentum, as optax's rmsprop(nesterov=True) and torch's SGD;
            needs momentum > 0 (default: False).
        bias_correction (bool): divide both averages by 1 - alpha**step, as optax's
            rmsprop(bias_correction=True); needs alpha < 1 (default: False).
        state_dtype: how the state is kept: None (the param's dtype), torch.float32 (for 16-bit
            params), torch.bfloat16, or "8bit" (blockwise 8-bit codes with a float32 scale per
            256 elements; tensors under 4,096 elements keep float32). With centered=True,
            bfloat16 and 8-bit state keep the variance, ``state['grad_var']``, in place of
            ``square_avg`` (default: None). :meth:`full_precision_state_dict` gives torch's.
        stochastic_rounding (bool): round the bfloat16 state and the 16-bit params
            stochastically, from a random stream given by ``rounding_seed``, each param's
            position and its step count: reproducible, and resumed exactly from a checkpoint
            (default: False).
        rounding_seed (int): the stream's seed, kept in the param groups (default: 0; the same
            on every rank, so that DDP replicas round alike).
        max_grad_norm (float, optional): clip the gradients of all param groups together to this
            total norm, as torch.nn.utils.clip_grad_norm_ does, inside the step (default: None).
        norm_type (float): the norm of the clipping: 2.0, inf or any p > 0 (default: 2.0).
        error_if_nonfinite (bool): raise when the total norm is NaN or inf, before anything
            changes; reading the norm costs a host sync (default: False).
        backend (str): ``"auto"`` (the fastest available per (device, dtype) group),
            ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (default: ``"auto"``).

    With ``torch.amp.GradScaler``, :meth:`step` receives the scale and the inf flag and unscales
    the gradients inside the fused update; any nonzero flag leaves params, state and step untouched.
    After a step with ``max_grad_norm``, :attr:`grad_norm` holds the total norm of the (unscaled,
    unclipped) gradients as a device tensor, for logging.
    """

    # GradScaler.step then sets self.grad_scale and self.found_inf instead of unscaling the grads
    # in a separate pass and synchronising to check for infs.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: Union[float, Tensor] = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        eps_in_sqrt: bool = False,
        initial_scale: float = 0.0,
        lr_in_momentum: bool = False,
        decoupled_weight_decay: bool = False,
        nesterov: bool = False,
        bias_correction: bool = False,
        state_dtype: Union[None, torch.dtype, str] = None,
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        max_grad_norm: Optional[float] = None,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        backend: str = "auto",
    ) -> None:
        check_hyperparameters(lr, alpha, eps, weight_decay, momentum, initial_scale=initial_scale,
                              nesterov=nesterov, bias_correction=bias_correction, check_tensor_lr=True)
        backends.check_name(backend)
        clipping.check_clip_options(max_grad_norm, norm_type)
        if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int):
            raise TypeError(f"rounding_seed must be an int, got {type(rounding_seed).__name__}")
        defaults = dict(
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
            centered=centered, capturable=capturable, foreach=foreach, maximize=maximize,
            differentiable=differentiable, eps_in_sqrt=eps_in_sqrt, initial_scale=initial_scale,
            lr_in_momentum=lr_in_momentum, decoupled_weight_decay=decoupled_weight_decay,
            nesterov=nesterov, bias_correction=bias_correction, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding, rounding_seed=int(rounding_seed), backend=backend,
        )
        # Clipping spans all groups, so its options are the optimizer's, not a group's.
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.norm_type = float(norm_type)
        self.error_if_nonfinite = bool(error_if_nonfinite)
        self.grad_norm: Optional[Tensor] = None
        self._fast_cache: Dict[int, _FastLists] = {}
        super().__init__(params, defaults)  # each group is checked by add_param_group

    @property
    def state(self) -> "_StateByParam":
        """torch's optimizer.state (a defaultdict of each param's state dict), held as a
        _StateByParam whatever is assigned to it, so that the fast step sees every change."""
        return self._state

    @state.setter
    def state(self, value) -> None:
        self._state = value if isinstance(value, _StateByParam) else _StateByParam(value)
        self._fast_cache = {}

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then the constructor's checks: the group's hyperparameters,
        that its state_dtype suits its params and, for an explicit backend, that it can update
        every param (now, not at the first step). A refused group is not added."""
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        group = self.param_groups[group_index]
        try:
            self._check_group(group, check_tensor_lr=True)
            for index, p in enumerate(group["params"]):
                _check_state_dtype_suits(group, group_index, index, p)
            _check_something_to_round(group, group_index)
            _check_backend_runs(group, group_index, group["params"])
        except Exception:
            del self.param_groups[group_index]
            raise

    def __getstate__(self) -> dict:
        # torch's keeps defaults, state and param_groups; clipping's options are the optimizer's
        return dict(super().__getstate__(), max_grad_norm=self.max_grad_norm, norm_type=self.norm_type,
                    error_if_nonfinite=self.error_if_nonfinite)

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        param_state = state.pop("state", None)  # through the property, not into __dict__
        super().__setstate__(state)
        self.state = {} if param_state is None else param_state
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("norm_type", 2.0)
        self.__dict__.setdefault("error_if_nonfinite", False)
        self.__dict__.setdefault("grad_norm", None)
        for group in self.param_groups:
            group.setdefault("momentum", 0)
            group.setdefault("centered", False)
            group.setdefault("maximize", False)
            group.setdefault("capturable", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            for key, value in _OUR_DEFAULTS.items():
                group.setdefault(key, value)

    # ------------------------------------------------------------------ validation

    @staticmethod
    def _check_group(group: dict, *, check_tensor_lr: bool = False) -> None:
        check_hyperparameters(
            group["lr"], group["alpha"], group["eps"], group["weight_decay"], group["momentum"],
            initial_scale=group["initial_scale"], nesterov=group["nesterov"],
            bias_correction=group["bias_correction"], check_tensor_lr=check_tensor_lr,
        )
        backends.check_name(group["backend"])
        state_dtype = group["state_dtype"]
        if not any(state_dtype is d or state_dtype == d for d in _STATE_DTYPES):
            raise ValueError(
                f"Invalid state_dtype: {state_dtype!r} (expected None, torch.float32, torch.bfloat16 or '8bit')"
            )
        if group["differentiable"]:
            if group["backend"] not in ("auto", "reference"):
                raise ValueError(
                    f"differentiable=True runs the reference backend (the kernels are not recorded by autograd), "
                    f"not backend={group['backend']!r}"
                )
            if state_dtype is not None or group["stochastic_rounding"]:
                raise ValueError("differentiable=True keeps the state in the params' dtype: it takes no state_dtype "
                                 "and no stochastic_rounding")

    def _gather(self, group_index: int, group: dict) -> _Gathered:
        """The params of a group that have a grad, with their grads and the lists the step uses
        (None where state is not created yet), all checked. Creates nothing: a refused step must
        leave the optimizer as it was."""
        self._check_group(group)
        lr = group["lr"]
        if isinstance(lr, Tensor) and _capturing_cuda_graph():
            for p in group["params"]:
                if p.device != lr.device:
                    raise ValueError(
                        f"param group {group_index}: a CUDA graph is being captured, but lr is a tensor "
                        f"on {lr.device} and a param is on {p.device}: the graph would replay the lr of "
                        "capture time forever; put the lr tensor on the params' device"
                    )
        members, grads = [], []
        for p in group["params"]:
            grad = p.grad
            if grad is not None:
                members.append(p)
                grads.append(grad)
        keys = _state_keys(group)
        lists = self._lists(group, members, grads, keys)
        first = first_irregular(*lists, state_dtype=group["state_dtype"])
        dense_copies = []
        if first >= 0:
            indices = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            labels = _labels(keys)
            for k in range(first, len(members)):
                states = [tensors[k] if tensors else None for tensors in (lists.square_avgs, lists.grad_avgs, lists.momentum_buffers)]
                scales = [tensors[k] if tensors else None for tensors in (lists.square_avg_scales, lists.grad_avg_scales, lists.momentum_buffer_scales)]
                _check_state_dtype_suits(group, group_index, indices[k], members[k])
                if not check_param(indices[k], members[k], grads[k], *states, scales=scales, step=lists.state_steps[k],
                                   state_dtype=group["state_dtype"], where=(group_index, indices[k], labels)):
                    dense_copies.append(k)
        return _Gathered(lists, dense_copies, keys)

    # ------------------------------------------------------------------ state

    def _lists(self, group: dict, members: list, grads: list, keys: Dict[str, str]) -> Lists:
        """The step's lists for these members: their state tensors by the group's keys (None
        where absent), 8-bit scales where the state is 8-bit, empty lists for unused options."""
        states = [self.state.get(p, _NO_STATE) for p in members]
        eight_bit = group["state_dtype"] == quantization.EIGHT_BIT
        by_name = {}
        for name in STATE_NAMES:
            key = keys.get(name)
            by_name[name] = [s.get(key) for s in states] if key else []
            scale_name = SCALE_NAMES[STATE_NAMES.index(name)]
            by_name[scale_name] = [s.get(key + _SCALE_SUFFIX) for s in states] if key and eight_bit else []
        return Lists(members, grads, by_name["square_avgs"], by_name["grad_avgs"], by_name["momentum_buffers"],
                     [s.get("step") for s in states], by_name["square_avg_scales"], by_name["grad_avg_scales"],
                     by_name["momentum_buffer_scales"])

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        """The state of a param that has a grad, created lazily: torch's keys (with variance
        state, grad_var for square_avg), in the group's state_dtype; keys that the group's options
        need and the state lacks (momentum switched on later, say) are added too."""
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for name, key in _state_keys(group).items():
            if key in state:
                continue
            initial = group["initial_scale"] if name == "square_avgs" else 0.0
            _store_state(state, key, torch.full_like(_real(p), initial, dtype=_opmath(p)), p, group)

    # ------------------------------------------------------------------ step

    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): a closure that reevaluates the model and returns the loss.
        """
        _graph_capture_health_check(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        differentiable = any(group["differentiable"] for group in self.param_groups)
        with torch.set_grad_enabled(differentiable):
            self._step()
        return loss

    def _step(self) -> None:
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        if self._fast_step(grad_scale, found_inf):
            return

        # Check every group, the backends, shared memory, and the norm when it must be finite,
        # before touching anything: a refused step changes nothing and creates no state.
        gathered = [self._gather(i, group) for i, group in enumerate(self.param_groups)]
        for group_index, (group, members) in enumerate(zip(self.param_groups, gathered)):
            _check_backend_runs(group, group_index, members.lists.params)
        lists, where = _across_groups(self.param_groups, gathered)
        check_no_overlap(lists, where=where)
        clip = self._clip([g for members in gathered for g in members.lists.grads], grad_scale)
        if clip is not None and self._refuses_norm(clip.norm, found_inf):
            raise RuntimeError(clipping.NONFINITE_NORM_MESSAGE.format(norm_type=self.norm_type))
        clip_coef = None if clip is None else clip.coefficient
        for index, (group, members) in enumerate(zip(self.param_groups, gathered)):
            if members.lacks_state():
                for p in members.lists.params:
                    self._init_state(p, self.state[p], group)
                lists = self._lists(group, members.lists.params, members.lists.grads, members.keys)
                gathered[index] = members._replace(lists=lists)

        for group_index, (group, members) in enumerate(zip(self.param_groups, gathered)):
            if not members.lists.params:
                continue
            apply_checked(
                members.lists, dense_copies=members.dense_copies,
                lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                weight_decay=group["weight_decay"], momentum=group["momentum"],
                centered=group["centered"], maximize=group["maximize"],
                eps_in_sqrt=group["eps_in_sqrt"], lr_in_momentum=group["lr_in_momentum"],
                decoupled_weight_decay=group["decoupled_weight_decay"], nesterov=group["nesterov"],
                bias_correction=group["bias_correction"], variance_state=_uses_variance_state(group),
                rounding_seed=_group_seed(group, group_index) if group["stochastic_rounding"] else None,
                grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
                differentiable=group["differentiable"], backend=group["backend"], overlap_checked=True,
            )
        if clip is not None:
            self.grad_norm = clip.norm

    def _fast_step(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> bool:
        """The common step in one call of the op per group's part (usually one a group, two for
        an 8-bit group with small tensors), with no per-param Python checks: groups of plain tensors that all have
        grads and state, in the dtypes their state_dtype asks for, and a compiled backend. The
        op checks everything itself before it writes (a refusal is a ValueError,
        and changes nothing), and one call is atomic, so when it refuses, the full path runs and
        words the error, or takes what the op cannot (a view with gaps). Several calls go to
        step_all, which checks every call (the op's own checks) and all their tensors for shared
        memory before any writes, so that a refusal still comes before any write. False
        when this step is not such a step, or was refused. What it reads per param is a grad and
        the state tensors (from the params' state dicts, found again only when the optimizer's
        state, a group's params or its state_dtype changed): about 0.1 us each."""
        if _extension.load_error is not None or torch.compiler.is_compiling():
            return False  # (no extension: the full path takes the reference, or names why not)
        calls, grads = [], []  # (the grads in the groups' order: the norm's sum runs in the full path's)
        for index, group in enumerate(self.param_groups):
            found = self._fast_calls(index, group)
            if found is None:
                return False
            grads += found[0]
            calls += found[1]
        clip = self._clip(grads, grad_scale)
        if clip is not None and self._refuses_norm(clip.norm, found_inf):
            return False  # (the full path checks the step first, as torch would, then refuses the norm)
        clip_coef = None if clip is None else clip.coefficient
        scalars = [call.scalars_after_grads(grad_scale, found_inf, clip_coef) for call in calls]
        try:
            if len(calls) == 1:
                calls[0].handle.step(calls[0].grads, *scalars[0])
            else:  # every call checked, and their tensors for shared memory, before any writes
                _extension._module.step_all([call.handle for call in calls], [call.grads for call in calls], scalars)
        except (ValueError, NotImplementedError):
            # refused before any write (by the checks, or by the dispatcher: no kernel for a
            # sparse grad's backend): the full path words it, or copes
            return False
        if clip is not None:
            self.grad_norm = clip.norm
        return True

    def _fast_calls(self, index: int, group: dict) -> Optional[tuple]:
        """A group's grads and its calls of the fast step (one per part), or None when the group
        needs the full path."""
        params = group["params"]
        if group["differentiable"] or group["backend"] not in ("auto", "cpu", "cuda"):
            return None
        grads = [p.grad for p in params]
        if any(g is None for g in grads):  # a param without a grad this step: the full path
            return None  # (not `None in grads`: that compares tensors with ==, 40 us each)
        try:
            self._check_group(group)
        except (ValueError, TypeError):
            return None  # the full path refuses it, in its own order
        lists = self._fast_lists(index, group, grads)
        if lists is None:
            return None
        lr = group["lr"]
        lr_tensor = lr if isinstance(lr, Tensor) else None
        calls = []
        for part in lists.parts:
            first = part.params[0]
            try:
                name = backends.select(group["backend"], first.device, first.dtype, part.state_dtype)
            except BackendUnavailableError:
                return None  # the full path names the param
            if name not in ("cpu", "cuda") or (lr_tensor is not None and lr_tensor.device != first.device):
                return None  # (a tensor lr elsewhere is read on the host, which a CUDA graph capture refuses)
            rounds = group["stochastic_rounding"] and _stores_16_bit(first.dtype, part.state_dtype)
            scalars = (
                0.0 if lr_tensor is not None else float(lr), group["alpha"], group["eps"],
                group["weight_decay"], group["momentum"], group["centered"], group["maximize"],
                group["eps_in_sqrt"], group["lr_in_momentum"], group["decoupled_weight_decay"],
                group["nesterov"], group["bias_correction"], _uses_variance_state(group),
                _group_seed(group, index) if rounds else None, lr_tensor,
            )
            part_grads = grads if len(lists.parts) == 1 else [p.grad for p in part.params]
            calls.append(_FastCall(part.handle, part_grads, scalars, first.device))
        return grads, calls

    def _fast_lists(self, index: int, group: dict, grads: list) -> Optional["_FastLists"]:
        """The parts of group `index`'s fast step, when all its params are plain real tensors with
        the state its options use, in the dtypes its state_dtype asks for (first_irregular: the
        full path's own test, with this step's grads; StepLists checks the dtypes again at every
        call); built again only when the optimizer's state (its version counter), the group's
        params or its state_dtype changed."""
        params = group["params"]
        keys = _state_keys(group)
        state_dtype = group["state_dtype"]
        cached = self._fast_cache.get(index)
        version = self.state.version
        if (cached is not None and cached.version == version and cached.keys == keys
                and _same_state_dtype(cached.state_dtype, state_dtype)
                and len(cached.params) == len(params) and all(map(operator.is_, cached.params, params))):
            return cached
        self._fast_cache.pop(index, None)
        if not params or not _PLAIN_TENSOR_TYPES.issuperset(map(type, params)) or any(p.is_complex() for p in params):
            return None
        states = [self.state.get(p) for p in params]
        eight_bit = state_dtype == quantization.EIGHT_BIT
        try:
            tensors = {name: [state[key] for state in states] for name, key in keys.items()}
            steps = [state["step"] for state in states]
            scales = {name: [state[key + _SCALE_SUFFIX] if state[key].dtype == torch.uint8 else None for state in states]
                      for name, key in keys.items()} if eight_bit else {}
        except (KeyError, TypeError, AttributeError):  # no state yet, or state an option needs (momentum switched on)
            return None
        lists = Lists(params, grads, tensors["square_avgs"], tensors.get("grad_avgs", []),
                      tensors.get("momentum_buffers", []), steps, *(scales.get(name, []) for name in STATE_NAMES))
        if first_irregular(*lists, state_dtype=state_dtype) >= 0:
            return None  # the full path checks it, and takes it or words why not
        parts = []
        requested, min_quantized_numel = expected_state_dtype_arguments(state_dtype)
        for (_, _, part_dtype), part in _groups(lists).items():  # (the full path's own split)
            handle = _extension.step_lists(part.params, *part[2:], requested_state_dtype=requested,
                                           min_quantized_numel=min_quantized_numel)
            parts.append(_FastPart(part.params, part_dtype, handle))
        self._fast_cache[index] = _FastLists(list(params), state_dtype, version, dict(keys), tuple(parts))
        return self._fast_cache[index]

    def _clip(self, grads: List[Tensor], grad_scale) -> Optional["_Clip"]:
        """The total (pre-clip) norm of these grads, all of the step's, and their clip
        coefficient; None without clipping. The step keeps the norm in grad_norm once it is done."""
        if self.max_grad_norm is None or not grads:
            return None
        total = clipping.grad_norm(grads, self.norm_type, grad_scale)
        return _Clip(total, clipping.clip_coefficient(total, self.max_grad_norm))

    def _refuses_norm(self, norm: Tensor, found_inf) -> bool:
        """Whether error_if_nonfinite refuses the step for this norm (a host sync; not when AMP's
        found_inf skips the step anyway)."""
        return (self.error_if_nonfinite and not bool(torch.isfinite(norm))
                and (found_inf is None or not bool(found_inf != 0)))

    # ------------------------------------------------------------------ state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, after checking that the state is an RMSprop state for these
        params (so that an Adam state_dict or one with wrong shapes is refused, changing nothing).
        The state is then kept as this optimizer's groups keep it: a torch.optim.RMSprop state (or
        any other state_dtype's) is converted, 8-bit state quantized; state saved in the same form
        is taken bit for bit. `step` is kept on its param's device. The load hooks run where
        torch runs them: the pre-hooks on what is passed (what they return is what is checked and
        loaded), the post-hooks once the state is loaded and converted."""
        state_dict = state_dict.copy()  # shallow, as torch's
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        _check_loaded_state(self, state_dict)
        saved = {pid: dict(s) for pid, s in state_dict["state"].items()}
        # Options a torch.optim.RMSprop state_dict does not have keep this optimizer's values.
        ours = [{key: group[key] for key in _OUR_DEFAULTS if key not in saved_group}
                for group, saved_group in zip(self.param_groups, state_dict["param_groups"])]
        hooks = (self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks)
        self._optimizer_load_state_dict_pre_hooks = collections.OrderedDict()
        self._optimizer_load_state_dict_post_hooks = collections.OrderedDict()
        try:  # torch's load, without running the hooks a second time or too early
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = hooks
        for group, kept in zip(self.param_groups, ours):
            group.update(kept)
        order = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        group_of = {p: group for group in self.param_groups for p in group["params"]}
        for pid, p in zip(saved_ids, order):
            if pid not in saved or not saved[pid]:
                continue
            self.state[p] = _convert_state(saved[pid], p, group_of[p])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def state_dict(self) -> dict:
        """torch's state_dict, with each param's state as a plain dict (torch.load's weights_only
        mode loads nothing else)."""
        state_dict = super().state_dict()
        state_dict["state"] = {k: dict(v) for k, v in state_dict["state"].items()}
        return state_dict

    def full_precision_state_dict(self) -> dict:
        """A state_dict in torch.optim.RMSprop's form, whatever the state_dtype: ``square_avg``,
        ``grad_avg`` and ``momentum_buffer`` in float32 (float64 for float64 params), 8-bit state
        dequantized and the variance turned back into ``square_avg``. torch.optim.RMSprop, or a
        FusedRMSprop of any state_dtype, loads it."""
        state_dict = self.state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        for pid, p in zip(ids, params):
            if pid in state_dict["state"]:
                state_dict["state"][pid] = _torch_state(state_dict["state"][pid], p)
        for group in state_dict["param_groups"]:  # torch's options only: a loader keeps its own others
            for key in _OUR_DEFAULTS:
                group.pop(key, None)
        return state_dict


# ---------------------------------------------------------------------- state formats


def _opmath(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype in (torch.float64, torch.complex128) else torch.float32


def _is_signed(key: str) -> bool:
    """Whether 8-bit state under `key` takes the signed code map (all but the second moment)."""
    return key not in ("square_avg", _VARIANCE_KEY)


def _store_state(state: dict, key: str, value: Tensor, p: Tensor, group: dict) -> None:
    """state[key] = value (a full-precision tensor laid out as the param's state, a real view for
    complex params) in the group's state_dtype: 8-bit codes and scales, or the dtype."""
    dtype = quantization.expected_state_dtype(p, group["state_dtype"])
    if dtype == torch.uint8:
        codes, scales = quantization.quantize_blockwise(value, signed=_is_signed(key))
        state[key] = codes
        state[key + _SCALE_SUFFIX] = scales
        return
    state.pop(key + _SCALE_SUFFIX, None)
    if p.is_complex():
        state[key] = torch.view_as_complex(value.to(torch.float64 if p.dtype == torch.complex128 else torch.float32)).to(p.dtype)
    else:
        state[key] = value.to(dtype)


def _decoded(state: dict, key: str, like: Tensor) -> Optional[Tensor]:
    """state[key] in full precision (float32, float64 for float64 params), laid out as stored;
    None when absent."""
    value = state.get(key)
    if value is None:
        return None
    if value.dtype == torch.uint8:
        return quantization.dequantize_blockwise(value, state[key + _SCALE_SUFFIX].to(value.device), _is_signed(key))
    real = torch.view_as_real(value) if value.is_complex() else value
    return real.to(_opmath(like))


def _torch_state(state: dict, p: Tensor) -> dict:
    """A state in torch.optim.RMSprop's form (full precision, square_avg rather than grad_var)."""
    out = {"step": state["step"]} if "step" in state else {}
    m = _decoded(state, "grad_avg", p)
    v = _decoded(state, "square_avg", p)
    if v is None and _VARIANCE_KEY in state:
        v = _decoded(state, _VARIANCE_KEY, p) + m * m
    for key, value in (("square_avg", v), ("grad_avg", m), ("momentum_buffer", _decoded(state, "momentum_buffer", p))):
        if value is not None:
            value = value.to(p.device)
            out[key] = torch.view_as_complex(value.contiguous()) if p.is_complex() else value
    return out


def _convert_state(saved: dict, p: Tensor, group: dict) -> dict:
    """A loaded state as `group` keeps it: taken as it is when it already has the group's form
    (same keys, dtypes and layout), else decoded to torch's form and stored in the group's."""
    state: dict = {}
    if "step" in saved:
        step = saved["step"]
        step = step if isinstance(step, Tensor) else torch.tensor(float(step))
        state["step"] = step.to(device=p.device, dtype=torch.float32)
    expected_dtype = quantization.expected_state_dtype(p, group["state_dtype"])
    if p.is_complex():
        expected_dtype = p.dtype
    keys = set(_state_keys(group).values())
    stored = {k for k in saved if k != "step" and not k.endswith(_SCALE_SUFFIX)}
    variance_key = _VARIANCE_KEY if _uses_variance_state(group) else "square_avg"
    same_form = variance_key in stored and all(
        isinstance(saved[k], Tensor) and saved[k].dtype == expected_dtype and saved[k].stride() == _state_strides(p)
        for k in stored
    )
    if same_form:
        for key, value in saved.items():
            if key != "step":
                state[key] = value.to(p.device)
        return state
    full = _torch_state(saved, p)
    for key in keys:
        if key == _VARIANCE_KEY:
            if "square_avg" in full:
                m = _real(full["grad_avg"]) if "grad_avg" in full else torch.zeros_like(_real(full["square_avg"]))
                v = _real(full["square_avg"])
                _store_state(state, key, _laid_out(torch.clamp(v - m * m, min=0), p), p, group)
        elif key in full:
            _store_state(state, key, _laid_out(_real(full[key]), p), p, group)
    return state


def _state_strides(p: Tensor):
    return torch.empty_like(p, memory_format=torch.preserve_format).stride()


def _laid_out(value: Tensor, p: Tensor) -> Tensor:
    """`value` laid out as the param's state is (torch.empty_like's preserve_format)."""
    target = torch.empty_like(_real(p), dtype=value.dtype, device=p.device)
    return target.copy_(value)


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


# ---------------------------------------------------------------------- helpers


def _labels(keys: Dict[str, str]) -> Dict[str, str]:
    """The optimizer's names of the step's lists, with this group's state keys."""
    labels = dict(OPTIMIZER_LABELS)
    for name, key in keys.items():
        labels[name] = f"state[{key!r}]"
        labels[SCALE_NAMES[STATE_NAMES.index(name)]] = f"state[{key + _SCALE_SUFFIX!r}]"
    return labels


def _optimizer_names(group_index: int, group: dict, members: _Gathered):
    """A function (list name, index in the step's lists) -> the optimizer's name of that tensor."""
    members_list = members.lists.params
    labels = _labels(members.keys)

    def name(list_name: str, k: int) -> str:
        index = next(i for i, p in enumerate(group["params"]) if p is members_list[k])
        return f"param group {group_index}, param {index}: {labels[list_name]}"

    return name


def _across_groups(groups: List[dict], gathered: List[_Gathered]):
    """Every group's step lists end to end, and `where` for check_no_overlap: the optimizer's name
    of a tensor in them. Shared memory is refused across groups as within one: a step writes
    them all."""
    lists = Lists(*([t for members in gathered for t in getattr(members.lists, name)] for name in Lists._fields))
    names = [_optimizer_names(i, group, members) for i, (group, members) in enumerate(zip(groups, gathered))]

    def where(list_name: str, k: int) -> str:
        for name, members in zip(names, gathered):
            count = len(getattr(members.lists, list_name))
            if k < count:
                return name(list_name, k)
            k -= count
        raise IndexError(k)

    return lists, where


def _group_seed(group: dict, group_index: int) -> int:
    """The seed of a group's stream: the optimizer's, made distinct per group (a 64-bit mix)."""
    x = (group["rounding_seed"] + 0x9E3779B97F4A7C15 * (group_index + 1)) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) - (1 << 64) if (x ^ (x >> 31)) >= (1 << 63) else (x ^ (x >> 31))


def _check_state_dtype_suits(group: dict, group_index: int, index: int, p: Tensor) -> None:
    state_dtype = group["state_dtype"]
    if state_dtype is None or not isinstance(p, Tensor):
        return
    where = f"param group {group_index}, param {index}"
    if p.is_complex():
        raise ValueError(f"{where} is complex: complex params keep their own dtype's state (state_dtype=None)")
    if p.dtype == torch.float64:
        raise ValueError(f"{where} is float64: float64 params keep float64 state (state_dtype=None), not {state_dtype!r}")
    if not p.is_floating_point():
        return  # check_param names it
    if _DTensor is not None and isinstance(p, _DTensor) and state_dtype == quantization.EIGHT_BIT:
        raise ValueError(
            f"{where} is a DTensor (FSDP2): 8-bit state is quantized in blocks of 256 along each tensor's memory, "
            "which sharding would cut; use state_dtype=torch.bfloat16 under FSDP2"
        )


def _check_something_to_round(group: dict, group_index: int) -> None:
    """stochastic_rounding rounds 16-bit values: bfloat16 state or 16-bit params. A group with
    neither would silently round nothing."""
    if not group["stochastic_rounding"] or group["state_dtype"] == torch.bfloat16:
        return
    if not any(isinstance(p, Tensor) and p.dtype in (torch.float16, torch.bfloat16) for p in group["params"]):
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in group["params"] if isinstance(p, Tensor)})
        raise ValueError(
            f"param group {group_index}: stochastic_rounding=True has nothing to round: its params are "
            f"{', '.join(dtypes)} and its state_dtype is {group['state_dtype']!r}; it rounds float16 and bfloat16 "
            "params and bfloat16 state (state_dtype=torch.bfloat16)"
        )


def _check_backend_runs(group: dict, group_index: int, params) -> None:
    """Raises BackendUnavailableError naming a param when the group's backend cannot update it,
    checked once per (device, dtype, state dtype) among the params (backends.select is cached: a
    dict lookup)."""
    if group["differentiable"]:
        return  # the reference, which runs everywhere
    seen = set()
    for index, p in enumerate(params):
        if not isinstance(p, Tensor):
            continue
        kind = (p.device, _REAL_DTYPE.get(p.dtype, p.dtype),
                _REAL_DTYPE.get(p.dtype, quantization.expected_state_dtype(p, group["state_dtype"])))
        if kind in seen:
            continue
        seen.add(kind)
        try:
            backends.select(group["backend"], *kind)
        except BackendUnavailableError as e:
            index = next(i for i, q in enumerate(group["params"]) if q is p)
            raise BackendUnavailableError(f"param group {group_index}, param {index}: {e}") from None


def _capturing_cuda_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _graph_capture_health_check(optimizer: Optimizer) -> None:
    # torch >= 2.6 names it _accelerator_graph_capture_health_check; earlier _cuda_graph_...
    check = getattr(optimizer, "_accelerator_graph_capture_health_check", None) or getattr(
        optimizer, "_cuda_graph_capture_health_check", None
    )
    if check is not None:
        check()


_KNOWN_STATE_KEYS = {"step", "square_avg", "momentum_buffer", "grad_avg", _VARIANCE_KEY}


def _check_loaded_state(optimizer: FusedRMSprop, state_dict: dict) -> None:
    saved_groups = state_dict.get("param_groups")
    if saved_groups is None or "state" not in state_dict:
        raise ValueError("state_dict must have the keys 'state' and 'param_groups' (an Optimizer.state_dict())")
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has {len(optimizer.param_groups)}"
        )
    params_by_id = {}
    for group_index, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {group_index}: the state dict has {len(saved['params'])} params, "
                f"this optimizer {len(group['params'])}"
            )
        for index, (param_id, p) in enumerate(zip(saved["params"], group["params"])):
            params_by_id[param_id] = (group_index, index, p)
    known = _KNOWN_STATE_KEYS | {k + _SCALE_SUFFIX for k in _KNOWN_STATE_KEYS - {"step"}}
    for param_id, state in state_dict["state"].items():
        if param_id not in params_by_id:
            raise ValueError(f"the state dict has state for param id {param_id!r}, which no param group lists")
        group_index, index, p = params_by_id[param_id]
        where = f"param group {group_index}, param {index}"
        unknown = set(state) - known
        if unknown:
            raise ValueError(
                f"{where}: state keys {sorted(unknown)} are not RMSprop's ({sorted(_KNOWN_STATE_KEYS)}); "
                "was this state_dict saved by another optimizer?"
            )
        if state and "square_avg" not in state and _VARIANCE_KEY not in state:
            raise ValueError(
                f"{where}: the saved state has no 'square_avg' (keys {sorted(state)}); "
                "was this state_dict saved by another optimizer?"
            )
        if _VARIANCE_KEY in state and "grad_avg" not in state:
            raise ValueError(f"{where}: the saved state has a 'grad_var' but no 'grad_avg'")
        for key in _KNOWN_STATE_KEYS - {"step"}:
            t = state.get(key)
            if t is None:
                continue
            if not isinstance(t, Tensor) or t.shape != p.shape:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{where}: state {key!r} has shape {shape} but the param has shape {tuple(p.shape)}")
            if t.dtype == torch.uint8:
                scale = state.get(key + _SCALE_SUFFIX)
                blocks = -(-t.numel() // quantization.QUANT_BLOCK)
                if not isinstance(scale, Tensor) or scale.shape != (blocks,) or scale.dtype != torch.float32:
                    raise ValueError(f"{where}: 8-bit state {key!r} needs a float32 {key + _SCALE_SUFFIX!r} of shape ({blocks},)")
            elif t.is_complex() != p.is_complex() or not (t.is_floating_point() or t.is_complex()):
                raise ValueError(f"{where}: state {key!r} has dtype {t.dtype}, which cannot hold a {p.dtype} param's state")
    # The groups too: an optimizer that has not stepped yet has no state to give itself away.
    required = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")
    for group_index, saved in enumerate(saved_groups):
        missing = [key for key in required if key not in saved]
        if missing:
            raise ValueError(
                f"param group {group_index}: the saved group has no {missing} (it has "
                f"{sorted(k for k in saved if k != 'params')}); was this state_dict saved by another optimizer?"
            )
        check_hyperparameters(
            saved["lr"], saved["alpha"], saved["eps"], saved["weight_decay"], saved["momentum"],
            initial_scale=saved.get("initial_scale", 0.0), check_tensor_lr=True,
        )


from .functional import _DTensor  # noqa: E402  (after the definitions that use it)
