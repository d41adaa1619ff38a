"""Static checks of the compiled CUDA kernels that need no GPU (docs/DESIGN.md section 3.6): the SASS
of rmsprop_fused/_C*.so, disassembled by cuobjdump, has for every architecture it was built for
the update kernels of every (param, state) pair of STATE_PAIRS, centered, momentum and AMP, plain
and kExtended, in both kernel-parameter budgets (32 KB and 4 KB; csrc/cuda/multi_tensor_op.h),
plus the step-counter kernel in both; each
update kernel has 128-bit global loads and stores on its aligned path (LDG.E.128 / STG.E.128 for
every stream whose vector is 16 bytes), no local-memory traffic, and no division for the AMP
scale unless it unscales (kUnscaleGrad); and the register counts that comments quote are what
ptxas allocated."""

import glob
import json
import os
import re
import shutil
import subprocess
from collections import namedtuple

import pytest

import rmsprop_fused

PACKAGE_DIR = os.path.dirname(os.path.abspath(rmsprop_fused.__file__))
CSRC = os.path.join(os.path.dirname(PACKAGE_DIR), "csrc", "cuda")
UPDATE_KERNEL = "rmsprop_multi_tensor_kernel"
COUNTER_KERNEL = "step_counter_kernel"
# LaunchArgs<Kernel<param_t, state_t, UpdateVariant<centered, momentum, unscale, extended>>, segments>
# in the Itanium mangling of the kernel's name. The state is a substitution (S<n>_) when it is
# the param's own type, and names c10 by a substitution when the param is c10's too.
TYPE = r"f|d|N3c104HalfE|N3c108BFloat16E"
LAUNCH_ARGS = re.compile(
    rf"KernelI({TYPE})({TYPE}|NS\d*_8BFloat16E|NS\d*_4HalfE|NS\d*_10Blockwise8E|S\d*_)"
    r"NS_13UpdateVariantILb([01])ELb([01])ELb([01])ELb([01])EEEEELl(\d+)E"
)
COUNTER_ARGS = re.compile(r"StepCounterArgsILl(\d+)E")
DTYPE_OF = {"f": "float32", "d": "float64", "N3c104HalfE": "float16", "N3c108BFloat16E": "bfloat16"}
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "8bit": 1}
STATE_PAIRS = [  # tests/common.py STATE_PAIRS, by name ("8bit": uint8 codes)
    ("float64", "float64"), ("float32", "float32"), ("float32", "bfloat16"), ("float32", "8bit"),
    ("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("bfloat16", "8bit"), ("float16", "float16"),
    ("float16", "float32"), ("float16", "bfloat16"), ("float16", "8bit"),
]
LARGE_PARAM_BYTES, SMALL_PARAM_BYTES = 32764, 4096
LAUNCH_SCALARS_BYTES = 176  # sizeof(LaunchScalars<double>), static_asserted in multi_tensor_kernel.h
# 128-bit global loads and stores, whatever cache or scope modifiers nvcc adds (LDG.E.128,
# LDG.E.128.CONSTANT, LDG.E.EL.128, ...)
# (Each pattern starts with its literal opcode, the word boundary before it checked after it by a
# lookbehind, so that re scans for the literal: a leading \b or alternation makes it try every
# position of the 300 MB of SASS, which took minutes.)
LDG_128 = re.compile(r"LDG(?<=\bLDG)(?:\.[A-Z0-9_]+)*\.128\b")
STG_128 = re.compile(r"STG(?<=\bSTG)(?:\.[A-Z0-9_]+)*\.128\b")
LOCAL_MEMORY = (re.compile(r"LDL(?<=\bLDL)(?:\.[A-Z0-9_]+)*\b"), re.compile(r"STL(?<=\bSTL)(?:\.[A-Z0-9_]+)*\b"))
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")

Kernel = namedtuple("Kernel", "arch name param state centered momentum unscale extended segments sass")


def build_info():
    try:
        with open(os.path.join(PACKAGE_DIR, "_build_info.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def skip_reason():
    info = build_info()
    if info is None or not glob.glob(os.path.join(PACKAGE_DIR, "_C*.so")):
        return "the C++ extension is not built"
    if not info.get("cuda"):
        return f"the extension was built without the CUDA kernel ({info.get('why_no_cuda')})"
    return None


pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def cuobjdump() -> str:
    """Triton's copy (a test dependency), else the CUDA toolkit's that built the extension."""
    candidates = []
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    candidates += [shutil.which("cuobjdump") or "", "/usr/local/cuda/bin/cuobjdump"]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail("the extension has CUDA kernels but no cuobjdump was found (install triton or set CUDA_HOME)")


def shared_object() -> str:
    (so,) = glob.glob(os.path.join(PACKAGE_DIR, "_C*.so"))
    return so


def expected_archs():
    """sm_XY for every TORCH_CUDA_ARCH_LIST entry of the build ("8.0;9.0+PTX" -> sm_80, sm_90)."""
    entries = build_info()["cuda_arch_list"].replace(",", ";").replace(" ", ";").split(";")
    return {"sm_" + e.replace("+PTX", "").replace(".", "") for e in entries if e}


def state_name(param_code: str, state_code: str) -> str:
    if state_code.startswith("S"):  # a substitution: the param's own type
        return DTYPE_OF[param_code]
    for part, name in (("BFloat16", "bfloat16"), ("Half", "float16"), ("Blockwise8", "8bit")):
        if part in state_code:
            return name
    return DTYPE_OF[state_code]


ARCH_HEADER = re.compile(r"code for (sm_\w+)[^\n]*")
FUNCTION_HEADER = re.compile(r"Function : (\S+)[^\n]*")


def functions(text: str):
    """(arch, mangled name, body) of every function in cuobjdump's output: the text between its
    "Function : <name>" line and the next header line. (Found by searching for the two literal
    headers: matching every one of the SASS's millions of lines took half a minute.)"""
    headers = sorted([(m.start(), m.end(), "arch", m.group(1)) for m in ARCH_HEADER.finditer(text)]
                     + [(m.start(), m.end(), "function", m.group(1)) for m in FUNCTION_HEADER.finditer(text)])
    arch = None
    for k, (_, body_start, kind, value) in enumerate(headers):
        if kind == "arch":
            arch = value
            continue
        body_end = headers[k + 1][0] if k + 1 < len(headers) else len(text)
        yield arch, value, text[body_start:body_end]


@pytest.fixture(scope="module")
def sass():
    """One cuobjdump per architecture, run side by side (each disassembles 150 MB of SASS, most of
    this file's time)."""
    tool, so = cuobjdump(), shared_object()
    children = [subprocess.Popen([tool, "--dump-sass", "-arch", arch, so], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for arch in sorted(expected_archs())]
    found = []
    for child in children:
        out, err = child.communicate()
        assert child.returncode == 0, err
        found += functions(out)
    return found


@pytest.fixture(scope="module")
def kernels(sass):
    found = []
    for arch, name, body in sass:
        if UPDATE_KERNEL not in name:
            continue
        m = LAUNCH_ARGS.search(name)
        assert m, f"cannot read the template arguments of {name}"
        param, state, c, mo, u, x, segments = m.groups()
        found.append(Kernel(arch, name, DTYPE_OF[param], state_name(param, state), c == "1", mo == "1", u == "1",
                            x == "1", int(segments), body))
    return found


@pytest.fixture(scope="module")
def registers():
    """{(arch, mangled name): (registers, local bytes, stack bytes)} from ptxas' resource usage."""
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", shared_object()], capture_output=True, text=True,
                         check=True).stdout
    usage, arch, name = {}, None, None
    for line in out.splitlines():
        if m := re.search(r"arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.search(r"Function (\S+):", line):
            name = m.group(1)
        elif (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line)) and name:
            usage[(arch, name)] = (int(m.group(1)), int(m.group(3)), int(m.group(2)))
            name = None
    return usage


def pointers(k) -> int:
    """LaunchArgs::ptr entries per segment (multi_tensor_kernel.h segment_pointers)."""
    depth = 3 + k.centered + k.momentum
    return depth + (depth - 2 if k.state == "8bit" else 0) + 1


def capacity(pointer_count: int, param_bytes: int) -> int:
    """multi_tensor_kernel.h max_segments_per_launch: numel, begin, pointers, first_chunk, tensor."""
    return (param_bytes // 8 * 8 - LAUNCH_SCALARS_BYTES) // (8 + 8 + 8 * pointer_count + 4 + 4)


def describe(k) -> str:
    return (f"{k.arch} {k.param}/{k.state} centered={k.centered} momentum={k.momentum} unscale={k.unscale} "
            f"extended={k.extended} segments={k.segments}")


def test_the_kernels_of_every_pair_variant_and_budget(kernels, sass):
    archs = expected_archs()
    found = [(k.arch, k.param, k.state, k.centered, k.momentum, k.unscale, k.extended, k.segments) for k in kernels]
    assert len(set(found)) == len(found), "a kernel appears twice"
    expected = set()
    for arch in archs:
        for param, state in STATE_PAIRS:
            for c in (False, True):
                for m in (False, True):
                    n = 3 + c + m + (1 + c + m if state == "8bit" else 0) + 1
                    for u in (False, True):
                        for x in (False, True):
                            for budget in (LARGE_PARAM_BYTES, SMALL_PARAM_BYTES):
                                expected.add((arch, param, state, c, m, u, x, capacity(n, budget)))
    assert set(found) == expected, (sorted(set(found) - expected)[:5], sorted(expected - set(found))[:5])
    assert len(found) == len(archs) * len(STATE_PAIRS) * 8 * 2 * 2
    counters = {(arch, int(COUNTER_ARGS.search(name).group(1))) for arch, name, _ in sass if COUNTER_KERNEL in name}
    # pointers to counters in a launch: (budget - found_inf - count) / 8
    assert counters == {(arch, n) for arch in archs for n in ((32760 - 16) // 8, (4096 - 16) // 8)}


def vector_streams(k):
    """(loads, stores) of the aligned path that must be 16 bytes each: a vector is 16 bytes of the
    param (kLanes elements); a state stream moves kLanes elements in 16-byte pieces when it has
    16 bytes or more of them (float32 state of a 16-bit param: two pieces), else in one smaller
    load (bfloat16 state of a float32 param: 8 bytes; 8-bit codes: 4 or 8)."""
    lanes = 16 // ITEMSIZE[k.param]
    state_pieces = lanes * ITEMSIZE[k.state] // 16
    states = 1 + k.centered + k.momentum
    loads = 2 + states * state_pieces
    stores = 1 + k.unscale + states * state_pieces
    if k.state == "8bit":  # each lane: 8 elements in 8 / lanes vectors of the param
        loads, stores = 2 * (8 // lanes), (1 + k.unscale) * (8 // lanes)
    return loads, stores


def test_vector_loads_and_stores(kernels):
    """fp32 in particular (the brief's LDG.E.128), and every other pair too: each stream moves 16
    bytes per access on its aligned path, where its vector has 16 bytes."""
    assert any(k.param == "float32" for k in kernels)
    for k in kernels:
        loads, stores = vector_streams(k)
        assert len(LDG_128.findall(k.sass)) >= loads, f"{describe(k)}: fewer than {loads} 128-bit loads"
        assert len(STG_128.findall(k.sass)) >= stores, f"{describe(k)}: fewer than {stores} 128-bit stores"


def test_no_local_memory(kernels, registers):
    for k in kernels:
        local = [m for pattern in LOCAL_MEMORY for m in pattern.findall(k.sass)]
        assert not local, f"{describe(k)}: {len(local)} local-memory accesses"
        assert registers[(k.arch, k.name)][1:] == (0, 0), f"{describe(k)}: local memory or stack"


def own_code(k):
    """The instructions of the kernel's own code: its subroutines (the slow paths of division and
    square root, which have MUFU.RSQ of their own) begin at the first CALL target."""
    instructions = [(int(a, 16), text) for a, text in INSTRUCTION.findall(k.sass)]
    targets = [int(t, 16) for _, text in instructions for t in re.findall(r"CALL\.REL\.NOINC (0x[0-9a-f]+)", text)]
    end = min(targets, default=1 << 62)
    return [text for address, text in instructions if address < end]


def square_roots(k, body) -> int:
    """Every element update takes one square root (MUFU.RSQ, or MUFU.RSQ64H), so this counts
    the element updates compiled, however ptxas unrolled the loops."""
    roots = sum("MUFU.RSQ" in text for text in body)
    assert roots > 0, f"{describe(k)}: no square root found"
    return roots


def divisions_per_square_root(k) -> float:
    """FCHK (one in each float32 division's fast path) per element update."""
    body = own_code(k)
    return sum(text.startswith("FCHK") or " FCHK " in f" {text}" for text in body) / square_roots(k, body)


def instructions_per_element(k) -> float:
    body = own_code(k)
    return len(body) / square_roots(k, body)


def test_no_division_by_the_amp_scale_without_it(kernels):
    """Issue #14 item 5: kUnscaleGrad is a compile-time flag, so a kernel without AMP divides each
    element once (g / denom; and each 8-bit state once more, x / scale, to encode it), and the
    AMP kernel once more (grad / grad_scale). Plain kernels of float32 opmath (float64 divides
    without FCHK)."""
    checked = 0
    for k in kernels:
        if k.extended or k.param == "float64":
            continue
        expected = 1 + k.unscale + ((1 + k.centered + k.momentum) if k.state == "8bit" else 0)
        assert divisions_per_square_root(k) == expected, describe(k)
        checked += 1
    assert checked == len(expected_archs()) * 10 * 8 * 2  # both budgets


# ------------------------------------------------------------------------- the quoted register counts

# csrc/cuda/multi_tensor_kernel.h kRegisterCounts: "<param> <state> <plain>|<extended>" with
# "<lo>-<hi>" per architecture, min-max over centered x momentum x AMP (and both budgets).
TABLE_LINE = re.compile(r"^//\s+(float64|float32|bfloat16|float16)\s+(float64|float32|bfloat16|float16|8-bit)\s+(.*)$")
RANGE = re.compile(r"(sm_\d+)\s+(\d+)-(\d+)")


def quoted_counts():
    """{(param, state, extended, arch): (lo, hi)} and the nvcc version they were read from, and
    the overall range kBlockDim's comment quotes."""
    with open(os.path.join(CSRC, "multi_tensor_kernel.h")) as f:
        text = f.read()
    version = re.search(r"kRegisterCounts: registers a thread allocated by ptxas of nvcc (\d+\.\d+)", text).group(1)
    table = {}
    for line in text.splitlines():
        if m := TABLE_LINE.match(line):
            param, state, rest = m.groups()
            plain, extended = rest.split("|")
            for is_extended, column in ((False, plain), (True, extended)):
                for arch, lo, hi in RANGE.findall(column):
                    table[(param, state.replace("-", ""), is_extended, arch)] = (int(lo), int(hi))
    overall = re.search(r"The kernels take (\d+) to (\d+) registers a thread", text)
    return version, table, (int(overall.group(1)), int(overall.group(2)))


def test_register_counts_in_the_comments_are_ptxas(kernels, registers):
    """Issue #15 item 2 (c): the table at kRegisterCounts and kBlockDim's range are what ptxas
    allocated, for the compiler they were measured with."""
    version, table, overall = quoted_counts()
    nvcc = build_info().get("nvcc_version") or ""
    if f"cuda_{version}" not in nvcc:
        pytest.skip(f"the counts are quoted for nvcc {version}; this build's is {nvcc!r}")
    actual = {}
    for k in kernels:
        key = (k.param, k.state, k.extended, k.arch)
        count = registers[(k.arch, k.name)][0]
        lo, hi = actual.get(key, (count, count))
        actual[key] = (min(lo, count), max(hi, count))
    quoted = {key: value for key, value in table.items() if key[3] in expected_archs()}
    assert quoted == actual, {key: (quoted.get(key), actual.get(key)) for key in set(quoted) | set(actual)
                              if quoted.get(key) != actual.get(key)}
    counts = [registers[(k.arch, k.name)][0] for k in kernels]
    assert overall == (min(counts), max(counts))


def test_the_plain_kernels_evidence_in_the_comment(kernels, registers):
    """csrc/cuda/multi_tensor_op.h says why there are plain kernels beside the kExtended ones: the
    register and instruction counts it quotes are those of this build (for its nvcc)."""
    with open(os.path.join(CSRC, "multi_tensor_op.h")) as f:
        text = " ".join(" ".join(re.sub(r"^\s*//", "", line) for line in f).split())  # comments as prose
    fewer = re.search(r"The plain kernels take (-?\d+) to (-?\d+) fewer registers", text)
    ratio = re.search(r"(\d+\.\d) to (\d+\.\d) times fewer instructions per element update", text)
    version = re.search(r"measured with nvcc (\d+\.\d+)", text).group(1)
    nvcc = build_info().get("nvcc_version") or ""
    if f"cuda_{version}" not in nvcc:
        pytest.skip(f"the counts are quoted for nvcc {version}; this build's is {nvcc!r}")
    twins = {(k.arch, k.param, k.state, k.centered, k.momentum, k.unscale, k.segments): k for k in kernels if k.extended}
    deltas, ratios = [], []
    for k in kernels:
        if k.extended:
            continue
        twin = twins[(k.arch, k.param, k.state, k.centered, k.momentum, k.unscale, k.segments)]
        deltas.append(registers[(k.arch, twin.name)][0] - registers[(k.arch, k.name)][0])
        ratios.append(instructions_per_element(twin) / instructions_per_element(k))
    assert (int(fewer.group(1)), int(fewer.group(2))) == (min(deltas), max(deltas))
    assert (ratio.group(1), ratio.group(2)) == (f"{min(ratios):.1f}", f"{max(ratios):.1f}")
