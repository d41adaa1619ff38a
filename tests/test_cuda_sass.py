"""Static checks of the compiled CUDA kernels that need no GPU (docs/DESIGN.md section 3.6): the SASS of
rmsprop_fused/_C*.so, disassembled by cuobjdump, has for every architecture it was built for one
kernel per (dtype, centered, momentum), each with 128-bit global loads and stores (the 16-byte
vector path: one LDG.E.128 and one STG.E.128 per tensor list, at least), and no local-memory
traffic (LDL / STL: spills, or a per-thread array or the by-value parameter copied to local memory)."""

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
KERNEL_NAME = "rmsprop_multi_tensor_kernel"
# LaunchArgs<scalar_t, kCentered, kMomentum, ...> in the Itanium mangling of the kernel's name
LAUNCH_ARGS = re.compile(r"LaunchArgsI(f|d|N3c104HalfE|N3c108BFloat16E)Lb([01])ELb([01])E")
DTYPE_OF = {"f": "float32", "d": "float64", "N3c104HalfE": "float16", "N3c108BFloat16E": "bfloat16"}
# 128-bit global loads and stores, whatever cache or scope modifiers nvcc adds (LDG.E.128,
# LDG.E.128.CONSTANT, LDG.E.EL.128, ...)
LDG_128 = re.compile(r"\bLDG(\.[A-Z0-9_]+)*\.128\b")
STG_128 = re.compile(r"\bSTG(\.[A-Z0-9_]+)*\.128\b")
LOCAL_MEMORY = re.compile(r"\b(LDL|STL)(\.[A-Z0-9_]+)*\b")

Kernel = namedtuple("Kernel", "arch dtype centered momentum sass")


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


def expected_archs():
    """sm_XY for every TORCH_CUDA_ARCH_LIST entry of the build ("8.0;9.0+PTX" -> sm_80, sm_90)."""
    entries = build_info()["cuda_arch_list"].replace(",", ";").replace(" ", ";").split(";")
    return {"sm_" + e.replace("+PTX", "").replace(".", "") for e in entries if e}


@pytest.fixture(scope="module")
def kernels():
    (so,) = glob.glob(os.path.join(PACKAGE_DIR, "_C*.so"))
    out = subprocess.run([cuobjdump(), "--dump-sass", so], capture_output=True, text=True, check=True).stdout
    found, arch, name, lines = [], None, None, []

    def close():
        if name is not None and KERNEL_NAME in name:
            m = LAUNCH_ARGS.search(name)
            assert m, f"cannot read the template arguments of {name}"
            found.append(Kernel(arch, DTYPE_OF[m.group(1)], m.group(2) == "1", m.group(3) == "1", "\n".join(lines)))

    for line in out.splitlines():
        if m := re.match(r"\s*code for (sm_\w+)", line):
            close()
            arch, name, lines = m.group(1), None, []
        elif m := re.match(r"\s*Function : (\S+)", line):
            close()
            name, lines = m.group(1), []
        else:
            lines.append(line)
    close()
    return found


def test_one_kernel_per_arch_dtype_and_options(kernels):
    combos = {(k.arch, k.dtype, k.centered, k.momentum) for k in kernels}
    assert len(combos) == len(kernels), "a kernel appears twice"
    archs = expected_archs()
    assert {k.arch for k in kernels} == archs
    assert len(kernels) == len(archs) * 4 * 4  # 4 dtypes x (centered, momentum)


def test_vector_loads_and_stores(kernels):
    """fp32 in particular (the brief's LDG.E.128), and every other dtype too: each moves 16 bytes
    per tensor list per access on its aligned path."""
    for k in kernels:
        depth = 3 + k.centered + k.momentum
        loads, stores = len(LDG_128.findall(k.sass)), len(STG_128.findall(k.sass))
        where = f"{k.arch} {k.dtype} centered={k.centered} momentum={k.momentum}"
        assert loads >= depth, f"{where}: {loads} 128-bit global loads for {depth} tensor lists"
        assert stores >= depth, f"{where}: {stores} 128-bit global stores for {depth} tensor lists"
    assert any(k.dtype == "float32" for k in kernels)


def test_no_local_memory(kernels):
    for k in kernels:
        local = LOCAL_MEMORY.findall(k.sass)
        assert not local, f"{k.arch} {k.dtype} centered={k.centered} momentum={k.momentum}: {len(local)} local-memory accesses"
