"""Non-finite values: where they come from, where they go.

* A NaN or inf gradient (or param) must poison exactly the elements torch.optim.RMSprop poisons,
  and leave every other element within the usual tolerance of torch's: a fused kernel that
  silently clamps, zeroes or spreads NaN would change what a user's NaN detector sees.
* Any nonzero found_inf (AMP found an inf in some grad) must leave EVERYTHING as it was: params,
  grads (not even unscaled), state and step counter.
* fp16 / bf16 params computed in float32 ("opmath") must not produce NaN from a finite gradient,
  including the gradients that break torch.optim.RMSprop on fp16 (a zero gradient: eps = 1e-8
  rounds to 0 in fp16, and 0 / 0 is NaN; tests/test_optimizer.py shows torch doing so).

The reference for NaN patterns is torch's single-tensor path (torch.optim.rmsprop.rmsprop with
foreach=False), run in this process on this device, for the options torch has.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.optim.rmsprop as torch_rmsprop
from torch import nn

from rmsprop_fused import FusedRMSprop
from common import OPTION_MATRIX, assert_close, clone_lists, fresh_seed, make_lists, option_id, step
from reliability_common import BACKEND_DEVICES, STATE_LISTS, Snapshot, one_intra_op_thread, require  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# The options torch.optim.RMSprop has; eps_in_sqrt and lr_in_momentum have no torch counterpart.
TORCH_OPTIONS = [
    dict(centered=c, momentum=m, weight_decay=wd, maximize=mx)
    for c, m, wd, mx in itertools.product((False, True), (0.0, 0.9), (0.0, 0.1), (False, True))
]
LR, ALPHA, EPS = 0.01, 0.99, 1e-8
SIZES = [4097, 7, 1]  # a vector body with a tail, a tail only, a single element


def torch_step(lists, *, centered, momentum, weight_decay, maximize):
    steps = [torch.zeros((), device=p.device) for p in lists["params"]]
    torch_rmsprop.rmsprop(
        lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"], lists["momentum_buffers"],
        steps, foreach=False, maximize=maximize, lr=LR, alpha=ALPHA, eps=EPS, weight_decay=weight_decay,
        momentum=momentum, centered=centered,
    )


def fused_step(lists, backend, **options):
    step(lists, backend, lr=LR, alpha=ALPHA, eps=EPS, **options)


def plant(t: torch.Tensor, values, stride: int = 613) -> None:
    """Writes `values` at spread-out positions (first and last element included)."""
    n = t.numel()
    if n == 0:
        return
    positions = sorted({0, n - 1} | {(k * stride) % n for k in range(1, 3 * len(values))})
    flat = t.view(-1)
    for k, i in enumerate(positions):
        flat[i] = values[k % len(values)]


def assert_same_non_finite(actual, expected, name, *, compare_finite=True, steps=1):
    """Same NaN, +inf and -inf positions; the finite elements within the dtype's tolerance."""
    for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, e = test(actual).cpu(), test(expected).cpu()
        assert torch.equal(a, e), (
            f"{name}: {kind} at {a.nonzero().flatten()[:8].tolist()} (fused) vs "
            f"{e.nonzero().flatten()[:8].tolist()} (torch)"
        )
    if compare_finite:
        finite = torch.isfinite(expected)
        assert_close(actual[finite], expected[finite], steps=steps, name=f"{name} (finite elements)")


def assert_lists_match_torch(actual, expected, **kwargs):
    for key in ("params",) + STATE_LISTS:
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            assert_same_non_finite(a, e, f"{key}[{i}]", **kwargs)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("options", TORCH_OPTIONS, ids=option_id)
@pytest.mark.parametrize("where", ["grads", "params"])
def test_nan_and_inf_propagate_exactly_like_torch(backend, device, dtype, options, where):
    """Step 1 with NaN, +inf and -inf planted in the grads (or params: an inf param with
    weight_decay=0 must stay inf, not become NaN from 0 * inf); step 2 with finite grads, so the
    poisoned state of step 1 is an input too."""
    require(backend, device, dtype)
    lists = make_lists(SIZES, dtype, device, centered=options["centered"], momentum=options["momentum"], seed=1)
    for t in lists[where]:
        plant(t, [math.nan, math.inf, -math.inf])
    ours, theirs = clone_lists(lists), clone_lists(lists)
    fused_step(ours, backend, **options)
    torch_step(theirs, **options)
    assert_lists_match_torch(ours, theirs)

    gen = torch.Generator().manual_seed(2)
    for i, g in enumerate(lists["grads"]):
        fresh = torch.randn(g.shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        ours["grads"][i], theirs["grads"][i] = fresh.clone(), fresh.clone()
    fused_step(ours, backend, **options)
    torch_step(theirs, **options)
    assert_lists_match_torch(ours, theirs, steps=2)


# Big enough that (1 - alpha) * g * g overflows the arithmetic type (float32 for bf16 params).
HUGE = {torch.float64: 1e200, torch.float32: 1e30, torch.bfloat16: 1e30}


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", list(HUGE), ids=str)
@pytest.mark.parametrize("options", TORCH_OPTIONS, ids=option_id)
def test_a_finite_grad_whose_square_overflows_acts_like_torch(backend, device, dtype, options):
    """An exploding but finite gradient: square_avg overflows to +inf. torch then divides by
    sqrt(inf) and leaves the element where it is (no NaN). Centered, torch computes
    square_avg.addcmul(grad_avg, grad_avg, value=-1), and ATen's AVX2/AVX-512 kernels evaluate it
    as ONE fused multiply-add: inf - (m*m exact) = inf even when m*m alone overflows. Two roundings
    (m*m -> inf, then inf - inf) give NaN instead, and the NaN spreads to param and buffer.
    (With ATEN_CPU_CAPABILITY=default, torch's own kernels round twice and give NaN too.)"""
    require(backend, device, dtype)
    # torch's centered variance is one fused multiply-add only where its kernels fuse: ATen's
    # AVX2/AVX-512 CPU kernels do; with ATEN_CPU_CAPABILITY=default, and maybe on CUDA, torch
    # rounds twice and gives NaN itself. The fused backends always give torch's fused answer.
    torch_rounds_twice = options["centered"] and (
        device != "cpu" or torch.backends.cpu.get_cpu_capability() == "DEFAULT")
    lists = make_lists(SIZES, dtype, device, centered=options["centered"], momentum=options["momentum"], seed=3)
    for t in lists["grads"]:
        plant(t, [HUGE[dtype], -HUGE[dtype]])
    ours, theirs = clone_lists(lists), clone_lists(lists)
    fused_step(ours, backend, **options)
    torch_step(theirs, **options)
    # bf16: torch rounds every intermediate to bf16, we round once; only the pattern is comparable.
    if not torch_rounds_twice:
        assert_lists_match_torch(ours, theirs, compare_finite=dtype != torch.bfloat16)
    for t in ours["params"]:
        assert not torch.isnan(t).any()


# --------------------------------------------------------------------------------- found_inf

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
FULL_OPTIONS = dict(centered=True, momentum=0.9, weight_decay=0.1)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("flag", [1.0, 2.0, math.nan], ids=["1", "2", "nan"])
def test_nonzero_found_inf_changes_nothing_at_all(backend, device, dtype, flag):
    """GradScaler sums the per-device flags (so 2.0 happens), and a NaN flag must skip too: any
    nonzero value means skip. The grads hold the infs that made AMP set the flag, and are NOT
    unscaled in place either: GradScaler will rescale and retry with the same .grad tensors."""
    require(backend, device, dtype)
    lists = make_lists(SIZES, dtype, device, centered=True, momentum=0.9, seed=4)
    scale = torch.tensor(1024.0, device=device)
    for g in lists["grads"]:
        g.mul_(scale)  # what GradScaler's scaled backward leaves in .grad
    plant(lists["grads"][0], [math.inf, -math.inf, math.nan])
    before = Snapshot.of_lists(lists)
    fused_step(lists, backend, grad_scale=scale, found_inf=torch.tensor(flag, device=device), **FULL_OPTIONS)
    before.assert_unchanged(Snapshot.of_lists(lists))

    # The control: with found_inf == 0 the same call does write (so the check above can fail).
    fused_step(lists, backend, grad_scale=scale, found_inf=torch.tensor(0.0, device=device), **FULL_OPTIONS)
    after = Snapshot.of_lists(lists)
    assert all(not torch.equal(before.bits[f"params[{i}]"], after.bits[f"params[{i}]"]) for i in range(len(SIZES)))


def trained(backend, device, dtype=torch.float32):
    torch.manual_seed(5)
    params = [nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in ((4, 3), (5,), (2, 2))]
    opt = FusedRMSprop([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], backend=backend, **FULL_OPTIONS)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return opt, params


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("flag", [1.0, 2.0, math.nan], ids=["1", "2", "nan"])
def test_optimizer_with_nonzero_found_inf_changes_nothing_not_even_the_step_count(backend, device, flag):
    require(backend, device, torch.float32)
    opt, params = trained(backend, device)
    params[2].grad[0, 0] = math.inf
    opt.grad_scale = torch.tensor(1024.0, device=device)  # what GradScaler.step sets
    opt.found_inf = torch.tensor(flag, device=device)
    before = Snapshot.of_optimizer(opt)
    opt.step()
    before.assert_optimizer_unchanged(opt)
    assert all(opt.state[p]["step"].item() == 1 for p in params)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_a_skipped_first_step_creates_zero_state_at_step_0_and_changes_no_param(backend, device):
    """README, AMP: a nonzero found_inf on the very first step (GradScaler's first scale often
    overflows) still runs step(), which creates the state as torch's fused Adam does: zeros (the
    initial square_avg), step 0; the params and grads are untouched."""
    require(backend, device, torch.float32)
    torch.manual_seed(fresh_seed())
    params = [nn.Parameter(torch.randn(3, 4, device=device)), nn.Parameter(torch.randn(5, device=device))]
    opt = FusedRMSprop(params, momentum=0.9, centered=True, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p) * 1024
    params[1].grad[2] = math.inf
    opt.grad_scale = torch.tensor(1024.0, device=device)
    opt.found_inf = torch.tensor(1.0, device=device)
    before = [(p.detach().clone(), p.grad.clone()) for p in params]
    opt.step()
    for p, (value, grad) in zip(params, before):
        assert torch.equal(p, value) and torch.equal(p.grad, grad)
        state = opt.state[p]
        assert state["step"].item() == 0
        assert all(bool((state[k] == 0).all()) for k in ("square_avg", "grad_avg", "momentum_buffer"))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_grad_scaler_skips_an_overflowing_step_and_then_matches_torch(backend, device):
    """The real torch.amp.GradScaler drives both optimizers: the step whose grads overflow is
    skipped entirely by ours (bitwise) and by torch's; the scale halves in both; the next step
    (unscaled inside our fused update, by a separate pass in torch's) agrees within tolerance."""
    require(backend, device, torch.float32)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).to(device)
    twin = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).to(device)
    twin.load_state_dict(model.state_dict())
    ours = FusedRMSprop(model.parameters(), lr=1e-2, momentum=0.9, centered=True, backend=backend)
    theirs = torch.optim.RMSprop(twin.parameters(), lr=1e-2, momentum=0.9, centered=True, foreach=False)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**10), torch.amp.GradScaler(device, init_scale=2.0**10)]
    x, y = torch.randn(8, 5, device=device), torch.randn(8, 1, device=device)
    for iteration in range(3):
        snapshots = []
        for net, opt, scaler in ((model, ours, scalers[0]), (twin, theirs, scalers[1])):
            opt.zero_grad()
            scaler.scale(((net(x) - y) ** 2).mean()).backward()
            if iteration == 1:  # an overflow in one grad: the whole step must be skipped
                next(net.parameters()).grad[0, 0] = math.inf
            snapshots.append(Snapshot.of_optimizer(opt))
            scaler.step(opt)
            scaler.update()
        if iteration == 1:
            snapshots[0].assert_optimizer_unchanged(ours)
            assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**9
        for a, b in zip(model.parameters(), twin.parameters()):
            assert_close(a.detach(), b.detach(), steps=iteration + 1, name=f"iteration {iteration}")


# ------------------------------------------------------------------- fp16 / bf16: no NaN, ever

F16_MAX = 65504.0


def special_grads(n: int, dtype) -> torch.Tensor:
    """Finite gradients that stress the arithmetic: the largest fp16 values, zeros, the smallest
    subnormal and normal of the dtype, values near 1, and ordinary random ones."""
    info = torch.finfo(dtype)
    values = [F16_MAX, -F16_MAX, 0.0, -0.0, info.smallest_normal, -info.smallest_normal,
              info.smallest_normal * 2.0**-(7 if dtype == torch.bfloat16 else 10),  # smallest subnormal
              1e-4, -1e-4, 1.0, -1.0]
    g = torch.randn(n, dtype=torch.float64).to(dtype)
    g[: len(values)] = torch.tensor(values, dtype=torch.float64).to(dtype)
    return g


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", OPTION_MATRIX, ids=option_id)
def test_half_precision_finite_grads_never_make_nan(backend, device, dtype, options):
    """Three steps with eps=1e-8 from a fresh state (zeros, what the optimizer creates) and from a
    trained one, for every option combination; plus an all-zero gradient (torch's fp16 NaN case).
    Params must stay finite; state must hold no NaN (square_avg may overflow to inf for
    |g| ~ 65504 in fp16: the element then stops moving, which is torch's behaviour too)."""
    require(backend, device, dtype)
    n = 64
    lists = make_lists([n, n, n], dtype, device, centered=options["centered"], momentum=options["momentum"], seed=7)
    for key in STATE_LISTS:  # tensor 0 and tensor 2 start from a fresh state
        for i in (0, 2):
            if lists[key]:
                lists[key][i].zero_()
    for i in (0, 1):
        lists["grads"][i].copy_(special_grads(n, dtype).to(device))
    lists["grads"][2].zero_()
    lists["params"][1][:4] = torch.tensor([F16_MAX, -F16_MAX, 1e4, -1e4]).to(dtype)  # weight decay meets big params
    for step_index in range(3):
        step(lists, backend, lr=1e-2, eps=1e-8, **options)
        for key in ("params",) + STATE_LISTS:
            for i, t in enumerate(lists[key]):
                assert not torch.isnan(t).any(), f"step {step_index}: NaN in {key}[{i}] at {torch.isnan(t).nonzero().flatten().tolist()}"
        for i, p in enumerate(lists["params"]):
            assert torch.isfinite(p).all(), f"step {step_index}: params[{i}] not finite"

