"""Data-parallel training on torch.distributed: the process group, its rank, the row shards.

`torchrun` (`torch.distributed.run`) starts one process per rank and sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `process_group()` reads them (env://), with gloo on CPU
and nccl where CUDA exists. Without WORLD_SIZE there is no process group and every function
here is the single-process identity, so `ranker train` without torchrun runs the code it always
ran. Communication is torch's own (DistributedDataParallel's gradient all-reduce, all_reduce and
broadcast); nothing here sends a byte itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

P = ParamSpec("P")
R = TypeVar("R")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Dist:
    """Where this process sits: its rank among world_size and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None  # None: no process group
    device: torch.device = CPU

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, reports, plots and logs the steps."""
        return self.rank == 0

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch: idx[rank::world_size].

        Applied to each global batch of the epoch's permutation, this is DistributedSampler's
        sharding (rank r takes positions r, r + W, ...) batched by global_batch / W, so the ranks'
        rows of step k are exactly the single process's batch k.
        """
        return idx if self.world_size == 1 else idx[self.rank :: self.world_size]

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the ranks, in float64 (identity without a process group)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return [float(x) for x in t.cpu()]

    def broadcast_flags(self, flags: Sequence[bool]) -> list[bool]:
        """Rank 0's flags on every rank, so a decision can never differ between ranks."""
        if not self.enabled:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=self._comm_device())
        tdist.broadcast(t, src=0)
        return [bool(x) for x in t.cpu()]

    def _comm_device(self) -> torch.device:
        # nccl only moves CUDA tensors; gloo takes CPU ones
        return self.device if self.backend == "nccl" else CPU

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend}


LOCAL = Dist()


def backend_for_host() -> str:
    """nccl where CUDA exists, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def current() -> Dist:
    """The process group this process belongs to, or LOCAL when there is none."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return LOCAL
    backend = str(tdist.get_backend())
    device = CPU
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(tdist.get_rank(), tdist.get_world_size(), backend, device)


@contextlib.contextmanager
def process_group() -> Iterator[Dist]:
    """Join the process group torchrun describes in the environment, for the block's duration.

    No WORLD_SIZE in the environment: no group, LOCAL. An already initialised group is used as
    it is and left to its owner. On a clean exit the ranks meet at a barrier first, so none
    leaves while rank 0 still writes the run directory.
    """
    if "WORLD_SIZE" not in os.environ:
        yield LOCAL
        return
    if tdist.is_initialized():
        yield current()
        return
    backend = backend_for_host()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend=backend, init_method="env://")
    try:
        dist = current()
        yield dist
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


def wrap(model: nn.Module, dist: Dist) -> nn.Module:
    """The model as the training step calls it: DistributedDataParallel in a group, else itself."""
    if not dist.enabled:
        return model
    if dist.device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[dist.device.index])
    return DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def rank_zero_only(fn: Callable[P, R]) -> Callable[P, R | None]:
    """Run `fn` on rank 0 only (every process when there is no group); others get None."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        return fn(*args, **kwargs) if current().is_main else None

    return wrapper


def is_main_process() -> bool:
    """Rank 0 of the group, or the only process; also before the group exists (from RANK)."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """argv without `option VALUE` / `option=VALUE` (to re-run a command under torchrun)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def run_local(nproc: int, target: Sequence[str]) -> int:
    """Run `target` (e.g. ["-m", "launch.cli", "train", ...]) on `nproc` local ranks through
    `python -m torch.distributed.run --standalone` (a rendezvous on a free localhost port);
    returns its exit status."""
    if "WORLD_SIZE" in os.environ:
        raise RuntimeError("already under torchrun (WORLD_SIZE is set): run without --nproc")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *target]
    return subprocess.run(cmd, check=False).returncode
