"""The CUDA kernel on a real GPU (docs/DESIGN.md section 3.7: a confirmation of what the host build
established): bit for bit equal to the host build of the same kernel and to the CPU op for every
(param, state) pair of STATE_PAIRS with every option of EXTENDED_OPTIONS and the option sets of
OPTION_MATRIX that tests/test_cuda_kernel_on_host.py runs (cuda_on_host.OPTION_CASES),
stochastic rounding, variance state and clipping; sizes around the vector widths, the chunk size
and the 8-bit blocks; misaligned views; tensors split between launches; grad_scale and found_inf
as device tensors (the step counters skipped too); a device lr; a tensor of more than 2^31
elements; CUDA-graph capture with bias correction, a tensor lr and clip_coef; and
torch.library.opcheck. Every test is skipped, with the reason, where no GPU or no CUDA kernel is
available."""

import pytest
import torch

from common import (
    EXTENDED_OPTIONS, STATE_PAIRS, assert_close, assert_lists_equal, available, clone_lists,
    fresh_seed, make_lists, option_id, pair_id, step,
)
from cuda_on_host import (
    UNAVAILABLE_REASON as HOST_BUILD_UNAVAILABLE, OPTION_CASES, REFERENCE_NANS, assert_lists_match, step_on_host,
)
from rmsprop_fused import backends


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return backends.unavailable_reason("cuda", torch.device("cuda", torch.cuda.current_device()))


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
needs_host_build = pytest.mark.skipif(HOST_BUILD_UNAVAILABLE is not None, reason=str(HOST_BUILD_UNAVAILABLE))

SIXTEEN_BIT = (torch.float16, torch.bfloat16)
SIZES = [0, 1, 3, 4, 255, 256, 257, 4097, 65537]
ODD_SIZES = [5, 7, 9, 15, 17, 33]  # not a multiple of any vector width (2, 4 or 8 lanes)
STATE_KEYS = ("params", "square_avgs", "grad_avgs", "momentum_buffers")


def stores_16_bit(pair) -> bool:
    return pair[0] in SIXTEEN_BIT or pair[1] in SIXTEEN_BIT


def to_device(lists: dict, device="cuda", offset: int = 0) -> dict:
    """Copies of CPU lists on `device`; with offset=1, as views one element into their storage
    (off every 16-byte boundary), so that the kernel takes its scalar path (not for 8-bit codes
    and scales, which are laid out as their params, nor for the step counters)."""
    def move(key, t):
        shift = 0 if key == "state_steps" or key.endswith("_scales") or t.dtype == torch.uint8 else offset
        storage = torch.empty(t.numel() + shift, dtype=t.dtype, device=device)
        return storage[shift:].view(t.shape).copy_(t)

    return {k: [move(k, t) for t in v] for k, v in lists.items()}


def to_cuda(options: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in options.items()}


def pair_lists(pair, sizes, options, seed, **kw):
    return make_lists(sizes, pair[0], centered=options.get("centered", False), momentum=options.get("momentum", 0.0),
                      seed=seed, state_dtype=pair[1], **kw)


def check_gpu_against_host(lists: dict, options: dict, *, offsets=(0,)) -> None:
    """The GPU's step from CPU inputs `lists` (copied, at each offset) equals the host build's
    and the CPU op's, bit for bit."""
    on_host = clone_lists(lists)
    step_on_host(on_host, **options)
    if available("cpu"):
        on_cpu = clone_lists(lists)
        step(on_cpu, "cpu", **options)
        assert_lists_match(on_host, on_cpu, any_nan=())
    for offset in offsets:
        on_gpu = to_device(lists, offset=offset)
        step(on_gpu, "cuda", **to_cuda(options))
        assert_lists_match(on_gpu, on_host)


@needs_host_build
@pytest.mark.parametrize("pair, options", OPTION_CASES,
                         ids=[f"{pair_id(pair)}-{option_id(options)}" for pair, options in OPTION_CASES])
def test_option_matrix_bitwise_equal_to_host_build(pair, options):
    """The same kernel source, run by the GPU and by the host loop (both without FMA contraction
    and with IEEE division and square root): the same bits, on the vector and the scalar path."""
    lists = pair_lists(pair, SIZES + ODD_SIZES, options, fresh_seed())
    check_gpu_against_host(lists, options, offsets=(0,) if pair[1] == torch.uint8 else (0, 1))


@needs_host_build
@pytest.mark.parametrize("options", EXTENDED_OPTIONS, ids=option_id)
@pytest.mark.parametrize("pair", STATE_PAIRS, ids=pair_id)
def test_extended_options_bitwise_equal_to_host_build(pair, options):
    """Bias correction from each counter, read and incremented on the device."""
    lists = pair_lists(pair, SIZES, options, fresh_seed(), steps=True)
    check_gpu_against_host(lists, options)


@needs_host_build
@pytest.mark.parametrize("pair", STATE_PAIRS, ids=pair_id)
def test_rare_options_bitwise_equal_to_host_build(pair):
    """Stochastic rounding (where a 16-bit value is stored), variance state (centered bfloat16 or
    8-bit state), clipping, AMP."""
    seed = fresh_seed()
    variance = pair[1] in (torch.bfloat16, torch.uint8)
    options = dict(centered=True, momentum=0.9, bias_correction=True, variance_state=variance,
                   rounding_seed=seed if stores_16_bit(pair) else None, clip_coef=torch.tensor(0.5),
                   grad_scale=torch.tensor(4.0))
    lists = pair_lists(pair, SIZES + [16383, 16384, 16385], options, seed, steps=True, variance_state=variance)
    check_gpu_against_host(lists, options)


@needs_host_build
@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.uint8), (torch.float16, torch.bfloat16)],
                         ids=pair_id)
def test_many_tensors_split_between_launches(pair):
    """More tensors than one launch holds (452 at depth 5 with 32 KB, 339 with 8-bit state; or
    54 and 40 with an old driver's 4 KB), with stochastic rounding and bias correction: each
    segment's tensor index, first element and counter."""
    seed = fresh_seed()
    options = dict(centered=True, momentum=0.9, bias_correction=True, rounding_seed=seed if stores_16_bit(pair) else None)
    lists = pair_lists(pair, [1, 2, 300, 4, 5] * 140, options, seed, steps=True)
    check_gpu_against_host(lists, options)


@pytest.mark.parametrize("pair", STATE_PAIRS, ids=pair_id)
def test_grad_scale_and_found_inf_on_device(pair):
    seed = fresh_seed()
    options = dict(momentum=0.9, bias_correction=True, rounding_seed=seed if stores_16_bit(pair) else None)
    lists = to_device(pair_lists(pair, [3, 4097], options, seed, steps=True))
    grad_scale = torch.tensor(1024.0, device="cuda")
    expected, actual = clone_lists(lists), clone_lists(lists)
    step(expected, "reference", grad_scale=grad_scale, **options)
    step(actual, "cuda", grad_scale=grad_scale, found_inf=torch.tensor(0.0, device="cuda"), **options)
    assert_lists_match(actual, expected, REFERENCE_NANS)
    for g, original in zip(actual["grads"], lists["grads"]):
        assert_close(g, (original.double() / 1024).to(g.dtype), name="unscaled grad")

    flags = [torch.tensor(v, device="cuda") for v in (1.0, 2.0, float("nan"), float("inf"))]
    flags.append(torch.tensor(1e-300, dtype=torch.float64, device="cuda"))  # too small for float32
    for flag in flags:  # any nonzero found_inf skips (GradScaler sums the flags of several devices)
        skipped = clone_lists(lists)
        step(skipped, "cuda", grad_scale=grad_scale, found_inf=flag, **options)
        assert_lists_equal(skipped, lists)  # the step counters too


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("pair", STATE_PAIRS, ids=pair_id)
def test_tensor_lr_on_device_equals_float_lr(pair, lr_dtype):
    lr = torch.tensor(0.03, dtype=lr_dtype, device="cuda")
    options = dict(momentum=0.9, weight_decay=0.1, decoupled_weight_decay=True)
    lists = to_device(pair_lists(pair, [5, 4097], options, fresh_seed()))
    with_float, with_tensor = clone_lists(lists), clone_lists(lists)
    step(with_float, "cuda", lr=lr.item(), **options)
    step(with_tensor, "cuda", lr=lr, **options)
    assert_lists_equal(with_tensor, with_float)


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.uint8), (torch.float16, torch.bfloat16)],
                         ids=pair_id)
def test_cuda_graph_capture_replays_with_new_lr_clip_and_counts(pair):
    """Captured once with bias correction, a device lr and a clip coefficient, replayed after
    both tensors change: nothing in the op reads a value on the host, and the step counters are
    read and incremented on the device, so each replay is the step an eager call would take."""
    seed = fresh_seed()
    options = dict(centered=True, momentum=0.9, bias_correction=True, grad_scale=torch.tensor(2.0, device="cuda"),
                   found_inf=torch.tensor(0.0, device="cuda"), rounding_seed=seed if stores_16_bit(pair) else None)
    lists = to_device(pair_lists(pair, [3, 4097, 65537], options, seed, steps=True))
    lr, clip = torch.tensor(0.01, device="cuda"), torch.tensor(1.0, device="cuda")
    static = clone_lists(lists)

    side = torch.cuda.Stream()  # warm-up off the capture, as torch.cuda.graphs recommends
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(clone_lists(lists), "cuda", lr=lr, clip_coef=clip, **options)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static, "cuda", lr=lr, clip_coef=clip, **options)
    assert_lists_equal(static, lists)  # capture records the kernels, it does not run them

    expected = clone_lists(lists)
    for value, coef in ((0.01, 1.0), (0.05, 0.3), (0.02, 0.7)):  # replays continue from each other
        lr.fill_(value)
        clip.fill_(coef)
        graph.replay()
        step(expected, "cuda", lr=value, clip_coef=torch.tensor(coef, device="cuda"), **options)
        torch.cuda.synchronize()
        assert_lists_equal(static, expected)
    assert [float(s) for s in static["state_steps"]] == [float(s) + 3 for s in lists["state_steps"]]


@pytest.mark.slow
def test_tensor_of_more_than_2_to_31_elements():
    """int64 offsets: a float16 tensor of 2^31 + 1027 elements (13 GB for params, grads and
    square_avgs), checked against the reference in windows at its start, across 2^31 and at its
    end, including the scalar tail."""
    n = 2**31 + 1027
    if torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs 16 GiB of GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(fresh_seed())
    p = torch.randn(n, dtype=torch.float16, device="cuda", generator=gen)
    g = torch.randn(n, dtype=torch.float16, device="cuda", generator=gen)
    v = torch.rand(n, dtype=torch.float16, device="cuda", generator=gen).add_(0.01)
    windows = [slice(0, 4096), slice(2**31 - 4096, 2**31 + 4096), slice(n - 4099, n)]
    before = [dict(params=[p[w].clone()], grads=[g[w].clone()], square_avgs=[v[w].clone()],
                   grad_avgs=[], momentum_buffers=[]) for w in windows]
    step(dict(params=[p], grads=[g], square_avgs=[v], grad_avgs=[], momentum_buffers=[]), "cuda")
    for w, expected in zip(windows, before):
        original = clone_lists(expected)
        step(expected, "reference")
        assert_lists_match(dict(params=[p[w]], square_avgs=[v[w]]),
                           dict(params=expected["params"], square_avgs=expected["square_avgs"]), REFERENCE_NANS)
        assert not torch.equal(p[w], original["params"][0])


def test_opcheck():
    lists = make_lists([3, 17], torch.float32, "cuda", centered=True, momentum=0.9, seed=fresh_seed(), steps=True)
    args = tuple(lists[k] for k in ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "state_steps",
                                    "square_avg_scales", "grad_avg_scales", "momentum_buffer_scales"))
    kwargs = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.1, momentum=0.9, centered=True, maximize=False,
                  eps_in_sqrt=False, lr_in_momentum=False, decoupled_weight_decay=False, nesterov=False,
                  bias_correction=True, variance_state=False)
    torch.library.opcheck(torch.ops.rmsprop_fused.rmsprop_.default, args, kwargs)
    device_scalars = dict(lr_tensor=torch.tensor(0.02, device="cuda"), grad_scale=torch.tensor(8.0, device="cuda"),
                          found_inf=torch.tensor(0.0, device="cuda"), clip_coef=torch.tensor(0.5, device="cuda"))
    torch.library.opcheck(torch.ops.rmsprop_fused.rmsprop_.default, args, dict(kwargs, **device_scalars))


def test_refused_call_changes_nothing():
    lists = make_lists([3, 4097], torch.float32, "cuda", momentum=0.9, seed=fresh_seed(), steps=True)
    actual = clone_lists(lists)
    actual["grads"][1] = actual["grads"][1].double()
    with pytest.raises(ValueError, match="dtype"):  # the op's checks raise ValueError (rmsprop_op.h)
        torch.ops.rmsprop_fused.rmsprop_(
            actual["params"], actual["grads"], actual["square_avgs"], [], actual["momentum_buffers"],
            actual["state_steps"], [], [], [], lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9,
            centered=False, maximize=False, eps_in_sqrt=False, lr_in_momentum=False, decoupled_weight_decay=False,
            nesterov=False, bias_correction=False, variance_state=False)
    for key in STATE_KEYS + ("state_steps",):
        for after, before in zip(actual[key], lists[key]):
            assert torch.equal(after, before)
