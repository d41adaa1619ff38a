"""The CPU step's prefetch distance: FusedRMSprop's step and the roofline at each distance, paired.

The CPU loops prefetch every stream a fixed number of bytes ahead (csrc/cpu/prefetch.cpp says why
1 KiB). This times the step and the roofline (bench/roofline_cpu.cpp, the same loop without the
arithmetic) at each distance of --distances on the same tensors: every round steps all of them
one after the other, in an order that rotates from round to round, and each distance's time is
taken as a ratio to the default distance's within the round. (The machine's speed drifts between
rounds, and on a virtual machine one case's time differed by up to 2.4x between allocations of
its tensors, so distances are never compared across tensors.)

    python bench/prefetch_sweep.py [--list gpt2] [--dtypes fp32,bf16] [--rounds 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import param_lists  # noqa: E402
import roofline  # noqa: E402
from bench_step import BASE_OPTIONS, DTYPES, LR, OPTION_SETS, cpu_model, interquartile, make_params  # noqa: E402
from rmsprop_fused import FusedRMSprop, _extension  # noqa: E402


def set_distance(bytes_ahead: int) -> None:
    """The step's and the roofline's distance (each library has its own copy of the loop)."""
    _extension._module._set_cpu_prefetch_bytes(bytes_ahead)
    getattr(torch.ops, roofline.OP_NAME).set_prefetch_bytes(bytes_ahead)


def sweep(steps: Dict[str, Callable[[], object]], distances: List[int], default: int,
          rounds: int) -> Dict[str, Dict[int, List[float]]]:
    """{step name: {distance: seconds of each round}}; the default distance is back afterwards,
    an error or an interrupt included."""
    times = {name: {d: [] for d in distances} for name in steps}
    try:
        for r in range(rounds):
            order = distances[r % len(distances):] + distances[:r % len(distances)]
            for d in order:
                set_distance(d)
                for name, step in steps.items():
                    start = time.perf_counter()
                    step()
                    times[name][d].append(time.perf_counter() - start)
    finally:
        set_distance(default)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", default="gpt2", choices=sorted(param_lists.LISTS))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--options", default=",".join(BASE_OPTIONS))
    parser.add_argument("--distances", default="0,512,1024,2048,4096",
                        help="bytes of params ahead, comma-separated (multiples of 64 up to 16384)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if _extension.load_error is not None:
        raise SystemExit(f"prefetch_sweep: the extension did not load: {_extension.load_error}")
    reason = roofline.load_cpu_op()
    if reason:
        raise SystemExit(f"prefetch_sweep: {reason}")
    torch.set_num_threads(args.threads)
    default = _extension._module.cpu_prefetch_bytes()
    distances = sorted({int(d) for d in args.distances.split(",")} | {default})
    try:  # every distance checked by the op itself before any tensor is allocated
        for d in distances:
            set_distance(d)
    except RuntimeError as e:
        raise SystemExit(f"prefetch_sweep: --distances: {e}") from None
    finally:
        set_distance(default)
    plist = param_lists.LISTS[args.list]()
    threads = f"{args.threads} thread" + ("s" if args.threads != 1 else "")
    print(f"{cpu_model()}, {threads}, torch {torch.__version__}, {args.list}, {args.rounds} rounds, "
          f"default distance {default} B, load average {os.getloadavg()[0]:.1f}")
    print("  each distance: median ms, then its time / the default's, median over rounds (interquartile)")
    for dtype_name in args.dtypes.split(","):
        for option_name in args.options.split(","):
            options = OPTION_SETS[option_name]
            params = make_params(plist, DTYPES[dtype_name], torch.device("cpu"))
            optimizer = FusedRMSprop(params, lr=LR, **options.kwargs())
            optimizer.step()  # state allocated before timing
            roofline_step, _state = roofline.build(params, options, "param")
            times = sweep({"step": optimizer.step, "roofline": roofline_step}, distances, default,
                          args.rounds)
            for name, by_distance in times.items():
                cells = []
                for d in distances:
                    ratios = [t / b for t, b in zip(by_distance[d], by_distance[default])]
                    cells.append(f"{d:5d} B {statistics.median(by_distance[d]) * 1e3:6.1f} ms "
                                 f"{statistics.median(ratios):.3f} ({interquartile(ratios)})")
                print(f"  {dtype_name} {option_name:18s} {name:8s} " + "  ".join(cells))
            del optimizer, params, roofline_step, _state


if __name__ == "__main__":
    main()
