"""Times `optimizer.step()` of FusedRMSprop's backends against torch.optim.RMSprop.

    python bench/bench_step.py --quick          # about 45 s on an idle 2-core CPU, minutes under load
    python bench/bench_step.py                  # every list x option set x dtype
    python bench/bench_step.py --device cuda    # the same on a GPU

For every case (parameter list x option set x dtype) it times each available implementation:
FusedRMSprop with each of its backends (those that cannot run here are skipped, saying why),
torch.optim.RMSprop with foreach=True and foreach=False (the for-loop path, torch's CPU default),
torch.optim.RMSprop.step under torch.compile, and bitsandbytes' RMSprop when it is installed.

An RMSprop step is memory-bound, so every time is also reported as an effective bandwidth: the
minimum bytes a single fused pass must move (docs/DESIGN.md section 4: 20, 28 or 36 bytes per fp32
element) divided by the median step time, and as a fraction of the copy bandwidth measured in the
same run, just before the list's cases. Ratios between implementations come from one run on one
machine; absolute numbers from a shared machine are only as good as its load was quiet.

Writes a table to stdout (a progress bar goes to stderr when it is a terminal), and
<out>/<device>.json and <out>/<device>.png, <out> being bench/out unless --out says otherwise
(the plot: GB/s by case and implementation with each median step time, the copy bandwidth as a line).

Reading CPU numbers from a shared machine: the fused step enters one parallel region per step;
torch's paths enter one per op per tensor (about 740 for GPT-2's list with the for-loop), and on
a small VM where other processes keep the cores busy each of those can wait milliseconds for a
preempted thread. On the 2-core VM this was written on, at load average 2-3, torch's for-loop
took 2.0 s for a GPT-2 step with 2 threads and 0.29 s with 1 (the fused step: 0.12 s either
way). So the speedups depend on the load: the JSON records the load average, and `--threads 1`
gives ratios that such barrier waits do not inflate.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

import rmsprop_fused
from rmsprop_fused import FusedRMSprop

try:  # running as `python bench/bench_step.py` puts bench/ on sys.path; importing from the repo root does not
    from param_lists import LISTS, ParamList
except ImportError:  # pragma: no cover
    from bench.param_lists import LISTS, ParamList

HERE = os.path.dirname(os.path.abspath(__file__))
LR = 1e-3  # any value does: it does not change the work a step does

# ----------------------------------------------------------------------------- the byte model


@dataclass(frozen=True)
class OptionSet:
    """The options that change how many tensors a step reads and writes."""

    name: str
    centered: bool = False
    momentum: float = 0.0

    def kwargs(self) -> dict:
        return {"centered": self.centered, "momentum": self.momentum}


OPTION_SETS: Dict[str, OptionSet] = {
    o.name: o
    for o in (
        OptionSet("plain"),
        OptionSet("momentum", momentum=0.9),
        OptionSet("centered+momentum", centered=True, momentum=0.9),
    )
}

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def tensors_touched(centered: bool, momentum: float, grad_scale: bool = False) -> Tuple[int, int]:
    """(tensors read, tensors written) by one fused pass: param, grad and square_avg are read,
    param and square_avg written; grad_avg (centered) and momentum_buffer (momentum > 0) are both
    read and written; with a grad_scale the unscaled grad is written back too."""
    extra_state = int(centered) + int(momentum > 0)
    return 3 + extra_state, 2 + extra_state + int(grad_scale)


def min_bytes_per_element(dtype: torch.dtype, centered: bool, momentum: float, grad_scale: bool = False) -> int:
    """docs/DESIGN.md section 4: plain 20, momentum 28, centered+momentum 36 bytes for fp32 (+4 with a
    grad_scale); half that for 16-bit tensors. Every tensor of a group has the param's dtype."""
    reads, writes = tensors_touched(centered, momentum, grad_scale)
    return (reads + writes) * dtype.itemsize


def effective_gbps(nbytes: float, seconds: float) -> float:
    """Bytes that had to move / time, in GB/s (10^9 bytes per second, as bandwidths are quoted)."""
    return nbytes / seconds / 1e9


def step_stats(times: Sequence[float]) -> dict:
    """Median and spread of step times: quartiles (the IQR is q3 - q1) and the extremes."""
    if not times:
        raise ValueError("no times to summarise")
    ordered = sorted(times)
    if len(ordered) == 1:
        q1 = q3 = ordered[0]
    else:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median_s": statistics.median(ordered), "q1_s": q1, "q3_s": q3, "min_s": ordered[0], "max_s": ordered[-1], "n": len(ordered)}


# ----------------------------------------------------------------------------- timing


def cpu_timer(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cuda_timer(fn: Callable[[], object]) -> float:
    """GPU time of fn from events on the current stream. The start event is recorded on an idle
    stream (the previous call synchronised), so host-side work inside fn that delays its kernels,
    a Python loop over tensors say, is counted: it is part of the step's cost."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def timer_for(device: torch.device) -> Callable[[Callable[[], object]], float]:
    return cuda_timer if device.type == "cuda" else cpu_timer


@dataclass(frozen=True)
class TimingPlan:
    """Warm-up steps (state allocation, first-touch page faults, compilation and autotuning happen
    there), then at least `repeats` timed steps, more until `min_time` seconds have been spent
    (per implementation, on average, when a case's implementations are interleaved), never more
    than `max_repeats`."""

    warmup: int = 2
    repeats: int = 7
    min_time: float = 1.0
    max_repeats: int = 30


def minor_page_faults() -> Optional[int]:
    """This process's minor page faults so far (None where getrusage is missing).

    Worth counting on a CPU: torch's unfused paths allocate temporaries every step, and glibc
    serves an allocation over its mmap threshold (32 MiB at most; GPT-2's 154 MB embedding is
    over it) with fresh pages, faulted in again at every step. On the 2-core VM this was written
    on, GPT-2's 37,693 faults per for-loop step cost about 2 s, some 50 us each, and decided
    the for-loop's step time."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return None


def timed_step(step: Callable[[], object], timer, faults: Optional[List[int]] = None) -> float:
    """One timed call; its minor page faults are appended to `faults` when a list is given."""
    before = minor_page_faults() if faults is not None else None
    seconds = timer(step)
    if before is not None:
        faults.append(minor_page_faults() - before)
    return seconds


def time_steps(step: Callable[[], object], timer, plan: TimingPlan, extra_warmup: int = 0,
               faults: Optional[List[int]] = None) -> Tuple[List[float], List[float]]:
    """(warm-up times, timed step times), in seconds."""
    warmup = [timer(step) for _ in range(plan.warmup + extra_warmup)]
    times: List[float] = []
    began = time.perf_counter()
    while len(times) < plan.max_repeats and (len(times) < plan.repeats or time.perf_counter() - began < plan.min_time):
        times.append(timed_step(step, timer, faults))
    return warmup, times


def measure_bandwidth(device: torch.device, numel: int, plan: TimingPlan) -> dict:
    """The memory bandwidth this run can expect, from two streaming ops on `numel` fp32 elements
    (far larger than any cache):

    copy     dst.copy_(src): 8 bytes/element counted (read src, write dst). On a CPU the write
             also reads dst into the cache first (write-allocate), which this count leaves out.
    inplace  dst.add_(src): 12 bytes/element (read both, write dst in place). An optimizer step
             updates in place too and pays no write-allocate, so on a CPU this is the closer
             ceiling, and a fused step can show more than 100% of the copy bandwidth.
    """
    timer = timer_for(device)
    src, dst = torch.rand(numel, device=device), torch.rand(numel, device=device)
    nbytes = numel * src.element_size()
    ops = {"copy": (functools.partial(dst.copy_, src), 2 * nbytes), "inplace_add": (functools.partial(dst.add_, src), 3 * nbytes)}
    result: dict = {"numel": numel}
    for name, (op, bytes_moved) in ops.items():
        _, times = time_steps(op, timer, plan)
        result[f"{name}_gbps"] = effective_gbps(bytes_moved, step_stats(times)["median_s"])
        result[f"{name}_times_s"] = times
    del src, dst, ops, op
    free_memory(device)
    return result


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- implementations

StepFn = Callable[[], object]


@dataclass(frozen=True)
class Impl:
    """One way to take a step. `build` makes an optimizer over the given params (their .grad
    set) and returns its step; dropping that function frees the optimizer and its state."""

    name: str
    build: Callable[[List[torch.Tensor], OptionSet], StepFn]
    extra_warmup: int = 0
    refuses: Callable[[ParamList, OptionSet], Optional[str]] = lambda plist, options: None  # why it sits a case out
    cleanup: Callable[[], None] = lambda: None
    # Timed by itself after the case's contenders, with at most ORACLE_REPEATS steps: the
    # reference backend is the correctness oracle, slow and memory-hungry (a float32 temporary
    # per op), and is timed to show what fusing buys, not to be compared round by round.
    alone: bool = False


ORACLE_REPEATS = 3


def _fused(backend: str) -> Impl:
    def build(params, options):
        return FusedRMSprop(params, lr=LR, backend=backend, **options.kwargs()).step

    return Impl(f"fused-{backend}", build, extra_warmup=2 if backend == "triton" else 0,  # Triton autotunes at first
                alone=backend == "reference")


def _torch(foreach: bool) -> Impl:
    def build(params, options):
        return torch.optim.RMSprop(params, lr=LR, foreach=foreach, **options.kwargs()).step

    return Impl("torch-foreach" if foreach else "torch-forloop", build)


def _torch_compiled(max_tensors: Optional[int] = None) -> Impl:
    """The documented pattern (PyTorch's "Compiling the optimizer with torch.compile" recipe):
    torch's default path for the params, traced and compiled by Inductor. Lists of more than
    `max_tensors` tensors are left out: Inductor's compile time grows with the tensor count, and
    a 2000-tensor step takes well over five minutes to compile on a 2-core CPU."""

    def build(params, options):
        # A fresh cache per case: each new optimizer object would otherwise add a recompilation,
        # and past dynamo's recompile limit the step silently runs eagerly.
        torch._dynamo.reset()
        optimizer = torch.optim.RMSprop(params, lr=LR, **options.kwargs())

        @torch.compile(fullgraph=False)
        def step():
            optimizer.step()

        return step

    def refuses(plist, options):
        if max_tensors is not None and plist.n_tensors > max_tensors:
            return f"compiling a {plist.n_tensors}-tensor step takes many minutes here (--compile-max-tensors {max_tensors})"
        return None

    # The first call compiles; the second may recompile once the step counters exist.
    return Impl("torch-compile", build, extra_warmup=2, refuses=refuses, cleanup=torch._dynamo.reset)


def _bitsandbytes() -> Impl:
    def build(params, options):
        import bitsandbytes as bnb

        return bnb.optim.RMSprop(params, lr=LR, optim_bits=32, **options.kwargs()).step

    def refuses(plist, options):
        if options.centered:
            return "bitsandbytes' RMSprop refuses centered=True"
        if options.momentum > 0:
            return "bitsandbytes' RMSprop accepts momentum but its kernels ignore it: not the same update"
        return None

    return Impl("bnb", build, refuses=refuses)


FUSED_BACKENDS = ("cpu", "cuda", "triton", "reference")
ALL_IMPLS = tuple(f"fused-{b}" for b in FUSED_BACKENDS) + ("torch-forloop", "torch-foreach", "torch-compile", "bnb")


def why_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when implementation `name` can step `dtype` params on `device` here."""
    if name.startswith("fused-"):
        backend = name[len("fused-"):]
        if backend == "triton" and device.type == "cpu":
            return "Triton runs on CPU tensors only in its interpreter, a correctness aid, not a backend to time"
        return rmsprop_fused.unavailable_reason(backend, device, dtype)
    if name == "bnb":
        try:
            importlib.import_module("bitsandbytes")
        except Exception as e:  # ImportError, or a broken install failing at import
            return f"bitsandbytes is not importable ({type(e).__name__}: {e})".replace("\n", " ")
    return None


def make_impl(name: str, compile_max_tensors: Optional[int] = None) -> Impl:
    if name.startswith("fused-"):
        return _fused(name[len("fused-"):])
    return {"torch-forloop": lambda: _torch(False), "torch-foreach": lambda: _torch(True),
            "torch-compile": lambda: _torch_compiled(compile_max_tensors), "bnb": _bitsandbytes}[name]()


def torch_default_impl(params: Sequence[torch.Tensor]) -> str:
    """What torch.optim.RMSprop(foreach=None) runs for these params: the for-loop on CPU tensors,
    foreach on CUDA tensors. Asked of torch itself where it can tell."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        _, foreach = _default_to_fused_or_foreach(list(params), differentiable=False, use_fused=False)
    except Exception:  # a private helper: fall back to its documented rule
        foreach = params[0].is_cuda
    return "torch-foreach" if foreach else "torch-forloop"


# ----------------------------------------------------------------------------- running cases


@dataclass
class Measurement:
    list_name: str
    n_tensors: int
    numel: int
    dtype: str
    options: str
    impl: str
    bytes_per_element: int
    default_impl: str
    warmup_s: List[float] = field(default_factory=list)
    times_s: List[float] = field(default_factory=list)
    skipped: Optional[str] = None
    interleaved: bool = False  # timed in rounds with the case's other implementations
    page_faults: List[int] = field(default_factory=list)  # minor faults of each timed step (CPU)

    @property
    def min_bytes(self) -> int:
        return self.numel * self.bytes_per_element


def make_params(plist: ParamList, dtype: torch.dtype, device: torch.device, seed: int = 0) -> List[torch.Tensor]:
    """Leaf params with fixed random grads. The grads stay the same for every step; each
    optimizer starts from zero state and takes a few dozen steps, so the state stays far from
    the subnormal range (which would slow a CPU down) and from NaN."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in plist.shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device).to(dtype))
        p.grad = torch.randn(shape, generator=gen, device=device).to(dtype)
        params.append(p)
    return params


def memory_for_case(plist: ParamList, dtype: torch.dtype, options: OptionSet, n_impls: int) -> int:
    """Bytes a case needs with `n_impls` optimizers alive at once: params and grads, each
    optimizer's state (square_avg, grad_avg, momentum_buffer as the options need), and room for
    the temporaries of the one step running at a time (torch's foreach path holds a few
    list-sized intermediates; counted as four in float32, the compute type of 16-bit params)."""
    tensor_bytes = plist.numel * dtype.itemsize
    state_tensors = 1 + int(options.centered) + int(options.momentum > 0)
    return tensor_bytes * (2 + n_impls * state_tensors) + 4 * plist.numel * 4


def available_memory(device: torch.device) -> int:
    """Free memory on the device now: the GPU's free memory, or the kernel's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30  # unknown: assume a small machine


def run_list(
    plist: ParamList,
    dtype_name: str,
    option_sets: Sequence[OptionSet],
    impl_names: Sequence[str],
    device: torch.device,
    plan: TimingPlan,
    *,
    seed: int = 0,
    compile_max_tensors: Optional[int] = None,
    memory_budget: Optional[int] = None,
    progress=None,
    on_case_done: Callable[[List[Measurement]], None] = lambda case: None,
) -> List[Measurement]:
    """Every option set x implementation on one list in one dtype; params and grads are made once.

    Each implementation builds its own optimizer (its own state) and is warmed up. Then, when the
    contenders' optimizers fit in `memory_budget` bytes together, they are timed in interleaved
    rounds, one step each per round in a rotating order, so that a burst of load from another
    process on a shared machine slows every implementation alike and leaves their ratios
    intact; otherwise (2^28 elements with momentum on a small machine, say) one after the other.
    The reference backend is timed alone, last (Impl.alone). A case's optimizers are all freed
    before the next case starts."""
    dtype = DTYPES[dtype_name]
    timer = timer_for(device)
    count_faults = device.type == "cpu" and minor_page_faults() is not None
    params = make_params(plist, dtype, device, seed)
    default_impl = torch_default_impl(params)
    budget = memory_budget if memory_budget is not None else available_memory(device) // 2
    impls = sorted((make_impl(name, compile_max_tensors) for name in impl_names), key=lambda impl: impl.alone)
    results: List[Measurement] = []
    for options in option_sets:
        contenders = sum(not impl.alone for impl in impls)
        interleave = memory_for_case(plist, dtype, options, contenders) <= budget
        case: List[Measurement] = []
        live: List[Tuple[Impl, Measurement, StepFn]] = []

        def fail(m: Measurement, e: Exception) -> None:  # out of memory, a backend refusing this input: report, go on
            m.skipped = f"failed: {type(e).__name__}: {e}".replace("\n", " ")[:300]

        def time_interleaved() -> None:
            if progress is not None:
                progress.set_description_str(f"{plist.name} {dtype_name} {options.name}: {len(live)} interleaved")
            began, rounds = time.perf_counter(), 0
            while rounds < plan.max_repeats and (rounds < plan.repeats or time.perf_counter() - began < plan.min_time * len(live)):
                for k in range(len(live)):
                    _, m, step = live[(rounds + k) % len(live)]
                    if m.skipped is None:
                        try:
                            m.times_s.append(timed_step(step, timer, m.page_faults if count_faults else None))
                        except Exception as e:
                            fail(m, e)
                rounds += 1
            for impl, _, _ in live:
                impl.cleanup()
            if progress is not None:
                progress.update(len(live))
            live.clear()
            free_memory(device)

        for impl in impls:
            if impl.alone and live:  # the contenders are done with before the oracle allocates
                time_interleaved()
            if progress is not None:
                progress.set_description_str(f"{plist.name} {dtype_name} {options.name} {impl.name}")
            m = Measurement(
                plist.name, plist.n_tensors, plist.numel, dtype_name, options.name, impl.name,
                min_bytes_per_element(dtype, options.centered, options.momentum), default_impl,
            )
            case.append(m)
            m.interleaved = interleave and not impl.alone
            m.skipped = impl.refuses(plist, options)
            if m.skipped is None:
                step = None
                try:
                    step = impl.build(params, options)
                    if m.interleaved:
                        m.warmup_s = [timer(step) for _ in range(plan.warmup + impl.extra_warmup)]
                        live.append((impl, m, step))
                    else:
                        own_plan = dataclasses.replace(plan, repeats=min(plan.repeats, ORACLE_REPEATS), min_time=0.0) if impl.alone else plan
                        m.warmup_s, m.times_s = time_steps(step, timer, own_plan, impl.extra_warmup, m.page_faults if count_faults else None)
                except Exception as e:
                    fail(m, e)
                finally:
                    step = None
                    if not m.interleaved or m.skipped is not None:
                        impl.cleanup()
                        free_memory(device)
            if not (m.interleaved and m.skipped is None) and progress is not None:
                progress.update(1)
        if live:
            time_interleaved()
        results += case
        on_case_done(case)
    del params
    free_memory(device)
    return results


# ----------------------------------------------------------------------------- reporting


def summarise(m: Measurement, case: Sequence[Measurement], bandwidth: dict) -> dict:
    """One measurement as a report row: its stats, effective GB/s, fraction of the copy (and
    in-place add) bandwidth, and speedups over torch's default path and over foreach, from the
    other measurements of the same case."""
    row = dataclasses.asdict(m)
    row["min_bytes"] = m.min_bytes
    if m.skipped is not None:
        return row
    row.update(step_stats(m.times_s))
    row["page_faults_per_step"] = int(statistics.median(m.page_faults)) if m.page_faults else None
    gbps = effective_gbps(m.min_bytes, row["median_s"])
    row["gbps"] = gbps
    row["fraction_of_copy"] = gbps / bandwidth["copy_gbps"]
    row["fraction_of_inplace_add"] = gbps / bandwidth["inplace_add_gbps"]
    for key, other_name in (("speedup_vs_default", m.default_impl), ("speedup_vs_foreach", "torch-foreach")):
        other = next((o for o in case if o.impl == other_name and o.skipped is None), None)
        row[key] = statistics.median(other.times_s) / row["median_s"] if other is not None else None
        row[key + "_paired"] = paired_speedup(other, m) if other is not None else None
    return row


def paired_speedup(baseline: Measurement, m: Measurement) -> Optional[float]:
    """The median over rounds of baseline time / m's time in the same round, for interleaved
    measurements (None otherwise). Two steps of one round ran seconds apart at most, under much
    the same load, so this ratio is steadier than the ratio of medians on a busy machine."""
    if not (baseline.interleaved and m.interleaved):
        return None
    rounds = min(len(baseline.times_s), len(m.times_s))
    return statistics.median(b / t for b, t in zip(baseline.times_s[:rounds], m.times_s[:rounds])) if rounds else None


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds * 1e3 < 100 else f"{seconds * 1e3:.0f}"


COLUMNS = (f"{'list':<11}{'dtype':<6}{'options':<19}{'implementation':<16}{'median ms':>10}  {'IQR ms':<15}{'GB/s':>7}"
           f"{'of copy':>9}{'x default':>10}{'faults/step':>12}")


def format_row(row: dict) -> str:
    head = f"{row['list_name']:<11}{row['dtype']:<6}{row['options']:<19}{row['impl']:<16}"
    if row.get("skipped") is not None:
        return head + f"  skipped: {row['skipped']}"
    speedup = row.get("speedup_vs_default")
    return head + (
        f"{_ms(row['median_s']):>10}  {_ms(row['q1_s']) + '-' + _ms(row['q3_s']):<15}"
        f"{row['gbps']:>7.1f}{row['fraction_of_copy']:>8.0%} {'' if speedup is None else f'{speedup:.2f}x':>10}"
        f"{'' if row.get('page_faults_per_step') is None else row['page_faults_per_step']:>12}"
    )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def slug(text: str) -> str:
    """A file-name-safe, lower-case version of a device name."""
    text = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|@.*$", " ", text)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_stem(device: torch.device) -> str:
    """cpu-<model>-<cores>c or cuda-<gpu name>: results from different machines never overwrite each other."""
    if device.type == "cuda":
        return "cuda-" + slug(device_name(device))
    return f"cpu-{slug(cpu_model())}-{os.cpu_count()}c"


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "bitsandbytes": _version("bitsandbytes"),
        "rmsprop_fused": rmsprop_fused.__version__,
        # On a shared machine the load decides how far apart the implementations land: torch's
        # unfused paths open one parallel region per op, and every preempted thread stalls them.
        "load_average_1_5_15min": _load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_multiprocessors"] = props.multi_processor_count
    return env


def plot(rows: Sequence[dict], bandwidths: Dict[str, dict], env: dict, path: str) -> None:
    """GB/s by case and implementation, one panel per parameter list, the copy and in-place add
    bandwidths of the same run as horizontal lines; whiskers span the IQR of the step time, and
    each bar is labelled with its median step time (the GB/s compare lists, the times do not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lists = list(dict.fromkeys(r["list_name"] for r in rows))
    impls = [i for i in ALL_IMPLS if any(r["impl"] == i and r.get("gbps") for r in rows)]
    colours = dict(zip(ALL_IMPLS, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(len(lists), 1, figsize=(max(8.0, 1.6 + 1.9 * _max_cases(rows)), 0.6 + 3.3 * len(lists)),
                             squeeze=False, layout="constrained")  # constrained: room for the suptitle and the legends
    width = 0.8 / max(1, len(impls))
    for ax, list_name in zip(axes[:, 0], lists):
        list_rows = [r for r in rows if r["list_name"] == list_name]
        cases = list(dict.fromkeys((r["dtype"], r["options"]) for r in list_rows))
        for j, impl in enumerate(impls):
            xs, ys, lo, hi, times = [], [], [], [], []
            for i, case in enumerate(cases):
                r = next((r for r in list_rows if (r["dtype"], r["options"]) == case and r["impl"] == impl and r.get("gbps")), None)
                if r is None:
                    continue
                xs.append(i - 0.4 + (j + 0.5) * width)
                ys.append(r["gbps"])
                lo.append(r["gbps"] - effective_gbps(r["min_bytes"], r["q3_s"]))
                hi.append(effective_gbps(r["min_bytes"], r["q1_s"]) - r["gbps"])
                times.append(r["median_s"])
            if xs:  # an implementation that sat out this whole list gets no legend entry here
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=impl, color=colours[impl])
                for x, y, h, t in zip(xs, ys, hi, times):
                    ax.text(x, y + h, f" {_ms(t)} ms", rotation=90, ha="center", va="bottom", fontsize=6)
        bw = bandwidths[list_name]
        ax.axhline(bw["copy_gbps"], color="black", linestyle="--", linewidth=1, label=f"copy_ {bw['copy_gbps']:.0f} GB/s")
        ax.axhline(bw["inplace_add_gbps"], color="grey", linestyle=":", linewidth=1, label=f"in-place add_ {bw['inplace_add_gbps']:.0f} GB/s")
        ax.set_xticks(range(len(cases)), [f"{d}\n{o}" for d, o in cases])
        first = list_rows[0]
        tensors = f"{first['n_tensors']} tensor" + ("s" if first["n_tensors"] != 1 else "")
        ax.set_title(f"{list_name}: {tensors}, {first['numel'] / 1e6:.1f}M elements", fontsize=10)
        ax.set_ylabel("effective GB/s\n(higher is better)")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.2)  # room for the labels of the tallest bars
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(
        f"RMSprop step on {env['device_name']} ({_threads(env)}), torch {env['torch']}, {env['date'][:10]}\n"
        f"load average at the start {env['load_average_1_5_15min']}; bars: minimum bytes of a fused pass / median step time\n"
        "whiskers: interquartile range of the step time; labels: median step time",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _threads(env: dict) -> str:
    return f"{env['torch_threads']} thread" + ("s" if env["torch_threads"] != 1 else "")


def _max_cases(rows: Sequence[dict]) -> int:
    per_list: Dict[str, set] = {}
    for r in rows:
        per_list.setdefault(r["list_name"], set()).add((r["dtype"], r["options"]))
    return max((len(c) for c in per_list.values()), default=1)


class SimpleProgress:
    """A stand-in for tqdm: one status line on stderr, redrawn in place on a terminal."""

    def __init__(self, total: int):
        self.total, self.done, self.label = total, 0, ""
        self.began = time.perf_counter()
        self.live = sys.stderr.isatty()

    def _draw(self) -> None:
        if self.live:
            filled = int(20 * self.done / max(1, self.total))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} "
                             f"{time.perf_counter() - self.began:.0f}s {self.label}\x1b[K")
            sys.stderr.flush()

    def set_description_str(self, label: str) -> None:
        self.label = label
        self._draw()

    def update(self, n: int = 1) -> None:
        self.done += n
        self._draw()

    def write(self, text: str) -> None:
        if self.live:
            sys.stderr.write("\r\x1b[K")
        print(text, flush=True)
        self._draw()

    def close(self) -> None:
        if self.live:
            sys.stderr.write("\n")


def progress_bar(total: int):
    """A bar on stderr while stderr is a terminal, none otherwise: the table rows go to stdout, and
    a log that captures both (`> log 2>&1`) then holds the table alone."""
    try:
        from tqdm import tqdm
    except ImportError:
        return SimpleProgress(total)
    return tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr, disable=None)  # None: off unless a TTY


# ----------------------------------------------------------------------------- command line

# Quick mode: the cases that decide whether the fused CPU step pays off, on the two regimes that
# matter (a real model, and many small tensors), with the slow-to-compile and oracle paths left out.
QUICK_CASES = (("gpt2", "fp32", ("plain", "centered+momentum")), ("many-small", "fp32", ("plain",)))
QUICK_PLAN = TimingPlan(warmup=1, repeats=5, min_time=0.0, max_repeats=5)
FULL_PLAN = TimingPlan()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="GPT-2 fp32 plain and centered+momentum, many-small fp32 plain; 5 steps each; no torch.compile, no reference backend")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the params live (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="directory for the JSON and PNG (default: bench/out; "
                        "bench/results holds the committed runs, add one with --out bench/results)")
    parser.add_argument("--lists", help=f"comma-separated, from {', '.join(LISTS)} (default: all)")
    parser.add_argument("--options", help=f"comma-separated, from {', '.join(OPTION_SETS)} (default: all)")
    parser.add_argument("--dtypes", help=f"comma-separated, from {', '.join(DTYPES)} (default: fp32,bf16)")
    parser.add_argument("--impls", help=f"comma-separated, from {', '.join(ALL_IMPLS)} (default: all available)")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (its compilation takes minutes on a small CPU)")
    parser.add_argument("--compile-max-tensors", type=int, help="leave torch.compile out of lists with more tensors "
                        "(default: 500 on CPU, where Inductor takes many minutes over the 2000-tensor list; none on CUDA)")
    parser.add_argument("--repeats", type=int, help="minimum timed steps per case")
    parser.add_argument("--min-time", type=float, help="keep timing a case until this many seconds were spent")
    parser.add_argument("--bandwidth-log2-numel", type=int, default=28, help="size of the copy-bandwidth tensor (default 2^28 fp32 = 1 GiB)")
    parser.add_argument("--memory-budget-gib", type=float, help="interleave a case's implementations when all their "
                        "optimizers fit in this much memory together (default: half the memory available at the start)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the run (default: torch's, one per core). "
                        "With 1 no step waits at a parallel region's barrier for a thread that another process preempted")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random params and grads (default 0)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def _pick(text: Optional[str], known: Iterable[str], what: str) -> Optional[List[str]]:
    if text is None:
        return None
    picked = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in picked if t not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(known)})")
    return picked


def plan_cases(args) -> List[Tuple[str, str, Tuple[str, ...]]]:
    """(list, dtype, option sets) to run, in order. Any explicit --lists/--options/--dtypes makes
    the cross product of those (with the defaults for the rest), in quick mode too."""
    lists = _pick(args.lists, LISTS, "lists")
    options = _pick(args.options, OPTION_SETS, "option sets")
    dtypes = _pick(args.dtypes, DTYPES, "dtypes")
    if args.quick and lists is None and options is None and dtypes is None:
        return [(l, d, tuple(o)) for l, d, o in QUICK_CASES]
    return [(l, d, tuple(options or OPTION_SETS)) for l in (lists or LISTS) for d in (dtypes or ("fp32", "bf16"))]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    base = QUICK_PLAN if args.quick else FULL_PLAN
    plan = dataclasses.replace(
        base,
        repeats=args.repeats or base.repeats,
        max_repeats=max(args.repeats or 0, base.max_repeats),
        min_time=base.min_time if args.min_time is None else args.min_time,
    )
    cases = plan_cases(args)
    memory_budget = available_memory(device) // 2 if args.memory_budget_gib is None else int(args.memory_budget_gib * 2**30)
    compile_max_tensors = args.compile_max_tensors
    if compile_max_tensors is None and device.type == "cpu":
        compile_max_tensors = 500
    wanted = _pick(args.impls, ALL_IMPLS, "implementations") or [
        i for i in ALL_IMPLS
        if not (i == "torch-compile" and (args.quick or args.no_compile)) and not (i == "fused-reference" and args.quick)
    ]
    env = environment(device)
    print(f"{env['device_name']} ({device}, {_threads(env)}), torch {env['torch']}, "
          f"triton {env['triton']}, rmsprop_fused {env['rmsprop_fused']}, {env['date']}, "
          f"load average {env['load_average_1_5_15min']}")

    # What cannot run here is said once per dtype, not in every case.
    impls_by_dtype: Dict[str, List[str]] = {}
    unavailable: Dict[str, str] = {}
    for dtype_name in dict.fromkeys(d for _, d, _ in cases):
        impls_by_dtype[dtype_name] = []
        for name in wanted:
            reason = why_unavailable(name, device, DTYPES[dtype_name])
            if reason is None:
                impls_by_dtype[dtype_name].append(name)
            else:
                unavailable[f"{name} ({dtype_name})"] = reason
                print(f"  skipping {name} for {dtype_name}: {reason}")

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, device_stem(device) + (f"-{args.threads}thread" if args.threads else "") + ("-quick" if args.quick else ""))
    rows: List[dict] = []
    bandwidths: Dict[str, dict] = {}
    began = time.perf_counter()

    def save(finished: bool) -> None:
        """The JSON is rewritten after every case, so a run that dies (killed for memory, say)
        keeps what it measured."""
        report = {
            "environment": env,
            "finished": finished,
            "byte_model": "minimum bytes per element of one fused pass (docs/DESIGN.md section 4); gbps = min_bytes / median_s",
            "timing": dataclasses.asdict(plan) | {
                "timer": "torch.cuda.Event" if device.type == "cuda" else "time.perf_counter",
                "memory_budget_bytes": memory_budget,
                "interleaving": "a case's implementations take turns, one step each per round, when their optimizers fit in the budget together",
            },
            "bandwidth": bandwidths,
            "unavailable": unavailable,
            "elapsed_s": time.perf_counter() - began,
            "load_average_now": _load_average(),
            "results": rows,
        }
        with open(stem + ".json.partial", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(stem + ".json.partial", stem + ".json")

    bar = progress_bar(sum(len(o) * len(impls_by_dtype[d]) for _, d, o in cases))
    bar.write(COLUMNS)
    try:
        for list_name, dtype_name, option_names in cases:
            plist = LISTS[list_name]()
            if list_name not in bandwidths:
                # Measured just before the list's cases, so each fraction compares against the
                # machine as it was then (a shared machine's bandwidth drifts with its load).
                bar.set_description_str(f"copy bandwidth before {list_name}")
                bandwidths[list_name] = measure_bandwidth(device, 2**args.bandwidth_log2_numel, plan)

            def report(case, bandwidth=bandwidths[list_name]):
                for m in case:
                    rows.append(summarise(m, case, bandwidth))
                    bar.write(format_row(rows[-1]))
                save(finished=False)

            run_list(plist, dtype_name, [OPTION_SETS[o] for o in option_names], impls_by_dtype[dtype_name],
                     device, plan, seed=args.seed, compile_max_tensors=compile_max_tensors, memory_budget=memory_budget,
                     progress=bar, on_case_done=report)
    finally:
        bar.close()
    save(finished=True)
    elapsed = time.perf_counter() - began

    for list_name, bw in bandwidths.items():
        print(f"bandwidth before {list_name}: copy_ {bw['copy_gbps']:.1f} GB/s, in-place add_ {bw['inplace_add_gbps']:.1f} GB/s")
    fused = "fused-cuda" if device.type == "cuda" else "fused-cpu"
    for r in rows:
        if r["impl"] == fused and r.get("speedup_vs_default") is not None:
            vs_foreach = r.get("speedup_vs_foreach")
            paired = r.get("speedup_vs_default_paired")
            print(f"{fused} on {r['list_name']} {r['dtype']} {r['options']}: {r['speedup_vs_default']:.2f}x {r['default_impl']}"
                  + (f" (round by round {paired:.2f}x)" if paired else "")
                  + (f", {vs_foreach:.2f}x torch-foreach" if vs_foreach else "")
                  + f", {r['gbps']:.1f} GB/s = {r['fraction_of_copy']:.0%} of copy_, {r['fraction_of_inplace_add']:.0%} of in-place add_")
    if rows:
        plot(rows, bandwidths, env, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
