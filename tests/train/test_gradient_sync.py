"""Gradient accumulation reduces gradients once per optimizer step, under DDP and FSDP2 (gloo, in this process)."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import tiny_llama

import lorakit as lk
from lorakit.train.distributed import Dist, shard, wrap
from lorakit.train.trainer import accumulate_gradients


@pytest.fixture()
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _batches(count: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 128, (count, 2, 8), generator=torch.Generator().manual_seed(4))
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model.train()


def _ddp_reductions(micro_batches: int) -> int:
    """All-reduce calls (one per gradient bucket) in one accumulated step, counted by a DDP comm hook."""
    calls = [0]

    def hook(state, bucket):
        calls[0] += 1
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])
    engine = wrap(_model(), Dist(rank=0, world=2, kind="ddp"))  # world 2 only makes wrap build DDP: the group is 1
    engine.register_comm_hook(None, hook)
    accumulate_gradients(engine, _batches(micro_batches), chunked=False, bf16=False, dist=Dist(0, 1, "ddp"))
    assert all(p.grad is not None for p in engine.parameters() if p.requires_grad)
    return calls[0]


def _fsdp_worker(rank: int, store: str, out: str) -> None:
    """One of 2 processes: reduce-scatter calls FSDP2 makes in a step of 1 and of 4 micro-batches."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    calls = [0]
    original = dist.reduce_scatter_single

    def counted(*args, **kwargs):  # the real collective, counted
        calls[0] += 1
        return original(*args, **kwargs)
    dist.reduce_scatter_single = counted
    counts = []
    for micro_batches in (1, 4):
        calls[0] = 0
        model = shard(_model(), Dist(rank=rank, world=2, kind="fsdp"))
        accumulate_gradients(model, _batches(micro_batches), chunked=True, bf16=False,
                             dist=Dist(rank, 2, "fsdp"))
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        counts.append(calls[0])
    Path(out, f"{rank}.json").write_text(json.dumps(counts))
    dist.destroy_process_group()


def test_ddp_accumulation_all_reduces_once_per_step(group):
    one, four = _ddp_reductions(1), _ddp_reductions(4)
    assert one >= 1 and four == one  # the same buckets, reduced on the last micro-batch only


@pytest.mark.slow  # starts 2 processes
def test_fsdp_accumulation_reduce_scatters_once_per_step(tmp_path):
    torch.multiprocessing.spawn(_fsdp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        one, four = json.loads((tmp_path / f"{rank}.json").read_text())
        assert one == 2 and four == one  # one per decoder layer (the root has no adapter), on the last micro-batch
