"""The Triton kernel, bit for bit, against the reference backend and the C++ kernel.

Without a GPU the kernel runs on CPU tensors in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before the kernel is defined), which runs one program at a time in Python, a
few hundredths of a second each (a masked program costs as much as a full one): the option tests
run two programs (OPTION_SIZES), and the tests of sizes, views, blocks and counters more, around
the block boundaries, zero-size tensors among them. With a GPU
the same tests run the compiled kernel on CUDA tensors, and the tests at the end add large
tensors and a CUDA graph. tests/test_triton_aot.py compiles every variant for sm_80 and sm_90.

Comparisons are bitwise, except that a NaN only has to meet a NaN (as tests/common.py same_bits):
torch's ops make NaN of other signs than the CPU's instructions do (the square root of a negative
number is +NaN in torch, -NaN from sqrtss), a GPU's NaN is another again, and even the
interpreter's NumPy float32 arithmetic, the CPU's instructions, can keep the other NaN of a sum
or product of two than the C++ kernel: x86 returns the first operand's, and GCC may swap the
operands of a commutative operation (the sign then reaches an fp16 NaN, sign | 0x7E00). The
codecs' own NaN bits are tested below, with every 16-bit pattern.
"""

import importlib.util
import sys

import pytest
import torch

from common import (
    EXTENDED_OPTIONS, OPTION_MATRIX, STATE_PAIRS, assert_close, available, clone_lists, fresh_seed, make_lists,
    option_id, pair_id, step,
)

from rmsprop_fused import _quantization as quantization
from rmsprop_fused import _triton_backend as triton_backend

# Without a GPU, CPU tensors in the interpreter; with one, the compiled kernel on CUDA tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not available("triton", DEVICE),
    reason=f"the Triton backend is unavailable: {triton_backend.unavailable_reason(torch.device(DEVICE))}",
)
PAIRS = [pair for pair in STATE_PAIRS if pair[0] != torch.float64]  # float64: no Triton kernel
ELEMENT_PAIRS = [pair for pair in PAIRS if pair[1] != torch.uint8]
BLOCK = triton_backend.BLOCK_SIZE
QUANT = quantization.QUANT_BLOCK
# Two programs: a masked one (300 elements: one whole block of 8-bit state and a partial one) and
# an unmasked, aligned one, of two tensors with their own step counts (bias correction, random
# streams); the interpreter runs each program in about the same time, masked or not.
OPTION_SIZES = [300, BLOCK]
# Three programs: one tensor smaller than a block of 8-bit state, one spanning two programs.
STEP_SIZES = [5, BLOCK + 300]
LIST_KEYS = ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "state_steps",
             "square_avg_scales", "grad_avg_scales", "momentum_buffer_scales")
BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # integer twins, for bitwise views

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU is visible")


def stores_16_bit(pair) -> bool:
    return pair[0] in (torch.float16, torch.bfloat16) or pair[1] == torch.bfloat16


def low_precision_state(pair) -> bool:
    return pair[1] in (torch.bfloat16, torch.uint8)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(BITS[t.element_size()])


def fill_bits(t: torch.Tensor, pattern: int) -> None:
    """Every element of `t` set to the bit pattern `pattern` (an unsigned integer)."""
    width = 8 * t.element_size()
    t.view(BITS[t.element_size()]).fill_(pattern - (1 << width) if pattern >= 1 << (width - 1) else pattern)


def assert_lists_match(actual: dict, expected: dict, *, nan_payloads: bool) -> None:
    """Bitwise equality of every tensor of the lists; NaN only has to meet NaN unless
    `nan_payloads` (the same computation, run twice)."""
    for key in expected:
        assert len(actual[key]) == len(expected[key]), key
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            assert a.dtype == e.dtype and a.shape == e.shape, (key, i, a.dtype, e.dtype, a.shape, e.shape)
            different = bits(a) != bits(e)
            if a.is_floating_point() and not nan_payloads:
                different &= ~(a.detach().cpu().isnan() & e.detach().cpu().isnan())
            if bool(different.any()):
                first = int(different.flatten().nonzero()[0])
                raise AssertionError(
                    f"{key}[{i}] ({a.dtype}): {int(different.sum())} of {a.numel()} elements differ in their bits, first "
                    f"at {first}: {a.flatten()[first].item()!r} vs {e.flatten()[first].item()!r}"
                )


def assert_lists_identical(actual: dict, expected: dict) -> None:
    assert_lists_match(actual, expected, nan_payloads=True)


def compare_with_reference_and_cpu_kernel(lists: dict, **options) -> dict:
    """Steps copies of `lists` with the Triton kernel, the reference and (when built) the C++ CPU
    kernel on CPU copies; all must agree bit for bit. Returns the Triton result."""
    actual, expected = clone_lists(lists), clone_lists(lists)
    step(actual, "triton", **options)
    step(expected, "reference", **options)
    assert_lists_match(actual, expected, nan_payloads=False)
    if available("cpu"):
        on_cpu = clone_lists({key: [t.cpu() for t in tensors] for key, tensors in lists.items()})
        cpu_options = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
        step(on_cpu, "cpu", **cpu_options)
        assert_lists_match(actual, on_cpu, nan_payloads=False)  # (module docstring)
    return actual


def lists_for(pair, sizes, options, *, seed, offset=0):
    return make_lists(sizes, pair[0], DEVICE, centered=options.get("centered", False),
                      momentum=options.get("momentum", 0.0), seed=seed, offset=offset, state_dtype=pair[1], steps=True,
                      variance_state=options.get("variance_state", False))


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


# ------------------------------------------------------------------------ options and state pairs


def _cases(pair, option_sets):
    """(pair, options) for each option set, with stochastic rounding on and off where something
    is 16-bit, and centered low-precision state in both forms (torch's, and the variance)."""
    for options in option_sets:
        for rounding in (False, True) if stores_16_bit(pair) else (False,):
            for variance in (False, True) if options["centered"] and low_precision_state(pair) else (False,):
                yield pair, dict(options, rounding_seed=rounding or None, variance_state=variance)


def _case_id(case) -> str:
    pair, options = case
    extra = [name for name, on in (("sr", options["rounding_seed"]), ("var", options["variance_state"])) if on]
    core = {k: v for k, v in options.items() if k not in ("rounding_seed", "variance_state")}
    return "-".join([pair_id(pair), option_id(core)] + extra)


OPTION_CASES = [case for pair in PAIRS for case in _cases(pair, OPTION_MATRIX + EXTENDED_OPTIONS)]


@pytest.mark.parametrize("pair, options", OPTION_CASES, ids=[_case_id(case) for case in OPTION_CASES])
def test_every_option_and_state_pair_matches(pair, options):
    """Each of torch's options and the extended ones, for every (param, state) pair, with
    stochastic rounding and the variance form where they apply; a fresh seed for the rounding
    and the inputs."""
    if options["rounding_seed"]:
        options["rounding_seed"] = fresh_seed()
    compare_with_reference_and_cpu_kernel(lists_for(pair, OPTION_SIZES, options, seed=fresh_seed()), **options)


MULTI_STEP_CASES = [case for pair in PAIRS for case in _cases(pair, [dict(
    centered=True, momentum=0.9, bias_correction=True, weight_decay=0.1, decoupled_weight_decay=True, nesterov=True,
)]) if case[1]["rounding_seed"] or not stores_16_bit(pair)]


@pytest.mark.parametrize("pair, options", MULTI_STEP_CASES, ids=[_case_id(case) for case in MULTI_STEP_CASES])
def test_three_steps_with_amp_follow_the_counters(pair, options):
    """Three steps in a row, each one's input the last one's output: each step's counters choose
    its bias correction and its random streams, so later steps' bits depend on the counters being
    counted right; AMP's grad write-back on top. Another seed rounds some value differently."""
    options = dict(options, grad_scale=torch.tensor(4.0, device=DEVICE),
                   rounding_seed=fresh_seed() if options["rounding_seed"] else None)
    lists = lists_for(pair, STEP_SIZES, options, seed=fresh_seed())
    if options["rounding_seed"]:
        # among the values both seeds leave finite (centered state with bias correction makes some
        # NaN), some 16-bit value is rounded the other way
        first, other = clone_lists(lists), clone_lists(lists)
        step(first, "triton", **options)
        step(other, "triton", **dict(options, rounding_seed=options["rounding_seed"] + 1))
        rounded = ("params", "square_avgs") if pair[1] != torch.uint8 else ("params",)
        assert any(bool(((bits(a) != bits(b)) & a.cpu().isfinite() & b.cpu().isfinite()).any())
                   for key in rounded for a, b in zip(first[key], other[key]))
    for _ in range(3):
        lists = compare_with_reference_and_cpu_kernel(lists, **options)


# -------------------------------------------------------------------------- sizes, views, blocks


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-offset"])
@pytest.mark.parametrize("pair", ELEMENT_PAIRS, ids=pair_id)
def test_sizes_around_the_block_and_misaligned_views(pair, offset, kernel_launches):
    """Aligned tensors take the unmasked 16-byte path for whole blocks; views one element into
    their storage are misaligned and take the masked path everywhere."""
    sizes = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 7]
    options = dict(centered=True, momentum=0.9, weight_decay=0.1)
    lists = lists_for(pair, sizes, options, seed=fresh_seed(), offset=offset)
    compare_with_reference_and_cpu_kernel(lists, **options)

    (grid, args, _), = kernel_launches
    blocks = args[1].view(-1, triton_backend._BLOCK_MAP_WIDTH).cpu()
    # blocks: 0 (counts its step) | 1 | BLOCK - 1 | BLOCK | BLOCK, 1 | BLOCK, BLOCK, 7
    assert grid == (9,)
    assert blocks[:, 0].tolist() == [0, 1, 2, 3, 4, 4, 5, 5, 5]
    whole = [False, False, False, True, True, False, True, True, False]
    assert blocks[:, 2].tolist() == [int(w and offset == 0) for w in whole]


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_8_bit_blocks_around_the_program_and_the_tensor_end(param_dtype, kernel_launches):
    """8-bit state: a program covers BLOCK // 256 whole blocks of 256; tensors end inside, at and
    after a block of 256 and a program's block, and the new scales (one per 256) are the blocks'
    own, including a tensor's last, partial one."""
    sizes = [1, QUANT - 1, QUANT, QUANT + 1, BLOCK - 1, BLOCK, BLOCK + QUANT, 2 * BLOCK + 300]
    options = dict(centered=True, momentum=0.9, variance_state=True, lr_in_momentum=True)
    lists = lists_for((param_dtype, torch.uint8), sizes, options, seed=fresh_seed())
    actual = compare_with_reference_and_cpu_kernel(lists, **options)
    (grid, args, _), = kernel_launches
    assert grid == (1 + 1 + 1 + 1 + 1 + 1 + 2 + 3,)
    # the scales were rewritten: some block of each tensor has a new maximum
    for name in ("square_avg_scales", "grad_avg_scales", "momentum_buffer_scales"):
        assert any(not torch.equal(before, after) for before, after in zip(lists[name], actual[name]))


def test_an_inf_in_new_8bit_state_makes_its_block_nan():
    """blockwise_quant.h AbsMax::scale: a block that holds an inf gets a NaN scale, as one that
    holds a NaN does (here an inf grad makes grad_avg inf)."""
    options = dict(centered=True, momentum=0.9, variance_state=True)
    lists = lists_for((torch.float32, torch.uint8), [3 * QUANT + 40], options, seed=fresh_seed())
    lists["grads"][0][QUANT + 7] = float("inf")
    scales = compare_with_reference_and_cpu_kernel(lists, **options)["grad_avg_scales"][0].cpu()
    assert torch.isnan(scales[1]) and torch.isfinite(scales[[0, 2, 3]]).all()


def test_many_tensors_in_one_group(kernel_launches):
    gen = torch.Generator().manual_seed(fresh_seed())
    sizes = torch.randint(0, 700, (40,), generator=gen).tolist() + [0, 3 * BLOCK + 1]
    options = dict(centered=True, momentum=0.9, maximize=True)
    lists = lists_for((torch.float32, torch.float32), sizes, options, seed=fresh_seed())
    compare_with_reference_and_cpu_kernel(lists, **options)
    assert len(kernel_launches) == 1


def test_one_launch_per_group(kernel_launches):
    """Each (device, param dtype, state dtype) group is one launch; a group of zero-size tensors
    launches one program per tensor to count their steps, and nothing without counters."""
    groups = [
        make_lists([5, BLOCK + 3, 0], torch.float32, DEVICE, momentum=0.9, seed=1, steps=True),
        make_lists([7, 2], torch.bfloat16, DEVICE, momentum=0.9, seed=2, steps=True),
        make_lists([BLOCK + 9], torch.bfloat16, DEVICE, momentum=0.9, seed=3, steps=True, state_dtype=torch.float32),
        make_lists([0, 0], torch.float16, DEVICE, momentum=0.9, seed=4, steps=True),
    ]
    mixed = {key: [t for lists in groups for t in lists[key]] for key in LIST_KEYS}
    compare_with_reference_and_cpu_kernel(mixed, momentum=0.9)
    assert [grid for grid, _, _ in kernel_launches] == [(4,), (2,), (2,), (2,)]

    kernel_launches.clear()
    no_steps = make_lists([0, 0], torch.float16, DEVICE, momentum=0.9, seed=5)
    step(no_steps, "triton", momentum=0.9)
    assert kernel_launches == []


def test_block_starts_beyond_the_int32_range(monkeypatch):
    """Elements past 2**31 of a tensor, without allocating one: the table says each tensor starts
    2**31 + 3 * BLOCK elements before its real data and is that much longer, and the blocks start
    that far in, so the kernel reaches the real elements only if it computes the offsets in
    64 bits; 8-bit scales sit (2**31 + 3 * BLOCK) / 256 scales further on. Whole blocks stay
    aligned (the shift is a multiple of 16 bytes), so both paths run."""
    shift = 2**31 + 3 * BLOCK
    build_plan = triton_backend._launch_plan
    element_columns = [triton_backend._COLUMNS[name] for name in triton_backend._ELEMENT_LISTS]
    scale_columns = [triton_backend._COLUMNS[name] for name in LIST_KEYS if name.endswith("_scales")]

    def shifted_plan(lists, device):
        plan = build_plan(lists, device)
        table = plan.table.view(-1, triton_backend._TABLE_WIDTH).clone()
        blocks = plan.blocks.view(-1, triton_backend._BLOCK_MAP_WIDTH).clone()
        for column, name in zip(element_columns, triton_backend._ELEMENT_LISTS):
            if name in lists:
                table[:, column] -= shift * lists[name][0].element_size()
        if "square_avg_scales" in lists:
            table[:, scale_columns] -= (shift // QUANT) * 4
        table[:, triton_backend._NUMEL] += shift
        blocks[:, 1] += shift
        assert blocks[:, 2].tolist() == [1, 0, 0]
        plan.table, plan.blocks = table.flatten(), blocks.flatten()
        return plan

    monkeypatch.setattr(triton_backend, "_plan_cache", triton_backend.collections.OrderedDict())
    monkeypatch.setattr(triton_backend, "_launch_plan", shifted_plan)
    options = dict(centered=True, momentum=0.9, bias_correction=True)
    for pair in ((torch.float32, torch.float32), (torch.bfloat16, torch.uint8)):
        compare_with_reference_and_cpu_kernel(lists_for(pair, [BLOCK + 5, 7], options, seed=fresh_seed()), **options)


# The patterns of a signalling NaN with a payload no arithmetic produces: arithmetic on it gives a
# quiet NaN, and a 16-bit store the canonical one, so every element the kernel writes changes.
POISON = {torch.float32: 0x7F800001, torch.bfloat16: 0x7F81, torch.float16: 0x7C01, torch.uint8: 0xFF}
GUARD = 64  # elements on either side of each tensor: keeps every view 16-byte aligned


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_every_element_is_written_and_nothing_else(pair):
    """Every tensor poisoned (8-bit state: its codes 0xFF and its scales a signalling NaN, which
    decodes as NaN and encodes as new scales and the codes of 0), inside a buffer whose guard bands
    hold a sentinel: after a step, no element of any output still holds the poison, and every
    guard band is intact (the masked tails of the last blocks write nothing past their tensor)."""
    sizes = [1, 3, QUANT + 1, BLOCK - 1, BLOCK + 1]
    options = dict(centered=True, momentum=0.9, grad_scale=torch.tensor(8.0, device=DEVICE),
                   rounding_seed=5 if stores_16_bit(pair) else None)
    lists = lists_for(pair, sizes, options, seed=fresh_seed())
    buffers, poisoned = [], {}
    for key, tensors in lists.items():
        poisoned[key] = []
        for t in tensors:
            buffer = torch.empty(t.numel() + 2 * GUARD, dtype=t.dtype, device=DEVICE)
            fill_bits(buffer, 0x5A)  # the guard bands' sentinel
            inside = buffer[GUARD:-GUARD].view(t.shape)
            if key == "state_steps":
                inside.copy_(t)  # counters: read as they are, checked to be written by changing
            else:
                fill_bits(inside, POISON[t.dtype])
            buffers.append((key, buffer.clone(), buffer))
            poisoned[key].append(inside)
    step(poisoned, "triton", **options)
    for key, before, buffer in buffers:
        assert torch.equal(bits(buffer[:GUARD]), bits(before[:GUARD])), f"{key}: written before its tensor"
        assert torch.equal(bits(buffer[-GUARD:]), bits(before[-GUARD:])), f"{key}: written after its tensor"
        kept = bits(buffer[GUARD:-GUARD]) == bits(before[GUARD:-GUARD])
        assert not bool(kept.any()), f"{key}: {int(kept.sum())} of {kept.numel()} elements not written"


# ----------------------------------------------------------------------- AMP, lr, step counters


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                  (torch.float16, torch.uint8)], ids=pair_id)
def test_amp_unscale_writes_back_grads_and_found_inf_skips_everything(pair):
    options = dict(centered=True, momentum=0.9, grad_scale=torch.tensor(1024.0, device=DEVICE),
                   bias_correction=True, rounding_seed=7 if stores_16_bit(pair) else None)
    lists = lists_for(pair, [3, BLOCK + 1], options, seed=fresh_seed())
    actual = compare_with_reference_and_cpu_kernel(lists, **options)
    for g, original in zip(actual["grads"], lists["grads"]):
        assert not torch.equal(g, original)  # unscaled in place
    assert [float(s) for s in actual["state_steps"]] == [float(s) + 1 for s in lists["state_steps"]]

    zero = torch.tensor(0.0, device=DEVICE)
    assert_lists_identical(compare_with_reference_and_cpu_kernel(lists, found_inf=zero, **options), actual)

    # any nonzero found_inf skips, counters included (GradScaler sums flags); a float64 flag too small
    # for float32 as well
    for flag in (torch.tensor(1.0), torch.tensor(2.0), torch.tensor(float("nan")), torch.tensor(1e-300, dtype=torch.float64)):
        skipped = clone_lists(lists)
        step(skipped, "triton", found_inf=flag.to(DEVICE), **options)
        assert_lists_identical(skipped, lists)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
def test_tensor_lr_equals_float_lr(lr_dtype):
    """A tensor lr is read on the device and rounded to float32 there, as a float lr is on the
    host; the decoupled decay factor 1 - lr * wd is computed from it the same way."""
    for options in (dict(momentum=0.9), dict(momentum=0.9, lr_in_momentum=True),
                    dict(weight_decay=0.1, decoupled_weight_decay=True)):
        lists = make_lists([5, BLOCK + 9], torch.float32, DEVICE, momentum=options.get("momentum", 0.0),
                           seed=fresh_seed())
        with_float, with_tensor = clone_lists(lists), clone_lists(lists)
        step(with_float, "triton", lr=0.03, **options)
        step(with_tensor, "triton", lr=torch.tensor(0.03, dtype=lr_dtype, device=DEVICE), **options)
        assert_lists_identical(with_tensor, with_float)
        compare_with_reference_and_cpu_kernel(lists, lr=torch.tensor(0.03, dtype=lr_dtype, device=DEVICE), **options)


def test_step_counters_count_once_per_call():
    """Every counter goes up by exactly 1 per call, however many programs its tensor has (one
    writes it, the last to finish), zero-size tensors' too; the programs of a tensor all read the
    old count (its bias correction is the same across the tensor's blocks, checked by the
    comparison); the per-tensor finish counts are back to zero for the next launch."""
    options = dict(centered=True, bias_correction=True)
    lists = lists_for((torch.float32, torch.float32), [0, 3 * BLOCK + 1, 5, 2 * BLOCK], options, seed=fresh_seed())
    before = [float(s) for s in lists["state_steps"]]
    for calls in range(1, 3):
        lists = compare_with_reference_and_cpu_kernel(lists, **options)
        assert [float(s) for s in lists["state_steps"]] == [b + calls for b in before]
    plans = list(triton_backend._plan_cache.values())
    assert all(int(plan.done.abs().sum()) == 0 for plan in plans)


def test_bias_correction_and_rounding_keys_follow_each_tensors_counter():
    """The per-tensor values come from each tensor's own counter: counters far apart, one huge
    (2^32 - 256 and beyond clamp to 2^32 - 1 in step_count), one NaN (0), one negative (0)."""
    options = dict(centered=True, momentum=0.9, bias_correction=True, rounding_seed=fresh_seed())
    lists = lists_for((torch.bfloat16, torch.bfloat16), [7, 300, 5, 9, 11], options, seed=fresh_seed())
    for counter, value in zip(lists["state_steps"], (0.0, 123456.0, 4294967040.0, float("nan"), -3.0)):
        counter.fill_(value)
    compare_with_reference_and_cpu_kernel(lists, **options)


def test_table_is_reused_and_rebuilt_when_a_tensor_moves(kernel_launches):
    lists = make_lists([5, BLOCK + 3, 7], torch.float32, DEVICE, momentum=0.9, seed=fresh_seed(), steps=True)
    expected = clone_lists(lists)

    def both_step():
        step(lists, "triton", momentum=0.9)
        step(expected, "reference", momentum=0.9)
        assert_lists_match(lists, expected, nan_payloads=False)

    both_step()
    both_step()
    first_table, second_table = (args[0] for _, args, _ in kernel_launches)
    assert second_table is first_table  # same tensors, same place: the cached table

    # A param replaced by a new tensor (and a momentum buffer, as load_state_dict does), and a
    # new step counter.
    old_param, old_buffer = lists["params"][1], lists["momentum_buffers"][2]
    old_param_before, old_buffer_before = old_param.clone(), old_buffer.clone()
    replacement = make_lists([BLOCK + 3, 7], torch.float32, DEVICE, momentum=0.9, seed=22, steps=True)
    for key, (i, j) in (("params", (1, 0)), ("momentum_buffers", (2, 1)), ("state_steps", (0, 0))):
        lists[key][i] = replacement[key][j]
        expected[key][i] = replacement[key][j].clone()
    both_step()
    third_table = kernel_launches[-1][1][0]
    assert third_table is not first_table
    table = third_table.view(-1, triton_backend._TABLE_WIDTH).cpu()
    assert table[1, triton_backend._PARAM] == lists["params"][1].data_ptr()
    assert table[2, triton_backend._MOMENTUM_BUFFER] == lists["momentum_buffers"][2].data_ptr()
    assert table[0, triton_backend._STEP] == lists["state_steps"][0].data_ptr()
    assert torch.equal(old_param, old_param_before)  # the old tensors are no longer written
    assert torch.equal(old_buffer, old_buffer_before)


# ------------------------------------------------------------------------------------- codecs


def _convert_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def convert(slots, widened, float32_values, random, n, ELEMENT: tl.constexpr, STOCHASTIC: tl.constexpr,
                BLOCK_SIZE: tl.constexpr):
        # slots: the data pointers of the 16-bit source and of the 16-bit destination
        start = tl.program_id(0).to(tl.int64) * BLOCK_SIZE
        lanes = tl.arange(0, BLOCK_SIZE // 256)[:, None] * 256 + tl.arange(0, 256)[None, :]
        mask = start + lanes < n
        source = triton_backend._storage_pointers(slots, 0, start, lanes, ELEMENT, False)
        tl.store(widened + start + lanes, triton_backend._load(source, mask, ELEMENT), mask=mask)
        destination = triton_backend._storage_pointers(slots, 1, start, lanes, ELEMENT, False)
        value = tl.load(float32_values + start + lanes, mask=mask)
        # the random bits of stochastic rounding, read from `random` (key 0 is never used: the
        # kernel's own random_bits are tested through the steps)
        bits = tl.load(random + start + lanes, mask=mask).to(tl.uint32)
        if STOCHASTIC:
            if ELEMENT == tl.bfloat16:
                rounded = triton_backend._bfloat16_stochastic(value, bits)
            else:
                rounded = triton_backend._half_stochastic(value, bits)
            tl.store(destination, rounded.to(tl.uint16), mask=mask)
        else:
            triton_backend._store(destination, value, mask, 0, start + lanes, ELEMENT, False)

    return convert


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_codecs_bit_for_bit(dtype, stochastic):
    """The kernel's codecs against their definitions: every 16-bit pattern widens exactly;
    float32 values narrow to nearest even (torch's conversion) or stochastically (the reference's
    mirror of element_codec.h), including ties, carries into the exponent, overflow to inf,
    subnormals, and NaN to the canonical pattern (0x7FC0; 0x7E00 with the NaN's sign for float16,
    as c10 does)."""
    import triton
    import triton.language as tl

    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    # float32 bits: each 16-bit value exactly, then + half an ulp of the 16-bit type (a tie, to
    # even in both directions, carrying into the exponent where the mantissa is all ones), the
    # neighbours of each tie, and random bits (NaN payloads, subnormals, huge values).
    exact = patterns.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    half_ulp = 1 << (15 if dtype == torch.bfloat16 else 12)
    gen = torch.Generator().manual_seed(fresh_seed())
    random_bits = torch.randint(0, 2**32, (2**15,), generator=gen)
    ties = exact + half_ulp
    float_bits = torch.cat([exact, ties, ties - 1, ties + 1, random_bits]) & 0xFFFFFFFF
    float32_values = torch.where(float_bits >= 2**31, float_bits - 2**32, float_bits).to(torch.int32).view(torch.float32)
    n = float_bits.numel()
    random = torch.randint(0, 2**32, (n,), generator=gen)

    source = torch.zeros(n, dtype=dtype)
    source[: patterns.numel()] = patterns
    source, values, random_device = source.to(DEVICE), float32_values.to(DEVICE), random.to(DEVICE)
    narrowed = torch.zeros(n, dtype=dtype, device=DEVICE)
    widened = torch.empty(n, dtype=torch.float32, device=DEVICE)
    slots = torch.tensor([source.data_ptr(), narrowed.data_ptr()], dtype=torch.int64, device=DEVICE)
    element = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    _convert_kernel()[(triton.cdiv(n, 4096),)](slots, widened, values, random_device, n, ELEMENT=element,
                                               STOCHASTIC=stochastic, BLOCK_SIZE=4096)

    expected = source.float().cpu()
    widened, narrowed = widened.cpu(), narrowed.cpu()
    wrong = (bits(widened) != bits(expected)) & ~(widened.isnan() & expected.isnan())
    assert not bool(wrong.any()), f"{int(wrong.sum())} widened wrongly, e.g. {source.cpu()[wrong][:4].tolist()}"

    nan = float32_values.isnan()
    if stochastic:
        expected = quantization.stochastic_round(float32_values, random, dtype)
    else:
        expected = float32_values.to(dtype)
    canonical = 0x7FC0 if dtype == torch.bfloat16 else 0x7E00
    if dtype == torch.float16:  # c10 keeps a NaN's sign
        canonical_bits = torch.where(float32_values.view(torch.int32) < 0, canonical | 0x8000, canonical)
    else:
        canonical_bits = torch.full((n,), canonical)
    expected_bits = torch.where(nan, canonical_bits, bits(expected).to(torch.int64) & 0xFFFF)
    wrong = (bits(narrowed).to(torch.int64) & 0xFFFF) != expected_bits
    examples = float32_values[wrong][:4].tolist()
    assert not bool(wrong.any()), f"{int(wrong.sum())} rounded wrongly, e.g. {examples}"


def test_8_bit_codec_against_a_brute_force_search():
    """quantize_rows picks, for each element, the code map entry nearest to x / scale, the lower
    one on a tie (an argmin over all 256 distances), and the scale of each row is its largest
    magnitude, NaN when it holds one."""
    import triton
    import triton.language as tl

    @triton.jit
    def quantize(values, codes, scales, code_map, ROWS: tl.constexpr):
        lanes = tl.arange(0, ROWS)[:, None] * 256 + tl.arange(0, 256)[None, :]
        new_codes, new_scales = triton_backend._quantize_rows(tl.load(values + lanes), None, code_map)
        tl.store(codes + lanes, new_codes)
        tl.store(scales + tl.arange(0, ROWS), new_scales)

    gen = torch.Generator().manual_seed(fresh_seed())
    rows = 8
    values = torch.randn(rows, 256, generator=gen) * torch.logspace(-8, 3, rows)[:, None]
    values[1] = values[1].abs()
    values[2, :128] = 0.0
    values[3] = 0.0  # an all-zero block: scale 0, codes of 0
    values[4, 17] = float("nan")
    for signed in (False, True):
        code_map = quantization.code_map(signed, torch.device(DEVICE))
        data = values.abs() if not signed else values
        codes = torch.empty(rows, 256, dtype=torch.uint8, device=DEVICE)
        scales = torch.empty(rows, device=DEVICE)
        quantize[(1,)](data.to(DEVICE), codes, scales, code_map, ROWS=rows)
        largest = data.abs().amax(dim=1)
        expected_scales = torch.where(data.isnan().any(dim=1), float("nan"), largest)
        assert_lists_match({"s": [scales.cpu()]}, {"s": [expected_scales]}, nan_payloads=False)
        normalized = torch.where(expected_scales[:, None] > 0, data / expected_scales[:, None], 0.0)
        distances = (normalized[..., None] - code_map.cpu()).abs()  # float32, as the kernel compares them
        nearest = distances.argmin(dim=-1)  # the first (lower) index on a tie
        finite = ~expected_scales.isnan()
        assert torch.equal(codes.cpu()[finite].long(), nearest[finite])
        zero_code = int((code_map == 0).nonzero())
        assert bool((codes.cpu()[~finite] == zero_code).all())  # NaN scale: normalize gives 0


# ---------------------------------------------------------------------------------- the rest


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
    torch.manual_seed(fresh_seed())
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


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "8bit"], ids=str)
def test_optimizer_low_precision_state_matches_the_reference_backend(state_dtype):
    """FusedRMSprop with low-precision state, stochastic rounding, clipping and bias correction:
    the Triton backend and the reference backend keep the same bits over three steps (params of
    8-bit state's size; the reference computes the same rule with torch ops)."""
    from rmsprop_fused import FusedRMSprop

    torch.manual_seed(fresh_seed())
    shapes = [(quantization.MIN_QUANTIZED_NUMEL + 300,), (64, 80)]
    params = [torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) for shape in shapes]
    kwargs = dict(lr=0.01, momentum=0.9, centered=True, state_dtype=state_dtype, stochastic_rounding=True,
                  bias_correction=True, max_grad_norm=1.0, rounding_seed=fresh_seed())
    runs = {}
    for backend in ("triton", "reference"):
        copies = [p.clone().requires_grad_() for p in params]
        optimizer = FusedRMSprop(copies, backend=backend, **kwargs)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            for p in copies:
                p.grad = torch.randn(p.shape, generator=gen).to(p)
            optimizer.step()
        runs[backend] = {"params": [p.detach() for p in copies],
                         "state": [t for p in copies for t in optimizer.state[p].values()]}
    assert_lists_match(runs["triton"], runs["reference"], nan_payloads=False)


# ------------------------------------------------------------------------------------ on a GPU


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_gpu_triton_matches_reference_and_cpu_kernel(pair):
    """The compiled kernel on large tensors (many programs, both paths), every pair, the options
    that touch every stream: bitwise against the reference and the C++ kernel (NaN as NaN)."""
    sizes = [0, 1, 3, BLOCK, BLOCK + 1, 65537, 2**20 + 3]
    for options in (dict(centered=True, momentum=0.9, weight_decay=0.1, bias_correction=True, nesterov=True,
                         variance_state=low_precision_state(pair), grad_scale=torch.tensor(8.0, device="cuda"),
                         rounding_seed=3 if stores_16_bit(pair) else None, clip_coef=torch.tensor(0.5, device="cuda")),
                    dict(maximize=True, eps_in_sqrt=True, lr=torch.tensor(0.02, device="cuda"))):
        lists = lists_for(pair, sizes, options, seed=fresh_seed())
        compare_with_reference_and_cpu_kernel(lists, **options)


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("pair", ELEMENT_PAIRS, ids=pair_id)
def test_gpu_misaligned_views_match(pair):
    sizes = [1, BLOCK - 1, BLOCK + 1, 65537]
    options = dict(centered=True, momentum=0.9)
    compare_with_reference_and_cpu_kernel(lists_for(pair, sizes, options, seed=fresh_seed(), offset=1), **options)


def _plan_memory_comes_back_while_another_stream_reads_it() -> bool:
    """Builds a plan on the current stream, launches it on a busy side stream, lets the cache go
    of it, and allocates its size again on the current stream: whether that got the plan's memory
    while the side stream's launch may still read it. (300 tensors: a metadata size no other
    free block of the pool is likely to have.)"""
    options = dict(momentum=0.9)
    lists = lists_for((torch.float32, torch.float32), [1] * 300 + [BLOCK + 3], options, seed=fresh_seed())
    step(lists, "triton", **options)  # the plan, built on the current stream
    (plan,) = triton_backend._plan_cache.values()
    address, size = plan.metadata.data_ptr(), plan.metadata.numel()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(500_000_000)  # (keeps the side stream busy past what follows)
        step(lists, "triton", **options)
    triton_backend._plan_cache.clear()
    del plan
    same_size = torch.empty(size, dtype=torch.int64, device="cuda")
    reused = same_size.data_ptr() == address
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    return reused


@pytest.mark.cuda
@requires_gpu
def test_gpu_a_plan_used_on_another_stream_is_not_reused_while_that_stream_may_read_it(monkeypatch):
    """Once the cache lets a plan go, the caching allocator must not hand its memory out again
    while another stream's launch may still read it. The control, without record_use, shows the
    hazard the test would miss otherwise: a freed block goes back to its own stream's pool at once."""
    monkeypatch.setattr(triton_backend, "_plan_cache", triton_backend.collections.OrderedDict())
    assert not _plan_memory_comes_back_while_another_stream_reads_it()
    monkeypatch.setattr(triton_backend._LaunchPlan, "record_use", lambda plan: None)
    assert _plan_memory_comes_back_while_another_stream_reads_it()


@pytest.mark.cuda
@requires_gpu
def test_gpu_captured_in_a_cuda_graph_with_device_scalars_and_counters():
    """A CUDA graph replays the step with a device lr, grad_scale and found_inf: the counters
    advance on each replay (the per-tensor finish counts reset themselves), not on a skipped one."""
    pair = (torch.bfloat16, torch.uint8)
    options = dict(centered=True, momentum=0.9, bias_correction=True, variance_state=True, rounding_seed=9)
    lists = lists_for(pair, [3, BLOCK + 1, 100_000], options, seed=fresh_seed())
    eager = clone_lists(lists)
    lr, found_inf = torch.tensor(0.01, device="cuda"), torch.tensor(0.0, device="cuda")
    scale = torch.tensor(4.0, device="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernel and builds the pointer table
        step(lists, "triton", lr=lr, grad_scale=scale, found_inf=found_inf, **options)
    torch.cuda.current_stream().wait_stream(side)
    step(eager, "triton", lr=0.01, grad_scale=scale, **options)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(lists, "triton", lr=lr, grad_scale=scale, found_inf=found_inf, **options)
    for value, skip in ((0.02, 0.0), (0.005, 1.0), (0.03, 0.0)):
        lr.fill_(value)
        found_inf.fill_(skip)
        graph.replay()
        if not skip:
            step(eager, "triton", lr=value, grad_scale=scale, **options)
    torch.cuda.synchronize()
    assert_lists_identical(lists, eager)
