"""Training over several processes with torch.distributed, as `torchrun` starts them (`distributed: ddp|fsdp`).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `start` joins the process group
(gloo on the CPU, nccl on CUDA) with a timeout, so a rank that dies cannot leave the others waiting forever.

How a step is split: `batch_size` is the global micro-batch; each rank takes its contiguous share of
every micro-batch the one-process run would build. Each rank's mean loss is weighted by its share of
the step's labelled tokens over all ranks, times the world size because DDP averages gradients. The
gradient then equals the one-process run's, whatever the number of processes. The data position is the
micro-batch counter alone, so a checkpoint resumes under any number of processes.

`fsdp` shards the model with FSDP2's `fully_shard`, one group per decoder layer and one for the rest, so
each rank holds 1/N of the base (4-bit codes included) and gathers a layer only while it runs. The 4-bit
codes become frozen Parameters viewed in a float storage dtype (FSDP shards floating tensors only); the
mixed-precision policy never casts them, since a cast of those bytes would train on garbage. Gradients are
reduce-scattered as DDP's are averaged, so the loss weights above hold unchanged. Checkpoints hold whole
tensors (gathered for rank 0 to write), so a run resumes under any number of processes and either kind.
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError

DISTRIBUTED_KINDS = ("none", "ddp", "fsdp")
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
                           "set distributed: ddp or fsdp (or run one process)")
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


def wrap(model: nn.Module, dist: Dist, device: torch.device | None = None, cpu_offload: bool = False) -> nn.Module:
    """The module the steps run: DDP over the trainable (adapter) parameters, the FSDP2-sharded model (moved to
    `device` shard by shard), or the model itself."""
    if not dist.active:
        return model
    if dist.kind == "fsdp":
        return shard(model, dist, device=device, cpu_offload=cpu_offload)
    from torch.nn.parallel import DistributedDataParallel

    # Only trainable parameters are registered for all-reduce: the frozen (or 4-bit) base is never sent.
    # find_unused_parameters stays off: with checkpointing on, the unused-parameter search breaks DDP.
    # Every rank builds the same model and seeded adapter (or loads the same checkpoint): no initial broadcast
    # of the base; its buffers (RoPE tables, 4-bit states) are never synchronised either.
    return DistributedDataParallel(model, find_unused_parameters=False, init_sync=False,
                                   forward_sync_buffers=False)


def storage_dtype(model: nn.Module) -> torch.dtype:
    """The float dtype the 4-bit codes are stored in for sharding: the 4-bit layers' compute dtype.

    It is the dtype FSDP gathers the other frozen weights in too, as bitsandbytes' quant_storage=torch_dtype.
    """
    dtypes = {module.compute_dtype for module in model.modules() if is_4bit(module)}
    if len(dtypes) > 1:
        raise LorakitError(f"the 4-bit layers compute in several dtypes {sorted(map(str, dtypes))}; "
                           "load the model with one compute dtype to shard it")
    return dtypes.pop() if dtypes else torch.float32


def is_4bit(module: nn.Module) -> bool:
    """lorakit's 4-bit linear layer (its codes are what sharding must not cast)."""
    from lorakit.quant.linear4bit import Linear4bit

    return isinstance(module, Linear4bit)


def check_policy(model: nn.Module, param_dtype: torch.dtype | None) -> None:
    """Refuse a mixed-precision param_dtype that would cast the stored 4-bit codes (and so corrupt them)."""
    for name, module in model.named_modules():
        if is_4bit(module) and param_dtype is not None and module.packed.dtype != param_dtype:
            raise LorakitError(f"{name}: FSDP would cast its 4-bit codes stored as {module.packed.dtype} to "
                               f"{param_dtype}, which corrupts them; use param_dtype {module.packed.dtype} or none")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: transformers' _no_split_modules, else a `layers`/`h` list."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if layers:
        return layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h"):
            return list(module)
    raise LorakitError(f"{type(model).__name__}: no decoder layers found to shard; use distributed: ddp")


def shard(model: nn.Module, dist: Dist, device: torch.device | None = None, cpu_offload: bool = False,
          param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 over the model: each decoder layer a group, an untied embedding and head a group each, the root
    (the final norm, and a tied embedding/head) the last.

    The model may still be on the CPU: each fully_shard call moves that group's parameters to `device` and
    keeps this rank's shard, so a device never holds the whole model.

    No parameter is cast when gathered (param_dtype None): autocast computes in bf16 where the run does, and
    adapter gradients are reduced in fp32. A param_dtype, if given, must equal the 4-bit storage dtype.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    from lorakit.fast_training import chunked_lm_loss
    from lorakit.fingerprint import keep_fingerprint

    keep_fingerprint(model)
    storage = storage_dtype(model)
    for module in model.modules():
        if is_4bit(module):
            module.store_packed_as(storage)
    check_policy(model, param_dtype)
    device = device or next(p for p in model.parameters() if p.requires_grad).device
    mesh = init_device_mesh(device.type, (dist.world,))
    options = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
               "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()}
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not getattr(embeddings, "weight", None):
        # Untied, they get groups of their own: gathered only while used, not held with the root from the
        # forward to the backward (they are a large model's largest matrices). The chunked loss uses the
        # head's weight outside its forward, so it runs as a method FSDP gathers for.
        fully_shard(embeddings, **options)
        fully_shard(head, **options)
        head.sharded_cross_entropy = types.MethodType(_head_cross_entropy, head)
        register_fsdp_forward_method(head, "sharded_cross_entropy")
    fully_shard(model, **options)
    # The chunked loss runs the backbone and the head's weight without the root's forward: as a method
    # registered with FSDP, it gathers the root's weights as forward does.
    model.sharded_chunked_loss = types.MethodType(chunked_lm_loss, model)
    register_fsdp_forward_method(model, "sharded_chunked_loss")
    return model


def _head_cross_entropy(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The chunked next-token loss over a (gathered) output head."""
    from lorakit.kernels.cross_entropy import chunked_cross_entropy

    return chunked_cross_entropy(hidden, head.weight.to(hidden.dtype), labels)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> Any:
    """Every rank enters; inside, the trainable parameters are whole tensors, and it yields the optimizer's
    state dict with whole tensors, for rank 0 to save (a no-op unless sharded)."""
    if dist.kind != "fsdp" or not dist.active:
        return nullcontext(optimizer.state_dict())
    return _gathered(model, optimizer)


@contextmanager
def _gathered(model: nn.Module, optimizer: torch.optim.Optimizer):
    from torch.distributed.tensor import DTensor

    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor) and param.requires_grad:
                module._parameters[name] = nn.Parameter(param.full_tensor(), requires_grad=True)
                swapped.append((module, name, param))
    state = optimizer.state_dict()
    state["state"] = {index: {key: value.full_tensor() if isinstance(value, DTensor) else value
                              for key, value in sorted(entry.items())}
                      for index, entry in sorted(state["state"].items())}
    try:
        yield state
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading a checkpoint's whole-tensor optimizer state: shard each tensor as its parameter is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == param.shape:
                    optimizer.state[param][key] = distribute_tensor(value, param.device_mesh, param.placements)


def no_sync(module: nn.Module, last: bool) -> Any:
    """No gradient reduction for every micro-batch but a step's last: one all-reduce (DDP) or reduce-scatter
    (FSDP) per optimizer step."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2: a switch rather than a context
        module.set_requires_gradient_sync(last)
        return nullcontext()
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
