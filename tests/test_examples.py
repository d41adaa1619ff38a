"""The examples against the chapter's formulas, recomputed here independently in float64: the
weights (1 - gamma) gamma^t, the 2D trajectories (d2l's rmsprop_2d loop with hand-written
gradients), the airfoil regression (d2l's update in float64 on the same init and batches), the
exercises; and the training script's optimizer swap. Figures must be written as PNG files."""

import io
import math
import os
import shutil
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import airfoil  # noqa: E402
import d2l_rmsprop as d2l  # noqa: E402
import train  # noqa: E402

# The tests' own copy (tests/data/README.md), checked against the data set's SHA-1 by find().
DATA = airfoil.find(os.path.join(ROOT, "tests", "data", airfoil.FILE_NAME))


def rmsprop_2d(grad, start=(-5.0, -2.0), eta=0.4, gamma=0.9, eps=1e-6, steps=20, s0=0.0):
    """d2l's rmsprop_2d and train_2d, Python floats (float64), the gradient written out by hand."""
    x1, x2 = start
    s1 = s2 = s0
    points = [(x1, x2)]
    for _ in range(steps):
        g1, g2 = grad(x1, x2)
        s1 = gamma * s1 + (1 - gamma) * g1**2
        s2 = gamma * s2 + (1 - gamma) * g2**2
        x1 -= eta / math.sqrt(s1 + eps) * g1
        x2 -= eta / math.sqrt(s2 + eps) * g2
        points.append((x1, x2))
    return points


def grad_2d(x1, x2):
    return 0.2 * x1, 4 * x2


def grad_rotated(x1, x2):  # d/dx of 0.1 (x1 + x2)^2 + 2 (x1 - x2)^2
    return 0.2 * (x1 + x2) + 4 * (x1 - x2), 0.2 * (x1 + x2) - 4 * (x1 - x2)


def assert_points_close(actual, expected, rel=1e-12):
    assert len(actual) == len(expected)
    for (a1, a2), (e1, e2) in zip(actual, expected):
        scale = max(1.0, abs(e1), abs(e2))
        assert abs(a1 - e1) <= rel * scale and abs(a2 - e2) <= rel * scale, ((a1, a2), (e1, e2))


# ----------------------------------------------------------------------------- 1. weights


def test_past_gradient_weights_are_one_minus_gamma_times_gamma_to_the_t():
    weights = d2l.past_gradient_weights()
    assert list(weights) == [0.95, 0.9, 0.8, 0.7]
    for gamma, w in weights.items():
        assert len(w) == 40
        for t, value in enumerate(w):
            assert value == pytest.approx((1 - gamma) * gamma**t, rel=1e-12, abs=0)


# ----------------------------------------------------------------------------- 2. trajectory


def test_trajectory_matches_d2l_and_prints_the_chapters_line():
    points = d2l.trajectory(d2l.f_2d)
    assert_points_close(points, rmsprop_2d(grad_2d))
    assert d2l.epoch_line(points) == "epoch 20, x1: -0.010599, x2: 0.000000"  # as printed in d2l 12.8


def test_other_settings_follow_the_same_formula():
    assert_points_close(d2l.trajectory(d2l.f_2d, eta=0.1, gamma=0.5, steps=7), rmsprop_2d(grad_2d, eta=0.1, gamma=0.5, steps=7))


# ----------------------------------------------------------------------------- 4. exercises


def test_gamma_one_is_gradient_descent_with_lr_eta_over_sqrt_eps():
    points = d2l.trajectory(d2l.f_2d, gamma=1.0)
    assert_points_close(points, rmsprop_2d(grad_2d, gamma=1.0))
    # s never moves from 0: each step multiplies x1 by 1 - 400 * 0.2 and x2 by 1 - 400 * 4
    for (a1, a2), (b1, b2) in zip(points, points[1:]):
        assert b1 / a1 == pytest.approx(-79.0, rel=1e-9) and b2 / a2 == pytest.approx(-1599.0, rel=1e-9)
    tf1 = d2l.trajectory(d2l.f_2d, gamma=1.0, initial_scale=1.0)
    assert_points_close(tf1, rmsprop_2d(grad_2d, gamma=1.0, s0=1.0))


def test_rotated_problem_matches_the_formula():
    points = d2l.trajectory(d2l.f_rotated)
    assert_points_close(points, rmsprop_2d(grad_rotated))
    x1, x2 = points[-1]
    assert 0.1 * (x1 + x2) ** 2 + 2 * (x1 - x2) ** 2 > 0.1  # far from converged, unlike the axis-aligned problem


# ----------------------------------------------------------------------------- 3. airfoil


def test_airfoil_is_standardised_as_d2l_does():
    X, y = airfoil.load(DATA)
    raw = np.loadtxt(DATA, delimiter="\t", dtype=np.float64)
    assert raw.shape == (1503, 6)
    expected = (raw - raw.mean(axis=0)) / raw.std(axis=0)  # population std, all 1503 rows
    assert X.shape == (1500, 5) and y.shape == (1500,) and X.dtype == torch.float32
    # d2l standardises in float32, and numpy sums a float32 column along axis 0 one row at a time:
    # the velocity column's mean is off by 2.7e-4 (5e-6 relative), 1.7e-5 after dividing by its std.
    np.testing.assert_allclose(X.numpy(), expected[:1500, :5], rtol=0, atol=5e-5)
    np.testing.assert_allclose(y.numpy(), expected[:1500, 5], rtol=0, atol=5e-5)


def d2l_regression_float64(X, y, seed=0, lr=0.01, gamma=0.9, eps=1e-6, batch_size=10, num_epochs=2):
    """The chapter's linear regression with its from-scratch rmsprop, in float64, the gradient
    written out: dL/dw = X^T (Xw + b - y) / n for L = mean((Xw + b - y)^2 / 2). The same seed
    protocol as the example: w from torch.normal, then one randperm per epoch."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.normal(0.0, 0.01, size=(X.shape[1], 1), generator=gen).double()
    b = torch.zeros(1, dtype=torch.float64)
    s_w, s_b = torch.zeros_like(w), torch.zeros_like(b)
    X, y = X.double(), y.double().reshape(-1, 1)
    losses = []
    n = 0
    for _ in range(num_epochs):
        for batch in torch.randperm(len(X), generator=gen).split(batch_size):
            residual = X[batch] @ w + b - y[batch]
            g_w = X[batch].T @ residual / len(batch)
            g_b = residual.mean(0)
            s_w = gamma * s_w + (1 - gamma) * g_w**2
            s_b = gamma * s_b + (1 - gamma) * g_b**2
            w = w - lr * g_w / torch.sqrt(s_w + eps)
            b = b - lr * g_b / torch.sqrt(s_b + eps)
            n += len(batch)
            if n % 200 == 0:
                losses.append(((X @ w + b - y) ** 2 / 2).mean().item())
    return w, b, losses


@pytest.mark.parametrize("optimizer", ["d2l", "fused"])
def test_airfoil_regression_matches_the_float64_formula(optimizer):
    X, y = airfoil.load(DATA)
    run = d2l.train_airfoil(X, y, optimizer, seed=3)
    w, b, losses = d2l_regression_float64(X, y, seed=3)
    assert len(run.losses) == len(losses) == 15  # every 200 of 3000 examples
    assert [e for e, _ in run.losses] == pytest.approx([200 * k / 1500 for k in range(1, 16)])
    # float32 training against float64: the gap is rounding, far below the loss's scale
    assert [l for _, l in run.losses] == pytest.approx(losses, rel=1e-4)
    torch.testing.assert_close(run.w.double(), w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run.b.double(), b, rtol=1e-4, atol=1e-5)
    assert 0.2 < run.final_loss < 0.3  # the chapter reports about 0.24


def test_airfoil_download_checks_the_sha1(tmp_path):
    good = tmp_path / "served.dat"
    shutil.copy(DATA, good)
    path = airfoil.download(str(tmp_path / "cache"), url=good.as_uri())
    assert airfoil.sha1(path) == airfoil.SHA1
    bad = tmp_path / "tampered.dat"
    bad.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match="SHA-1"):
        airfoil.download(str(tmp_path / "cache2"), url=bad.as_uri())
    assert os.listdir(tmp_path / "cache2") == []  # nothing half-written is left to pose as the data
    with pytest.raises(ValueError, match="SHA-1"):
        airfoil.find(str(bad))
    with pytest.raises(FileNotFoundError):
        airfoil.find(str(tmp_path / "missing.dat"))


def test_d2l_main_prints_the_results_and_writes_every_figure(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        assert d2l.main(["--data", DATA, "--out", str(tmp_path)]) == 0
    text = out.getvalue()
    assert "epoch 20, x1: -0.010599, x2: 0.000000" in text
    assert "d2l    loss: 0.2" in text and "fused  loss: 0.2" in text
    assert "sec/epoch" not in text  # a step over six numbers times Python, not the optimizer
    for name in ("weights", "trajectory", "airfoil", "gamma_one", "rotated"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name


# ----------------------------------------------------------------------------- training script


def test_train_swaps_the_optimizer_and_the_curves_agree():
    task = train.airfoil_task(DATA)
    kwargs = dict(epochs=2, steps=50, momentum=0.9, centered=True)
    runs = train.compare(task, log=lambda line: None, timing_rounds=30, **kwargs)
    assert [r.optimizer for r in runs] == ["torch", "fused"]
    assert len(runs[0].step_losses) == len(runs[1].step_losses) == 50
    # the same seed, data and update rule: the two curves differ only by float32 rounding
    assert train.max_difference(runs[0].step_losses, runs[1].step_losses) < 1e-4
    assert runs[1].epoch_losses[-1] < runs[1].step_losses[0]  # it learns
    for run in runs:  # each optimizer's step() timed on its own, after the warm-up
        assert len(run.step_seconds) == 30 and all(t > 0 for t in run.step_seconds)


def test_timing_steps_each_optimizer_warmup_plus_rounds_times(monkeypatch):
    task = train.airfoil_task(DATA)
    calls = {"torch": 0, "fused": 0}
    make_optimizer = train.make_optimizer

    def counting(name, params, **kwargs):
        optimizer = make_optimizer(name, params, **kwargs)
        step = optimizer.step
        optimizer.step = lambda: (calls.__setitem__(name, calls[name] + 1), step())
        return optimizer

    monkeypatch.setattr(train, "make_optimizer", counting)
    times = train.time_optimizer_steps(task, ("torch", "fused"), rounds=7, warmup=3, momentum=0.9)
    assert calls == {"torch": 10, "fused": 10}
    assert {name: len(t) for name, t in times.items()} == {"torch": 7, "fused": 7}


def test_train_with_amp_on_cpu_steps_through_the_grad_scaler():
    task = train.airfoil_task(DATA)
    lines = []
    history = train.train(task, "fused", amp=True, epochs=1, steps=4, log=lines.append)
    assert len(history.step_losses) == 4 and history.skipped_steps == 0
    assert "train loss" in lines[0] and "(4 steps)" in lines[0]


def test_train_main_compare_prints_both_curves(capsys):
    assert train.main(["--compare", "--data", DATA, "--epochs", "2", "--steps", "60", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "torch loss" in out and "fused loss" in out and "largest difference" in out
    assert "ms/step" not in out  # a whole training step's wall time said nothing about the optimizer
    assert "optimizer.step() alone, median of 1000 steps each" in out and "FusedRMSprop's step is" in out


def test_max_difference():
    assert train.max_difference([1.0, 2.0], [1.5, 1.0]) == 1.0
    with pytest.raises(ValueError):
        train.max_difference([1.0], [])


def test_digits_task_when_scikit_learn_is_installed():
    pytest.importorskip("sklearn")
    task = train.digits_task()
    history = train.train(task, "fused", epochs=1, steps=5, log=lambda line: None)
    assert len(history.step_losses) == 5 and task.x_train.shape[1:] == (1, 8, 8)
