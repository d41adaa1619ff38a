"""Low-memory optimizer state through FusedRMSprop: state_dtype (float32 for 16-bit params,
bfloat16, "8bit"), stochastic rounding, and state that stays usable: state_dict round trips bit
for bit, a torch.optim.RMSprop state loads into any state_dtype, full_precision_state_dict gives
torch's back, and a resumed run is the uninterrupted one. (The arithmetic of every state dtype on
every backend: the backends' test files; the accuracy of 8-bit state: tests/test_quantization.py.)"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from rmsprop_fused import FusedRMSprop
from rmsprop_fused import _quantization as q
from common import assert_close, available, fresh_seed, same_bits
from reliability_common import require

EIGHT_BIT = "8bit"
BACKENDS = [b for b in ("reference", "cpu") if available(b)]
LARGE, SMALL = (64, 96), (17,)  # 6144 elements (8-bit), 17 (float32 under "8bit")


def _params(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(LARGE, dtype=dtype)), nn.Parameter(torch.randn(SMALL, dtype=dtype))]


def _train(opt, params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def _state_bits(opt):
    return [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]


def _assert_same_state(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert same_bits(sa[k], sb[k]), k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("centered", [False, True])
def test_8bit_state_layout(backend, centered):
    params = _params()
    opt = FusedRMSprop(params, momentum=0.9, centered=centered, state_dtype=EIGHT_BIT, backend=backend)
    _train(opt, params, 1, 0)
    large, small = (opt.state[p] for p in params)
    second = "grad_var" if centered else "square_avg"  # centered low-precision state keeps the variance
    expected = {"step", second, f"{second}_scale", "momentum_buffer", "momentum_buffer_scale"}
    if centered:
        expected |= {"grad_avg", "grad_avg_scale"}
    assert set(large) == expected
    assert large[second].dtype == torch.uint8 and large[second].shape == LARGE
    assert large[f"{second}_scale"].dtype == torch.float32 and large[f"{second}_scale"].shape == (6144 // 256,)
    # tensors under 4,096 elements keep float32 state, without scales
    assert set(small) == {k for k in expected if not k.endswith("_scale")}
    assert small[second].dtype == torch.float32


def test_8bit_state_starts_at_4096_elements():
    """The threshold itself: 4,095 elements keep float32 state, 4,096 take codes and scales."""
    params = [nn.Parameter(torch.randn(4095)), nn.Parameter(torch.randn(64, 64))]
    opt = FusedRMSprop(params, state_dtype=EIGHT_BIT)
    _train(opt, params, 1, 0)
    below, at = (opt.state[p] for p in params)
    assert below["square_avg"].dtype == torch.float32 and "square_avg_scale" not in below
    assert at["square_avg"].dtype == torch.uint8 and at["square_avg_scale"].shape == (16,)


def test_state_bytes_per_param():
    """8-bit state: one byte per element plus a float32 scale per 256: 1.0156 bytes per state
    tensor per param (bitsandbytes and torchao: the same); bf16: 2."""
    p = nn.Parameter(torch.randn(1 << 16))
    for state_dtype, per_tensor in ((None, 4.0), (torch.bfloat16, 2.0), (EIGHT_BIT, 1 + 4 / 256)):
        opt = FusedRMSprop([p], momentum=0.9, centered=True, state_dtype=state_dtype)
        p.grad = torch.randn_like(p)
        opt.step()
        state = opt.state[p]
        total = sum(t.numel() * t.element_size() for k, t in state.items() if k != "step")
        assert total / p.numel() == pytest.approx(3 * per_tensor)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, EIGHT_BIT], ids=["bf16", "8bit"])
@pytest.mark.parametrize("centered", [False, True])
def test_backends_agree_through_the_optimizer(state_dtype, centered):
    if not available("cpu"):
        pytest.skip("the C++ extension is not built")
    runs = {}
    for backend in ("reference", "cpu"):
        params = _params(seed=1)
        opt = FusedRMSprop(params, momentum=0.9, centered=centered, state_dtype=state_dtype, backend=backend)
        _train(opt, params, 4, 2)
        runs[backend] = ([p.detach().clone() for p in params], _state_bits(opt))
    for a, b in zip(runs["reference"][0], runs["cpu"][0]):
        assert same_bits(a, b)
    _assert_same_state(runs["reference"][1], runs["cpu"][1])


@pytest.mark.parametrize("state_dtype", [None, torch.float32, torch.bfloat16, EIGHT_BIT], ids=str)
@pytest.mark.parametrize("stochastic_rounding", [False, True], ids=["nearest", "stochastic"])
def test_checkpoint_resumes_bit_for_bit(state_dtype, stochastic_rounding):
    """Save after 3 steps (torch.save of the state_dict), load into a fresh optimizer, take 3
    more: the params and the state are the uninterrupted run's, stochastic rounding included
    (its seed is in the param groups, the step counts in the state)."""
    dtype = torch.bfloat16
    options = dict(momentum=0.9, centered=True, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
                   rounding_seed=fresh_seed())
    params = _params(dtype, seed=3)
    opt = FusedRMSprop(params, **options)
    _train(opt, params, 3, 4)
    buffer = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in params], "optim": opt.state_dict()}, buffer)
    _train(opt, params, 3, 5)

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = [nn.Parameter(p.clone()) for p in checkpoint["model"]]
    fresh = FusedRMSprop(resumed, **{**options, "rounding_seed": 0})  # the checkpoint's seed wins
    fresh.load_state_dict(checkpoint["optim"])
    _train(fresh, resumed, 3, 5)
    for a, b in zip(params, resumed):
        assert same_bits(a, b)
    _assert_same_state(_state_bits(opt), _state_bits(fresh))


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, EIGHT_BIT], ids=["bf16", "8bit"])
@pytest.mark.parametrize("centered", [False, True])
def test_a_torch_rmsprop_state_loads_quantized_and_comes_back(state_dtype, centered):
    """torch.optim.RMSprop's float32 state loaded into a low-precision FusedRMSprop is stored in
    its state_dtype (8-bit: quantized; centered: as the variance); full_precision_state_dict()
    gives it back in torch's form, within one rounding (bf16: 2^-8 relative; 8-bit: half a map
    step at the block maximum, 0.7%), and torch.optim.RMSprop loads that and trains on."""
    params = _params(seed=6)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    reference = torch.optim.RMSprop(twins, momentum=0.9, centered=centered)
    _train(reference, twins, 3, 7)
    fused = FusedRMSprop(params, momentum=0.9, centered=centered, state_dtype=state_dtype)
    fused.load_state_dict(reference.state_dict())
    large = fused.state[params[0]]
    second = "grad_var" if centered else "square_avg"
    expected_dtype = torch.uint8 if state_dtype == EIGHT_BIT else torch.bfloat16
    assert large[second].dtype == expected_dtype and fused.param_groups[0]["state_dtype"] == state_dtype

    full = fused.full_precision_state_dict()
    assert "state_dtype" not in full["param_groups"][0]
    for index, twin in enumerate(twins):
        for key in ("square_avg", "momentum_buffer") + (("grad_avg",) if centered else ()):
            got, want = full["state"][index][key], reference.state[twin][key]
            assert got.dtype == torch.float32 and got.shape == want.shape
            # 8-bit: half the widest map step (0.7%, near +-1), at each element's block maximum
            flat = want.reshape(-1).abs()
            blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % 256)).view(-1, 256).amax(dim=1)
            block = blocks.repeat_interleave(256)[: flat.numel()].view(want.shape)
            tolerance = (2**-8 * want.abs() + 1e-7) if state_dtype == torch.bfloat16 else 0.0071 * block
            if key == "square_avg" and centered:  # rebuilt from variance and grad_avg, both rounded
                tolerance = 3 * tolerance
            small = index == 1 and state_dtype == EIGHT_BIT  # float32: exact
            assert bool(((got - want).abs() <= (0 if small else tolerance)).all()), (index, key)
    back = torch.optim.RMSprop([nn.Parameter(p.detach().clone()) for p in params], momentum=0.9, centered=centered)
    back.load_state_dict(full)
    assert all(torch.equal(back.state[q][k], full["state"][i][k])
               for i, q in enumerate(back.param_groups[0]["params"]) for k in full["state"][i] if k != "step")
    _train(back, back.param_groups[0]["params"], 2, 8)
    assert all(torch.isfinite(q).all() for q in back.param_groups[0]["params"])
    # ... and a FusedRMSprop of any state_dtype loads it too, keeping its own state_dtype
    other = FusedRMSprop([nn.Parameter(p.detach().clone()) for p in params], momentum=0.9, centered=centered,
                         state_dtype=torch.bfloat16)
    other.load_state_dict(full)
    assert other.param_groups[0]["state_dtype"] == torch.bfloat16


def test_float32_state_for_16_bit_params():
    """state_dtype=torch.float32 keeps bf16 params' state in float32: the same numbers as a float32
    master copy's state would have, while the params are rounded once per step."""
    runs = []
    for backend in ("auto", "reference"):  # the kernel against the oracle, which computes in float32
        params = _params(torch.bfloat16, seed=9)
        opt = FusedRMSprop(params, momentum=0.9, state_dtype=torch.float32, backend=backend)
        _train(opt, params, 3, 10)
        assert all(t.dtype == torch.float32 for s in opt.state.values() for k, t in s.items())
        runs.append((params, _state_bits(opt)))
    (params, state), (reference_params, reference_state) = runs
    assert all(torch.equal(p, q) for p, q in zip(params, reference_params))
    assert all(torch.equal(s[k], r[k]) for s, r in zip(state, reference_state) for k in r)
    # after one step from zero state, square_avg is (1 - alpha) * g * g of the bf16 grad, in float32
    # (rmsprop_update.h's order), with nothing rounded to bf16
    params = _params(torch.bfloat16, seed=9)
    opt = FusedRMSprop(params, state_dtype=torch.float32)
    _train(opt, params, 1, 10)
    grad = params[0].grad.float()
    one_minus_alpha = torch.tensor(1 - 0.99, dtype=torch.float32)
    assert torch.equal(opt.state[params[0]]["square_avg"], one_minus_alpha * grad * grad)


def test_stochastic_rounding_is_reproducible_and_seeded():
    def run(seed):
        params = _params(torch.bfloat16, seed=11)
        opt = FusedRMSprop(params, lr=1e-3, stochastic_rounding=True, rounding_seed=seed)
        _train(opt, params, 3, 12)
        return params

    first, again, other = run(5), run(5), run(6)
    assert all(same_bits(a, b) for a, b in zip(first, again))
    assert not same_bits(first[0], other[0])


def test_stochastic_rounding_keeps_small_updates_that_nearest_rounding_loses():
    """A bf16 param of 1.0 with updates of lr = 1e-4 (bf16's ulp at 1 is 2^-7 = 0.0078): rounded to
    nearest, every step is lost and the param stays 1.0; rounded stochastically, it moves by
    about the sum of the updates."""
    def run(stochastic):
        p = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = FusedRMSprop([p], lr=1e-4, alpha=0.0, stochastic_rounding=stochastic, rounding_seed=fresh_seed())
        for _ in range(200):
            p.grad = torch.ones_like(p)  # the normalised update is lr * g / |g| = 1e-4
            opt.step()
        return p.float().mean().item()

    assert run(False) == 1.0
    moved = 1.0 - run(True)
    assert abs(moved - 200 * 1e-4) < 0.1 * 200 * 1e-4


@pytest.mark.parametrize("kwargs, param, message", [
    (dict(state_dtype=EIGHT_BIT), torch.randn(5000, dtype=torch.float64), "float64 params keep float64 state"),
    (dict(state_dtype=torch.bfloat16), torch.randn(3, dtype=torch.complex64), "complex params keep their own dtype's state"),
    (dict(stochastic_rounding=True), torch.randn(3), "stochastic_rounding=True has nothing to round"),
    (dict(stochastic_rounding=True, state_dtype=torch.float32), torch.randn(3, dtype=torch.float32), "nothing to round"),
])
def test_state_options_that_cannot_apply_are_refused_at_construction(kwargs, param, message):
    with pytest.raises(ValueError, match=message):
        FusedRMSprop([nn.Parameter(param)], **kwargs)


def test_stochastic_rounding_with_bf16_state_for_float32_params_is_accepted():
    p = nn.Parameter(torch.randn(10))
    opt = FusedRMSprop([p], stochastic_rounding=True, state_dtype=torch.bfloat16)
    p.grad = torch.randn(10)
    opt.step()
    assert opt.state[p]["square_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_8bit_centered_state_with_a_variance_quantized_to_zero_stays_finite(backend):
    """What turned examples/train.py's digits convnet with 8-bit centered + momentum state to NaN,
    made deterministic: one large grad per 256-element block makes every other element's stored
    variance 0; the next grad is within 1e-5 of grad_avg, so the new variance,
    alpha * w + alpha * (1 - alpha) * (g - m)**2, is about 1e-12 of m*m, under float32's resolution.
    Rebuilding v = w + m*m and taking v' - m'*m' gave rounding noise, negative for about half the
    elements (2,203 NaN params); the variance form (rmsprop_update.h) cannot go negative."""
    require(backend, "cpu", torch.float32)
    torch.manual_seed(fresh_seed())
    p = torch.zeros(4096, requires_grad=True)
    opt = FusedRMSprop([p], lr=1e-3, momentum=0.9, centered=True, state_dtype="8bit", backend=backend)
    g = torch.rand(4096) * 1e-3 + 1e-3
    g[::256] = 1e3
    p.grad = g
    opt.step()
    m = opt.full_precision_state_dict()["state"][0]["grad_avg"].clone()
    g = m * (1 + 1e-5 * torch.randn(4096))
    g[::256] = 1e3
    p.grad = g
    opt.step()
    assert torch.isfinite(p).all(), f"{int((~torch.isfinite(p)).sum())} of 4096 params are not finite"
