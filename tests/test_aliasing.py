"""Two tensors of one step that share memory are refused, in the op itself and at every entry,
naming both, with nothing changed: a tensor listed twice, a grad that is its param, a state tensor
that is a view of a param or of another state tensor, overlapping views, shared step counters or
8-bit scales. On a GPU two blocks would write the same bytes at once (a race no CPU test would
show); on the CPU the update would read what it has just written. Views of one tensor that share
no element (interleaved columns, the halves of a flat buffer) are not an overlap."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from rmsprop_fused import FusedRMSprop, InvalidInputError
from rmsprop_fused.functional import overlapping_pair, rmsprop
from common import available, make_lists
from reliability_common import BACKEND_DEVICES, Snapshot, require

N = 3


def _lists(device):
    return make_lists([12] * N, torch.float32, device, centered=True, momentum=0.9, steps=True, seed=0)


def _call(lists, backend):
    rmsprop(lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"], lists["momentum_buffers"],
            state_steps=lists["state_steps"], centered=True, momentum=0.9, backend=backend)


ALIASES = {
    # name: (how to make the lists alias, the two names the error must give)
    "param-twice": (lambda L: L["params"].__setitem__(2, L["params"][0]), ("params[0]", "params[2]")),
    "grad-is-param": (lambda L: L["grads"].__setitem__(2, L["params"][2]), ("params[2]", "grads[2]")),
    "state-view-of-param": (lambda L: L["square_avgs"].__setitem__(1, L["params"][0].view(12)), ("params[0]", "square_avgs[1]")),
    "grad_avg-is-momentum": (lambda L: L["grad_avgs"].__setitem__(1, L["momentum_buffers"][1]), ("grad_avgs[1]", "momentum_buffers[1]")),
    "shared-step": (lambda L: L["state_steps"].__setitem__(2, L["state_steps"][0]), ("state_steps[0]", "state_steps[2]")),
}


def _overlapping_views(L):
    """params 1 and 2 are views of one buffer that overlap by four elements."""
    buffer = torch.randn(20, device=L["params"][0].device)
    L["params"][1], L["params"][2] = buffer[:12], buffer[8:]


ALIASES["overlapping-views"] = (_overlapping_views, ("params[1]", "params[2]"))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("alias", ALIASES)
def test_functional_refuses_shared_memory_naming_both_and_changes_nothing(backend, device, alias):
    require(backend, device, torch.float32)
    lists = _lists(device)
    make, names = ALIASES[alias]
    make(lists)
    before = Snapshot.of_lists(lists)
    pattern = re.escape(names[0]) + " and " + re.escape(names[1]) + " share memory"
    with pytest.raises(InvalidInputError, match=pattern):
        _call(lists, backend)
    before.assert_unchanged(Snapshot.of_lists(lists))


@pytest.mark.skipif(not available("cpu"), reason="the C++ extension is not built")
@pytest.mark.parametrize("alias", ALIASES)
def test_the_op_refuses_shared_memory_itself(alias):
    """torch.ops.rmsprop_fused.rmsprop_ is an entry of its own (torch.compile calls it): it checks
    before its first write too."""
    lists = _lists("cpu")
    make, names = ALIASES[alias]
    make(lists)
    before = Snapshot.of_lists(lists)
    in_list_order = re.escape(names[0]) + " and " + re.escape(names[1])
    with pytest.raises(ValueError, match=f"{in_list_order} share memory"):
        torch.ops.rmsprop_fused.rmsprop_(
            lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"], lists["momentum_buffers"],
            lists["state_steps"], [], [], [], lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9,
            centered=True, maximize=False, eps_in_sqrt=False, lr_in_momentum=False, decoupled_weight_decay=False,
            nesterov=False, bias_correction=False, variance_state=False,
        )
    before.assert_unchanged(Snapshot.of_lists(lists))


@pytest.mark.skipif(not available("cpu"), reason="the C++ extension is not built")
def test_shared_8bit_scales_are_refused():
    lists = make_lists([4096, 4096], torch.float32, state_dtype=torch.uint8, steps=True, seed=1)
    lists["square_avg_scales"][1] = lists["square_avg_scales"][0]
    with pytest.raises(InvalidInputError, match=re.escape("square_avg_scales[0] and square_avg_scales[1] share memory")):
        rmsprop(lists["params"], lists["grads"], lists["square_avgs"], state_steps=lists["state_steps"],
                square_avg_scales=lists["square_avg_scales"])


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_the_optimizer_names_the_params(backend, device):
    require(backend, device, torch.float32)
    a, b = nn.Parameter(torch.randn(4, device=device)), nn.Parameter(torch.randn(4, device=device))
    opt = FusedRMSprop([{"params": [a]}, {"params": [b]}], momentum=0.9, backend=backend)
    a.grad, b.grad = torch.randn(4, device=device), torch.randn(4, device=device)
    opt.step()
    b.grad = b.detach()  # p.grad = p, through .detach() (the same memory)
    before = Snapshot.of_optimizer(opt)
    with pytest.raises(InvalidInputError, match=re.escape("param group 1, param 0: param and param group 1, param 0: grad share memory")):
        opt.step()
    before.assert_optimizer_unchanged(opt)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_views_that_share_no_element_are_separate(backend, device):
    """Params carved out of one flat buffer (as some frameworks keep them), and grads that are
    views of one flat gradient buffer (DDP's gradient_as_bucket_view): adjacent, not overlapping."""
    require(backend, device, torch.float32)
    flat = torch.randn(30, device=device)
    grads = torch.randn(30, device=device)
    params = [flat[0:10], flat[10:25], flat[25:30]]
    lists = {"params": params, "grads": [grads[0:10], grads[10:25], grads[25:30]],
             "square_avgs": [torch.rand(n, device=device) for n in (10, 15, 5)]}
    separate = {k: [t.clone() for t in v] for k, v in lists.items()}  # each in storage of its own
    rmsprop(lists["params"], lists["grads"], lists["square_avgs"], backend=backend)
    rmsprop(separate["params"], separate["grads"], separate["square_avgs"], backend="reference")
    for key in ("params", "square_avgs"):
        for i, (a, b) in enumerate(zip(lists[key], separate[key])):
            assert torch.equal(a.cpu(), b.cpu()), f"{key}[{i}]"
    assert torch.equal(flat.cpu(), torch.cat(separate["params"]).cpu())  # the buffer, boundaries included


def test_the_exact_overlap_test_of_views_with_gaps():
    """Ranges that interleave are compared element by element: even and odd elements of one
    tensor share nothing; every third and every second do (element 0, 6, ...)."""
    x = torch.randn(60)
    assert overlapping_pair([x[0::2], x[1::2]]) is None
    assert overlapping_pair([x[0::3], x[0::2]]) == (0, 1)
    assert overlapping_pair([x[1::3], x[0::3], x[2::3]]) is None
    m = torch.randn(10, 5, 2)
    assert overlapping_pair([m[..., 0], m[..., 1]]) is None
    assert overlapping_pair([m[..., 0], m[:, :3]]) == (0, 1)
