"""FusedRMSprop under torch.distributed, two CPU ranks on gloo: DDP, FSDP2 (DTensor params, each
rank updating its own shard) and sharded checkpoints with torch.distributed.checkpoint.

The oracle is one process running torch.optim.RMSprop (its for-loop path) on the concatenation of
the ranks' batches with a mean loss: the gradient that DDP and FSDP2 average across ranks.

Tolerance, float64: the distributed run sums the same per-sample gradient terms in another order
(a mean per rank, then the average of the ranks) than the single process (one mean over the whole
batch), so gradients differ by a few units in the last place, ~1e-16 relative. The update
lr * g / (sqrt(v) + eps) is well conditioned in g (away from |g| ~ eps) and STEPS steps through
a tanh network amplify that by a modest factor (measured: ~2e-15 of a tensor's largest magnitude,
3e-15 at most), so RTOL = 1e-12 of it leaves room for that arithmetic and for nothing else. That
magnitude is the largest the tensor held during the oracle's run, not the one it ends with: a
running average whose terms cancel ends far smaller than the terms whose rounding it carries
(seed 2853082625: head.bias's grad_avg, its gradient changing sign, ends at 1e-6 after holding
7e-4). A shard left out of the update or a state reset is ~lr = 1e-2 off. Gradients summed
instead of averaged barely move RMSprop's step, which is nearly invariant to the gradient's scale
(only through eps), but put square_avg 4x off: the state is compared as well as the params.
Where both sides run the very same operations on the very same values (the ranks' replicas under
DDP, a resumed run and an unbroken one) the results must be bitwise equal.

RMSPROP_FUSED_TEST_SEED=<seed> reruns a failure with the data it reports.

Every test spawns its ranks once (two fresh interpreters importing torch, the bulk of the
time), so each test covers its whole matrix of backends and options inside one spawn.
"""

from __future__ import annotations

import copy
import os
from typing import NamedTuple

import pytest
import torch
from torch import nn

from common import OPTION_MATRIX, fresh_seed, option_id
from distributed_common import DCP_SKIP, DISTRIBUTED_SKIP, FSDP2_SKIP, run_on_ranks
import distributed_common as dc
from rmsprop_fused import FusedRMSprop

pytestmark = pytest.mark.skipif(DISTRIBUTED_SKIP is not None, reason=str(DISTRIBUTED_SKIP))
requires_fsdp2 = pytest.mark.skipif(FSDP2_SKIP is not None, reason=str(FSDP2_SKIP))
requires_dcp = pytest.mark.skipif(DCP_SKIP is not None, reason=str(DCP_SKIP))

STEPS = 6
BATCH_PER_RANK = 4
RTOL = 1e-12
STATE_KEYS = ("square_avg", "grad_avg", "momentum_buffer")
# torch.optim.RMSprop's options, so that the single-process torch run is the oracle.
# eps = 1e-4, not 1e-8: the first step from zero state is g / (|g| sqrt(1 - alpha) + eps), whose
# slope eps / (...)^2 reaches 1 / (4 eps) where |g| sqrt(1 - alpha) ~ eps, so with eps = 1e-8 an
# element whose gradient happens to be ~1e-7 turns the ulp the two summation orders leave in g
# into an error beyond RTOL (about 5e-4 of runs). 1e-4 is still small beside the typical |g|.
EPS = 1e-4
OPTION_SETS = {
    "plain": dict(eps=EPS),
    "centered-momentum-weight_decay": dict(eps=EPS, centered=True, momentum=0.9, weight_decay=0.1),
}
# What the DDP and FSDP2 runs cover: "auto" is the compiled CPU kernel wherever it was built
# (conftest.py makes CI fail where it was not), "reference" the plain-PyTorch update.
BACKENDS = ("auto", "reference")


class Net(nn.Module):
    """float64 MLP whose weights' dim 0 (5, 3, 1) does not divide by 2 ranks: FSDP2 shards them
    as 3 + 2, 2 + 1 and 1 + 0 rows (padded), so rank 1 holds an empty shard of `head`."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 5, dtype=torch.float64)
        self.mid = nn.Linear(5, 3, dtype=torch.float64)
        self.head = nn.Linear(3, 1, dtype=torch.float64)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.hidden(x)))))


def loss_fn(model, x):
    return model(x).square().mean()


class Problem(NamedTuple):
    seed: int  # in every failure message
    init_state: dict  # Net's initial state_dict
    batches: torch.Tensor  # batches[step, rank] is what `rank` trains on at `step`


def draw_problem(steps: int = STEPS, world_size: int = dc.WORLD_SIZE) -> Problem:
    """Fresh initial weights and batches, from a seed drawn anew for each test unless
    RMSPROP_FUSED_TEST_SEED names one (to rerun a failure: its message has the seed)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    init_state = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.5 for k, v in Net().state_dict().items()}
    batches = torch.randn(steps, world_size, BATCH_PER_RANK, 6, generator=gen, dtype=torch.float64)
    return Problem(seed, init_state, batches)


def new_net(init_state) -> Net:
    net = Net()
    net.load_state_dict(init_state)
    return net


def train(model, optimizer, batches, rank, peaks=None, clip_norm_type=None):
    """Trains on batch[rank] of each step; on the oracle's side, `peaks` (a dict) collects the
    largest magnitude each param and state tensor held (see record_peaks), and `clip_norm_type`
    clips with torch's clip_grad_norm_ before each step."""
    for batch in batches:
        optimizer.zero_grad()
        loss_fn(model, batch if rank is None else batch[rank]).backward()
        if clip_norm_type is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP["max_grad_norm"], norm_type=clip_norm_type)
        optimizer.step()
        if peaks is not None:
            record_peaks(peaks, model, optimizer)


def record_peaks(peaks: dict, model, optimizer) -> None:
    """peaks[name][key]: the largest |value| the param ("param") or its state[key] has held."""
    for name, p in model.named_parameters():
        tensors = {"param": p.detach(), **{k: v for k, v in optimizer.state[p].items() if k in STATE_KEYS}}
        for key, t in tensors.items():
            if t.numel():
                held = peaks.setdefault(name, {}).get(key, 0.0)
                peaks[name][key] = max(held, t.abs().max().item())


def oracle(problem: Problem, options: dict, clip_norm_type=None) -> dict:
    """Params and state after torch.optim.RMSprop trains one process on the ranks' batches put
    together (the mean over all of them: what the ranks' averaged gradients are the gradient of),
    with clip_grad_norm_ before each step if clip_norm_type is given."""
    model = new_net(problem.init_state)
    optimizer = torch.optim.RMSprop(model.parameters(), foreach=False, **options)
    peaks = {}
    train(model, optimizer, problem.batches.flatten(1, 2), None, peaks, clip_norm_type)
    return snapshot(model, optimizer, peaks)


def snapshot(model, optimizer, peaks=None) -> dict:
    """Params and state of a model with plain-tensor params, by param name (with the peaks that
    training recorded, where it did: check_against measures errors against them)."""
    params = dict(model.named_parameters())
    return {
        "params": {name: p.detach().clone() for name, p in params.items()},
        "state": {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in params.items()},
        "peaks": peaks or {},
    }


def assert_rel_close(actual, expected, what, peak=0.0):
    """|actual - expected| within RTOL of the largest magnitude the tensor held: its final value's
    or, where given, `peak`, the largest over the run (record_peaks)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    err = (actual - expected).abs().max().item()
    scale = max(expected.abs().max().item(), peak)
    assert err <= RTOL * scale, f"{what}: off by {err:.3g}, more than {RTOL:g} of its largest magnitude {scale:.3g}"


def check_against(expected: dict, result: dict, where: str) -> None:
    """Params and state (same keys, same step count, values within RTOL) as `expected`."""
    for name, p in expected["params"].items():
        peaks = expected["peaks"].get(name, {})
        assert_rel_close(result["params"][name], p, f"{where}: {name}", peaks.get("param", 0.0))
        ours, theirs = result["state"][name], expected["state"][name]
        assert set(ours) == set(theirs), (where, name, sorted(ours), sorted(theirs))
        assert ours["step"].item() == theirs["step"].item(), (where, name)
        for key in STATE_KEYS:
            if key in theirs:
                assert_rel_close(ours[key], theirs[key], f"{where}: state[{name}][{key!r}]", peaks.get(key, 0.0))


# ---------------------------------------------------------------------------------------- DDP


def _ddp_rank(rank, world_size, init_state, batches, runs):
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for backend, option_name, bucket_view in runs:
        model = new_net(init_state)
        # gradient_as_bucket_view: the grads are views into DDP's flat buckets, at whatever
        # offsets the bucket layout gives them (the kernel must not assume aligned storage).
        ddp = DDP(model, gradient_as_bucket_view=bucket_view)
        optimizer = FusedRMSprop(ddp.parameters(), backend=backend, **OPTION_SETS[option_name])
        train(ddp, optimizer, batches, rank)
        if bucket_view:  # the case is real: every grad lives in the one bucket of this small model
            assert len({p.grad.untyped_storage().data_ptr() for p in model.parameters()}) == 1
        results[f"{backend}/{option_name}/bucket_view={bucket_view}"] = snapshot(model, optimizer)
    return results


def test_ddp_matches_single_process_rmsprop():
    problem = draw_problem()
    runs = [(b, o, v) for b in BACKENDS for o in OPTION_SETS for v in (False, True)]
    ranks = run_on_ranks(_ddp_rank, problem.init_state, problem.batches, runs)
    expected = {name: oracle(problem, options) for name, options in OPTION_SETS.items()}
    for backend, option_name, bucket_view in runs:
        label = f"{backend}/{option_name}/bucket_view={bucket_view}"
        for rank, results in enumerate(ranks):
            check_against(expected[option_name], results[label], f"seed {problem.seed}, {label}, rank {rank}")
        # DDP keeps replicas identical: the same averaged grads, the same update on each rank.
        for name, p in ranks[0][label]["params"].items():
            assert torch.equal(p, ranks[1][label]["params"][name]), f"{label}: {name} differs between the ranks"


# ---------------------------------------------------------------------------------------- FSDP2


def shard(model, mesh):
    """FSDP2 as it is meant to be applied: each layer its own unit, then the root."""
    for layer in (model.hidden, model.mid, model.head):
        dc.fully_shard(layer, mesh=mesh)
    dc.fully_shard(model, mesh=mesh)
    return model


def full(t):
    return t.full_tensor() if isinstance(t, dc.DTensor) else t.clone()


def gather(model, optimizer):
    """Full params and state (collectives: every rank calls this, in the same order)."""
    params = dict(model.named_parameters())
    return {
        "params": {name: full(p.detach()) for name, p in params.items()},
        "state": {name: {k: full(v) for k, v in optimizer.state[p].items()} for name, p in params.items()},
    }


def check_sharded_state(model, optimizer):
    """The state of a DTensor param is DTensors placed like it; FusedRMSprop updates the local
    shards, so a state placed otherwise would be updated against the wrong elements. `step`
    stays a plain 0-d tensor, as torch.optim keeps it."""
    for name, p in model.named_parameters():
        assert isinstance(p, dc.DTensor) and p.placements == (dc.Shard(0),), (name, type(p), getattr(p, "placements", None))
        state = optimizer.state[p]
        assert not isinstance(state["step"], dc.DTensor), name
        for key in STATE_KEYS:
            if key in state:
                t = state[key]
                assert isinstance(t, dc.DTensor), f"state[{name}][{key!r}] is a {type(t).__name__}"
                assert t.device_mesh == p.device_mesh and t.placements == p.placements, (name, key, t.placements)
                assert t.to_local().shape == p.to_local().shape, (name, key)


def _fsdp_rank(rank, world_size, init_state, batches, runs):
    mesh = dc.init_device_mesh("cpu", (world_size,))
    results = {}
    for backend, option_name in runs:
        model = shard(new_net(init_state), mesh)
        optimizer = FusedRMSprop(model.parameters(), backend=backend, **OPTION_SETS[option_name])
        train(model, optimizer, batches, rank)
        check_sharded_state(model, optimizer)
        result = gather(model, optimizer)
        result["local_shapes"] = {name: tuple(p.to_local().shape) for name, p in model.named_parameters()}
        results[f"{backend}/{option_name}"] = result
    return results


@requires_fsdp2
def test_fsdp2_matches_single_process_rmsprop():
    problem = draw_problem()
    runs = [(b, o) for b in BACKENDS for o in OPTION_SETS]
    ranks = run_on_ranks(_fsdp_rank, problem.init_state, problem.batches, runs)
    expected = {name: oracle(problem, options) for name, options in OPTION_SETS.items()}
    for backend, option_name in runs:
        label = f"{backend}/{option_name}"
        # The shards are the uneven ones Net was built for (rank 1's head.weight is empty).
        assert [r[label]["local_shapes"]["hidden.weight"] for r in ranks] == [(3, 6), (2, 6)]
        assert [r[label]["local_shapes"]["head.weight"] for r in ranks] == [(1, 3), (0, 3)]
        for rank, results in enumerate(ranks):
            check_against(expected[option_name], results[label], f"seed {problem.seed}, {label}, rank {rank}")


# ---------------------------------------------------------------------------- distributed checkpoint

# Two groups, the second with FusedRMSprop's own options, so that per-group options and the
# state they shape (initial_scale, lr inside the momentum buffer) go through the checkpoint too.
DCP_GROUP_OPTIONS = (
    dict(centered=True, momentum=0.9, weight_decay=0.1),
    dict(lr=0.02, momentum=0.5, initial_scale=1.0, eps_in_sqrt=True, lr_in_momentum=True),
)


def sharded_training(model, lr=None):
    groups = [
        {"params": list(model.hidden.parameters()), **DCP_GROUP_OPTIONS[0]},
        {"params": [*model.mid.parameters(), *model.head.parameters()], **DCP_GROUP_OPTIONS[1]},
    ]
    if lr is not None:
        for group in groups:
            group["lr"] = lr
    return FusedRMSprop(groups)


def _checkpoint_rank(rank, world_size, init_state, batches, save_at, checkpoint_dir):
    mesh = dc.init_device_mesh("cpu", (world_size,))
    model = shard(new_net(init_state), mesh)
    optimizer = sharded_training(model)
    train(model, optimizer, batches[:save_at], rank)
    model_sd, optim_sd = dc.get_state_dict(model, optimizer)
    dc.dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)
    train(model, optimizer, batches[save_at:], rank)
    unbroken = gather(model, optimizer)
    saved_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    # Fresh objects whose every value is wrong: NaN weights and another lr. Whatever the load
    # does not restore shows up in the comparison.
    fresh = new_net({k: torch.full_like(v, float("nan")) for k, v in init_state.items()})
    model = shard(fresh, mesh)
    optimizer = sharded_training(model, lr=0.5)
    # On an optimizer without state, get_state_dict first takes a step with zero grads and
    # lr = 0 to create it (torch's _init_optim_state), so that dcp.load has tensors to load into.
    model_sd, optim_sd = dc.get_state_dict(model, optimizer)
    check_sharded_state(model, optimizer)
    created_by_zero_step = [(name, sorted(optimizer.state[p])) for name, p in model.named_parameters()]
    state_dict = {"model": model_sd, "optim": optim_sd}
    dc.dcp.load(state_dict, checkpoint_id=checkpoint_dir)
    dc.set_state_dict(model, optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"])
    loaded_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    check_sharded_state(model, optimizer)
    train(model, optimizer, batches[save_at:], rank)
    resumed = gather(model, optimizer)
    return {"unbroken": unbroken, "resumed": resumed, "saved_groups": saved_groups,
            "loaded_groups": loaded_groups, "created_by_zero_step": created_by_zero_step}


@requires_fsdp2
@requires_dcp
def test_sharded_checkpoint_resumes_identically(tmp_path):
    problem = draw_problem()
    ranks = run_on_ranks(_checkpoint_rank, problem.init_state, problem.batches, STEPS // 2, str(tmp_path / "checkpoint"))
    for rank, result in enumerate(ranks):
        where = f"seed {problem.seed}, rank {rank}"
        # The zero step created the full state for every param (momentum_buffer and grad_avg
        # where the group asks for them), so every tensor of the checkpoint had a destination.
        for name, keys in result["created_by_zero_step"]:
            expected = {"step", "square_avg", "momentum_buffer"} | ({"grad_avg"} if name.startswith("hidden") else set())
            assert set(keys) == expected, (where, name, keys)
        assert result["loaded_groups"] == result["saved_groups"], where
        for part in ("params", "state"):
            flat_unbroken = _flatten(result["unbroken"][part])
            flat_resumed = _flatten(result["resumed"][part])
            assert flat_unbroken.keys() == flat_resumed.keys()
            for key, t in flat_unbroken.items():
                assert torch.equal(flat_resumed[key], t), f"{where}: {part} {key} differs after resuming"
        assert result["unbroken"]["state"]["hidden.weight"]["step"].item() == STEPS


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in _flatten(v, f"{prefix}{k}/").items()}
    return {prefix: tree}


# ------------------------------------------- get_optimizer_state_dict on a never-stepped optimizer
# torch.distributed.checkpoint's _init_optim_state (called by get_state_dict, get_optimizer_state_dict
# and set_state_dict on an optimizer with no state) sets every grad to zeros and lr to 0, calls
# step() and restores lr. Single process: no process group is needed to observe it.

ZERO_STEP_OPTIONS = [
    *OPTION_MATRIX,
    dict(initial_scale=1.0, momentum=0.9, lr_in_momentum=True),
    # A tensor lr is swapped for torch.tensor(0.0) (a CPU tensor) during the zero step.
    dict(lr=torch.tensor(0.01, dtype=torch.float64), centered=True, momentum=0.9, weight_decay=0.1),
]


@requires_dcp
@pytest.mark.parametrize(
    "options", ZERO_STEP_OPTIONS,
    ids=lambda o: option_id({k: "tensor" if isinstance(v, torch.Tensor) else v for k, v in o.items()}),
)
def test_dcp_zero_step_leaves_params_grads_and_lr_as_they_were(options):
    """Whatever the options, lr = 0 means p - 0 * update: every param keeps its exact value;
    grads and lr come back as they were. (step becomes 1, which RMSprop's update never reads.)"""
    model = new_net(draw_problem().init_state)
    before = copy.deepcopy(model.state_dict())
    optimizer = FusedRMSprop(model.parameters(), **options)
    lr = optimizer.param_groups[0]["lr"]
    dc.get_optimizer_state_dict(model, optimizer)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
        assert model.get_parameter(name).grad is None, name
    assert optimizer.param_groups[0]["lr"] is lr
    assert all(state["step"].item() == 1 for state in optimizer.state.values())


# OPTION_MATRIX's option sets that torch.optim.RMSprop has (without our eps_in_sqrt, lr_in_momentum).
TORCH_OPTION_MATRIX = [
    {k: v for k, v in o.items() if k not in ("eps_in_sqrt", "lr_in_momentum")}
    for o in OPTION_MATRIX if not (o["eps_in_sqrt"] or o["lr_in_momentum"])
]


@requires_dcp
@pytest.mark.parametrize("options", TORCH_OPTION_MATRIX, ids=option_id)
def test_dcp_zero_step_matches_torch_rmsprop(options):
    """FusedRMSprop stays a drop-in through that zero step: it changes the state exactly as it
    changes torch.optim.RMSprop's (with weight_decay it is not a no-op for either: the decay term
    of the zero grad enters square_avg, grad_avg and momentum_buffer), and training after it
    matches torch's."""
    problem = draw_problem()
    ours_model, theirs_model = new_net(problem.init_state), new_net(problem.init_state)
    ours = FusedRMSprop(ours_model.parameters(), **options)
    theirs = torch.optim.RMSprop(theirs_model.parameters(), foreach=False, **options)
    dc.get_optimizer_state_dict(ours_model, ours)
    dc.get_optimizer_state_dict(theirs_model, theirs)
    train(ours_model, ours, problem.batches, 0)
    peaks = {}
    train(theirs_model, theirs, problem.batches, 0, peaks)
    check_against(snapshot(theirs_model, theirs, peaks), snapshot(ours_model, ours), f"seed {problem.seed}")


@requires_dcp
def test_dcp_zero_step_on_a_fresh_optimizer_decays_initial_scale_once():
    """DCP's _init_optim_state takes a real step (zero grads, lr = 0) on a never-stepped optimizer
    (pytorch/pytorch#164929). Params are untouched, but square_avg decays once, from initial_scale
    to alpha * initial_scale, as the README says: checkpoint after the first step to avoid it
    (torch.optim.RMSprop has the same effect with weight_decay != 0)."""
    model = new_net(draw_problem().init_state)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = FusedRMSprop(model.parameters(), alpha=0.9, initial_scale=1.0)
    dc.get_optimizer_state_dict(model, optimizer)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for state in optimizer.state.values():
        assert bool((state["square_avg"] == 0.9).all())


# ------------------------------------------------------------------ clipping by global norm

CLIP = dict(max_grad_norm=0.05, eps=EPS, centered=True, momentum=0.9, weight_decay=0.1)


def _fsdp_clip_rank(rank, world_size, init_state, batches, norm_type):
    mesh = dc.init_device_mesh("cpu", (world_size,))
    model = shard(new_net(init_state), mesh)
    optimizer = FusedRMSprop(model.parameters(), norm_type=norm_type, **CLIP)
    norms = []
    for batch in batches:
        optimizer.zero_grad()
        loss_fn(model, batch[rank]).backward()
        optimizer.step()
        norms.append(float(optimizer.grad_norm))
    result = gather(model, optimizer)
    result["norms"] = norms
    return result


@requires_fsdp2
@pytest.mark.parametrize("norm_type", [2.0, float("inf")], ids=["l2", "inf"])
def test_fsdp2_clipping_spans_all_shards(norm_type):
    """Each rank holds a shard of every grad; the norm is the whole gradient's (the local partial
    norms reduced over the mesh, as torch's clip_grad_norm_ does through DTensor), so the sharded
    run follows clip_grad_norm_ + torch.optim.RMSprop on one process, and every rank logs the same
    norm."""
    problem = draw_problem()
    ranks = run_on_ranks(_fsdp_clip_rank, problem.init_state, problem.batches, norm_type)
    expected = oracle(problem, {k: v for k, v in CLIP.items() if k != "max_grad_norm"}, clip_norm_type=norm_type)
    for rank, result in enumerate(ranks):
        check_against(expected, result, f"seed {problem.seed}, rank {rank}")
    assert ranks[0]["norms"] == ranks[1]["norms"]
    assert any(n > CLIP["max_grad_norm"] for n in ranks[0]["norms"]), "no step clipped: the test tests nothing"


# ----------------------------------------------------------------------- low-precision state


class WideNet(nn.Module):
    """float32, with a layer of 8,192 weights (8-bit state) and small ones (float32 state)."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(64, 128)
        self.head = nn.Linear(128, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.wide(x)))


def _wide_problem(seed):
    gen = torch.Generator().manual_seed(seed)
    init = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in WideNet().state_dict().items()}
    batches = torch.randn(STEPS, BATCH_PER_RANK, 64, generator=gen)
    return init, batches


def _wide_run(init, batches, rank_batches, model_wrapper, state_dtype, **options):
    """Trains a WideNet; with one intra-op thread, as the ranks run (so that matmuls round alike)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = WideNet()
        model.load_state_dict(init)
        wrapped = model_wrapper(model)
        optimizer = FusedRMSprop(wrapped.parameters(), state_dtype=state_dtype, **options)
        for batch in rank_batches(batches):
            optimizer.zero_grad()
            wrapped(batch).square().mean().backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model, optimizer


def _ddp_low_precision_rank(rank, world_size, init, batches, state_dtype, stochastic_rounding):
    from torch.nn.parallel import DistributedDataParallel as DDP

    options = dict(centered=True, momentum=0.9, max_grad_norm=1.0, stochastic_rounding=stochastic_rounding)
    model, optimizer = _wide_run(init, batches, lambda b: b, DDP, state_dtype, **options)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state": {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()}}


@pytest.mark.parametrize("state_dtype, stochastic_rounding", [("8bit", False), (torch.bfloat16, True)], ids=["8bit", "bf16-stochastic"])
def test_ddp_with_low_precision_state_is_the_single_process_run(state_dtype, stochastic_rounding):
    """Every rank trains on the same batches, so DDP's averaged grads are each rank's own, bit
    for bit ((g + g) / 2 = g): the replicas, their 8-bit codes and scales (or bf16 state, rounded
    stochastically from the same seed) must then be bitwise those of one process."""
    init, batches = _wide_problem(fresh_seed())
    state_dtype_arg = state_dtype
    ranks = run_on_ranks(_ddp_low_precision_rank, init, batches, state_dtype_arg, stochastic_rounding)
    options = dict(centered=True, momentum=0.9, max_grad_norm=1.0, stochastic_rounding=stochastic_rounding)
    model, optimizer = _wide_run(init, batches, lambda b: b, lambda m: m, state_dtype, **options)
    expected_state = {n: optimizer.state[p] for n, p in model.named_parameters()}
    if state_dtype == "8bit":
        assert expected_state["wide.weight"]["grad_var"].dtype == torch.uint8
    for result in ranks:
        for name, p in model.named_parameters():
            assert torch.equal(result["params"][name], p.detach()), name
            for key, value in expected_state[name].items():
                assert torch.equal(result["state"][name][key], value), (name, key)


def _fsdp_low_precision_rank(rank, world_size, init, batches, checkpoint_dir):
    mesh = dc.init_device_mesh("cpu", (world_size,))

    def shard_wide(model):
        dc.fully_shard(model.wide, mesh=mesh)
        dc.fully_shard(model, mesh=mesh)
        return model

    try:
        _wide_run(init, batches, lambda b: b, shard_wide, "8bit")
        refusal = None
    except ValueError as error:
        refusal = str(error)
    options = dict(centered=True, momentum=0.9)
    model, optimizer = _wide_run(init, batches[: STEPS // 2], lambda b: b, shard_wide, torch.bfloat16, **options)
    model_sd, optim_sd = dc.get_state_dict(model, optimizer)
    dc.dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)
    for batch in batches[STEPS // 2:]:
        optimizer.zero_grad()
        model(batch).square().mean().backward()
        optimizer.step()
    unbroken = {n: full(p.detach()) for n, p in model.named_parameters()}
    state_dtypes = {n: {k: v.dtype for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()}

    fresh = WideNet()
    fresh_model = shard_wide(fresh)
    fresh_optimizer = FusedRMSprop(fresh_model.parameters(), state_dtype=torch.bfloat16, **options)
    model_sd, optim_sd = dc.get_state_dict(fresh_model, fresh_optimizer)
    state_dict = {"model": model_sd, "optim": optim_sd}
    dc.dcp.load(state_dict, checkpoint_id=checkpoint_dir)
    dc.set_state_dict(fresh_model, fresh_optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"])
    for batch in batches[STEPS // 2:]:
        fresh_optimizer.zero_grad()
        fresh_model(batch).square().mean().backward()
        fresh_optimizer.step()
    resumed = {n: full(p.detach()) for n, p in fresh_model.named_parameters()}
    return {"refusal": refusal, "unbroken": unbroken, "resumed": resumed, "state_dtypes": state_dtypes}


@requires_fsdp2
@requires_dcp
def test_fsdp2_takes_bf16_state_and_its_checkpoint_and_refuses_8bit(tmp_path):
    init, batches = _wide_problem(fresh_seed())
    ranks = run_on_ranks(_fsdp_low_precision_rank, init, batches, str(tmp_path / "checkpoint"))
    options = dict(centered=True, momentum=0.9)
    model, _ = _wide_run(init, batches, lambda b: b, lambda m: m, torch.bfloat16, **options)
    for result in ranks:
        assert result["refusal"] and "8-bit state is quantized in blocks of 256" in result["refusal"]
        assert result["state_dtypes"]["wide.weight"]["grad_var"] == torch.bfloat16
        for name, p in model.named_parameters():
            # the same elementwise update on shards as on whole tensors: the single process's bits
            assert torch.equal(result["unbroken"][name], p.detach()), name
            assert torch.equal(result["resumed"][name], result["unbroken"][name]), name
