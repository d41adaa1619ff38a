"""The roofline of a benchmark case: the fastest in-place pass over the streams a fused step reads
and writes, with no arithmetic (issue #14). FusedRMSprop's step is reported as a fraction of it.

On the CPU it is a small C++ op, bench/roofline_cpu.cpp, built once by
torch.utils.cpp_extension.load with setup.py's compiler flags (cached under torch's extension
directory; a few tens of seconds on a 2-core machine the first time). It runs the fused CPU step's
own loop (csrc/cpu/cpu_kernel.h: the same element split over at::parallel_for's threads, the same
cache-line loop and software prefetch, the same vector-width clones) over the case's own params and
grads and state tensors of the case's state format, with the per-element update replaced by
`x ^= grad & mask`: every stream is read and written, nothing computed.

On a GPU it is a Triton kernel of the fused Triton kernel's shape (2048 elements and 8 warps a
program) over one flat buffer per stream holding as many bytes as the case's tensors together,
in one launch: a ceiling that no per-tensor boundary, tail or launch lowers.

The mask is zero when timing (the values do not change, so the params the other implementations
step stay as they were) and all ones in the tests, which check that every element of every stream
changes. It is a run-time value in both kernels, so the compiler cannot drop the loads or stores.
"""

from __future__ import annotations

import ast
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

try:  # bench/ on sys.path (python bench/bench_step.py, the tests), or imported from the repo root
    import byte_model
except ImportError:  # pragma: no cover
    from bench import byte_model
OptionSet = byte_model.OptionSet

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CPU_SOURCE = os.path.join(HERE, "roofline_cpu.cpp")
PREFETCH_SOURCE = os.path.join(ROOT, "csrc", "cpu", "prefetch.cpp")  # the distance its loop reads
OP_NAME = "rmsprop_fused_bench"


def setup_cxx_flags(setup_py: str = os.path.join(ROOT, "setup.py")) -> List[str]:
    """setup.py's C++ flags for the CPU kernel (its `cxx_flags = [...]` list, plus -fopenmp where
    torch has OpenMP, as setup.py adds it), read from setup.py itself so that the two cannot part."""
    with open(setup_py) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "cxx_flags" for t in node.targets):
            flags = list(ast.literal_eval(node.value))
            break
    else:
        raise ValueError(f"{setup_py} has no `cxx_flags = [...]`")
    if torch._C.has_openmp:
        flags.append("-fopenmp")
    return flags


_cpu_op_error: Optional[str] = None
_cpu_op_loaded = False


def load_cpu_op(verbose: bool = False) -> Optional[str]:
    """Builds (once; then from torch's extension cache) and loads the CPU roofline op. Returns why
    it cannot run, or None."""
    global _cpu_op_error, _cpu_op_loaded
    if _cpu_op_loaded or _cpu_op_error is not None:
        return _cpu_op_error
    try:
        # Importing cpp_extension without a GPU logs "No CUDA runtime is found" to stderr: noise in
        # the benchmark's log for a C++-only build. Held back for the import only.
        extension_logger = logging.getLogger("torch.utils.cpp_extension")
        level = extension_logger.level
        extension_logger.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load
        finally:
            extension_logger.setLevel(level)

        flags = setup_cxx_flags()
        load(
            name="rmsprop_fused_bench_roofline",
            sources=[CPU_SOURCE, PREFETCH_SOURCE],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
            extra_include_paths=[os.path.join(ROOT, "csrc")],
            is_python_module=False,
            verbose=verbose,
        )
        _cpu_op_loaded = True
    except Exception as e:  # no compiler, a header that changed under it: say so, time the rest
        _cpu_op_error = f"the CPU roofline op did not build: {type(e).__name__}: {e}".replace("\n", " ")[:400]
    return _cpu_op_error


# ----------------------------------------------------------------------------- state tensors


@dataclass
class Streams:
    """The tensors of one kernel call: the params and grads, and state of one storage dtype (8-bit
    state takes two calls, as FusedRMSprop's step does: codes for the large tensors, float32 for
    those under 4,096 elements)."""

    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    square_avgs: List[torch.Tensor]
    grad_avgs: List[torch.Tensor] = field(default_factory=list)
    momentum_buffers: List[torch.Tensor] = field(default_factory=list)
    square_avg_scales: List[torch.Tensor] = field(default_factory=list)
    grad_avg_scales: List[torch.Tensor] = field(default_factory=list)
    momentum_buffer_scales: List[torch.Tensor] = field(default_factory=list)

    def lists(self) -> tuple:
        return (self.params, self.grads, self.square_avgs, self.grad_avgs, self.momentum_buffers,
                self.square_avg_scales, self.grad_avg_scales, self.momentum_buffer_scales)

    def tensors(self) -> List[torch.Tensor]:
        return [t for tensors in self.lists() for t in tensors]


def state_streams(params: List[torch.Tensor], grads: List[torch.Tensor], options: OptionSet,
                  state_format: str) -> List[Streams]:
    """The kernel calls of a step over `params` with state in `state_format`: state tensors laid
    out as FusedRMSprop keeps them (byte_model.storage_dtype), filled with random bits."""
    by_dtype: Dict[torch.dtype, Streams] = {}
    gen = torch.Generator(device=params[0].device).manual_seed(1) if params else None

    def random_like(n: int, dtype: torch.dtype, device) -> torch.Tensor:
        # random bits of any dtype, from int16 noise (never zeros: a real state has values)
        nbytes = n * dtype.itemsize
        noise = torch.randint(-2**15, 2**15, ((nbytes + 1) // 2,), generator=gen, device=device, dtype=torch.int16)
        return noise.view(torch.uint8)[:nbytes].view(dtype).clone()

    for p, g in zip(params, grads):
        n = p.numel()
        stored = byte_model.storage_dtype(state_format, p.dtype, n)
        streams = by_dtype.setdefault(stored, Streams([], [], []))
        streams.params.append(p)
        streams.grads.append(g)
        names = ["square_avgs"] + (["grad_avgs"] if options.centered else []) + (["momentum_buffers"] if options.momentum > 0 else [])
        for name in names:
            getattr(streams, name).append(random_like(n, stored, p.device))
            if stored == torch.uint8:
                scales = getattr(streams, name[:-1] + "_scales")
                scales.append(torch.rand(byte_model.scale_count(n), generator=gen, device=p.device))
    return list(by_dtype.values())


# ----------------------------------------------------------------------------- CPU


def cpu_step(streams: List[Streams], flip: bool = False) -> Callable[[], None]:
    """One roofline pass over every call's streams with the CPU op (load_cpu_op first)."""
    op = getattr(torch.ops, OP_NAME).roofline_

    def step() -> None:
        for s in streams:
            op(*(list(t) for t in s.lists()), flip)

    return step


# ----------------------------------------------------------------------------- GPU (Triton)

# The fused Triton kernel's program shape (rmsprop_fused/_triton_backend.py): the same threads.
BLOCK_SIZE = 2048
NUM_WARPS = 8
_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_triton_kernel = None


def _kernel():
    """The Triton kernel, defined at first use (so that importing this module needs no Triton, and
    the tests' TRITON_INTERPRET, set before, applies)."""
    global _triton_kernel
    if _triton_kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def roofline(p, g, v, m, b, vs, ms, bs, mask_ptr, n, n_scales, CENTERED: tl.constexpr,
                     MOMENTUM: tl.constexpr, SCALES: tl.constexpr, BLOCK: tl.constexpr):
            pid = tl.program_id(0).to(tl.int64)
            offsets = pid * BLOCK + tl.arange(0, BLOCK)
            inside = offsets < n
            mask = tl.load(mask_ptr)  # 0 or -1, from memory: not a constant to fold
            gw = tl.load(g + offsets, mask=inside) & mask.to(g.dtype.element_ty)
            tl.store(p + offsets, tl.load(p + offsets, mask=inside) ^ gw, mask=inside)
            sw = gw.to(v.dtype.element_ty)
            tl.store(v + offsets, tl.load(v + offsets, mask=inside) ^ sw, mask=inside)
            if CENTERED:
                tl.store(m + offsets, tl.load(m + offsets, mask=inside) ^ sw, mask=inside)
            if MOMENTUM:
                tl.store(b + offsets, tl.load(b + offsets, mask=inside) ^ sw, mask=inside)
            if SCALES:  # BLOCK / 256 float32 scales per program, as bits
                SB: tl.constexpr = BLOCK // 256
                s_offsets = pid * SB + tl.arange(0, SB)
                s_inside = s_offsets < n_scales
                tl.store(vs + s_offsets, tl.load(vs + s_offsets, mask=s_inside) ^ mask, mask=s_inside)
                if CENTERED:
                    tl.store(ms + s_offsets, tl.load(ms + s_offsets, mask=s_inside) ^ mask, mask=s_inside)
                if MOMENTUM:
                    tl.store(bs + s_offsets, tl.load(bs + s_offsets, mask=s_inside) ^ mask, mask=s_inside)

        _triton_kernel = roofline
    return _triton_kernel


def _flat_words(tensors: List[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes, concatenated, as unsigned-width words of their element size."""
    word = _WORDS[tensors[0].element_size()]
    return torch.cat([t.detach().reshape(-1).view(word) for t in tensors])


@dataclass
class FlatStreams:
    """One Triton launch: a flat buffer per stream, as many bytes as the call's tensors together."""

    param: torch.Tensor
    grad: torch.Tensor
    square_avg: torch.Tensor
    grad_avg: Optional[torch.Tensor]
    momentum_buffer: Optional[torch.Tensor]
    scales: List[Optional[torch.Tensor]]  # square_avg, grad_avg, momentum_buffer; None without 8-bit state

    def tensors(self) -> List[torch.Tensor]:
        return [t for t in (self.param, self.grad, self.square_avg, self.grad_avg, self.momentum_buffer, *self.scales)
                if t is not None]


def flatten(streams: List[Streams]) -> List[FlatStreams]:
    flats = []
    for s in streams:
        scales = [_flat_words(t) if t else None for t in (s.square_avg_scales, s.grad_avg_scales, s.momentum_buffer_scales)]
        flats.append(FlatStreams(_flat_words(s.params), _flat_words(s.grads), _flat_words(s.square_avgs),
                                 _flat_words(s.grad_avgs) if s.grad_avgs else None,
                                 _flat_words(s.momentum_buffers) if s.momentum_buffers else None, scales))
    return flats


def triton_step(flats: List[FlatStreams], flip: bool = False) -> Callable[[], None]:
    """One roofline pass over every flat call, one launch each."""
    kernel = _kernel()
    device = flats[0].param.device
    mask = torch.full((), -1 if flip else 0, dtype=torch.int32, device=device)

    def step() -> None:
        for f in flats:
            n = f.param.numel()
            n_scales = f.scales[0].numel() if f.scales[0] is not None else 0
            # every code and every scale has a program: sum(ceil(n_t / 256)) can exceed ceil(n / 256)
            programs = max(-(-n // BLOCK_SIZE), -(-n_scales // (BLOCK_SIZE // 256)))
            v = f.square_avg
            kernel[(programs,)](
                f.param, f.grad, v, f.grad_avg if f.grad_avg is not None else v,
                f.momentum_buffer if f.momentum_buffer is not None else v,
                *(s if s is not None else mask for s in f.scales), mask, n, n_scales,
                CENTERED=f.grad_avg is not None, MOMENTUM=f.momentum_buffer is not None,
                SCALES=f.scales[0] is not None, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)

    return step


# ----------------------------------------------------------------------------- entry


def why_unavailable(device: torch.device) -> Optional[str]:
    if device.type == "cpu":
        return load_cpu_op()
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except Exception as e:
            return f"the GPU roofline is a Triton kernel and Triton is not importable ({type(e).__name__}: {e})"
        return None
    return f"no roofline for {device.type} tensors"


def build(params: List[torch.Tensor], options: OptionSet, state_format: str,
          flip: bool = False) -> Tuple[Callable[[], None], List[torch.Tensor]]:
    """(the roofline step for a case, the state tensors it holds): the params' grads and state of
    `state_format` (allocated here, as the fused optimizer would), on the params' device."""
    grads = [p.grad for p in params]
    streams = state_streams(params, grads, options, state_format)
    if params[0].device.type == "cpu":
        reason = load_cpu_op()
        if reason:
            raise RuntimeError(reason)
        return cpu_step(streams, flip), [x for s in streams for tensors in s.lists()[2:] for x in tensors]
    flats = flatten(streams)
    del streams
    return triton_step(flats, flip), [t for f in flats for t in f.tensors()[2:]]
