"""The compiled CPU op against the reference backend, bit for bit: every option combination,
every (param, state) dtype pair (8-bit blockwise included), stochastic rounding, sizes around the
vector width, the chunk size and the 256-element blocks, misaligned views; torch.library.opcheck;
and the machine code of its loops."""

import itertools

import pytest
import torch

from common import (
    EXTENDED_OPTIONS, OPTION_MATRIX, STATE_PAIRS, assert_lists_close, assert_lists_equal, available, clone_lists, fresh_seed,
    make_lists, option_id, pair_id, step,
)

pytestmark = pytest.mark.skipif(not available("cpu"), reason="the C++ extension is not built")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 3, 4, 4097, 65537, 2**20 + 3]


def matches_reference(lists, **options):
    """One step of the op and of the reference on copies of `lists`: the same bits."""
    expected, actual = clone_lists(lists), clone_lists(lists)
    step(expected, "reference", **options)
    step(actual, "cpu", **options)
    assert_lists_equal(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTION_MATRIX, ids=option_id)
def test_every_option_and_dtype_matches_reference(options, dtype):
    sizes = [0, 1, 3, 4, 5, 17, 4097]
    lists = make_lists(sizes, dtype, centered=options["centered"], momentum=options["momentum"], seed=fresh_seed())
    matches_reference(lists, **options)


def _low_precision_variance(pair, options) -> bool:
    return options["centered"] and pair[1] in (torch.bfloat16, torch.uint8)


@pytest.mark.parametrize("pair", STATE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("options", [o for o in OPTION_MATRIX if not o["maximize"] and not o["eps_in_sqrt"]] + EXTENDED_OPTIONS,
                         ids=option_id)
def test_every_state_dtype_and_extended_option_matches_reference(pair, options):
    """Sizes across the 256-element blocks of 8-bit state (a partial last block, a lone element);
    step counters from 0 to 40 for bias correction; variance state where the optimizer uses it."""
    dtype, state_dtype = pair
    variance = _low_precision_variance(pair, options)
    lists = make_lists([1, 5, 255, 256, 257, 4097], dtype, centered=options["centered"], momentum=options["momentum"],
                       state_dtype=state_dtype, steps=True, variance_state=variance, seed=fresh_seed())
    matches_reference(lists, variance_state=variance, **options)


@pytest.mark.parametrize("pair", [p for p in STATE_PAIRS if torch.float16 in p or torch.bfloat16 in p], ids=pair_id)
@pytest.mark.parametrize("centered, momentum", [(False, 0.0), (True, 0.9)], ids=["plain", "centered-momentum"])
def test_stochastic_rounding_matches_reference(pair, centered, momentum):
    dtype, state_dtype = pair
    variance = _low_precision_variance(pair, dict(centered=centered))
    options = dict(centered=centered, momentum=momentum, variance_state=variance)
    lists = make_lists([3, 300, 4097], dtype, centered=centered, momentum=momentum, state_dtype=state_dtype,
                       steps=True, variance_state=variance, seed=fresh_seed())
    matches_reference(lists, rounding_seed=fresh_seed() - 2**30, **options)
    # ... and it does round stochastically: another seed gives other bits somewhere
    one, other = clone_lists(lists), clone_lists(lists)
    step(one, "cpu", rounding_seed=1, **options)
    step(other, "cpu", rounding_seed=2, **options)
    assert any(not torch.equal(a, b) for key in ("params", "square_avgs") for a, b in zip(one[key], other[key]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-offset"])
def test_sizes_and_misaligned_views(dtype, offset):
    options = dict(centered=True, momentum=0.9, weight_decay=0.1)
    lists = make_lists(SIZES, dtype, centered=True, momentum=0.9, seed=fresh_seed(), offset=offset)
    assert all(t.storage_offset() == offset for t in lists["params"])
    matches_reference(lists, **options)


@pytest.mark.parametrize("pair", [(torch.float32, torch.uint8), (torch.bfloat16, torch.uint8)], ids=pair_id)
def test_8bit_state_across_threads(pair):
    """Large enough for at::parallel_for to split the blocks between threads: a block's scale is
    its maximum, so a block split between two threads would be wrong."""
    lists = make_lists([3 * 2**15 + 77, 1000], pair[0], centered=True, momentum=0.9, state_dtype=pair[1],
                       steps=True, seed=fresh_seed(), variance_state=True)
    matches_reference(lists, centered=True, momentum=0.9, variance_state=True)


def test_every_element_is_written():
    """The update is in place, so "written" means "changed": with random float32 inputs every
    element of the param and of each state tensor gets a new value, and a skipped element would
    keep its old one. (The values themselves are checked against the reference above.)"""
    lists = make_lists([1, 3, 4097, 65537, 2**20 + 3], torch.float32, centered=True, momentum=0.9, seed=3)
    for g in lists["grads"]:  # |g| >= 2 > sqrt(square_avg): every value moves by well over an ulp
        g.copy_(torch.where(g < 0, g - 2, g + 2))
    updated = clone_lists(lists)
    step(updated, "cpu", centered=True, momentum=0.9)
    for key in ("params", "square_avgs", "grad_avgs", "momentum_buffers"):
        for i, (after, before) in enumerate(zip(updated[key], lists[key])):
            unchanged = int((after == before).sum())
            assert unchanged == 0, f"{key}[{i}]: {unchanged} elements not written"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_amp_unscale_writes_back_grads_and_found_inf_skips(dtype):
    lists = make_lists([3, 4097], dtype, momentum=0.9, seed=11)
    grad_scale = torch.tensor(1024.0)
    expected, actual = clone_lists(lists), clone_lists(lists)
    step(expected, "reference", momentum=0.9, grad_scale=grad_scale)
    step(actual, "cpu", momentum=0.9, grad_scale=grad_scale)
    assert_lists_close(actual, expected)
    for g, original in zip(actual["grads"], lists["grads"]):
        assert not torch.equal(g, original)  # unscaled in place

    for flag in (1.0, 2.0, float("nan")):  # any nonzero found_inf skips (GradScaler sums flags)
        skipped = clone_lists(lists)
        step(skipped, "cpu", momentum=0.9, grad_scale=grad_scale, found_inf=torch.tensor(flag))
        for key in lists:
            for t, original in zip(skipped[key], lists[key]):
                assert torch.equal(t, original)


def test_tensor_lr_equals_float_lr():
    lists = make_lists([5, 4097], torch.float32, momentum=0.9, seed=5)
    with_float, with_tensor = clone_lists(lists), clone_lists(lists)
    step(with_float, "cpu", lr=0.03, momentum=0.9)
    step(with_tensor, "cpu", lr=torch.tensor(0.03), momentum=0.9)
    for key in lists:
        for a, b in zip(with_tensor[key], with_float[key]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.uint8], ids=["float32-state", "8bit-state"])
def test_opcheck(state_dtype):
    lists = make_lists([3, 17], torch.float32, centered=True, momentum=0.9, seed=2, state_dtype=state_dtype, steps=True)
    args = tuple(lists[k] for k in ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "state_steps",
                                    "square_avg_scales", "grad_avg_scales", "momentum_buffer_scales"))
    kwargs = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.1, momentum=0.9, centered=True,
                  maximize=False, eps_in_sqrt=False, lr_in_momentum=False, decoupled_weight_decay=True,
                  nesterov=True, bias_correction=True, variance_state=state_dtype == torch.uint8)
    torch.library.opcheck(torch.ops.rmsprop_fused.rmsprop_.default, args, kwargs)
    torch.library.opcheck(
        torch.ops.rmsprop_fused.rmsprop_.default, args,
        dict(kwargs, lr_tensor=torch.tensor(0.02), grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0),
             clip_coef=torch.tensor(0.5)),
    )


def _update_loop_functions():
    """{function name: disassembly} of the CPU inner loops: every instantiation of update_range
    and update_quantized_blocks (8-bit state), and each of its clones (.default,
    .arch_x86_64_v3, .arch_x86_64_v4)."""
    import glob
    import os
    import shutil
    import subprocess

    import rmsprop_fused

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    (so,) = glob.glob(os.path.join(os.path.dirname(rmsprop_fused.__file__), "_C*.so"))
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", so], capture_output=True, text=True, check=True).stdout
    functions, current = {}, None
    for line in text.splitlines():
        if line.endswith(">:"):
            name = line.split("<", 1)[1][:-2]
            loop = "update_range<" in name or "update_quantized_blocks<" in name
            current = name if loop and not any(x in name for x in ("resolver", ".cold", "@plt")) else None
            if current:
                functions[current] = []
        elif current is not None:
            functions[current].append(line)
    return {k: "\n".join(v) for k, v in functions.items()}


_CPP_TYPES = {"double": torch.float64, "float": torch.float32, "c10::Half": torch.float16,
              "c10::BFloat16": torch.bfloat16, "rmsprop_fused::cpu::Blockwise8": torch.uint8}


def _instantiation(name: str) -> tuple:
    """(param dtype, state dtype, centered, momentum, unscale, extended, stochastic, variance) of a
    loop function's demangled name."""
    kernel = name.split("rmsprop_fused::cpu::Kernel<", 1)[1]
    param, state, rest = kernel.split(", ", 2)
    variant = rest.split("UpdateVariant<", 1)[1].split(">", 1)
    flags = variant[0].split(", ") + variant[1].split(">", 1)[0].strip(", ").split(", ")
    return (_CPP_TYPES[param], _CPP_TYPES[state], *(f == "true" for f in flags))


def _expected_instantiations() -> set:
    """What cpu_kernel.h run_pair instantiates: for every pair and (centered, momentum, unscale),
    the plain variant, and the extended ones with stochastic rounding where a 16-bit value is
    stored and variance state where the state is bfloat16, 8-bit or float32 (an 8-bit group's
    small tensors) and centered."""
    expected = set()
    for param, state in STATE_PAIRS:
        stores_16_bit = torch.float16 in (param,) or torch.bfloat16 in (param, state)
        variance_state = state in (torch.bfloat16, torch.uint8, torch.float32)
        for centered, momentum, unscale in itertools.product((False, True), repeat=3):
            expected.add((param, state, centered, momentum, unscale, False, False, False))
            for stochastic in (False, True) if stores_16_bit else (False,):
                for variance in (False, True) if centered and variance_state else (False,):
                    expected.add((param, state, centered, momentum, unscale, True, stochastic, variance))
    return expected


_JUMP_PREFIXES = ("bnd", "notrack", "ds", "cs")


def _jump_target(line: str):
    """The target address of a direct jump in an objdump line ("addr:\tjne    1234 <f+0x56>"),
    else None (other instructions, indirect jumps "jmp *%rax")."""
    fields = line.split("\t")
    if len(fields) < 2:
        return None
    words = fields[1].split()
    while words and words[0] in _JUMP_PREFIXES:
        words = words[1:]
    if len(words) < 2 or not words[0].startswith("j") or words[1].startswith("*"):
        return None
    try:
        return int(words[1], 16)
    except ValueError:
        return None


def _prefetching_loop(code: str):
    """The instructions of the loop that holds the function's first prefetch: from the target of
    the backward jump that closes it to that jump; None if there is none."""
    lines = [line for line in code.splitlines() if ":\t" in line]

    def address(line):
        return int(line.split(":", 1)[0], 16)

    first = next((i for i, line in enumerate(lines) if "prefetcht0" in line), None)
    if first is None:
        return None
    function_start, loop_entry = address(lines[0]), address(lines[first])
    for end in range(first, len(lines)):
        target = _jump_target(lines[end])
        if target is not None and function_start <= target <= loop_entry:  # the back edge
            start = next(i for i, line in enumerate(lines) if address(line) >= target)
            return lines[start:end + 1]
    return None


def test_the_loop_finder_reads_objdump_jumps():
    code = "\n".join([
        "  100:\tmov    %rdi,%rax",
        "  104:\tprefetcht0 (%rdx)",
        "  108:\tjmp    *0x2fe2(%rip)        # 4018 <g@GLIBC>",
        "  10e:\tjb     80 <elsewhere>",        # backwards, but out of the function
        "  110:\tvsqrtps %zmm1,%zmm1",
        "  116:\tbnd jne 104 <f+0x4>",         # the back edge
        "  11a:\tret",
    ])
    body = _prefetching_loop(code)
    assert [line.split(":")[0].strip() for line in body] == ["104", "108", "10e", "110", "116"]
    assert _prefetching_loop(code.replace("prefetcht0", "nop")) is None


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="reads x86-64 instructions")
def test_every_inner_loop_is_vectorised_including_sqrt():
    """The loop is compute-bound on 4-wide SSE2 sqrt and division, so it is cloned for x86-64-v3
    (AVX2) and x86-64-v4 (AVX-512). Every instantiation and every clone must keep sqrt vectorised,
    in its clone's register width. What breaks it: building without -fno-math-errno (each element
    calls sqrtf for errno), a select on an option flag that GCC will not unswitch, a 16-bit
    conversion it cannot vectorise. And every stream is prefetched ahead (cpu_kernel.h,
    kPrefetchBytes). The 8-bit loops' update is vectorised the same way (their decoding and
    encoding read code tables)."""
    functions = _update_loop_functions()
    clones = {"[clone .default]": "%xmm", "[clone .arch_x86_64_v3]": "%ymm", "[clone .arch_x86_64_v4]": "%zmm"}
    expected = _expected_instantiations()
    for clone in clones:
        found = {_instantiation(name) for name in functions if name.endswith(clone)}
        assert found == expected, f"{clone}: missing {expected - found}, unexpected {found - expected}"
    for name, code in functions.items():
        width = next(w for clone, w in clones.items() if name.endswith(clone))
        param, state, centered, momentum = _instantiation(name)[:4]
        if (param, state) == (torch.float32, torch.bfloat16) and width == "%zmm":
            # GCC sizes this loop by its 16-bit loads and runs it 8 floats wide in the AVX-512
            # clone too (two ymm vectors per cache line of params)
            width = "%ymm"
        opmath = "pd" if param == torch.float64 else "ps"
        packed = [line for line in code.splitlines() if f"sqrt{opmath}" in line and width in line]
        assert packed, f"{name}: no sqrt{opmath} on {width}: the loop is not vectorised"
        assert not [l for l in code.splitlines() if "call" in l and "sqrt" in l], f"{name}: calls sqrt"
        if state == torch.uint8:
            continue
        # The main loop, which carries the prefetches (a line of each stream at a time), is where
        # nearly all elements go: it must prefetch every stream (p, grad, square_avg, and
        # grad_avg / momentum_buffer when used) and be vectorised itself, not only the remainder loop.
        streams = 3 + centered + momentum
        body = _prefetching_loop(code)
        assert body is not None, f"{name}: no loop with software prefetches"
        prefetches = [line for line in body if "prefetcht0" in line]
        assert len(prefetches) >= streams, f"{name}: {len(prefetches)} prefetches for {streams} streams"
        assert [line for line in body if f"sqrt{opmath}" in line and width in line], (
            f"{name}: the prefetching main loop has no sqrt{opmath} on {width}: it is not vectorised"
        )
        assert not [line for line in body if f"sqrts{opmath[1]}" in line], f"{name}: scalar sqrt in the main loop"
