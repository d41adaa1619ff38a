"""The CUDA kernel's own code, built for the host and run block by block and thread by thread
(docs/DESIGN.md section 3.4), against the reference backend: every option combination and dtype, launch
planning with tiny capacities (tensors split between launches), the 16-byte vector path and the
scalar path and tail (aligned and misaligned views, sizes around the vector widths, chunk sizes
that misalign chunks), grad_scale and found_inf, a tensor lr, refused calls, and the launch count
of the production planner for GPT-2 small."""

import math

import pytest
import torch

from common import (
    OPTION_MATRIX, assert_close, assert_lists_close, assert_lists_equal, available, clone_lists, fresh_seed,
    make_lists, option_id, step,
)
from cuda_on_host import UNAVAILABLE_REASON, launch_count, step_on_host

pytestmark = pytest.mark.skipif(UNAVAILABLE_REASON is not None, reason=str(UNAVAILABLE_REASON))

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 3, 4, 4097, 65537]
ODD_SIZES = [5, 7, 9, 15, 17, 33]  # not a multiple of any vector width (2, 4 or 8 lanes)
STATE_KEYS = ("params", "square_avgs", "grad_avgs", "momentum_buffers")
CAPACITY_AT_DEPTH_4 = 741  # segments in one launch's 32,764 bytes of parameters (momentum, not centered)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTION_MATRIX, ids=option_id)
def test_every_option_and_dtype_matches_reference(options, dtype):
    sizes = [0, 1, 3, 4, 5, 17, 4097]
    lists = make_lists(sizes, dtype, centered=options["centered"], momentum=options["momentum"], seed=fresh_seed())
    expected, actual = clone_lists(lists), clone_lists(lists)
    step(expected, "reference", **options)
    assert step_on_host(actual, **options) == 1
    assert_lists_close(actual, expected)


@pytest.mark.skipif(not available("cpu"), reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTION_MATRIX, ids=option_id)
def test_bitwise_equal_to_cpu_kernel(options, dtype):
    """Both call rmsprop_update from csrc/rmsprop_update.h with contraction off: the same bits."""
    lists = make_lists([1, 5, 4097], dtype, centered=options["centered"], momentum=options["momentum"], seed=fresh_seed())
    on_host, cpu = clone_lists(lists), clone_lists(lists)
    step_on_host(on_host, **options)
    step(cpu, "cpu", **options)
    assert_lists_equal(on_host, cpu)


# (sizes, limits, launches): worked by hand from the greedy plan (csrc/cuda/multi_tensor_kernel.h).
PLANS = [
    # everything fits one launch
    ([20, 20], dict(max_tensors_per_launch=8, max_chunks_per_launch=64, chunk_size=8), 1),
    # 3 + 3 chunks, 4 per launch: launch 1 = t0 (3 chunks) + t1's first chunk; launch 2 = the rest
    # of t1: t1 is split between two launches
    ([20, 20], dict(max_tensors_per_launch=8, max_chunks_per_launch=4, chunk_size=8), 2),
    # two tensors per launch: 2 + 2 + 1
    ([5, 5, 5, 5, 5], dict(max_tensors_per_launch=2, max_chunks_per_launch=64, chunk_size=8), 3),
    # empty tensors take no place in a launch
    ([0, 5, 0, 0, 5, 0], dict(max_tensors_per_launch=1, max_chunks_per_launch=64, chunk_size=8), 2),
    # one tensor over five launches: 13 chunks, 3 per launch
    ([100], dict(max_tensors_per_launch=1, max_chunks_per_launch=3, chunk_size=8), 5),
    # both limits: chunks 3, 1, 5; launch 1 = t0 + t1 (2 tensors, 4 chunks), launch 2 = 4 chunks of
    # t2, launch 3 = its last chunk
    ([24, 8, 40], dict(max_tensors_per_launch=2, max_chunks_per_launch=4, chunk_size=8), 3),
    # a 65537-element tensor in chunks of 1001 (not a whole number of 16-byte vectors: most chunks
    # start misaligned), 7 per launch: 66 chunks -> 10 launches
    ([65537], dict(max_tensors_per_launch=1, max_chunks_per_launch=7, chunk_size=1001), 10),
    # nothing to do: no launch
    ([0, 0], dict(max_tensors_per_launch=1, max_chunks_per_launch=1, chunk_size=1), 0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("sizes, limits, launches", PLANS)
def test_launch_planning(sizes, limits, launches, dtype):
    options = dict(centered=True, momentum=0.9, weight_decay=0.1)
    lists = make_lists(sizes, dtype, centered=True, momentum=0.9, seed=fresh_seed())
    expected, actual = clone_lists(lists), clone_lists(lists)
    step(expected, "reference", **options)
    assert step_on_host(actual, **options, **limits, block_dim=3) == launches
    assert_lists_close(actual, expected)


@pytest.mark.parametrize("max_tensors, max_chunks", [(3, 2**31 - 1), (CAPACITY_AT_DEPTH_4, 5)], ids=["tensor-limit", "chunk-limit"])
def test_launch_planning_many_tensors(max_tensors, max_chunks):
    """60 tensors of random sizes (some empty) in chunks of 16 with one limit binding: every launch
    but the last is full, so the count is ceil(tensors / limit) or ceil(chunks / limit)."""
    seed = fresh_seed()
    sizes = torch.randint(0, 200, (60,), generator=torch.Generator().manual_seed(seed)).tolist()
    if max_tensors < CAPACITY_AT_DEPTH_4:
        launches = math.ceil(sum(n > 0 for n in sizes) / max_tensors)
    else:
        launches = math.ceil(sum(math.ceil(n / 16) for n in sizes) / max_chunks)
    options = dict(momentum=0.9)
    lists = make_lists(sizes, torch.float32, momentum=0.9, seed=seed)
    expected, actual = clone_lists(lists), clone_lists(lists)
    step(expected, "reference", **options)
    limits = dict(max_tensors_per_launch=max_tensors, max_chunks_per_launch=max_chunks, chunk_size=16, block_dim=5)
    assert step_on_host(actual, **options, **limits) == launches
    assert_lists_close(actual, expected)


def test_more_tensors_than_one_launch_holds():
    """With the CUDA op's own capacities: 700 tensors at depth 5 (627 per launch) take two."""
    options = dict(centered=True, momentum=0.9)
    lists = make_lists([1, 2, 3, 4, 5] * 140, torch.float32, centered=True, momentum=0.9, seed=fresh_seed())
    expected, actual = clone_lists(lists), clone_lists(lists)
    step(expected, "reference", **options)
    assert step_on_host(actual, **options) == 2
    assert_lists_close(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-offset"])
@pytest.mark.parametrize(
    "limits",
    [{}, dict(chunk_size=1001, block_dim=64), dict(chunk_size=6, block_dim=4)],
    ids=["production", "chunk-1001", "chunk-6"],
)
def test_sizes_and_misaligned_views(dtype, offset, limits):
    """Aligned tensors take the vector path and the scalar tail; odd-offset views (params and
    grads here), and chunks that do not start on a 16-byte boundary (chunk sizes 1001 and 6), the
    scalar path. The host build asserts the alignment of every vector access, which x86 would
    tolerate and a GPU would not."""
    options = dict(centered=True, momentum=0.9, weight_decay=0.1)
    lists = make_lists(SIZES + ODD_SIZES, dtype, centered=True, momentum=0.9, seed=fresh_seed(), offset=offset)
    assert_misaligned(lists, offset)
    expected = clone_lists(lists)  # clones are contiguous: the step runs on the views themselves
    step(expected, "reference", **options)
    step_on_host(lists, **options, **limits)
    assert_lists_close(lists, expected)


def assert_misaligned(lists: dict, offset: int) -> None:
    """With offset=1 the params are views off every 16-byte boundary (what the test is about)."""
    if offset:
        assert all(p.data_ptr() % 16 != 0 for p in lists["params"] if p.numel() > 0)


def changing_lists(sizes, dtype, *, offset, grad_scale, seed):
    """Inputs whose every element a centered momentum step with alpha=0.5 and lr=0.1 changes by
    far more than an ulp of bfloat16: |g| in [0.5, 1] (scaled by grad_scale), v in [0.01, 0.1] so
    v changes by (1 - alpha) (g^2 - v) >= 0.075, |m| <= 0.05 so m changes by >= 0.225 and the
    centered variance stays >= 0.04, |b| <= 0.01 so b and p change by >= 0.6 and 0.06."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(n, low, high, signed=False, scale=1.0):
        """A view `offset` elements into its storage, like make_lists' (misaligned for offset 1)."""
        x = low + (high - low) * torch.rand(n + offset, generator=gen, dtype=torch.float64)
        if signed:
            x = x * (torch.randint(0, 2, (n + offset,), generator=gen) * 2 - 1)
        return (x.to(dtype) * scale)[offset:]

    lists = {k: [] for k in ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers")}
    for n in sizes:
        lists["params"].append(uniform(n, 0.0, 1.0, signed=True))
        lists["grads"].append(uniform(n, 0.5, 1.0, signed=True, scale=grad_scale))
        lists["square_avgs"].append(uniform(n, 0.01, 0.1))
        lists["grad_avgs"].append(uniform(n, 0.0, 0.05, signed=True))
        lists["momentum_buffers"].append(uniform(n, 0.0, 0.01, signed=True))
    return lists


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-offset"])
@pytest.mark.parametrize(
    "limits", [{}, dict(max_tensors_per_launch=2, max_chunks_per_launch=3, chunk_size=40, block_dim=8)],
    ids=["production", "tiny"],
)
def test_every_element_is_written(dtype, offset, limits):
    """Every element of every tensor changes (the grads too: they are unscaled in place), and
    equals the reference: no block, thread, vector lane or tail element is skipped."""
    options = dict(centered=True, momentum=0.9, alpha=0.5, lr=0.1, grad_scale=torch.tensor(4.0))
    lists = changing_lists([1, 3, 4, 5, 17, 4097, 65537], dtype, offset=offset, grad_scale=4.0, seed=fresh_seed())
    assert_misaligned(lists, offset)
    before, expected = clone_lists(lists), clone_lists(lists)
    step(expected, "reference", **options)
    step_on_host(lists, **options, **limits)
    assert_lists_close(lists, expected)
    for key in lists:
        for i, (a, b) in enumerate(zip(lists[key], before[key])):
            unchanged = int((a == b).sum())
            assert unchanged == 0, f"{key}[{i}]: {unchanged} of {b.numel()} elements unchanged"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_scale_unscales_and_writes_back_grads(dtype):
    lists = make_lists([3, 4097], dtype, momentum=0.9, seed=fresh_seed())
    grad_scale = torch.tensor(1024.0)
    expected, actual = clone_lists(lists), clone_lists(lists)
    step(expected, "reference", momentum=0.9, grad_scale=grad_scale)
    step_on_host(actual, momentum=0.9, grad_scale=grad_scale)
    assert_lists_close(actual, expected)
    for g, original in zip(actual["grads"], lists["grads"]):
        assert_close(g, (original.double() / 1024).to(dtype), name="unscaled grad")


@pytest.mark.parametrize(
    "flag",
    [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(float("nan")), torch.tensor(float("inf")),
     torch.tensor(1.0, dtype=torch.float16), torch.tensor(1e-300, dtype=torch.float64)],
    ids=["1", "2", "nan", "inf", "fp16-1", "fp64-1e-300"],
)
def test_found_inf_skips_everything(flag):
    """Any nonzero found_inf skips (GradScaler sums the flags of several devices); a float64 flag
    too small for float32 too."""
    lists = make_lists([3, 4097], torch.float32, centered=True, momentum=0.9, seed=fresh_seed())
    skipped = clone_lists(lists)
    step_on_host(skipped, centered=True, momentum=0.9, grad_scale=torch.tensor(8.0), found_inf=flag)
    assert_lists_equal(skipped, lists)


@pytest.mark.parametrize("flag_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_zero_found_inf_steps(flag_dtype):
    lists = make_lists([3, 4097], torch.float32, momentum=0.9, seed=fresh_seed())
    with_flag, without = clone_lists(lists), clone_lists(lists)
    step_on_host(with_flag, momentum=0.9, found_inf=torch.tensor(0.0, dtype=flag_dtype))
    step_on_host(without, momentum=0.9)
    assert_lists_equal(with_flag, without)
    assert not torch.equal(with_flag["params"][1], lists["params"][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_tensor_lr_equals_float_lr(dtype, lr_dtype):
    """The lr tensor is converted to opmath on its device; the float lr is rounded to opmath on the
    host: the same value either way."""
    lr = torch.tensor(0.03, dtype=lr_dtype)
    lists = make_lists([5, 4097], dtype, momentum=0.9, seed=fresh_seed())
    with_float, with_tensor = clone_lists(lists), clone_lists(lists)
    step_on_host(with_float, lr=lr.item(), momentum=0.9)
    step_on_host(with_tensor, lr=lr, momentum=0.9)
    assert_lists_equal(with_tensor, with_float)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(max_tensors_per_launch=0), "max_tensors_per_launch"),
        (dict(max_tensors_per_launch=10**6), "max_tensors_per_launch"),
        (dict(max_chunks_per_launch=0), "max_chunks_per_launch"),
        (dict(max_chunks_per_launch=2**31), "max_chunks_per_launch"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(block_dim=0), "block_dim"),
        (dict(block_dim=1025), "block_dim"),
        (dict(grads_dtype=torch.float64), "dtype"),
        (dict(grad_scale=torch.tensor([1.0, 2.0])), "grad_scale"),
    ],
)
def test_refused_call_changes_nothing(change, message):
    lists = make_lists([3, 4097], torch.float32, momentum=0.9, seed=fresh_seed())
    actual = clone_lists(lists)
    if change.pop("grads_dtype", None) is not None:
        actual["grads"][1] = actual["grads"][1].double()
    with pytest.raises(RuntimeError, match=message):
        step_on_host(actual, momentum=0.9, **change)
    for key in STATE_KEYS + ("grads",):
        for after, before in zip(actual[key], lists[key]):
            assert torch.equal(after.to(before.dtype), before)


def gpt2_small_numels():
    """GPT-2 small's parameters, in model.parameters() order: 148 tensors, 124,439,808 elements."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    block = [
        d, d,                  # ln_1 weight, bias
        d * 3 * d, 3 * d,      # attn.c_attn weight, bias
        d * d, d,              # attn.c_proj weight, bias
        d, d,                  # ln_2 weight, bias
        d * 4 * d, 4 * d,      # mlp.c_fc weight, bias
        4 * d * d, d,          # mlp.c_proj weight, bias
    ]
    return [vocab * d, context * d] + block * layers + [d, d]  # wte, wpe, h.0-11, ln_f


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_gpt2_small_launch_count(depth):
    """One launch at every depth with CUDA >= 12.1's 32,764 bytes of kernel parameters (the
    default); two with the 4,096 bytes of older toolkits (csrc/cuda/multi_tensor_kernel.h)."""
    numels = gpt2_small_numels()
    assert (len(numels), sum(numels)) == (148, 124_439_808)
    assert launch_count(numels, depth) == 1
    assert launch_count(numels, depth, kernel_param_bytes=32764) == 1
    assert launch_count(numels, depth, kernel_param_bytes=4096) == 2
