"""Property-based equivalence: every backend equals the reference on inputs nobody wrote by hand.

Hypothesis draws the structure of a step (how many tensors, their sizes from 0 to 10**5 and odd
ones, their layout: contiguous, a view starting a few elements into a larger storage (misaligned
for vector loads), or a transposed dense tensor; the dtype; every option; lr as a float or a
tensor; a grad_scale) and a seed; the values come from torch's generator with that seed, so an
example is small to shrink and to print, and the values are fresh for every example.

Every backend rounds once per operation of csrc/rmsprop_update.h, as the reference does, so the
comparison is bitwise (tests/common.same_bits: NaN payloads aside). Values are drawn
well-conditioned, as in tests/common.make_lists (square_avg >= 2 * grad_avg**2, so that the
centered variance is not the difference of two nearly equal numbers), for failures that point at
a kernel's walk of the tensors rather than at a cancellation; cancellation is covered by
tests/test_reliability_nonfinite.

Two settings profiles:
  reliability-ci    derandomized and database-less: the same examples on every run and machine,
                    so a CI failure reproduces anywhere; a few hundred cases per backend.
  reliability-slow  (--runslow) fresh random examples and many more; a failure prints the
                    example and a @reproduce_failure blob.
Triton in its CPU interpreter runs ~1000x slower than compiled, so it gets fewer, smaller cases.

The cases run with one intra-op thread. On a small machine shared with other jobs, every torch op
over 32k elements wakes the OpenMP pool, and a busy core turns each such op into milliseconds of
waiting: the same 200 cases take ~45 s with 2 threads against ~3 s with one. Results do not depend
on the thread count (the CPU kernel splits the work into fixed chunks, each element computed by the
same code whichever thread runs it); the threaded path is exercised by tests/test_cpu_kernel.py's
2**20-element cases and by a slow test here that keeps the default thread count.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from rmsprop_fused import FusedRMSprop
from rmsprop_fused.functional import rmsprop
from common import assert_same_bits
from reliability_common import BACKEND_DEVICES, LIST_NAMES, one_intra_op_thread, require, unavailable  # noqa: F401

settings.register_profile(
    "reliability-ci", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "reliability-slow", derandomize=False, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Budget:
    examples: int
    max_numel: int  # per tensor
    max_total: int  # per step


# (profile, "compiled" or "interpreted") -> how many examples, how large
BUDGETS = {
    ("reliability-ci", "compiled"): Budget(300, 10**5, 2 * 10**5),
    ("reliability-ci", "interpreted"): Budget(25, 2048, 4096),
    ("reliability-slow", "compiled"): Budget(4000, 10**5, 4 * 10**5),
    ("reliability-slow", "interpreted"): Budget(300, 20000, 40000),
}
OPTIMIZER_EXAMPLES = {"reliability-ci": 1 / 2.5, "reliability-slow": 1 / 4}  # fraction of the above

KERNEL_BACKENDS = [p for p in BACKEND_DEVICES if p.values[0] != "reference"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def speed(backend: str, device: str) -> str:
    return "interpreted" if backend == "triton" and device == "cpu" else "compiled"


def dtypes_for(backend: str, device: str):
    return [d for d in DTYPES if unavailable(backend, device, d) is None]


# ---------------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Layout:
    kind: str  # "contiguous" | "offset" | "transposed"
    numel: int
    offset: int = 0
    rows: int = 1  # "transposed": a (rows, numel // rows) view of a (numel // rows, rows) tensor


@st.composite
def layouts(draw, max_numel: int):
    boundaries = [n for n in (4095, 4096, 4097, 65535, 65536, 65537) if n <= max_numel]
    numel = draw(st.one_of(
        st.integers(0, 17),                               # empty, scalar-like, below one vector
        st.integers(18, min(max_numel, 4200)),            # around vector widths and chunk tails
        st.integers(0, max_numel),                        # anything up to the cap
        *([st.sampled_from(boundaries)] if boundaries else []),  # chunk and block boundaries
    ))
    kind = draw(st.sampled_from(["contiguous", "offset", "transposed"]))
    if kind == "offset":
        return Layout(kind, numel, offset=draw(st.integers(1, 7)))
    if kind == "transposed":
        rows = draw(st.integers(2, 9))
        return Layout(kind, (numel // rows) * rows, rows=rows)
    return Layout(kind, numel)


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    layouts: tuple
    options: dict
    lr_kind: str
    lr: float
    grad_scale: float | None
    magnitude: float
    seed: int


@st.composite
def cases(draw, budget: Budget, dtypes):
    dtype = draw(st.sampled_from(dtypes))
    count = draw(st.integers(1, 6))
    drawn = draw(st.lists(layouts(budget.max_numel), min_size=count, max_size=count))
    while sum(l.numel for l in drawn) > budget.max_total:  # keep the step's total within budget
        drawn = drawn[:-1]
    momentum = draw(st.sampled_from([0.0, 0.0, 0.5, 0.9]) | st.floats(0.0, 0.999))
    options = dict(
        alpha=draw(st.sampled_from([0.99, 0.9, 0.5, 1.0]) | st.floats(0.1, 1.0)),  # <= 0.5: lerp's other formula
        eps=draw(st.sampled_from([1e-8, 1e-10, 1e-6, 1e-3])),
        weight_decay=draw(st.sampled_from([0.0, 0.0, 1e-4, 0.1]) | st.floats(0.0, 1.0)),
        momentum=momentum,
        centered=draw(st.booleans()),
        maximize=draw(st.booleans()),
        eps_in_sqrt=draw(st.booleans()),
        lr_in_momentum=momentum > 0 and draw(st.booleans()),
    )
    low_precision = dtype in (torch.float16, torch.bfloat16)
    lr = draw(st.sampled_from([1e-2, 1e-3, 0.1]) | st.floats(1e-5, 0.1))
    magnitude = 2.0 ** draw(st.integers(-3, 3) if low_precision else st.integers(-20, 20))
    # Weight decay adds wd * p to a gradient of size `magnitude`, and denom is about `magnitude`:
    # the step moves p by about lr * wd / magnitude of itself. Keep that under 10%: a step as large
    # as the weights cancels the whole tensor, and one correct rounding of the operands (torch.sqrt
    # is not always correctly rounded) then exceeds a few ulps of the small result everywhere.
    options["weight_decay"] = min(options["weight_decay"], 0.07 * magnitude / lr)
    return Case(
        dtype=dtype,
        layouts=tuple(drawn),
        options=options,
        lr_kind=draw(st.sampled_from(["float", "tensor", "tensor-float64", "tensor-on-cpu"])),
        lr=lr,
        # a power of two (GradScaler's) or any scale; it divides the grads inside the update. (The
        # scaled grads must fit the dtype: fp16 overflows above 65504.)
        grad_scale=draw(st.none() | st.sampled_from([2.0**10, 0.5] + ([] if dtype == torch.float16 else [2.0**16]))
                        | st.floats(0.5, 1024.0 if dtype == torch.float16 else 1e4)),
        magnitude=magnitude,  # a wide range, but one whose square 16-bit state can hold
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# ------------------------------------------------------------------------------------- values


def draw_values(case: Case):
    """Float64 CPU values per list and tensor (state well-conditioned, see the module docstring)."""
    gen = torch.Generator().manual_seed(case.seed)
    s = case.magnitude
    values = {k: [] for k in LIST_NAMES}
    for layout in case.layouts:
        n = layout.numel
        normal = lambda: torch.randn(n, generator=gen, dtype=torch.float64)  # noqa: E731
        grad_avg = 0.1 * s * normal()
        values["params"].append(normal())
        values["grads"].append(s * normal() * (case.grad_scale or 1.0))  # scaled, as AMP leaves them
        values["square_avgs"].append((torch.rand(n, generator=gen, dtype=torch.float64) + 0.5) * s * s + 2 * grad_avg**2)
        values["grad_avgs"].append(grad_avg)
        values["momentum_buffers"].append(0.1 * normal())
    if not case.options["centered"]:
        values["grad_avgs"] = []
    if case.options["momentum"] <= 0:
        values["momentum_buffers"] = []
    return values


GUARD = 32  # elements of NaN after an "offset" view: a whole AVX-512 vector of fp16 and then some


def materialize(values, case: Case, device: str):
    """Tensors of the case's dtype, on `device`, in each tensor's drawn layout (params, grads and
    state of one index share it, as the fused update requires). An "offset" view sits between
    NaN guard elements of its storage; `guards` lists them, to check that nothing wrote there
    (a vector loop or a scalar tail that runs over the end of a misaligned view)."""
    lists, guards = {}, []
    for key, tensors in values.items():
        lists[key] = []
        for v, layout in zip(tensors, case.layouts):
            v = v.to(case.dtype)
            if layout.kind == "offset":
                storage = torch.full((layout.offset + layout.numel + GUARD,), float("nan"), dtype=case.dtype, device=device)
                t = storage[layout.offset:layout.offset + layout.numel]
                t.copy_(v)
                guards.append((f"{key}[{len(lists[key])}]", storage, layout.offset, layout.offset + layout.numel))
            elif layout.kind == "transposed":
                cols = layout.numel // layout.rows
                t = torch.empty(cols, layout.rows, dtype=case.dtype, device=device).t()
                t.copy_(v.view(layout.rows, cols))
            else:
                t = v.to(device)
            lists[key].append(t)
    return lists, guards


def lr_value(case: Case, device: str):
    if case.lr_kind == "float":
        return case.lr
    if case.lr_kind == "tensor":
        return torch.tensor(case.lr, dtype=torch.float32, device=device)
    if case.lr_kind == "tensor-float64":
        return torch.tensor(case.lr, dtype=torch.float64, device=device)
    return torch.tensor(case.lr)  # on the CPU whatever the params' device: read once on the host


def run(lists, case: Case, backend: str, device: str):
    grad_scale = None if case.grad_scale is None else torch.tensor(case.grad_scale, device=device)
    rmsprop(*(lists[k] for k in LIST_NAMES), lr=lr_value(case, device), grad_scale=grad_scale,
            backend=backend, **case.options)


def check_case(case: Case, backend: str, device: str) -> None:
    values = draw_values(case)
    expected, _ = materialize(values, case, device)
    actual, guards = materialize(values, case, device)
    run(expected, case, "reference", device)
    run(actual, case, backend, device)
    for name, storage, start, end in guards:
        outside = torch.cat([storage[:start], storage[end:]])
        assert torch.isnan(outside).all(), f"{name}: the step wrote outside the tensor ({start}:{end} of its storage)"
    for key in LIST_NAMES:  # grads too: with a grad_scale the unscaled grads are written back
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            assert a.stride() == e.stride() and a.storage_offset() == e.storage_offset()
            assert_same_bits(a, e, name=f"{key}[{i}] ({case.layouts[i]})")


def property_test(profile: str, backend: str, device: str, examples: int | None = None) -> None:
    budget = BUDGETS[(profile, speed(backend, device))]

    @settings(settings.get_profile(profile), max_examples=examples or budget.examples)
    @given(case=cases(budget, dtypes_for(backend, device)))
    def every_backend_equals_the_reference(case):
        check_case(case, backend, device)

    every_backend_equals_the_reference()


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_functional_step_equals_reference(backend, device, one_intra_op_thread):
    property_test("reliability-ci", backend, device)


@pytest.mark.slow
@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_functional_step_equals_reference_many_more(backend, device, one_intra_op_thread):
    property_test("reliability-slow", backend, device)


@pytest.mark.slow
@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_functional_step_equals_reference_with_all_threads(backend, device):
    """Large steps split into chunks that the OpenMP pool updates concurrently."""
    property_test("reliability-slow", backend, device, examples=100 if speed(backend, device) == "compiled" else 20)


# ------------------------------------------------------------------------- through the optimizer

COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


@st.composite
def optimizer_cases(draw, dtypes, max_numel: int):
    """Param groups mixing dtypes (and complex params, updated as view_as_real pairs), transposed
    params, params whose grad is None on some steps, per-group options."""
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        params = []
        for _ in range(draw(st.integers(1, 4))):
            dtype = draw(st.sampled_from(dtypes))
            if dtype in COMPLEX_OF and draw(st.booleans()):
                dtype = COMPLEX_OF[dtype]
            shape = (draw(st.integers(0, 9)), draw(st.integers(0, max_numel // 9)))
            params.append((dtype, shape, draw(st.booleans()), draw(st.sampled_from(["always", "even steps"]))))
        momentum = draw(st.sampled_from([0.0, 0.9]))
        groups.append(dict(
            params=params, lr=draw(st.sampled_from([1e-2, 1e-3])), alpha=draw(st.sampled_from([0.99, 0.9])),
            momentum=momentum, centered=draw(st.booleans()), weight_decay=draw(st.sampled_from([0.0, 0.1])),
            maximize=draw(st.booleans()), eps_in_sqrt=draw(st.booleans()),
            lr_in_momentum=momentum > 0 and draw(st.booleans()), initial_scale=draw(st.sampled_from([0.0, 1.0])),
        ))
    return groups, draw(st.integers(0, 2**32 - 1))


def build(groups, seed, backend, device):
    gen = torch.Generator().manual_seed(seed)
    param_groups, grads = [], []
    for group in groups:
        params = []
        for dtype, shape, transposed, when in group["params"]:
            real = torch.randn(shape[::-1] if transposed else shape, generator=gen, dtype=torch.float64)
            t = (real.t() if transposed else real).to(device)
            t = torch.complex(t, t.flip(0)) if dtype.is_complex else t
            params.append(nn.Parameter(t.to(dtype)))
            grads.append([(torch.randn(shape, generator=gen, dtype=torch.float64), when) for _ in range(3)])
        param_groups.append(dict({k: v for k, v in group.items() if k != "params"}, params=params))
    return FusedRMSprop(param_groups, backend=backend), grads


def check_optimizer_case(groups, seed, backend, device):
    ours, grads = build(groups, seed, backend, device)
    reference, _ = build(groups, seed, "reference", device)
    mine = [p for g in ours.param_groups for p in g["params"]]
    theirs = [p for g in reference.param_groups for p in g["params"]]
    for step in range(3):
        for p, q, g in zip(mine, theirs, grads):
            value, when = g[step]
            if when == "even steps" and step % 2 == 1:
                p.grad = q.grad = None
                continue
            grad = value.to(device)
            grad = torch.complex(grad, -grad) if p.is_complex() else grad
            p.grad = torch.empty_like(p).copy_(grad)  # empty_like keeps the param's strides
            q.grad = torch.empty_like(q).copy_(grad)
        ours.step()
        reference.step()
        for i, (p, q) in enumerate(zip(mine, theirs)):
            real = torch.view_as_real if p.is_complex() else (lambda t: t)
            assert_same_bits(real(p.detach()), real(q.detach()), name=f"param {i}, step {step}")
            assert set(ours.state.get(p, {})) == set(reference.state.get(q, {}))
            for key, value in ours.state.get(p, {}).items():
                if key != "step":
                    assert_same_bits(real(value), real(reference.state[q][key]), name=f"param {i} {key}")
                else:
                    assert torch.equal(value, reference.state[q]["step"])


def optimizer_property_test(profile: str, backend: str, device: str) -> None:
    budget = BUDGETS[(profile, speed(backend, device))]

    @settings(settings.get_profile(profile), max_examples=max(10, int(budget.examples * OPTIMIZER_EXAMPLES[profile])))
    @given(case=optimizer_cases(dtypes_for(backend, device), min(budget.max_numel, 20000)))
    def every_backend_steps_an_optimizer_like_the_reference(case):
        check_optimizer_case(*case, backend, device)

    every_backend_steps_an_optimizer_like_the_reference()


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_optimizer_steps_equal_reference(backend, device, one_intra_op_thread):
    optimizer_property_test("reliability-ci", backend, device)


@pytest.mark.slow
@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_optimizer_steps_equal_reference_many_more(backend, device, one_intra_op_thread):
    optimizer_property_test("reliability-slow", backend, device)


# ------------------------------------------------------------------------------ pinned examples

def _param_cancels_in_fp16(backend, device):
    """Hand-made: one fp16 element where p - lr * g / denom cancels to -2.4e-5 (2**-24 apart)."""
    lists = {
        "params": [torch.tensor([-1.453125, 1.0], dtype=torch.float16, device=device)],
        "grads": [torch.tensor([-1.1455078125, 1.0], dtype=torch.float16, device=device)],
        "square_avgs": [torch.tensor([0.1436767578125, 1.0], dtype=torch.float16, device=device)],
        "grad_avgs": [], "momentum_buffers": [],
    }
    expected = {k: [t.clone() for t in v] for k, v in lists.items()}
    rmsprop(*(expected[k] for k in LIST_NAMES), lr=0.5, backend="reference")
    rmsprop(*(lists[k] for k in LIST_NAMES), lr=0.5, backend=backend)
    assert abs(expected["params"][0][0].item()) < 3e-5  # the cancellation this case is about
    assert_same_bits(lists["params"][0], expected["params"][0], name="params[0]")


def _momentum_buffer_crosses_zero_in_fp16(backend, device):
    """Found by the slow profile: ordinary hyperparameters, an fp16 momentum buffer element that
    passes near zero on the third step (0.0001411 against 0.0001402)."""
    groups = [{
        "params": [(torch.float16, (8, 1696), False, "even steps"), (torch.float16, (0, 0), False, "always")],
        "lr": 0.01, "alpha": 0.99, "momentum": 0.9, "centered": True, "weight_decay": 0.0, "maximize": False,
        "eps_in_sqrt": False, "lr_in_momentum": False, "initial_scale": 0.0,
    }]
    check_optimizer_case(groups, 1, backend, device)


PINNED = {"fp16-param-cancels": _param_cancels_in_fp16, "fp16-momentum-buffer-crosses-zero": _momentum_buffer_crosses_zero_in_fp16}


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
@pytest.mark.parametrize("example", PINNED)
def test_pinned_examples(backend, device, example):
    """Examples kept for good: each one failed once, by one rounding of the reference's torch.sqrt
    against the kernel's correctly rounded sqrtf, under cancellation (the 16-bit tolerance of
    tests/common.py covers it)."""
    require(backend, device, torch.float16)
    PINNED[example](backend, device)
