"""The compiled CPU op against the reference backend, bit for bit: every option combination,
every (param, state) dtype pair (8-bit blockwise included), stochastic rounding, sizes around the
vector width, the chunk size and the 256-element blocks, misaligned views; torch.library.opcheck;
and the machine code of its loops."""

import functools
import itertools
import os
import subprocess
import sys

import pytest
import torch

from common import (
    EXTENDED_OPTIONS, OPTION_MATRIX, STATE_PAIRS, assert_lists_equal, available, clone_lists, fresh_seed,
    make_lists, option_id, pair_id, step,
)

pytestmark = pytest.mark.skipif(not available("cpu"), reason="the C++ extension is not built")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 3, 4, 4097, 65537, 2**20 + 3]

# Pairs that store 16-bit values (16-bit params; float32 params with bfloat16 state) and 8-bit
# state run the CPU step's own AVX-512 loops (rmsprop_cpu_avx512.cpp) where the CPU has AVX-512
# BF16, else the compiler-vectorised loops of cpu_kernel.h (8-bit state blocks decoded and encoded
# element by element): where both run, both are tested.
LOOPS = ["simd-loop", "compiler-loop"]


# the pairs of the AVX-512 loop (cpu_kernel.h kHasSimdLoop): every one that stores a 16-bit stream
SIXTEEN_BIT_PAIRS = [pair for pair in STATE_PAIRS
                     if set(pair) & {torch.bfloat16, torch.float16} and torch.uint8 not in pair]


def _has_simd_loop(dtype, state_dtype=None) -> bool:
    """Whether the AVX-512 code runs the pair: its loop of elements, or of 8-bit state blocks."""
    return (dtype, state_dtype or dtype) in SIXTEEN_BIT_PAIRS or state_dtype == torch.uint8


def with_loops(name: str, values, has_simd=_has_simd_loop):
    """Parameters (value, loop) for `name` and the `cpu_loop` fixture: both loops where a value
    (a dtype or a pair) can run the SIMD loop, the compiler's alone elsewhere."""
    params = []
    for v in values:
        simd = has_simd(*v) if isinstance(v, tuple) else has_simd(v)
        vid = pair_id(v) if isinstance(v, tuple) else str(v)
        params += [pytest.param(v, loop, id=f"{vid}-{loop}") for loop in (LOOPS if simd else LOOPS[1:])]
    return pytest.mark.parametrize(f"{name}, cpu_loop", params, indirect=["cpu_loop"])


def matches_reference(lists, **options):
    """One step of the op and of the reference on copies of `lists`: the same bits."""
    expected, actual = clone_lists(lists), clone_lists(lists)
    step(expected, "reference", **options)
    step(actual, "cpu", **options)
    assert_lists_equal(actual, expected)


@with_loops("dtype", DTYPES)
@pytest.mark.parametrize("options", OPTION_MATRIX, ids=option_id)
def test_every_option_and_dtype_matches_reference(options, dtype, cpu_loop):
    sizes = [0, 1, 3, 4, 5, 15, 16, 17, 31, 32, 33, 4097]
    lists = make_lists(sizes, dtype, centered=options["centered"], momentum=options["momentum"], seed=fresh_seed())
    matches_reference(lists, **options)


def _low_precision_variance(pair, options) -> bool:
    return options["centered"] and pair[1] in (torch.bfloat16, torch.uint8)


@with_loops("pair", STATE_PAIRS)
@pytest.mark.parametrize("options", [o for o in OPTION_MATRIX if not o["maximize"] and not o["eps_in_sqrt"]] + EXTENDED_OPTIONS,
                         ids=option_id)
def test_every_state_dtype_and_extended_option_matches_reference(pair, options, cpu_loop):
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


@with_loops("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-offset"])
def test_sizes_and_misaligned_views(dtype, offset, cpu_loop):
    options = dict(centered=True, momentum=0.9, weight_decay=0.1)
    lists = make_lists(SIZES, dtype, centered=True, momentum=0.9, seed=fresh_seed(), offset=offset)
    assert all(t.storage_offset() == offset for t in lists["params"])
    matches_reference(lists, **options)


@pytest.fixture
def prefetch_bytes():
    """Sets the CPU loops' prefetch distance for one test (cpu_prefetch_bytes), then restores it."""
    from rmsprop_fused import _extension

    module = _extension._module
    default = module.cpu_prefetch_bytes()
    yield module._set_cpu_prefetch_bytes
    module._set_cpu_prefetch_bytes(default)


@with_loops("dtype", DTYPES)
@pytest.mark.parametrize("distance", [0, 64, 4096, 16384])
def test_the_prefetch_distance_changes_no_bit(dtype, distance, cpu_loop, prefetch_bytes):
    """A distance decides which lines are prefetched and where each range's prefetch stops: sizes
    under and around it, and a range split between threads, with each of them."""
    prefetch_bytes(distance)
    sizes = [1, 17, 63, 64, 1025, 4097, 2**16 + 5]
    lists = make_lists(sizes, dtype, centered=True, momentum=0.9, seed=fresh_seed())
    matches_reference(lists, centered=True, momentum=0.9)


def _expected_default_prefetch_bytes(cpuinfo: str) -> int:
    """prefetch.cpp's choice for the CPU /proc/cpuinfo describes: 512 B on AMD Zen 4 (family 25
    with AVX-512; Zen 3 is family 25 without it), 1 KiB elsewhere."""
    fields = dict(line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    zen4 = (fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25"
            and "avx512f" in fields.get("flags", "").split())
    return 512 if zen4 else 1024


def test_the_default_prefetch_distance_follows_the_cpu():
    assert _expected_default_prefetch_bytes("vendor_id\t: AuthenticAMD\ncpu family\t: 25\nflags\t: fpu avx512f\n") == 512
    assert _expected_default_prefetch_bytes("vendor_id\t: AuthenticAMD\ncpu family\t: 25\nflags\t: fpu avx2\n") == 1024
    assert _expected_default_prefetch_bytes("vendor_id\t: AuthenticAMD\ncpu family\t: 26\nflags\t: avx512f\n") == 1024
    assert _expected_default_prefetch_bytes("vendor_id\t: GenuineIntel\ncpu family\t: 6\nflags\t: avx512f\n") == 1024
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo to say which CPU this is")
    # a fresh process: a test here may have set another distance meanwhile
    code = "from rmsprop_fused import _extension; print(_extension._module.cpu_prefetch_bytes())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    with open("/proc/cpuinfo") as f:
        assert int(run.stdout.split()[-1]) == _expected_default_prefetch_bytes(f.read())


@pytest.mark.parametrize("bad", [-64, 100, 16384 + 64])
def test_a_bad_prefetch_distance_is_refused_and_changes_nothing(bad, prefetch_bytes):
    from rmsprop_fused import _extension

    before = _extension._module.cpu_prefetch_bytes()
    with pytest.raises(RuntimeError, match=f"multiple of 64 bytes from 0 to 16384, got {bad}"):
        prefetch_bytes(bad)
    assert _extension._module.cpu_prefetch_bytes() == before
    assert prefetch_bytes(2048) == before and _extension._module.cpu_prefetch_bytes() == 2048


@with_loops("pair", [(torch.float32, torch.uint8), (torch.bfloat16, torch.uint8)])
def test_8bit_state_across_threads(pair, cpu_loop):
    """Large enough for at::parallel_for to split the blocks between threads: a block's scale is
    its maximum, so a block split between two threads would be wrong."""
    lists = make_lists([3 * 2**15 + 77, 1000], pair[0], centered=True, momentum=0.9, state_dtype=pair[1],
                       steps=True, seed=fresh_seed(), variance_state=True)
    matches_reference(lists, centered=True, momentum=0.9, variance_state=True)


@with_loops("pair", [(torch.float32, torch.uint8), (torch.float16, torch.uint8)])
def test_every_8bit_code_decodes_as_the_reference(pair, cpu_loop):
    """Every code of both maps in every state stream, shuffled within each block (the AVX-512
    decoder looks up 64 at a time by byte permutes, one plane per byte of the entries), in
    tensors that end inside a block, inside a 64-code chunk and inside a 16-lane vector."""
    generator = torch.Generator().manual_seed(fresh_seed())
    sizes = [4096, 4096 + 64 + 17, 8192 + 200]
    lists = make_lists(sizes, pair[0], centered=True, momentum=0.9, state_dtype=pair[1], steps=True,
                       seed=fresh_seed())
    for name in ("square_avgs", "grad_avgs", "momentum_buffers"):
        for codes in lists[name]:
            blocks = -(-codes.numel() // 256)
            every = torch.stack([torch.randperm(256, generator=generator) for _ in range(blocks)]).view(-1)
            codes.copy_(every[: codes.numel()].to(torch.uint8))
        assert all(len(torch.unique(codes)) == 256 for codes in lists[name])
    matches_reference(lists, centered=True, momentum=0.9)


# The quiet NaN each 16-bit codec stores (element_codec.h), and the bits it is checked on
CANONICAL_NAN = {torch.float16: (0x7FFF, 0x7E00), torch.bfloat16: (-1, 0x7FC0)}


def _every_16_bit_value(dtype) -> torch.Tensor:
    return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


@with_loops("pair", SIXTEEN_BIT_PAIRS)
def test_every_16_bit_pattern_converts_as_the_codec(pair, cpu_loop):
    """16-bit streams are converted with the CPU's instructions where it has them (the SIMD loop;
    fp16 tiles of half_tiles.h otherwise), which round NaNs (and, vcvtneps2bf16, subnormals)
    otherwise than the codecs: every one of the 65,536 values of each 16-bit dtype of the pair as
    a param and a grad (widened exactly where the params are float32) and as a 16-bit state value
    (subnormals, infinities, NaNs with payloads), tensors cut at odd sizes, against the reference
    to the bit; the NaNs in the same places and each the codec's quiet NaN (their signs are
    torch's in the reference, so only the places are compared)."""
    dtype, state_dtype = pair
    generator = torch.Generator().manual_seed(fresh_seed())
    every = _every_16_bit_value(dtype if dtype in CANONICAL_NAN else state_dtype)
    shuffled = every[torch.randperm(every.numel(), generator=generator)]
    sizes = [1, 255, 257, every.numel() - 513]
    lists = make_lists(sizes, dtype, momentum=0.9, state_dtype=state_dtype, seed=fresh_seed())
    for key, source in (("params", every), ("grads", shuffled)):
        for t, part in zip(lists[key], source.split(sizes)):
            t.copy_(part.view(t.shape))
    if state_dtype in CANONICAL_NAN:  # square_avg >= 0 (sqrt); momentum: every value
        every_state = _every_16_bit_value(state_dtype)
        for t, part in zip(lists["square_avgs"], every_state.abs().flip(0).split(sizes)):
            t.copy_(part.view(t.shape))
        shuffled_state = every_state[torch.randperm(every_state.numel(), generator=generator)]
        for t, part in zip(lists["momentum_buffers"], shuffled_state.split(sizes)):
            t.copy_(part.view(t.shape))
    expected, actual = clone_lists(lists), clone_lists(lists)
    for options in (dict(momentum=0.9), dict(momentum=0.9, grad_scale=torch.tensor(0.5))):
        step(expected, "reference", **options)
        step(actual, "cpu", **options)
        for key in ("params", "grads", "square_avgs", "momentum_buffers"):
            for i, (a, e) in enumerate(zip(actual[key], expected[key])):
                nan = a.isnan()
                assert torch.equal(nan, e.isnan()), f"{options}: {key}[{i}]: NaN in other places"
                bits = torch.int16 if a.dtype in CANONICAL_NAN else torch.int32
                different = int((a.view(bits) != e.view(bits))[~nan].sum())
                assert different == 0, f"{options}: {key}[{i}]: {different} elements differ in their bits"
                written = key != "grads" or "grad_scale" in options  # (AMP writes the grads back)
                if a.dtype in CANONICAL_NAN and written:
                    mask, canonical = CANONICAL_NAN[a.dtype]
                    assert bool(((a[nan].view(torch.int16) & mask) == canonical).all()), f"{key}[{i}]: NaN not canonical"


@with_loops("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                     (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32),
                     (torch.float16, torch.float32)])
def test_every_element_is_written(pair, cpu_loop):
    """The update is in place, so "written" means "changed": with random inputs every element of
    the param and of each state tensor gets a new value, and a skipped element would keep its old
    one. (The values themselves are checked against the reference above.) Sizes end inside a
    vector and a cache line of every width."""
    dtype, state_dtype = pair
    lists = make_lists([1, 3, 15, 17, 33, 4097, 65537, 2**20 + 3], dtype, centered=True, momentum=0.9,
                       state_dtype=state_dtype, seed=fresh_seed())
    # |g| >= 2 and square_avg < 1.2, so with alpha = 0.5 and lr = 0.1 each value moves by far more
    # than half a bf16 ulp: square_avg by over 1, grad_avg by over 0.9, the momentum buffer by
    # about 0.2 (lr * g / sqrt(variance), the variance about g^2 / 4) and the param by lr times that
    for g in lists["grads"]:
        g.copy_(torch.where(g < 0, g - 2, g + 2))
    updated = clone_lists(lists)
    step(updated, "cpu", lr=0.1, alpha=0.5, centered=True, momentum=0.9)
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
    assert_lists_equal(actual, expected)
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


@functools.lru_cache(maxsize=1)
def _disassembled_functions() -> dict:
    """{demangled function name: its disassembly} of the extension's machine code."""
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
            current = line.split("<", 1)[1][:-2]
            functions[current] = []
        elif current is not None:
            functions[current].append(line)
    return {k: "\n".join(v) for k, v in functions.items()}


def _update_loop_functions():
    """{function name: disassembly} of the CPU inner loops: every instantiation of update_range
    and update_quantized_blocks (8-bit state), and each of its clones (.default,
    .arch_x86_64_v3, .arch_x86_64_v4)."""
    return {name: code for name, code in _disassembled_functions().items()
            if ("update_range<" in name or "update_quantized_blocks<" in name)
            and not any(x in name for x in ("resolver", ".cold", "@plt"))}


_CPP_TYPES = {"double": torch.float64, "float": torch.float32, "c10::Half": torch.float16,
              "c10::BFloat16": torch.bfloat16, "rmsprop_fused::Blockwise8": torch.uint8}


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


# The functions built for AVX-512: the v4 clones, the fp16 tile conversions, and
# rmsprop_cpu_avx512.cpp (its loops, their table, the entry that returns them, and the 8-bit
# block codecs and their helpers).
_AVX512_FUNCTIONS = ("[clone .arch_x86_64_v4]", "_avx512(", "update_range_simd<", "update_blocks_simd<",
                     "cpu::simd_loop<", "loops_by_flags<", "loop_for_flags<", "(anonymous namespace)::lookup<",
                     "(anonymous namespace)::lanes_before(", "(anonymous namespace)::decoded(",
                     "(anonymous namespace)::with_magnitudes(", "(anonymous namespace)::encode_with_absmax(",
                     "cpu::decode_block_simd(", "cpu::encode_block_simd(")


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="reads x86-64 instructions")
def test_only_the_avx512_code_uses_avx512_registers():
    """rmsprop_cpu_avx512.cpp is compiled for AVX-512 (a target pragma) and runs only where the CPU
    has it. Had it emitted its own copy of an inline function it shares with the other files, the
    linker could keep that copy for all of them, and a CPU without AVX-512 would die of SIGILL in
    code that never asked for it: no function outside the AVX-512 code may touch a zmm or mask
    register."""
    offenders = [name for name, code in _disassembled_functions().items()
                 if ("%zmm" in code or "%k1" in code or "{%k" in code) and not any(f in name for f in _AVX512_FUNCTIONS)]
    assert not offenders, f"AVX-512 instructions outside the AVX-512 code: {offenders[:5]}"


def _zmm_lines(code: str, instruction: str) -> list:
    return [line for line in code.splitlines() if instruction in line and "%zmm" in line]


def _byte_permute_lines(code: str) -> list:
    """The decoder's table lookups: vpermi2b, or vpermt2b where GCC keeps the index register."""
    return [line for line in code.splitlines() if "vpermi2b" in line or "vpermt2b" in line]


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="reads x86-64 instructions")
def test_the_8bit_block_codecs_permute_and_gather_lanes():
    """The AVX-512 block codecs decode the map with byte permutes of its planes (vpermi2b or
    vpermt2b, no gather) and encode with gathers from the code table, one vdivps per sixteen
    values, and call nothing (blockwise_quant.h's scalar codecs are the fallback, not a callee)."""
    functions = _disassembled_functions()
    codecs = {codec: "\n".join(c for name, c in functions.items() if codec in name)  # with its .cold part
              for codec in ("cpu::decode_block_simd(", "cpu::encode_block_simd(")}
    decode, encode = codecs["cpu::decode_block_simd("], codecs["cpu::encode_block_simd("]
    assert _byte_permute_lines(decode) and not _zmm_lines(decode, "gatherd"), "decode: no byte permutes, or a gather"
    assert _zmm_lines(encode, "gatherd") and _zmm_lines(encode, "vdivps"), "encode: no zmm gather or division"
    for codec, code in codecs.items():
        assert "call" not in code, f"{codec}: calls a function"


def _simd_instantiation(name: str) -> tuple:
    """A SIMD loop's (param, state, centered, momentum, unscale, extended, variance state)."""
    if "update_blocks_simd<" in name:  # 8-bit state: <param, variant, variance>
        param, rest = name.split("update_blocks_simd<", 1)[1].split(", ", 1)
        state = "rmsprop_fused::Blockwise8"
    else:
        param, state, rest = name.split("update_range_simd<", 1)[1].split(", ", 2)
    variant, variance = rest.split("UpdateVariant<", 1)[1].split(">, ", 1)
    flags = [f == "true" for f in variant.split(", ")] + [variance.split(">", 1)[0] == "true"]
    return (_CPP_TYPES[param], _CPP_TYPES[state], *flags)


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="reads x86-64 instructions")
def test_every_simd_loop_converts_with_the_instructions():
    """Every flag combination has its SIMD loop, and each converts its 16-bit stores with one
    instruction (vcvtneps2bf16, vcvtps2ph), takes sqrt 16 lanes at a time and calls nothing."""
    loops = {name: code for name, code in _disassembled_functions().items() if "update_range_simd<" in name}
    expected = {(p, s, c, m, u, e, var) for p, s in SIXTEEN_BIT_PAIRS
                for c, m, u, e, var in itertools.product((False, True), repeat=5)
                if not var or (c and e and s != torch.float16)}
    found = {_simd_instantiation(name) for name in loops}
    assert found == expected, f"missing {expected - found}, unexpected {found - expected}"
    instructions = {torch.bfloat16: "vcvtneps2bf16", torch.float16: "vcvtps2ph"}
    for name, code in loops.items():
        for stored in set(_simd_instantiation(name)[:2]) & set(instructions):
            assert instructions[stored] in code, f"{name}: no {instructions[stored]}"
        assert "vsqrtps %zmm" in code, f"{name}: no 16-lane sqrt"
        assert "call" not in code, f"{name}: calls a function"


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="reads x86-64 instructions")
def test_every_8bit_state_loop_is_one_pass_of_lanes():
    """The AVX-512 step of 8-bit state has a loop for every flag combination of float32 and 16-bit
    params, each decoding with byte permutes and encoding with gathers, taking sqrt 16 lanes at a
    time and calling nothing (the codecs inlined: one pass over the block)."""
    loops = {name: code for name, code in _disassembled_functions().items() if "update_blocks_simd<" in name}
    expected = {(p, torch.uint8, c, m, u, e, var) for p in (torch.float32, torch.bfloat16, torch.float16)
                for c, m, u, e, var in itertools.product((False, True), repeat=5) if not var or (c and e)}
    found = {_simd_instantiation(name) for name in loops}
    assert found == expected, f"missing {expected - found}, unexpected {found - expected}"
    for name, code in loops.items():
        params, _, centered, momentum = _simd_instantiation(name)[:4]
        streams = 1 + centered + momentum
        gathers = _zmm_lines(code, "gatherd")
        byte_permutes = _byte_permute_lines(code)
        assert len(gathers) >= streams, f"{name}: {len(gathers)} gathers for {streams} state streams"
        assert len(byte_permutes) >= 8 * streams, f"{name}: {len(byte_permutes)} byte permutes for {streams} streams"
        assert "vsqrtps %zmm" in code, f"{name}: no 16-lane sqrt"
        if params == torch.bfloat16:
            assert "vcvtneps2bf16" in code, f"{name}: no vcvtneps2bf16"
        assert "call" not in code, f"{name}: calls a function"
