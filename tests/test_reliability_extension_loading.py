"""A missing or broken compiled extension degrades to another backend with ONE warning; it never
crashes `import rmsprop_fused`.

Each case copies the package under test (the one this process imported: installed or built in
place, with its .so and _build_info.json) into a temporary directory, breaks the copy the way
installs break in the field, and imports it in a fresh interpreter that sees only the copy:

  so-deleted          the shared object is gone (a partial uninstall, a wheel without it)
  torch-upgraded      _build_info.json names another torch: `pip install -U torch` under an
                      old build. The stale .so must not even be loaded (its C++ ABI may differ)
  so-corrupted        the .so is garbage (a bad download)
  so-truncated        the .so is cut short (an interrupted copy, a full disk)
  build-info-missing  a build that never wrote _build_info.json
  build-info-garbage  _build_info.json is not JSON (a half-written file)
  build-info-not-an-object  valid JSON, but not the object setup.py writes

In each: the import succeeds; exactly one ExtensionUnavailableWarning is issued, and it carries
the reason; `python -m rmsprop_fused` prints the reason; FusedRMSprop(backend="auto") steps and
equals backend="reference" bitwise; FusedRMSprop(backend="cpu") raises BackendUnavailableError
with the reason. RMSPROP_FUSED_DISABLE_EXTENSION=1, a deliberate choice, falls back silently.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import rmsprop_fused

PACKAGE_DIR = os.path.dirname(os.path.abspath(rmsprop_fused.__file__))
EXTENSION = sorted(glob.glob(os.path.join(PACKAGE_DIR, "_C.*so")) + glob.glob(os.path.join(PACKAGE_DIR, "_C.*pyd")))
HAS_BUILD = bool(EXTENSION) and os.path.exists(os.path.join(PACKAGE_DIR, "_build_info.json"))

# Runs in the fresh interpreter. Prints one line "RESULT {json}" for the test to read.
CHILD = r"""
import contextlib, io, json, runpy, sys, warnings

# An editable install's finder maps rmsprop_fused's submodules to the original checkout: a copy
# without its .so would load the original's. The child sees the copy alone.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]

warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import rmsprop_fused
    from rmsprop_fused import BackendUnavailableError, ExtensionUnavailableWarning, FusedRMSprop, _extension, backends

    def trajectory(backend):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
        initial = [p.detach().clone() for p in params]
        optimizer = FusedRMSprop(params, lr=0.01, momentum=0.9, centered=True, backend=backend)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
        return initial, [p.detach() for p in params]

    (initial, auto), (_, reference) = trajectory("auto"), trajectory("reference")
    try:
        FusedRMSprop([torch.nn.Parameter(torch.randn(2))], backend="cpu")
        explicit = None
    except BackendUnavailableError as e:
        explicit = str(e)
    cli, cli_status = io.StringIO(), None
    with contextlib.redirect_stdout(cli):  # what `python -m rmsprop_fused` runs (runpy is -m)
        try:
            runpy.run_module("rmsprop_fused", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            cli_status = e.code

print("RESULT " + json.dumps({
    "file": rmsprop_fused.__file__,
    "load_error": _extension.load_error,
    "stale_so_loaded": "rmsprop_fused._C" in sys.modules,
    "warnings": [str(w.message) for w in caught if issubclass(w.category, ExtensionUnavailableWarning)],
    "auto_backend": backends.select("auto", torch.device("cpu"), torch.float32),
    "auto_equals_reference": all(torch.equal(a, r) for a, r in zip(auto, reference)),
    "auto_moved": all(not torch.equal(a, i) for a, i in zip(auto, initial)),
    "explicit_cpu_error": explicit,
    "cli": cli.getvalue(),
    "cli_status": cli_status,
}))
"""


def break_copy(root: str, case: str) -> None:
    package = os.path.join(root, "rmsprop_fused")
    info = os.path.join(package, "_build_info.json")
    so = os.path.join(package, os.path.basename(EXTENSION[0])) if EXTENSION else None
    if case == "so-deleted":
        os.remove(so)
    elif case == "torch-upgraded":
        with open(info) as f:
            data = json.load(f)
        data["torch_version"] = "2.0.0"
        with open(info, "w") as f:
            json.dump(data, f)
    elif case == "so-corrupted":
        with open(so, "wb") as f:
            f.write(os.urandom(4096))
    elif case == "so-truncated":
        with open(so, "r+b") as f:
            f.truncate(64 * 1024)  # a valid ELF header whose segments run past the end of the file
    elif case == "build-info-missing":
        os.remove(info)
    elif case == "build-info-garbage":
        with open(info, "w") as f:
            f.write('{"torch_version": "' + torch.__version__)
    elif case == "build-info-not-an-object":
        with open(info, "w") as f:
            f.write("null")
    elif case != "disabled":
        raise ValueError(case)


def start_child(root: str, case: str) -> subprocess.Popen:
    shutil.copytree(PACKAGE_DIR, os.path.join(root, "rmsprop_fused"), ignore=shutil.ignore_patterns("__pycache__"))
    break_copy(root, case)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMSPROP_FUSED_")}
    env["PYTHONPATH"] = root  # the copy, and nothing of the original package
    if case == "disabled":
        env["RMSPROP_FUSED_DISABLE_EXTENSION"] = "1"
    return subprocess.Popen([sys.executable, "-c", CHILD], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def children(tmp_path_factory, request):
    """All the fresh interpreters, started together (each spends seconds importing torch; the
    tests only read their reports): case -> (root, exit status, stdout, stderr)."""
    cases = [c for c in CASES if (HAS_BUILD or c not in NEEDS_BUILD) and (c not in SLOW or request.config.getoption("--runslow"))]
    cases.append("disabled")
    roots = {case: str(tmp_path_factory.mktemp(case)) for case in cases}
    results = {}
    for batch in (cases[:4], cases[4:]):  # at most four torch imports in memory at a time
        running = {case: start_child(roots[case], case) for case in batch}
        for case, child in running.items():
            stdout, stderr = child.communicate(timeout=300)
            results[case] = (roots[case], child.returncode, stdout, stderr)
    return results


def report_of(children, case: str) -> dict:
    root, status, stdout, stderr = children[case]
    assert status == 0, f"the import crashed (exit status {status}):\n{stderr[-3000:]}"
    line = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert line, stdout + stderr
    report = json.loads(line[-1][len("RESULT "):])
    assert report["file"].startswith(root), f"the child imported {report['file']}, not the copy"
    return report


# The reason each case must give (a fragment of _extension.load_error).
CASES = {
    "so-deleted": "the C++ extension failed to load (No module named 'rmsprop_fused._C')",
    "torch-upgraded": f"built against torch 2.0.0 but torch {torch.__version__} is installed",
    "so-corrupted": "the C++ extension failed to load (",
    "so-truncated": "truncated",
    "build-info-missing": "the C++ extension is not built (no _build_info.json)",
    "build-info-garbage": "cannot read",
    "build-info-not-an-object": "_build_info.json",
}
SLOW: set = set()  # every case runs in CI: each is a README promise (about 4 s a case)
NEEDS_BUILD = {"so-deleted", "torch-upgraded", "so-corrupted", "so-truncated", "build-info-garbage", "build-info-not-an-object"}
@pytest.mark.skipif(not HAS_BUILD, reason=f"the package under test ({PACKAGE_DIR}) has no built extension to break")
@pytest.mark.parametrize("case", [
    pytest.param(case, marks=[pytest.mark.slow] if case in SLOW else [])
    for case in CASES
])
def test_broken_extension_falls_back_with_one_warning(children, case):
    report = report_of(children, case)
    reason = report["load_error"]
    assert reason and CASES[case] in reason, reason
    assert len(report["warnings"]) == 1, report["warnings"]
    assert reason in report["warnings"][0] and "Falling back" in report["warnings"][0]
    assert report["cli_status"] == 0 and f"unavailable: {reason}" in report["cli"], report["cli"]
    assert report["auto_backend"] == "reference"
    assert report["auto_equals_reference"] and report["auto_moved"]
    assert report["explicit_cpu_error"] and reason in report["explicit_cpu_error"], report["explicit_cpu_error"]
    if case == "torch-upgraded":
        assert not report["stale_so_loaded"], "the .so built for another torch was loaded"


def test_disabled_extension_falls_back_silently(children):
    report = report_of(children, "disabled")
    assert report["load_error"] == "disabled by RMSPROP_FUSED_DISABLE_EXTENSION"
    assert report["warnings"] == []  # asked for: nothing to warn about
    assert report["cli_status"] == 0 and "unavailable: disabled by RMSPROP_FUSED_DISABLE_EXTENSION" in report["cli"]
    assert report["auto_backend"] == "reference" and report["auto_equals_reference"] and report["auto_moved"]
    assert "disabled by RMSPROP_FUSED_DISABLE_EXTENSION" in report["explicit_cpu_error"]
