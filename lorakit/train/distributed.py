"""Training over several processes with torch.distributed, as `torchrun` starts them (`distributed: ddp`).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `start` joins the process group
(gloo on the CPU, nccl on CUDA) with a timeout, so a rank that dies cannot leave the others waiting forever.

How a step is split: `batch_size` is the global micro-batch; each rank takes its contiguous share of
every micro-batch the one-process run would build. Each rank's mean loss is weighted by its share of
the step's labelled tokens over all ranks, times the world size because DDP averages gradients. The
gradient then equals the one-process run's, whatever the number of processes. The data position is the
micro-batch counter alone, so a checkpoint resumes under any number of processes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError

DISTRIBUTED_KINDS = ("none", "ddp")
LAUNCHED = "LORAKIT_LAUNCHED"  # set for the processes `launch` starts: their launcher reports a failure


@dataclass
class Dist:
    """This process's place in the run: its rank, the number of processes, and how the model is wrapped."""

    rank: int = 0
    world: int = 1
    kind: str = "none"

    @property
    def main(self) -> bool:
        """The rank that writes the run folder (metrics, checkpoints, the adapter)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when there is more than one process."""
        return self.world > 1

    def sum(self, value: float) -> float:
        """`value` summed over all ranks (in fp64, so the order of ranks does not round it)."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    def all_ok(self, ok: bool) -> bool:
        """True when every rank says ok: a rank that failed on its own lets the others stop, not hang."""
        if not self.active:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: its own GPU (LOCAL_RANK) when CUDA is used."""
        if self.active and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return device

    def share(self, indices: list[int]) -> list[int]:
        """This rank's contiguous part of a global micro-batch's example indices."""
        if not self.active:
            return indices
        per_rank = len(indices) // self.world
        return indices[self.rank * per_rank:(self.rank + 1) * per_rank]


def peer_stopped(exc: BaseException) -> bool:
    """True for the errors a collective raises when another process died or stopped answering."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "timed out"))


def launched_world() -> int:
    """The number of processes torchrun started (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(kind: str, batch_size: int, timeout_s: float) -> Dist:
    """Join torchrun's process group when there is one; check the run can be split as configured."""
    world = launched_world()
    if world == 1:
        return Dist(kind=kind)
    if kind == "none":
        raise LorakitError(f"started by torchrun with {world} processes but distributed is none; "
                           "set distributed: ddp (or run one process)")
    if batch_size % world:
        raise LorakitError(f"batch_size {batch_size} does not split over {world} processes; make it a multiple "
                           f"of {world} (it is the global micro-batch)")
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(), kind=kind)


def stop(dist: Dist) -> None:
    """Leave the process group (every rank, at the end of the run)."""
    if dist.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap(model: nn.Module, dist: Dist) -> nn.Module:
    """The module the steps run: DDP over the trainable (adapter) parameters, or the model itself."""
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Only trainable parameters are registered for all-reduce: the frozen (or 4-bit) base is never sent.
    # find_unused_parameters stays off: with checkpointing on, the unused-parameter search breaks DDP.
    # Every rank builds the same model and seeded adapter (or loads the same checkpoint): no initial broadcast
    # of the base; its buffers (RoPE tables, 4-bit states) are never synchronised either.
    return DistributedDataParallel(model, find_unused_parameters=False, init_sync=False,
                                   forward_sync_buffers=False)


def no_sync(module: nn.Module, last: bool) -> Any:
    """DDP's no_sync for every micro-batch but a step's last: one all-reduce per optimizer step."""
    if last or not hasattr(module, "no_sync"):
        return nullcontext()
    return module.no_sync()


@contextmanager
def stop_together(dist: Dist, where: str):
    """Run a block every rank runs; if it fails on some rank, every rank raises instead of waiting."""
    failed: BaseException | None = None
    try:
        yield
    except Exception as exc:  # checked below with the other ranks, then raised
        failed = exc
    if not dist.all_ok(failed is None):
        if failed is not None:
            raise failed
        raise LorakitError(f"another process failed during {where}; its error is above")
    if failed is not None:
        raise failed


def launch(nproc: int, argv: list[str]) -> int:
    """Run `lorakit <argv>` as `nproc` processes on this machine through torchrun's launcher; the exit code.

    torchrun's own failure report (a traceback and a table) is replaced by one line naming the rank that
    failed first; the ranks' own `lorakit: error:` lines come before it.
    """
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its report is summarised below
    os.environ[LAUNCHED] = "1"
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "lorakit", *argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"lorakit: error: process {rank} of {nproc} failed first ({how}); every process stopped "
              f"(a finished checkpoint stays: continue with --resume)", file=sys.stderr)
        return 3
    return 0
