"""The `triton` backend: the fused RMSprop step as one Triton kernel launch per (device, dtype) group.

Layout. A launch updates every tensor of the group. It reads two int64 arrays that live on the
tensors' device and are built once for a given set of tensors (:func:`_launch_plan`):

    table   [n_tensors, 6]  data pointers of param, grad, square_avg, grad_avg, momentum_buffer
                            (0 where the option is off, and then never read), then numel
    blocks  [n_blocks, 3]   for each program: its tensor's row in the table, the first element
                            of that tensor it updates, and whether the block is "fast"

Program i updates elements [start, start + BLOCK_SIZE) of tensor blocks[i, 0]; a zero-size
tensor owns no block. Block starts are int64, so tensors of more than 2**31 elements are fine. A
fast block lies wholly inside its tensor, whose pointers are all 16-byte aligned: it is updated
without a mask, with 16-byte loads and stores. The others (a tensor's last block, every block of
a misaligned view) are masked at the tensor's end.

Arithmetic. The kernel computes csrc/rmsprop_update.h operation for operation, in float32 for
float32, float16 and bfloat16 tensors, with one rounding on store:
  * division and square root are the IEEE ones (div_rn, sqrt_rn): Triton's `/` and `tl.sqrt`
    are approximate on NVIDIA GPUs;
  * the launch disables FMA contraction (enable_fp_fusion=False), as the C++ kernels are built
    with -ffp-contract=off and --fmad=false: `a * b + c` is rounded twice, as torch's ops do;
  * the scalars are rounded to float32 on the host exactly as make_step_scalars rounds them;
  * float16 stores round to nearest even; bfloat16 is converted on the bits, rounding to nearest
    even as c10::BFloat16 does (Triton's interpreter gets bfloat16 conversions wrong).
So the kernel computes the same bits as the C++ kernels. The tests check that against the CPU op
with the kernel in Triton's interpreter (NumPy float32 arithmetic, IEEE like the GPU's rn
instructions), against the CUDA op when a GPU is there, and check the PTX compiled for sm_90
(no GPU needed) for IEEE division and square root, no FMA and no flush-to-zero.

Triton is optional: this module imports without it, and unavailable_reason() then says so.
Kernels run on CUDA tensors; on CPU tensors only in Triton's interpreter, which is chosen by
TRITON_INTERPRET=1 when this module is imported (when `triton.jit` builds the kernel).
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ._reference import round_to_dtype

try:
    import triton
    import triton.language as tl
except ImportError as error:  # Triton is an optional dependency
    triton = None
    _IMPORT_ERROR: Optional[str] = (
        "Triton is not installed" if isinstance(error, ModuleNotFoundError) and error.name == "triton"
        else f"Triton failed to import ({error})"
    )
else:
    _IMPORT_ERROR = None

__all__ = ["unavailable_reason", "rmsprop_triton"]

# Elements per program and warps per program: 2048 over 8 warps is 8 elements per thread, one or
# two 16-byte accesses per stream on the aligned path. Chosen without a GPU to measure on (none
# was available when this was written), from the compiled code alone: for sm_90, ptxas reports
# about 110 registers and no spills for the widest variant (centered, momentum, AMP), where 16
# elements per thread (2048 over 4 warps) needs 170. To be tuned on a GPU, reporting effective
# GB/s against the copy bandwidth (docs/DESIGN.md section 4). In Triton's interpreter, which runs the
# programs one after another and each as NumPy array operations, a large block also keeps the
# CPU tests quick.
BLOCK_SIZE = 2048
NUM_WARPS = 8

# The pointer table: one row per tensor of the group. The width is fixed, whatever the options,
# so that the kernel's column indices are compile-time constants; a state column the options do
# not use holds 0 and is never read.
_PARAM, _GRAD, _SQUARE_AVG, _GRAD_AVG, _MOMENTUM_BUFFER, _NUMEL = range(6)
_TABLE_WIDTH = 6
# The block map: one row per program, (table row, first element, fast). `fast` is 1 when the
# block lies wholly inside its tensor and all of that tensor's pointers are 16-byte aligned: the
# kernel then updates it without a mask and with 16-byte accesses.
_BLOCK_MAP_WIDTH = 3
_ALIGNMENT = 16  # bytes

# Launch plans (pointer table and block map on the device), most recently used last. A training
# loop steps the same tensors every time, so it hits one entry per (device, dtype) group.
_PLAN_CACHE_SIZE = 16
_plan_cache: "collections.OrderedDict[tuple, _LaunchPlan]" = collections.OrderedDict()
# Plans used while a CUDA graph was being captured: the graph reads them on every replay, so they
# are never freed (evicting one from the cache would leave the graph reading freed memory).
_captured_plans: dict = {}


if triton is not None:

    @triton.jit
    def _block_pointers(address, start, lanes, ELEMENT: tl.constexpr, ALIGNED: tl.constexpr):
        """Pointers to elements `start + lanes` of the tensor whose data pointer is at `address`.

        `start` is an int64 scalar (tensors may exceed 2**31 elements); `lanes` are int32 offsets
        within the block, so that each element's address costs one add to a 64-bit base."""
        pointers = (tl.load(address).to(tl.pointer_type(ELEMENT)) + start) + lanes
        if ELEMENT == tl.bfloat16:
            pointers = pointers.to(tl.pointer_type(tl.uint16))  # bfloat16 moves as bits, see below
        if ALIGNED:
            # The host checked the alignment (the block map's `fast`), which Triton cannot see
            # through a pointer loaded from memory; with it, it emits 16-byte loads and stores.
            pointers = tl.multiple_of(pointers, 16)
        return pointers

    @triton.jit
    def _load_as_float32(pointers, mask, ELEMENT: tl.constexpr):
        if ELEMENT == tl.bfloat16:
            # bfloat16 is the upper half of a float32: widening is a shift of the bits, exact
            # everywhere (Triton's interpreter mis-widens bfloat16 subnormals in `.to()`).
            bits = tl.load(pointers, mask=mask)
            return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            return tl.load(pointers, mask=mask).to(tl.float32)

    @triton.jit
    def _store_rounded(pointers, value, mask, ELEMENT: tl.constexpr):
        if ELEMENT == tl.bfloat16:
            # Round to nearest even on the bits, NaN to the canonical quiet NaN: c10::BFloat16's
            # round_to_nearest_even. Triton's interpreter truncates in `.to(tl.bfloat16)`, so the
            # CPU tests could not vouch for a conversion done there; these few integer operations
            # cost nothing measurable in a memory-bound kernel and give the same bits everywhere.
            bits = value.to(tl.uint32, bitcast=True)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            rounded = tl.where(value != value, 0x7FC0, rounded)
            tl.store(pointers, rounded.to(tl.uint16), mask=mask)
        else:
            tl.store(pointers, value.to(ELEMENT), mask=mask)  # float32 to float16: round to nearest even

    @triton.jit
    def _update_block(
        entry, start, lanes, mask, lr, grad_scale, alpha, one_minus_alpha, lerp_one_minus_w,
        eps_inside_root, eps_outside_root, weight_decay, momentum,
        ELEMENT: tl.constexpr, CENTERED: tl.constexpr, MOMENTUM: tl.constexpr,
        MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, LERP_WEIGHT_SMALL: tl.constexpr,
        LR_IN_MOMENTUM: tl.constexpr, UNSCALE_GRAD: tl.constexpr, ALIGNED: tl.constexpr,
    ):
        """Elements `start + lanes` of the tensor whose table row starts at `entry`, where `mask`
        (None: all of them)."""
        # Every load before any store, as the C++ kernels do. Columns: see _TABLE_WIDTH.
        param_ptrs = _block_pointers(entry + 0, start, lanes, ELEMENT, ALIGNED)
        grad_ptrs = _block_pointers(entry + 1, start, lanes, ELEMENT, ALIGNED)
        square_avg_ptrs = _block_pointers(entry + 2, start, lanes, ELEMENT, ALIGNED)
        p = _load_as_float32(param_ptrs, mask, ELEMENT)
        grad = _load_as_float32(grad_ptrs, mask, ELEMENT)
        v = _load_as_float32(square_avg_ptrs, mask, ELEMENT)
        if CENTERED:
            grad_avg_ptrs = _block_pointers(entry + 3, start, lanes, ELEMENT, ALIGNED)
            m = _load_as_float32(grad_avg_ptrs, mask, ELEMENT)
        if MOMENTUM:
            buffer_ptrs = _block_pointers(entry + 4, start, lanes, ELEMENT, ALIGNED)
            b = _load_as_float32(buffer_ptrs, mask, ELEMENT)

        # csrc/rmsprop_update.h, one float32 operation (one rounding) at a time, in its order.
        if UNSCALE_GRAD:
            grad = tl.math.div_rn(grad, tl.load(grad_scale).to(tl.float32))
        if MAXIMIZE:
            g = -grad
        else:
            g = grad
        if HAS_WEIGHT_DECAY:
            g = g + weight_decay * p  # grad.add(param, alpha=weight_decay)

        # square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
        v = v * alpha
        v = v + one_minus_alpha * g * g

        var = v
        if CENTERED:
            # grad_avg.lerp_(g, 1 - alpha), with torch's two-sided formula
            if LERP_WEIGHT_SMALL:
                m = m + one_minus_alpha * (g - m)
            else:
                m = g - (g - m) * lerp_one_minus_w
            # square_avg.addcmul(grad_avg, grad_avg, value=-1); +inf - m*m stays +inf for a finite m
            # even where m*m overflows, as torch's fused multiply-add gives (rmsprop_update.h)
            finite_m = (m < float("inf")) & (m > float("-inf"))
            var = tl.where((v == float("inf")) & finite_m, v, v - m * m)
        denom = tl.math.sqrt_rn(var + eps_inside_root) + eps_outside_root

        if MOMENTUM:
            b = b * momentum
            if LR_IN_MOMENTUM:  # TF/Keras/timm: b = momentum * b + lr * g / denom; p -= b
                b = b + tl.math.div_rn(lr * g, denom)
                p = p - b
            else:  # torch: b = momentum * b + g / denom; p -= lr * b
                b = b + tl.math.div_rn(g, denom)
                p = p - lr * b
        else:
            p = p - tl.math.div_rn(lr * g, denom)  # param.addcdiv_(g, denom, value=-lr)

        _store_rounded(param_ptrs, p, mask, ELEMENT)
        _store_rounded(square_avg_ptrs, v, mask, ELEMENT)
        if UNSCALE_GRAD:
            _store_rounded(grad_ptrs, grad, mask, ELEMENT)  # AMP: the unscaled grad is kept
        if CENTERED:
            _store_rounded(grad_avg_ptrs, m, mask, ELEMENT)
        if MOMENTUM:
            _store_rounded(buffer_ptrs, b, mask, ELEMENT)

    @triton.jit
    def _rmsprop_kernel(
        table,  # int64 [n_tensors, TABLE_WIDTH]: data pointers and numel of each tensor
        blocks,  # int64 [n_blocks, BLOCK_MAP_WIDTH]: (table row, first element, fast) per program
        lr,  # the learning rate as a float32, unless LR_FROM_TENSOR
        lr_tensor,  # 1-element tensor holding the learning rate, read when LR_FROM_TENSOR
        grad_scale,  # 1-element tensor, read when UNSCALE_GRAD: grads are divided by it
        found_inf,  # 1-element tensor, read when HAS_FOUND_INF: nonzero skips the whole step
        alpha,  # this and the rest: float32, from make_step_scalars (see _step_scalars)
        one_minus_alpha,
        lerp_one_minus_w,
        eps_inside_root,
        eps_outside_root,
        weight_decay,
        momentum,
        ELEMENT: tl.constexpr,  # tl.float32, tl.float16 or tl.bfloat16
        TABLE_WIDTH: tl.constexpr,
        BLOCK_MAP_WIDTH: tl.constexpr,
        CENTERED: tl.constexpr,
        MOMENTUM: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        HAS_WEIGHT_DECAY: tl.constexpr,
        LERP_WEIGHT_SMALL: tl.constexpr,
        LR_IN_MOMENTUM: tl.constexpr,
        LR_FROM_TENSOR: tl.constexpr,
        UNSCALE_GRAD: tl.constexpr,
        HAS_FOUND_INF: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        block = blocks + tl.program_id(0).to(tl.int64) * BLOCK_MAP_WIDTH
        row = tl.load(block + 0)
        start = tl.load(block + 1)
        fast = tl.load(block + 2)
        entry = table + row * TABLE_WIDTH
        lanes = tl.arange(0, BLOCK_SIZE)

        if HAS_FOUND_INF:
            # Any nonzero flag skips the step (GradScaler sums the flags of several devices), and
            # so does NaN: `!=` is an unordered compare. The whole program returns before it reads
            # anything: no host sync, and a branch that all its threads take alike.
            if tl.load(found_inf) != 0:
                return
        if LR_FROM_TENSOR:
            lr = tl.load(lr_tensor).to(tl.float32)  # read on the device: no host sync, capturable

        # One branch per program, taken by all its threads alike. The two calls differ only in
        # what Triton can prove about the accesses: a whole, aligned block needs no bounds mask
        # (a mask against a size loaded from memory would keep every access scalar) and may use
        # 16-byte vectors; a tensor's last block, or any block of a misaligned view, is masked.
        # (In the masked path Triton lays the stores out one element per thread, as it cannot
        # prove them aligned, and moves the results there through shared memory: a cost paid by
        # last blocks and misaligned views only.)
        if fast != 0:
            _update_block(
                entry, start, lanes, None, lr, grad_scale, alpha, one_minus_alpha, lerp_one_minus_w,
                eps_inside_root, eps_outside_root, weight_decay, momentum, ELEMENT, CENTERED,
                MOMENTUM, MAXIMIZE, HAS_WEIGHT_DECAY, LERP_WEIGHT_SMALL, LR_IN_MOMENTUM,
                UNSCALE_GRAD, ALIGNED=True,
            )
        else:
            # How many of the block's elements exist: at most BLOCK_SIZE, so int32 will do.
            remaining = tl.minimum(tl.load(entry + 5) - start, BLOCK_SIZE).to(tl.int32)
            _update_block(
                entry, start, lanes, lanes < remaining, lr, grad_scale, alpha, one_minus_alpha,
                lerp_one_minus_w, eps_inside_root, eps_outside_root, weight_decay, momentum,
                ELEMENT, CENTERED, MOMENTUM, MAXIMIZE, HAS_WEIGHT_DECAY, LERP_WEIGHT_SMALL,
                LR_IN_MOMENTUM, UNSCALE_GRAD, ALIGNED=False,
            )


# Whether `triton.jit` built an interpreted kernel (it reads TRITON_INTERPRET when the kernel is
# defined, i.e. when this module is imported; later changes to the variable have no effect).
_INTERPRETED = triton is not None and not isinstance(_rmsprop_kernel, triton.runtime.JITFunction)


_ELEMENT_TYPES = (
    {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    if triton is not None else {}
)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the Triton kernel can update tensors on `device` here, else the reason."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type == "cpu":
        if _INTERPRETED:
            return None
        return "CPU tensors need TRITON_INTERPRET=1 set before rmsprop_fused's Triton module is imported"
    if device.type != "cuda":
        return f"the Triton kernel updates CUDA tensors, not {device.type} tensors"
    if _INTERPRETED:
        # The interpreter would dereference the table's device pointers on the host.
        return ("TRITON_INTERPRET=1 was set when rmsprop_fused's Triton module was imported, so its "
                "kernel runs in Triton's CPU interpreter, which cannot update CUDA tensors")
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


_float32 = functools.partial(round_to_dtype, dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def _step_scalars(alpha: float, eps: float, weight_decay: float, momentum: float, eps_in_sqrt: bool) -> dict:
    """The float32 scalars of make_step_scalars in csrc/rmsprop_update.h, rounded the same way,
    and the two flags it derives from them (constexprs of the kernel)."""
    one_minus_alpha = _float32(1.0 - alpha)  # torch passes `1 - alpha`: rounded once, from double
    return dict(
        alpha=_float32(alpha),
        one_minus_alpha=one_minus_alpha,
        # float32(1) - one_minus_alpha, a float32 subtraction: computing it in double and rounding
        # once gives the same float32 (double has more than 2 * 24 + 2 bits, so no double rounding).
        lerp_one_minus_w=_float32(1.0 - one_minus_alpha),
        LERP_WEIGHT_SMALL=abs(one_minus_alpha) < 0.5,  # torch's lerp picks its formula by |weight|
        eps_inside_root=_float32(eps) if eps_in_sqrt else 0.0,  # x + 0 == x: the unused one is 0
        eps_outside_root=0.0 if eps_in_sqrt else _float32(eps),
        weight_decay=_float32(weight_decay),
        # torch skips `g + wd * p` when wd == 0 (it matters for an inf p): decided on the double,
        # as a weight decay that rounds to 0 in float32 still adds 0 * p.
        HAS_WEIGHT_DECAY=weight_decay != 0.0,
        momentum=_float32(momentum),
    )


class _LaunchPlan:
    """The pointer table and block map of one set of tensors, on their device (module docstring).

    Both live in one int64 allocation, so building a plan costs one host-to-device copy."""

    def __init__(self, tensor_lists: Sequence[Sequence[Tensor]], columns: Sequence[int], device: torch.device,
                 block_size: int):
        params = tensor_lists[0]
        n = len(params)
        table = torch.zeros(n, _TABLE_WIDTH, dtype=torch.int64)
        for column, tensors in zip(columns, tensor_lists):
            table[:, column] = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
        numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
        table[:, _NUMEL] = numels
        aligned = (table[:, list(columns)] % _ALIGNMENT == 0).all(dim=1)

        blocks_per_tensor = (numels + block_size - 1) // block_size  # none for a zero-size tensor
        rows = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), blocks_per_tensor)
        first_block_of_row = torch.cumsum(blocks_per_tensor, 0) - blocks_per_tensor
        starts = (torch.arange(rows.numel(), dtype=torch.int64) - first_block_of_row[rows]) * block_size
        # A whole block of an aligned tensor starts aligned too: block_size * element size is a
        # multiple of 16 bytes.
        fast = aligned[rows] & (starts + block_size <= numels[rows])
        blocks = torch.stack([rows, starts, fast.to(torch.int64)], dim=1)

        metadata = torch.cat([table.flatten(), blocks.flatten()]).to(device)
        self.table = metadata[: table.numel()]
        self.blocks = metadata[table.numel():]
        self.n_blocks = rows.numel()


def _launch_plan(
    tensor_lists: Sequence[Sequence[Tensor]], columns: Sequence[int], device: torch.device
) -> _LaunchPlan:
    """The cached plan for these tensors where they are now, built on first use.

    The key holds every data pointer and size, so a plan is reused exactly while the table it
    holds is right: replacing any tensor by one elsewhere in memory (a new param, state loaded
    from a checkpoint, `module.to()`) builds a new plan."""
    params = tensor_lists[0]
    key = (
        device, params[0].dtype, BLOCK_SIZE, tuple(columns),
        tuple(t.data_ptr() for tensors in tensor_lists for t in tensors),
        tuple(p.numel() for p in params),
    )
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    plan = _plan_cache.get(key)
    if plan is None:
        if capturing:
            raise RuntimeError(
                "the Triton backend builds the pointer table of a set of tensors on their first step, "
                "with a host-to-device copy that a CUDA graph cannot capture: run one step with "
                "these tensors before capturing (as for any optimizer warm-up)"
            )
        plan = _LaunchPlan(tensor_lists, columns, device, BLOCK_SIZE)
        _plan_cache[key] = plan
        if len(_plan_cache) > _PLAN_CACHE_SIZE:
            _plan_cache.popitem(last=False)
    else:
        _plan_cache.move_to_end(key)
    if capturing:
        _captured_plans[key] = plan
    return plan


def rmsprop_triton(
    params: List[Tensor],
    grads: List[Tensor],
    square_avgs: List[Tensor],
    grad_avgs: List[Tensor],
    momentum_buffers: List[Tensor],
    state_steps: List[Tensor],
    square_avg_scales: List[Tensor],
    grad_avg_scales: List[Tensor],
    momentum_buffer_scales: List[Tensor],
    *,
    lr: Union[float, Tensor],
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    eps_in_sqrt: bool,
    lr_in_momentum: bool,
    decoupled_weight_decay: bool,
    nesterov: bool,
    bias_correction: bool,
    variance_state: bool,
    rounding_seed: Optional[int],
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    clip_coef: Optional[Tensor] = None,
) -> None:
    """One RMSprop step on one (device, dtype) group, already validated by
    :func:`rmsprop_fused.functional.rmsprop` (the signature of the functional entry): a single
    kernel launch, which reads a tensor lr, grad_scale and found_inf on the device."""
    if not params:
        return
    if (square_avgs[0].dtype != params[0].dtype or decoupled_weight_decay or nesterov or bias_correction
            or variance_state or rounding_seed is not None or clip_coef is not None):
        raise NotImplementedError("the Triton kernel does not have this option yet")  # being ported
    if state_steps:
        if found_inf is None:
            torch._foreach_add_(state_steps, 1.0)
        else:
            torch._foreach_add_(state_steps, (found_inf == 0).to(torch.float32))
    tensor_lists, columns = [params, grads, square_avgs], [_PARAM, _GRAD, _SQUARE_AVG]
    if centered:
        tensor_lists.append(grad_avgs)
        columns.append(_GRAD_AVG)
    if momentum > 0:
        tensor_lists.append(momentum_buffers)
        columns.append(_MOMENTUM_BUFFER)
    device = params[0].device
    plan = _launch_plan(tensor_lists, columns, device)
    if plan.n_blocks == 0:
        return  # only zero-size tensors

    lr_from_tensor = isinstance(lr, Tensor)
    # A pointer argument the kernel does not read (its constexpr flag is off) still needs a value.
    unused = plan.table
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _rmsprop_kernel[(plan.n_blocks,)](
            plan.table,
            plan.blocks,
            0.0 if lr_from_tensor else _float32(lr),
            lr if lr_from_tensor else unused,
            unused if grad_scale is None else grad_scale,
            unused if found_inf is None else found_inf,
            **_step_scalars(alpha, eps, weight_decay, momentum, eps_in_sqrt),
            ELEMENT=_ELEMENT_TYPES[params[0].dtype],
            TABLE_WIDTH=_TABLE_WIDTH,
            BLOCK_MAP_WIDTH=_BLOCK_MAP_WIDTH,
            CENTERED=centered,
            MOMENTUM=momentum > 0,
            MAXIMIZE=maximize,
            LR_IN_MOMENTUM=lr_in_momentum,
            LR_FROM_TENSOR=lr_from_tensor,
            UNSCALE_GRAD=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            BLOCK_SIZE=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
