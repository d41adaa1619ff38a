"""The training run of tests/test_reliability_long_run.py.

Imported by the test, and run as a script to resume a checkpoint in a fresh process:

    python tests/long_run.py CHECKPOINT OUTPUT

Both use exactly this code, so a difference between the resumed and the uninterrupted run can
only come from what the checkpoint carries (or fails to carry).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from rmsprop_fused import FusedRMSprop

STEPS = 10_000
CHECKPOINT_AT = 5_000
CHECK_EVERY = 500
# A stable run: lr 1e-3 and fresh noisy batches keep the centered variance well away from zero.
# (With lr 1e-2, or converged on a fixed batch, centered RMSprop amplifies any one-ulp difference
# exponentially: two runs of the same maths, rounded differently, part ways within ~2000 steps.)
OPTIONS = dict(lr=1e-3, alpha=0.99, eps=1e-8, momentum=0.9, centered=True, weight_decay=1e-4)
_TRUE_WEIGHTS = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def batch(step: int):
    """The batch of `step`, from a generator seeded by the step alone: a resumed run needs no RNG
    state from the checkpoint, and every step sees fresh noise."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x @ _TRUE_WEIGHTS) + 0.1 * torch.randn(16, 1, generator=gen, dtype=torch.float64)
    return x, y


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    x, y = batch(step)
    optimizer.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    optimizer.step()
    return loss.item()


def fused_optimizer(model: nn.Module) -> FusedRMSprop:
    return FusedRMSprop(model.parameters(), backend="cpu", **OPTIONS)


def resume(checkpoint: str, output: str) -> None:
    torch.set_num_threads(1)  # as the uninterrupted run (see the test's module docstring)
    # weights_only=True (torch.load's default): the optimizer state_dict must be plain data
    saved = torch.load(checkpoint, weights_only=True)
    model = make_model()
    model.load_state_dict(saved["model"])
    optimizer = fused_optimizer(model)
    optimizer.load_state_dict(saved["optimizer"])
    for step in range(saved["step"], STEPS):
        train_step(model, optimizer, step)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, output)


if __name__ == "__main__":
    resume(sys.argv[1], sys.argv[2])
