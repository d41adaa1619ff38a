"""Validation before mutation: a step that is refused changes nothing, on every backend.

An optimizer step writes params and state in place. If it checks a tensor only when it reaches
it, a bad tensor in the last group leaves the earlier groups stepped and the later ones not: a
model that is silently half a step ahead of its optimizer state. So every test below puts the
bad input LAST (the last index of the lists, the last param of the last group), so that an
implementation that validates lazily has already written something when it fails, and then
compares the bits of every param, grad and state tensor before and after (Snapshot: bitwise,
so even a NaN payload or the sign of a zero must survive).

Every error must name the param (list index at the functional level; "param group G, param I"
in the optimizer) and the problem. tests/test_errors.py covers part of this matrix through
FusedRMSprop on CPU tensors; these tests add the functional level, the remaining combinations,
and every backend and device.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import rmsprop_fused
from rmsprop_fused import BackendUnavailableError, FusedRMSprop, InvalidInputError, SparseGradientError
from rmsprop_fused.functional import rmsprop
from common import available, make_lists
from reliability_common import BACKEND_DEVICES, GPU, Snapshot, bits, require

SHAPE = (4, 6)
N = 3  # tensors per list; the bad one is always the last
BAD = N - 1


def lists_2d(device, dtype=torch.float32, seed=0):
    """N tensors of SHAPE per list, with the full state of a centered, momentum step."""
    flat = make_lists([SHAPE[0] * SHAPE[1]] * N, dtype, device, centered=True, momentum=0.9, seed=seed)
    return {k: [t.view(SHAPE) for t in v] for k, v in flat.items()}


def call(lists, backend, **options):
    options = {"centered": True, "momentum": 0.9, **options}
    rmsprop(lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"], lists["momentum_buffers"],
            backend=backend, **options)


def other_device(device):
    return "cpu" if device != "cpu" else ("cuda" if GPU else None)


# ---------------------------------------------------------------------------------- functional

# A companion (grad or state tensor) that does not match its param. `make` receives the good tensor.
COMPANION_DEFECTS = {
    "meta-device": (lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), r"on meta but the param is"),
    "other-device": (lambda t: t.to(other_device(str(t.device.type))), r"on (cpu|cuda\S*) but the param is"),
    "dtype": (lambda t: t.to(torch.float64 if t.dtype != torch.float64 else torch.float32), r"is float(64|32) \(4, 6\)"),
    # Same number of elements, different shape: a check on numel alone would let it through.
    "shape": (lambda t: t.reshape(SHAPE[::-1]).clone(), r"is float32 \(6, 4\)"),
    # Memory holds -x and a flag says to negate on reading: a kernel writing memory loses the flag.
    "negative-view": (lambda t: torch._neg_view(t.neg()), r"is a negative view"),
}


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("target", ["grads", "square_avgs", "grad_avgs", "momentum_buffers"])
@pytest.mark.parametrize("defect", COMPANION_DEFECTS)
def test_functional_refuses_a_mismatched_companion_and_changes_nothing(backend, device, target, defect):
    require(backend, device, torch.float32)
    make, message = COMPANION_DEFECTS[defect]
    if defect == "other-device" and other_device(device) is None:
        pytest.skip("needs a second device type (a GPU)")
    lists = lists_2d(device)
    lists[target][BAD] = make(lists[target][BAD])
    before = Snapshot.of_lists(lists)
    with pytest.raises(InvalidInputError, match=re.escape(f"{target}[{BAD}]") + ".*" + message) as info:
        call(lists, backend)
    assert info.value.index == BAD
    before.assert_unchanged(Snapshot.of_lists(lists))


def _all_at_bad(lists, make):
    for key in ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers"):
        lists[key][BAD] = make(lists[key][BAD])


# The param itself is unusable. (A view with gaps, or a grad laid out otherwise, is usable: the
# step updates a dense copy, tests/test_layouts.py.)
PARAM_DEFECTS = {
    # internally overlapping: four rows that are one row in memory (an update would apply 4 times)
    "overlap": (lambda t: t[:1].clone().expand(SHAPE), InvalidInputError,
                r"params\[2\] has overlapping elements \(strides \(0, 1\) for shape \(4, 6\)\)"),
    "meta": (lambda t: torch.empty(SHAPE, dtype=t.dtype, device="meta"), InvalidInputError,
             r"params\[2\] is on the meta device"),
    "negative-view": (COMPANION_DEFECTS["negative-view"][0], InvalidInputError, r"params\[2\] is a negative view"),
}


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("defect", PARAM_DEFECTS)
def test_functional_refuses_an_unusable_param_and_changes_nothing(backend, device, defect):
    require(backend, device, torch.float32)
    make, error, message = PARAM_DEFECTS[defect]
    lists = lists_2d(device)
    _all_at_bad(lists, make)
    before = Snapshot.of_lists(lists)
    with pytest.raises(error, match=message):
        call(lists, backend)
    before.assert_unchanged(Snapshot.of_lists(lists))


# Other unusable inputs, by name; _spoil puts one at index BAD.
OTHER_DEFECTS = ("sparse-grad", "sparse-param", "integer-param", "missing-grad")


def _spoil(lists, defect):
    if defect == "sparse-grad":
        lists["grads"][BAD] = lists["grads"][BAD].to_sparse()
    elif defect == "sparse-param":
        _all_at_bad(lists, lambda t: t.to_sparse())
    elif defect == "integer-param":
        _all_at_bad(lists, lambda t: t.round().long())
    elif defect == "missing-grad":  # [p.grad for p in params] with a param that got no gradient
        lists["grads"][BAD] = None
    else:
        raise AssertionError(defect)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("defect, message", [
    ("sparse-grad", r"RMSprop does not support sparse gradients \(grads\[2\] has layout torch.sparse_coo\)"),
    ("sparse-param", r"params\[2\] has layout torch.sparse_coo; only strided params are supported"),
    ("integer-param", r"params\[2\] has dtype torch.int64; RMSprop updates floating-point params"),
    ("missing-grad", r"grads\[2\] is a NoneType, not a tensor"),
])
def test_functional_refuses_other_bad_tensors_and_changes_nothing(backend, device, defect, message):
    require(backend, device, torch.float32)
    lists = lists_2d(device)
    _spoil(lists, defect)
    before = Snapshot.of_lists(lists)
    expected = SparseGradientError if defect == "sparse-grad" else InvalidInputError
    with pytest.raises(expected, match=message):
        call(lists, backend)
    if defect == "sparse-grad":  # torch.optim.RMSprop raises a RuntimeError here: so must we
        with pytest.raises(RuntimeError):
            call(lists, backend)
    before.assert_unchanged(Snapshot.of_lists(lists))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("name, value, message", [
    ("lr", math.nan, "Invalid learning rate: nan"),
    ("lr", -1e-3, "Invalid learning rate: -0.001"),
    ("alpha", math.nan, "Invalid alpha value: nan"),
    ("alpha", -0.5, "Invalid alpha value: -0.5"),
    ("eps", math.nan, "Invalid epsilon value: nan"),
    ("eps", -1e-8, "Invalid epsilon value: -1e-08"),
    ("weight_decay", math.nan, "Invalid weight_decay value: nan"),
    ("weight_decay", -0.1, "Invalid weight_decay value: -0.1"),
    ("momentum", math.nan, "Invalid momentum value: nan"),
    ("momentum", -0.9, "Invalid momentum value: -0.9"),
    ("lr", torch.tensor([1e-3, 1e-3]), "Tensor lr must be 1-element"),
    ("grad_scale", torch.tensor([1.0, 2.0]), "grad_scale must be a 1-element floating-point tensor"),
    ("found_inf", torch.tensor(1), "found_inf must be a 1-element floating-point tensor"),
    pytest.param("lr", torch.tensor(math.nan), "Invalid learning rate", id="lr-tensor-nan"),
    pytest.param("lr", torch.tensor(-1e-3), "Invalid learning rate", id="lr-tensor-negative"),
    pytest.param("lr", torch.tensor(1), "Tensor lr must be a floating-point tensor", id="lr-tensor-integer"),
])
def test_functional_refuses_invalid_hyperparameters_and_changes_nothing(backend, device, name, value, message):
    require(backend, device, torch.float32)
    lists = lists_2d(device)
    before = Snapshot.of_lists(lists)
    with pytest.raises(ValueError, match=re.escape(message)):
        call(lists, backend, **{name: value})
    before.assert_unchanged(Snapshot.of_lists(lists))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("target", ["params", "grads", "square_avgs", "momentum_buffers"])
def test_functional_refuses_conjugate_views_and_changes_nothing(backend, device, target):
    """torch.conj is lazy: memory holds the unconjugated values and a flag says to conjugate on
    reading. The complex tensors' real views (torch.view_as_real) cannot carry the flag."""
    require(backend, device, torch.float32)
    lists = {k: [torch.complex(t, t.flip(0)) for t in v] for k, v in lists_2d(device).items()}
    if target == "params":
        _all_at_bad(lists, torch.conj)
    else:
        lists[target][BAD] = lists[target][BAD].conj()
    before = Snapshot.of_lists(lists)
    with pytest.raises(InvalidInputError, match=re.escape(f"{target}[{BAD}]") + " is a conjugate view"):
        call(lists, backend)
    before.assert_unchanged(Snapshot.of_lists(lists))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_functional_refuses_missing_state_and_a_missing_param(backend):
    """None is "state not created yet" to the optimizer, which creates it after the checks; the
    functional form creates nothing, so a None anywhere is an error naming it."""
    lists = lists_2d("cpu")
    lists["grad_avgs"][BAD] = None
    with pytest.raises(InvalidInputError, match=re.escape(f"grad_avgs[{BAD}] is None")):
        call(lists, backend)
    lists = lists_2d("cpu")
    lists["params"][BAD] = None
    with pytest.raises(InvalidInputError, match=re.escape(f"params[{BAD}] is a NoneType, not a tensor")):
        call(lists, backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_functional_with_empty_lists_does_nothing(backend):
    rmsprop([], [], [], backend=backend)
    rmsprop([], [], [], [], [], centered=True, momentum=0.9, backend=backend)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_functional_refuses_inference_tensors_and_changes_nothing(backend, device):
    """A tensor created under torch.inference_mode() may not be updated in place outside it (torch
    raises, and keeps no version counter for it). The check must come before the first write: the
    reference backend raises from copy_ after updating the tensors before it, and the compiled
    kernel writes through data pointers, so it does not raise at all."""
    require(backend, device, torch.float32)
    lists = lists_2d(device)
    with torch.inference_mode():
        for key in ("params", "square_avgs", "grad_avgs", "momentum_buffers"):
            lists[key][BAD] = lists[key][BAD].clone()
    before = Snapshot.of_lists(lists)
    with pytest.raises(InvalidInputError, match=re.escape(f"params[{BAD}]") + ".*inference"):
        call(lists, backend)
    before.assert_unchanged(Snapshot.of_lists(lists))


@pytest.mark.skipif(not available("cpu"), reason="the C++ extension is not built")
@pytest.mark.parametrize("list_name", ["state_steps", "square_avg_scales", "momentum_buffer_scales"])
def test_the_op_refuses_inference_counters_and_scales_before_writing(list_name):
    """torch.ops.rmsprop_fused.rmsprop_ is an entry of its own: it writes the step counters and
    the scales too, so it refuses them as inference tensors outside inference mode, before
    anything is written (or any version counter moved)."""
    lists = make_lists([4096, 300], torch.float32, momentum=0.9, state_dtype=torch.uint8, steps=True, seed=5)
    with torch.inference_mode():
        lists[list_name][1] = lists[list_name][1].clone()
    before = Snapshot.of_lists(lists)
    versions = [t._version for tensors in lists.values() for t in tensors if not t.is_inference()]
    with pytest.raises(ValueError, match=re.escape(f"{list_name}[1] is an inference tensor")):
        torch.ops.rmsprop_fused.rmsprop_(
            lists["params"], lists["grads"], lists["square_avgs"], [], lists["momentum_buffers"], lists["state_steps"],
            lists["square_avg_scales"], [], lists["momentum_buffer_scales"], lr=1e-2, alpha=0.99, eps=1e-8,
            weight_decay=0.0, momentum=0.9, centered=False, maximize=False, eps_in_sqrt=False, lr_in_momentum=False,
            decoupled_weight_decay=False, nesterov=False, bias_correction=False, variance_state=False,
        )
    before.assert_unchanged(Snapshot.of_lists(lists))
    assert versions == [t._version for tensors in lists.values() for t in tensors if not t.is_inference()]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_step_in_inference_mode_bumps_normal_tensors_versions(backend):
    """Inside inference mode torch's in-place ops still bump a normal tensor's version counter
    (the ADInplaceOrView layer runs for it): so does the step, on every backend."""
    if not available(backend):
        pytest.skip(f"the {backend} backend is not available here")
    lists = make_lists([5, 300], torch.float32, momentum=0.9, steps=True, seed=6)
    versions = [t._version for t in lists["params"] + lists["square_avgs"] + lists["state_steps"]]
    with torch.inference_mode():
        rmsprop(lists["params"], lists["grads"], lists["square_avgs"], [], lists["momentum_buffers"],
                state_steps=lists["state_steps"], momentum=0.9, backend=backend)
    after = [t._version for t in lists["params"] + lists["square_avgs"] + lists["state_steps"]]
    assert all(a > b for a, b in zip(after, versions))


# The fast check. A step reads each param's metadata in one C++ pass (first_irregular) and runs
# the full Python checks only from the first param that pass does not accept: so for every input
# the full checks refuse, the fast check must stop at that param, never before a good one and never
# let the bad one through.

def _fast_check(lists, centered=True, momentum=True):
    from rmsprop_fused import _extension
    from rmsprop_fused.functional import first_irregular

    if _extension.load_error is not None:
        pytest.skip(f"the fast check is compiled: {_extension.load_error}")
    return first_irregular(lists["params"], lists["grads"], lists["square_avgs"],
                           lists["grad_avgs"] if centered else [], lists["momentum_buffers"] if momentum else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fast_check_accepts_plain_params(dtype, layout):
    if layout == "channels_last":  # dense in another dimension order, the same in every list
        lists = {k: [torch.randn(2, 3, 4, 5, dtype=dtype).to(memory_format=torch.channels_last) for _ in range(N)]
                 for k in ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers")}
    else:
        lists = lists_2d("cpu", dtype if not dtype.is_complex else torch.float32)
        if dtype.is_complex:
            lists = {k: [torch.complex(t, t.flip(0)) for t in v] for k, v in lists.items()}
    lists["params"] = [nn.Parameter(p) for p in lists["params"]]
    assert _fast_check(lists) == -1
    # state not created yet (a param's first step) is not a defect
    lists["square_avgs"][BAD] = lists["grad_avgs"][0] = None
    assert _fast_check(lists) == -1
    with torch.inference_mode():  # inference tensors may be written inside inference mode
        inference = {k: [t.clone() if t is not None else None for t in v] for k, v in lists.items()}
        assert _fast_check(inference) == -1


def _bad_at(defect):
    """lists_2d with `defect` at index BAD, by the names of the catalogues above."""
    lists = lists_2d("cpu")
    kind, _, name = defect.partition(":")
    if kind in ("grads", "square_avgs", "grad_avgs", "momentum_buffers"):
        lists[kind][BAD] = COMPANION_DEFECTS[name][0](lists[kind][BAD])
    elif kind == "param":
        _all_at_bad(lists, PARAM_DEFECTS[name][0])
    elif defect in OTHER_DEFECTS:
        _spoil(lists, defect)
    elif defect in ("inference-param", "inference-state"):
        with torch.inference_mode():
            lists["params" if defect == "inference-param" else "momentum_buffers"][BAD] = torch.randn(SHAPE)
    else:
        raise AssertionError(defect)
    return lists


FAST_CHECK_DEFECTS = (
    [f"{target}:{name}" for target in ("grads", "square_avgs", "grad_avgs", "momentum_buffers")
     for name in COMPANION_DEFECTS if name != "other-device"]
    + [f"param:{name}" for name in PARAM_DEFECTS]
    + list(OTHER_DEFECTS) + ["inference-param", "inference-state"]
)
# What the kernels cannot walk but the step takes through a dense copy: the fast check must stop
# at these too, so that the full checks (which send them to the copy) see them.
IRREGULAR_LAYOUTS = {
    "grads:strides": lambda lists: lists["grads"].__setitem__(BAD, lists["grads"][BAD].t().contiguous().t()),
    "square_avgs:strides": lambda lists: lists["square_avgs"].__setitem__(BAD, lists["square_avgs"][BAD].t().contiguous().t()),
    "param:gaps": lambda lists: _all_at_bad(lists, lambda t: torch.zeros(4, 12, dtype=t.dtype)[:, ::2].copy_(t)),
}


@pytest.mark.parametrize("defect", FAST_CHECK_DEFECTS)
def test_fast_check_stops_at_every_input_the_full_checks_refuse(defect):
    lists = _bad_at(defect)
    assert _fast_check(lists) == BAD
    with pytest.raises((InvalidInputError, SparseGradientError, BackendUnavailableError)):
        call(lists, "auto")  # ... and what it stops at is refused


@pytest.mark.parametrize("layout", IRREGULAR_LAYOUTS)
def test_fast_check_stops_at_layouts_the_kernels_cannot_walk(layout):
    lists = lists_2d("cpu")
    IRREGULAR_LAYOUTS[layout](lists)
    assert _fast_check(lists) == BAD
    expected = {k: [t.clone() for t in v] for k, v in lists.items()}  # dense copies
    call(lists, "auto")  # ... and the step takes them, as the reference does the dense copies
    call(expected, "reference")
    for key in ("params", "square_avgs", "grad_avgs", "momentum_buffers"):
        assert all(torch.equal(a, e) for a, e in zip(lists[key], expected[key])), key


def test_full_checks_run_only_from_the_first_irregular_param(monkeypatch):
    """The point of the fast check: a step of plain params runs no per-param Python checks, and
    one irregular param costs the full checks from that param on."""
    from rmsprop_fused import _extension, functional, optimizer

    if _extension.load_error is not None:
        pytest.skip(f"the fast check is compiled: {_extension.load_error}")
    checked = []

    def recording(check):
        def check_param(index, *args, **kwargs):
            checked.append(index)
            return check(index, *args, **kwargs)
        return check_param

    monkeypatch.setattr(optimizer, "check_param", recording(optimizer.check_param))
    monkeypatch.setattr(functional, "check_param", recording(functional.check_param))
    params = [nn.Parameter(torch.randn(SHAPE)) for _ in range(N)]
    opt = FusedRMSprop(params, momentum=0.9, centered=True)
    for _ in range(2):  # the first step creates the state, the second reads it
        for p in params:
            p.grad = torch.randn(SHAPE)
        opt.step()
    assert checked == []
    call(lists_2d("cpu"), "auto")
    assert checked == []

    lists = lists_2d("cpu")
    _all_at_bad(lists, lambda t: t.to(torch.float8_e4m3fn))  # irregular, and accepted (reference backend)
    call(lists, "auto")
    assert checked == [BAD]


def test_fast_check_reads_the_step_counters_and_the_8bit_scales(monkeypatch):
    """The optimizer passes its step lists (step counters, then 8-bit scales: the op's order) on
    to the fast check: 8-bit state with its scales is plainly acceptable, and a bad step counter is
    found there, so that the error names its param."""
    from rmsprop_fused import _extension, optimizer

    if _extension.load_error is not None:
        pytest.skip(f"the fast check is compiled: {_extension.load_error}")
    checked = []

    def check_param(index, *args, **kwargs):
        checked.append(index)
        return functional_check_param(index, *args, **kwargs)

    functional_check_param = optimizer.check_param
    monkeypatch.setattr(optimizer, "check_param", check_param)
    params = [nn.Parameter(torch.randn(64, 64)) for _ in range(N)]  # 4,096 elements: 8-bit state
    opt = FusedRMSprop(params, momentum=0.9, centered=True, state_dtype="8bit")
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt.state[params[0]]["momentum_buffer"].dtype == torch.uint8
    assert checked == []

    plain = [nn.Parameter(torch.randn(SHAPE)) for _ in range(N)]
    opt = FusedRMSprop(plain, momentum=0.9)
    for p in plain:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.state[plain[BAD]]["step"] = torch.tensor(1.0, dtype=torch.float64)
    before = [p.detach().clone() for p in plain]
    with pytest.raises(InvalidInputError, match=re.escape(f"param group 0, param {BAD}: state['step']")):
        opt.step()
    assert checked == [BAD]
    assert all(torch.equal(p, b) for p, b in zip(plain, before))


def test_fast_check_leaves_tensor_subclasses_to_the_full_checks():
    """A subclass (DTensor, say) would route the op to its own __torch_function__, and its rules
    are the full checks' business: the Python side sends every param there."""

    class Tagged(torch.Tensor):
        pass

    lists = lists_2d("cpu")
    lists["grads"][BAD] = lists["grads"][BAD].as_subclass(Tagged)
    assert _fast_check(lists) == 0


def test_fast_check_leaves_dtypes_without_a_compiled_kernel_to_the_full_checks():
    """float8 is floating point, but only the reference backend takes it: backend selection, after
    the full checks, decides."""
    lists = lists_2d("cpu")
    _all_at_bad(lists, lambda t: t.to(torch.float8_e4m3fn))
    assert _fast_check(lists) == BAD


# The op itself walks only dense tensors laid out as their params (the functional entry makes
# dense copies of the others): a grad of other strides and a view with gaps are refused there.
OP_LAYOUT_DEFECTS = {
    "strides": (lambda t: t.t().contiguous().t(), r"has strides \(1, 4\) but params\[2\] has strides \(6, 1\)"),
    "gaps": (lambda t: torch.zeros(4, 12, dtype=t.dtype, device=t.device)[:, ::2].copy_(t), r"is not dense"),
}


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("defect", [
    "dtype", "shape", "strides", "gaps", "sparse-grad", "shared-memory",
    # The Meta dispatch key outranks CPU and CUDA: one meta tensor among real ones sends the call
    # to the fake implementation registered in _extension.py, which returns without a word.
    "meta-device",
    # torch's Negative fallback refuses a mutable list holding a negative view before any kernel
    # (the op's own check of it, in csrc/rmsprop_op.h, is a backstop)
    "negative-view",
])
def test_compiled_op_checks_everything_before_writing(backend, defect):
    """The C++ op is a public entry too (torch.ops.rmsprop_fused.rmsprop_, torch.compile calls it
    directly): it repeats the checks itself, and must also refuse before its first write."""
    device = backend
    require(backend, device, torch.float32)
    lists = lists_2d(device)
    if defect == "negative-view":
        lists["momentum_buffers"][BAD] = COMPANION_DEFECTS[defect][0](lists["momentum_buffers"][BAD])
        where = None
    elif defect == "strides":
        lists["momentum_buffers"][BAD] = OP_LAYOUT_DEFECTS[defect][0](lists["momentum_buffers"][BAD])
        where = f"momentum_buffers[{BAD}]"
    elif defect in COMPANION_DEFECTS:
        lists["momentum_buffers"][BAD] = COMPANION_DEFECTS[defect][0](lists["momentum_buffers"][BAD])
        where = f"momentum_buffers[{BAD}]"
    elif defect == "gaps":
        _all_at_bad(lists, OP_LAYOUT_DEFECTS["gaps"][0])
        where = f"params[{BAD}]"
    elif defect == "shared-memory":  # p.grad = p
        lists["grads"][BAD] = lists["params"][BAD]
        where = f"params[{BAD}] and grads[{BAD}] share memory"
    else:
        lists["grads"][BAD] = lists["grads"][BAD].to_sparse()
        where = None  # the dispatcher refuses it first ("Could not run ... 'SparseCPU' backend")
    before = Snapshot.of_lists(lists)
    refusal = re.escape(where) if where else ("negation" if defect == "negative-view" else "Sparse")
    # The op's own checks raise ValueError; the dispatcher's refusals (sparse, negative view)
    # are RuntimeErrors.
    with pytest.raises(ValueError if where else RuntimeError, match=refusal):
        torch.ops.rmsprop_fused.rmsprop_(
            lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"], lists["momentum_buffers"],
            [], [], [], [], lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9, centered=True,
            maximize=False, eps_in_sqrt=False, lr_in_momentum=False, decoupled_weight_decay=False,
            nesterov=False, bias_correction=False, variance_state=False,
        )
    before.assert_unchanged(Snapshot.of_lists(lists))


# ----------------------------------------------------------------------------------- optimizer


def trained_optimizer(backend, device, **options):
    """Two groups of two params; one step taken so that every state tensor exists; fresh grads.
    The param a test spoils is the last one: group 1, param 1."""
    torch.manual_seed(0)
    a, b, c, d = (nn.Parameter(torch.randn(s, device=device)) for s in ((3, 2), (5,), (2, 3), SHAPE))
    options = {"momentum": 0.9, "centered": True, **options}
    opt = FusedRMSprop([{"params": [a, b]}, {"params": [c, d], "lr": 0.1}], backend=backend, **options)
    for p in (a, b, c, d):
        p.grad = torch.randn_like(p)
    opt.step()
    for p in (a, b, c, d):
        p.grad = torch.randn_like(p)
    return opt, (a, b, c, d)


def refused_step_changes_nothing(opt, error, message):
    before = Snapshot.of_optimizer(opt)
    with pytest.raises(error, match=message):
        opt.step()
    before.assert_optimizer_unchanged(opt)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("key", ["square_avg", "grad_avg", "momentum_buffer"])
@pytest.mark.parametrize("defect", COMPANION_DEFECTS)
def test_optimizer_refuses_mismatched_state_and_changes_nothing(backend, device, key, defect):
    require(backend, device, torch.float32)
    if defect == "other-device" and other_device(device) is None:
        pytest.skip("needs a second device type (a GPU)")
    opt, (a, b, c, d) = trained_optimizer(backend, device)
    make, message = COMPANION_DEFECTS[defect]
    opt.state[d][key] = make(opt.state[d][key])
    refused_step_changes_nothing(opt, InvalidInputError, re.escape(f"param group 1, param 1: state['{key}']") + ".*" + message)


@pytest.mark.parametrize("backend, device", [p for p in BACKEND_DEVICES if p.values[1] != "cpu"])
@pytest.mark.parametrize("defect", ["dtype", "shape", "sparse"])
def test_optimizer_refuses_a_bad_grad_on_other_devices(backend, device, defect):
    """tests/test_errors.py checks these on CPU tensors; the same on every other device. (A grad
    on another device cannot be attached to a param at all: autograd's .grad setter refuses it.)"""
    require(backend, device, torch.float32)
    opt, (a, b, c, d) = trained_optimizer(backend, device)
    if defect == "sparse":
        d.grad = d.grad.to_sparse()
        error, message = SparseGradientError, "param group 1, param 1: RMSprop does not support sparse gradients"
    else:
        d.grad.data = COMPANION_DEFECTS[defect][0](d.grad)  # the .grad setter refuses these; swapping .data does not
        error, message = InvalidInputError, "param group 1, param 1: grad"
    refused_step_changes_nothing(opt, error, message)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("defect, message", [("overlap", "has overlapping elements"),
                                             ("negative-view", "is a negative view")])
def test_optimizer_refuses_an_unusable_param_on_every_backend(backend, device, defect, message):
    """tests/test_errors.py checks density with backend="auto" and a single param; here every
    backend, after a step (state exists for the other params) and with the bad param last."""
    require(backend, device, torch.float32)
    opt, (a, b, c, d) = trained_optimizer(backend, device)
    make = PARAM_DEFECTS[defect][0]
    bad = nn.Parameter(make(d.detach()))
    bad.grad = make(d.grad)  # the same defect as the param, so the param's own check is what fails
    opt.param_groups[1]["params"][1] = bad
    opt.state.pop(d)
    refused_step_changes_nothing(opt, InvalidInputError, f"param group 1, param 1: param {message}")
    assert bad not in opt.state


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_optimizer_refuses_a_meta_param_naming_it(backend, device):
    """A model that was not fully materialised (e.g. one param left on meta after to_empty on a
    sub-module). With backend="auto" or "reference" the step refuses it by name; with an explicit
    kernel backend the constructor does, naming it too."""
    require(backend, device, torch.float32)
    torch.manual_seed(1)
    a = nn.Parameter(torch.randn(3, device=device))
    meta = nn.Parameter(torch.empty(SHAPE, device="meta"))
    a.grad, meta.grad = torch.randn_like(a), torch.empty(SHAPE, device="meta")
    before_a = a.detach().clone()
    try:
        opt = FusedRMSprop([{"params": [a]}, {"params": [meta]}], backend=backend)
        opt.step()
    except (InvalidInputError, BackendUnavailableError) as e:
        assert "meta" in str(e)
        assert "param group 1, param 0" in str(e), f"the error does not name the param: {e}"
    else:
        pytest.fail("a meta param was accepted")
    assert torch.equal(a.detach(), before_a)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("key, value, message", [
    ("lr", math.nan, "Invalid learning rate: nan"),
    ("alpha", math.nan, "Invalid alpha value: nan"),
    ("alpha", -0.5, "Invalid alpha value: -0.5"),
    ("eps", -1e-8, "Invalid epsilon value"),
    ("weight_decay", math.nan, "Invalid weight_decay value: nan"),
    ("weight_decay", -0.1, "Invalid weight_decay value: -0.1"),
    ("momentum", math.nan, "Invalid momentum value: nan"),
    ("initial_scale", -1.0, "Invalid initial_scale value: -1.0"),
    ("initial_scale", math.inf, "Invalid initial_scale value: inf"),
    pytest.param("lr", torch.tensor(math.nan), "Invalid learning rate", id="lr-tensor-nan"),
    pytest.param("lr", torch.tensor(-0.1), "Invalid learning rate", id="lr-tensor-negative"),
    # A valid name, but a backend that cannot update this group's tensors here.
    pytest.param("backend", "unavailable", "cannot update", id="backend-unavailable"),
])
def test_a_group_changed_after_construction_refuses_the_whole_step(backend, device, key, value, message):
    """tests/test_errors.py covers lr=-0.5, eps=NaN, momentum=-1 and an invalid backend name; these
    are the other NaN/negative values, tensor lrs and a valid-but-unavailable backend."""
    require(backend, device, torch.float32)
    opt, _ = trained_optimizer(backend, device)
    if value == "unavailable":
        value = "cuda" if device == "cpu" else "cpu"
        exception = BackendUnavailableError
    else:
        exception = ValueError
    opt.param_groups[1][key] = value  # the LAST group is bad: the first must not be stepped either
    refused_step_changes_nothing(opt, exception, re.escape(message))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("defect", ["unavailable-backend", "nan-lr"])
def test_add_param_group_refuses_a_bad_group_up_front(backend, device, defect):
    """torch's add_param_group checks nothing; FusedRMSprop's runs the constructor's checks: a group
    whose backend cannot run here, or whose lr is NaN, is refused (naming the param where there is
    one) and not added, and the optimizer is as it was."""
    require(backend, device, torch.float32)
    opt, _ = trained_optimizer(backend, device)
    e = nn.Parameter(torch.randn(7, device=device))
    e.grad = torch.randn_like(e)
    before = Snapshot.of_optimizer(opt)
    groups = len(opt.param_groups)
    if defect == "unavailable-backend":
        group, error, message = {"backend": "cuda" if device == "cpu" else "cpu"}, BackendUnavailableError, f"param group {groups}, param 0: .*cannot update"
    else:
        group, error, message = {"lr": math.nan}, ValueError, "Invalid learning rate: nan"
    with pytest.raises(error, match=message):
        opt.add_param_group({"params": [e], **group})
    assert len(opt.param_groups) == groups
    before.assert_optimizer_unchanged(opt)


# ---------------------------------------------------------------------------------- state_dict


def other_optimizers_state_dict(kind, params):
    a, b, c, d = params
    groups = [{"params": [a, b]}, {"params": [c, d]}]
    if kind == "sgd-momentum":
        other = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    else:
        other = torch.optim.Adam(groups)
    if kind != "adam-never-stepped":
        other.step()  # moves the shared params too; the snapshot is taken afterwards
    return other.state_dict()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("kind", [
    # SGD's state key is "momentum_buffer", which RMSprop also uses: the key check lets it in. Its
    # groups lack alpha, eps and centered; the next step then fails with KeyError: 'alpha'.
    "sgd-momentum",
    # Adam before its first step has no state at all, only groups without alpha: same outcome.
    "adam-never-stepped",
])
def test_another_optimizers_state_dict_is_refused_and_changes_nothing(backend, device, kind):
    """tests/test_errors.py covers an Adam state_dict after a step (refused by its state keys)."""
    require(backend, device, torch.float32)
    opt, params = trained_optimizer(backend, device)
    saved = other_optimizers_state_dict(kind, params)
    before = Snapshot.of_optimizer(opt)
    with pytest.raises(ValueError, match=r"param group 0.*(another optimizer|not RMSprop)"):
        opt.load_state_dict(saved)
    before.assert_optimizer_unchanged(opt)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("key, bad, message", [
    ("grad_avg", lambda t: torch.zeros(t.numel() + 1, device=t.device), r"state 'grad_avg' has shape \(25,\)"),
    ("momentum_buffer", lambda t: t.reshape(SHAPE[::-1]).clone(), r"state 'momentum_buffer' has shape \(6, 4\)"),
    ("square_avg", lambda t: t.long(), r"state 'square_avg' has dtype torch.int64"),
    ("momentum_buffer", lambda t: t.tolist(), r"state 'momentum_buffer' has shape list"),
])
def test_state_dict_with_wrong_state_tensors_is_refused(backend, device, key, bad, message):
    """tests/test_errors.py covers a square_avg of the wrong shape; here the other keys, a state
    tensor of an integer dtype, and a state value that is not a tensor."""
    require(backend, device, torch.float32)
    opt, params = trained_optimizer(backend, device)
    saved = opt.state_dict()
    saved["state"][3][key] = bad(saved["state"][3][key])  # id 3: group 1, param 1
    before = Snapshot.of_optimizer(opt)
    with pytest.raises(ValueError, match="param group 1, param 1: " + message):
        opt.load_state_dict(saved)
    before.assert_optimizer_unchanged(opt)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_state_dict_for_params_this_optimizer_does_not_have_is_refused(backend, device):
    require(backend, device, torch.float32)
    opt, params = trained_optimizer(backend, device)
    saved = opt.state_dict()
    saved["state"][17] = saved["state"][0]
    before = Snapshot.of_optimizer(opt)
    with pytest.raises(ValueError, match="state for param id 17, which no param group lists"):
        opt.load_state_dict(saved)
    before.assert_optimizer_unchanged(opt)


def test_rmsprop_fused_exports_the_errors_these_tests_expect():
    """The exception types are part of the contract: ValueError and RuntimeError subclasses, as
    torch.optim raises, so existing `except ValueError` code keeps working."""
    assert issubclass(rmsprop_fused.InvalidInputError, ValueError)
    assert issubclass(rmsprop_fused.SparseGradientError, RuntimeError)
    assert issubclass(rmsprop_fused.SparseGradientError, ValueError)
    assert issubclass(rmsprop_fused.BackendUnavailableError, RuntimeError)
