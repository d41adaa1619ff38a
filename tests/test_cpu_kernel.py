"""The compiled CPU op against the reference backend: every option combination, every dtype,
sizes around the vector width and the chunk size, misaligned views, and torch.library.opcheck."""

import pytest
import torch

from common import (
    OPTION_MATRIX, assert_lists_close, available, clone_lists, make_lists, option_id, step,
)

pytestmark = pytest.mark.skipif(not available("cpu"), reason="the C++ extension is not built")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 3, 4, 4097, 65537, 2**20 + 3]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTION_MATRIX, ids=option_id)
def test_every_option_and_dtype_matches_reference(options, dtype):
    sizes = [0, 1, 3, 4, 5, 17, 4097]
    lists = make_lists(sizes, dtype, centered=options["centered"], momentum=options["momentum"], seed=hash(option_id(options)) % 1000)
    expected, actual = clone_lists(lists), clone_lists(lists)
    step(expected, "reference", **options)
    step(actual, "cpu", **options)
    assert_lists_close(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-offset"])
def test_sizes_and_misaligned_views(dtype, offset):
    options = dict(centered=True, momentum=0.9, weight_decay=0.1)
    lists = make_lists(SIZES, dtype, centered=True, momentum=0.9, seed=7, offset=offset)
    expected, actual = clone_lists(lists), clone_lists(lists)
    assert all(t.storage_offset() == offset for t in actual["params"])
    step(expected, "reference", **options)
    step(actual, "cpu", **options)
    assert_lists_close(actual, expected)


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


def test_opcheck():
    lists = make_lists([3, 17], torch.float32, centered=True, momentum=0.9, seed=2)
    args = (lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"], lists["momentum_buffers"])
    kwargs = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.1, momentum=0.9, centered=True,
                  maximize=False, eps_in_sqrt=False, lr_in_momentum=False)
    torch.library.opcheck(torch.ops.rmsprop_fused.rmsprop_.default, args, kwargs)
    torch.library.opcheck(
        torch.ops.rmsprop_fused.rmsprop_.default, args,
        dict(kwargs, lr_tensor=torch.tensor(0.02), grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0)),
    )


def _update_loop_functions():
    """{function name: disassembly} of the CPU inner loops: every instantiation of update_range
    (dtype x centered x momentum x AMP) and each of its clones (.default, .arch_x86_64_v3,
    .arch_x86_64_v4)."""
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
            current = name if "update_range<" in name and "resolver" not in name and ".cold" not in name else None
            if current:
                functions[current] = []
        elif current is not None:
            functions[current].append(line)
    return {k: "\n".join(v) for k, v in functions.items()}


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
    (AVX2) and x86-64-v4 (AVX-512). Every instantiation and every clone must keep sqrt vectorised, in its clone's register
    width. What breaks it: building without -fno-math-errno (each element calls sqrtf for errno),
    a select on an option flag that GCC will not unswitch, a 16-bit conversion it cannot vectorise.
    And every stream is prefetched ahead (rmsprop_cpu.cpp, kPrefetchBytes)."""
    functions = _update_loop_functions()
    clones = {"[clone .default]": "%xmm", "[clone .arch_x86_64_v3]": "%ymm", "[clone .arch_x86_64_v4]": "%zmm"}
    # 4 dtypes x (centered, momentum, AMP unscale) x 3 clones
    assert len(functions) == 4 * 8 * 3, f"{len(functions)} update_range functions found"
    for name, code in functions.items():
        width = next(w for clone, w in clones.items() if name.endswith(clone))
        opmath = "pd" if "update_range<double" in name else "ps"
        packed = [line for line in code.splitlines() if f"sqrt{opmath}" in line and width in line]
        assert packed, f"{name}: no sqrt{opmath} on {width}: the loop is not vectorised"
        assert not [l for l in code.splitlines() if "call" in l and "sqrt" in l], f"{name}: calls sqrt"
        # The main loop, which carries the prefetches (a line of each stream at a time), is where
        # nearly all elements go: it must prefetch every stream (p, grad, square_avg, and
        # grad_avg / momentum_buffer when used) and be vectorised itself, not only the remainder loop.
        _, centered, momentum = name.split("update_range<", 1)[1].split(", ")[:3]
        streams = 3 + (centered == "true") + (momentum == "true")
        body = _prefetching_loop(code)
        assert body is not None, f"{name}: no loop with software prefetches"
        prefetches = [line for line in body if "prefetcht0" in line]
        assert len(prefetches) >= streams, f"{name}: {len(prefetches)} prefetches for {streams} streams"
        assert [line for line in body if f"sqrt{opmath}" in line and width in line], (
            f"{name}: the prefetching main loop has no sqrt{opmath} on {width}: it is not vectorised"
        )
        assert not [line for line in body if f"sqrts{opmath[1]}" in line], f"{name}: scalar sqrt in the main loop"
