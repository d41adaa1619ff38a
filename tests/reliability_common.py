"""Helpers shared by the tests/test_reliability_*.py files.

* ``BACKEND_DEVICES``: every (backend, device) pair a test must run on. Pairs that cannot run
  here are still listed and skip with the backend's own reason, so a Triton backend (run on CPU
  tensors under TRITON_INTERPRET=1 when there is no GPU) or a CUDA build on a GPU machine is
  covered the moment it becomes available, with no edit to these tests.
* ``Snapshot``: the bits of every tensor a step may touch, compared bitwise afterwards. Bitwise,
  not ``torch.equal``: NaN != NaN, -0.0 == 0.0, and a refused call must not even rewrite a NaN
  payload or flip the sign of a zero.
"""

from __future__ import annotations

import pytest
import torch

from rmsprop_fused import backends

GPU = torch.cuda.is_available()
# The Triton kernel runs on the GPU when there is one, else in Triton's interpreter on CPU tensors.
TRITON_DEVICE = "cuda" if GPU else "cpu"
LIST_NAMES = ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers")
STATE_LISTS = ("square_avgs", "grad_avgs", "momentum_buffers")


@pytest.fixture
def one_intra_op_thread():
    """torch.set_num_threads(1) for one test. On a small machine shared with other jobs, waking the
    OpenMP pool for every step or op costs milliseconds (the fused CPU op enters a parallel region
    whenever a step has two tensors or more, however small: see the report), which would make
    these suites minutes long. Per-element results do not depend on the thread count; the threaded
    path is covered by tests/test_cpu_kernel.py and the slow property tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unavailable(backend: str, device: str, dtype=None):
    return backends.unavailable_reason(backend, torch.device(device), dtype)


def backend_devices():
    pairs = [("reference", "cpu"), ("cpu", "cpu"), ("triton", TRITON_DEVICE), ("cuda", "cuda")]
    if GPU:
        pairs.insert(1, ("reference", "cuda"))
    params = []
    for backend, device in pairs:
        reason = unavailable(backend, device)
        marks = [pytest.mark.skip(reason=f"{backend} on {device}: {reason}")] if reason else []
        params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


BACKEND_DEVICES = backend_devices()


def require(backend: str, device: str, dtype: torch.dtype) -> None:
    """Skips (with the backend's reason) when the backend cannot update `dtype` here; e.g. Triton
    has no float64 kernel."""
    reason = unavailable(backend, device, dtype)
    if reason is not None:
        pytest.skip(f"{backend} on {device} for {dtype}: {reason}")


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t):
    """The tensor's bit pattern (a CPU integer tensor), or a marker for tensors without data."""
    if not isinstance(t, torch.Tensor):
        return ("not a tensor", t)
    if t.is_meta:
        return ("meta", tuple(t.shape), t.dtype)
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.detach().resolve_conj().resolve_neg()  # the values a reader sees, for lazy views too
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.cpu().clone().contiguous().view(_INT_OF_SIZE[t.element_size()])


def same_bits(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


class Snapshot:
    """Bits of named tensors (and the tensor objects themselves) taken now, to be compared later."""

    def __init__(self, named):
        self.objects = dict(named)
        self.bits = {name: bits(t) for name, t in self.objects.items()}

    @classmethod
    def of_lists(cls, lists: dict) -> "Snapshot":
        return cls((f"{key}[{i}]", t) for key in LIST_NAMES for i, t in enumerate(lists.get(key, ())))

    @classmethod
    def of_optimizer(cls, optimizer) -> "Snapshot":
        named = []
        for g, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                named.append((f"group {g} param {i}", p))
                if p.grad is not None:
                    named.append((f"group {g} param {i} .grad", p.grad))
                for key, value in optimizer.state.get(p, {}).items():
                    named.append((f"group {g} param {i} state[{key!r}]", value))
        snapshot = cls(named)
        snapshot.state_keys = {id(p): sorted(s) for p, s in optimizer.state.items()}
        snapshot.hyperparameters = [
            {k: (bits(v) if isinstance(v, torch.Tensor) else v) for k, v in group.items() if k != "params"}
            for group in optimizer.param_groups
        ]
        return snapshot

    def assert_unchanged(self, now: "Snapshot") -> None:
        assert now.objects.keys() == self.objects.keys(), (
            f"tensors appeared or disappeared: {sorted(now.objects.keys() ^ self.objects.keys())}"
        )
        changed = [name for name in self.bits if not same_bits(self.bits[name], now.bits[name])]
        assert not changed, f"a refused call changed {changed}"
        replaced = [name for name in self.objects if now.objects[name] is not self.objects[name]]
        assert not replaced, f"a refused call replaced {replaced}"

    def assert_optimizer_unchanged(self, optimizer) -> None:
        now = Snapshot.of_optimizer(optimizer)
        assert now.state_keys == self.state_keys, "state was created or dropped"
        self.assert_unchanged(now)
        assert _same_hyperparameters(now.hyperparameters, self.hyperparameters), (
            f"param_groups changed: {now.hyperparameters} != {self.hyperparameters}"
        )


def _same_hyperparameters(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for k in x:
            if isinstance(x[k], torch.Tensor) or isinstance(y[k], torch.Tensor):
                if not same_bits(x[k], y[k]):
                    return False
            elif x[k] != y[k] and not (x[k] != x[k] and y[k] != y[k]):  # NaN equals NaN here
                return False
    return True
