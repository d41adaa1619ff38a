"""The Python side of a step: FusedRMSprop over many one-element params, where the kernel's own
work is negligible and what is left is the per-param cost of a step (issue 14 item 4's case:
GPT-2 small's 148 tensors). Every setting is timed in rounds of consecutive steps, then
torch.optim.RMSprop (foreach=False, its CPU default) on as many params the same way; prints
microseconds a step and a param, and how many times as long torch's step takes. (Rounds are not
interleaved with torch's: its thousands of temporary tensors a step leave the garbage collector
and the allocator work that then lands in whichever step runs next, which doubled the fused
step's time here.) One setting makes 4 of the params 4,096 elements long, so that an 8-bit
group has codes as well as float32 state (two op calls): its time includes their kernel work.

    python bench/step_overhead.py [--params 148] [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from rmsprop_fused import FusedRMSprop

from bench_step import cpu_model  # bench/ is on sys.path when run as bench/step_overhead.py

SETTINGS = {
    "plain": {},
    "backend='cpu'": dict(backend="cpu"),
    "centered + momentum": dict(centered=True, momentum=0.9),
    "max_grad_norm=1": dict(max_grad_norm=1.0),
    "centered + momentum + max_grad_norm": dict(centered=True, momentum=0.9, max_grad_norm=1.0),
    "bf16 state": dict(state_dtype=torch.bfloat16),
    "two param groups": dict(param_groups=2),
    "8-bit state": dict(state_dtype="8bit"),
    "8-bit, 4 params of 4,096 (two calls)": dict(state_dtype="8bit", quantized=4),
    "backend='reference'": dict(backend="reference"),
}


def make(n: int, factory, param_groups: int = 1, quantized: int = 0, **options):
    """n one-element params with grads, in `param_groups` groups of (nearly) equal size, the
    second's lr its own; the first `quantized` of them have 4,096 elements instead, the least that
    8-bit state quantizes (the others keep float32 state: a group of both is two op calls)."""
    params = [nn.Parameter(torch.randn(4096 if k < quantized else 1)) for k in range(n)]
    for p in params:
        p.grad = torch.randn_like(p)
    size = -(-n // param_groups)
    groups = [{"params": params[k:k + size]} for k in range(0, n, size)]
    for group in groups[1:]:
        group["lr"] = 0.02
    return factory(groups, **options)


def time_steps(optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=148, help="one-element params (default: 148, GPT-2 small's count)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds of --steps steps each")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: nothing here is parallel)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.params} one-element params; {cpu_model()}, {args.threads} thread(s), torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, options in SETTINGS.items():
        fused = make(args.params, FusedRMSprop, **options)
        torch_options = {k: v for k, v in options.items() if k in ("centered", "momentum", "param_groups", "quantized")}
        reference = make(args.params, torch.optim.RMSprop, foreach=False, **torch_options)
        for optimizer in (fused, reference):
            time_steps(optimizer, args.steps)  # warm-up: state, caches
        fused_times = [time_steps(fused, args.steps) for _ in range(args.rounds)]
        torch_times = [time_steps(reference, args.steps) for _ in range(args.rounds)]
        us = statistics.median(fused_times) * 1e6
        ratio = statistics.median(torch_times) / statistics.median(fused_times)
        print(f"  {name:38s} {us:8.0f} us a step  {us / args.params:6.2f} us a param  "
              f"torch.optim.RMSprop (for-loop{', no clipping' if 'max_grad_norm' in options else ''}): {ratio:5.2f}x as long")


if __name__ == "__main__":
    main()
