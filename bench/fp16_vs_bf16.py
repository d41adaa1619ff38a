"""fp16 against bf16 params: FusedRMSprop's step on the same shapes, in paired rounds.

The two dtypes move the same bytes, so their ratio is the cost of float16's conversions (vcvtph2ps
and vcvtps2ph, where bfloat16 is a shift or a mask). bench_step.py times each dtype as a case of
its own, minutes apart on a machine whose speed drifts; here each round steps both optimizers one
after the other (in alternating order), and the ratio is taken within the round.

    python bench/fp16_vs_bf16.py [--list gpt2] [--rounds 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import param_lists  # noqa: E402
from bench_step import BASE_OPTIONS, cpu_model, interquartile, make_params  # noqa: E402
from bench_step import OPTION_SETS as ALL_OPTION_SETS  # noqa: E402
from rmsprop_fused import FusedRMSprop  # noqa: E402

OPTION_SETS = {name: ALL_OPTION_SETS[name] for name in BASE_OPTIONS}


def optimizer_for(plist: param_lists.ParamList, dtype: torch.dtype, options) -> FusedRMSprop:
    # the same seed for both dtypes: the same values, rounded; gradients around 1 (randn), so
    # that float16's squares stay normal numbers
    optimizer = FusedRMSprop(make_params(plist, dtype, torch.device("cpu")), lr=1e-4, **options.kwargs())
    optimizer.step()  # state allocated before timing
    return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", default="gpt2", choices=sorted(param_lists.LISTS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plist = param_lists.LISTS[args.list]()
    threads = f"{args.threads} thread" + ("s" if args.threads != 1 else "")
    print(f"{cpu_model()}, {threads}, torch {torch.__version__}, {args.list}, "
          f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    for name, options in OPTION_SETS.items():
        optimizers = {dtype: optimizer_for(plist, dtype, options)
                      for dtype in (torch.bfloat16, torch.float16)}
        times = {dtype: [] for dtype in optimizers}
        for r in range(args.rounds):
            order = list(optimizers) if r % 2 == 0 else list(optimizers)[::-1]
            for dtype in order:
                start = time.perf_counter()
                optimizers[dtype].step()
                times[dtype].append(time.perf_counter() - start)
        ratios = [h / b for h, b in zip(times[torch.float16], times[torch.bfloat16])]
        print(f"  {name:18s} bf16 {statistics.median(times[torch.bfloat16]) * 1e3:6.1f} ms, "
              f"fp16 {statistics.median(times[torch.float16]) * 1e3:6.1f} ms, fp16 / bf16 "
              f"{statistics.median(ratios):.3f} (interquartile {interquartile(ratios)})")
        del optimizers


if __name__ == "__main__":
    main()
