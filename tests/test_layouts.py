"""Any memory layout torch.optim.RMSprop accepts, on every backend (issue: a true drop-in).

The kernels walk dense tensors laid out as their param; the functional entry updates everything
else through dense copies (rmsprop_fused/functional.py _with_dense_copies): params that are views
with gaps, grads whose strides differ from their param's, state loaded with another layout. The
step stays atomic (checked before any copy or write), and the numbers are torch's.

Trajectories are compared with torch.optim.RMSprop in float64 (a few ulps per step); the dense
copies must not change a bit, which the comparison with the same step on dense tensors shows.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from rmsprop_fused import FusedRMSprop, InvalidInputError
from rmsprop_fused.functional import rmsprop
from common import assert_close, fresh_seed, same_bits
from reliability_common import BACKEND_DEVICES, Snapshot, require

STEPS = 5
OPTIONS = dict(lr=1e-2, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.1)


def _dtype_for(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _follow_torch(make_params, make_grads, backend, device, dtype, **options):
    """STEPS steps of FusedRMSprop and torch.optim.RMSprop from the same params and grads;
    returns both lists of params and the optimizers."""
    options = {**OPTIONS, **options}
    ours, theirs = make_params(), make_params()
    fused = FusedRMSprop(ours, backend=backend, **options)
    reference = torch.optim.RMSprop(theirs, **options)
    gen = torch.Generator().manual_seed(fresh_seed())
    for _ in range(STEPS):
        for a, b, grad in zip(ours, theirs, make_grads(ours, gen)):
            a.grad, b.grad = grad.clone(memory_format=torch.preserve_format), grad.clone(memory_format=torch.preserve_format)
            if grad.stride() != a.grad.stride():  # clone() may lay it out anew: keep the strides asked for
                a.grad = torch.empty_strided(grad.shape, grad.stride(), dtype=grad.dtype, device=grad.device).copy_(grad)
                b.grad = a.grad.clone()
        fused.step()
        reference.step()
    return ours, theirs, fused


def _gapped(shape, dtype, device):
    """A view with gaps: the first of the last dimension's two columns (strides (10, 2) for (10, 5))."""
    return torch.randn(*shape, 2, dtype=dtype, device=device)[..., 0]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_params_that_are_views_with_gaps(backend, device):
    """w = Parameter(torch.randn(10, 5, 2)[..., 0]), strides (10, 2); autograd makes its grad
    contiguous (5, 1)."""
    dtype = _dtype_for(backend)
    require(backend, device, dtype)
    torch.manual_seed(fresh_seed())
    base = [_gapped((10, 5), dtype, device), _gapped((7,), dtype, device), torch.randn(3, 4, dtype=dtype, device=device)]

    def make_params():  # torch.optim.RMSprop gets the same gapped views
        out = []
        for b in base:
            if b.is_contiguous():
                out.append(nn.Parameter(b.clone()))
            else:
                storage = torch.zeros(*b.shape, 2, dtype=dtype, device=device)
                storage[..., 0] = b
                out.append(nn.Parameter(storage[..., 0]))
        return out

    def grads(params, gen):
        return [torch.randn(p.shape, generator=gen, dtype=dtype).to(device) for p in params]  # contiguous

    ours, theirs, fused = _follow_torch(make_params, grads, backend, device, dtype)
    assert ours[0].stride() == (10, 2) and ours[0].grad.stride() == (5, 1)
    for a, b in zip(ours, theirs):
        assert_close(a.detach(), b.detach(), steps=STEPS)
    # the state is laid out as the param's state is (torch.empty_like: contiguous for a view with gaps)
    assert fused.state[ours[0]]["square_avg"].is_contiguous()
    # the memory between the gapped elements is untouched
    assert bool((ours[0].as_strided((10, 5, 2), (10, 2, 1))[..., 1] == 0).all())


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_grads_with_other_strides_than_their_param(backend, device):
    """p = Parameter(torch.ones(3, 4)); p.grad = torch.ones(4, 3).t(): the grad is read through
    a copy laid out as p, and not written (no AMP)."""
    dtype = _dtype_for(backend)
    require(backend, device, dtype)

    def make_params():
        torch.manual_seed(1)
        return [nn.Parameter(torch.randn(3, 4, dtype=dtype, device=device)), nn.Parameter(torch.randn(6, dtype=dtype, device=device))]

    def grads(params, gen):
        return [torch.randn(4, 3, generator=gen, dtype=dtype).to(device).t(), torch.randn(6, generator=gen, dtype=dtype).to(device)]

    ours, theirs, fused = _follow_torch(make_params, grads, backend, device, dtype)
    assert ours[0].grad.stride() == (1, 3)
    for a, b in zip(ours, theirs):
        assert_close(a.detach(), b.detach(), steps=STEPS)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("conv_grad", ["channels_last", "contiguous"])
def test_channels_last_and_contiguous_mixed(backend, device, conv_grad):
    """A conv weight in channels_last, with grads contiguous or channels_last, beside plain params:
    dense in another dimension order is walked as it is (no copy) when the grad agrees."""
    dtype = _dtype_for(backend)
    require(backend, device, dtype)

    def make_params():
        torch.manual_seed(2)
        conv = torch.randn(4, 3, 3, 3, dtype=dtype, device=device).to(memory_format=torch.channels_last)
        return [nn.Parameter(conv), nn.Parameter(torch.randn(4, 3, 3, 3, dtype=dtype, device=device)),
                nn.Parameter(torch.randn(5, dtype=dtype, device=device))]

    def grads(params, gen):
        g = [torch.randn(p.shape, generator=gen, dtype=dtype).to(device) for p in params]
        g[0] = g[0].to(memory_format=torch.channels_last) if conv_grad == "channels_last" else g[0]
        g[1] = g[1].to(memory_format=torch.channels_last)  # against a contiguous param: a copy
        return g

    ours, theirs, fused = _follow_torch(make_params, grads, backend, device, dtype)
    assert fused.state[ours[0]]["square_avg"].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(ours, theirs):
        assert_close(a.detach(), b.detach(), steps=STEPS)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_state_loaded_with_another_layout(backend, device):
    """A state_dict whose square_avg is transposed in memory (saved from a model laid out
    otherwise): FusedRMSprop takes it, keeps it as the param's state is laid out, and follows
    torch from there."""
    dtype = _dtype_for(backend)
    require(backend, device, dtype)
    torch.manual_seed(3)
    start = torch.randn(4, 5, dtype=dtype, device=device)
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    fused = FusedRMSprop([ours], backend=backend, **OPTIONS)
    reference = torch.optim.RMSprop([theirs], **OPTIONS)
    for opt, p in ((fused, ours), (reference, theirs)):
        p.grad = torch.ones_like(p)
        opt.step()
    saved = reference.state_dict()
    for key in ("square_avg", "grad_avg", "momentum_buffer"):
        value = saved["state"][0][key]
        saved["state"][0][key] = value.t().contiguous().t()  # same values, column-major memory
    fused.load_state_dict(saved)
    assert fused.state[ours]["square_avg"].is_contiguous()
    gen = torch.Generator().manual_seed(fresh_seed())
    for _ in range(STEPS):
        grad = torch.randn(4, 5, generator=gen, dtype=dtype).to(device)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        fused.step()
        reference.step()
    assert_close(ours.detach(), theirs.detach(), steps=STEPS + 1)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_a_dense_copy_computes_the_same_bits(backend, device):
    """The functional form on a view with gaps and a transposed grad, against the same step on
    dense tensors holding the same values: bit for bit (the copy changes no arithmetic)."""
    dtype = torch.float32
    require(backend, device, dtype)
    gen = torch.Generator().manual_seed(fresh_seed())
    values = [torch.randn(6, 4, generator=gen).to(device) for _ in range(5)]
    values[2] = values[2].abs() + 0.1  # square_avg
    dense = [v.clone() for v in values]
    gapped = []
    for v in values:
        storage = torch.full((6, 4, 3), 7.0, device=device)
        storage[..., 1] = v
        gapped.append(storage[..., 1])
    gapped[1] = values[1].t().contiguous().t()  # the grad: contiguous but column-major
    options = dict(lr=0.01, alpha=0.99, momentum=0.9, centered=True, backend=backend)
    rmsprop([dense[0]], [dense[1]], [dense[2]], [dense[3]], [dense[4]], **options)
    rmsprop([gapped[0]], [gapped[1]], [gapped[2]], [gapped[3]], [gapped[4]], **options)
    for d, g in zip(dense, gapped):
        assert same_bits(d, g.contiguous())
    storage = gapped[0].as_strided((6, 4, 3), (12, 3, 1), gapped[0].storage_offset() - 1)
    assert bool((storage[..., 0] == 7).all()) and bool((storage[..., 2] == 7).all()), "wrote between the elements"


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_amp_writes_the_unscaled_grad_back_through_the_copy(backend, device):
    require(backend, device, torch.float32)
    gen = torch.Generator().manual_seed(fresh_seed())
    p = torch.randn(5, 4, generator=gen).to(device)
    grad = torch.randn(4, 5, generator=gen).to(device).t()  # strides (1, 5)
    original = grad.clone()
    v = torch.rand(5, 4, generator=gen).to(device)
    rmsprop([p], [grad], [v], grad_scale=torch.tensor(4.0, device=device), backend=backend)
    assert grad.stride() == (1, 5)
    assert same_bits(grad.contiguous(), (original / 4).contiguous())


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_interleaved_views_of_one_tensor_are_separate_params(backend, device):
    """w[..., 0] and w[..., 1] share a storage and their address ranges interleave, but no
    element: they are two params, not an overlap."""
    require(backend, device, torch.float32)
    w = torch.randn(6, 5, 2, device=device)
    a, b = nn.Parameter(w[..., 0]), nn.Parameter(w[..., 1])
    separate = [nn.Parameter(w[..., k].clone()) for k in range(2)]  # each in storage of its own
    opt = FusedRMSprop([a, b], lr=0.1, momentum=0.9, backend=backend)
    reference = FusedRMSprop(separate, lr=0.1, momentum=0.9, backend="reference")
    for _ in range(2):
        grads = [torch.randn(6, 5, device=device) for _ in range(2)]
        a.grad, b.grad = grads
        separate[0].grad, separate[1].grad = (g.clone() for g in grads)
        opt.step()
        reference.step()
    assert torch.equal(w[..., 0], separate[0]) and torch.equal(w[..., 1], separate[1])


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_a_refused_step_with_gapped_params_changes_nothing(backend, device):
    """The copies are made after every check: a bad param after a gapped one refuses the step,
    and neither is touched."""
    require(backend, device, torch.float32)
    gapped = nn.Parameter(_gapped((4, 3), torch.float32, device))
    bad = nn.Parameter(torch.randn(3, device=device))
    opt = FusedRMSprop([gapped, bad], momentum=0.9, backend=backend)
    gapped.grad = torch.randn(4, 3, device=device)
    bad.grad = torch.randn(3, device=device)
    opt.step()  # state exists
    gapped.grad = torch.randn(4, 3, device=device)
    bad.grad = torch.randn(3, device=device)
    bad.grad.data = torch.randn(4, device=device)  # the wrong shape
    before = Snapshot.of_optimizer(opt)
    with pytest.raises(InvalidInputError, match=re.escape("param group 0, param 1: grad")):
        opt.step()
    before.assert_optimizer_unchanged(opt)
