"""The CUDA kernel's own code, built for the host and run block by block and thread by thread
(docs/DESIGN.md section 3.4; 8-bit state a warp at a time), against the CPU op and the reference
backend BIT FOR BIT: every (param, state) pair of STATE_PAIRS with every option of
EXTENDED_OPTIONS (step counters read and incremented) and a rotated quarter of OPTION_MATRIX
(cuda_on_host.OPTION_CASES), stochastic rounding where a 16-bit value is stored, variance state,
clipping; sizes around the vector widths, the chunk size
and the 256-element 8-bit blocks (partial last blocks), misaligned views, tensors split between
launches, found_inf (the counters too), grad_scale, a tensor lr, both kernel-parameter budgets
and their launch counts, every element written and nothing outside written, refused calls."""

import math

import pytest
import torch

from common import (
    EXTENDED_OPTIONS, OPTION_MATRIX, STATE_PAIRS, assert_lists_equal, available, clone_lists,
    fresh_seed, make_lists, option_id, pair_id, same_bits, step,
)
from cuda_on_host import (
    LARGE_PARAM_BYTES, OPTION_CASES, REFERENCE_NANS, SMALL_PARAM_BYTES, UNAVAILABLE_REASON, assert_lists_match,
    launch_count, step_on_host,
)

pytestmark = pytest.mark.skipif(UNAVAILABLE_REASON is not None, reason=str(UNAVAILABLE_REASON))

SIXTEEN_BIT = (torch.float16, torch.bfloat16)
EIGHT_BIT_PAIRS = [p for p in STATE_PAIRS if p[1] == torch.uint8]
ELEMENT_PAIRS = [p for p in STATE_PAIRS if p[1] != torch.uint8]
BUDGETS = [LARGE_PARAM_BYTES, SMALL_PARAM_BYTES]
# Around the vector widths (2, 4 and 8 lanes), an 8-bit block (256) and its partial neighbours.
SIZES = [0, 1, 3, 4, 5, 17, 255, 256, 257, 600, 4097]
ODD_SIZES = [7, 9, 15, 33]  # not a multiple of any vector width
STATE_KEYS = ("params", "square_avgs", "grad_avgs", "momentum_buffers")
# Segments one launch's parameters hold at depth 4 (momentum, not centered) with 32,764 bytes
# (csrc/cuda/multi_tensor_kernel.h max_segments_per_launch).
CAPACITY_AT_DEPTH_4 = 509


def stores_16_bit(pair) -> bool:
    """Whether a step of this pair stores a 16-bit value (what stochastic rounding rounds)."""
    return pair[0] in SIXTEEN_BIT or pair[1] in SIXTEEN_BIT


def pair_lists(pair, sizes, options, seed, **kw):
    dtype, state_dtype = pair
    return make_lists(sizes, dtype, centered=options.get("centered", False), momentum=options.get("momentum", 0.0),
                      seed=seed, state_dtype=state_dtype, **kw)


def check_bitwise(lists, options, *, cpu=True, result=None, **limits) -> int:
    """One step on the host build, the reference and (when `cpu` and built) the CPU op, from the
    same inputs: all three bit for bit equal; the host build and the CPU op NaNs included (both
    x86 code over the same codecs), the reference NaNs as NaNs (cuda_on_host.REFERENCE_NANS).
    Returns the host build's launch count; `result`, a dict, receives the host build's lists."""
    on_host, reference = clone_lists(lists), clone_lists(lists)
    launches = step_on_host(on_host, **options, **limits)
    if result is not None:
        result.update(on_host)
    step(reference, "reference", **options)
    assert_lists_match(on_host, reference, REFERENCE_NANS)
    if cpu and available("cpu"):
        on_cpu = clone_lists(lists)
        step(on_cpu, "cpu", **options)
        assert_lists_match(on_host, on_cpu, any_nan=())
    return launches


# ------------------------------------------------------------------------------- the option matrix


@pytest.mark.parametrize("pair, options", OPTION_CASES,
                         ids=[f"{pair_id(pair)}-{option_id(options)}" for pair, options in OPTION_CASES])
def test_option_matrix(pair, options):
    lists = pair_lists(pair, [0, 1, 3, 5, 17, 257, 4097], options, fresh_seed())
    assert check_bitwise(lists, options) == 1


@pytest.mark.parametrize("options", EXTENDED_OPTIONS, ids=option_id)
@pytest.mark.parametrize("pair", STATE_PAIRS, ids=pair_id)
def test_extended_options(pair, options):
    """Decoupled weight decay, Nesterov, bias correction from each tensor's counter (0 to 40
    before the step), with maximize, weight decay and eps in the root too; the counters +1."""
    lists = pair_lists(pair, [0, 1, 5, 17, 257, 4097], options, fresh_seed(), steps=True)
    before = [float(s) for s in lists["state_steps"]]
    on_host = {}
    check_bitwise(lists, options, result=on_host)
    assert [float(s) for s in on_host["state_steps"]] == [s + 1 for s in before]


CLIP_OPTIONS = [dict(), dict(centered=True, momentum=0.9, weight_decay=0.1), dict(momentum=0.9, nesterov=True)]


@pytest.mark.parametrize("options", CLIP_OPTIONS, ids=option_id)
@pytest.mark.parametrize("pair", STATE_PAIRS, ids=pair_id)
def test_clip_coef(pair, options):
    """The clip coefficient is a device tensor, of any floating dtype, read as the AMP scale is."""
    lists = pair_lists(pair, [3, 257, 4097], options, fresh_seed())
    for coef in (torch.tensor(0.37), torch.tensor(0.25, dtype=torch.float64)):
        check_bitwise(lists, dict(options, clip_coef=coef))
    unclipped, clipped = clone_lists(lists), clone_lists(lists)
    step_on_host(unclipped, **options)
    step_on_host(clipped, **options, clip_coef=torch.tensor(0.37))
    assert not same_bits(unclipped["params"][2], clipped["params"][2])


SR_OPTIONS = [dict(), dict(centered=True, momentum=0.9), dict(momentum=0.9, nesterov=True, bias_correction=True),
              dict(centered=True, momentum=0.9, grad_scale=torch.tensor(8.0), weight_decay=0.1)]


@pytest.mark.parametrize("options", SR_OPTIONS, ids=option_id)
@pytest.mark.parametrize("pair", [p for p in STATE_PAIRS if stores_16_bit(p)], ids=pair_id)
def test_stochastic_rounding(pair, options):
    """Every 16-bit store (params, bfloat16 and float16 state) rounds with the random bits of its
    element's index in its tensor, the tensor's position in the lists and its step count; and
    differs from rounding to nearest."""
    seed = fresh_seed()
    lists = pair_lists(pair, [1, 5, 17, 257, 4097], options, seed, steps=True)
    check_bitwise(lists, dict(options, rounding_seed=seed))
    nearest, stochastic = clone_lists(lists), clone_lists(lists)
    step_on_host(nearest, **options)
    step_on_host(stochastic, **options, rounding_seed=seed)
    rounded = ["params"] if pair[0] in SIXTEEN_BIT else []
    rounded += [k for k in STATE_KEYS[1:] if pair[1] in SIXTEEN_BIT and lists[k]]
    for key in rounded:
        assert not same_bits(nearest[key][-1], stochastic[key][-1]), key


VARIANCE_PAIRS = [p for p in STATE_PAIRS if p[1] in (torch.bfloat16, torch.uint8)]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("pair", VARIANCE_PAIRS, ids=pair_id)
def test_variance_state(pair, momentum):
    """Centered bfloat16 or 8-bit state holding the variance: rebuilt as v = w + m*m in opmath,
    stored as max(v - m*m, 0); with stochastic rounding where a 16-bit value is stored."""
    seed = fresh_seed()
    options = dict(centered=True, momentum=momentum, variance_state=True)
    lists = pair_lists(pair, [1, 17, 257, 4097], options, seed, steps=True, variance_state=True)
    check_bitwise(lists, options)
    if stores_16_bit(pair):
        check_bitwise(lists, dict(options, rounding_seed=seed))
    as_square_avg = clone_lists(lists)
    step_on_host(as_square_avg, **dict(options, variance_state=False))
    with_variance = clone_lists(lists)
    step_on_host(with_variance, **options)
    assert not same_bits(as_square_avg["params"][-1], with_variance["params"][-1])


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)], ids=pair_id)
def test_variance_state_in_float32(pair):
    """FusedRMSprop's small tensors keep float32 state under state_dtype="8bit", their variance
    too: the kernel takes variance state in any state dtype (against the reference)."""
    options = dict(centered=True, momentum=0.9, variance_state=True)
    lists = pair_lists(pair, [1, 17, 4095], options, fresh_seed(), variance_state=True)
    check_bitwise(lists, options, cpu=False)


@pytest.mark.parametrize("options", [OPTION_MATRIX[0], OPTION_MATRIX[-1], EXTENDED_OPTIONS[-1]], ids=option_id)
@pytest.mark.parametrize("pair", STATE_PAIRS, ids=pair_id)
def test_small_parameter_budget(pair, options):
    """The 4 KB LaunchArgs (drivers older than CUDA 12.1, and CUDA-graph capture), plain and
    kExtended: the same bits as the 32 KB ones, in more launches."""
    lists = pair_lists(pair, [1, 5, 257, 4097], options, fresh_seed(), steps=True)
    check_bitwise(lists, options, kernel_param_bytes=SMALL_PARAM_BYTES)


# ----------------------------------------------------------------- sizes, alignment, chunks, launches


ALL_OPTIONS = dict(centered=True, momentum=0.9, weight_decay=0.1)


@pytest.mark.parametrize("pair", STATE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-offset"])
@pytest.mark.parametrize(
    "limits",
    [{}, dict(chunk_size=1024, block_dim=64), dict(chunk_size=256, block_dim=32), dict(chunk_size=1001, block_dim=64),
     dict(chunk_size=6, block_dim=4)],
    ids=["production", "chunk-1024", "chunk-256", "chunk-1001", "chunk-6"],
)
def test_sizes_and_misaligned_views(pair, offset, limits):
    """Aligned tensors take the vector path and the scalar tail; odd-offset views, and chunks that
    do not start on a vector boundary (chunk sizes 1001 and 6), the scalar path; 8-bit state its
    blocks, whole and partial, in chunks of whole blocks. The host build asserts the alignment of
    every vector access, which x86 would tolerate and a GPU would not."""
    quantized = pair[1] == torch.uint8
    if quantized and (offset or limits.get("chunk_size", 256) % 256):
        pytest.skip("8-bit state is laid out as its param, in chunks of whole 256-element blocks")
    lists = pair_lists(pair, SIZES + ODD_SIZES, ALL_OPTIONS, fresh_seed(), offset=offset)
    if offset:
        assert all(p.data_ptr() % 16 != 0 for p in lists["params"] if p.numel() > 0)
    check_bitwise(lists, ALL_OPTIONS, **limits)


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                  (torch.float16, torch.uint8), (torch.float32, torch.uint8)], ids=pair_id)
def test_chunk_boundaries(pair):
    """A production chunk (16,384 elements, 64 8-bit blocks) and one element either side."""
    lists = pair_lists(pair, [16383, 16384, 16385], ALL_OPTIONS, fresh_seed())
    check_bitwise(lists, ALL_OPTIONS)


SPLIT_OPTIONS = dict(centered=True, momentum=0.9, bias_correction=True, nesterov=True)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("pair", STATE_PAIRS, ids=pair_id)
def test_tensors_split_between_launches(pair, budget):
    """Chunks of 256 elements, at most 2 segments and 3 chunks a launch: tensors continue in the
    next launch, where each segment must know its tensor (step count, rounding keys) and its first
    element (the random bits, its 8-bit scales)."""
    seed = fresh_seed()
    options = dict(SPLIT_OPTIONS, rounding_seed=seed if stores_16_bit(pair) else None)
    lists = pair_lists(pair, [700, 3, 1300, 256, 513], options, seed, steps=True)
    limits = dict(max_tensors_per_launch=2, max_chunks_per_launch=3, chunk_size=256, block_dim=64,
                  kernel_param_bytes=budget)
    # chunks 3, 1, 6, 1, 3: launches [t0], [t1, t2 0..512), [t2 ..1280), [t2 ..1300, t3], [t4]
    assert check_bitwise(lists, options, **limits) == 5


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


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16)], ids=pair_id)
@pytest.mark.parametrize("sizes, limits, launches", PLANS)
def test_launch_planning(sizes, limits, launches, pair):
    seed = fresh_seed()
    options = dict(centered=True, momentum=0.9, weight_decay=0.1, bias_correction=True,
                   rounding_seed=seed if stores_16_bit(pair) else None)
    lists = pair_lists(pair, sizes, options, seed, steps=True)
    assert check_bitwise(lists, options, **limits, block_dim=3) == launches


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
    lists = make_lists(sizes, torch.float32, momentum=0.9, seed=seed)
    limits = dict(max_tensors_per_launch=max_tensors, max_chunks_per_launch=max_chunks, chunk_size=16, block_dim=5)
    assert check_bitwise(lists, dict(momentum=0.9), **limits) == launches


# (pair, budget, launches) for 700 tensors at depth 5: 452 or 54 segments a launch (339 or 40
# with 8-bit state, whose scales take three more pointers a segment).
MANY_TENSORS = [
    ((torch.float32, torch.float32), LARGE_PARAM_BYTES, 2), ((torch.float32, torch.float32), SMALL_PARAM_BYTES, 13),
    ((torch.bfloat16, torch.uint8), LARGE_PARAM_BYTES, 3), ((torch.bfloat16, torch.uint8), SMALL_PARAM_BYTES, 18),
]


@pytest.mark.parametrize("pair, budget, launches", MANY_TENSORS, ids=lambda x: pair_id(x) if isinstance(x, tuple) else str(x))
def test_more_tensors_than_one_launch_holds(pair, budget, launches):
    """With the CUDA op's own capacities, in both parameter budgets."""
    options = dict(centered=True, momentum=0.9)
    lists = pair_lists(pair, [1, 2, 3, 4, 5] * 140, options, fresh_seed())
    assert check_bitwise(lists, options, cpu=False, kernel_param_bytes=budget) == launches


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


# (depth, 8-bit state, launches with 32,764 bytes, launches with 4,096 bytes): 148 tensors over
# 581/509/452 segments a launch (509/407/339 with 8-bit state), or 70/61/54 (61/49/40).
GPT2_LAUNCHES = [(3, False, 1, 3), (4, False, 1, 3), (5, False, 1, 3), (3, True, 1, 3), (4, True, 1, 4), (5, True, 1, 4)]


@pytest.mark.parametrize("depth, quantized, large, small", GPT2_LAUNCHES)
def test_gpt2_small_launch_count(depth, quantized, large, small):
    """One launch at every depth with CUDA >= 12.1's 32,764 bytes of kernel parameters (the
    default); three or four with the 4,096 bytes of older drivers (csrc/cuda/multi_tensor_kernel.h)."""
    numels = gpt2_small_numels()
    assert (len(numels), sum(numels)) == (148, 124_439_808)
    assert launch_count(numels, depth, quantized=quantized) == large
    assert launch_count(numels, depth, LARGE_PARAM_BYTES, quantized=quantized) == large
    assert launch_count(numels, depth, SMALL_PARAM_BYTES, quantized=quantized) == small


# ------------------------------------------------------------------- every element, nothing else


def changing_lists(pair, sizes, *, offset, grad_scale, seed):
    """Inputs whose every element a centered momentum step with alpha=0.5 and lr=0.1 changes by
    far more than an ulp of bfloat16: |g| in [0.5, 1] (scaled by grad_scale), v in [0.01, 0.1] so
    v changes by (1 - alpha) (g^2 - v) >= 0.075, |m| <= 0.05 so m changes by >= 0.225 and the
    centered variance stays >= 0.04, |b| <= 0.01 so b and p change by >= 0.6 and 0.06."""
    dtype, state_dtype = pair
    gen = torch.Generator().manual_seed(seed)

    def uniform(n, low, high, dtype, signed=False, scale=1.0):
        """A view `offset` elements into its storage, like make_lists' (misaligned for offset 1)."""
        x = low + (high - low) * torch.rand(n + offset, generator=gen, dtype=torch.float64)
        if signed:
            x = x * (torch.randint(0, 2, (n + offset,), generator=gen) * 2 - 1)
        return (x.to(dtype) * scale)[offset:]

    lists = {k: [] for k in ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers")}
    for n in sizes:
        lists["params"].append(uniform(n, 0.0, 1.0, dtype, signed=True))
        lists["grads"].append(uniform(n, 0.5, 1.0, dtype, signed=True, scale=grad_scale))
        lists["square_avgs"].append(uniform(n, 0.01, 0.1, state_dtype))
        lists["grad_avgs"].append(uniform(n, 0.0, 0.05, state_dtype, signed=True))
        lists["momentum_buffers"].append(uniform(n, 0.0, 0.01, state_dtype, signed=True))
    return lists


@pytest.mark.parametrize("pair", ELEMENT_PAIRS, ids=pair_id)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-offset"])
@pytest.mark.parametrize(
    "limits", [{}, dict(max_tensors_per_launch=2, max_chunks_per_launch=3, chunk_size=40, block_dim=8)],
    ids=["production", "tiny"],
)
def test_every_element_is_written(pair, offset, limits):
    """Every element of every tensor changes (the grads too: they are unscaled in place), and
    equals the reference's: no block, thread, vector lane or tail element is skipped."""
    options = dict(centered=True, momentum=0.9, alpha=0.5, lr=0.1, grad_scale=torch.tensor(4.0))
    lists = changing_lists(pair, [1, 3, 4, 5, 17, 4097, 65537], offset=offset, grad_scale=4.0, seed=fresh_seed())
    before = clone_lists(lists)
    check_bitwise(lists, options, **limits)
    step_on_host(lists, **options, **limits)
    for key in lists:
        for i, (a, b) in enumerate(zip(lists[key], before[key])):
            unchanged = int((a == b).sum())
            assert unchanged == 0, f"{key}[{i}]: {unchanged} of {b.numel()} elements unchanged"


def poisoned_codes(expected: torch.Tensor, signed: bool) -> torch.Tensor:
    """Codes that differ from `expected` everywhere and decode to +0 under a zero scale, as the
    codes they replace did: 200 and 201 are positive entries of the signed map, and every
    unsigned entry is >= 0."""
    fill = 200 if signed else 0
    return torch.where(expected == fill, fill + 1, fill).to(torch.uint8)


@pytest.mark.parametrize("pair", EIGHT_BIT_PAIRS, ids=pair_id)
@pytest.mark.parametrize("limits", [{}, dict(max_tensors_per_launch=2, max_chunks_per_launch=3, chunk_size=256, block_dim=64)],
                         ids=["production", "tiny"])
def test_every_code_and_scale_is_written(pair, limits):
    """Under zero scales every old code decodes to 0, so the step's result does not depend on
    the codes: the host build starts from poisoned codes, each different from what the step
    writes there, and must end with exactly the reference's codes (and its scales, which zero
    scales cannot keep): no block, lane or tail element is skipped."""
    options = dict(centered=True, momentum=0.9)
    lists = pair_lists(pair, [1, 255, 256, 257, 700, 4097, 16385], options, fresh_seed())
    for scales in ("square_avg_scales", "grad_avg_scales", "momentum_buffer_scales"):
        for s in lists[scales]:
            s.zero_()
    for key, fill in (("square_avgs", 0), ("grad_avgs", 200), ("momentum_buffers", 200)):
        for codes in lists[key]:
            codes.fill_(fill)  # +0 under a zero scale, as the poison below decodes
    expected = clone_lists(lists)
    step(expected, "reference", **options)
    poisoned = clone_lists(lists)
    for key, signed in (("square_avgs", False), ("grad_avgs", True), ("momentum_buffers", True)):
        poisoned[key] = [poisoned_codes(e, signed) for e in expected[key]]
    step_on_host(poisoned, **options, **limits)
    assert_lists_match(poisoned, expected, REFERENCE_NANS)


def embedded(t: torch.Tensor, guard: int, offset: int) -> tuple:
    """A copy of t at `guard + offset` elements into a storage of poison (NaN bits, or 0xA5 bytes)
    with `guard` elements after it: (the view, the storage)."""
    storage = torch.empty(guard + offset + t.numel() + guard, dtype=t.dtype)
    storage.view(torch.uint8).fill_(0xA5)
    if t.is_floating_point():
        storage.fill_(float("nan"))
    view = storage[guard + offset:guard + offset + t.numel()].view(t.shape)
    return view.copy_(t), storage


@pytest.mark.parametrize("pair", STATE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("limits", [{}, dict(max_tensors_per_launch=2, max_chunks_per_launch=3, chunk_size=256, block_dim=32)],
                         ids=["production", "tiny"])
def test_nothing_outside_the_tensors_is_written(pair, limits):
    """Every tensor (and every scale and step counter) sits between 40 poisoned elements of its
    storage on each side, at an odd offset where the state is not 8-bit: the step leaves the
    poison bit for bit, and computes the reference's values."""
    quantized = pair[1] == torch.uint8
    seed = fresh_seed()
    options = dict(centered=True, momentum=0.9, grad_scale=torch.tensor(2.0), bias_correction=True,
                   rounding_seed=seed if stores_16_bit(pair) else None)
    lists = pair_lists(pair, [1, 5, 255, 257, 4097], options, seed, steps=True)
    expected = clone_lists(lists)
    step(expected, "reference", **options)
    storages = {}
    for key, tensors in lists.items():
        offset = 0 if quantized or key == "state_steps" or key.endswith("_scales") else 1
        placed = [embedded(t, 40, offset) for t in tensors]
        lists[key] = [view for view, _ in placed]
        storages[key] = [storage.clone() for _, storage in placed], [storage for _, storage in placed]
    step_on_host(lists, **options, **limits)
    assert_lists_match(lists, expected, REFERENCE_NANS)
    for key, (before, after) in storages.items():
        for i, (b, a) in enumerate(zip(before, after)):
            n = lists[key][i].numel()
            offset = a.numel() - 80 - n
            for region in (slice(0, 40 + offset), slice(40 + offset + n, None)):
                assert same_bits(a[region], b[region]), f"{key}[{i}]: written outside the tensor"


# ------------------------------------------------------------------ AMP, step counters, a tensor lr


@pytest.mark.parametrize("pair", STATE_PAIRS, ids=pair_id)
def test_grad_scale_unscales_and_writes_back_grads(pair):
    options = dict(momentum=0.9, grad_scale=torch.tensor(1024.0))
    lists = pair_lists(pair, [3, 4097], options, fresh_seed())
    on_host = clone_lists(lists)
    check_bitwise(lists, options)
    step_on_host(on_host, **options)
    for g, original in zip(on_host["grads"], lists["grads"]):
        assert torch.equal(g, (original.double() / 1024).to(g.dtype)), "unscaled grad"  # exact, then rounded once


FOUND_INF = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(float("nan")), torch.tensor(float("inf")),
             torch.tensor(1.0, dtype=torch.float16), torch.tensor(1e-300, dtype=torch.float64)]


@pytest.mark.parametrize("flag", FOUND_INF, ids=["1", "2", "nan", "inf", "fp16-1", "fp64-1e-300"])
@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.uint8), (torch.float16, torch.bfloat16)],
                         ids=pair_id)
def test_found_inf_skips_everything(pair, flag):
    """Any nonzero found_inf skips (GradScaler sums the flags of several devices), a float64 flag
    too small for float32 too: no tensor changes, the step counters included."""
    seed = fresh_seed()
    options = dict(centered=True, momentum=0.9, grad_scale=torch.tensor(8.0), bias_correction=True,
                   rounding_seed=seed if stores_16_bit(pair) else None)
    lists = pair_lists(pair, [0, 3, 4097], options, seed, steps=True)
    skipped = clone_lists(lists)
    step_on_host(skipped, **options, found_inf=flag)
    assert_lists_equal(skipped, lists)


@pytest.mark.parametrize("flag_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_zero_found_inf_steps_and_counts(flag_dtype):
    options = dict(momentum=0.9, bias_correction=True)
    lists = make_lists([0, 3, 4097], torch.float32, momentum=0.9, seed=fresh_seed(), steps=True)
    with_flag, without = clone_lists(lists), clone_lists(lists)
    check_bitwise(lists, dict(options, found_inf=torch.tensor(0.0, dtype=flag_dtype)))
    step_on_host(with_flag, **options, found_inf=torch.tensor(0.0, dtype=flag_dtype))
    step_on_host(without, **options)
    assert_lists_equal(with_flag, without)
    assert not torch.equal(with_flag["params"][2], lists["params"][2])
    # the empty tensor's counter too
    assert [float(s) for s in with_flag["state_steps"]] == [float(s) + 1 for s in lists["state_steps"]]


@pytest.mark.parametrize("budget", BUDGETS)
def test_step_counters_of_many_tensors(budget):
    """More counters than one launch of the counter kernel holds with 4 KB (510): each +1 once."""
    steps = [torch.tensor(float(i % 7)) for i in range(1200)]
    lists = make_lists([0] * 1200, torch.float32, seed=fresh_seed())
    lists["state_steps"] = [s.clone() for s in steps]
    assert step_on_host(lists, kernel_param_bytes=budget) == 0  # no update launch: all empty
    assert [float(s) for s in lists["state_steps"]] == [float(s) + 1 for s in steps]


@pytest.mark.parametrize("pair", STATE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_tensor_lr_equals_float_lr(pair, lr_dtype):
    """The lr tensor is converted to opmath on its device; the float lr is rounded to opmath on the
    host: the same value either way, and the same decoupled decay factor."""
    lr = torch.tensor(0.03, dtype=lr_dtype)
    options = dict(momentum=0.9, weight_decay=0.1, decoupled_weight_decay=True)
    lists = pair_lists(pair, [5, 4097], options, fresh_seed())
    with_float, with_tensor = clone_lists(lists), clone_lists(lists)
    step_on_host(with_float, lr=lr.item(), **options)
    step_on_host(with_tensor, lr=lr, **options)
    assert_lists_equal(with_tensor, with_float)
    check_bitwise(lists, dict(options, lr=lr))


# --------------------------------------------------------------------------------- refused calls


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(max_tensors_per_launch=0), "max_tensors_per_launch"),
        (dict(max_tensors_per_launch=10**6), "max_tensors_per_launch"),
        (dict(max_tensors_per_launch=62, kernel_param_bytes=4096), "max_tensors_per_launch"),
        (dict(max_chunks_per_launch=0), "max_chunks_per_launch"),
        (dict(max_chunks_per_launch=2**31), "max_chunks_per_launch"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(block_dim=0), "block_dim"),
        (dict(block_dim=1025), "block_dim"),
        (dict(kernel_param_bytes=8192), "kernel_param_bytes"),
        (dict(grads_dtype=torch.float64), "dtype"),
        (dict(grad_scale=torch.tensor([1.0, 2.0])), "grad_scale"),
        (dict(eight_bit=True, chunk_size=1000), "multiple of 256"),
        (dict(eight_bit=True, block_dim=48), "multiple of 32"),
    ],
)
def test_refused_call_changes_nothing(change, message):
    pair = (torch.float32, torch.uint8) if change.pop("eight_bit", False) else (torch.float32, torch.float32)
    lists = pair_lists(pair, [3, 4097], dict(momentum=0.9), fresh_seed(), steps=True)
    actual = clone_lists(lists)
    if change.pop("grads_dtype", None) is not None:
        actual["grads"][1] = actual["grads"][1].double()
    # The op's own argument checks (csrc/rmsprop_op.h) raise ValueError, as the CPU and CUDA ops'
    # do; the host build's planning knobs are checked with RuntimeError.
    error = ValueError if message in ("dtype", "grad_scale") else RuntimeError
    with pytest.raises(error, match=message):
        step_on_host(actual, momentum=0.9, **change)
    for key in lists:
        for after, before in zip(actual[key], lists[key]):
            assert torch.equal(after.to(before.dtype), before)
