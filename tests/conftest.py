import os

import pytest
import torch

# Triton kernels run on CPU tensors in Triton's interpreter, which must be switched on before any
# kernel is defined, i.e. before rmsprop_fused's Triton module is imported. On a machine with a GPU
# the tests run the compiled Triton kernel instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """scripts/test.sh sets these so that a build that silently lost its extension fails CI
    instead of skipping the kernel tests."""
    from rmsprop_fused import _extension

    if os.environ.get("RMSPROP_FUSED_REQUIRE_EXTENSION") == "1" and _extension.load_error is not None:
        raise pytest.UsageError(f"RMSPROP_FUSED_REQUIRE_EXTENSION=1 but {_extension.load_error}")
    if os.environ.get("RMSPROP_FUSED_REQUIRE_CUDA_BUILD") == "1" and not (_extension.build_info or {}).get("cuda"):
        why = (_extension.build_info or {}).get("why_no_cuda") or _extension.load_error
        raise pytest.UsageError(f"RMSPROP_FUSED_REQUIRE_CUDA_BUILD=1 but the CUDA kernel was not built: {why}")


@pytest.fixture
def cpu_loop(request):
    """Runs the test with the CPU step's AVX-512 code (the 16-bit loop, the 8-bit block codecs) allowed
    or not (skipped where the CPU lacks it)."""
    from rmsprop_fused import _extension

    module = _extension._module
    if request.param == "simd-loop" and not module.cpu_simd_isa():
        pytest.skip("this CPU lacks AVX-512 BF16: the step runs the compiler-vectorised loop and the scalar 8-bit codecs only")
    previous = module._set_cpu_simd(request.param == "simd-loop")
    yield request.param
    module._set_cpu_simd(previous)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
