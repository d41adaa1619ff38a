"""The Triton kernel compiled ahead of time, every variant, for sm_80 and sm_90 (no GPU needed).

The interpreter tests (test_triton.py) run the kernel's Python, one program at a time, and only
the statements a test reaches; the compiler sees every variant whole. So every variant the
launcher can produce is compiled here with `triton.compile(..., target=GPUTarget(...))`, from the
arguments the real launcher builds (_triton_backend.kernel_launch on real input lists, bound by
Triton's own binder), and the machine code is read: IEEE division and square root, no fused
multiply-add, no flush-to-zero, 16-byte loads and stores on the aligned path, no local memory.
The register count of every variant is printed (pytest -s, or the failure output).

The compiles run in a subprocess (the kernel must be a JITFunction, not the interpreter's), in
parallel over the CPU's cores; run as a script, this file is that subprocess.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ARCHS = (80, 90)
PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.uint8),
         (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.uint8),
         (torch.float16, torch.float16), (torch.float16, torch.float32), (torch.float16, torch.bfloat16),
         (torch.float16, torch.uint8)]  # common.STATE_PAIRS without float64 (no Triton kernel)
LIST_KEYS = ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "state_steps",
             "square_avg_scales", "grad_avg_scales", "momentum_buffer_scales")
TIMEOUT = 1800


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def stores_16_bit(param, state) -> bool:
    return param in (torch.float16, torch.bfloat16) or state == torch.bfloat16


def variant_inputs():
    """Every combination of the inputs that the launcher turns into compile-time constants (its
    VARIANT_AXES): (param dtype, state dtype), centered, momentum, AMP's grad_scale, stochastic
    rounding (where something is 16-bit)."""
    for (param, state), centered, momentum, unscale, stochastic in itertools.product(
            PAIRS, (False, True), (False, True), (False, True), (False, True)):
        if stochastic and not stores_16_bit(param, state):
            continue
        yield dict(param=_name(param), state=_name(state), centered=centered, momentum=momentum,
                   unscale=unscale, stochastic=stochastic)


# ----------------------------------------------------------------------------------- subprocess


def _launch(backend, variant: dict, runtime: int):
    """The launcher's arguments for a variant, on real CPU input lists. `runtime` picks one of
    two settings of everything the variant does not fix (options, sizes, scalars, device
    tensors), which must give the same compiled kernel."""
    sys.path.insert(0, HERE)
    from common import make_lists

    param, state = getattr(torch, variant["param"]), getattr(torch, variant["state"])
    momentum = 0.9 if variant["momentum"] else 0.0
    sizes = [backend.BLOCK_SIZE + 300] if runtime == 0 else [0, 5, 3 * backend.BLOCK_SIZE]
    lists = make_lists(sizes, param, centered=variant["centered"], momentum=momentum, state_dtype=state,
                       steps=True, seed=runtime)
    options = dict(
        lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=momentum, centered=variant["centered"],
        maximize=False, eps_in_sqrt=False, lr_in_momentum=False, decoupled_weight_decay=False, nesterov=False,
        bias_correction=False, variance_state=False, rounding_seed=1 if variant["stochastic"] else None,
        grad_scale=torch.tensor(8.0) if variant["unscale"] else None,
    )
    if runtime == 1:
        options.update(
            lr=torch.tensor(0.02, dtype=torch.float64), alpha=0.9, eps=1e-6, weight_decay=0.1, maximize=True,
            eps_in_sqrt=True, lr_in_momentum=True, decoupled_weight_decay=True, nesterov=variant["momentum"],
            bias_correction=True, variance_state=variant["centered"], found_inf=torch.tensor(0.0),
            clip_coef=torch.tensor(0.5), rounding_seed=-(2**63) + 16 if variant["stochastic"] else None,
        )
        if variant["unscale"]:
            options["grad_scale"] = torch.tensor(16.0, dtype=torch.float64)
    return backend.kernel_launch(*(lists[k] for k in LIST_KEYS), **options)


def _compile_inputs(kernel, launch, arch: int):
    """(signature, constexprs, attrs, options) as the kernel's launch would bind them for `arch`:
    JITFunction.run's own steps, with the target given instead of asked of a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


_JOBS: list = []  # (variant, arch, compile inputs), built before the workers fork


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _compile_job(index: int) -> dict:
    """Compiles one (variant, arch) and reads its PTX and its cubin's resource usage."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, arch, (kernel, signature, constexprs, attrs, options) = _JOBS[index]
    began = time.perf_counter()
    record = dict(variant=variant, arch=arch)
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=options.__dict__)
    except Exception as error:  # reported, and the test fails on it
        record["error"] = f"{type(error).__name__}: {error}"[-2000:]
        return record
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    resources = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    count = lambda pattern: len(re.findall(pattern, ptx))
    record.update(
        seconds=time.perf_counter() - began,
        registers=int(resources["REG"]), stack=int(resources["STACK"]), local=int(resources["LOCAL"]),
        shared=compiled.metadata.shared,
        v4_loads=count(r"ld\.global(?:\.\w+)*\.v4\.b32"), v4_stores=count(r"st\.global(?:\.\w+)*\.v4\.b32"),
        v2_loads=count(r"ld\.global(?:\.\w+)*\.v2\.b32"), v2_stores=count(r"st\.global(?:\.\w+)*\.v2\.b32"),
        fma=count(r"\bfma\."), ftz=count(r"\.ftz\b"), div_rn=count(r"div\.rn\.f32"),
        div_approx=count(r"div\.(?:approx|full)\.f32"), sqrt_rn=count(r"sqrt\.rn\.f32"),
        sqrt_approx=count(r"sqrt\.approx"), local_in_ptx=count(r"\.local\b"),
    )
    return record


def _load_backend(path: str):
    """The backend module, or a copy of it from another file (as a module of the package, so that
    its relative imports work)."""
    if not path:
        from rmsprop_fused import _triton_backend

        return _triton_backend
    import importlib.util

    spec = importlib.util.spec_from_file_location("rmsprop_fused._triton_backend_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv) -> None:
    """Compiles the variants for ARCHS (all, or the first `--limit`) in parallel; prints JSON."""
    import argparse
    import concurrent.futures
    import multiprocessing

    parser = argparse.ArgumentParser()
    parser.add_argument("--backend-file", default="")
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args(argv)
    import triton

    backend = _load_backend(args.backend_file)
    kernel = backend._rmsprop_kernel
    assert isinstance(kernel, triton.runtime.JITFunction), "expected a compiled (not interpreted) kernel"
    began = time.perf_counter()
    variants = list(variant_inputs())[: args.limit or None]
    keys, same_key = set(), []
    for variant in variants:
        for arch in ARCHS:
            inputs = [_compile_inputs(kernel, _launch(backend, variant, runtime), arch) for runtime in (0, 1)]
            same_key.append(repr(inputs[0]) == repr(inputs[1]))
            signature, constexprs, attrs, options = inputs[0]
            keys.add(repr((arch, signature, constexprs, attrs, options.__dict__)))
            _JOBS.append((variant, arch, (kernel, signature, constexprs, attrs, options)))
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers,
                                                mp_context=multiprocessing.get_context("fork")) as pool:
        records = list(pool.map(_compile_job, range(len(_JOBS))))
    print(json.dumps(dict(
        records=records, distinct_keys=len(keys), runtime_options_keep_the_key=all(same_key),
        variant_axes={k: [str(v) for v in values] for k, values in backend.VARIANT_AXES.items()},
        constexpr_names=[p.name for p in kernel.params if p.is_constexpr], workers=workers,
        seconds=time.perf_counter() - began,
    )))


def run_compiles(backend_file: str = "", limit: int = 0) -> dict:
    """main() in a subprocess without TRITON_INTERPRET (the kernel is then compiled, not
    interpreted); its JSON, or the test fails with its output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    command = [sys.executable, os.path.abspath(__file__), "--backend-file", backend_file, "--limit", str(limit)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1]), stderr=result.stderr)


# ---------------------------------------------------------------------------------------- tests

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="Triton, or its NVIDIA backend (ptxas, cuobjdump), is not installed",
)


@pytest.fixture(scope="module")
def compiled():
    """Every variant compiled for every arch, once for the module."""
    return run_compiles()


def register_table(results: dict) -> str:
    lines = [f"{len(results['records'])} compiles ({results['distinct_keys']} distinct kernels) in "
             f"{results['seconds']:.0f} s on {results['workers']} processes",
             f"{'param':9} {'state':9} {'c':>1} {'m':>1} {'amp':>3} {'sr':>2}  " +
             "  ".join(f"sm_{arch} regs" for arch in ARCHS)]
    by_variant = {}
    for record in results["records"]:
        by_variant.setdefault(json.dumps(record["variant"]), {})[record["arch"]] = record
    for key, per_arch in by_variant.items():
        v = json.loads(key)
        regs = "  ".join(f"{per_arch[arch].get('registers', 'error'):>12}" for arch in ARCHS)
        lines.append(f"{v['param']:9} {v['state']:9} {int(v['centered']):>1} {int(v['momentum']):>1} "
                     f"{int(v['unscale']):>3} {int(v['stochastic']):>2}  {regs}")
    return "\n".join(lines)


def test_register_counts_are_recorded(compiled, request, tmp_path_factory):
    """The registers of every variant: in this test's report section (pytest -rA shows it, as it
    does -s) and in triton_registers.txt under pytest's temporary directory. Within ptxas's
    limit (the kernel's MAX_REGISTERS) by construction; a jump shows in the table."""
    table = register_table(compiled)
    request.node.add_report_section("call", "registers", table)
    (tmp_path_factory.getbasetemp() / "triton_registers.txt").write_text(table + "\n")
    print("\n" + table)
    assert all(0 < r["registers"] <= 255 for r in compiled["records"] if "error" not in r)


def failures(results: dict) -> list:
    return [f"{r['variant']} sm_{r['arch']}: {r['error']}" for r in results["records"] if "error" in r]


def test_every_variant_compiles_for_sm80_and_sm90(compiled):
    problems = failures(compiled)
    assert not problems, "\n".join(problems[:5])


def test_the_variants_are_the_launchers_constexpr_combinations(compiled):
    """Each input combination gave its own kernel, and changing everything else (options, sizes,
    scalars, seeds, device tensors: found_inf, a tensor lr, clip_coef) gave the same one: the
    compiled variants are exactly the launcher's VARIANT_AXES, and no runtime argument is
    specialised on (Triton would compile another kernel for an int of 1 or an aligned pointer)."""
    expected = len(list(variant_inputs())) * len(ARCHS)
    assert len(compiled["records"]) == expected
    assert compiled["distinct_keys"] == expected
    assert compiled["runtime_options_keep_the_key"]
    fixed = {"BLOCK_SIZE", "TABLE_WIDTH", "BLOCK_MAP_WIDTH"}
    assert set(compiled["constexpr_names"]) - fixed == set(compiled["variant_axes"])


def _width(dtype_name: str) -> int:
    """16-byte accesses per stream per thread on the aligned path (8 elements a thread): two for
    float32, one for 16-bit values, none for 8-bit codes (one 8-byte access)."""
    return {"float32": 2, "float16": 1, "bfloat16": 1, "uint8": 0}[dtype_name]


def test_ieee_division_and_square_root_no_fma_no_flush_to_zero(compiled):
    for record in compiled["records"]:
        label = f"{record['variant']} sm_{record['arch']}"
        assert record["fma"] == 0, f"{label}: a fused multiply-add"
        assert record["ftz"] == 0, f"{label}: flush-to-zero"
        assert record["div_rn"] > 0 and record["div_approx"] == 0, f"{label}: approximate division"
        assert record["sqrt_rn"] > 0 and record["sqrt_approx"] == 0, f"{label}: approximate square root"


def test_aligned_path_uses_16_byte_loads_and_stores(compiled):
    """Every stream of the unmasked path moves in 16-byte vectors (8-bit codes in 8-byte ones):
    p and g, each state tensor the variant has, and the AMP grad write-back."""
    for record in compiled["records"]:
        v = record["variant"]
        states = 1 + v["centered"] + v["momentum"]
        param, state = _width(v["param"]), _width(v["state"])
        label = f"{v} sm_{record['arch']}"
        assert record["v4_loads"] == 2 * param + states * state, label
        assert record["v4_stores"] == (1 + v["unscale"]) * param + states * state, label
        if v["state"] == "uint8":
            assert record["v2_loads"] >= states and record["v2_stores"] >= states, label


def test_no_local_memory(compiled):
    """No spills, no stack frame: everything in registers (their counts are in the table). The
    heaviest variant (fp16 params and state, centered + momentum, AMP, stochastic rounding) needs
    about 253 of the 255 on sm_90: _half_stochastic multiplies by the exact reciprocal of its
    power-of-two span instead of dividing, and random bits take 32-bit indices."""
    for record in compiled["records"]:
        label = f"{record['variant']} sm_{record['arch']} ({record['registers']} registers)"
        assert record["local_in_ptx"] == 0, label
        assert record["stack"] == 0 and record["local"] == 0, label


# A copy of the backend with an int-to-pointer cast from a 32-bit integer, in the branch that
# reads clip_coef: Triton's interpreter never runs it without clipping (it executes only the
# statements a step reaches), and the compiler refuses it (tt.int_to_ptr takes a 64-bit integer).
BROKEN = ("            clip_value = tl.load(clip_coef)\n",
          "            clip_value = tl.load(clip_coef.to(tl.int64).to(tl.int32).to(tl.pointer_type(tl.float32)))\n")


def test_the_compile_test_fails_on_code_the_interpreter_accepts(tmp_path):
    from rmsprop_fused import _triton_backend

    source = open(_triton_backend.__file__).read()
    assert source.count(BROKEN[0]) == 1
    broken = tmp_path / "broken_triton_backend.py"
    broken.write_text(source.replace(*BROKEN))

    # The interpreter steps with the broken copy (this process has TRITON_INTERPRET=1, or a GPU).
    sys.path.insert(0, HERE)
    from common import clone_lists, make_lists, step

    module = _load_backend(str(broken))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if module.unavailable_reason(torch.device(device)) is None:
        lists = make_lists([5, 3000], torch.float32, device, momentum=0.9, seed=1, steps=True)
        expected, actual = clone_lists(lists), clone_lists(lists)
        step(expected, "reference", momentum=0.9)
        module.rmsprop_triton(*(actual[k] for k in LIST_KEYS), lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0,
                              momentum=0.9, centered=False, maximize=False, eps_in_sqrt=False, lr_in_momentum=False,
                              decoupled_weight_decay=False, nesterov=False, bias_correction=False,
                              variance_state=False, rounding_seed=None)
        for key in expected:
            for a, e in zip(actual[key], expected[key]):
                assert torch.equal(a, e), key

    # ... and the compile of one variant fails, as test_every_variant_compiles_for_sm80_and_sm90 would.
    results = run_compiles(backend_file=str(broken), limit=1)
    assert len(failures(results)) == len(ARCHS), failures(results)
    # (MLIR prints its diagnostic; the exception says only that parsing failed)
    assert "'tt.int_to_ptr' op operand #0 must be 64-bit signless integer" in results["stderr"]


if __name__ == "__main__":
    main(sys.argv[1:])
