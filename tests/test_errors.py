"""Bad input gets a clear error naming the problem, and nothing changes: every param, grad and
state tensor is compared before and after the refused call."""

import math

import pytest
import torch
from torch import nn

from rmsprop_fused import BackendUnavailableError, FusedRMSprop, InvalidInputError, SparseGradientError
from rmsprop_fused.functional import rmsprop
from common import available, make_lists

CPU_BACKENDS = [b for b in ("reference", "cpu", "triton") if available(b)]


def snapshot(optimizer):
    params = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    grads = [None if p.grad is None else p.grad.clone() for g in optimizer.param_groups for p in g["params"]]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    return params, grads, state


def assert_unchanged(optimizer, before):
    params, grads, state = snapshot(optimizer)
    for a, b in zip(params, before[0]):
        assert torch.equal(a, b) or (a.numel() == 0 and b.numel() == 0)
    for a, b in zip(grads, before[1]):
        assert (a is None and b is None) or a.layout != torch.strided or torch.equal(a, b)
    assert state.keys() == before[2].keys(), "state was created or dropped"
    for pid, s in state.items():
        assert s.keys() == before[2][pid].keys()
        for k in s:
            if s[k].is_meta:  # no data to compare; it is the same tensor object
                continue
            assert torch.equal(s[k], before[2][pid][k]), k


def trained_optimizer(backend="auto", **options):
    """Two groups, one step taken (so state exists), fresh grads set for the next step."""
    torch.manual_seed(0)
    a, b, c = (nn.Parameter(torch.randn(s)) for s in ((4, 3), (5,), (2, 2)))
    opt = FusedRMSprop([{"params": [a, b]}, {"params": [c], "lr": 0.1}], momentum=0.9, centered=True, backend=backend, **options)
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    opt.step()
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    return opt, (a, b, c)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(lr=math.nan), "Invalid learning rate: nan"),
        (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
        (dict(lr=torch.tensor(-0.1)), "Invalid learning rate"),
        (dict(lr=torch.tensor(1)), "Tensor lr must be a floating-point tensor, got dtype torch.int64"),
        (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
        (dict(eps=math.nan), "Invalid epsilon value: nan"),
        (dict(momentum=-0.9), "Invalid momentum value: -0.9"),
        (dict(momentum=math.nan), "Invalid momentum value: nan"),
        (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        (dict(weight_decay=math.nan), "Invalid weight_decay value: nan"),
        (dict(alpha=-0.5), "Invalid alpha value: -0.5"),
        (dict(alpha=math.nan), "Invalid alpha value: nan"),
        (dict(initial_scale=-1.0), "Invalid initial_scale value: -1.0"),
        (dict(initial_scale=math.inf), "Invalid initial_scale value: inf"),
        (dict(backend="gpu"), "Invalid backend: 'gpu'"),
    ],
)
def test_invalid_hyperparameters_are_refused_with_torchs_messages(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        FusedRMSprop([nn.Parameter(torch.randn(2))], **kwargs)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(eps=-1.0), dict(momentum=-1.0), dict(weight_decay=-1.0), dict(alpha=-1.0), dict(lr=math.nan)])
def test_torch_refuses_the_same_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        torch.optim.RMSprop([nn.Parameter(torch.randn(2))], **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("key, value, message", [
    ("lr", -0.5, "Invalid learning rate"),
    ("eps", math.nan, "Invalid epsilon value"),
    ("momentum", -1.0, "Invalid momentum value"),
    ("backend", "nope", "Invalid backend"),
])
def test_a_group_changed_to_invalid_refuses_the_whole_step(backend, key, value, message):
    opt, _ = trained_optimizer(backend)
    opt.param_groups[1][key] = value  # the second group is bad: the first must not be updated either
    before = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_unchanged(opt, before)


def _sparse_grad(p):
    return torch.randn_like(p).to_sparse()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["sparse", "shape", "dtype"])
def test_bad_grad_is_refused_naming_group_and_param_and_nothing_changes(backend, case):
    opt, (a, b, c) = trained_optimizer(backend)
    bad = {
        "sparse": lambda: torch.randn(2, 2).to_sparse(),
        "shape": lambda: torch.randn(4),
        "dtype": lambda: torch.randn(2, 2, dtype=torch.float64),
    }[case]()
    if case == "sparse":
        c.grad = bad
    else:  # the .grad setter refuses these; code that swaps .data can still produce them
        c.grad = torch.randn_like(c)
        c.grad.data = bad
    before = snapshot(opt)
    expected = SparseGradientError if case == "sparse" else InvalidInputError
    with pytest.raises(expected, match="param group 1, param 0") as info:
        opt.step()
    if case == "sparse":
        assert isinstance(info.value, RuntimeError) and "RMSprop does not support sparse gradients" in str(info.value)
    assert_unchanged(opt, before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_sparse_grad_in_a_single_group_step_gets_torchs_error(backend):
    """One param group takes the fast step (one op call), where the dispatcher refuses a sparse
    grad first: the step must still raise torch's error, naming the param, and change nothing."""
    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(4))]
    opt = FusedRMSprop(params, momentum=0.9, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    params[1].grad = torch.randn(4).to_sparse()
    before = snapshot(opt)
    with pytest.raises(SparseGradientError, match=r"RMSprop does not support sparse gradients \(param group 0, param 1: "):
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("key, bad, message", [
    ("square_avg", lambda: torch.empty(2, 2, device="meta"), r"state\[.square_avg.\] \(state tensor\) is float32 \(2, 2\) on meta"),
    ("momentum_buffer", lambda: torch.zeros(3), r"state\[.momentum_buffer.\] \(state tensor\) is float32 \(3,\)"),
    ("grad_avg", lambda: torch.zeros(2, 2, dtype=torch.float16), r"state\[.grad_avg.\] \(state tensor\) is float16"),
])
def test_bad_state_is_refused_and_nothing_changes(backend, key, bad, message):
    opt, (a, b, c) = trained_optimizer(backend)
    opt.state[c][key] = bad()
    before = snapshot(opt)
    with pytest.raises(InvalidInputError, match="param group 1, param 0: " + message):
        opt.step()
    assert_unchanged(opt, before)


def test_param_on_meta_device_is_refused():
    p = nn.Parameter(torch.empty(3, device="meta"))
    q = nn.Parameter(torch.randn(3))
    opt = FusedRMSprop([q, p])
    p.grad = torch.empty(3, device="meta")
    q.grad = torch.randn(3)
    before_q = q.detach().clone()
    with pytest.raises(InvalidInputError, match="param group 0, param 1: param is on the meta device"):
        opt.step()
    assert torch.equal(q, before_q) and len(opt.state) == 0


def test_first_step_refused_creates_no_state():
    opt = FusedRMSprop([nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))])
    p, q = opt.param_groups[0]["params"]
    p.grad, q.grad = torch.randn(3), torch.randn(2)
    q.grad.data = torch.randn(3)  # q's grad now has the wrong shape
    with pytest.raises(InvalidInputError, match=r"param group 0, param 1: grad \(gradient\) is float32 \(3,\) on cpu but the param is float32 \(2,\)"):
        opt.step()
    assert len(opt.state) == 0


def test_overlapping_params_are_refused():
    """An expanded param has elements that are one memory location: an in-place update of it is
    undefined, and torch's in-place ops refuse it too. (Views with gaps are fine:
    tests/test_layouts.py.)"""
    p = nn.Parameter(torch.randn(1, 3).expand(4, 3))
    opt = FusedRMSprop([p])
    p.grad = torch.randn(4, 3)
    before = p.detach().clone()
    with pytest.raises(InvalidInputError, match=r"param group 0, param 0: param has overlapping elements \(strides \(0, 1\)"):
        opt.step()
    assert torch.equal(p, before) and len(opt.state) == 0


def test_unavailable_backend_is_a_clear_error_at_construction():
    reason_backend = "cuda" if not torch.cuda.is_available() else None
    if reason_backend is None:
        pytest.skip("a GPU is visible here: the cuda backend is available")
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot update float32 tensors on cpu: the 'cuda' backend updates CUDA tensors"):
        FusedRMSprop([nn.Parameter(torch.randn(2))], backend="cuda")


def test_functional_refuses_mismatched_lists_and_changes_nothing():
    lists = make_lists([3, 4], torch.float32, centered=True, momentum=0.9)
    before = {k: [t.clone() for t in v] for k, v in lists.items()}
    with pytest.raises(ValueError, match="got 1 grad_avgs for 2 params"):
        rmsprop(lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"][:1], lists["momentum_buffers"], centered=True, momentum=0.9)
    lists["square_avgs"][1] = lists["square_avgs"][1][:3]
    with pytest.raises(InvalidInputError, match=r"square_avgs\[1\] \(state tensor\) is float32 \(3,\) on cpu but the param is float32 \(4,\)"):
        rmsprop(lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"], lists["momentum_buffers"], centered=True, momentum=0.9)
    for k in ("params", "grads", "grad_avgs", "momentum_buffers"):
        for a, b in zip(lists[k], before[k]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_variance_state_in_a_state_that_cannot_hold_it_is_refused(backend, dtype):
    """The variance form is kept in float32, bfloat16 or 8-bit state; in float16 or float64 state
    one backend would compute it and another torch's form, so every entry refuses it."""
    if not available(backend, dtype=dtype):
        pytest.skip(f"backend {backend!r} does not run {dtype} here")
    lists = make_lists([3, 4], dtype, centered=True, momentum=0.9, seed=5, variance_state=True)
    before = {k: [t.clone() for t in v] for k, v in lists.items()}
    with pytest.raises(InvalidInputError, match=r"square_avgs\[0\] is float(16|64): variance_state keeps the variance"):
        rmsprop(lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"], lists["momentum_buffers"],
                centered=True, momentum=0.9, variance_state=True, backend=backend)
    if backend == "cpu":  # the op itself, as torch.compile calls it
        with pytest.raises(ValueError, match="variance_state keeps the variance in float32, bfloat16 or 8-bit state"):
            torch.ops.rmsprop_fused.rmsprop_(
                lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"], lists["momentum_buffers"],
                [], [], [], [], lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9, centered=True,
                maximize=False, eps_in_sqrt=False, lr_in_momentum=False, decoupled_weight_decay=False,
                nesterov=False, bias_correction=False, variance_state=True)
    for k, tensors in lists.items():
        for a, b in zip(tensors, before[k]):
            assert torch.equal(a, b), k


def test_foreign_state_dict_is_refused_and_nothing_changes():
    opt, (a, b, c) = trained_optimizer()
    adam = torch.optim.Adam([{"params": [a, b]}, {"params": [c]}])
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    adam.step()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 0, param 0: state keys \['exp_avg', 'exp_avg_sq'\] are not RMSprop's"):
        opt.load_state_dict(adam.state_dict())
    assert_unchanged(opt, before)


def test_state_dict_with_wrong_shapes_is_refused():
    opt, _ = trained_optimizer()
    saved = opt.state_dict()
    saved["state"][1]["square_avg"] = torch.zeros(7)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 0, param 1: state 'square_avg' has shape \(7,\) but the param has shape \(5,\)"):
        opt.load_state_dict(saved)
    assert_unchanged(opt, before)
