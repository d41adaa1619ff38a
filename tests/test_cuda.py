"""The CUDA kernel on a real GPU (docs/DESIGN.md section 3.7: a confirmation of what the host build
established): against the reference for every option and dtype, sizes around the vector widths,
misaligned views, grad_scale and found_inf as device tensors, a device lr, a tensor of more than
2^31 elements, bitwise equality with the host build of the same kernel, CUDA-graph capture and
torch.library.opcheck. Every test is skipped, with the reason, where no GPU or no CUDA kernel is
available."""

import pytest
import torch

from common import (
    OPTION_MATRIX, assert_close, assert_lists_close, assert_lists_equal, available, clone_lists, fresh_seed,
    make_lists, option_id, step,
)
from cuda_on_host import UNAVAILABLE_REASON as HOST_BUILD_UNAVAILABLE, step_on_host
from rmsprop_fused import backends


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return backends.unavailable_reason("cuda", torch.device("cuda", torch.cuda.current_device()))


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 3, 4, 4097, 65537]
ODD_SIZES = [5, 7, 9, 15, 17, 33]  # not a multiple of any vector width (2, 4 or 8 lanes)
STATE_KEYS = ("params", "square_avgs", "grad_avgs", "momentum_buffers")


def to_device(lists: dict, device="cuda", offset: int = 0) -> dict:
    """Copies of CPU lists on `device`; with offset=1, as views one element into their storage
    (off every 16-byte boundary), so that the kernel takes its scalar path."""
    def move(t):
        storage = torch.empty(t.numel() + offset, dtype=t.dtype, device=device)
        view = storage[offset:].view(t.shape)
        return view.copy_(t)

    return {k: [move(t) for t in v] for k, v in lists.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTION_MATRIX, ids=option_id)
def test_every_option_and_dtype_matches_reference(options, dtype):
    sizes = [0, 1, 3, 4, 5, 17, 4097]
    lists = make_lists(sizes, dtype, "cuda", centered=options["centered"], momentum=options["momentum"], seed=fresh_seed())
    expected, actual = clone_lists(lists), clone_lists(lists)
    step(expected, "reference", **options)
    step(actual, "cuda", **options)
    assert_lists_close(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-offset"])
def test_sizes_and_misaligned_views(dtype, offset):
    options = dict(centered=True, momentum=0.9, weight_decay=0.1)
    lists = to_device(make_lists(SIZES + ODD_SIZES, dtype, centered=True, momentum=0.9, seed=fresh_seed()), offset=offset)
    if offset:
        assert all(t.data_ptr() % 16 != 0 for v in lists.values() for t in v if t.numel() > 0)
    expected = clone_lists(lists)  # clones are contiguous: the step runs on the views themselves
    step(expected, "reference", **options)
    step(lists, "cuda", **options)
    assert_lists_close(lists, expected)


@pytest.mark.skipif(HOST_BUILD_UNAVAILABLE is not None, reason=str(HOST_BUILD_UNAVAILABLE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTION_MATRIX, ids=option_id)
def test_bitwise_equal_to_host_build(options, dtype):
    """The same kernel source, run by the GPU and by the host loop (both without FMA contraction
    and with IEEE division and square root): the same bits, on the vector and the scalar path."""
    sizes = SIZES + ODD_SIZES
    lists = make_lists(sizes, dtype, centered=options["centered"], momentum=options["momentum"], seed=fresh_seed())
    on_host = clone_lists(lists)
    step_on_host(on_host, **options)
    for offset in (0, 1):
        on_gpu = to_device(lists, offset=offset)
        step(on_gpu, "cuda", **options)
        assert_lists_equal(on_gpu, on_host)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_scale_and_found_inf_on_device(dtype):
    lists = make_lists([3, 4097], dtype, "cuda", momentum=0.9, seed=fresh_seed())
    grad_scale = torch.tensor(1024.0, device="cuda")
    expected, actual = clone_lists(lists), clone_lists(lists)
    step(expected, "reference", momentum=0.9, grad_scale=grad_scale)
    step(actual, "cuda", momentum=0.9, grad_scale=grad_scale, found_inf=torch.tensor(0.0, device="cuda"))
    assert_lists_close(actual, expected)
    for g, original in zip(actual["grads"], lists["grads"]):
        assert_close(g, (original.double() / 1024).to(dtype), name="unscaled grad")

    flags = [torch.tensor(v, device="cuda") for v in (1.0, 2.0, float("nan"), float("inf"))]
    flags.append(torch.tensor(1e-300, dtype=torch.float64, device="cuda"))  # too small for float32
    for flag in flags:  # any nonzero found_inf skips (GradScaler sums the flags of several devices)
        skipped = clone_lists(lists)
        step(skipped, "cuda", momentum=0.9, grad_scale=grad_scale, found_inf=flag)
        assert_lists_equal(skipped, lists)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
def test_tensor_lr_on_device_equals_float_lr(dtype, lr_dtype):
    lr = torch.tensor(0.03, dtype=lr_dtype, device="cuda")
    lists = make_lists([5, 4097], dtype, "cuda", momentum=0.9, seed=fresh_seed())
    with_float, with_tensor = clone_lists(lists), clone_lists(lists)
    step(with_float, "cuda", lr=lr.item(), momentum=0.9)
    step(with_tensor, "cuda", lr=lr, momentum=0.9)
    assert_lists_equal(with_tensor, with_float)


def test_cuda_graph_capture_replays_with_new_lr():
    """Captured once with a device lr, replayed after the lr tensor changes: nothing in the op
    reads a value on the host, so the replay uses the new lr."""
    lists = make_lists([3, 4097, 65537], torch.float32, "cuda", centered=True, momentum=0.9, seed=fresh_seed())
    options = dict(centered=True, momentum=0.9, grad_scale=torch.tensor(2.0, device="cuda"),
                   found_inf=torch.tensor(0.0, device="cuda"))
    lr = torch.tensor(0.01, device="cuda")
    static = clone_lists(lists)

    side = torch.cuda.Stream()  # warm-up off the capture, as torch.cuda.graphs recommends
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(clone_lists(lists), "cuda", lr=lr, **options)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static, "cuda", lr=lr, **options)
    assert_lists_equal(static, lists)  # capture records the kernel, it does not run it

    for value in (0.01, 0.05):
        for key in lists:
            for t, original in zip(static[key], lists[key]):
                t.copy_(original)
        lr.fill_(value)
        graph.replay()
        expected = clone_lists(lists)
        step(expected, "cuda", lr=value, **options)
        torch.cuda.synchronize()
        assert_lists_equal(static, expected)


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
        assert_close(p[w], expected["params"][0], name=f"params[{w}]")
        assert_close(v[w], expected["square_avgs"][0], name=f"square_avgs[{w}]")
        assert not torch.equal(p[w], original["params"][0])


def test_opcheck():
    lists = make_lists([3, 17], torch.float32, "cuda", centered=True, momentum=0.9, seed=fresh_seed())
    args = (lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"], lists["momentum_buffers"])
    kwargs = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.1, momentum=0.9, centered=True,
                  maximize=False, eps_in_sqrt=False, lr_in_momentum=False)
    torch.library.opcheck(torch.ops.rmsprop_fused.rmsprop_.default, args, kwargs)
    device_scalars = dict(lr_tensor=torch.tensor(0.02, device="cuda"), grad_scale=torch.tensor(8.0, device="cuda"),
                          found_inf=torch.tensor(0.0, device="cuda"))
    torch.library.opcheck(torch.ops.rmsprop_fused.rmsprop_.default, args, dict(kwargs, **device_scalars))


def test_refused_call_changes_nothing():
    lists = make_lists([3, 4097], torch.float32, "cuda", momentum=0.9, seed=fresh_seed())
    actual = clone_lists(lists)
    actual["grads"][1] = actual["grads"][1].double()
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.rmsprop_fused.rmsprop_(
            actual["params"], actual["grads"], actual["square_avgs"], [], actual["momentum_buffers"],
            lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9, centered=False,
            maximize=False, eps_in_sqrt=False, lr_in_momentum=False)
    for key in STATE_KEYS:
        for after, before in zip(actual[key], lists[key]):
            assert torch.equal(after, before)
