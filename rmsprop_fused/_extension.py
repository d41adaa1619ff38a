"""Loading the compiled op, and the `cpu` / `cuda` backends that call it.

The shared object is loaded only when _build_info.json (written beside it by setup.py) says it
was built against the torch that is running: a stale build is detected without importing it, so
an upgraded torch never crashes `import rmsprop_fused`. Whatever goes wrong, the reason is kept
for `python -m rmsprop_fused` and for the error of an explicit backend="cpu"/"cuda", and one
warning is issued; backend="auto" falls back to Triton, then to the reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import struct
import warnings
from typing import Optional

import torch

from .errors import ExtensionUnavailableWarning

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# A package imported from a checkout (a script run from the clone's root imports the source tree,
# not the copy `pip install .` put in site-packages) needs the extension built into that tree.
_IN_CHECKOUT = os.path.exists(os.path.join(os.path.dirname(_PACKAGE_DIR), "setup.py"))
_REBUILD = ("rebuild it into the checkout with `pip install --no-build-isolation -e .`" if _IN_CHECKOUT
            else "rebuild it with `pip install --no-build-isolation .`")

build_info: Optional[dict] = None
load_error: Optional[str] = None  # why the extension could not be loaded; None when loaded
_module = None  # rmsprop_fused._C, once loaded


def _load() -> None:
    global build_info, load_error
    path = os.path.join(_PACKAGE_DIR, "_build_info.json")
    if os.environ.get("RMSPROP_FUSED_DISABLE_EXTENSION", "0") not in ("0", ""):
        load_error = "disabled by RMSPROP_FUSED_DISABLE_EXTENSION"
        return
    try:
        with open(path) as f:
            build_info = json.load(f)
    except FileNotFoundError:
        load_error = f"the C++ extension is not built (no {os.path.basename(path)}): {_REBUILD}"
        return
    except (OSError, ValueError) as e:
        load_error = f"cannot read {path}: {e}; {_REBUILD}"
        return
    if not isinstance(build_info, dict):
        load_error = f"{path} holds a {type(build_info).__name__}, not the object setup.py writes; {_REBUILD}"
        build_info = None
        return
    built_for = build_info.get("torch_version")
    if built_for != torch.__version__:
        load_error = (
            f"the C++ extension was built against torch {built_for} but torch {torch.__version__} "
            f"is installed (the C++ ABI differs between releases): {_REBUILD}"
        )
        return
    spec = importlib.util.find_spec("rmsprop_fused._C")
    truncated = _truncated_elf(spec.origin) if spec is not None and spec.origin else None
    if truncated is not None:
        load_error = f"the C++ extension is damaged: {truncated}; {_REBUILD}"
        return
    global _module
    try:
        _module = importlib.import_module("rmsprop_fused._C")
    except (ImportError, OSError) as e:
        load_error = f"the C++ extension failed to load ({e}): {_REBUILD}"
        return
    missing = [f"no op rmsprop_fused::{op}" for op in ("rmsprop_", "first_irregular", "overlapping_pair")
               if not hasattr(torch.ops.rmsprop_fused, op)]
    functions = ("step_", "StepLists", "step_all", "total_norm", "cpu_simd_isa", "cpu_prefetch_bytes")
    missing += [f"no function rmsprop_fused._C.{name}" for name in functions if not hasattr(_module, name)]
    if missing:
        load_error = f"the C++ extension loaded but has {missing[0]}: {_REBUILD}"


# ELF layout, by class (32 or 64 bit): the format of an address, where the program header table's
# offset and its entries' size and count sit in the file header, and where p_offset and p_filesz
# sit in a program header.
_ELF_FIELDS = {1: ("I", 28, 42, 4, 16), 2: ("Q", 32, 54, 8, 32)}
_PT_LOAD = 1


def _truncated_elf(path: str) -> Optional[str]:
    """Why the ELF shared object at `path` cannot be mapped whole, or None (also for files that are
    not ELF: the loader judges those). dlopen maps each PT_LOAD segment from the file; a segment
    that runs past the end of a truncated file (an interrupted copy, a full disk) is mapped anyway,
    and the process dies of SIGBUS when the loader touches it, which no `except` can catch."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = f.read(64)
            if len(header) < 52 or header[:4] != b"\x7fELF" or header[4] not in _ELF_FIELDS:
                return None
            order = "<" if header[5] == 1 else ">"
            word, phoff_at, sizes_at, offset_at, filesz_at = _ELF_FIELDS[header[4]]
            (phoff,) = struct.unpack_from(order + word, header, phoff_at)
            entry_size, count = struct.unpack_from(order + "HH", header, sizes_at)
            if phoff + entry_size * count > size:
                return f"{path} is truncated ({size} bytes; its program headers end at byte {phoff + entry_size * count})"
            f.seek(phoff)
            table = f.read(entry_size * count)
    except OSError as e:
        return f"cannot read {path}: {e}"
    for i in range(count):
        entry = table[i * entry_size:(i + 1) * entry_size]
        if struct.unpack_from(order + "I", entry, 0)[0] != _PT_LOAD:
            continue
        (offset,) = struct.unpack_from(order + word, entry, offset_at)
        (filesz,) = struct.unpack_from(order + word, entry, filesz_at)
        if offset + filesz > size:
            return f"{path} is truncated ({size} bytes; a loadable segment ends at byte {offset + filesz})"
    return None


_load()
if load_error is not None and os.environ.get("RMSPROP_FUSED_DISABLE_EXTENSION", "0") in ("0", ""):
    warnings.warn(
        f"rmsprop_fused: {load_error}. Falling back to the Triton or reference backend "
        "(`python -m rmsprop_fused` shows what is available).",
        ExtensionUnavailableWarning,
        stacklevel=2,
    )


def _arch_list() -> list[tuple[int, int, bool]]:
    """(major, minor, has_ptx) for each entry of the TORCH_CUDA_ARCH_LIST used at build time."""
    archs = []
    for entry in (build_info or {}).get("cuda_arch_list", "").replace(",", ";").replace(" ", ";").split(";"):
        if not entry:
            continue
        has_ptx = entry.endswith("+PTX")
        major, minor = entry.replace("+PTX", "").split(".")[:2]
        archs.append((int(major), int(minor.rstrip("a")), has_ptx))
    return archs


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the compiled op can update tensors on `device`, else why not."""
    if load_error is not None:
        return load_error
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"the extension has no kernel for {device.type} tensors"
    if not build_info.get("cuda"):
        return f"the extension was built without the CUDA kernel ({build_info.get('why_no_cuda')})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability(device)
    # Machine code for X.Y runs on X.Z with Z >= Y; PTX for X.Y is JIT-compiled on anything newer.
    runs = any(
        (a_major == major and a_minor <= minor) or (has_ptx and (a_major, a_minor) <= (major, minor))
        for a_major, a_minor, has_ptx in _arch_list()
    )
    if not runs:
        return (
            f"the CUDA kernel was built for {build_info.get('cuda_arch_list')!r} but this GPU is "
            f"sm_{major}{minor}: rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor}"
        )
    return None


def rmsprop_extension(
    params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, square_avg_scales, grad_avg_scales,
    momentum_buffer_scales, *, lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt,
    lr_in_momentum, decoupled_weight_decay, nesterov, bias_correction, variance_state, rounding_seed,
    grad_scale=None, found_inf=None, clip_coef=None,
) -> None:
    """The `cpu` and `cuda` backends: the dispatcher picks the kernel by the tensors' device.
    Eagerly through the module's step_ (the same op, with cheaper argument conversion:
    csrc/python_entry.cpp); under torch.compile through torch.ops, which Dynamo traces."""
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    lr = 0.0 if lr_tensor is not None else float(lr)
    if not torch.compiler.is_compiling():
        _module.step_(
            params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, square_avg_scales,
            grad_avg_scales, momentum_buffer_scales, lr, alpha, eps, weight_decay, momentum, centered, maximize,
            eps_in_sqrt, lr_in_momentum, decoupled_weight_decay, nesterov, bias_correction, variance_state,
            rounding_seed, lr_tensor, grad_scale, found_inf, clip_coef,
        )
        return
    torch.ops.rmsprop_fused.rmsprop_(
        params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, square_avg_scales, grad_avg_scales,
        momentum_buffer_scales, lr=lr, alpha=alpha, eps=eps,
        weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize,
        eps_in_sqrt=eps_in_sqrt, lr_in_momentum=lr_in_momentum, decoupled_weight_decay=decoupled_weight_decay,
        nesterov=nesterov, bias_correction=bias_correction, variance_state=variance_state,
        rounding_seed=rounding_seed, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
        clip_coef=clip_coef,
    )


def step_lists(params, square_avgs, grad_avgs, momentum_buffers, state_steps, square_avg_scales,
               grad_avg_scales, momentum_buffer_scales, *, requested_state_dtype, min_quantized_numel):
    """The params and state lists of a step (all but the grads, in the op's order; scales for
    8-bit state), converted once (csrc/python_entry.cpp StepLists), with the state dtype the
    step's state must have (functional.expected_state_dtype_arguments): its step() takes the
    grads and the op's scalars, positionally."""
    return _module.StepLists(params, square_avgs, grad_avgs, momentum_buffers, state_steps, square_avg_scales,
                             grad_avg_scales, momentum_buffer_scales, requested_state_dtype, min_quantized_numel)


if load_error is None:
    # The op's fake implementation: it mutates its inputs in place and returns nothing, so under
    # torch.compile it traces as an in-place extern call with no outputs to allocate.
    @torch.library.register_fake("rmsprop_fused::rmsprop_")
    def _rmsprop_fake(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, square_avg_scales,
                      grad_avg_scales, momentum_buffer_scales, *, lr, alpha, eps, weight_decay, momentum,
                      centered, maximize, eps_in_sqrt, lr_in_momentum, decoupled_weight_decay, nesterov,
                      bias_correction, variance_state, rounding_seed=None, lr_tensor=None, grad_scale=None,
                      found_inf=None, clip_coef=None):
        # The Meta key outranks CPU and CUDA: a call with meta tensors lands here, and must fail
        # as the real kernels would (with their ValueError), not return having updated nothing.
        device = params[0].device if params else None
        torch._check_value(device is None or device.type != "meta",
                           lambda: "rmsprop_fused: params[0] is on the meta device and has no data to update")
        lists = {"params": params, "grads": grads, "square_avgs": square_avgs, "grad_avgs": grad_avgs,
                 "momentum_buffers": momentum_buffers, "state_steps": state_steps,
                 "square_avg_scales": square_avg_scales, "grad_avg_scales": grad_avg_scales,
                 "momentum_buffer_scales": momentum_buffer_scales}
        for name, tensors in lists.items():
            for i, t in enumerate(tensors):
                torch._check_value(t.device == device,
                                   lambda: f"rmsprop_fused: {name}[{i}] is on {t.device} but params[0] is on {device}")
        return None
