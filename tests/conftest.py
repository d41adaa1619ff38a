import os

import pytest
import torch

# Triton kernels run on CPU tensors in Triton's interpreter, which must be switched on before any
# kernel is defined, i.e. before rmsprop_fused's Triton module is imported. On a machine with a GPU
# the tests run the compiled Triton kernel instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
