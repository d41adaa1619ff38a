"""Clipping by global norm inside the fused step (max_grad_norm, norm_type, error_if_nonfinite):
the same trajectory as torch.nn.utils.clip_grad_norm_ followed by torch.optim.RMSprop, whether or
not a step clips, with AMP, under torch.compile, and with the pre-clip norm kept for logging.
(Several devices and FSDP2: tests/test_distributed.py and the GPU tests.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rmsprop_fused import FusedRMSprop
from rmsprop_fused import clipping
from common import assert_close, available, fresh_seed
from reliability_common import BACKEND_DEVICES, Snapshot, require

STEPS = 8


def _model(dtype, device, seed):
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(s, dtype=dtype, device=device)) for s in ((6, 5), (5,), (3, 6))]


def _grads(params, scale, gen):
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * scale for p in params]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0], ids=["l2", "inf", "l1"])
def test_same_trajectory_as_clip_grad_norm_then_torch_rmsprop(backend, device, norm_type):
    """Grads drawn large and small, so that some steps clip and some do not; two param groups
    (the norm spans both). float64, except for Triton (float32)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    require(backend, device, dtype)
    seed = fresh_seed()
    max_norm = 2.0
    ours, theirs = _model(dtype, device, seed), _model(dtype, device, seed)
    options = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)
    fused = FusedRMSprop([{"params": ours[:2]}, {"params": ours[2:], "lr": 3e-2}], max_grad_norm=max_norm,
                         norm_type=norm_type, backend=backend, **options)
    reference = torch.optim.RMSprop([{"params": theirs[:2]}, {"params": theirs[2:], "lr": 3e-2}], **options)
    gen = torch.Generator().manual_seed(seed)
    clipped = 0
    for step in range(STEPS):
        grads = _grads(ours, 3.0 if step % 2 else 0.005, gen)
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        total = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=norm_type)
        clipped += bool(total > max_norm)
        fused.step()
        reference.step()
        assert_close(fused.grad_norm.to(total.dtype), total, steps=1)
        for a, g in zip(ours, grads):
            assert torch.equal(a.grad, g)  # not rewritten: the step applies the coefficient as it reads
    assert 0 < clipped < STEPS
    for a, b in zip(ours, theirs):
        assert_close(a.detach(), b.detach(), steps=STEPS)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_amp_norm_of_scaled_grads_is_the_unscaled_norm(backend, device):
    """Under GradScaler the grads hold scaled values: the norm divided by the scale is the norm
    torch's unscale_ + clip_grad_norm_ computes, with no unscaling pass; a found_inf skip leaves
    everything as it was (params, grads, state, counters)."""
    require(backend, device, torch.float32)
    seed = fresh_seed()
    ours, theirs = _model(torch.float32, device, seed), _model(torch.float32, device, seed)
    fused = FusedRMSprop(ours, lr=1e-2, momentum=0.9, max_grad_norm=1.0, backend=backend)
    reference = torch.optim.RMSprop(theirs, lr=1e-2, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor(1024.0, device=device)
    for _ in range(3):
        grads = _grads(ours, 2.0, gen)
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g * scale, g.clone()
        fused.grad_scale, fused.found_inf = scale, torch.zeros((), device=device)
        fused.step()
        del fused.grad_scale, fused.found_inf
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        reference.step()
    for a, b in zip(ours, theirs):
        assert_close(a.detach(), b.detach(), steps=3)
    for p in ours:
        p.grad = torch.full_like(p, math.inf)
    fused.grad_scale, fused.found_inf = scale, torch.ones((), device=device)
    before = Snapshot.of_optimizer(fused)
    fused.step()
    before.assert_optimizer_unchanged(fused)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_error_if_nonfinite_raises_before_anything_changes(backend, device, bad):
    require(backend, device, torch.float32)
    params = _model(torch.float32, device, fresh_seed())
    opt = FusedRMSprop(params, momentum=0.9, max_grad_norm=1.0, error_if_nonfinite=True, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    params[2].grad[1, 1] = bad
    before = Snapshot.of_optimizer(opt)
    with pytest.raises(RuntimeError, match="The total norm of order 2.0 for gradients from `parameters` is non-finite"):
        opt.step()
    before.assert_optimizer_unchanged(opt)
    # without the flag the step goes through, as clip_grad_norm_ would scale by a NaN coefficient
    opt.error_if_nonfinite = False
    opt.step()
    if math.isnan(bad):
        assert torch.isnan(opt.grad_norm) and bool(torch.isnan(params[0]).all())
    else:  # coefficient max_norm / inf = 0: the inf grad times 0 is NaN, every other grad 0
        assert torch.isinf(opt.grad_norm) and torch.isnan(params[2][1, 1]) and bool(torch.isfinite(params[0]).all())


def test_the_norm_is_a_device_tensor_read_by_no_one():
    """grad_norm is the 0-d tensor of the step, kept for logging: reading it is the user's sync."""
    params = _model(torch.float32, "cpu", fresh_seed())
    opt = FusedRMSprop(params, max_grad_norm=0.5)
    assert opt.grad_norm is None
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    expected = math.sqrt(sum(p.numel() for p in params))
    assert opt.grad_norm.shape == () and abs(float(opt.grad_norm) - expected) < 1e-5 * expected


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_empty_grads_add_nothing_to_the_norm(norm_type, monkeypatch):
    """An FSDP2 rank's shard of a small param can be empty: torch._foreach_norm refuses an empty
    tensor for the inf norm, so empty grads are left out (their norm is 0), on the extension's path
    and on torch's (monkeypatched off the extension), and a rank with only empty shards has norm 0."""
    grads = [torch.zeros(0), torch.tensor([3.0, -4.0]), torch.zeros(0, 5)]
    expected = 4.0 if math.isinf(norm_type) else 5.0
    assert float(clipping.grad_norm(grads, norm_type)) == expected
    monkeypatch.setattr(clipping, "_cpu_norm_available", lambda: False)
    assert float(clipping.grad_norm(grads, norm_type)) == expected
    assert float(clipping.grad_norm([torch.zeros(0)], norm_type)) == 0.0


def test_16_bit_grads_are_normed_in_float32():
    """torch's norm of float16 grads is a float16 number, inf above 65504; the clip coefficient
    then rounds every grad to zero. Here the norms are taken in float32."""
    p = nn.Parameter(torch.zeros(4096, dtype=torch.float16))
    p.grad = torch.full((4096,), 2000.0, dtype=torch.float16)  # norm 128000
    assert clipping.grad_norm([p.grad]).dtype == torch.float32
    assert abs(float(clipping.grad_norm([p.grad])) - 128000.0) < 1.0
    opt = FusedRMSprop([p], lr=1.0, max_grad_norm=1.0)
    opt.step()
    assert bool(torch.isfinite(p).all()) and bool((p != 0).all())


# The CPU norm (the extension's total_norm) sums in float64 and rounds once; torch sums float32
# in float32 (a cascade: a relative error of about log2(n) ulps for n elements), so the two agree
# to 32 float32 ulps (n <= 2^17 here); float64 to 64 ulps.
_NORM_RTOL = {torch.float32: 32 * torch.finfo(torch.float32).eps, torch.float64: 64 * torch.finfo(torch.float64).eps}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf], ids=["l2", "l1", "l3.5", "inf"])
def test_cpu_total_norm_matches_torch(dtype, norm_type):
    """Small tensors summed by the extension, large and non-contiguous ones by torch's op, all in
    one norm: torch.nn.utils.get_total_norm's value (its 16-bit norms taken in float32)."""
    if not available("cpu"):
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(fresh_seed())
    shapes = [(1,), (7, 5), (4095,), (4096,), (300, 400), (3,)]
    grads = [(torch.randn(s, generator=gen, dtype=torch.float64) * 3).to(dtype) for s in shapes]
    grads.append((torch.randn(40, 30, generator=gen, dtype=torch.float64)).to(dtype).t())  # not contiguous
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.nn.utils.get_total_norm([g.to(accumulate) for g in grads], norm_type)
    actual = clipping.grad_norm(grads, norm_type)
    assert actual.dtype == accumulate and actual.shape == ()
    torch.testing.assert_close(actual, expected, rtol=_NORM_RTOL[accumulate], atol=0)
    for bad, in_small in ((math.nan, True), (math.nan, False), (math.inf, True), (math.inf, False)):
        poisoned = [g.clone() for g in grads]
        poisoned[0 if in_small else 4].view(-1)[0] = bad  # one element: the norm is NaN / inf
        norm = float(clipping.grad_norm(poisoned, norm_type))
        assert (math.isnan(norm) if math.isnan(bad) else norm == math.inf), (bad, in_small, norm)


def test_clipping_under_torch_compile_matches_eager():
    seed = fresh_seed()
    compiled_params, eager_params = _model(torch.float32, "cpu", seed), _model(torch.float32, "cpu", seed)
    compiled_opt = FusedRMSprop(compiled_params, momentum=0.9, max_grad_norm=0.5)
    eager_opt = FusedRMSprop(eager_params, momentum=0.9, max_grad_norm=0.5)

    @torch.compile
    def compiled_step():
        compiled_opt.step()

    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        grads = _grads(compiled_params, 1.0, gen)
        for a, b, g in zip(compiled_params, eager_params, grads):
            a.grad, b.grad = g.clone(), g.clone()
        compiled_step()
        eager_opt.step()
    for a, b in zip(compiled_params, eager_params):
        assert_close(a.detach(), b.detach(), steps=3)
    explanation = torch._dynamo.explain(compiled_opt.step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_params_on_the_gpu_and_the_cpu_share_one_norm():
    """clip_grad_norm_ over params on several devices takes one total norm on the first grad's
    device; so does the fused step."""
    seed = fresh_seed()
    ours = [nn.Parameter(torch.randn(5, device="cuda")), nn.Parameter(torch.randn(7))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    fused = FusedRMSprop(ours, lr=1e-2, max_grad_norm=1.0)
    reference = torch.optim.RMSprop(theirs, lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen).to(a.device) * 3
            a.grad, b.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        fused.step()
        reference.step()
    assert fused.grad_norm.device.type == "cuda"
    for a, b in zip(ours, theirs):
        assert_close(a.detach(), b.detach(), steps=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_clipped_step_captured_in_a_cuda_graph():
    """No host sync: the norm, the coefficient and the step replay from a CUDA graph."""
    params = [nn.Parameter(torch.randn(1000, device="cuda")) for _ in range(3)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    lr = torch.tensor(1e-2, device="cuda")
    opt = FusedRMSprop(params, lr=lr, momentum=0.9, capturable=True, max_grad_norm=1.0)
    eager = FusedRMSprop(twins, lr=1e-2, momentum=0.9, max_grad_norm=1.0)
    for p, t in zip(params, twins):
        p.grad = torch.randn_like(p)
        t.grad = p.grad.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # warm-up: creates the state
    torch.cuda.current_stream().wait_stream(side)
    eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        for p, t in zip(params, twins):
            p.grad.copy_(torch.randn_like(p) * 5)
            t.grad.copy_(p.grad)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, t in zip(params, twins):
        assert torch.equal(p, t)
