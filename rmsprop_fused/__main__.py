"""`python -m rmsprop_fused`: versions, and for each backend whether it runs here and why not."""

import platform
import sys

import torch

from . import __version__, _extension
from .backends import BACKENDS, KERNEL_DTYPES, unavailable_reason


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def main() -> int:
    print(f"rmsprop_fused {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {_triton_version()}")
    info = _extension.build_info
    if info is not None:
        cuda = f"CUDA kernel for {info['cuda_arch_list']!r} ({info['nvcc_version']})" if info["cuda"] else f"no CUDA kernel: {info['why_no_cuda']}"
        print(f"extension built against torch {info['torch_version']}; {cuda}")
    if _extension.load_error is None:
        simd = _extension._module.cpu_simd_isa()
        print(f"CPU step for 16-bit values and 8-bit state: {simd + ' code' if simd else 'compiler-vectorised loop, scalar 8-bit codecs'}")
        print(f"CPU loops prefetch each stream {_extension._module.cpu_prefetch_bytes()} B ahead")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    print(f"GPUs visible: {', '.join(gpus) if gpus else 'none'}")
    print()
    devices = [torch.device("cpu")] + ([torch.device("cuda", torch.cuda.current_device())] if gpus else [torch.device("cuda")])
    for backend in BACKENDS[1:]:
        for device in devices:
            reason = unavailable_reason(backend, device)
            if backend in ("cpu", "cuda") and device.type != backend:
                continue
            if backend == "triton" and device.type == "cpu" and reason is not None:
                continue  # the interpreter is a testing aid; say nothing about it unless it is on
            status = "available" if reason is None else f"unavailable: {reason}"
            print(f"  {backend:<10} {device.type:<5} {status}")
    print()
    for device in devices:
        if device.type == "cuda" and not gpus:
            continue
        from .backends import select
        chosen = {str(d).replace("torch.", ""): select("auto", device, d) for d in KERNEL_DTYPES}
        print(f"  auto on {device}: " + ", ".join(f"{d} -> {b}" for d, b in chosen.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
