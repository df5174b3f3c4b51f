"""Training-step speed and memory: lorakit LoRA/QLoRA vs peft (fp32, bf16 autocast) and peft+bnb QLoRA.

    nice python benchmarks/train_step.py                  # SmolLM2-135M-Instruct, batch 4 x 256 (minutes)
    python benchmarks/train_step.py --rows lorakit-qlora,peft-bf16-autocast --steps 3
    python benchmarks/train_step.py --tiny                # random-init tiny Llama, 1 step (CI smoke test)

peft-bf16-autocast-eager is the same peft recipe with transformers' "eager" attention, to show how much
of lorakit's lead comes from its attention choice (lorakit/kernels/attention.py) rather than the rest.
peft-bf16-autocast-retain is the same peft recipe with the malloc setting lorakit's trainer makes
(`lorakit.kernels.allocator.retain_freed_memory`: freed memory is kept for reuse instead of page-faulting back in
each step), to show how much of the lead is that setting alone.
One step = forward + backward + AdamW step (lr 2e-4, no weight decay) + zero_grad, LoRA r=16, alpha 32, all
linear layers, one fixed random token batch. Each row runs in its own subprocess (`--row NAME`) so rows share
no memory; all are built first (a warm-up step each), then timed in --steps rounds of one step per row, the
order rotating each round, so a machine that speeds up or slows down over minutes (a shared VM does) moves
every row alike. tokens/s is from each row's median step; "paired" is the median over rounds of the baseline's
step time over the row's, from steps seconds apart, and "paired IQR" those per-round ratios' first and
third quartiles. Last, each row takes one more step under
`lorakit.profiling.PeakMemoryTracker`. "peak tensor MB" = bytes of every tensor held between steps (weights,
buffers, adapter, optimizer state) + the tracker's peak of tensors allocated during the step. "faults/step"
is the median count of minor page faults in a timed step (`ru_minflt`). "peak RSS MB"
is the subprocess's `ru_maxrss`, which includes loading the model. lorakit rows step as lorakit's trainer
does (`enable_fast_training`, `causal_lm_loss(chunked=True)` under bf16 autocast); "lorakit-qlora-plain-loop"
is a user's own loop on a model transformers loaded in bf16: `lk.quantize_model`, `lk.add_adapter`,
`lk.enable_fast_training`, torch AdamW on `model(input_ids, labels=...).loss` without autocast; peft rows use
`model(input_ids, labels=...).loss`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

ROWS = ("lorakit-lora", "lorakit-qlora", "lorakit-qlora-plain-loop", "peft-fp32", "peft-bf16-autocast",
        "peft-bf16-autocast-eager", "peft-bf16-autocast-retain", "peft-bnb-qlora",
        "lorakit-dora", "lorakit-qdora", "peft-dora-bf16-autocast")
# The DoRA targets: (row, reference row, the most row step time / reference step time may be).
DORA_TARGETS = (("lorakit-dora", "lorakit-lora", 1.25), ("lorakit-qdora", "lorakit-qlora", 1.25),
                ("lorakit-dora", "peft-dora-bf16-autocast", 1.0))
BASELINE = "peft-bf16-autocast"
RANK, ALPHA, LR = 16, 32, 2e-4
RESULT_TAG, STEP_TAG, READY = "ROW_RESULT ", "ROW_STEP ", "ROW_READY"
HEADER = (f"{'row':<26} {'tokens/s':>9} {'vs peft bf16':>12} {'paired':>7} {'paired IQR':>10} {'step s':>7} "
          f"{'faults/step':>11} {'peak tensor MB':>14} "
          f"{'peak RSS MB':>11} {'loss':>7} {'trainable':>10}")


def tiny_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A random-init tiny Llama with a tied head, like SmolLM2's (smoke tests only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(dtype)


def lorakit_model(tiny: bool, dtype: torch.dtype, quantize: str | None) -> nn.Module:
    """The base model as lorakit loads it: `load_model(..., dtype, quantize)`, or the tiny stand-in."""
    import lorakit as lk

    if not tiny:
        return lk.load_model("smollm2-135m-instruct", dtype=dtype, quantize=quantize)[0]
    model = tiny_model(dtype)
    lk.use_fast_cpu_attention(model)  # what load_model does after loading
    if quantize is not None:
        lk.quantize_model(model, lk.QuantConfig(quant_type=quantize))
    return model


def bnb_model(tiny: bool) -> nn.Module:
    """transformers + bitsandbytes NF4 (double quant, bf16 compute) on the CPU, from an HF folder."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        if tiny:
            tiny_model().save_pretrained(tmp)
            folder = tmp
        else:
            from lorakit.models import convert_gguf, embedded_gguf_path

            folder = convert_gguf(embedded_gguf_path())  # the cached HF copy of the same weights
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu",
                                                    dtype=torch.bfloat16, local_files_only=True)


def build_row(name: str, tiny: bool):
    """(model, optimizer, loss_fn(model, batch)) for one row, adapter added and in train mode."""
    if name.startswith("lorakit"):
        import lorakit as lk
        from lorakit.optim import make_optimizer
        from lorakit.train.trainer import causal_lm_loss

        if name == "lorakit-qlora-plain-loop":
            return plain_loop_row(tiny)
        model = lorakit_model(tiny, torch.bfloat16, "nf4" if name in ("lorakit-qlora", "lorakit-qdora") else None)
        torch.manual_seed(0)
        lk.add_adapter(model, lk.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                            use_dora=name.endswith("dora")))
        model.train()
        lk.enable_fast_training(model, loss=False)  # as lorakit's trainer does (its loss is causal_lm_loss)
        optimizer = make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], lr=LR)

        def loss_fn(m, batch):
            with torch.autocast("cpu", dtype=torch.bfloat16):  # as lorakit's trainer (bf16=True default)
                return causal_lm_loss(m, batch, chunked=True)
        return model, optimizer, loss_fn

    import peft

    base = bnb_model(tiny) if name == "peft-bnb-qlora" else lorakit_model(tiny, torch.float32, None)
    # peft's recipe runs transformers' default attention; lorakit.load_model switched it to lorakit's.
    base.set_attn_implementation("eager" if name == "peft-bf16-autocast-eager" else "sdpa")
    torch.manual_seed(0)
    model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                      target_modules="all-linear", task_type="CAUSAL_LM",
                                                      use_dora=name == "peft-dora-bf16-autocast"))
    model.train()  # bnb's Linear4bit too: train mode is what a QLoRA run uses
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    autocast = name.startswith("peft-bf16-autocast") or name == "peft-dora-bf16-autocast"
    if name == "peft-bf16-autocast-retain":
        from lorakit.kernels.allocator import retain_freed_memory

        retain_freed_memory()

    def loss_fn(m, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
            return m(batch["input_ids"], labels=batch["labels"]).loss
    return model, optimizer, loss_fn


def transformers_model(tiny: bool) -> nn.Module:
    """SmolLM2 (or the tiny stand-in) loaded by transformers itself in bf16, as a user of transformers would."""
    if tiny:
        return tiny_model(torch.bfloat16)
    from transformers import AutoModelForCausalLM

    from lorakit.models import convert_gguf, embedded_gguf_path

    folder = convert_gguf(embedded_gguf_path())  # the cached HF copy of the same weights
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True)


def plain_loop_row(tiny: bool):
    """A user's own loop: transformers model, lk.quantize_model, lk.add_adapter, lk.enable_fast_training, AdamW."""
    import lorakit as lk

    model = transformers_model(tiny)
    lk.quantize_model(model, lk.QuantConfig(quant_type="nf4"))
    torch.manual_seed(0)
    lk.add_adapter(model, lk.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
    model.train()
    lk.enable_fast_training(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)

    def loss_fn(m, batch):
        return m(batch["input_ids"], labels=batch["labels"]).loss
    return model, optimizer, loss_fn


def token_batch(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """The same random tokens for every row (fixed seed); labels = inputs, no padding."""
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, batch) -> float:
    """Forward + backward + optimizer step + zero_grad; returns the loss."""
    loss = loss_fn(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages held between steps: parameters, buffers, optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [value for state in optimizer.state.values() for value in state.values()
                if isinstance(value, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def peak_step_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, batch) -> int:
    """Resident bytes + peak bytes of the tensors one step allocates (PeakMemoryTracker)."""
    from lorakit.profiling import PeakMemoryTracker

    held = resident_bytes(model, optimizer)
    with PeakMemoryTracker() as tracker:
        train_step(model, optimizer, loss_fn, batch)
    return held + tracker.peak_bytes


def prepare_row(name: str, tiny: bool, batch_size: int, seq: int) -> dict:
    """Build one row in this process and take its warm-up step."""
    model, optimizer, loss_fn = build_row(name, tiny)
    batch = token_batch(model.get_input_embeddings().num_embeddings, batch_size, seq)
    first_loss = train_step(model, optimizer, loss_fn, batch)
    return {"model": model, "optimizer": optimizer, "loss_fn": loss_fn, "batch": batch, "first_loss": first_loss}


def timed_step(row: dict) -> float:
    """Seconds of one training step; its minor page faults are appended to row["faults"]."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    train_step(row["model"], row["optimizer"], row["loss_fn"], row["batch"])
    seconds = time.perf_counter() - start
    row.setdefault("faults", []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    return seconds


def finish_row(name: str, row: dict, seconds: list[float], batch_size: int, seq: int) -> dict:
    """The row's result: tokens/s of the median step, peak tensor bytes (one more step), peak RSS."""
    model, optimizer = row["model"], row["optimizer"]
    step_s = statistics.median(seconds)
    peak_tensor = peak_step_bytes(model, optimizer, row["loss_fn"], row["batch"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"row": name, "tokens_per_s": batch_size * seq / step_s, "step_s": step_s, "steps": len(seconds),
            "seconds": seconds, "faults_per_step": statistics.median(row.get("faults", [0])),
            "peak_tensor_bytes": peak_tensor, "peak_rss_bytes": peak_rss,
            "first_loss": row["first_loss"], "trainable_params": trainable}


def serve_row(name: str, args: argparse.Namespace) -> None:
    """Child process: build the row, then answer 'step' with a step's seconds and 'finish' with the result."""
    row = prepare_row(name, args.tiny, args.batch, args.seq)
    print(READY, flush=True)
    seconds = []
    for command in sys.stdin:
        if command.strip() == "step":
            seconds.append(timed_step(row))
            print(f"{STEP_TAG}{seconds[-1]}", flush=True)
        elif command.strip() == "finish":
            print(RESULT_TAG + json.dumps(finish_row(name, row, seconds, args.batch, args.seq)), flush=True)
            return


class RowProcess:
    """One row in its own Python process (rows share no memory), driven a step at a time over pipes."""

    def __init__(self, name: str, args: argparse.Namespace):
        command = [sys.executable, str(Path(__file__).resolve()), "--row", name, "--batch", str(args.batch),
                   "--seq", str(args.seq)] + (["--tiny"] if args.tiny else [])
        self.name, self.error = name, None
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a pipe could fill up and stall the child
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1)

    def ask(self, command: str, tag: str) -> str | None:
        """Send a command; the payload of the first reply line starting with tag (None once failed)."""
        if self.error is not None:
            return None
        try:
            if command:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            for line in self.proc.stdout:
                if line.startswith(tag):
                    return line[len(tag):].strip()
        except BrokenPipeError:
            pass
        self.proc.wait()
        self.stderr.seek(0)
        tail = (self.stderr.read().strip().splitlines() or ["no output"])[-1]
        self.error = f"exit {self.proc.returncode}: {tail}"
        return None

    def close(self) -> None:
        """Stop the child if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


def run_interleaved(names: list[str], args: argparse.Namespace) -> list[dict]:
    """Start every row, then time them in rounds (one step each, rotating the order) so drift hits all alike."""
    rows = []
    try:
        for name in names:
            start = time.perf_counter()
            rows.append(RowProcess(name, args))
            rows[-1].ask("", READY)
            print(f"{name}: {rows[-1].error or 'built, warm-up step done'} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        for round_index in range(args.steps):
            shift = round_index % len(rows)
            for row in rows[shift:] + rows[:shift]:
                row.ask("step", STEP_TAG)
            print(f"round {round_index + 1}/{args.steps} done", flush=True)
        results = []
        for row in rows:
            reply = row.ask("finish", RESULT_TAG)
            results.append(json.loads(reply) if reply is not None else {"row": row.name, "error": row.error})
        return results
    finally:
        for row in rows:
            row.close()


def paired_ratios(row: dict, base: dict) -> list[float]:
    """Per round, baseline step s / row step s: each round's two steps ran minutes apart at most."""
    return [b / r for b, r in zip(base["seconds"], row["seconds"])]


def paired_ratio(row: dict, base: dict) -> float:
    """Median over rounds of the paired ratios."""
    return statistics.median(paired_ratios(row, base))


def paired_quartiles(row: dict, base: dict) -> tuple[float, float]:
    """First and third quartiles of the paired ratios: how far one round's ratio strays on this machine."""
    ratios = paired_ratios(row, base)
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


def format_table(results: list[dict]) -> str:
    """The comparison table: tokens/s over the peft bf16-autocast row's, as medians and as paired rounds."""
    base = next((r for r in results if r["row"] == BASELINE and "error" not in r), None)
    lines = [HEADER, "-" * len(HEADER)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['row']:<26} failed: {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        paired = f"{paired_ratio(r, base):.2f}x" if base else "-"
        spread = "{:.2f}-{:.2f}".format(*paired_quartiles(r, base)) if base else "-"
        lines.append(f"{r['row']:<26} {r['tokens_per_s']:9.1f} {ratio:>12} {paired:>7} {spread:>10} {r['step_s']:7.2f} "
                     f"{r['faults_per_step']:11,.0f} "
                     f"{r['peak_tensor_bytes'] / 1e6:14.1f} {r['peak_rss_bytes'] / 1e6:11.1f} "
                     f"{r['first_loss']:7.3f} {r['trainable_params']:10,d}")
    return "\n".join(lines)


def variant_lines(results: list[dict]) -> list[str]:
    """DoRA's targets as paired step-time ratios (and peak tensor memory), for the rows that ran."""
    done = {r["row"]: r for r in results if "error" not in r}
    lines = []
    for row, reference, most in DORA_TARGETS:
        if row in done and reference in done:
            ratio = 1 / paired_ratio(done[row], done[reference])
            memory = done[row]["peak_tensor_bytes"] / done[reference]["peak_tensor_bytes"]
            verdict = "met" if ratio <= most else "NOT met"
            lines.append(f"{row} step / {reference} step: {ratio:.2f}x (target <= {most:.2f}x: {verdict}); "
                         f"peak tensor memory {memory:.2f}x")
    return lines


def parse_rows(text: str) -> list[str]:
    """'a,b' -> ['a', 'b'], each a known row name."""
    rows = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [row for row in rows if row not in ROWS]
    if unknown or not rows:
        raise SystemExit(f"--rows: unknown {unknown or text!r}; choose from {','.join(ROWS)}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random-init tiny Llama, 1 step (smoke test)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds, a step per row each (default 5; tiny 1)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; tiny 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; tiny 32)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: measure one row here
    args = parser.parse_args()
    for option in ("steps", "batch", "seq"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be a positive integer, got {getattr(args, option)}")
    args.steps = args.steps or (1 if args.tiny else 5)
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (32 if args.tiny else 256)
    if args.row is not None:
        serve_row(args.row, args)
        return

    results = run_interleaved(parse_rows(args.rows), args)
    model = "tiny random-init Llama" if args.tiny else "SmolLM2-135M-Instruct"
    print(f"\nTraining step, {model}, batch {args.batch} x {args.seq}, LoRA r={RANK} all-linear, AdamW; "
          f"median of {args.steps} rounds; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(format_table(results))
    for line in variant_lines(results):
        print(line)
    if args.json:
        summary = {"batch": args.batch, "seq": args.seq, "steps": args.steps, "tiny": args.tiny,
                   "rows": results}
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
