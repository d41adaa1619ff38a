"""The CUDA parts of setup.py, without building anything: the architectures it records when it takes
them from the visible GPUs (issue #15 item 2 (b)). rmsprop_fused/_extension.py accepts a GPU by
that record, so it must hold the +PTX that torch.utils.cpp_extension compiles the highest one
with, or a newer GPU that the PTX runs on would be refused."""

import ast
import os
import types

import pytest

from rmsprop_fused import _extension

SETUP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")


def function_of_setup_py(name: str):
    """One top-level function of setup.py, defined without running setup() (which builds)."""
    with open(SETUP) as f:
        tree = ast.parse(f.read())
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    namespace = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), SETUP, "exec"), namespace)
    return namespace[name]


def fake_torch(capabilities, built=("sm_80", "sm_86", "sm_90", "sm_100", "sm_120")):
    cuda = types.SimpleNamespace(
        device_count=lambda: len(capabilities),
        get_device_capability=lambda i: capabilities[i],
        get_arch_list=lambda: list(built),
    )
    return types.SimpleNamespace(cuda=cuda)


@pytest.mark.parametrize(
    "capabilities, recorded",
    [
        ([(9, 0)], "9.0+PTX"),
        ([(9, 0), (8, 6), (9, 0)], "8.6;9.0+PTX"),  # every visible GPU, once, the highest as PTX
        ([(12, 1)], "12.0+PTX"),  # above what torch was built for: clamped, as torch clamps it
    ],
)
def test_visible_gpu_arch_list_records_ptx(capabilities, recorded):
    assert function_of_setup_py("visible_gpu_arch_list")(fake_torch(capabilities)) == recorded


def test_recorded_ptx_lets_a_newer_gpu_run(monkeypatch):
    """_extension reads the record: 9.0 machine code runs on 9.0 only, 9.0+PTX on 10.0 too."""
    recorded = function_of_setup_py("visible_gpu_arch_list")(fake_torch([(9, 0)]))
    monkeypatch.setattr(_extension, "build_info", {"cuda_arch_list": recorded})
    assert (9, 0, True) in _extension._arch_list()
    monkeypatch.setattr(_extension, "build_info", {"cuda_arch_list": "9.0"})
    assert (9, 0, False) in _extension._arch_list()
