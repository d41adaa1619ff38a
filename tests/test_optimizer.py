"""FusedRMSprop against torch.optim.RMSprop (its for-loop path) and against hand-written loops
of the TF / Keras / d2l / timm variants; state_dict compatibility; options and errors."""

import copy

import re

import pytest
import torch
from torch import nn

import rmsprop_fused
from rmsprop_fused import FusedRMSprop, _extension
from common import assert_close, available, fresh_seed

# The configurations torch's own test suite uses for RMSprop (torch/testing/_internal/
# common_optimizers.py, optim_inputs_func_rmsprop), plus momentum alone.
TORCH_CONFIGS = {
    "default": {},
    "lr": dict(lr=1e-3),
    "weight_decay": dict(weight_decay=0.1),
    "maximize": dict(maximize=True),
    "weight_decay-centered": dict(weight_decay=0.1, centered=True),
    "maximize-weight_decay": dict(maximize=True, weight_decay=0.1),
    "weight_decay-centered-momentum": dict(weight_decay=0.1, centered=True, momentum=0.1),
    "maximize-weight_decay-centered-momentum": dict(maximize=True, weight_decay=0.1, centered=True, momentum=0.1),
    "tensor_lr": dict(lr=torch.tensor(1e-3)),
    "momentum": dict(momentum=0.9),
}
CPU_BACKENDS = [b for b in ("reference", "cpu", "triton") if available(b)]
STEPS = 12
# The size of the updates these tests' steps make, which torch rounds at whatever the param's size:
# lr 0.01-0.02 times g / sqrt(v) (10 on a first step, from v = 0.01 g**2) or a momentum buffer of
# such terms: of order 1. The float64 comparisons with torch take their ulps at it.
UPDATE_MAGNITUDE = 1.0


class SmallModel(nn.Module):
    """An MLP plus the awkward cases: a zero-size param and a param whose grad is None on odd steps."""

    def __init__(self, dtype):
        super().__init__()
        self.hidden = nn.Linear(6, 5, dtype=dtype)
        self.out = nn.Linear(5, 3, dtype=dtype)
        self.empty = nn.Parameter(torch.empty(0, 4, dtype=dtype))
        self.sometimes = nn.Parameter(torch.randn(4, dtype=dtype))

    def forward(self, x, step):
        y = self.out(torch.tanh(self.hidden(x)))
        loss = y.square().mean() + self.empty.sum()
        if step % 2 == 0:
            loss = loss + (self.sometimes * y[:, :1].mean()).sum()
        return loss


def param_groups(model, config):
    """Several groups with different options: the group-level overrides differ from the defaults."""
    return [
        {"params": [model.hidden.weight, model.hidden.bias, model.empty]},
        {"params": [model.out.weight, model.out.bias], "lr": 0.02, "alpha": 0.9},
        {"params": [model.sometimes], "momentum": 0.5, "centered": not config.get("centered", False)},
    ]


def train(model, optimizer, steps, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64).to(dtype)
        optimizer.zero_grad()
        model(x, step).backward()
        if step % 2 == 1:
            model.sometimes.grad = None
        optimizer.step()
        yield step


def make_pair(config, dtype, backend, seed=0):
    torch.manual_seed(seed)
    model = SmallModel(dtype)
    twin = copy.deepcopy(model)
    ours = FusedRMSprop(param_groups(model, config), backend=backend, **config)
    theirs = torch.optim.RMSprop(param_groups(twin, config), foreach=False, **config)
    return model, ours, twin, theirs


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("name", TORCH_CONFIGS)
def test_float64_matches_torch_to_a_few_ulps_a_step(name, backend):
    model, ours, twin, theirs = make_pair(TORCH_CONFIGS[name], torch.float64, backend)
    for step, _ in zip(train(model, ours, STEPS, torch.float64), train(twin, theirs, STEPS, torch.float64)):
        for a, b in zip(model.parameters(), twin.parameters()):
            assert_close(a.detach(), b.detach(), steps=step + 1, magnitude=UPDATE_MAGNITUDE)
    for a, b in zip(model.parameters(), twin.parameters()):
        for key, value in theirs.state[b].items():
            assert_close(ours.state[a][key].cpu(), value.cpu(), steps=STEPS, name=key)
    assert ours.state[model.sometimes]["step"].item() == STEPS // 2
    assert model.empty not in ours.state or ours.state[model.empty]["square_avg"].numel() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", TORCH_CONFIGS)
def test_float32_matches_torch_within_ulps_per_step(name, backend):
    model, ours, twin, theirs = make_pair(TORCH_CONFIGS[name], torch.float32, backend)
    for step in zip(train(model, ours, STEPS, torch.float32), train(twin, theirs, STEPS, torch.float32)):
        for a, b in zip(model.parameters(), twin.parameters()):
            assert_close(a, b, steps=step[0] + 1, name=f"step {step[0]}")


def test_state_keys_and_types_are_torchs():
    model, ours, twin, theirs = make_pair(dict(centered=True, momentum=0.9), torch.float32, "auto")
    for _ in zip(train(model, ours, 2, torch.float32), train(twin, theirs, 2, torch.float32)):
        pass
    for a, b in zip(model.parameters(), twin.parameters()):
        assert set(ours.state[a]) == set(theirs.state[b])
        step = ours.state[a]["step"]
        assert step.dtype == torch.float32 and step.dim() == 0
    plain = FusedRMSprop([nn.Parameter(torch.randn(3))])
    plain.param_groups[0]["params"][0].grad = torch.randn(3)
    plain.step()
    assert set(next(iter(plain.state.values()))) == {"step", "square_avg"}


# ---------------------------------------------------------------- variants vs hand-written loops


def run_fused(p0, grads, **options):
    p = nn.Parameter(p0.clone())
    opt = FusedRMSprop([p], **options)
    trajectory = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        trajectory.append(p.detach().clone())
    return trajectory


def draw(n_steps, shape=(7,), seed=0):
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    return p0, [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n_steps)]


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_d2l_from_scratch_rmsprop(backend):
    """d2l 12.8: s = gamma*s + (1-gamma)*g**2; p -= lr*g/sqrt(s+eps)."""
    lr, gamma, eps = 0.01, 0.9, 1e-6
    p0, grads = draw(20)
    ours = run_fused(p0, grads, lr=lr, alpha=gamma, eps=eps, eps_in_sqrt=True, backend=backend)
    p, s = p0.clone(), torch.zeros_like(p0)
    for k, (g, got) in enumerate(zip(grads, ours)):
        s = gamma * s + (1 - gamma) * g**2
        p = p - lr * g / torch.sqrt(s + eps)
        assert_close(got, p, steps=k + 1)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("initial_scale", [0.0, 1.0], ids=["keras", "tf1"])
def test_tf1_and_keras_formula(backend, centered, initial_scale):
    """TF1 RMSPropOptimizer (ms starts at ones) and Keras 3 RMSprop (starts at zeros):
    ms = rho*ms + (1-rho)*g^2; [mg = rho*mg + (1-rho)*g; den = ms - mg^2 + eps]; mom = momentum*mom + lr*g/sqrt(den); p -= mom."""
    lr, rho, momentum, eps = 0.001, 0.9, 0.9, 1e-7
    p0, grads = draw(25, seed=1)
    ours = run_fused(p0, grads, lr=lr, alpha=rho, eps=eps, momentum=momentum, centered=centered,
                     eps_in_sqrt=True, initial_scale=initial_scale, lr_in_momentum=True, backend=backend)
    p, ms, mg, mom = p0.clone(), torch.full_like(p0, initial_scale), torch.zeros_like(p0), torch.zeros_like(p0)
    for k, (g, got) in enumerate(zip(grads, ours)):
        ms = rho * ms + (1 - rho) * g * g
        den = ms + eps
        if centered:
            mg = rho * mg + (1 - rho) * g
            den = ms - mg * mg + eps
        mom = momentum * mom + lr * g / torch.sqrt(den)
        p = p - mom
        assert_close(got, p, steps=k + 1)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_timm_rmsproptf_defaults(backend, momentum):
    """timm's RMSpropTF(lr=1e-2, alpha=0.9, eps=1e-10, weight_decay, momentum), its update written
    as timm writes it: square_avg starts at ones, v += (1-alpha)*(g^2 - v), avg = sqrt(v + eps),
    buf = momentum*buf + lr*g/avg (lr_in_momentum), p -= buf; coupled weight decay."""
    lr, alpha, eps, wd = 1e-2, 0.9, 1e-10, 0.01
    p0, grads = draw(25, seed=2)
    ours = run_fused(p0, grads, lr=lr, alpha=alpha, eps=eps, weight_decay=wd, momentum=momentum,
                     eps_in_sqrt=True, initial_scale=1.0, lr_in_momentum=True, backend=backend)
    p, v, buf = p0.clone(), torch.ones_like(p0), torch.zeros_like(p0)
    for k, (g, got) in enumerate(zip(grads, ours)):
        g = g + wd * p
        v = v + (1 - alpha) * (g * g - v)
        avg = torch.sqrt(v + eps)
        if momentum > 0:
            buf = momentum * buf + lr * g / avg
            p = p - buf
        else:
            p = p - lr * g / avg
        assert_close(got, p, steps=k + 1)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("centered", [False, True])
def test_timm_rmsproptf_decoupled_decay(backend, centered):
    """timm RMSpropTF(decoupled_decay=True), timm/optim/rmsprop_tf.py _single_tensor_rmsprop_tf
    (timm 1.0): param.mul_(1 - lr * weight_decay) before the update (wd_scale = lr, no
    corrected_weight_decay), square_avg.add_(grad**2 - square_avg, alpha=1 - alpha),
    grad_avg.add_(grad - grad_avg, alpha=1 - alpha), avg = sqrt(square_avg - grad_avg**2 + eps),
    buf = momentum * buf + lr * grad / avg (lr_in_momentum), param -= buf."""
    lr, alpha, eps, wd, momentum = 1e-2, 0.9, 1e-10, 0.05, 0.9
    p0, grads = draw(25, seed=3)
    ours = run_fused(p0, grads, lr=lr, alpha=alpha, eps=eps, weight_decay=wd, momentum=momentum, centered=centered,
                     eps_in_sqrt=True, initial_scale=1.0, lr_in_momentum=True, decoupled_weight_decay=True,
                     backend=backend)
    p, v, m, buf = p0.clone(), torch.ones_like(p0), torch.zeros_like(p0), torch.zeros_like(p0)
    for k, (g, got) in enumerate(zip(grads, ours)):
        p = p * (1.0 - lr * wd)
        v = v + (1 - alpha) * (g * g - v)
        if centered:
            m = m + (1 - alpha) * (g - m)
            avg = torch.sqrt(v - m * m + eps)
        else:
            avg = torch.sqrt(v + eps)
        buf = momentum * buf + lr * g / avg
        p = p - buf
        assert_close(got, p, steps=k + 1)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("centered", [False, True])
def test_keras3_rmsprop_with_weight_decay(backend, centered):
    """Keras 3 RMSprop(weight_decay=...): keras/src/optimizers/base_optimizer.py
    _apply_weight_decay runs first, variable = variable - variable * wd * lr, then
    keras/src/optimizers/rmsprop.py update_step: velocity = rho * velocity + (1 - rho) * g**2,
    average_grad = rho * average_grad + (1 - rho) * g, denominator = velocity - average_grad**2
    + epsilon, increment = lr * g / sqrt(denominator), momentum = momentum * m + increment,
    variable -= momentum."""
    lr, rho, eps, wd, momentum = 1e-3, 0.9, 1e-7, 0.004, 0.9
    p0, grads = draw(25, seed=4)
    ours = run_fused(p0, grads, lr=lr, alpha=rho, eps=eps, weight_decay=wd, momentum=momentum, centered=centered,
                     eps_in_sqrt=True, lr_in_momentum=True, decoupled_weight_decay=True, backend=backend)
    p, velocity, average_grad, m = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0), torch.zeros_like(p0)
    for k, (g, got) in enumerate(zip(grads, ours)):
        p = p - p * wd * lr
        velocity = rho * velocity + (1 - rho) * g * g
        if centered:
            average_grad = rho * average_grad + (1 - rho) * g
            denominator = velocity - average_grad * average_grad + eps
        else:
            denominator = velocity + eps
        m = momentum * m + lr * g / torch.sqrt(denominator)
        p = p - m
        assert_close(got, p, steps=k + 1)


def _optax_rmsprop(p0, grads, *, learning_rate, decay, eps, initial_scale, eps_in_sqrt, centered, momentum,
                   nesterov, bias_correction):
    """optax.rmsprop (optax 0.2.8, optax/_src/alias.py): chain(scale_by_rms, or scale_by_stddev
    when centered (optax/_src/transform.py), scale_by_learning_rate, trace(momentum, nesterov)
    (optax/transforms/_accumulation.py)), applied with optax.apply_updates. Bias correction
    (optax tree_bias_correction) divides nu (and mu) by 1 - decay**count."""
    p, nu, mu, trace = p0.clone(), torch.full_like(p0, initial_scale), torch.zeros_like(p0), torch.zeros_like(p0)
    out = []
    for count, g in enumerate(grads, start=1):
        nu = (1 - decay) * g**2 + decay * nu
        mu = (1 - decay) * g + decay * mu
        nu_hat, mu_hat = (nu / (1 - decay**count), mu / (1 - decay**count)) if bias_correction else (nu, mu)
        variance = nu_hat - mu_hat**2 if centered else nu_hat
        scaling = torch.rsqrt(variance + eps) if eps_in_sqrt else 1 / (torch.sqrt(variance) + eps)
        updates = -learning_rate * (scaling * g)
        trace = updates + momentum * trace
        updates = updates + momentum * trace if nesterov else trace
        p = p + updates
        out.append(p)
    return out


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("nesterov, bias_correction", [(True, False), (False, True), (True, True)],
                         ids=["nesterov", "bias-correction", "both"])
@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_optax_rmsprop_nesterov_and_bias_correction(backend, centered, nesterov, bias_correction, eps_in_sqrt):
    lr, decay, eps, momentum = 3e-3, 0.9, 1e-8, 0.8
    p0, grads = draw(25, seed=5)
    # Centered with bias correction, from zero, the first step's variance is that of one sample,
    # 0 up to rounding (optax's too): its update is g / eps, and its sign decides a NaN. From
    # initial_scale = 0.5 it is well conditioned.
    initial_scale = 0.0 if bias_correction and not centered else 0.5
    ours = run_fused(p0, grads, lr=lr, alpha=decay, eps=eps, initial_scale=initial_scale, eps_in_sqrt=eps_in_sqrt,
                     centered=centered, momentum=momentum, nesterov=nesterov, bias_correction=bias_correction,
                     lr_in_momentum=True, backend=backend)
    theirs = _optax_rmsprop(p0, grads, learning_rate=lr, decay=decay, eps=eps, initial_scale=initial_scale,
                            eps_in_sqrt=eps_in_sqrt, centered=centered, momentum=momentum, nesterov=nesterov,
                            bias_correction=bias_correction)
    for k, (got, p) in enumerate(zip(ours, theirs)):
        assert_close(got, p, steps=k + 1)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_nesterov_with_torchs_lr_placement_is_torch_sgds(backend):
    """lr_in_momentum=False: buf = momentum * buf + g / denom, p -= lr * (g / denom + momentum *
    buf), torch.optim.SGD(nesterov=True)'s step on the normalised gradient."""
    lr, alpha, momentum = 1e-2, 0.99, 0.9
    p0, grads = draw(20, seed=6)
    ours = run_fused(p0, grads, lr=lr, alpha=alpha, momentum=momentum, nesterov=True, backend=backend)
    p, v, buf = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for k, (g, got) in enumerate(zip(grads, ours)):
        v = alpha * v + (1 - alpha) * g * g
        u = g / (torch.sqrt(v) + 1e-8)
        buf = momentum * buf + u
        p = p - lr * (u + momentum * buf)
        assert_close(got, p, steps=k + 1)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(nesterov=True), ValueError, "Nesterov momentum requires a momentum > 0"),
    (dict(nesterov=True, momentum=0.0), ValueError, "Nesterov momentum requires a momentum > 0"),
    (dict(decoupled_weight_decay=True, weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
    (dict(bias_correction=True, alpha=1.0), ValueError, "bias_correction divides by 1 - alpha**step"),
    (dict(bias_correction=True, alpha=1.5), ValueError, "bias_correction divides by 1 - alpha**step"),
    (dict(state_dtype=torch.float16), ValueError, "Invalid state_dtype: torch.float16"),
    (dict(state_dtype="4bit"), ValueError, "Invalid state_dtype: '4bit'"),
    (dict(rounding_seed=1.5), TypeError, "rounding_seed must be an int"),
    (dict(max_grad_norm=0.0), ValueError, "Invalid max_grad_norm: 0.0"),
    (dict(max_grad_norm=-1.0), ValueError, "Invalid max_grad_norm: -1.0"),
    (dict(max_grad_norm=float("nan")), ValueError, "Invalid max_grad_norm: nan"),
    (dict(max_grad_norm=1.0, norm_type=0.0), ValueError, "Invalid norm_type: 0.0"),
    (dict(max_grad_norm=1.0, norm_type="fro"), ValueError, "Invalid norm_type: 'fro'"),
])
def test_bad_options_are_refused_at_construction(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        FusedRMSprop([nn.Parameter(torch.randn(3))], **kwargs)


def test_a_bad_option_set_on_a_group_later_refuses_the_step_and_changes_nothing():
    p = nn.Parameter(torch.randn(3))
    opt = FusedRMSprop([p], momentum=0.9)
    p.grad = torch.randn(3)
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    opt.param_groups[0]["nesterov"] = True
    opt.param_groups[0]["momentum"] = 0.0
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum > 0"):
        opt.step()
    assert torch.equal(p, before[0]) and all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())


def test_complex_params_match_torch():
    torch.manual_seed(4)
    p = nn.Parameter(torch.randn(5, 3, dtype=torch.complex128))
    q = nn.Parameter(p.detach().clone())
    ours = FusedRMSprop([p], centered=True, momentum=0.5, weight_decay=0.1)
    theirs = torch.optim.RMSprop([q], centered=True, momentum=0.5, weight_decay=0.1, foreach=False)
    for _ in range(10):
        g = torch.randn(5, 3, dtype=torch.complex128)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert_close(torch.view_as_real(p.detach()), torch.view_as_real(q.detach()), steps=10)


def test_complex_initial_scale_fills_real_and_imaginary_parts():
    torch.manual_seed(fresh_seed())
    p = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = FusedRMSprop([p], initial_scale=1.0, eps_in_sqrt=True)
    p.grad = torch.randn_like(p)
    opt.step()
    # each part starts at 1: alpha * 1 + (1 - alpha) * g * g, part by part (rmsprop_update.h's order)
    g = torch.view_as_real(p.grad)
    one_minus_alpha = torch.tensor(1 - 0.99, dtype=torch.float32)
    expected = torch.tensor(0.99, dtype=torch.float32) + one_minus_alpha * g * g
    assert torch.equal(torch.view_as_real(opt.state[p]["square_avg"]), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_params_are_computed_in_float32_and_rounded_once(dtype):
    torch.manual_seed(fresh_seed())
    p = nn.Parameter(torch.randn(1000, dtype=dtype))
    p32 = nn.Parameter(p.detach().float())
    ours = FusedRMSprop([p], momentum=0.9, centered=True)
    oracle = FusedRMSprop([p32], momentum=0.9, centered=True, backend="reference")
    g = torch.randn(1000, dtype=dtype)
    p.grad, p32.grad = g, g.float()
    ours.step()
    oracle.step()
    assert torch.equal(p.detach(), p32.detach().to(dtype))  # one rounding of the float32 step, exactly


def test_float16_zero_gradient_gives_no_nan_unlike_torch():
    p = nn.Parameter(torch.ones(4, dtype=torch.float16))
    q = nn.Parameter(torch.ones(4, dtype=torch.float16))
    ours, theirs = FusedRMSprop([p]), torch.optim.RMSprop([q], foreach=False)
    p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    ours.step()
    theirs.step()
    assert torch.equal(p, torch.ones_like(p))
    assert torch.isnan(q).all()  # eps=1e-8 underflows to 0 in fp16: 0/0 (docs/DESIGN.md section 1)


# ---------------------------------------------------------------- state_dict both ways


@pytest.mark.parametrize("direction", ["torch->fused", "fused->torch"])
@pytest.mark.parametrize("config", ["default", "weight_decay-centered-momentum", "momentum"])
def test_state_dict_round_trip_continues_identically(direction, config):
    options = TORCH_CONFIGS[config]
    torch.manual_seed(6)
    model = SmallModel(torch.float64)
    reference_model = copy.deepcopy(model)
    reference = torch.optim.RMSprop(param_groups(reference_model, options), foreach=False, **options)
    first_cls, second_cls = (torch.optim.RMSprop, FusedRMSprop) if direction == "torch->fused" else (FusedRMSprop, torch.optim.RMSprop)
    first_kwargs = {"foreach": False} if first_cls is torch.optim.RMSprop else {}
    second_kwargs = {"foreach": False} if second_cls is torch.optim.RMSprop else {}
    first = first_cls(param_groups(model, options), **first_kwargs, **options)
    for _ in zip(train(model, first, 5, torch.float64), train(reference_model, reference, 5, torch.float64)):
        pass
    saved = first.state_dict()
    resumed_model = copy.deepcopy(model)
    second = second_cls(param_groups(resumed_model, options), **second_kwargs, **options)
    second.load_state_dict(saved)
    for _ in zip(train(resumed_model, second, 7, torch.float64, seed=1), train(reference_model, reference, 7, torch.float64, seed=1)):
        pass
    for a, b in zip(resumed_model.parameters(), reference_model.parameters()):
        assert_close(a.detach(), b.detach(), steps=12)  # 5 steps, then 7 resumed
        for key, value in reference.state[b].items():
            assert_close(second.state[a][key].cpu(), value.cpu(), steps=12, name=key)


def _new_state(p, generator):
    return torch.rand(p.shape, generator=generator, dtype=p.dtype) + 0.5


# Every way torch.optim code changes an optimizer's state between steps. The fast step keeps its
# lists converted from one step to the next, and must see each of these at the next step.
STATE_EDITS = {
    "setitem": lambda opt, p, g: opt.state[p].__setitem__("square_avg", _new_state(p, g)),
    "update": lambda opt, p, g: opt.state[p].update(square_avg=_new_state(p, g)),
    "|= on a param's state": lambda opt, p, g: opt.state[p].__ior__({"square_avg": _new_state(p, g)}),
    "|= on optimizer.state": lambda opt, p, g: opt.state.__ior__(
        {p: {"step": torch.tensor(4.0), "square_avg": _new_state(p, g), "momentum_buffer": _new_state(p, g)}}),
    "a new state dict": lambda opt, p, g: opt.state.__setitem__(
        p, {"step": torch.tensor(4.0), "square_avg": _new_state(p, g), "momentum_buffer": _new_state(p, g)}),
    "pop": lambda opt, p, g: opt.state[p].pop("momentum_buffer"),
    "del then setdefault": lambda opt, p, g: (opt.state[p].__delitem__("square_avg"),
                                              opt.state[p].setdefault("square_avg", _new_state(p, g))),
    "clear": lambda opt, p, g: opt.state[p].clear(),
    "del optimizer.state[p]": lambda opt, p, g: opt.state.__delitem__(p),
    "optimizer.state = defaultdict(dict)": lambda opt, p, g: setattr(opt, "state", __import__("collections").defaultdict(dict)),
    ".data of a state tensor": lambda opt, p, g: setattr(opt.state[p]["square_avg"], "data", _new_state(p, g)),
}


@pytest.mark.parametrize("edit", STATE_EDITS)
def test_the_next_step_sees_every_change_to_the_state(edit):
    """The fast step (backend "auto", one group) against the reference backend, whose steps take
    the full path and read the state afresh: the same edit between steps, then the same bits."""
    if _extension.load_error is not None:
        pytest.skip(f"the fast step calls the compiled op: {_extension.load_error}")
    torch.manual_seed(11)
    start = [torch.randn(6, 5), torch.randn(7)]
    runs = []
    for backend in ("auto", "reference"):
        params = [nn.Parameter(t.clone()) for t in start]
        opt = FusedRMSprop(params, lr=0.01, momentum=0.9, backend=backend)
        grads = torch.Generator().manual_seed(1)
        for step in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            if step == 3:
                STATE_EDITS[edit](opt, params[0], torch.Generator().manual_seed(2))
            opt.step()
        runs.append(params)
    for fast, reference in zip(*runs):
        assert torch.equal(fast, reference)


def _two_groups(backend, dtype=torch.float32, **options):
    torch.manual_seed(13)
    params = [nn.Parameter(torch.randn(s).to(dtype)) for s in ((6, 5), (7,), (3, 4), (9,))]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.03, "momentum": 0.5, "centered": True}]
    return params, FusedRMSprop(groups, backend=backend, momentum=0.9, **options)


def _fast_and_reference_runs(make, dtype, monkeypatch, steps=4):
    """The same steps, with the same fresh grads, by `make("auto")` (the fast step) and
    `make("reference")` (the full path): [(params, optimizer)] of each. Asserts that only the fast
    run's first step, which creates the state, took the full path."""
    if _extension.load_error is not None:
        pytest.skip(f"the fast step calls the compiled op: {_extension.load_error}")
    from rmsprop_fused import optimizer

    full_path = []  # (every step of the full path ends in apply_checked)
    monkeypatch.setattr(optimizer, "apply_checked",
                        lambda *args, apply=optimizer.apply_checked, **kwargs: full_path.append(1) or apply(*args, **kwargs))
    runs, seed = [], fresh_seed()
    for backend in ("auto", "reference"):
        params, opt = make(backend)
        grads = torch.Generator().manual_seed(seed)
        for step in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads).to(dtype) * 3
            opt.step()
            if step == 0:
                full_path.clear()
        assert bool(full_path) == (backend == "reference")  # (the reference's spy is a control)
        runs.append((params, opt))
    return runs


@pytest.mark.parametrize("dtype, options", [
    (torch.float32, {}), (torch.float32, {"max_grad_norm": 1.0}),
    (torch.bfloat16, {"stochastic_rounding": True, "rounding_seed": 7}),
], ids=["fp32", "fp32-clip", "bf16-stochastic"])
def test_several_groups_take_the_fast_step_and_compute_the_references_bits(dtype, options, monkeypatch):
    """The fast step of several param groups (one op call each, every one checked before any
    writes) against the reference backend's full path: per-group options, clipping across groups,
    each group's own rounding stream; and only the first step (which creates the state) takes the
    full path."""
    (params, opt), (ref_params, _) = _fast_and_reference_runs(lambda backend: _two_groups(backend, dtype, **options),
                                                              dtype, monkeypatch)
    assert set(opt._fast_cache) == {0, 1}  # one converted list per group, kept between steps
    for fast, reference in zip(params, ref_params):
        assert torch.equal(fast, reference)


def _assert_step_refused(opt, params, expected: str) -> None:
    """opt.step() raises a ValueError matching `expected`, and changes no param and no state."""
    before = [p.detach().clone() for p in params], {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(ValueError, match=expected):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before[0]))
    assert all(torch.equal(v, before[1][id(p)][k]) for p, s in opt.state.items() for k, v in s.items())


@pytest.mark.parametrize("defect", ["a bad grad in the last group", "a grad shared across groups",
                                    "a grad shared within a group"])
def test_a_refusal_in_any_group_of_a_fast_step_changes_no_group(defect):
    if _extension.load_error is not None:
        pytest.skip(f"the fast step calls the compiled op: {_extension.load_error}")
    params, opt = _two_groups("auto")
    for _ in range(2):  # (the first creates the state, the second builds the fast step's lists)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert set(opt._fast_cache) == {0, 1}
    for p in params:
        p.grad = torch.randn_like(p)
    if defect == "a bad grad in the last group":
        params[3].grad.data = torch.randn(9, dtype=torch.float64)  # (the .grad setter refuses it)
        expected = r"param group 1, param 1: grad \(gradient\) is float64"
    elif defect == "a grad shared across groups":  # a dense view laid out as its param: only the test across calls sees it
        params[2].grad = params[0].grad.view(-1)[:12].view(3, 4)
        expected = r"param group 0, param 0: grad and param group 1, param 0: grad share memory"
    else:
        params[1].grad = params[0].grad.view(-1)[:7]
        expected = r"param group 0, param 0: grad and param group 0, param 1: grad share memory"
    _assert_step_refused(opt, params, expected)


def _eight_bit_groups(backend, dtype=torch.float32, **options):
    """An 8-bit group whose params lie on both sides of MIN_QUANTIZED_NUMEL, interleaved (codes and
    scales, one tensor ending inside a block; float32 state), and a group of bfloat16 state."""
    torch.manual_seed(14)
    shapes = ((64, 80), (7,), (4100,), (3, 4), (6, 5))
    params = [nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    groups = [{"params": params[:4], "state_dtype": "8bit"}, {"params": params[4:], "lr": 0.03, "state_dtype": torch.bfloat16}]
    return params, FusedRMSprop(groups, backend=backend, **options)


@pytest.mark.parametrize("dtype, options", [
    (torch.float32, {}), (torch.float32, {"centered": True, "momentum": 0.9, "max_grad_norm": 1.0}),
    (torch.bfloat16, {"momentum": 0.9, "stochastic_rounding": True, "rounding_seed": 7}),
], ids=["fp32", "fp32-centered-momentum-clip", "bf16-momentum-stochastic"])
def test_eight_bit_groups_take_the_fast_step_and_compute_the_references_bits(dtype, options, monkeypatch):
    """An 8-bit group is two op calls, its codes and its small float32 tensors, split as the full
    path splits it (so that each tensor keeps its index in its call, and its rounding stream):
    against the reference backend's full path, params and state bit for bit; only the first step
    (which creates the state) takes the full path."""
    from common import assert_same_bits

    runs = _fast_and_reference_runs(lambda backend: _eight_bit_groups(backend, dtype, **options), dtype, monkeypatch)
    parts = runs[0][1]._fast_cache[0].parts
    assert [[t.numel() for t in part.params] for part in parts] == [[5120, 4100], [7, 12]]
    assert [part.state_dtype for part in parts] == [torch.uint8, torch.float32]
    (params, opt), (ref_params, ref_opt) = runs
    codes = [v for k, v in opt.state[params[0]].items() if k != "step" and not k.endswith("_scale")]
    assert codes and all(v.dtype == torch.uint8 for v in codes)  # (8-bit state it is)
    for p, ref in zip(params, ref_params):
        assert_same_bits(p, ref, name="param")
        assert opt.state[p].keys() == ref_opt.state[ref].keys()
        for key, value in opt.state[p].items():
            assert_same_bits(value, ref_opt.state[ref][key], name=key)


@pytest.mark.parametrize("defect", ["a bad grad in the second call", "a grad shared across the calls"])
def test_a_refusal_in_the_second_call_of_an_eight_bit_group_changes_nothing(defect):
    """The small tensors' call comes after the codes' call: its refusal must still come before
    the codes, their scales or any param are written."""
    if _extension.load_error is not None:
        pytest.skip(f"the fast step calls the compiled op: {_extension.load_error}")
    params, opt = _eight_bit_groups("auto", momentum=0.9)
    for _ in range(2):  # (the first creates the state, the second builds the fast step's lists)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(opt._fast_cache[0].parts) == 2
    for p in params:
        p.grad = torch.randn_like(p)
    if defect == "a bad grad in the second call":
        params[3].grad.data = torch.randn(3, 4, dtype=torch.float64)  # (the .grad setter refuses it)
        expected = r"param group 0, param 3: grad \(gradient\) is float64"
    else:  # a small param's grad in the codes' param's grad
        params[1].grad = params[0].grad.view(-1)[:7]
        expected = r"param group 0, param 0: grad and param group 0, param 1: grad share memory"
    _assert_step_refused(opt, params, expected)


def _state_of_another_dtype(opt, p, stored):
    state = opt.state[p]
    for key in ("square_avg", "momentum_buffer"):
        state[key] = optimizer_state_value(state, key).to(stored)
        state.pop(key + "_scale", None)


# Ways a param's state comes to have another dtype than its group asks for, after the fast step
# built its lists: (state_dtype, the change).
OTHER_STATE_DTYPES = {
    "8-bit state replaced by float32": ("8bit", lambda opt, p: _state_of_another_dtype(opt, p, torch.float32)),
    "bf16 state replaced by float32": (torch.bfloat16, lambda opt, p: _state_of_another_dtype(opt, p, torch.float32)),
    "float32 state replaced by bf16": (None, lambda opt, p: _state_of_another_dtype(opt, p, torch.bfloat16)),
    "the group's state_dtype changed": ("8bit", lambda opt, p: opt.param_groups[0].__setitem__("state_dtype", torch.bfloat16)),
    "the param's dtype changed (module.to)": (None, lambda opt, p: setattr(p, "data", p.data.bfloat16())),
    "bf16 state's .data swapped to float32": (torch.bfloat16, lambda opt, p: [
        setattr(opt.state[p][key], "data", opt.state[p][key].data.float()) for key in ("square_avg", "momentum_buffer")]),
}


@pytest.mark.parametrize("change", OTHER_STATE_DTYPES)
def test_state_of_another_dtype_than_the_group_asks_for_is_refused_by_every_path(change):
    """State of a dtype the kernels could update, but not the one the group's state_dtype asks
    for: the fast step must not take it where the full path refuses it."""
    state_dtype, make_change = OTHER_STATE_DTYPES[change]
    errors = []
    for backend in ("auto", "reference"):
        torch.manual_seed(15)
        p = nn.Parameter(torch.randn(64, 80))
        opt = FusedRMSprop([p], momentum=0.9, state_dtype=state_dtype, backend=backend)
        for _ in range(2):  # (the fast step's lists are built, and kept)
            p.grad = torch.randn_like(p)
            opt.step()
        make_change(opt, p)
        p.grad = torch.randn_like(p)
        before = p.detach().clone()
        with pytest.raises(ValueError, match=r"param group 0, param 0: state\['square_avg'\]") as error:
            opt.step()
        assert torch.equal(p, before)
        errors.append(str(error.value))
    assert errors[0] == errors[1]


def _clipped_two_groups(backend, defect):
    params, opt = _two_groups(backend, max_grad_norm=1.0, error_if_nonfinite=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    norm = opt.grad_norm.clone()
    for p in params:
        p.grad = torch.randn_like(p)
    params[3].grad.data = torch.randn(9, dtype=torch.float64)  # (the .grad setter refuses it)
    if defect == "and an inf grad elsewhere":
        params[0].grad[0, 0] = float("inf")
    elif defect == "and a bad option in the last group":
        opt.param_groups[1]["alpha"] = -1.0
    return params, opt, norm


@pytest.mark.parametrize("defect", ["alone", "and an inf grad elsewhere", "and a bad option in the last group"])
def test_a_refused_fast_step_raises_what_the_full_path_raises_and_keeps_grad_norm(defect):
    """A bad grad in the last group (the op's checks find it), with another defect that the fast
    step meets first (a non-finite clipping norm with error_if_nonfinite, the last group's
    options): the error is the full path's, checked in its order, and grad_norm keeps the last
    step's norm."""
    if _extension.load_error is not None:
        pytest.skip(f"the fast step calls the compiled op: {_extension.load_error}")
    errors = []
    for backend in ("auto", "reference"):
        params, opt, norm = _clipped_two_groups(backend, defect)
        with pytest.raises((ValueError, RuntimeError)) as error:
            opt.step()
        assert torch.equal(opt.grad_norm, norm)
        errors.append((type(error.value), str(error.value)))
    assert errors[0] == errors[1]
    assert issubclass(errors[0][0], ValueError)  # (not the norm's RuntimeError: the checks come first)


def optimizer_state_value(state: dict, key: str) -> torch.Tensor:
    """A state tensor in float32, decoded when it is 8-bit."""
    from rmsprop_fused import _quantization

    value = state[key]
    if value.dtype == torch.uint8:
        return _quantization.dequantize_blockwise(value, state[key + "_scale"], key != "square_avg")
    return value.float()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_step_bumps_the_version_of_what_it_writes_so_autograd_refuses_stale_saved_tensors(backend):
    """As with torch.optim.RMSprop: a backward through a param saved before the step is refused
    (autograd compares version counters), not computed from the updated values; every state
    tensor's counter moves too, and a refused step moves none."""
    torch.manual_seed(16)
    for make in (lambda ps: torch.optim.RMSprop(ps, momentum=0.9, centered=True),
                 lambda ps: FusedRMSprop(ps, momentum=0.9, centered=True, backend=backend)):
        p = nn.Parameter(torch.randn(5))
        opt = make([p])
        p.grad = torch.randn(5)
        opt.step()
        loss = (p * p).sum()  # (saves p)
        p.grad = torch.randn(5)
        before = {key: t._version for key, t in opt.state[p].items()}, p._version, p.grad._version
        opt.step()
        assert p._version > before[1] and p.grad._version == before[2]
        assert all(opt.state[p][key]._version > version for key, version in before[0].items())
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    p.grad = torch.randn(5)
    p.grad.data = torch.randn(6)  # (.data is not checked by the .grad setter)
    versions = [t._version for t in (p, *opt.state[p].values())]
    with pytest.raises(ValueError):
        opt.step()
    assert [t._version for t in (p, *opt.state[p].values())] == versions


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grads_versions_move_only_when_the_step_writes_them_back(backend):
    """The grads are written (unscaled in place) only with a grad_scale; without one, a grad's
    version counter stays where it was."""
    from rmsprop_fused.functional import rmsprop

    torch.manual_seed(17)
    for grad_scale in (None, torch.tensor(4.0)):
        p, g, v = torch.randn(5), torch.randn(5), torch.rand(5)
        version = g._version
        rmsprop([p], [g], [v], lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                grad_scale=grad_scale, backend=backend)
        assert (g._version > version) == (grad_scale is not None)


def test_load_state_dict_hooks_run_where_torch_runs_them():
    """A pre-hook's returned state_dict is what is checked and loaded (so a hook may repair a
    checkpoint: here it drops a key RMSprop does not have), and what a post-hook puts in the state
    stays there; each runs once."""
    torch.manual_seed(12)
    loaded = {}
    for cls in (torch.optim.RMSprop, FusedRMSprop):
        p = nn.Parameter(torch.randn(5))
        opt = cls([p], lr=0.01, momentum=0.9)
        p.grad = torch.randn(5)
        opt.step()
        saved = opt.state_dict()
        saved["state"][0]["my_ema"] = torch.zeros(5)
        calls = []

        def pre_hook(optimizer, state_dict):
            calls.append("pre")
            state = {pid: {k: v for k, v in s.items() if k != "my_ema"} for pid, s in state_dict["state"].items()}
            state[0]["square_avg"] = torch.full((5,), 0.25)
            return {**state_dict, "state": state}

        def post_hook(optimizer):
            calls.append("post")
            optimizer.state[p]["momentum_buffer"] = torch.full((5,), 2.0)

        opt.register_load_state_dict_pre_hook(pre_hook)
        opt.register_load_state_dict_post_hook(post_hook)
        opt.load_state_dict(saved)
        assert calls == ["pre", "post"]
        loaded[cls] = {k: v.clone() for k, v in opt.state[p].items()}
    assert torch.equal(loaded[FusedRMSprop]["square_avg"], torch.full((5,), 0.25))
    assert torch.equal(loaded[FusedRMSprop]["momentum_buffer"], torch.full((5,), 2.0))
    assert loaded[FusedRMSprop].keys() == loaded[torch.optim.RMSprop].keys()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_its_clipping(how):
    import pickle

    p = nn.Parameter(torch.randn(5))
    opt = FusedRMSprop([p], max_grad_norm=0.5, norm_type=1.0, error_if_nonfinite=True)
    p.grad = torch.randn(5)
    opt.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert (twin.max_grad_norm, twin.norm_type, twin.error_if_nonfinite) == (0.5, 1.0, True)
    q = twin.param_groups[0]["params"][0]
    assert torch.equal(twin.state[q]["square_avg"], opt.state[p]["square_avg"])
    # and the copy's next step clips as the original's does
    p.grad, q.grad = torch.randn(5) * 10, None
    q.grad = p.grad.clone()
    opt.step()
    twin.step()
    assert torch.equal(twin.grad_norm, opt.grad_norm) and opt.grad_norm > 0.5
    assert torch.equal(q, p)


# ---------------------------------------------------------------- schedulers, closure, options


def test_lr_scheduler_drives_the_step():
    torch.manual_seed(7)
    p, q = nn.Parameter(torch.randn(10, dtype=torch.float64)), None
    q = nn.Parameter(p.detach().clone())
    ours, theirs = FusedRMSprop([p], lr=0.1, momentum=0.9), torch.optim.RMSprop([q], lr=0.1, momentum=0.9, foreach=False)
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=3, gamma=0.5)
    sched_theirs = torch.optim.lr_scheduler.StepLR(theirs, step_size=3, gamma=0.5)
    for _ in range(10):
        g = torch.randn(10, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step(), theirs.step()
        sched_ours.step(), sched_theirs.step()
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"] == 0.1 * 0.5**3
    assert_close(p.detach(), q.detach(), steps=10)


def test_closure_is_evaluated_with_grad_enabled_and_its_loss_returned():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = FusedRMSprop([p])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5.0
    assert p.grad is not None and not torch.equal(p.detach(), torch.tensor([1.0, -2.0]))


def test_signature_is_torchs_plus_keyword_only_extras():
    """Positional arguments and defaults as torch.optim.RMSprop's, so that a swap cannot shift one."""
    import inspect

    ours = list(inspect.signature(FusedRMSprop).parameters.values())
    theirs = list(inspect.signature(torch.optim.RMSprop).parameters.values())
    assert [(p.name, p.default) for p in ours[: len(theirs)]] == [(p.name, p.default) for p in theirs]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs):])
    assert FusedRMSprop([nn.Parameter(torch.randn(2))], foreach=True).defaults["foreach"] is True


@pytest.mark.parametrize("foreach", [True, False])
def test_foreach_is_accepted_and_changes_nothing(foreach):
    torch.manual_seed(fresh_seed())
    start = torch.randn(9)
    runs = []
    for options in ({"foreach": foreach}, {}):
        p = nn.Parameter(start.clone())
        opt = FusedRMSprop([p], momentum=0.9, **options)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            p.grad = torch.randn(9, generator=gen)
            opt.step()
        runs.append(p.detach())
    assert torch.equal(*runs)


def test_main_module_reports_every_backend(capsys):
    from rmsprop_fused.__main__ import main

    assert main() == 0
    out = capsys.readouterr().out
    assert f"rmsprop_fused {rmsprop_fused.__version__}" in out and f"torch {torch.__version__}" in out
    for backend in ("reference", "cpu", "cuda"):
        assert f"  {backend} " in out
    if _extension.load_error is None:  # the CPU loops' prefetch distance, which follows the CPU
        assert f"CPU loops prefetch each stream {_extension._module.cpu_prefetch_bytes()} B ahead" in out
