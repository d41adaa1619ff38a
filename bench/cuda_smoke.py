"""A short run of the GPU kernels for scripts/gpu_check.sh to put under compute-sanitizer
(memcheck: out-of-bounds and misaligned accesses; racecheck: shared-memory hazards): a few steps of
FusedRMSprop with the `cuda` and `triton` backends on tensors of awkward sizes and offsets (empty,
one element, odd sizes, a block boundary and one past it, a view at an odd offset, a non-dense
view), fp32 and bf16, plain and centered + momentum, each compared bit for bit with the
`reference` backend on the same inputs (the backends round alike: README, "Backends"). Exits 1 on a
mismatch or an error, printing one line per case. Small on purpose: under memcheck every access is
checked, and torch's own start-up kernels are too.

    python bench/cuda_smoke.py [--backends cuda,triton] [--state-dtypes none,8bit]
"""

from __future__ import annotations

import argparse
import sys
from typing import List

import torch

from rmsprop_fused import FusedRMSprop

SIZES = (0, 1, 7, 1000, 4096, 16384, 16385, 70001)


def make_params(dtype: torch.dtype, seed: int) -> List[torch.Tensor]:
    """Leaf tensors of SIZES, plus a view at an odd element offset and a strided (non-dense)
    view, each with a random grad."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    params = [torch.randn(n, generator=gen, device="cuda").to(dtype) for n in SIZES]
    base = torch.randn(4099, generator=gen, device="cuda").to(dtype)
    params.append(base[3:4099])  # misaligned for 16-byte accesses
    params.append(torch.randn(64, 33, generator=gen, device="cuda").to(dtype)[:, :31])  # gaps between rows
    leaves = []
    for p in params:
        leaf = p.detach().requires_grad_()  # a view stays a view: its storage is the base's
        leaf.grad = torch.randn(p.shape, generator=gen, device="cuda").to(dtype)
        leaves.append(leaf)
    return leaves


def run_case(backend: str, dtype: torch.dtype, centered: bool, momentum: float, state_dtype, steps: int = 3) -> str:
    """Steps the same params with `backend` and with the reference; '' when they agree bitwise,
    else what differs."""
    results = {}
    for name in (backend, "reference"):
        params = make_params(dtype, seed=1)
        optimizer = FusedRMSprop(params, lr=1e-2, momentum=momentum, centered=centered, backend=name,
                                 state_dtype=state_dtype)
        for _ in range(steps):
            optimizer.step()
        torch.cuda.synchronize()
        results[name] = [p.detach().clone() for p in params]
    for k, (got, want) in enumerate(zip(results[backend], results["reference"])):
        if not torch.equal(got, want):
            return f"param {k} ({tuple(got.shape)}) differs: max |diff| {(got.float() - want.float()).abs().max().item():.3g}"
    return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="cuda,triton", help="comma-separated FusedRMSprop backends (default cuda,triton)")
    parser.add_argument("--state-dtypes", default="none", help="comma-separated: none (the params' dtype), bf16, 8bit (default none)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU is visible")
        return 1
    states = {"none": None, "bf16": torch.bfloat16, "8bit": "8bit"}
    failures = 0
    for backend in args.backends.split(","):
        for dtype in (torch.float32, torch.bfloat16):
            for centered, momentum in ((False, 0.0), (True, 0.9)):
                for state_name in args.state_dtypes.split(","):
                    label = f"{backend} {str(dtype)[6:]} {'centered+momentum' if centered else 'plain'} state {state_name}"
                    try:
                        problem = run_case(backend, dtype, centered, momentum, states[state_name])
                    except Exception as e:
                        problem = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
                    failures += bool(problem)
                    print(f"{'FAIL' if problem else 'ok  '} {label}" + (f": {problem}" if problem else ""), flush=True)
    print(f"{failures} case(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
