"""DDP and FSDP2 on this machine: 1 process against 2 (gloo), the same global batch; step time, bytes, memory.

    nice python benchmarks/scaling.py                       # SmolLM2-135M QLoRA r=16 all-linear, batch 8 x 128
    python benchmarks/scaling.py --tiny --steps 1           # random-init tiny Llama (CI smoke test)

Each configuration runs in fresh processes (torch.multiprocessing, gloo on 127.0.0.1), the step being the
trainer's: lorakit's fast paths, bf16 autocast, `causal_lm_loss`, then DDP over the adapter or FSDP2 over
the whole model (lorakit/train/distributed.py's wrap), AdamW. The global batch is split between the
processes, and the machine's cores between their threads (2 cores: 1 process x 2 threads, or 2 x 1).
"handed" bytes are what each process hands to the collectives in one optimizer step: DDP's gradient buckets
(counted by a communication hook), FSDP's all-gather outputs and reduce-scatter inputs (counted around
torch.distributed's all_gather_single / reduce_scatter_single, which FSDP2 calls). "wire" bytes are what a
ring algorithm then sends per process: 2(p-1)/p of an all-reduce, (p-1)/p of an all-gather or reduce-scatter.
"held" is the model's tensor bytes in each process after wrapping (a sharded parameter counts its shard);
"RSS after" is the process's resident memory after the steps, "peak RSS" its `ru_maxrss` (the model load,
which builds the whole model in every process, included). docs/scaling.md projects these figures to 8 and
64 GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RANK, ALPHA, LR = 16, 32, 2e-4


def build(tiny: bool, untied: bool = False):
    """(model, vocab) with a QLoRA adapter: SmolLM2 NF4, or a tiny random Llama quantized the same way."""
    import lorakit as lk

    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=not untied)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        lk.use_fast_cpu_attention(model)
        lk.quantize_model(model, lk.QuantConfig(quant_type="nf4"))
    else:
        model = lk.load_model("smollm2-135m-instruct", quantize="nf4", dtype=torch.bfloat16)[0]
    torch.manual_seed(0)
    lk.add_adapter(model, lk.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
    model.train()
    lk.enable_fast_training(model, loss=False)
    return model, model.config.vocab_size


def counting_hook(counter: list[int]):
    """A DDP communication hook: the default all-reduce (averaging), counting the bucket bytes handed to it."""
    def hook(state, bucket):
        buffer = bucket.buffer()
        counter[0] += buffer.numel() * buffer.element_size()
        work = dist.all_reduce(buffer.div_(dist.get_world_size()), async_op=True)
        return work.get_future().then(lambda future: future.value()[0])
    return hook


def counting_collectives(counter: list[int], wire: list[float]) -> None:
    """Count the bytes FSDP2 hands to its all-gathers (output) and reduce-scatters (input) in this process."""
    for name, position, keyword in (("all_gather_single", 0, "output"), ("reduce_scatter_single", 1, "input")):
        original = getattr(dist, name)

        def counted(*args, _original=original, _at=position, _key=keyword, **kwargs):
            tensor = args[_at] if len(args) > _at else kwargs[_key]
            size = tensor.numel() * tensor.element_size()
            counter[0] += size
            wire[0] += size * (dist.get_world_size() - 1) / dist.get_world_size()
            return _original(*args, **kwargs)
        setattr(dist, name, counted)


def held_bytes(model: torch.nn.Module) -> int:
    """Tensor bytes of the model in this process: a sharded (DTensor) parameter counts its local shard."""
    tensors = [getattr(t, "_local_tensor", t) for t in (*model.parameters(), *model.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors)


def rss_now() -> int:
    """This process's resident memory now, in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str, kind: str = "ddp") -> None:
    """One process: build, wrap (DDP or FSDP2 when world > 1), warm up, time `args.steps` steps, write figures."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from lorakit.kernels.allocator import release_freed_memory
    from lorakit.train.distributed import Dist, wrap
    from lorakit.train.trainer import causal_lm_loss

    model, vocab = build(args.tiny, args.untied)
    engine = wrap(model, Dist(rank=rank, world=world, kind=kind))
    release_freed_memory()  # the whole model each process built before sharding goes back to the system
    counter, wire = [0], [0.0]
    if world > 1 and kind == "ddp":
        engine.register_comm_hook(None, counting_hook(counter))
    elif world > 1:
        counting_collectives(counter, wire)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    share = args.batch // world
    batch = {"input_ids": ids[rank * share:(rank + 1) * share]}
    batch["labels"] = batch["input_ids"].clone()
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    seconds, losses = [], []
    for step in range(args.warmup + args.steps):
        if world > 1:
            dist.barrier()
        start, counter[0], wire[0] = time.perf_counter(), 0, 0.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = causal_lm_loss(engine, batch, chunked=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.barrier()  # a step ends when the slowest process ends it
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
    if kind == "ddp":
        wire[0] = counter[0] * 2 * (world - 1) / world
    figures = {"kind": kind, "rank": rank, "world": world, "step_s": statistics.median(seconds),
               "bytes_handed": counter[0], "bytes_wire": int(wire[0]), "held_bytes": held_bytes(model),
               "rss_after_bytes": rss_now(),
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "trainable_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
               "loss": losses[-1]}
    Path(out, f"{kind}-{world}-{rank}.json").write_text(json.dumps(figures))
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port nothing listens on now, for the gloo rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(kind: str, world: int, args: argparse.Namespace, out: str) -> list[dict]:
    """Run one configuration in fresh processes and collect each rank's figures."""
    mp.spawn(worker, args=(world, free_port(), args, out, kind), nprocs=world, join=True)
    return [json.loads(Path(out, f"{kind}-{world}-{rank}.json").read_text()) for rank in range(world)]


def global_loss(figures: list[dict]) -> float:
    """The global batch's loss: the mean of the ranks' (their shares hold equally many labelled tokens)."""
    return sum(f["loss"] for f in figures) / len(figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random-init tiny Llama (smoke test)")
    parser.add_argument("--untied", action="store_true", help="tiny: an output head apart from the embedding "
                        "(FSDP shards them as groups of their own)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences), split between processes")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128; tiny 32)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    args.seq = args.seq or (32 if args.tiny else 128)
    if args.batch % 2 or min(args.batch, args.steps, args.seq) < 1 or args.warmup < 0:
        parser.error("--batch must be even (it splits over 2 processes); --steps and --seq positive")
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        rows = {("none", 1): measure("none", 1, args, out), ("ddp", 2): measure("ddp", 2, args, out),
                ("fsdp", 2): measure("fsdp", 2, args, out)}
    model = "tiny random-init Llama" if args.tiny else "SmolLM2-135M-Instruct"
    print(f"\nDDP and FSDP2, {model} QLoRA NF4 r={RANK} all-linear, global batch {args.batch} x {args.seq}, gloo, "
          f"{os.cpu_count()} cores, torch {torch.__version__}; median of {args.steps} steps")
    print(f"{'kind':>5} {'procs':>5} {'step s':>7} {'tokens/s':>9} {'vs 1':>6} {'handed B/step/proc':>19} "
          f"{'wire B/step/proc':>17} {'held MB/proc':>13} {'RSS after MB':>13} {'peak RSS MB':>12} {'loss':>8}")
    base = rows["none", 1][0]["step_s"]
    for (kind, world), figures in rows.items():
        step = max(f["step_s"] for f in figures)
        print(f"{kind:>5} {world:5d} {step:7.3f} {args.batch * args.seq / step:9.1f} {base / step:5.2f}x "
              f"{max(f['bytes_handed'] for f in figures):19,d} {max(f['bytes_wire'] for f in figures):17,d} "
              f"{max(f['held_bytes'] for f in figures) / 1e6:13.1f} "
              f"{max(f['rss_after_bytes'] for f in figures) / 1e6:13.1f} "
              f"{max(f['peak_rss_bytes'] for f in figures) / 1e6:12.1f} {global_loss(figures):8.4f}")
    print(f"trainable (adapter) bytes: {rows['none', 1][0]['trainable_bytes']:,d}")
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": args.batch, "seq": args.seq, "tiny": args.tiny,
                                               "rows": {f"{k}-{w}": v for (k, w), v in rows.items()}}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
