"""Running a test body on several CPU ranks (gloo), and the torch.distributed APIs the tests use,
imported where this torch keeps them.

`run_on_ranks(fn, *args)` spawns one process per rank, joins a gloo process group on a free
loopback port and returns each rank's `fn(rank, world_size, *args)`. `fn` must be a module-level
function (the spawned interpreter imports it by name) and return plain tensors and Python
objects: a DTensor belongs to its process group and cannot leave its rank.

A hung rank fails the test instead of hanging CI, twice over: every collective times out after
COLLECTIVE_TIMEOUT_S (the process group's timeout, enforced by gloo), and a rank stuck anywhere
else is killed when the whole run passes its deadline.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
# Generous for two ranks importing torch on two busy cores (a few seconds each); a real hang is
# caught anyway, only later.
COLLECTIVE_TIMEOUT_S = 60
RUN_TIMEOUT_S = 180


def _skip_reason_for_distributed():
    if not dist.is_available():
        return "this torch was built without torch.distributed"
    if not dist.is_gloo_available():
        return "this torch has no gloo backend (the CPU process group the tests run on)"
    return None


DISTRIBUTED_SKIP = _skip_reason_for_distributed()

DTensor = Shard = init_device_mesh = fully_shard = None
dcp = get_state_dict = set_state_dict = get_optimizer_state_dict = None
FSDP2_SKIP = DCP_SKIP = DISTRIBUTED_SKIP
if DISTRIBUTED_SKIP is None:
    from torch.distributed.device_mesh import init_device_mesh

    try:  # public since torch 2.5
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import DTensor, Shard

    try:  # public since torch 2.6
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:  # torch 2.4 and 2.5
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            FSDP2_SKIP = f"torch {torch.__version__} has no FSDP2 fully_shard (torch >= 2.4 has)"

    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict, set_state_dict
    except ImportError as error:
        DCP_SKIP = f"torch {torch.__version__} lacks torch.distributed.checkpoint's state_dict API ({error})"


def free_port() -> int:
    """A port that was free a moment ago: the OS picks it for a socket bound to port 0. Another
    process could take it before rank 0's store binds it; that is rare and fails loudly."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, result_dir, fn, args):
    # Two ranks share two cores: one intra-op thread each, not two each fighting for them.
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        # Keep gloo's traffic on the loopback interface whatever the host name resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        result = fn(rank, world_size, *args)
        # Written before the barrier: a rank that returns early must not tear the group down
        # while the other is still in a collective.
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, *args, world_size: int = WORLD_SIZE, timeout_s: float = RUN_TIMEOUT_S) -> list:
    """[fn(rank, world_size, *args) for each rank], each computed in its own process.
    An exception in a rank is re-raised here with that rank's traceback."""
    with tempfile.TemporaryDirectory(prefix="rmsprop_fused_ranks_") as result_dir:
        # daemon: should this process exit while the ranks run (an interrupted pytest), they
        # are ended with it instead of being left behind.
        context = mp.start_processes(
            _rank_main, args=(world_size, free_port(), result_dir, fn, args), nprocs=world_size,
            join=False, daemon=True, start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        # join() returns False while a rank still runs, and raises (ending the other ranks) as
        # soon as one fails; it wakes whenever any rank exits, hence the loop.
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                running = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                for p in context.processes:
                    if p.is_alive():
                        p.kill()
                for p in context.processes:
                    p.join()
                raise TimeoutError(f"ranks {running} of {world_size} still ran after {timeout_s} s: killed")
        return [torch.load(Path(result_dir) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
