"""A training script that swaps torch.optim.RMSprop for FusedRMSprop.

    python examples/train.py --optimizer fused                  # MLP regression on the airfoil set
    python examples/train.py --optimizer torch --amp            # bf16 autocast on CPU
    python examples/train.py --device cuda --amp --backend cuda # fp16 autocast + GradScaler on a GPU
    python examples/train.py --compare                          # both optimizers, same seed, side by side,
                                                                # and the time of one optimizer.step() each
    python examples/train.py --dataset digits                   # a small convnet (needs scikit-learn)

The swap is one line (see make_optimizer): FusedRMSprop takes torch.optim.RMSprop's arguments and
keeps its state, so everything else in the loop, GradScaler included, stays as it is.

Data, offline: `airfoil` (default) is the NASA airfoil self-noise set (examples/airfoil.py finds or
fetches it), standardised, 80/20 train/test split, a 5-64-64-1 MLP with mean squared error;
`digits` is scikit-learn's bundled 8x8 digits (1797 images), a two-layer convnet, cross-entropy.

AMP: on CUDA, float16 autocast with a GradScaler. On CPU, bfloat16 autocast (CPU autocast has no
float16 matmul path worth using), with torch.amp.GradScaler("cpu") as well. bfloat16 has float32's
exponent range, so it needs no loss scaling; the scaler is kept so that one loop serves both
devices and, with FusedRMSprop, the step takes the scale and the inf flag and unscales inside its
single pass (`_step_supports_amp_scaling`) instead of a separate unscale pass. On a CPU this shows
the mechanics, not a speed-up: for matrices this small, bf16 matmuls cost milliseconds each
(measured on a 2-core Xeon with torch 2.14), far more than the float32 ones they replace.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from rmsprop_fused import FusedRMSprop

import airfoil
import image_sets


@dataclass
class Task:
    """A data set split in two and the model and loss to train on it."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    make_model: Callable[[], nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric_name: str
    metric: Callable[[torch.Tensor, torch.Tensor], float]


def airfoil_task(data: Optional[str] = None, seed: int = 0) -> Task:
    X, y = airfoil.load(data, n=None)  # all 1503 rows, standardised as d2l does
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(X))
    train, test = order[:split], order[split:]
    y = y.unsqueeze(1)

    def make_model():
        return nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    def rmse(pred, target):  # in standard deviations of the target
        return math.sqrt(nn.functional.mse_loss(pred.float(), target).item())

    return Task("airfoil", X[train], y[train], X[test], y[test], make_model, nn.functional.mse_loss, "rmse", rmse)


def digits_task(seed: int = 0) -> Task:
    try:
        digits = image_sets.load_digits(seed)  # (1797, 1, 8, 8), split 80/20
    except ImportError as e:
        raise SystemExit(f"--dataset digits: {e}; or use --dataset airfoil")

    def make_model():
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 4 x 4
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )

    def accuracy(logits, target):
        return (logits.argmax(dim=1) == target).float().mean().item()

    return Task("digits", digits.x_train, digits.y_train, digits.x_test, digits.y_test, make_model,
                nn.functional.cross_entropy, "accuracy", accuracy)


def make_optimizer(name: str, params, *, lr: float, alpha: float, momentum: float, centered: bool, backend: str):
    if name == "torch":
        return torch.optim.RMSprop(params, lr=lr, alpha=alpha, momentum=momentum, centered=centered)
    if name == "fused":
        return FusedRMSprop(params, lr=lr, alpha=alpha, momentum=momentum, centered=centered, backend=backend)
    raise ValueError(f"--optimizer must be torch or fused, not {name!r}")


@dataclass
class History:
    optimizer: str
    step_losses: List[float] = field(default_factory=list)
    epoch_losses: List[float] = field(default_factory=list)
    test_metrics: List[float] = field(default_factory=list)
    skipped_steps: int = 0
    step_seconds: List[float] = field(default_factory=list)  # optimizer.step() alone (compare)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    task: Task,
    optimizer_name: str,
    *,
    device: str = "cpu",
    backend: str = "auto",
    amp: bool = False,
    epochs: int = 5,
    steps: Optional[int] = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    alpha: float = 0.99,
    momentum: float = 0.0,
    centered: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> History:
    """Trains a fresh model; `steps` caps the total number of optimizer steps. The seed fixes the
    init and the order of the batches, so two runs that differ only in the optimizer see the same
    data in the same order."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = task.make_model().to(device)
    optimizer = make_optimizer(optimizer_name, model.parameters(), lr=lr, alpha=alpha, momentum=momentum, centered=centered, backend=backend)
    # CUDA: float16 autocast needs loss scaling. CPU: bfloat16 (module docstring on the scaler).
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    x_train, y_train = task.x_train.to(device), task.y_train.to(device)
    x_test, y_test = task.x_test.to(device), task.y_test.to(device)
    order_gen = torch.Generator().manual_seed(seed + 1)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp else contextlib.nullcontext()

    history = History(optimizer_name)
    total_steps = 0
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []  # kept on the device: reading each loss would synchronise every step
        for batch in torch.randperm(len(x_train), generator=order_gen).split(batch_size):
            if steps is not None and total_steps >= steps:
                break
            batch = batch.to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = task.loss_fn(model(x_train[batch]), y_train[batch])
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # with inf/NaN grads: no update, and the scale is backed off
            scaler.update()
            losses.append(loss.detach())
            total_steps += 1
        if not losses:
            break
        step_losses = torch.stack(losses).float().tolist()
        history.step_losses += step_losses
        history.epoch_losses.append(sum(step_losses) / len(step_losses))
        model.eval()
        with torch.no_grad(), autocast():
            history.test_metrics.append(task.metric(model(x_test), y_test))
        # Both optimizers count only the steps they took (GradScaler skips torch's step; FusedRMSprop
        # adds found_inf == 0 on the device), so this needs no synchronisation inside the loop.
        history.skipped_steps = total_steps - int(optimizer.state[next(model.parameters())]["step"])
        log(f"epoch {epoch:>3}  train loss {history.epoch_losses[-1]:.5f}  test {task.metric_name} "
            f"{history.test_metrics[-1]:.4f}  ({len(step_losses)} steps)")
    return history


WARMUP_STEPS = 50


def _machine(device: torch.device) -> str:
    """What a CPU timing depends on: torch's threads and the load. Under load, each parallel region
    of torch's step (its sqrt opens one even for 4,096 elements) can wait for a preempted thread."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return f"CPU, {torch.get_num_threads()} threads{load}"


def time_optimizer_steps(
    task: Task,
    optimizer_names: Sequence[str],
    *,
    rounds: int = 1000,
    warmup: int = WARMUP_STEPS,
    device: str = "cpu",
    backend: str = "auto",
    lr: float = 1e-3,
    alpha: float = 0.99,
    momentum: float = 0.0,
    centered: bool = False,
    seed: int = 0,
) -> Dict[str, List[float]]:
    """The seconds of each `optimizer.step()` alone, `rounds` per optimizer after `warmup` (which
    creates the state). A step of a model this small takes microseconds, lost in the time of a
    training step (data, forward, backward), so it is timed by itself: every optimizer steps its
    own copy of the model's params with the gradients of one batch, and they take turns, one step
    each per round in a rotating order, so that load from other processes slows them alike."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = task.make_model().to(device)
    task.loss_fn(model(task.x_train[:32].to(device)), task.y_train[:32].to(device)).backward()
    steps = []
    for name in optimizer_names:
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for clone, p in zip(params, model.parameters()):
            clone.grad = p.grad.clone()
        steps.append(make_optimizer(name, params, lr=lr, alpha=alpha, momentum=momentum, centered=centered, backend=backend).step)
    times: Dict[str, List[float]] = {name: [] for name in optimizer_names}
    for r in range(warmup + rounds):
        for k in range(len(steps)):
            i = (r + k) % len(steps)
            _sync(device)
            began = time.perf_counter()
            steps[i]()
            _sync(device)
            if r >= warmup:
                times[optimizer_names[i]].append(time.perf_counter() - began)
    return times


def compare(task: Task, log: Callable[[str], None] = print, timing_rounds: int = 1000, **kwargs) -> Sequence[History]:
    """torch.optim.RMSprop and FusedRMSprop from the same seed: the per-epoch losses side by
    side, the largest difference between the two per-step loss curves, and the median time of
    one optimizer.step() of each (time_optimizer_steps; 0 rounds: not timed)."""
    names = ("torch", "fused")
    runs = [train(task, name, log=lambda line: None, **kwargs) for name in names]
    torch_run, fused_run = runs
    log(f"{'epoch':>5}  {'torch loss':>12}  {'fused loss':>12}  {'difference':>10}")
    for epoch, (a, b) in enumerate(zip(torch_run.epoch_losses, fused_run.epoch_losses), 1):
        log(f"{epoch:>5}  {a:>12.6f}  {b:>12.6f}  {b - a:>10.2e}")
    gap = max_difference(torch_run.step_losses, fused_run.step_losses)
    log(f"largest difference between the per-step loss curves ({len(torch_run.step_losses)} steps): {gap:.3e}")
    if timing_rounds > 0:
        options = {k: kwargs[k] for k in ("device", "backend", "lr", "alpha", "momentum", "centered", "seed") if k in kwargs}
        times = time_optimizer_steps(task, names, rounds=timing_rounds, **options)
        for run, name in zip(runs, names):
            run.step_seconds = times[name]
        medians = {name: statistics.median(t) for name, t in times.items()}
        log(f"optimizer.step() alone, median of {timing_rounds} steps each (taking turns, after {WARMUP_STEPS} warm-up "
            f"steps; {_machine(torch.device(kwargs.get('device', 'cpu')))}):")
        for name, label in zip(names, ("torch.optim.RMSprop", "FusedRMSprop")):
            q1, _, q3 = statistics.quantiles(times[name], n=4)
            log(f"  {label:<20} {medians[name] * 1e6:8.1f} us  (quartiles {q1 * 1e6:.1f}-{q3 * 1e6:.1f} us)")
        log(f"  FusedRMSprop's step is {medians['torch'] / medians['fused']:.2f}x as fast")
    return runs


def max_difference(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) != len(b):
        raise ValueError(f"the curves have {len(a)} and {len(b)} points")
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=("torch", "fused"), default="fused")
    parser.add_argument("--backend", default="auto", help="FusedRMSprop backend: auto, cpu, cuda, triton, reference")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU) with a GradScaler")
    parser.add_argument("--compare", action="store_true", help="run torch and fused from the same seed and print both loss curves")
    parser.add_argument("--dataset", choices=("airfoil", "digits"), default="airfoil")
    parser.add_argument("--data", help="airfoil_self_noise.dat (default: ../shared/data beside the checkout, else downloaded)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, help="stop after this many optimizer steps in total")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=0.99)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--centered", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    task = airfoil_task(args.data, args.seed) if args.dataset == "airfoil" else digits_task(args.seed)
    kwargs = dict(device=args.device, backend=args.backend, amp=args.amp, epochs=args.epochs, steps=args.steps,
                  batch_size=args.batch_size, lr=args.lr, alpha=args.alpha, momentum=args.momentum,
                  centered=args.centered, seed=args.seed)
    amp = f", AMP {'fp16' if torch.device(args.device).type == 'cuda' else 'bf16'}" if args.amp else ""
    print(f"{task.name}: {len(task.x_train)} train / {len(task.x_test)} test examples on {args.device}{amp}")
    if args.compare:
        compare(task, **kwargs)
    else:
        print(f"optimizer: {'torch.optim.RMSprop' if args.optimizer == 'torch' else f'FusedRMSprop (backend {args.backend})'}")
        history = train(task, args.optimizer, **kwargs)
        if args.amp:
            print(f"steps skipped by the GradScaler (inf/NaN gradients): {history.skipped_steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
