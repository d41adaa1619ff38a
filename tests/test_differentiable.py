"""differentiable=True: autograd records the step, as torch.optim.RMSprop(differentiable=True) does
(meta-learning, learned learning rates). The step then runs the reference backend with grad mode
on, so gradients flow through the update into the grads, the state, a tensor lr and, over
several steps, the params they started from.

As torch tests its differentiable optimizers (test/optim/test_optim.py, TestDifferentiableOptimizer
and its _diff_fn): torch.autograd.gradcheck in float64 of one step as a function of the param,
its grad and its state, on a param that is a clone (not a leaf), with the state set by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from rmsprop_fused import FusedRMSprop
from common import assert_close, fresh_seed


def _step_fn(opt_class, kwargs, state_keys):
    """(p, grad, *state) -> (p after one step, the state tensors that require grad after it)."""

    def fn(p, grad, *state):
        p = p.clone()
        p.grad = grad
        opt = opt_class([p], **kwargs)
        opt.state[p].update({"step": torch.zeros((), dtype=torch.float32), **{k: v.clone() for k, v in zip(state_keys, state)}})
        opt.step()
        return (p,) + tuple(opt.state[p][k] for k in state_keys)

    return fn


def _inputs(state_keys, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(10, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.rand(10, generator=gen, dtype=torch.float64, requires_grad=True)
    # square_avg > grad_avg**2 + margin: the centered variance stays clear of the sqrt's pole
    state = {
        "square_avg": torch.rand(10, generator=gen, dtype=torch.float64) + 0.1,
        "momentum_buffer": torch.rand(10, generator=gen, dtype=torch.float64),
        "grad_avg": 1e-2 * torch.rand(10, generator=gen, dtype=torch.float64),
    }
    return p, grad, [state[k].requires_grad_() for k in state_keys]


CASES = {
    "plain": (dict(lr=0.9), ["square_avg"]),
    "momentum": (dict(lr=0.9, momentum=0.9), ["square_avg", "momentum_buffer"]),
    "centered": (dict(lr=0.9, centered=True), ["square_avg", "grad_avg"]),
    # torch's own test case: everything at once
    "maximize-momentum-centered-weight-decay": (
        dict(lr=0.9, maximize=True, momentum=0.9, centered=True, weight_decay=0.1),
        ["square_avg", "momentum_buffer", "grad_avg"],
    ),
    "eps-in-sqrt-lr-in-momentum-nesterov": (
        dict(lr=0.9, momentum=0.9, eps_in_sqrt=True, lr_in_momentum=True, nesterov=True),
        ["square_avg", "momentum_buffer"],
    ),
    "decoupled-weight-decay-bias-correction": (
        dict(lr=0.9, weight_decay=0.1, decoupled_weight_decay=True, bias_correction=True, alpha=0.9),
        ["square_avg"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_one_step(case):
    kwargs, keys = CASES[case]
    p, grad, state = _inputs(keys, fresh_seed())
    assert gradcheck(_step_fn(FusedRMSprop, {**kwargs, "differentiable": True}, keys), (p, grad, *state))


def test_gradcheck_through_a_tensor_lr():
    """A learned learning rate: the step as a function of lr too."""
    keys = ["square_avg", "momentum_buffer"]
    p, grad, state = _inputs(keys, fresh_seed())
    lr = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def fn(lr, p, grad, *state):
        return _step_fn(FusedRMSprop, dict(lr=lr, momentum=0.9, differentiable=True), keys)(p, grad, *state)

    assert gradcheck(fn, (lr, p, grad, *state))


def test_gradcheck_through_two_steps_into_the_starting_params():
    """The second step's update depends on the params the first left (weight decay reads them),
    and so on the params the run started from."""
    gen = torch.Generator().manual_seed(fresh_seed())
    # Params away from 0: the first centered step is about g / |g| there (the grad is g * p), a
    # sign function whose slope grows as 1/p^2; below p ~ 4e-5 gradcheck's 1e-6 perturbation is
    # no longer small beside p and its finite differences are wrong, not the derivative.
    start = (0.5 + 0.5 * torch.rand(6, generator=gen, dtype=torch.float64)).requires_grad_()
    grads = [torch.rand(6, generator=gen, dtype=torch.float64) for _ in range(2)]

    def two_steps(start):
        p = start.clone()
        opt = FusedRMSprop([p], lr=0.3, momentum=0.5, weight_decay=0.2, centered=True, differentiable=True)
        for g in grads:
            p.grad = g * p  # a grad that depends on p, as a loss's would
            opt.step()
        return p

    assert gradcheck(two_steps, (start,))


@pytest.mark.parametrize("case", ["momentum", "maximize-momentum-centered-weight-decay"])
def test_gradients_are_torchs(case):
    """The same vector-Jacobian products as torch.optim.RMSprop(differentiable=True)."""
    kwargs, keys = CASES[case]
    seed = fresh_seed()
    p, grad, state = _inputs(keys, seed)
    ours = _step_fn(FusedRMSprop, {**kwargs, "differentiable": True}, keys)(p, grad, *state)
    theirs = _step_fn(torch.optim.RMSprop, {**kwargs, "differentiable": True}, keys)(p, grad, *state)
    gen = torch.Generator().manual_seed(seed + 1)
    cotangents = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in ours]
    ours_grads = torch.autograd.grad(ours, (p, grad, *state), cotangents)
    theirs_grads = torch.autograd.grad(theirs, (p, grad, *state), cotangents)
    # Each VJP sums terms of up to ~50 (cotangents of a few units times derivatives up to ~16:
    # 1 / denom with square_avg >= 0.1) in another order than torch's, and random-signed terms
    # may cancel, so the error is a few ulps of the terms (~1e-14), not of the sum. 1e-12 leaves
    # room for that; a wrong derivative is O(1) off.
    for a, b, name in zip(ours_grads, theirs_grads, ["param", "grad", *keys]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-12, msg=lambda m: f"seed {seed}, d/d{name}: {m}")


def test_differentiable_takes_only_the_reference_arithmetic():
    params = [nn.Parameter(torch.randn(2))]
    with pytest.raises(ValueError, match="differentiable=True runs the reference backend"):
        FusedRMSprop(params, differentiable=True, backend="cpu")
    with pytest.raises(ValueError, match="no state_dtype"):
        FusedRMSprop(params, differentiable=True, state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no stochastic_rounding"):
        FusedRMSprop(params, differentiable=True, stochastic_rounding=True)


def test_without_differentiable_nothing_is_recorded():
    p = nn.Parameter(torch.rand(4, dtype=torch.float64))
    p.grad = torch.rand(4, dtype=torch.float64, requires_grad=True)
    FusedRMSprop([p]).step()
    assert p.grad_fn is None and p.is_leaf  # updated in place under no_grad, as torch's step is
