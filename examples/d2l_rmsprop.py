"""The "RMSProp" chapter of Dive into Deep Learning (d2l.ai, section 12.8), run with FusedRMSprop.

    python examples/d2l_rmsprop.py [--data airfoil_self_noise.dat] [--fashion-mnist DIR] [--out examples/out]

d2l writes the update with the leaky average `s` and eps inside the square root,

    s <- gamma * s + (1 - gamma) * g**2
    x <- x - eta * g / sqrt(s + eps)

which is FusedRMSprop(lr=eta, alpha=gamma, eps=eps, eps_in_sqrt=True) (torch.optim.RMSprop puts
eps outside the root). Each part prints what the chapter prints and writes a PNG:

1. weights.png      the weight (1 - gamma) * gamma**t that s gives a gradient seen t steps ago,
                    read off FusedRMSprop's own square_avg after a single unit gradient
2. trajectory.png   f(x) = 0.1 x1^2 + 2 x2^2 from (-5, -2), eta 0.4, gamma 0.9, 20 steps
                    (the chapter: "epoch 20, x1: -0.010599, x2: 0.000000")
3. airfoil.png      linear regression on the airfoil data, the chapter's train_ch11 with d2l's
                    from-scratch rmsprop and with FusedRMSprop, same seed and data order
4. gamma_one.png    exercise 1: gamma = 1 (from d2l's s = 0, and from TF1's s = 1)
   rotated.png      exercise 2: f(x) = 0.1 (x1 + x2)^2 + 2 (x1 - x2)^2
   lr_sweep.png     exercise 3: an MLP on Fashion-MNIST (--fashion-mnist DIR, a local copy: it is
                    never downloaded) or else on scikit-learn's digits, for learning rates over
                    three decades: the loss curves, and the final test accuracy against lr
   gamma_sweep.png  exercise 4: the final loss against gamma, 0.5 to 0.999, on the airfoil
                    regression and on f; and gamma raised during training, changed between steps
                    through the param group, against fixed gammas

The chapter also prints seconds per epoch; this example does not: a step over six numbers
measures Python's overhead, not the optimizer (examples/train.py --compare times step() alone).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from rmsprop_fused import FusedRMSprop

import airfoil
import image_sets

HERE = os.path.dirname(os.path.abspath(__file__))
D2L_EPS = 1e-6


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- 1. weights


def past_gradient_weights(gammas: Sequence[float] = (0.95, 0.9, 0.8, 0.7), steps: int = 40) -> Dict[float, List[float]]:
    """For each gamma, the weight s_t gives the gradient of t steps ago, t = 0..steps-1.

    Measured, not computed: one parameter per gamma (one param group each) gets a gradient of 1
    at the first step and 0 after, so FusedRMSprop's square_avg after step t+1 is exactly the
    weight of that first gradient, (1 - gamma) * gamma**t."""
    params = [torch.zeros(1, dtype=torch.float64, requires_grad=True) for _ in gammas]
    optimizer = FusedRMSprop(
        [{"params": [p], "alpha": gamma} for p, gamma in zip(params, gammas)],
        lr=0.0, eps=D2L_EPS, eps_in_sqrt=True,  # lr 0: only the average matters here
    )
    weights: Dict[float, List[float]] = {gamma: [] for gamma in gammas}
    for t in range(steps):
        for p in params:
            p.grad = torch.full_like(p, 1.0 if t == 0 else 0.0)
        optimizer.step()
        for p, gamma in zip(params, gammas):
            weights[gamma].append(optimizer.state[p]["square_avg"].item())
    return weights


def plot_weights(weights: Dict[float, List[float]], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for gamma, w in weights.items():
        ax.plot(range(len(w)), w, label=f"gamma = {gamma:.2f}")
    ax.set_title("weight of a past gradient in s: (1 - gamma) gamma^t", fontsize=10)
    ax.set_xlabel("t, steps back")
    ax.set_ylabel("weight of the gradient t steps back")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- 2. 2D trajectories


def f_2d(x: torch.Tensor) -> torch.Tensor:
    return 0.1 * x[0] ** 2 + 2 * x[1] ** 2


def f_rotated(x: torch.Tensor) -> torch.Tensor:
    """Exercise 2. In the diagonal coordinates u = (x1 + x2) / sqrt(2), v = (x1 - x2) / sqrt(2)
    this is 0.2 u^2 + 4 v^2: f_2d's 20:1 curvature ratio (both curvatures doubled), along the
    diagonals instead of the axes."""
    return 0.1 * (x[0] + x[1]) ** 2 + 2 * (x[0] - x[1]) ** 2


GammaSchedule = Callable[[int], float]  # step number t = 1, 2, ... -> the gamma of that step


def set_gamma(optimizer: FusedRMSprop, schedule: Optional[GammaSchedule], t: int) -> None:
    """Before step t: gamma (torch's alpha) is read from the param group at every step, so a value
    written there between steps takes effect at once, as in torch.optim.RMSprop."""
    if schedule is not None:
        for group in optimizer.param_groups:
            group["alpha"] = schedule(t)


def trajectory(
    f: Callable[[torch.Tensor], torch.Tensor],
    start: Tuple[float, float] = (-5.0, -2.0),
    eta: float = 0.4,
    gamma: float = 0.9,
    eps: float = D2L_EPS,
    steps: int = 20,
    initial_scale: float = 0.0,
    gamma_schedule: Optional[GammaSchedule] = None,
) -> List[Tuple[float, float]]:
    """d2l's train_2d with FusedRMSprop: the start point and the point after each step. float64,
    as d2l computes with Python floats; the gradient comes from autograd. A gamma_schedule
    replaces the fixed gamma."""
    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = FusedRMSprop([x], lr=eta, alpha=gamma, eps=eps, eps_in_sqrt=True, initial_scale=initial_scale)
    points = [tuple(x.tolist())]
    for t in range(1, steps + 1):
        optimizer.zero_grad()
        f(x).backward()
        set_gamma(optimizer, gamma_schedule, t)
        optimizer.step()
        points.append(tuple(x.tolist()))
    return points


def epoch_line(points: Sequence[Tuple[float, float]], spec: str = "f") -> str:
    """What d2l's train_2d prints after the last step (`spec` "f" as d2l; "g" for huge values)."""
    x1, x2 = points[-1]
    return f"epoch {len(points) - 1}, x1: {x1:{spec}}, x2: {x2:{spec}}"


def plot_trace_2d(f: Callable[[torch.Tensor], torch.Tensor], points: Sequence[Tuple[float, float]], path: str, title: str) -> None:
    """d2l's show_trace_2d: the iterates over the contours of f, on d2l's grid widened to hold
    every iterate."""
    plt = _pyplot()
    xs, ys = zip(*points)
    x1, x2 = torch.meshgrid(
        torch.arange(min(-5.5, min(xs) - 0.5), max(1.0, max(xs) + 0.5), 0.1, dtype=torch.float64),
        torch.arange(min(-3.0, min(ys) - 0.5), max(1.0, max(ys) + 0.5), 0.1, dtype=torch.float64),
        indexing="ij",
    )
    values = f(torch.stack([x1, x2]))
    # Levels at quantiles of f over the grid rather than evenly spaced values: a narrow valley
    # (the rotated problem's) then gets contours too, not only the steep corners.
    levels = torch.quantile(values.flatten(), torch.linspace(0.02, 0.98, 10, dtype=torch.float64)).unique()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.contour(x1.numpy(), x2.numpy(), values.numpy(), levels=levels.numpy(), colors="#1f77b4")
    ax.plot(*zip(*points), "-o", color="#ff7f0e")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- 3. airfoil


@dataclass
class AirfoilRun:
    name: str
    losses: List[Tuple[float, float]]  # (epoch, loss over the whole data set), every 200 examples
    w: torch.Tensor
    b: torch.Tensor

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1]


def squared_loss(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y_hat - y.reshape(y_hat.shape)) ** 2 / 2


class ScratchRMSprop:
    """d2l's from-scratch `rmsprop(params, states, hyperparams)` with its `init_rmsprop_states`,
    wrapped as an object with the optimizer's step()."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float, gamma: float, eps: float = D2L_EPS):
        self.params, self.lr, self.gamma, self.eps = list(params), lr, gamma, eps
        self.states = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        for p, s in zip(self.params, self.states):
            s[:] = self.gamma * s + (1 - self.gamma) * torch.square(p.grad)
            p[:] -= self.lr * p.grad / torch.sqrt(s + self.eps)
            p.grad.zero_()


def train_airfoil(
    X: torch.Tensor,
    y: torch.Tensor,
    optimizer: str,
    *,
    lr: float = 0.01,
    gamma: float = 0.9,
    batch_size: int = 10,
    num_epochs: int = 2,
    seed: int = 0,
    gamma_schedule: Optional[GammaSchedule] = None,
) -> AirfoilRun:
    """d2l's train_ch11: linear regression w ~ N(0, 0.01) (5, 1), b = 0, squared loss, the
    whole-data loss recorded every 200 examples. `optimizer` is "d2l" (the from-scratch update)
    or "fused" (FusedRMSprop, which also takes a gamma_schedule). The seed fixes w and every
    epoch's shuffle, so both optimizers see the same init and the same batches."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.normal(0.0, 0.01, size=(X.shape[1], 1), generator=gen).requires_grad_()
    b = torch.zeros(1, requires_grad=True)
    if optimizer == "d2l" and gamma_schedule is None:
        opt = ScratchRMSprop([w, b], lr=lr, gamma=gamma)
    elif optimizer == "fused":
        opt = FusedRMSprop([w, b], lr=lr, alpha=gamma, eps=D2L_EPS, eps_in_sqrt=True)
    else:
        raise ValueError(f"optimizer must be 'd2l' (without a gamma schedule) or 'fused', not {optimizer!r}")

    def net(features):
        return features @ w + b

    num_batches = math.ceil(len(X) / batch_size)
    losses, n, t = [], 0, 0
    for _ in range(num_epochs):
        for batch in torch.randperm(len(X), generator=gen).split(batch_size):
            loss = squared_loss(net(X[batch]), y[batch]).mean()
            loss.backward()
            t += 1
            set_gamma(opt, gamma_schedule, t)
            opt.step()
            if optimizer == "fused":
                opt.zero_grad()
            n += len(batch)
            if n % 200 == 0:
                with torch.no_grad():  # d2l's evaluate_loss: the mean loss over the whole data set
                    losses.append((n / batch_size / num_batches, squared_loss(net(X), y).mean().item()))
    return AirfoilRun(optimizer, losses, w.detach().clone(), b.detach().clone())


def plot_airfoil(runs: Sequence[AirfoilRun], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for run, style in zip(runs, ("-", "--", ":")):
        ax.plot(*zip(*run.losses), style, label=f"{run.name} (final {run.final_loss:.4f})")
    ax.set_title("airfoil regression: d2l's from-scratch RMSProp and FusedRMSprop", fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss over the whole data set")
    ax.set_ylim(0.22, 0.35)  # d2l's axes
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- 4. exercises


def plot_gamma_one(diverging: Dict[str, List[Tuple[float, float]]], others: Dict[str, List[Tuple[float, float]]], path: str) -> None:
    """|x| against the step, the diverging runs in a panel of their own: on one axis, their |x|
    of 1e64 would squeeze the others flat."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    colours = iter(("#d62728", "#2ca02c", "#1f77b4", "#9467bd"))
    for ax, runs, title in zip(axes, (diverging, others), ("diverges", "converges")):
        for label, points in runs.items():
            distance = [max(math.hypot(*p), 1e-300) for p in points]
            ax.semilogy(range(len(points)), distance, "-o", markersize=3, color=next(colours), label=label)
        ax.set_title(f"f(x) = 0.1 x1^2 + 2 x2^2, eta 0.4: {title}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("distance to the minimum |x|")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- exercise 3: learning rates

LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class SweepRun:
    lr: float
    losses: List[Tuple[float, float]]  # (epoch, mean training loss of the minibatches since the last point)
    test_loss: float
    test_accuracy: float


def train_classifier(data: image_sets.ImageSet, lr: float, *, gamma: float = 0.9, epochs: int = 5,
                     batch_size: int = 256, seed: int = 0) -> SweepRun:
    """d2l's MLP (one hidden layer of 256 ReLUs) trained with FusedRMSprop in the chapter's form
    (eps 1e-6 inside the root), cross-entropy, minibatches in a seeded order; the training loss
    is recorded four times an epoch."""
    torch.manual_seed(seed)
    _, height, width = data.x_train.shape[1:]
    model = nn.Sequential(nn.Flatten(), nn.Linear(height * width, 256), nn.ReLU(), nn.Linear(256, data.num_classes))
    optimizer = FusedRMSprop(model.parameters(), lr=lr, alpha=gamma, eps=D2L_EPS, eps_in_sqrt=True)
    gen = torch.Generator().manual_seed(seed)
    num_batches = math.ceil(len(data.x_train) / batch_size)
    every = max(1, num_batches // 4)
    losses, window, step = [], [], 0
    for _ in range(epochs):
        for batch in torch.randperm(len(data.x_train), generator=gen).split(batch_size):
            loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            window.append(loss.item())
            step += 1
            if len(window) == every:
                losses.append((step / num_batches, sum(window) / len(window)))
                window = []
    with torch.no_grad():
        logits = model(data.x_test)
        test_loss = nn.functional.cross_entropy(logits, data.y_test).item()
        accuracy = (logits.argmax(dim=1) == data.y_test).float().mean().item()
    return SweepRun(lr, losses, test_loss, accuracy)


def best_run(runs: Sequence[SweepRun]) -> SweepRun:
    """The highest test accuracy; among equal accuracies, the lowest test loss."""
    return max(runs, key=lambda run: (run.test_accuracy, -run.test_loss))


def plot_lr_sweep(runs: Sequence[SweepRun], data_name: str, path: str) -> None:
    plt = _pyplot()
    fig, (curves, accuracy) = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.get_cmap("viridis")([i / max(1, len(runs) - 1) for i in range(len(runs))])
    for run, colour in zip(runs, colours):
        curves.semilogy(*zip(*run.losses), color=colour, label=f"lr {run.lr:g}")
    curves.set_title(f"{data_name}: training loss, FusedRMSprop with gamma 0.9", fontsize=9)
    curves.set_xlabel("epoch")
    curves.set_ylabel("cross-entropy (training minibatches)")
    curves.legend(fontsize=7)
    best = best_run(runs)
    accuracy.semilogx([r.lr for r in runs], [r.test_accuracy for r in runs], "-o")
    accuracy.semilogx([best.lr], [best.test_accuracy], "*", markersize=14, color="#d62728",
                      label=f"best: lr {best.lr:g}, {best.test_accuracy:.1%}")
    accuracy.set_title(f"{data_name}: test accuracy after {runs[0].losses[-1][0]:.0f} epochs (higher is better)", fontsize=9)
    accuracy.set_xlabel("learning rate")
    accuracy.set_ylabel("test accuracy")
    accuracy.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- exercise 4: gamma

GAMMAS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
SWEEP_SEEDS = (0, 1, 2)  # the airfoil's batches differ with the seed; its spread shows what is noise


def rising_gamma(t: int, gamma_max: float = 0.999) -> float:
    """gamma_t = 1 - t^-0.8, capped at gamma_max: Adafactor's increasing decay (Shazeer and Stern,
    2018). gamma_1 = 0 makes s = g^2 after the first step, then s averages ever more steps. A
    fixed gamma from s = 0 starts s at (1 - gamma) g^2 instead, which makes the first step
    1 / sqrt(1 - gamma) times longer: 32x at gamma 0.999."""
    return min(gamma_max, 1.0 - t ** -0.8)


@dataclass
class GammaStudy:
    airfoil_losses: Dict[float, List[float]]  # gamma -> the final airfoil loss of each seed
    f_values: Dict[float, float]  # gamma -> f after 20 steps
    schedule_runs: Dict[str, List[AirfoilRun]]  # "fixed 0.9", "fixed 0.999", "rising to 0.999" -> a run per seed
    schedule_f: Dict[str, float]  # the same names -> f after 20 steps


def plot_gamma_sweep(study: GammaStudy, path: str) -> None:
    plt = _pyplot()
    fig, (sweep, quadratic, schedule) = plt.subplots(1, 3, figsize=(13, 3.8))
    gammas = list(study.airfoil_losses)
    x = [1 - g for g in gammas]  # log(1 - gamma): 0.5, 0.9, 0.99 and 0.999 evenly apart
    for seed_index in range(len(study.airfoil_losses[gammas[0]])):
        sweep.semilogx(x, [study.airfoil_losses[g][seed_index] for g in gammas], "o", color="#1f77b4", alpha=0.5,
                       label="one seed" if seed_index == 0 else None)
    sweep.semilogx(x, [statistics.mean(study.airfoil_losses[g]) for g in gammas], "-", color="#1f77b4", label="mean over seeds")
    sweep.set_title("airfoil, lr 0.01, 2 epochs: final loss (lower is better)", fontsize=9)
    sweep.set_ylabel("loss over the whole data set")
    quadratic.loglog(x, [max(study.f_values[g], 1e-300) for g in gammas], "-o", color="#ff7f0e")
    quadratic.set_title("f(x) = 0.1 x1^2 + 2 x2^2, eta 0.4: f after 20 steps", fontsize=9)
    quadratic.set_ylabel("f(x)")
    sweep.legend(fontsize=8)
    for ax in (sweep, quadratic):
        ax.set_xticks(x, [f"{g:g}" for g in gammas], fontsize=7)
        ax.minorticks_off()
        ax.invert_xaxis()  # gamma grows to the right
        ax.set_xlabel("gamma (on a log scale of 1 - gamma)")
    for (label, runs), style in zip(study.schedule_runs.items(), ("-", "--", ":")):
        schedule.plot(*zip(*runs[0].losses), style, label=f"{label} (final {runs[0].final_loss:.4f})")
    schedule.set_title("airfoil, seed 0: gamma raised during training vs fixed", fontsize=9)
    schedule.set_xlabel("epoch")
    schedule.set_ylabel("loss over the whole data set")
    schedule.set_ylim(0.22, 0.5)
    schedule.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def exercise_3(fashion_mnist: Optional[str], path: str, seed: int = 0) -> Optional[List[SweepRun]]:
    """The learning-rate sweep, printed and plotted; None when there is no data to run it on."""
    if fashion_mnist is not None:
        data, settings = image_sets.load_fashion_mnist(fashion_mnist), dict(epochs=5, batch_size=256)
    else:
        try:
            data, settings = image_sets.load_digits(seed), dict(epochs=10, batch_size=32)
        except ImportError as e:
            print(f"4c. Exercise 3 skipped: no --fashion-mnist DIR, and {e}")
            return None
    print(f"4c. Exercise 3: learning rates on {data.name}, an MLP (256 hidden units), FusedRMSprop with gamma 0.9,\n"
          f"    {settings['epochs']} epochs of batches of {settings['batch_size']} each:")
    if fashion_mnist is None:
        print("   (no --fashion-mnist DIR given, and these machines cannot download it: the sweep runs on\n"
              f"   scikit-learn's 8x8 digits, {len(data.x_train)} training and {len(data.x_test)} test images)")
    runs = [train_classifier(data, lr, seed=seed, **settings) for lr in LEARNING_RATES]
    print(f"   {'lr':>8}  {'first loss':>10}  {'final loss':>10}  {'test loss':>9}  {'test accuracy':>13}")
    for run in runs:
        print(f"   {run.lr:>8g}  {run.losses[0][1]:>10.4f}  {run.losses[-1][1]:>10.4f}  {run.test_loss:>9.4f}  {run.test_accuracy:>13.1%}")
    best = best_run(runs)
    print(f"   best: lr {best.lr:g}, test accuracy {best.test_accuracy:.1%} (the training loss is the mean over the last\n"
          "   quarter epoch's minibatches; the first is the first quarter's)")
    plot_lr_sweep(runs, data.name, path)
    return runs


def exercise_4(X: torch.Tensor, y: torch.Tensor, path: str) -> GammaStudy:
    """The gamma sweep and the gamma schedule, printed and plotted."""
    def f_end(points):
        return f_2d(torch.tensor(points[-1], dtype=torch.float64)).item()

    print(f"4d. Exercise 4: gamma from {GAMMAS[0]} to {GAMMAS[-1]}. Airfoil: final loss, mean [min-max] over seeds "
          f"{', '.join(map(str, SWEEP_SEEDS))};\n    f: its value after 20 steps from (-5, -2), eta 0.4:")
    airfoil_losses = {g: [train_airfoil(X, y, "fused", gamma=g, seed=s).final_loss for s in SWEEP_SEEDS] for g in GAMMAS}
    f_values = {g: f_end(trajectory(f_2d, gamma=g)) for g in GAMMAS}
    for g in GAMMAS:
        losses = airfoil_losses[g]
        print(f"   gamma {g:<6} airfoil {statistics.mean(losses):.4f} [{min(losses):.4f}-{max(losses):.4f}]   f {f_values[g]:.2e}")
    print("   How sensitive: on the airfoil hardly, up to 0.99 the final loss moves less than it does from seed to\n"
          "   seed, and only 0.999 ends worse and more scattered. On f very: with a short memory s follows g^2, so\n"
          "   each step is about eta long however small the gradient (at 0.5, x2 still jumps from side to side of\n"
          "   the minimum); with a long one s keeps the early, larger gradients and the steps shrink with the\n"
          "   gradient, as in gradient descent.")

    gamma_max = GAMMAS[-1]
    rising = functools.partial(rising_gamma, gamma_max=gamma_max)
    candidates = {"fixed 0.9": dict(gamma=0.9), f"fixed {gamma_max}": dict(gamma=gamma_max),
                  f"rising to {gamma_max}": dict(gamma_schedule=rising)}
    schedule_runs = {name: [train_airfoil(X, y, "fused", seed=s, **kw) for s in SWEEP_SEEDS] for name, kw in candidates.items()}
    schedule_f = {name: f_end(trajectory(f_2d, **kw)) for name, kw in candidates.items()}
    print(f"   gamma raised during training, gamma_t = min({gamma_max}, 1 - t^-0.8) (Adafactor's), set in the param\n"
          "   group before every step, against fixed gammas. Airfoil: loss after the first 200 examples and final;\n"
          "   f after 20 steps:")
    for name, runs in schedule_runs.items():
        finals = [run.final_loss for run in runs]
        print(f"   {name:<16} airfoil first {statistics.mean(run.losses[0][1] for run in runs):.4f}, final "
              f"{statistics.mean(finals):.4f} [{min(finals):.4f}-{max(finals):.4f}]   f {schedule_f[name]:.2e}")
    print("   Beneficial? Not here. Raising gamma ends where a fixed 0.9 ends on the airfoil, gets there more\n"
          "   slowly, and is slower on f. Its first steps are plain normalised ones (s = g^2 after the first); a\n"
          "   fixed gamma starting from s = 0 makes step t 1 / sqrt(1 - gamma^t) times longer (for a steady\n"
          "   gradient), a built-in large early learning rate that both problems like. What the schedule does\n"
          "   repair is fixed 0.999's worse, more scattered end.")
    study = GammaStudy(airfoil_losses, f_values, schedule_runs, schedule_f)
    plot_gamma_sweep(study, path)
    return study


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="airfoil_self_noise.dat (default: ../shared/data beside the checkout, else tests/data/, "
                        "else an earlier download, else downloaded; examples/airfoil.py)")
    parser.add_argument("--fashion-mnist", metavar="DIR", help="a local Fashion-MNIST for exercise 3: the four idx files (.gz or "
                        "not), bare or in torchvision's FashionMNIST/raw/ under DIR (default: scikit-learn's digits instead)")
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="directory for the PNGs (default: examples/out)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    out = lambda name: os.path.join(args.out, name)  # noqa: E731

    print("1. Weight that the leaky average gives the gradient of t steps ago, (1 - gamma) gamma^t:")
    weights = past_gradient_weights()
    for gamma, w in weights.items():
        print(f"   gamma = {gamma:.2f}: t=0 {w[0]:.4f}, t=10 {w[10]:.4f}, t=39 {w[39]:.2e}, sum over 40 steps {sum(w):.4f}")
    plot_weights(weights, out("weights.png"))

    print("2. f(x) = 0.1 x1^2 + 2 x2^2 from (-5, -2), eta 0.4, gamma 0.9, eps 1e-6 inside the root:")
    points = trajectory(f_2d)
    print("   " + epoch_line(points))
    plot_trace_2d(f_2d, points, out("trajectory.png"), "RMSProp, eta 0.4, gamma 0.9")

    print("3. Airfoil linear regression, batch 10, lr 0.01, gamma 0.9, 2 epochs, same seed and data order:")
    X, y = airfoil.load(args.data)
    runs = [train_airfoil(X, y, name, seed=args.seed) for name in ("d2l", "fused")]
    for run in runs:
        print(f"   {run.name:<6} loss: {run.final_loss:.3f}")
    gap = max(abs(a[1] - b[1]) for a, b in zip(runs[0].losses, runs[1].losses))
    print(f"   largest difference between the two loss curves: {gap:.2e}")
    plot_airfoil(runs, out("airfoil.png"))

    print("4a. Exercise 1: gamma = 1.")
    diverging = trajectory(f_2d, gamma=1.0)
    ones_init = trajectory(f_2d, gamma=1.0, initial_scale=1.0)
    print("   " + epoch_line(diverging, "g").replace(", x1", " (s starts at 0, as in d2l), x1"))
    print("   With gamma = 1 the average never takes in a gradient: s keeps its initial value, so every step\n"
          "   is plain gradient descent with learning rate eta / sqrt(s0 + eps). From d2l's s0 = 0 that is\n"
          f"   0.4 / sqrt(1e-6) = 400: x1 is multiplied by 1 - 400 * 0.2 = -79 and x2 by 1 - 400 * 4 = -1599\n"
          f"   each step, and |x| grows from 5.4 to {math.hypot(*diverging[-1]):.3g} in 20 steps.")
    print(f"   {epoch_line(ones_init).replace(', x1', ' (s starts at 1, as in TF1), x1')}: gradient descent with lr 0.4,\n"
          "   x2 oscillates (factor -0.6) and x1 crawls (factor 0.92): no per-coordinate scaling at all.")
    plot_gamma_one({"gamma 1, s0 = 0 (d2l)": diverging}, {"gamma 1, s0 = 1 (TF1)": ones_init, "gamma 0.9, s0 = 0": points},
                   out("gamma_one.png"))

    print("4b. Exercise 2: rotated problem f(x) = 0.1 (x1 + x2)^2 + 2 (x1 - x2)^2, same settings:")
    rotated = trajectory(f_rotated)
    x_end = torch.tensor(rotated[-1], dtype=torch.float64)
    print(f"   {epoch_line(rotated)}, f = {f_rotated(x_end).item():.6f} "
          f"(axis-aligned problem: f = {f_2d(torch.tensor(points[-1], dtype=torch.float64)).item():.6f})")
    print("   RMSProp scales each coordinate by its own gradient history. On the axis-aligned problem that\n"
          "   undoes the 20x curvature ratio; rotated, each coordinate mixes the steep and the flat direction,\n"
          "   the scaling cannot separate them, and after dropping into the valley x1 = x2 the iterates\n"
          "   creep along it: still far from the minimum after 20 steps.")
    plot_trace_2d(f_rotated, rotated, out("rotated.png"), "rotated problem, eta 0.4, gamma 0.9")

    exercise_3(args.fashion_mnist, out("lr_sweep.png"), args.seed)
    exercise_4(X, y, out("gamma_sweep.png"))
    print(f"figures in {os.path.abspath(args.out)}: weights.png trajectory.png airfoil.png gamma_one.png rotated.png "
          "lr_sweep.png gamma_sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
