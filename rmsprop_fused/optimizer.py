"""FusedRMSprop: torch.optim.RMSprop's interface, state and numbers, one fused pass per step."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends
from .errors import BackendUnavailableError
from .functional import STATE_NAMES, apply_checked, check_hyperparameters, check_param, first_irregular

__all__ = ["FusedRMSprop"]

# The state keys of torch.optim.RMSprop, by the functional's list names.
_STATE_KEY = {"square_avgs": "square_avg", "grad_avgs": "grad_avg", "momentum_buffers": "momentum_buffer"}
_NO_STATE: dict = {}
_OUR_DEFAULTS = {"eps_in_sqrt": False, "initial_scale": 0.0, "lr_in_momentum": False, "backend": "auto"}


class _Gathered(NamedTuple):
    """What a step updates in one param group: the params that have a grad, their grads, their
    step counters and the functional's state lists by name (empty when the group's options do not
    use them). None stands for state not created yet."""

    params: list
    grads: list
    steps: list
    state_lists: dict

    def lacks_state(self) -> bool:
        lists = (self.steps, *self.state_lists.values())
        return any(t is None for tensors in lists for t in tensors)


class FusedRMSprop(Optimizer):
    r"""RMSprop whose step is one fused pass over all parameters of a (device, dtype) group.

    A drop-in replacement for :class:`torch.optim.RMSprop`: the same arguments, defaults,
    validation, state keys (``step``, ``square_avg``, ``momentum_buffer``, ``grad_avg``) and
    numbers, so state_dicts move between the two both ways. Per element, with ``g`` the gradient:

    .. code-block:: text

        g = -g if maximize;   g = g + weight_decay * p if weight_decay != 0
        v = alpha * v + (1 - alpha) * g * g
        if centered:  m = lerp(m, g, 1 - alpha);  var = v - m * m      else: var = v
        denom = sqrt(var) + eps              (eps_in_sqrt=False, torch)
              = sqrt(var + eps)              (eps_in_sqrt=True: d2l, TF1, Keras, optax, timm)
        if momentum > 0:
            b = momentum * b + g / denom;       p = p - lr * b   (lr_in_momentum=False, torch)
            b = momentum * b + lr * g / denom;  p = p - b        (lr_in_momentum=True: TF, Keras, timm)
        else:
            p = p - lr * g / denom

    fp16 and bf16 params are computed in float32 and rounded once (no NaN for a zero gradient,
    unlike torch.optim.RMSprop on fp16), float64 in float64.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or Tensor): learning rate (default: 1e-2).
        alpha (float): smoothing constant of the square average (default: 0.99).
        eps (float): added to the denominator for numerical stability (default: 1e-8).
        weight_decay (float): L2 penalty added to the gradient (default: 0).
        momentum (float): momentum factor (default: 0).
        centered (bool): divide by an estimate of the gradient's variance (default: False).
        capturable (bool): the step may be captured in a CUDA graph (default: False); a tensor
            lr must then live on the params' device, where every replay reads it. The step never
            synchronises with the host either way.
        foreach (bool, optional): accepted for compatibility with torch.optim.RMSprop and
            ignored: the step is always one fused pass (default: None).
        maximize (bool): maximize the objective instead of minimizing it (default: False).
        differentiable (bool): must be False: the fused step is not differentiable.
        eps_in_sqrt (bool): eps inside the square root, as d2l, TF1, Keras, optax and timm's
            RMSpropTF do (default: False, torch's eps outside the root).
        initial_scale (float): the value square_avg starts at: 0 for torch/Keras/d2l, 1 for
            TF1 and timm's RMSpropTF (default: 0).
        lr_in_momentum (bool): accumulate lr * g / denom in the momentum buffer and subtract the
            buffer, as TF, Keras and timm do (default: False, torch's lr applied to the buffer).
        backend (str): ``"auto"`` (the fastest available per (device, dtype) group),
            ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (default: ``"auto"``).

    With ``torch.amp.GradScaler``, :meth:`step` receives the scale and the inf flag and unscales
    the gradients inside the fused update; any nonzero flag leaves params, state and step untouched.
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
        backend: str = "auto",
    ) -> None:
        check_hyperparameters(lr, alpha, eps, weight_decay, momentum, initial_scale=initial_scale, check_tensor_lr=True)
        backends.check_name(backend)
        if differentiable:
            raise ValueError(
                "FusedRMSprop does not support differentiable=True: the fused step is not "
                "differentiable (use torch.optim.RMSprop(differentiable=True))"
            )
        defaults = dict(
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
            centered=centered, capturable=capturable, foreach=foreach, maximize=maximize,
            differentiable=False, eps_in_sqrt=eps_in_sqrt, initial_scale=initial_scale,
            lr_in_momentum=lr_in_momentum, backend=backend,
        )
        super().__init__(params, defaults)  # each group is checked by add_param_group

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then the constructor's checks: the group's hyperparameters and,
        for an explicit backend, that it can update every param (now, not at the first step). A
        refused group is not added."""
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        group = self.param_groups[group_index]
        try:
            self._check_group(group, check_tensor_lr=True)
            for index, p in enumerate(group["params"]):
                _check_backend_runs(group, group_index, index, p)
        except Exception:
            del self.param_groups[group_index]
            raise

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
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
            initial_scale=group["initial_scale"], check_tensor_lr=check_tensor_lr,
        )
        backends.check_name(group["backend"])
        if group.get("differentiable"):
            raise ValueError("FusedRMSprop does not support differentiable=True (a group loaded from torch.optim.RMSprop?)")

    def _gather(self, group_index: int, group: dict) -> _Gathered:
        """The params of a group that have a grad, with their grads and the state lists the step
        uses (None where state is not created yet), all checked. Creates nothing: a refused step
        must leave the optimizer as it was."""
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
        steps, state_lists = self._state(group, members)
        first = first_irregular(members, grads, *state_lists.values())
        if first >= 0:
            indices = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            for k in range(first, len(members)):
                states = (tensors[k] if tensors else None for tensors in state_lists.values())
                check_param(indices[k], members[k], grads[k], *states, where=(group_index, indices[k]))
        if group["backend"] != "auto":  # the group's explicit backend may have changed
            for index, p in enumerate(group["params"]):
                if p.grad is not None:
                    _check_backend_runs(group, group_index, index, p)
        return _Gathered(members, grads, steps, state_lists)

    # ------------------------------------------------------------------ state

    def _state(self, group: dict, members: list) -> tuple[list, dict]:
        """The members' step counters, and {list name: their state tensors} for the lists the
        group's options use (an empty list for the others); None where absent."""
        states = [self.state.get(p, _NO_STATE) for p in members]
        used = {"square_avgs": True, "grad_avgs": group["centered"], "momentum_buffers": group["momentum"] > 0}
        state_lists = {name: [s.get(_STATE_KEY[name]) for s in states] if used[name] else [] for name in STATE_NAMES}
        return [s.get("step") for s in states], state_lists

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        """torch's state, created lazily, for a param that has a grad; keys that the group's
        options need and the state lacks (momentum switched on later, say) are added too."""
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if "square_avg" not in state:
            square_avg = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["initial_scale"] != 0:
                _real(square_avg).fill_(group["initial_scale"])
            state["square_avg"] = square_avg
        if group["momentum"] > 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["centered"] and "grad_avg" not in state:
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
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

        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)

        # Check every group before touching any: a refused step changes nothing.
        gathered = [self._gather(i, group) for i, group in enumerate(self.param_groups)]
        for index, (group, members) in enumerate(zip(self.param_groups, gathered)):
            if members.lacks_state():
                for p in members.params:
                    self._init_state(p, self.state[p], group)
                steps, state_lists = self._state(group, members.params)
                gathered[index] = _Gathered(members.params, members.grads, steps, state_lists)

        for group, members in zip(self.param_groups, gathered):
            if not members.params:
                continue
            apply_checked(
                members.params, members.grads, *members.state_lists.values(),
                lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                weight_decay=group["weight_decay"], momentum=group["momentum"],
                centered=group["centered"], maximize=group["maximize"],
                eps_in_sqrt=group["eps_in_sqrt"], lr_in_momentum=group["lr_in_momentum"],
                grad_scale=grad_scale, found_inf=found_inf, backend=group["backend"],
            )
            _count_step(members.steps, found_inf)
        return loss

    # ------------------------------------------------------------------ state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, after checking that the state is an RMSprop state for these
        params (so that an Adam state_dict or one with wrong shapes is refused, changing nothing);
        `step` is then kept on its param's device."""
        _check_loaded_state(self, state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    step = state["step"]
                    if not isinstance(step, Tensor):
                        step = torch.tensor(float(step))
                    state["step"] = step.to(device=p.device, dtype=torch.float32)


def _count_step(steps: list, found_inf: Optional[Tensor]) -> None:
    """step += 1, or += (found_inf == 0) on the device when AMP may skip the step (no host sync)."""
    by_device: dict = {}
    for s in steps:
        by_device.setdefault(s.device, []).append(s)
    for device, group in by_device.items():
        if found_inf is not None:
            increment = (found_inf.to(device, non_blocking=True) == 0).to(torch.float32)
        elif device.type == "cpu":
            # the CPU foreach kernel loops over the tensors; one wrapped 1 spares it wrapping a
            # Python number per tensor (as torch.optim does)
            increment = torch.tensor(1.0)
        else:
            torch._foreach_add_(group, 1.0)
            continue
        torch._foreach_add_(group, increment, alpha=1.0)


def _check_backend_runs(group: dict, group_index: int, index: int, p: Tensor) -> None:
    """Raises BackendUnavailableError naming the param when the group's explicit backend cannot
    update it (backends.select is cached: a dict lookup)."""
    if group["backend"] == "auto":
        return
    try:
        backends.select(group["backend"], p.device, p.dtype.to_real())
    except BackendUnavailableError as e:
        raise BackendUnavailableError(f"param group {group_index}, param {index}: {e}") from None


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _capturing_cuda_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _graph_capture_health_check(optimizer: Optimizer) -> None:
    # torch >= 2.6 names it _accelerator_graph_capture_health_check; earlier _cuda_graph_...
    check = getattr(optimizer, "_accelerator_graph_capture_health_check", None) or getattr(
        optimizer, "_cuda_graph_capture_health_check", None
    )
    if check is not None:
        check()


def _check_loaded_state(optimizer: FusedRMSprop, state_dict: dict) -> None:
    known = {"step", "square_avg", "momentum_buffer", "grad_avg"}
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
    for param_id, state in state_dict["state"].items():
        if param_id not in params_by_id:
            raise ValueError(f"the state dict has state for param id {param_id!r}, which no param group lists")
        group_index, index, p = params_by_id[param_id]
        where = f"param group {group_index}, param {index}"
        unknown = set(state) - known
        if unknown:
            raise ValueError(
                f"{where}: state keys {sorted(unknown)} are not RMSprop's ({sorted(known)}); "
                "was this state_dict saved by another optimizer?"
            )
        if state and "square_avg" not in state:
            raise ValueError(
                f"{where}: the saved state has no 'square_avg' (keys {sorted(state)}); "
                "was this state_dict saved by another optimizer?"
            )
        for key in known - {"step"}:
            t = state.get(key)
            if t is None:
                continue
            if not isinstance(t, Tensor) or t.shape != p.shape:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{where}: state {key!r} has shape {shape} but the param has shape {tuple(p.shape)}")
            if t.is_complex() != p.is_complex() or not (t.is_floating_point() or t.is_complex()):
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
