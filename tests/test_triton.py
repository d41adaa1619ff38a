"""The Triton kernel against the reference backend and, bit for bit, against the C++ kernel.

Without a GPU the kernel runs on CPU tensors in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before the kernel is defined), which runs one program at a time in Python:
sizes are chosen so that each call runs a handful of programs, yet covers tensors smaller than a
block, exactly one block, a whole block followed by a masked tail, and zero-size tensors. With a
GPU the same tests run the compiled kernel on CUDA tensors, and the tests at the end compare it
with the CUDA kernel and capture it in a CUDA graph.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from common import (
    OPTION_MATRIX, assert_close, assert_lists_close, available, clone_lists, make_lists, option_id, step,
)

from rmsprop_fused import _triton_backend as triton_backend

# Without a GPU, CPU tensors in the interpreter; with one, the compiled kernel on CUDA tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not available("triton", DEVICE),
    reason=f"the Triton backend is unavailable: {triton_backend.unavailable_reason(torch.device(DEVICE))}",
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCK = triton_backend.BLOCK_SIZE
# Smaller than a block, a whole block plus a masked tail, and nothing at all.
SMALL_SIZES = [0, 1, 3, 17, BLOCK + 5]
INTEGER_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU is visible")


def assert_lists_identical(actual: dict, expected: dict) -> None:
    """Same bits in every element (the inputs are finite, so no NaN payloads to disagree on)."""
    for key in expected:
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            view = INTEGER_VIEW[a.dtype]
            different = a.view(view) != e.view(view)
            assert not bool(different.any()), (
                f"{key}[{i}]: {int(different.sum())} of {a.numel()} elements differ in their bits, first at "
                f"{int(different.flatten().nonzero()[0])}"
            )


def clone_in_place(lists: dict) -> dict:
    """clone_lists, but each copy starts as far into its own storage as the original does, so
    that misaligned views stay misaligned (clone() returns a fresh, aligned tensor)."""

    def clone(t):
        storage = torch.empty(t.storage_offset() + t.numel(), dtype=t.dtype, device=t.device)
        return storage[t.storage_offset():].view(t.shape).copy_(t)

    return {key: [clone(t) for t in tensors] for key, tensors in lists.items()}


def compare_with_reference_and_cpu_kernel(lists: dict, **options) -> dict:
    """Steps copies of `lists` with the Triton kernel and with the reference (and the C++ CPU
    kernel, when built and the tensors are on the CPU); returns the Triton result."""
    actual, expected = clone_in_place(lists), clone_lists(lists)
    step(actual, "triton", **options)
    step(expected, "reference", **options)
    assert_lists_close(actual, expected)
    device = lists["params"][0].device
    if available("cpu") and device.type == "cpu":
        cpu_kernel = clone_lists(lists)
        step(cpu_kernel, "cpu", **options)
        assert_lists_identical(actual, cpu_kernel)
    return actual


class CountingKernel:
    """Stands in for the kernel object and records each launch's grid and arguments."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def kernel_launches(monkeypatch):
    counting = CountingKernel(triton_backend._rmsprop_kernel)
    monkeypatch.setattr(triton_backend, "_rmsprop_kernel", counting)
    return counting.launches


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTION_MATRIX, ids=option_id)
def test_every_option_and_dtype_matches_reference(options, dtype):
    seed = 100 + OPTION_MATRIX.index(options) * len(DTYPES) + DTYPES.index(dtype)
    lists = make_lists(
        SMALL_SIZES, dtype, DEVICE, centered=options["centered"], momentum=options["momentum"], seed=seed
    )
    compare_with_reference_and_cpu_kernel(lists, **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-offset"])
def test_sizes_around_the_block_and_misaligned_views(dtype, offset, kernel_launches):
    """Aligned tensors take the unmasked 16-byte path for whole blocks; views one element into
    their storage are misaligned and take the masked path everywhere."""
    sizes = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 7]
    options = dict(centered=True, momentum=0.9, weight_decay=0.1)
    lists = make_lists(sizes, dtype, DEVICE, centered=True, momentum=0.9, seed=7 + offset, offset=offset)
    compare_with_reference_and_cpu_kernel(lists, **options)

    (grid, args, _), = kernel_launches
    blocks = args[1].view(-1, triton_backend._BLOCK_MAP_WIDTH).cpu()
    assert grid == (sum(-(-n // BLOCK) for n in sizes),)
    # blocks: 1 | BLOCK - 1 | BLOCK | BLOCK, 1 | BLOCK, BLOCK, 7 (a zero-size tensor owns none)
    whole = [False, False, True, True, False, True, True, False]
    assert blocks[:, 2].tolist() == [int(w and offset == 0) for w in whole]


def test_many_tensors_in_one_group(kernel_launches):
    gen = torch.Generator().manual_seed(12)
    sizes = torch.randint(0, 700, (40,), generator=gen).tolist() + [0, 3 * BLOCK + 1]
    lists = make_lists(sizes, torch.float32, DEVICE, centered=True, momentum=0.9, seed=13)
    compare_with_reference_and_cpu_kernel(lists, centered=True, momentum=0.9, maximize=True)
    assert len(kernel_launches) == 1


def test_one_launch_per_device_and_dtype_group(kernel_launches):
    """Each (device, dtype) group is one launch; a group of zero-size tensors launches nothing."""
    by_dtype = {
        torch.float32: make_lists([5, BLOCK + 3, 0], torch.float32, DEVICE, momentum=0.9, seed=1),
        torch.bfloat16: make_lists([7, 2], torch.bfloat16, DEVICE, momentum=0.9, seed=2),
        torch.float16: make_lists([0, 0], torch.float16, DEVICE, momentum=0.9, seed=3),
    }
    mixed = {key: [t for lists in by_dtype.values() for t in lists[key]] for key in by_dtype[torch.float32]}
    expected = clone_lists(mixed)
    step(mixed, "triton", momentum=0.9)
    step(expected, "reference", momentum=0.9)
    assert_lists_close(mixed, expected)
    assert [grid for grid, _, _ in kernel_launches] == [(3,), (2,)]


def test_block_starts_beyond_the_int32_range(monkeypatch):
    """Elements past 2**31 of a tensor, without allocating one: the table says each tensor starts
    2**31 + 3 * BLOCK elements before its real data and is that much longer, and the blocks start
    that far in, so the kernel reaches the real elements only if it computes the offsets in
    64 bits. Whole blocks stay aligned (the shift is a multiple of 16 bytes), so both paths run."""
    shift = 2**31 + 3 * BLOCK
    lists = make_lists([BLOCK + 5, 7], torch.float32, DEVICE, centered=True, momentum=0.9, seed=17)
    build_plan = triton_backend._launch_plan

    def shifted_plan(tensor_lists, columns, device):
        plan = build_plan(tensor_lists, columns, device)
        table = plan.table.view(-1, triton_backend._TABLE_WIDTH).clone()
        blocks = plan.blocks.view(-1, triton_backend._BLOCK_MAP_WIDTH).clone()
        table[:, columns] -= shift * lists["params"][0].element_size()
        table[:, triton_backend._NUMEL] += shift
        blocks[:, 1] += shift
        assert blocks[:, 2].tolist() == [1, 0, 0]
        plan.table, plan.blocks = table.flatten(), blocks.flatten()
        return plan

    monkeypatch.setattr(triton_backend, "_plan_cache", triton_backend.collections.OrderedDict())
    monkeypatch.setattr(triton_backend, "_launch_plan", shifted_plan)
    compare_with_reference_and_cpu_kernel(lists, centered=True, momentum=0.9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_writes_nothing_outside_the_tensors(dtype):
    """Every tensor a view into a buffer with a guard band on either side: the masked blocks must
    leave the elements past their tensor's end alone (grads too, which AMP writes back)."""
    guard, sentinel = 64, 1234.0  # 64 elements keep the views 16-byte aligned: both paths run
    sizes = [1, 3, BLOCK - 1, BLOCK + 1]
    lists = make_lists(sizes, dtype, DEVICE, centered=True, momentum=0.9, seed=3)
    buffers, guarded = [], {}
    for key, tensors in lists.items():
        guarded[key] = []
        for t in tensors:
            buffers.append(torch.full((t.numel() + 2 * guard,), sentinel, dtype=dtype, device=DEVICE))
            guarded[key].append(buffers[-1][guard:-guard].copy_(t))
    options = dict(centered=True, momentum=0.9, grad_scale=torch.tensor(8.0, device=DEVICE))
    expected = clone_lists(lists)
    step(guarded, "triton", **options)
    step(expected, "reference", **options)
    assert_lists_close(guarded, expected)
    for buffer in buffers:
        assert bool((buffer[:guard] == sentinel).all()) and bool((buffer[-guard:] == sentinel).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_amp_unscale_writes_back_grads_and_found_inf_skips(dtype):
    lists = make_lists([3, BLOCK + 1], dtype, DEVICE, centered=True, momentum=0.9, seed=11)
    grad_scale = torch.tensor(1024.0, device=DEVICE)
    options = dict(centered=True, momentum=0.9, grad_scale=grad_scale)
    actual = compare_with_reference_and_cpu_kernel(lists, **options)
    for g, original in zip(actual["grads"], lists["grads"]):
        assert not torch.equal(g, original)  # unscaled in place

    zero = torch.tensor(0.0, device=DEVICE)
    no_inf = compare_with_reference_and_cpu_kernel(lists, found_inf=zero, **options)
    assert_lists_identical(no_inf, actual)

    for flag in (1.0, 2.0, float("nan")):  # any nonzero found_inf skips (GradScaler sums flags)
        skipped = clone_lists(lists)
        step(skipped, "triton", found_inf=torch.tensor(flag, device=DEVICE), **options)
        assert_lists_identical(skipped, lists)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
def test_tensor_lr_equals_float_lr(lr_dtype):
    """A tensor lr is read on the device and rounded to float32 there, as a float lr is on the host."""
    for lr_in_momentum in (False, True):
        lists = make_lists([5, BLOCK + 9], torch.float32, DEVICE, momentum=0.9, seed=5)
        with_float, with_tensor = clone_lists(lists), clone_lists(lists)
        options = dict(momentum=0.9, lr_in_momentum=lr_in_momentum)
        step(with_float, "triton", lr=0.03, **options)
        step(with_tensor, "triton", lr=torch.tensor(0.03, dtype=lr_dtype, device=DEVICE), **options)
        assert_lists_identical(with_tensor, with_float)
    lists = make_lists([5], torch.float32, DEVICE, seed=6)
    with_float, with_tensor = clone_lists(lists), clone_lists(lists)
    step(with_float, "triton", lr=0.03)
    step(with_tensor, "triton", lr=torch.tensor([0.03], dtype=lr_dtype, device=DEVICE))
    assert_lists_identical(with_tensor, with_float)


def test_table_is_reused_and_rebuilt_when_a_tensor_moves(kernel_launches):
    lists = make_lists([5, BLOCK + 3, 7], torch.float32, DEVICE, momentum=0.9, seed=21)
    expected = clone_lists(lists)

    def both_step():
        step(lists, "triton", momentum=0.9)
        step(expected, "reference", momentum=0.9)
        assert_lists_close(lists, expected, steps=len(kernel_launches))

    both_step()
    both_step()
    first_table, second_table = (args[0] for _, args, _ in kernel_launches)
    assert second_table is first_table  # same tensors, same place: the cached table

    # A param replaced by a new tensor (and a momentum buffer, as load_state_dict does).
    old_param, old_buffer = lists["params"][1], lists["momentum_buffers"][2]
    old_param_before, old_buffer_before = old_param.clone(), old_buffer.clone()
    replacement = make_lists([BLOCK + 3, 7], torch.float32, DEVICE, momentum=0.9, seed=22)
    lists["params"][1] = replacement["params"][0]
    lists["momentum_buffers"][2] = replacement["momentum_buffers"][1]
    expected["params"][1] = replacement["params"][0].clone()
    expected["momentum_buffers"][2] = replacement["momentum_buffers"][1].clone()
    both_step()
    third_table = kernel_launches[-1][1][0]
    assert third_table is not first_table
    table = third_table.view(-1, triton_backend._TABLE_WIDTH).cpu()
    assert table[1, triton_backend._PARAM] == lists["params"][1].data_ptr()
    assert table[2, triton_backend._MOMENTUM_BUFFER] == lists["momentum_buffers"][2].data_ptr()
    assert torch.equal(old_param, old_param_before)  # the old tensors are no longer written
    assert torch.equal(old_buffer, old_buffer_before)


# NumPy warns when the interpreter narrows a float32 beyond float16's range: inf is intended.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_conversions_are_exact_and_round_to_nearest_even(dtype):
    """The kernel's load and store helpers against torch's conversions: every 16-bit pattern
    widens exactly, and float32 values narrow to nearest even, including ties, carries into the
    exponent, overflow to inf, subnormals and NaN (Triton's interpreter gets bfloat16 wrong)."""
    import triton
    import triton.language as tl

    @triton.jit
    def convert(slots, widened, float32_values, n, ELEMENT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        # slots: the data pointers of the 16-bit source and of the 16-bit destination
        start = tl.program_id(0).to(tl.int64) * BLOCK_SIZE
        lanes = tl.arange(0, BLOCK_SIZE)
        mask = start + lanes < n
        source = triton_backend._block_pointers(slots + 0, start, lanes, ELEMENT, False)
        values = triton_backend._load_as_float32(source, mask, ELEMENT)
        tl.store(widened + start + lanes, values, mask=mask)
        destination = triton_backend._block_pointers(slots + 1, start, lanes, ELEMENT, False)
        rounded = tl.load(float32_values + start + lanes, mask=mask)
        triton_backend._store_rounded(destination, rounded, mask, ELEMENT)

    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    # float32 bits: each 16-bit value exactly, then + half an ulp of the 16-bit type (a tie, to
    # even in both directions, carrying into the exponent where the mantissa is all ones), the
    # neighbours of each tie, and random bits (NaN payloads, subnormals, huge values).
    exact = patterns.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    half_ulp = 1 << (15 if dtype == torch.bfloat16 else 12)
    random_bits = torch.randint(0, 2**32, (2**15,), generator=torch.Generator().manual_seed(4))
    ties = exact + half_ulp
    bits = torch.cat([exact, ties, ties - 1, ties + 1, random_bits]) & 0xFFFFFFFF
    float32_values = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)

    n = bits.numel()
    source = torch.zeros(n, dtype=dtype)
    source[: patterns.numel()] = patterns
    source, float32_values = source.to(DEVICE), float32_values.to(DEVICE)
    narrowed = torch.zeros(n, dtype=dtype, device=DEVICE)
    widened = torch.empty(n, dtype=torch.float32, device=DEVICE)
    slots = torch.tensor([source.data_ptr(), narrowed.data_ptr()], dtype=torch.int64, device=DEVICE)
    element = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    convert[(triton.cdiv(n, 4096),)](slots, widened, float32_values, n, ELEMENT=element, BLOCK_SIZE=4096)

    expected = source.float()
    wrong = (widened != expected) & ~(widened.isnan() & expected.isnan())
    assert not bool(wrong.any()), f"{int(wrong.sum())} widened wrongly, e.g. {source[wrong][:4].tolist()}"
    expected = float32_values.to(dtype)
    nan = float32_values.isnan()
    assert torch.equal(narrowed.isnan(), nan)
    wrong = narrowed.view(torch.int16)[~nan] != expected.view(torch.int16)[~nan]
    examples = float32_values[~nan][wrong][:4].tolist()
    assert not bool(wrong.any()), f"{int(wrong.sum())} rounded wrongly, e.g. {examples}"


def test_unavailable_reasons(monkeypatch):
    assert triton_backend.unavailable_reason(torch.device(DEVICE)) is None
    assert "not meta tensors" in triton_backend.unavailable_reason(torch.device("meta"))

    def fresh_module():
        spec = importlib.util.spec_from_file_location("rmsprop_fused._fresh_triton_backend", triton_backend.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    compiled = fresh_module()
    assert "TRITON_INTERPRET=1" in compiled.unavailable_reason(torch.device("cpu"))
    gpu_reason = None if torch.cuda.is_available() else "no CUDA GPU is visible"
    assert compiled.unavailable_reason(torch.device("cuda", 0)) == gpu_reason

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = fresh_module()
    assert interpreted.unavailable_reason(torch.device("cpu")) is None
    assert "interpreter" in interpreted.unavailable_reason(torch.device("cuda", 0))

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails
    assert fresh_module().unavailable_reason(torch.device("cuda", 0)) == "Triton is not installed"


def test_optimizer_with_triton_backend_follows_torch_rmsprop():
    torch.manual_seed(0)
    params = [torch.randn(BLOCK + 3, device=DEVICE), torch.randn(4, 5, device=DEVICE)]
    ours = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    kwargs = dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=0.5, centered=True)
    from rmsprop_fused import FusedRMSprop

    fused = FusedRMSprop(ours, backend="triton", **kwargs)
    reference = torch.optim.RMSprop(theirs, foreach=False, **kwargs)
    for step_index in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        fused.step()
        reference.step()
        for a, e in zip(ours, theirs):
            assert_close(a.detach(), e.detach(), steps=step_index + 1)


def test_compiled_kernel_uses_ieee_division_no_fma_and_16_byte_accesses():
    """The kernel compiled for a GPU (sm_90, no GPU needed): IEEE division and square root, no
    fused multiply-add, no flush-to-zero, and 16-byte loads and stores on the aligned path."""
    pytest.importorskip("triton.backends.nvidia")
    script = textwrap.dedent(
        """
        import re
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from rmsprop_fused import _triton_backend as backend

        kernel = backend._rmsprop_kernel
        assert isinstance(kernel, triton.runtime.JITFunction), "expected a compiled (not interpreted) kernel"
        for element in (tl.float32, tl.bfloat16):
            constexprs = dict(
                ELEMENT=element, TABLE_WIDTH=6, BLOCK_MAP_WIDTH=3, CENTERED=True, MOMENTUM=True,
                MAXIMIZE=False, HAS_WEIGHT_DECAY=True, LERP_WEIGHT_SMALL=True, LR_IN_MOMENTUM=False,
                LR_FROM_TENSOR=True, UNSCALE_GRAD=True, HAS_FOUND_INF=True,
                BLOCK_SIZE=backend.BLOCK_SIZE,
            )
            signature = {name: "constexpr" if name in constexprs else "fp32" for name in kernel.arg_names}
            pointers = ("lr_tensor", "grad_scale", "found_inf")
            signature.update(table="*i64", blocks="*i64", **{name: "*fp32" for name in pointers})
            source = ASTSource(
                fn=kernel, signature=signature,
                constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
            )
            ptx = triton.compile(
                source, target=GPUTarget("cuda", 90, 32),
                options=dict(num_warps=backend.NUM_WARPS, enable_fp_fusion=False),
            ).asm["ptx"]
            found = lambda pattern: re.search(pattern, ptx) is not None
            assert not found(r"\\bfma\\."), "a fused multiply-add"
            assert not found(r"\\.ftz\\b"), "flush-to-zero"
            assert found(r"div\\.rn\\.f32"), "no IEEE division"
            assert not found(r"div\\.(approx|full)\\.f32"), "approximate division"
            assert found(r"sqrt\\.rn\\.f32") and not found(r"sqrt\\.approx"), "approximate square root"
            assert found(r"ld\\.global(\\.\\w+)*\\.v4\\.b32"), "no 16-byte loads"
            assert found(r"st\\.global(\\.\\w+)*\\.v4\\.b32"), "no 16-byte stores"
            print(element, "ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-offset"])
def test_gpu_triton_matches_reference_and_cuda_kernel(dtype, offset):
    sizes = [0, 1, 3, BLOCK, BLOCK + 1, 65537, 2**20 + 3]
    for options in (dict(centered=True, momentum=0.9, weight_decay=0.1), dict(maximize=True, eps_in_sqrt=True)):
        lists = make_lists(sizes, dtype, "cuda", centered=options.get("centered", False),
                           momentum=options.get("momentum", 0.0), seed=31, offset=offset)
        actual = compare_with_reference_and_cpu_kernel(lists, **options)
        if available("cuda", "cuda", dtype):
            cuda_kernel = clone_lists(lists)
            step(cuda_kernel, "cuda", **options)
            assert_lists_identical(actual, cuda_kernel)


@pytest.mark.cuda
@requires_gpu
def test_gpu_captured_in_a_cuda_graph_with_a_device_lr():
    lists = make_lists([3, BLOCK + 1, 100_000], torch.float32, "cuda", momentum=0.9, seed=41)
    eager = clone_lists(lists)
    lr = torch.tensor(0.01, device="cuda")
    options = dict(momentum=0.9, grad_scale=torch.tensor(4.0, device="cuda"))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernel and builds the pointer table
        step(lists, "triton", lr=lr, **options)
    torch.cuda.current_stream().wait_stream(side)
    step(eager, "triton", lr=0.01, **options)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(lists, "triton", lr=lr, **options)
    for value in (0.02, 0.005):
        lr.fill_(value)
        graph.replay()
        step(eager, "triton", lr=value, **options)
    torch.cuda.synchronize()
    assert_lists_identical(lists, eager)
