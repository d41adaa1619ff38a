"""Times `optimizer.step()` of FusedRMSprop's backends against torch.optim.RMSprop.

    python bench/bench_step.py --quick          # about a minute on an idle 2-core CPU, minutes under load
    python bench/bench_step.py                  # every list x option set x dtype, every state dtype
    python bench/bench_step.py --device cuda    # the same on a GPU

For every case (parameter list x option set x dtype) it times each available implementation:
FusedRMSprop with each of its backends (those that cannot run here are skipped, saying why), with
its state in the param's dtype and, as `fused-<backend>:<state>`, in bfloat16, float32 or 8 bits;
the roofline of the case (bench/roofline.py: an in-place pass over the same streams with no
arithmetic, `roofline` and `roofline:<state>`); torch.optim.RMSprop with foreach=True and
foreach=False (the for-loop path, torch's CPU default); torch.optim.RMSprop.step under
torch.compile; and bitsandbytes' RMSprop, 32-bit (`bnb`) and 8-bit (`bnb:8bit`), when it is
installed. The option sets with `+clip` clip the grads to a total norm of 1 in every step:
FusedRMSprop(max_grad_norm=1) against torch.nn.utils.clip_grad_norm_ followed by FusedRMSprop
(`clip+fused-<backend>`) or by torch's RMSprop.

An RMSprop step is memory-bound, so every time is also reported as an effective bandwidth: the
minimum bytes a single fused pass must move (bench/byte_model.py, docs/DESIGN.md section 4: 20, 28
or 36 bytes per fp32 element with fp32 state, less with smaller state, 4 more with clipping)
divided by the median step time, as a fraction of the copy bandwidth measured in the same run just
before the list's cases, and as a fraction of the roofline's. On a GPU, also as a fraction of the
GPU's rated bandwidth, and with the kernel time (the profiler's sum of the step's kernels) beside
the step time. Ratios between implementations come from one run on one machine; absolute numbers
from a shared machine are only as good as its load was quiet.

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
    import byte_model
    import roofline
    from param_lists import LISTS, ParamList
except ImportError:  # pragma: no cover
    from bench import byte_model, roofline
    from bench.param_lists import LISTS, ParamList

OptionSet, min_bytes_per_element, tensors_touched = (  # the byte model's API, here too
    byte_model.OptionSet, byte_model.min_bytes_per_element, byte_model.tensors_touched)

HERE = os.path.dirname(os.path.abspath(__file__))
LR = 1e-3  # any value does: it does not change the work a step does
MAX_NORM = 1.0  # the clip option sets' total norm: far under the random grads' (about sqrt(numel)), so every step clips

OPTION_SETS: Dict[str, OptionSet] = {
    o.name: o
    for o in (
        OptionSet("plain"),
        OptionSet("momentum", momentum=0.9),
        OptionSet("centered+momentum", centered=True, momentum=0.9),
        OptionSet("plain+clip", clip=True),
        OptionSet("centered+momentum+clip", centered=True, momentum=0.9, clip=True),
    )
}
BASE_OPTIONS = ("plain", "momentum", "centered+momentum")
CLIP_OPTIONS = ("plain+clip", "centered+momentum+clip")

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# Vendor datasheet memory bandwidths, in GB/s, by what torch.cuda.get_device_name contains (the
# first match wins, so the more specific names come first). A GPU not listed has no rated figure.
RATED_BANDWIDTH_GBPS: Tuple[Tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM5 (torch names it "NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # the 40 GB parts
)


def rated_bandwidth_gbps(gpu_name: str) -> Optional[float]:
    return next((gbps for key, gbps in RATED_BANDWIDTH_GBPS if key in gpu_name), None)


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


def interquartile(values: Sequence[float], digits: int = 3) -> str:
    """"q1-q3" of values (step_stats' quartiles), for the paired-ratio scripts."""
    stats = step_stats(values)
    return f"{stats['q1_s']:.{digits}f}-{stats['q3_s']:.{digits}f}"


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
    than `max_repeats`. On a GPU, `kernel_steps` more steps of each implementation run under the
    profiler for the kernel time (0: none). `max_time` (None: no cap) stops timing an
    implementation once its timed steps add up to that many seconds, after at least
    `capped_repeats` of them: it keeps the quick run short on a loaded machine, where torch's
    unfused paths can take seconds a step."""

    warmup: int = 2
    repeats: int = 7
    min_time: float = 1.0
    max_repeats: int = 30
    kernel_steps: int = 3
    max_time: Optional[float] = None
    capped_repeats: int = 2

    def capped(self, times: Sequence[float]) -> bool:
        return self.max_time is not None and len(times) >= self.capped_repeats and sum(times) >= self.max_time


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


def timed_step(step: Callable[[], object], timer, faults: Optional[List[int]] = None,
               walls: Optional[List[float]] = None) -> float:
    """One timed call; its minor page faults are appended to `faults` and its wall time (host
    clock, from the call to the end of its work: cuda_timer synchronises) to `walls` when given."""
    before = minor_page_faults() if faults is not None else None
    began = time.perf_counter()
    seconds = timer(step)
    if walls is not None:
        walls.append(time.perf_counter() - began)
    if before is not None:
        faults.append(minor_page_faults() - before)
    return seconds


def time_steps(step: Callable[[], object], timer, plan: TimingPlan, extra_warmup: int = 0,
               faults: Optional[List[int]] = None, walls: Optional[List[float]] = None) -> Tuple[List[float], List[float]]:
    """(warm-up times, timed step times), in seconds."""
    warmup = [timer(step) for _ in range(plan.warmup + extra_warmup)]
    times: List[float] = []
    began = time.perf_counter()
    while len(times) < plan.max_repeats and (len(times) < plan.repeats or time.perf_counter() - began < plan.min_time) \
            and not plan.capped(times):
        times.append(timed_step(step, timer, faults, walls))
    return warmup, times


def kernel_seconds(step: Callable[[], object], steps: int) -> Tuple[Optional[float], Optional[str]]:
    """(GPU time of the kernels of one step, None) from the profiler over `steps` steps, or
    (None, why not). The kernels' durations are summed: the step's GPU work without the gaps
    between launches, which a step's wall time (and a CUDA event pair around it) includes."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        device_us = [e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA]
        if not device_us:
            return None, "the profiler recorded no GPU activity"
        return sum(device_us) / steps / 1e6, None
    except Exception as e:  # a profiler that cannot start here must not cost the step times
        return None, f"profiler: {type(e).__name__}: {e}".replace("\n", " ")[:200]


def measure_bandwidth(device: torch.device, numel: int, plan: TimingPlan) -> dict:
    """The memory bandwidth this run can expect, from two streaming ops on `numel` fp32 elements
    (far larger than any cache):

    copy     dst.copy_(src): 8 bytes/element counted (read src, write dst). On a CPU the write
             also reads dst into the cache first (write-allocate), which this count leaves out.
    inplace  dst.add_(src): 12 bytes/element (read both, write dst in place). An optimizer step
             updates in place too and pays no write-allocate, so on a CPU this is the closer
             ceiling, and a fused step can show more than 100% of the copy bandwidth.

    On a GPU the datasheet figure is added as `rated_gbps` (RATED_BANDWIDTH_GBPS) where known.
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
    if device.type == "cuda":
        result["rated_gbps"] = rated_bandwidth_gbps(torch.cuda.get_device_name(device))
    del src, dst, ops, op
    free_memory(device)
    return result


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- implementations


class Step:
    """A step to time: `fn`, after `before` (clip_grad_norm_ for the clip cases of implementations
    that do not clip themselves); `optimizer` (whose state it is) or `state_tensors` (the
    roofline's) are what its state bytes are measured from."""

    def __init__(self, fn: Callable[[], object], before: Optional[Callable[[], object]] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None, state_tensors: Sequence[torch.Tensor] = ()):
        self.fn, self.before, self.optimizer, self.state_tensors = fn, before, optimizer, list(state_tensors)

    def __call__(self) -> None:
        if self.before is not None:
            self.before()
        self.fn()

    def state_bytes(self) -> Optional[int]:
        """Bytes of the optimizer's state tensors (each storage once: bitsandbytes shares its code
        map), the step counters left out."""
        tensors = list(self.state_tensors)
        if self.optimizer is not None:
            tensors += [t for state in self.optimizer.state.values() for key, t in state.items()
                        if isinstance(t, torch.Tensor) and key != "step"]
        if not tensors:
            return None
        storages = {}
        for t in tensors:
            storages[(t.device, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
        return sum(storages.values())


StepFn = Callable[[], object]


@dataclass(frozen=True)
class Impl:
    """One way to take a step. `build` makes an optimizer over the given params (their .grad
    set) and returns its step; dropping that function frees the optimizer and its state.
    `state_format` is how it keeps its state (byte_model.STATE_FORMATS), which sets its bytes."""

    name: str
    build: Callable[[List[torch.Tensor], OptionSet], StepFn]
    state_format: str = "param"
    extra_warmup: int = 0
    refuses: Callable[[ParamList, OptionSet], Optional[str]] = lambda plist, options: None  # why it sits a case out
    applies: Callable[[OptionSet], bool] = lambda options: not options.clip  # whether it belongs in the case at all
    cleanup: Callable[[], None] = lambda: None
    # Timed by itself after the case's contenders, with at most ORACLE_REPEATS steps: the
    # reference backend is the correctness oracle, slow and memory-hungry (a float32 temporary
    # per op), and is timed to show what fusing buys, not to be compared round by round.
    alone: bool = False
    after_warmup: Callable[[float], None] = lambda seconds: None  # told the warm-up's seconds


ORACLE_REPEATS = 3
FUSED_BACKENDS = ("cpu", "cuda", "triton", "reference")
LOW_PRECISION_STATES = ("8bit", "bf16", "fp32")  # the state dtypes of the `:<state>` variants


def _suffix(state_format: str) -> str:
    return "" if state_format == "param" else f":{state_format}"


def parse_impl(name: str) -> Tuple[str, str]:
    """("fused-cpu", "8bit") for "fused-cpu:8bit"; ("torch-foreach", "param") for "torch-foreach"."""
    base, _, state_format = name.partition(":")
    return base, state_format or "param"


def _clipper(params: List[torch.Tensor]) -> Callable[[], object]:
    return functools.partial(torch.nn.utils.clip_grad_norm_, params, MAX_NORM)


def _fused(backend: str, state_format: str = "param", clip_apart: bool = False) -> Impl:
    """FusedRMSprop on `backend`: it clips inside the step in the clip cases, or, with
    `clip_apart`, after torch.nn.utils.clip_grad_norm_ (clip+fused-<backend>)."""

    def build(params, options):
        kwargs = dict(lr=LR, backend=backend, state_dtype=byte_model.state_dtype_argument(state_format), **options.kwargs())
        if options.clip and not clip_apart:
            kwargs["max_grad_norm"] = MAX_NORM
        optimizer = FusedRMSprop(params, **kwargs)
        return Step(optimizer.step, before=_clipper(params) if clip_apart else None, optimizer=optimizer)

    return Impl(("clip+" if clip_apart else "") + f"fused-{backend}" + _suffix(state_format), build, state_format,
                extra_warmup=2 if backend == "triton" else 0,  # Triton autotunes at first
                applies=(lambda options: options.clip) if clip_apart else (lambda options: True),
                alone=backend == "reference")


def _torch(foreach: bool) -> Impl:
    def build(params, options):
        optimizer = torch.optim.RMSprop(params, lr=LR, foreach=foreach, **options.kwargs())
        return Step(optimizer.step, before=_clipper(params) if options.clip else None, optimizer=optimizer)

    return Impl("torch-foreach" if foreach else "torch-forloop", build, applies=lambda options: True)


def _torch_compiled(max_tensors: Optional[int] = None, budget_s: Optional[float] = None) -> Impl:
    """The documented pattern (PyTorch's "Compiling the optimizer with torch.compile" recipe):
    torch's default path for the params, traced and compiled by Inductor. Lists of more than
    `max_tensors` tensors are left out: Inductor's compile time grows with the tensor count, and
    a 2000-tensor step takes well over five minutes to compile on a 2-core CPU. Once the warm-ups
    (where it compiles) have taken `budget_s` seconds in all, the remaining cases leave it out."""
    spent = {"s": 0.0}

    def build(params, options):
        # A fresh cache per case: each new optimizer object would otherwise add a recompilation,
        # and past dynamo's recompile limit the step silently runs eagerly.
        torch._dynamo.reset()
        optimizer = torch.optim.RMSprop(params, lr=LR, **options.kwargs())

        @torch.compile(fullgraph=False)
        def step():
            optimizer.step()

        return Step(step, optimizer=optimizer)

    def refuses(plist, options):
        if max_tensors is not None and plist.n_tensors > max_tensors:
            return f"compiling a {plist.n_tensors}-tensor step takes many minutes here (--compile-max-tensors {max_tensors})"
        if budget_s is not None and spent["s"] >= budget_s:
            return f"the compile budget is spent ({spent['s']:.0f} s of warm-ups, --compile-budget-s {budget_s:g})"
        return None

    def after_warmup(seconds):
        spent["s"] += seconds

    # The first call compiles; the second may recompile once the step counters exist.
    return Impl("torch-compile", build, extra_warmup=2, refuses=refuses, cleanup=torch._dynamo.reset, after_warmup=after_warmup)


def _bitsandbytes(bits: int = 32) -> Impl:
    """bitsandbytes' RMSprop: 32-bit state (float32 whatever the params), or 8-bit blockwise
    state with its defaults (blocks of 256, tensors under 4,096 elements in 32 bits), as
    FusedRMSprop's "8bit" keeps it."""

    def build(params, options):
        import bitsandbytes as bnb

        optimizer = bnb.optim.RMSprop(params, lr=LR, optim_bits=bits, **options.kwargs())
        return Step(optimizer.step, optimizer=optimizer)

    def refuses(plist, options):
        if options.centered:
            return "bitsandbytes' RMSprop refuses centered=True"
        if options.momentum > 0:
            return "bitsandbytes' RMSprop accepts momentum but its kernels ignore it: not the same update"
        return None

    return Impl("bnb" if bits == 32 else "bnb:8bit", build, "fp32" if bits == 32 else "8bit", refuses=refuses)


def _roofline(state_format: str = "param") -> Impl:
    def build(params, options):
        step, state_tensors = roofline.build(params, options, state_format)
        return Step(step, state_tensors=state_tensors)

    return Impl("roofline" + _suffix(state_format), build, state_format)


ALL_IMPLS = (
    tuple(f"fused-{b}" for b in FUSED_BACKENDS) + ("roofline", "torch-forloop", "torch-foreach", "torch-compile", "bnb")
    + tuple(f"clip+fused-{b}" for b in FUSED_BACKENDS[:3])
    + tuple(f"{base}:{s}" for s in LOW_PRECISION_STATES for base in ("fused-cpu", "fused-cuda", "fused-triton", "roofline"))
    + ("bnb:8bit",)
)


def why_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when implementation `name` can step `dtype` params on `device` here."""
    base, state_format = parse_impl(name)
    if not base.startswith("bnb"):
        reason = byte_model.why_format_does_not_apply(state_format, dtype)
        if reason is not None:
            return reason
    base = base[len("clip+"):] if base.startswith("clip+") else base
    if base.startswith("fused-"):
        backend = base[len("fused-"):]
        if backend == "triton" and device.type == "cpu":
            return "Triton runs on CPU tensors only in its interpreter, a correctness aid, not a backend to time"
        return rmsprop_fused.unavailable_reason(backend, device, dtype)
    if base == "roofline":
        return roofline.why_unavailable(device)
    if base == "bnb":
        try:
            importlib.import_module("bitsandbytes")
        except Exception as e:  # ImportError, or a broken install failing at import
            return f"bitsandbytes is not importable ({type(e).__name__}: {e})".replace("\n", " ")
    return None


def make_impl(name: str, compile_max_tensors: Optional[int] = None, compile_budget_s: Optional[float] = None) -> Impl:
    if name not in ALL_IMPLS:
        raise ValueError(f"unknown implementation {name!r}")
    base, state_format = parse_impl(name)
    if base.startswith("clip+fused-"):
        return _fused(base[len("clip+fused-"):], clip_apart=True)
    if base.startswith("fused-"):
        return _fused(base[len("fused-"):], state_format)
    if base == "roofline":
        return _roofline(state_format)
    if base == "bnb":
        return _bitsandbytes(8 if state_format == "8bit" else 32)
    return {"torch-forloop": lambda: _torch(False), "torch-foreach": lambda: _torch(True),
            "torch-compile": lambda: _torch_compiled(compile_max_tensors, compile_budget_s)}[name]()


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
    min_bytes: int  # byte_model.step_bytes for this implementation's state format
    default_impl: str
    state_format: str = "param"
    storage: str = ""  # byte_model.storage_name: what the roofline of the same streams is called by
    warmup_s: List[float] = field(default_factory=list)
    times_s: List[float] = field(default_factory=list)
    wall_s: List[float] = field(default_factory=list)  # host clock per timed step (GPU: with the final sync)
    kernel_s: Optional[float] = None  # GPU: the profiler's kernel time of one step
    kernel_note: Optional[str] = None  # why there is no kernel time
    state_bytes: Optional[int] = None  # the optimizer's state tensors after the timed steps
    skipped: Optional[str] = None
    interleaved: bool = False  # timed in rounds with the case's other implementations
    page_faults: List[int] = field(default_factory=list)  # minor faults of each timed step (CPU)


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


def memory_for_case(plist: ParamList, dtype: torch.dtype, options: OptionSet, state_formats: Sequence[str],
                    param_copies: int = 0) -> int:
    """Bytes a case needs with optimizers of these state formats alive at once: params and grads,
    each optimizer's state (byte_model.state_bytes), `param_copies` more list-sized tensors of the
    params' dtype (a GPU roofline's flat param and grad), and room for the temporaries of the one
    step running at a time (torch's foreach path holds a few list-sized intermediates; counted as
    four in float32, the compute type of 16-bit params)."""
    tensor_bytes = plist.numel * dtype.itemsize
    states = sum(byte_model.state_bytes(plist.shapes, dtype, options, f) for f in state_formats)
    return (2 + param_copies) * tensor_bytes + states + 4 * plist.numel * 4


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
    compile_budget_s: Optional[float] = None,
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
    The reference backend is timed alone, last (Impl.alone). On a GPU each implementation's
    kernel time is taken after its timed steps (TimingPlan.kernel_steps). A case's optimizers are
    all freed before the next case starts."""
    dtype = DTYPES[dtype_name]
    timer = timer_for(device)
    count_faults = device.type == "cpu" and minor_page_faults() is not None
    kernel_steps = plan.kernel_steps if device.type == "cuda" else 0
    params = make_params(plist, dtype, device, seed)
    default_impl = torch_default_impl(params)
    budget = memory_budget if memory_budget is not None else available_memory(device) // 2
    all_impls = sorted((make_impl(name, compile_max_tensors, compile_budget_s) for name in impl_names), key=lambda impl: impl.alone)
    results: List[Measurement] = []
    for options in option_sets:
        impls = [impl for impl in all_impls if impl.applies(options)]
        contenders = [impl for impl in impls if not impl.alone]
        flat_copies = 2 * sum(parse_impl(impl.name)[0] == "roofline" for impl in contenders) if device.type == "cuda" else 0
        interleave = memory_for_case(plist, dtype, options, [impl.state_format for impl in contenders], flat_copies) <= budget
        case: List[Measurement] = []
        live: List[Tuple[Impl, Measurement, Step]] = []

        def fail(m: Measurement, e: Exception) -> None:  # out of memory, a backend refusing this input: report, go on
            m.skipped = f"failed: {type(e).__name__}: {e}".replace("\n", " ")[:300]

        def finish(m: Measurement, step: Step) -> None:
            """After the timed steps: the state's size, and the kernel time on a GPU."""
            m.state_bytes = step.state_bytes()
            if kernel_steps and m.skipped is None:
                m.kernel_s, m.kernel_note = kernel_seconds(step, kernel_steps)

        def time_interleaved() -> None:
            if progress is not None:
                progress.set_description_str(f"{plist.name} {dtype_name} {options.name}: {len(live)} interleaved")
            began, rounds = time.perf_counter(), 0
            while rounds < plan.max_repeats and (rounds < plan.repeats or time.perf_counter() - began < plan.min_time * len(live)):
                for k in range(len(live)):
                    _, m, step = live[(rounds + k) % len(live)]
                    if m.skipped is None and not plan.capped(m.times_s):
                        try:
                            m.times_s.append(timed_step(step, timer, m.page_faults if count_faults else None, m.wall_s))
                        except Exception as e:
                            fail(m, e)
                rounds += 1
            for impl, m, step in live:
                if m.skipped is None:
                    finish(m, step)
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
                byte_model.step_bytes(plist.shapes, dtype, options, impl.state_format), default_impl,
                impl.state_format, byte_model.storage_name(impl.state_format, dtype),
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
                        impl.after_warmup(sum(m.warmup_s))
                        live.append((impl, m, step))
                    else:
                        own_plan = dataclasses.replace(plan, repeats=min(plan.repeats, ORACLE_REPEATS), min_time=0.0) if impl.alone else plan
                        m.warmup_s, m.times_s = time_steps(step, timer, own_plan, impl.extra_warmup,
                                                           m.page_faults if count_faults else None, m.wall_s)
                        impl.after_warmup(sum(m.warmup_s))
                        finish(m, step)
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
    """One measurement as a report row: its stats, effective GB/s, fractions of the copy (and
    in-place add, and on a GPU the rated) bandwidth and of the roofline of the same streams, its
    kernel time on a GPU, its state's bytes per param, and speedups over torch's default path,
    foreach, the compiled step and every other implementation of the same case."""
    row = dataclasses.asdict(m)
    row["bytes_per_element"] = m.min_bytes / m.numel if m.numel else None
    row["state_bytes_per_param"] = m.state_bytes / m.numel if m.state_bytes is not None and m.numel else None
    if m.skipped is not None:
        return row
    row.update(step_stats(m.times_s))
    row["wall_median_s"] = statistics.median(m.wall_s) if m.wall_s else None
    row["page_faults_per_step"] = int(statistics.median(m.page_faults)) if m.page_faults else None
    gbps = effective_gbps(m.min_bytes, row["median_s"])
    row["gbps"] = gbps
    row["fraction_of_copy"] = gbps / bandwidth["copy_gbps"]
    row["fraction_of_inplace_add"] = gbps / bandwidth["inplace_add_gbps"]
    rated = bandwidth.get("rated_gbps")
    row["fraction_of_rated"] = gbps / rated if rated else None
    if m.kernel_s:
        row["kernel_gbps"] = effective_gbps(m.min_bytes, m.kernel_s)
        row["kernel_fraction_of_copy"] = row["kernel_gbps"] / bandwidth["copy_gbps"]
        row["kernel_fraction_of_rated"] = row["kernel_gbps"] / rated if rated else None
    done = [o for o in case if o.skipped is None and o.times_s and o is not m]
    roof = next((o for o in done if parse_impl(o.impl)[0] == "roofline" and o.storage == m.storage), None)
    if roof is not None and parse_impl(m.impl)[0] != "roofline":
        roof_gbps = effective_gbps(roof.min_bytes, statistics.median(roof.times_s))
        row["roofline_impl"] = roof.impl
        row["fraction_of_roofline"] = gbps / roof_gbps
        row["fraction_of_roofline_paired"] = _paired(roof, m, lambda r, t: (m.min_bytes / t) / (roof.min_bytes / r))
    row["speedup_over"] = {o.impl: statistics.median(o.times_s) / row["median_s"] for o in done}
    for key, other_name in (("speedup_vs_default", m.default_impl), ("speedup_vs_foreach", "torch-foreach"),
                            ("speedup_vs_compile", "torch-compile")):
        other = m if m.impl == other_name else next((o for o in done if o.impl == other_name), None)
        row[key] = statistics.median(other.times_s) / row["median_s"] if other is not None else None
        row[key + "_paired"] = paired_speedup(other, m) if other is not None else None
    return row


def _paired(baseline: Measurement, m: Measurement, ratio: Callable[[float, float], float]) -> Optional[float]:
    """The median over rounds of ratio(baseline's time, m's time) in the same round, for
    interleaved measurements (None otherwise)."""
    if not (baseline.interleaved and m.interleaved):
        return None
    rounds = min(len(baseline.times_s), len(m.times_s))
    return statistics.median(ratio(b, t) for b, t in zip(baseline.times_s[:rounds], m.times_s[:rounds])) if rounds else None


def paired_speedup(baseline: Measurement, m: Measurement) -> Optional[float]:
    """The median over rounds of baseline time / m's time in the same round, for interleaved
    measurements (None otherwise). Two steps of one round ran seconds apart at most, under much
    the same load, so this ratio is steadier than the ratio of medians on a busy machine."""
    return _paired(baseline, m, lambda b, t: b / t)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds * 1e3 < 100 else f"{seconds * 1e3:.0f}"


COLUMNS = (f"{'list':<11}{'dtype':<6}{'options':<23}{'implementation':<19}{'median ms':>10}  {'IQR ms':<15}{'GB/s':>7}"
           f"{'of copy':>9}{'of roof':>9}{'x default':>10}{'kernel ms':>11}{'faults/step':>12}")


def _percent(value: Optional[float], width: int) -> str:
    return f"{'' if value is None else f'{value:.0%}':>{width}}"


def format_row(row: dict) -> str:
    head = f"{row['list_name']:<11}{row['dtype']:<6}{row['options']:<23}{row['impl']:<19}"
    if row.get("skipped") is not None:
        return head + f"  skipped: {row['skipped']}"
    speedup = row.get("speedup_vs_default")
    kernel = row.get("kernel_s")
    return head + (
        f"{_ms(row['median_s']):>10}  {_ms(row['q1_s']) + '-' + _ms(row['q3_s']):<15}"
        f"{row['gbps']:>7.1f}{_percent(row['fraction_of_copy'], 9)}{_percent(row.get('fraction_of_roofline'), 9)}"
        f"{'' if speedup is None else f'{speedup:.2f}x':>10}{'' if kernel is None else _ms(kernel):>11}"
        f"{'' if row.get('page_faults_per_step') is None else row['page_faults_per_step']:>12}"
    )


def state_bytes_table(lists: Sequence[ParamList], dtypes: Sequence[str], option_names: Sequence[str]) -> Dict[str, dict]:
    """Optimizer-state bytes per param, {list: {dtype: {option set: {state format: bytes}}}}, for
    every state format that applies (byte_model.state_bytes: 8-bit scales included, the step
    counters left out). bitsandbytes keeps its 32-bit state as fp32 and its 8-bit state as "8bit"."""
    table: Dict[str, dict] = {}
    for plist in lists:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for name in dict.fromkeys(o.replace("+clip", "") for o in option_names):
                formats = [f for f in byte_model.STATE_FORMATS if byte_model.why_format_does_not_apply(f, dtype) is None]
                table.setdefault(plist.name, {}).setdefault(dtype_name, {})[name] = {
                    f: byte_model.state_bytes(plist.shapes, dtype, OPTION_SETS[name], f) / plist.numel for f in formats}
    return table


def format_state_bytes(table: Dict[str, dict]) -> List[str]:
    lines = ["optimizer state, bytes per param (8-bit: 1 byte + a float32 scale per 256, tensors under 4,096 elements "
             "in float32; step counters left out):"]
    for list_name, by_dtype in table.items():
        for dtype_name, by_options in by_dtype.items():
            cells = [f"{name}: " + ", ".join(f"{'state ' + dtype_name if f == 'param' else f} {b:.3f}" for f, b in formats.items())
                     for name, formats in by_options.items()]
            lines.append(f"  {list_name:<11}{dtype_name:<6}" + "; ".join(cells))
    return lines


# ----------------------------------------------------------------------------- goals

# Issue #14: the fused step within 90% of the roofline of its own streams, for these cases.
ROOFLINE_GOAL = 0.9
ROOFLINE_GOAL_LISTS = ("gpt2", "resnet50")
ROOFLINE_GOAL_DTYPES = ("fp32", "bf16")


def goals(rows: Sequence[dict]) -> List[dict]:
    """The performance goals of issues #14 and #15 that this run measured, each with its value,
    its target, whether it is met and what it is measured on. On a GPU, bandwidth goals are read
    off the kernel time (the step time includes the Python side of the step, which a training
    loop overlaps with the GPU's work) and speedups off the step time."""
    out = []

    def goal(text: str, row: dict, value: Optional[float], target: float, basis: str) -> None:
        if value is not None:
            out.append({"goal": text, "case": f"{row['list_name']} {row['dtype']} {row['options']}", "impl": row["impl"],
                        "value": value, "target": target, "met": value >= target, "basis": basis})

    for r in rows:
        if r.get("skipped") is not None or r.get("gbps") is None:
            continue
        impl, case = r["impl"], (r["list_name"], r["dtype"])
        if impl in ("fused-cpu", "fused-cuda") and case[0] in ROOFLINE_GOAL_LISTS and case[1] in ROOFLINE_GOAL_DTYPES:
            goal(f"{impl} >= {ROOFLINE_GOAL:.0%} of the roofline", r, r.get("fraction_of_roofline"), ROOFLINE_GOAL, "step time")
        kernel_copy = r.get("kernel_fraction_of_copy")
        copy, copy_basis = (kernel_copy, "kernel time") if kernel_copy is not None else (r["fraction_of_copy"], "step time")
        if case == ("gpt2", "fp32") and impl == "fused-cuda":
            goal("fused-cuda >= 90% of the copy bandwidth", r, copy, 0.9, copy_basis)
            goal("fused-cuda >= 2.5x torch foreach", r, r.get("speedup_vs_foreach"), 2.5, "step time")
            goal("fused-cuda >= 1.0x the torch.compile'd step", r, r.get("speedup_vs_compile"), 1.0, "step time")
        if case == ("gpt2", "fp32") and impl == "fused-triton":
            goal("fused-triton >= 85% of the copy bandwidth", r, copy, 0.85, copy_basis)
        if case == ("many-small", "fp32") and impl == "fused-cuda":
            goal("fused-cuda >= 5x torch foreach on many small tensors", r, r.get("speedup_vs_foreach"), 5.0, "step time")
    return out


def format_goal(g: dict) -> str:
    value = f"{g['value']:.0%}" if "%" in g["goal"] else f"{g['value']:.2f}x"
    return f"{'met   ' if g['met'] else 'MISSED'} {g['goal']}: {g['case']}: {value} ({g['basis']})"


# ----------------------------------------------------------------------------- the machine


def _cpuinfo_field(name: str) -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_generation() -> Optional[str]:
    """"family 26, model 2, stepping 1" (/proc/cpuinfo): a virtual machine's model name ("AMD
    EPYC") need not say which generation it runs on."""
    fields = [(name, _cpuinfo_field(key)) for name, key in
              (("family", "cpu family"), ("model", "model"), ("stepping", "stepping"))]
    return ", ".join(f"{name} {value}" for name, value in fields if value) or None


def cpu_flags() -> List[str]:
    """The CPU's feature flags (/proc/cpuinfo), which decide the kernel's vector width."""
    return (_cpuinfo_field("flags") or "").split()


# GCC's x86-64 micro-architecture levels, as the CPU kernel's target_clones pick among them.
_X86_64_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave"}
_X86_64_V4 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def x86_64_level(flags: Iterable[str]) -> Optional[str]:
    """The clone of the CPU kernel this CPU runs: "x86-64-v4" (AVX-512), "x86-64-v3" (AVX2) or
    "default"; None off x86-64."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags = set(flags)
    return "x86-64-v4" if _X86_64_V4 <= flags else "x86-64-v3" if _X86_64_V3 <= flags else "default"


def cpu_caches() -> Dict[str, str]:
    """{"L1d": "48K", ...} for CPU 0, from sysfs (empty where it is missing)."""
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            path = os.path.join(base, index)
            try:
                level = open(os.path.join(path, "level")).read().strip()
                kind = open(os.path.join(path, "type")).read().strip()
                size = open(os.path.join(path, "size")).read().strip()
            except OSError:
                continue
            caches[f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")] = size
    except OSError:
        pass
    return caches


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


def _cpu_simd_loop() -> Optional[str]:
    """The CPU step's SIMD loop for 16-bit params ("avx512-bf16"), "" for none, None without the extension."""
    from rmsprop_fused import _extension

    return _extension._module.cpu_simd_isa() if _extension.load_error is None else None


def _cpu_prefetch_bytes() -> Optional[int]:
    """How far ahead the CPU step's loops prefetch (csrc/cpu/prefetch.cpp), None without the extension."""
    from rmsprop_fused import _extension

    return _extension._module.cpu_prefetch_bytes() if _extension.load_error is None else None


def _load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def environment(device: torch.device) -> dict:
    flags = cpu_flags()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_generation": cpu_generation(),
        "cpu_count": os.cpu_count(),
        # What the CPU numbers depend on: the vector width the kernel's clones pick from these
        # flags, the caches, and whether this is a virtual machine (the "hypervisor" flag).
        "cpu_flags": flags,
        "cpu_kernel_clone": x86_64_level(flags),
        # 16-bit params: the kernel's own AVX-512 loop where the CPU has AVX-512 BF16, else the clone
        "cpu_simd_loop": _cpu_simd_loop(),
        "cpu_prefetch_bytes": _cpu_prefetch_bytes(),
        "cpu_caches": cpu_caches(),
        "cpu_virtualised": "hypervisor" in flags,
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
        env["gpu_rated_bandwidth_gbps"] = rated_bandwidth_gbps(env["device_name"])
    return env


def plot(rows: Sequence[dict], bandwidths: Dict[str, dict], env: dict, path: str) -> None:
    """GB/s by case and implementation, one panel per parameter list, the copy and in-place add
    bandwidths of the same run as horizontal lines; whiskers span the IQR of the step time, and
    each bar is labelled with its median step time (the GB/s compare lists, the times do not) and,
    for FusedRMSprop, its fraction of the roofline of the same streams."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lists = list(dict.fromkeys(r["list_name"] for r in rows))
    impls = [i for i in _plot_order() if any(r["impl"] == i and r.get("gbps") for r in rows)]
    palette = plt.get_cmap("tab20").colors
    colours = {impl: ("0.35" if parse_impl(impl)[0] == "roofline" else palette[k % len(palette)]) for k, impl in enumerate(ALL_IMPLS)}
    fig, axes = plt.subplots(len(lists), 1, figsize=(max(8.0, 1.6 + 0.35 * len(impls) * _max_cases(rows)), 0.6 + 3.6 * len(lists)),
                             squeeze=False, layout="constrained")  # constrained: room for the suptitle and the legends
    width = 0.8 / max(1, len(impls))
    for ax, list_name in zip(axes[:, 0], lists):
        list_rows = [r for r in rows if r["list_name"] == list_name]
        cases = list(dict.fromkeys((r["dtype"], r["options"]) for r in list_rows))
        for j, impl in enumerate(impls):
            xs, ys, lo, hi, labels = [], [], [], [], []
            for i, case in enumerate(cases):
                r = next((r for r in list_rows if (r["dtype"], r["options"]) == case and r["impl"] == impl and r.get("gbps")), None)
                if r is None:
                    continue
                xs.append(i - 0.4 + (j + 0.5) * width)
                ys.append(r["gbps"])
                lo.append(r["gbps"] - effective_gbps(r["min_bytes"], r["q3_s"]))
                hi.append(effective_gbps(r["min_bytes"], r["q1_s"]) - r["gbps"])
                roof = r.get("fraction_of_roofline") if impl.startswith("fused-") else None
                labels.append(f" {_ms(r['median_s'])} ms" + (f", {roof:.0%} roof" if roof is not None else ""))
            if xs:  # an implementation that sat out this whole list gets no legend entry here
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=impl, color=colours[impl],
                       hatch="//" if parse_impl(impl)[0] == "roofline" else None)
                for x, y, h, label in zip(xs, ys, hi, labels):
                    ax.text(x, y + h, label, rotation=90, ha="center", va="bottom", fontsize=6)
        bw = bandwidths[list_name]
        ax.axhline(bw["copy_gbps"], color="black", linestyle="--", linewidth=1, label=f"copy_ {bw['copy_gbps']:.0f} GB/s")
        ax.axhline(bw["inplace_add_gbps"], color="grey", linestyle=":", linewidth=1, label=f"in-place add_ {bw['inplace_add_gbps']:.0f} GB/s")
        if bw.get("rated_gbps"):
            ax.axhline(bw["rated_gbps"], color="red", linestyle="-.", linewidth=1, label=f"rated {bw['rated_gbps']:.0f} GB/s")
        ax.set_xticks(range(len(cases)), [f"{d}\n{o}" for d, o in cases])
        first = list_rows[0]
        tensors = f"{first['n_tensors']} tensor" + ("s" if first["n_tensors"] != 1 else "")
        ax.set_title(f"{list_name}: {tensors}, {first['numel'] / 1e6:.1f}M elements", fontsize=10)
        ax.set_ylabel("effective GB/s\n(higher is better)")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.35)  # room for the labels of the tallest bars
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(
        f"RMSprop step on {env['device_name']} ({_threads(env)}), torch {env['torch']}, {env['date'][:10]}, "
        f"load average at the start {env['load_average_1_5_15min']}\n"
        "bars: minimum bytes of a fused pass / median step time; hatched: the roofline (the same streams, no arithmetic)\n"
        "whiskers: interquartile range of the step time; labels: median step time, and the fused step's fraction of its roofline",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
def _plot_order() -> List[str]:
    """ALL_IMPLS with each FusedRMSprop state variant beside the roofline of its streams."""
    order = []
    for state_format in ("param",) + LOW_PRECISION_STATES:
        order += [i for i in ALL_IMPLS if parse_impl(i)[1] == state_format and not i.startswith(("torch", "bnb", "clip+"))]
    return order + [i for i in ALL_IMPLS if i not in order]


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
# matter (a real model, and many small tensors), with the slow-to-compile and oracle paths and the
# state variants left out; the roofline is in (a step's time, once its op is built).
QUICK_CASES = (("gpt2", "fp32", ("plain", "centered+momentum")), ("many-small", "fp32", ("plain",)))
# max_time: on the 2-core VM at load 5, torch's for-loop took 3.5 s a GPT-2 step and 14 s a
# many-small step (barrier waits, page faults), and the quick run 5 minutes without the cap.
QUICK_PLAN = TimingPlan(warmup=1, repeats=5, min_time=0.0, max_repeats=5, kernel_steps=1, max_time=3.0)
FULL_PLAN = TimingPlan()
# The full run's clip cases (issue #13): after the list's own cases, fp32 only.
FULL_CLIP_CASES = (("gpt2", "fp32"), ("resnet50", "fp32"))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="GPT-2 fp32 plain and centered+momentum, many-small fp32 plain; 5 steps each (2 when they take over 3 s); "
                        "no torch.compile, no reference backend, no state variants")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the params live (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="directory for the JSON and PNG (default: bench/out; "
                        "bench/results holds the committed runs, add one with --out bench/results)")
    parser.add_argument("--tag", help="added to the output files' names (<device>-<tag>.json), to keep several runs apart")
    parser.add_argument("--lists", help=f"comma-separated, from {', '.join(LISTS)} (default: all)")
    parser.add_argument("--options", help=f"comma-separated, from {', '.join(OPTION_SETS)} (default: {', '.join(BASE_OPTIONS)}, "
                        f"and {', '.join(CLIP_OPTIONS)} for {', '.join(' '.join(c) for c in FULL_CLIP_CASES)})")
    parser.add_argument("--dtypes", help=f"comma-separated, from {', '.join(DTYPES)} (default: fp32,bf16)")
    parser.add_argument("--impls", help=f"comma-separated, from {', '.join(ALL_IMPLS)} (default: all available)")
    parser.add_argument("--state-dtypes", help=f"the state dtypes of the default `fused-<backend>:<state>`, `roofline:<state>` and "
                        f"`bnb:8bit` variants, comma-separated from {', '.join(LOW_PRECISION_STATES)}, or none "
                        f"(default: all of them; none with --quick)")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (its compilation takes minutes on a small CPU)")
    parser.add_argument("--compile-max-tensors", type=int, help="leave torch.compile out of lists with more tensors "
                        "(default: 500 on CPU, where Inductor takes many minutes over the 2000-tensor list; none on CUDA)")
    parser.add_argument("--compile-budget-s", type=float, help="leave torch.compile out of the remaining cases once its warm-ups "
                        "(where it compiles) have taken this many seconds in all (default: no limit)")
    parser.add_argument("--repeats", type=int, help="minimum timed steps per case")
    parser.add_argument("--min-time", type=float, help="keep timing a case until this many seconds were spent")
    parser.add_argument("--kernel-time-steps", type=int, help="GPU: steps of each implementation run under the profiler "
                        "for its kernel time (default 3, 1 with --quick; 0: none)")
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
    the cross product of those (with the defaults for the rest), in quick mode too; the default
    full run adds the clip option sets for FULL_CLIP_CASES, each after its list's own cases."""
    lists = _pick(args.lists, LISTS, "lists")
    options = _pick(args.options, OPTION_SETS, "option sets")
    dtypes = _pick(args.dtypes, DTYPES, "dtypes")
    if args.quick and lists is None and options is None and dtypes is None:
        return [(l, d, tuple(o)) for l, d, o in QUICK_CASES]
    cases = [(l, d, tuple(options or BASE_OPTIONS)) for l in (lists or LISTS) for d in (dtypes or ("fp32", "bf16"))]
    if options is None:
        for clip_case in FULL_CLIP_CASES:
            where = next((i for i, c in enumerate(cases) if c[:2] == clip_case), None)
            if where is not None:
                cases.insert(where + 1, (*clip_case, CLIP_OPTIONS))
    return cases


def default_impls(args) -> List[str]:
    """The implementations a run times unless --impls names them: all, less torch.compile with
    --quick or --no-compile, the reference backend with --quick, and the state variants of the
    state dtypes not asked for (none with --quick)."""
    if args.state_dtypes is not None:
        states = [] if args.state_dtypes.strip() == "none" else _pick(args.state_dtypes, LOW_PRECISION_STATES, "state dtypes")
    else:
        states = [] if args.quick else list(LOW_PRECISION_STATES)
    wanted = []
    for name in ALL_IMPLS:
        base, state_format = parse_impl(name)
        if state_format != "param" and state_format not in states:
            continue
        if base == "torch-compile" and (args.quick or args.no_compile):
            continue
        if base == "fused-reference" and args.quick:
            continue
        wanted.append(name)
    return wanted


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
        kernel_steps=base.kernel_steps if args.kernel_time_steps is None else args.kernel_time_steps,
    )
    cases = plan_cases(args)
    memory_budget = available_memory(device) // 2 if args.memory_budget_gib is None else int(args.memory_budget_gib * 2**30)
    compile_max_tensors = args.compile_max_tensors
    if compile_max_tensors is None and device.type == "cpu":
        compile_max_tensors = 500
    wanted = _pick(args.impls, ALL_IMPLS, "implementations") or default_impls(args)
    env = environment(device)
    print(f"{env['device_name']} ({device}, {_threads(env)}), torch {env['torch']}, "
          f"triton {env['triton']}, rmsprop_fused {env['rmsprop_fused']}, {env['date']}, "
          f"load average {env['load_average_1_5_15min']}")
    if any(parse_impl(n)[0] == "roofline" for n in wanted) and device.type == "cpu":
        print("  building the CPU roofline op (bench/roofline_cpu.cpp; once, then from torch's extension cache)", flush=True)

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

    state_table = state_bytes_table([LISTS[l]() for l in dict.fromkeys(l for l, _, _ in cases)],
                                    list(dict.fromkeys(d for _, d, _ in cases)),
                                    list(dict.fromkeys(o for _, _, opts in cases for o in opts)))
    for line in format_state_bytes(state_table):
        print(line)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, device_stem(device) + (f"-{args.threads}thread" if args.threads else "")
                        + (f"-{slug(args.tag)}" if args.tag else "") + ("-quick" if args.quick else ""))
    rows: List[dict] = []
    bandwidths: Dict[str, dict] = {}
    began = time.perf_counter()

    def save(finished: bool) -> None:
        """The JSON is rewritten after every case, so a run that dies (killed for memory, or by a
        time limit, say) keeps what it measured."""
        report = {
            "environment": env,
            "finished": finished,
            "byte_model": "minimum bytes of one fused pass for the implementation's state format (bench/byte_model.py, "
                          "docs/DESIGN.md section 4); gbps = min_bytes / median_s; kernel_gbps = min_bytes / kernel_s",
            "timing": dataclasses.asdict(plan) | {
                "timer": "torch.cuda.Event" if device.type == "cuda" else "time.perf_counter",
                "kernel_time": "the profiler's GPU kernel durations per step, summed" if device.type == "cuda" else None,
                "memory_budget_bytes": memory_budget,
                "interleaving": "a case's implementations take turns, one step each per round, when their optimizers fit in the budget together",
            },
            "bandwidth": bandwidths,
            "unavailable": unavailable,
            "state_bytes_per_param": state_table,
            "elapsed_s": time.perf_counter() - began,
            "load_average_now": _load_average(),
            "results": rows,
            "goals": goals(rows),
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
                     device, plan, seed=args.seed, compile_max_tensors=compile_max_tensors,
                     compile_budget_s=args.compile_budget_s, memory_budget=memory_budget,
                     progress=bar, on_case_done=report)
    finally:
        bar.close()
    save(finished=True)
    elapsed = time.perf_counter() - began

    for list_name, bw in bandwidths.items():
        rated = f", rated {bw['rated_gbps']:.0f} GB/s" if bw.get("rated_gbps") else ""
        print(f"bandwidth before {list_name}: copy_ {bw['copy_gbps']:.1f} GB/s, in-place add_ {bw['inplace_add_gbps']:.1f} GB/s{rated}")
    for r in rows:
        if r["impl"].startswith(("fused-cpu", "fused-cuda", "fused-triton", "clip+fused")) and r.get("gbps") is not None:
            print(summary_line(r))
    found = goals(rows)
    if found:
        print("goals:")
        for g in found:
            print("  " + format_goal(g))
    if rows:
        plot(rows, bandwidths, env, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png ({elapsed:.0f} s)")
    return 0


def summary_line(r: dict) -> str:
    """One fused row in words: its speedups, its bandwidth against copy, roofline and (GPU) the
    rated figure, and its kernel time."""
    parts = [f"{r['impl']} on {r['list_name']} {r['dtype']} {r['options']}: {_ms(r['median_s'])} ms"]
    base, state_format = parse_impl(r["impl"])
    others = [r["default_impl"], "torch-foreach", "torch-compile"]
    if state_format != "param":  # against the same backend with full state, and bitsandbytes' 8-bit
        others += [base] + (["bnb:8bit"] if state_format == "8bit" else [])
    elif base.startswith("clip+"):  # clip_grad_norm_ + FusedRMSprop against FusedRMSprop clipping itself
        others.append(base[len("clip+"):])
    elif r["options"].endswith("+clip"):
        others.append("clip+" + base)
    else:
        others.append("bnb")
    over = r.get("speedup_over") or {}
    parts += [f"{over[o]:.2f}x {o}" for o in dict.fromkeys(others) if o in over]
    bandwidth = f"{r['gbps']:.1f} GB/s = {r['fraction_of_copy']:.0%} of copy_"
    if r.get("fraction_of_roofline") is not None:
        bandwidth += f", {r['fraction_of_roofline']:.0%} of {r['roofline_impl']}"
    if r.get("fraction_of_rated") is not None:
        bandwidth += f", {r['fraction_of_rated']:.0%} of rated"
    if r.get("kernel_s"):
        bandwidth += f"; kernels {_ms(r['kernel_s'])} ms, {r['kernel_gbps']:.0f} GB/s = {r['kernel_fraction_of_copy']:.0%} of copy_"
    return ", ".join(parts) + "; " + bandwidth


if __name__ == "__main__":
    sys.exit(main())
