"""FusedRMSprop in the PyTorch ecosystem: AMP GradScaler, torch.compile, LR schedulers, CUDA
graphs (capturable), hyperparameters changed between steps. DDP / FSDP2 are in
tests/test_distributed.py."""

import copy

import pytest
import torch
from torch import nn

from rmsprop_fused import FusedRMSprop
from common import assert_close, available, clone_lists, fresh_seed, make_lists, step

CPU_BACKENDS = [b for b in ("reference", "cpu", "triton") if available(b)]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16, dtype=dtype), nn.Tanh(), nn.Linear(16, 4, dtype=dtype))


def batches(n, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=gen).to(dtype), torch.randn(16, 4, generator=gen).to(dtype)) for _ in range(n)]


# ---------------------------------------------------------------- AMP


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_scaled_step_equals_unscale_then_step(backend, dtype):
    lists = make_lists([3, 1000], dtype, momentum=0.9, centered=True, seed=1)
    scale = torch.tensor(2.0**12)  # GradScaler's scales are powers of two: unscaling is exact
    scaled, unscaled = clone_lists(lists), clone_lists(lists)
    for g in scaled["grads"]:
        g.mul_(scale)
    step(scaled, backend, momentum=0.9, centered=True, grad_scale=scale)
    step(unscaled, "reference", momentum=0.9, centered=True)
    for key in lists:  # grads included: the unscaled grads are written back
        for a, b in zip(scaled[key], unscaled[key]):
            assert torch.equal(a, b), key  # the same bits: dividing by a power of two is exact


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_trains_like_unscaled_training_and_skips_inf_steps(backend):
    """GradScaler('cpu') hands grad_scale and found_inf to step(); a step whose grads hold an
    inf is skipped entirely (params, state, step count), and the scaler still backs off."""
    model = small_model()
    twin = copy.deepcopy(model)
    ours = FusedRMSprop(model.parameters(), lr=1e-2, momentum=0.9, backend=backend)
    plain = FusedRMSprop(twin.parameters(), lr=1e-2, momentum=0.9, backend="reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for i, (x, y) in enumerate(batches(6)):
        ours.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if i == 3:  # an overflow: this step must change nothing
            model[0].weight.grad[0, 0] = float("inf")
            before = ([p.detach().clone() for p in model.parameters()],
                      {id(p): {k: v.clone() for k, v in s.items()} for p, s in ours.state.items()})
            scale_before = scaler.get_scale()
        scaler.step(ours)
        scaler.update()
        if i == 3:
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before[0]))
            for p, s in ours.state.items():
                assert all(torch.equal(v, before[1][id(p)][k]) for k, v in s.items())
            assert scaler.get_scale() == scale_before / 2
            continue
        plain.zero_grad()
        nn.functional.mse_loss(twin(x), y).backward()
        plain.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert_close(a, b, steps=i + 1)
    assert all(s["step"].item() == 5 for s in ours.state.values())
    assert not hasattr(ours, "grad_scale") and not hasattr(ours, "found_inf")  # GradScaler cleans up


# ---------------------------------------------------------------- torch.compile


def test_compiled_training_step_keeps_the_op_in_one_graph_and_matches_eager():
    model = small_model()
    twin = copy.deepcopy(model)
    compiled_opt = FusedRMSprop(model.parameters(), lr=1e-2, momentum=0.9, centered=True)
    eager_opt = FusedRMSprop(twin.parameters(), lr=1e-2, momentum=0.9, centered=True)

    def train_step(m, opt, x, y):
        opt.zero_grad()
        loss = nn.functional.mse_loss(m(x), y)
        loss.backward()
        opt.step()
        return loss

    probe = copy.deepcopy(model)
    probe_opt = FusedRMSprop(probe.parameters(), lr=1e-2, momentum=0.9, centered=True)
    x, y = batches(1)[0]
    nn.functional.mse_loss(probe(x), y).backward()
    explanation = torch._dynamo.explain(probe_opt.step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert "torch.ops.rmsprop_fused.rmsprop_" in explanation.graphs[0].code

    compiled = torch.compile(train_step)
    for x, y in batches(4):
        loss_c = compiled(model, compiled_opt, x, y)
        loss_e = train_step(twin, eager_opt, x, y)
        assert_close(loss_c.detach(), loss_e.detach(), steps=4)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a, b, steps=4)


def test_a_compiled_step_takes_a_new_float_lr():
    """A float lr is a constant of the compiled graph: a new value in the param group must
    recompile (a guard on it), not replay the old one; the compiled step stays the eager one."""
    torch.manual_seed(fresh_seed())
    p = nn.Parameter(torch.randn(8))
    q = nn.Parameter(p.detach().clone())
    compiled_opt, eager_opt = FusedRMSprop([p], lr=0.01), FusedRMSprop([q], lr=0.01)
    compiled_step = torch.compile(compiled_opt.step)
    for i in range(4):
        p.grad = torch.randn(8)
        q.grad = p.grad.clone()
        if i == 2:
            compiled_opt.param_groups[0]["lr"] = eager_opt.param_groups[0]["lr"] = 0.1
        compiled_step()
        eager_opt.step()
        assert torch.equal(p, q), f"step {i}"  # (at lr 0.01 the step would have moved p a tenth as far)


# ---------------------------------------------------------------- LR schedulers


def _schedulers(opt, name):
    if name == "StepLR":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    if name == "OneCycleLR":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    if name == "CosineAnnealingLR-tensor-lr":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    raise ValueError(name)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("name", ["StepLR", "OneCycleLR", "CosineAnnealingLR-tensor-lr"])
def test_lr_schedulers_give_torchs_trajectory(backend, name):
    model = small_model(torch.float64)
    twin = copy.deepcopy(model)
    lr = torch.tensor(0.01, dtype=torch.float64) if "tensor" in name else 0.01
    ours = FusedRMSprop(model.parameters(), lr=lr, momentum=0.9, backend=backend)
    theirs = torch.optim.RMSprop(twin.parameters(), lr=lr.clone() if isinstance(lr, torch.Tensor) else lr, momentum=0.9, foreach=False)
    sched_ours, sched_theirs = _schedulers(ours, name), _schedulers(theirs, name)
    lrs = []
    for x, y in batches(10, torch.float64):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
        sched_ours.step()
        sched_theirs.step()
        lrs.append(float(ours.param_groups[0]["lr"]))
        assert float(ours.param_groups[0]["lr"]) == float(theirs.param_groups[0]["lr"])
    assert len(set(lrs)) > 2, "the schedule must actually change the lr"
    if "tensor" in name:
        assert isinstance(ours.param_groups[0]["lr"], torch.Tensor)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- capturable / CUDA graphs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_capturable_tensor_lr_is_read_from_the_tensor(backend):
    """The arithmetic of the capturable path on the CPU: a tensor lr living with the params is
    read when the step runs (as a replayed graph does), and changing it in place takes effect."""
    model = small_model()
    twin = copy.deepcopy(model)
    lr = torch.tensor(0.01)
    ours = FusedRMSprop(model.parameters(), lr=lr, momentum=0.9, capturable=True, backend=backend)
    floats = FusedRMSprop(twin.parameters(), lr=0.01, momentum=0.9, backend=backend)
    for i, (x, y) in enumerate(batches(4)):
        if i == 2:
            lr.fill_(0.03)  # what a scheduler does to a tensor lr between replays
            floats.param_groups[0]["lr"] = 0.03
        for m, opt in ((model, ours), (twin, floats)):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_capture_refuses_a_tensor_lr_on_another_device(monkeypatch):
    """A graph captured with the lr read on the host would replay that lr forever: refused while
    capturing (simulated here; the real capture is tested on a GPU), accepted otherwise."""
    import rmsprop_fused.optimizer

    p = nn.Parameter(torch.randn(3))
    opt = FusedRMSprop([p], lr=torch.tensor(0.01), capturable=True)
    opt.param_groups[0]["lr"] = torch.tensor(0.01, device="meta")  # a CPU-only machine's "other device"
    p.grad = torch.randn(3)
    before = p.detach().clone()
    monkeypatch.setattr(rmsprop_fused.optimizer, "_capturing_cuda_graph", lambda: True)
    with pytest.raises(ValueError, match="a CUDA graph is being captured, but lr is a tensor on meta"):
        opt.step()
    assert torch.equal(p, before) and len(opt.state) == 0


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_step_is_captured_in_a_cuda_graph_and_replays(backend):
    if not available(backend, "cuda"):
        pytest.skip(f"backend {backend!r} is not available on this GPU")
    model = small_model().cuda()
    twin = copy.deepcopy(model)
    lr = torch.tensor(0.01, device="cuda")
    opt = FusedRMSprop(model.parameters(), lr=lr, momentum=0.9, capturable=True, backend=backend)
    eager = FusedRMSprop(twin.parameters(), lr=torch.tensor(0.01, device="cuda"), momentum=0.9, capturable=True, backend=backend)
    static_x, static_y = (t.cuda() for t in batches(1)[0])

    def train_step(m, o, x, y):
        o.zero_grad(set_to_none=False)
        nn.functional.mse_loss(m(x), y).backward()
        o.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream creates the state
        for _ in range(3):
            train_step(model, opt, static_x, static_y)
            train_step(twin, eager, static_x, static_y)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt, static_x, static_y)
    for i, (x, y) in enumerate(batches(5)):
        if i == 3:
            lr.fill_(0.05)
            eager.param_groups[0]["lr"].fill_(0.05)
        static_x.copy_(x.cuda()), static_y.copy_(y.cuda())
        graph.replay()
        train_step(twin, eager, static_x, static_y)
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a, b, steps=8)


# ---------------------------------------------------------------- alpha changed between steps


@pytest.mark.parametrize("backend, device", [(b, "cpu") for b in CPU_BACKENDS]
                         + [pytest.param(b, "cuda", marks=requires_cuda) for b in ("cuda", "triton")])
@pytest.mark.parametrize("centered, momentum", [(False, 0.0), (True, 0.9)], ids=["plain", "centered-momentum"])
def test_alpha_changed_between_steps_takes_effect_at_once_as_in_torch(backend, device, centered, momentum):
    """A gamma schedule (examples/d2l_rmsprop.py, exercise 4) writes alpha into the param groups
    between steps; torch.optim.RMSprop reads it at every step, and so must every backend."""
    if not available(backend, device):
        pytest.skip(f"backend {backend!r} is not available on {device}")
    gen = torch.Generator().manual_seed(fresh_seed())
    shapes = [(7, 3), (130,), (5,)]
    start = [torch.randn(shape, generator=gen) for shape in shapes]
    grads = [[torch.randn(shape, generator=gen) for shape in shapes] for _ in range(6)]
    ours_params = [p.to(device).requires_grad_() for p in start]
    torch_params = [p.to(device).requires_grad_() for p in start]

    def groups(params):
        return [{"params": params[:2]}, {"params": params[2:], "alpha": 0.5}]

    kwargs = dict(lr=1e-2, alpha=0.99, momentum=momentum, centered=centered)
    ours = FusedRMSprop(groups(ours_params), backend=backend, **kwargs)
    theirs = torch.optim.RMSprop(groups(torch_params), foreach=False, **kwargs)
    for t, step_grads in enumerate(grads, 1):
        for optimizer, params in ((ours, ours_params), (theirs, torch_params)):
            # rising as in the example's schedule, whose first alpha, 0, would make the centered
            # variance g^2 - g^2: zero, or NaN after a rounding below it
            optimizer.param_groups[0]["alpha"] = 1 - (t + 1) ** -0.8
            optimizer.param_groups[1]["alpha"] = 0.9 if t % 2 else 0.3
            for p, g in zip(params, step_grads):
                p.grad = g.to(device)
            optimizer.step()
        for a, b in zip(ours_params, torch_params):
            assert_close(a, b, steps=t, name=f"param after step {t}")
            for key, value in theirs.state[b].items():
                if key != "step":
                    assert_close(ours.state[a][key], value, steps=t, name=f"{key} after step {t}")
