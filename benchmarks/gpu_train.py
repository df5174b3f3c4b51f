"""Training speed and memory on random-init Llama shapes: lorakit vs transformers + peft + bitsandbytes.

    python benchmarks/gpu_train.py --shape 1b --method both                  # 4 rows, batch 4 x 2048
    python benchmarks/gpu_train.py --shape 8b --method qlora --json 8b.json  # batch 2 x 2048
    python benchmarks/gpu_train.py --shape tiny --device cpu --steps 1 --warmup 1   # the CI smoke test

A row is a library (lorakit, peft) x a method (lora: bf16 base; qlora: NF4 base, double quant, bf16 compute).
Both build the same model: random init (normal, std 0.02, fixed seed) made directly in bf16 on the device,
one decoder layer at a time, each layer quantized as soon as it exists for QLoRA (the bf16 model is never
whole, so a 70B QLoRA fits where its bf16 weights would not). Then LoRA r=16, alpha 32, all linear layers,
non-reentrant gradient checkpointing (on unless --no-gradient-checkpointing), torch AdamW lr 2e-4 (fused on
CUDA) on the adapter, bf16 autocast (as the HF Trainer with bf16=True and lorakit's trainer run; off with
--no-autocast), sdpa attention, one random token batch (fixed seed), labels = inputs.
- lorakit: `lk.quantize_model` (per layer), `lk.add_adapter`, checkpointing as lorakit's trainer switches
  it on, `lk.enable_fast_training` (its loss is the chunked cross-entropy: no full logits).
- peft: `bnb.nn.Linear4bit` swapped in as transformers' from_pretrained(quantization_config=
  BitsAndBytesConfig(nf4, double quant, bf16 compute)) does (tests/benchmarks/test_gpu_train_smoke.py holds
  the two to the same logits), `peft.prepare_model_for_kbit_training` for QLoRA, `peft.get_peft_model`.
Each row runs in its own subprocess, so its peak memory is its own. Warm-up steps, then timed steps between
`torch.cuda.synchronize()` calls (CPU: perf_counter); tokens/s is batch x seq over the median step. Peak
memory on CUDA is `torch.cuda.max_memory_allocated` over the training steps (reset after the build); on
the CPU it is the bytes held between steps (weights, adapter, optimizer state) + the peak of tensors one
more step allocates (lorakit.profiling.PeakMemoryTracker); the process's peak RSS is in the JSON.
MFU = tokens/s x FLOPs per token / (--peak-tflops x 1e12), FLOPS_FORMULA below.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import LlamaConfig

# (hidden, intermediate, layers, heads, kv heads, vocab, tied head): Llama 3.2 1B ties its head, 3.1 8B/70B not.
SHAPES = {
    "tiny": (64, 256, 2, 4, 2, 1024, False),
    "1b": (2048, 8192, 16, 32, 8, 128256, True),
    "8b": (4096, 14336, 32, 32, 8, 128256, False),
    "70b": (8192, 28672, 80, 64, 8, 128256, False),
}
DEFAULT_BATCH = {"tiny": 2, "1b": 4, "8b": 2, "70b": 1}  # 1b, 8b: DEVICE.md's baseline batches
METHODS = ("lora", "qlora")
LIBRARIES = ("lorakit", "peft")
RANK, ALPHA, LR, INIT_STD, SEED = 16, 32, 2e-4, 0.02, 0
H100_SXM_BF16_DENSE_TFLOPS = 989.0
# DEVICE.md: transformers + peft + bitsandbytes on an H100 80GB, (batch, tokens/s, peak GiB) at seq 2048.
H100_BASELINE = {("1b", "lora"): (4, 28868, 15.3), ("1b", "qlora"): (4, 22383, 15.9),
                 ("8b", "lora"): (2, 6931, 22.4), ("8b", "qlora"): (2, 5264, 16.7)}
FLOPS_FORMULA = ("FLOPs/token = 4N + 6*L*T*H*d_head; N = weights in matmuls (every linear layer incl. the output "
                 "head, not the input embedding lookup, not the adapter), forward 2N + backward activation "
                 "gradients 2N (no weight gradients for a frozen base); attention QK^T and PV over the causal "
                 "half, forward + backward = 3x forward; the checkpointing recompute is not counted (MFU, not HFU)")
GIB = 1024**3
TrainedPair = tuple[nn.Module, torch.optim.Optimizer]  # a row's model (adapter added) and its optimizer


def llama_config(shape: str, seq: int) -> LlamaConfig:
    """The LlamaConfig of a shape, sdpa attention, bf16."""
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads, kv_heads, vocab, tied = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max(seq, 8192),
                         tie_word_embeddings=tied, initializer_range=INIT_STD, use_cache=False)
    config._attn_implementation = "sdpa"
    return config


def matmul_params(config: LlamaConfig) -> int:
    """N: weights in the model's matmuls (decoder linears + output head), from the config alone."""
    head_dim = config.hidden_size // config.num_attention_heads
    attention = config.hidden_size * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * config.hidden_size * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp) + config.vocab_size * config.hidden_size


def flops_per_token(config: LlamaConfig, seq: int) -> dict[str, int]:
    """FLOPS_FORMULA's terms for one training token at sequence length `seq`."""
    head_dim = config.hidden_size // config.num_attention_heads
    linear = 4 * matmul_params(config)
    attention = 6 * config.num_hidden_layers * seq * config.num_attention_heads * head_dim
    return {"linear": linear, "attention": attention, "total": linear + attention}


def mfu(tokens_per_s: float, flops_total_per_token: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak."""
    return tokens_per_s * flops_total_per_token / (peak_tflops * 1e12)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """New floating-point tensors are `dtype` inside (so no fp32 copy is ever made)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def init_weights(module: nn.Module) -> None:
    """Normal(0, INIT_STD) for every linear and embedding weight of `module` (a tied head is drawn once)."""
    done: set[int] = set()  # ids of live weights only: a freed tensor's id may come back
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)) and id(sub.weight) not in done:
            done.add(id(sub.weight))
            with torch.no_grad():
                sub.weight.normal_(0.0, INIT_STD)


def build_model(config: LlamaConfig, device: torch.device,
                quantize_layer: Callable[[nn.Module], None] | None) -> nn.Module:
    """The random-init Llama in bf16 on `device`, built a decoder layer at a time, each quantized as it is made."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layers = config.num_hidden_layers
    config.num_hidden_layers = 0  # embeddings, final norm, head and rotary first; the layers follow one by one
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    config.num_hidden_layers = model.config.num_hidden_layers = layers  # from_config may have copied it
    torch.manual_seed(SEED)  # the weights below depend on this seed only, not on transformers' own init
    init_weights(model)
    for index in range(layers):
        with torch.device(device), default_dtype(torch.bfloat16):
            layer = LlamaDecoderLayer(model.config, layer_idx=index)
        init_weights(layer)
        if quantize_layer is not None:
            quantize_layer(layer)
        model.model.layers.append(layer)
    return model


def lorakit_quantize(layer: nn.Module) -> None:
    """lorakit's NF4 (double quant, bf16 compute) for the layer's linears."""
    import lorakit as lk

    lk.quantize_model(layer, lk.QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16))


def bnb_quantize(layer: nn.Module) -> None:
    """bitsandbytes NF4 for the layer's linears, as transformers' bnb 4-bit loading builds them."""
    import bitsandbytes as bnb

    for name, linear in [(n, m) for n, m in layer.named_modules() if type(m) is nn.Linear]:
        parent_name, _, child_name = name.rpartition(".")
        with torch.device("meta"):  # transformers' replace_with_bnb_linear makes the empty module on meta
            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                          torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                          quant_storage=torch.uint8)
        weight = linear.weight.data
        # Params4bit(value, **old.__dict__).to(device) is how transformers' Bnb4bitQuantize quantizes a weight.
        quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, **quantized.weight.__dict__).to(weight.device)
        if linear.bias is not None:
            quantized.bias = linear.bias
        setattr(layer.get_submodule(parent_name), child_name, quantized)


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant gradient checkpointing, switched on as lorakit's trainer does (trainer.enable_checkpointing)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def adamw(params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """Torch AdamW, lr 2e-4, no weight decay; fused on CUDA."""
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=device.type == "cuda")


def lorakit_row(config: LlamaConfig, device: torch.device, method: str, checkpointing: bool) -> TrainedPair:
    """lorakit's recipe: quantize_model, add_adapter, checkpointing, enable_fast_training, AdamW."""
    import lorakit as lk

    model = build_model(config, device, lorakit_quantize if method == "qlora" else None)
    torch.manual_seed(SEED)
    lk.add_adapter(model, lk.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    lk.enable_fast_training(model)
    return model, adamw([p for p in model.parameters() if p.requires_grad], device)


def peft_row(config: LlamaConfig, device: torch.device, method: str, checkpointing: bool) -> TrainedPair:
    """The standard recipe: bnb 4-bit base, prepare_model_for_kbit_training (QLoRA), get_peft_model, AdamW."""
    import peft

    model = build_model(config, device, bnb_quantize if method == "qlora" else None)
    if method == "qlora":
        model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; peft reads it
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        enable_checkpointing(model)
    torch.manual_seed(SEED)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    return model, adamw([p for p in model.parameters() if p.requires_grad], device)


def token_batch(vocab: int, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """The same random tokens for every row (fixed seed)."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (batch, seq), generator=generator).to(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, autocast: bool) -> torch.Tensor:
    """Forward (labels = inputs) + backward + AdamW step + zero_grad; returns the loss, not synchronised."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16) if autocast else nullcontext():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages held between steps: parameters, buffers, optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def run_row(args: argparse.Namespace, library: str, method: str) -> dict:
    """Build one row here, take its warm-up and timed steps; its measurements."""
    device = torch.device(args.device)
    config = llama_config(args.shape, args.seq)
    start = time.perf_counter()
    build = lorakit_row if library == "lorakit" else peft_row
    model, optimizer = build(config, device, method, args.gradient_checkpointing)
    build_s = time.perf_counter() - start
    ids = token_batch(config.vocab_size, args.batch, args.seq, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, seconds = [], []
    for step in range(args.warmup + args.steps):
        synchronize(device)
        start = time.perf_counter()
        loss = train_step(model, optimizer, ids, args.autocast)
        synchronize(device)
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    if device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated(device)
        peak_kind = "torch.cuda.max_memory_allocated"
    else:
        from lorakit.profiling import PeakMemoryTracker

        held = held_bytes(model, optimizer)
        with PeakMemoryTracker() as tracker:
            train_step(model, optimizer, ids, args.autocast)
        peak_bytes, peak_kind = held + tracker.peak_bytes, "held + PeakMemoryTracker peak of one step"
    step_s = statistics.median(seconds)
    tokens_per_s = args.batch * args.seq / step_s
    flops = flops_per_token(config, args.seq)
    return {"row": library, "method": method, "tokens_per_s": tokens_per_s, "step_s": step_s, "seconds": seconds,
            "build_s": build_s, "peak_bytes": peak_bytes, "peak_kind": peak_kind,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            "first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "mfu": mfu(tokens_per_s, flops["total"], args.peak_tflops)}


def child_main(args: argparse.Namespace) -> None:
    """Subprocess: measure args.child ("library:method") and write its result (or its error) to args.result."""
    library, method = args.child.split(":")
    try:
        result = run_row(args, library, method)
    except torch.cuda.OutOfMemoryError as error:
        result = {"row": library, "method": method, "error": f"out of memory: {str(error).splitlines()[0]}"}
    except Exception as error:  # reported in the table; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        result = {"row": library, "method": method, "error": f"{type(error).__name__}: {error}"[:300]}
    Path(args.result).write_text(json.dumps(result))
    sys.exit(1 if "error" in result else 0)


def spawn_row(args: argparse.Namespace, library: str, method: str) -> dict:
    """Run one row in its own Python process (its own peak memory); its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "row.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", f"{library}:{method}",
                   "--result", str(result_path), "--shape", args.shape, "--device", args.device,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--peak-tflops", str(args.peak_tflops),
                   "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
                   "--autocast" if args.autocast else "--no-autocast"]
        proc = subprocess.run(command)
        if result_path.exists():
            return json.loads(result_path.read_text())
        return {"row": library, "method": method, "error": f"exit {proc.returncode} (stderr above)"}


def format_table(results: list[dict], args: argparse.Namespace) -> str:
    """One line per row; lorakit's tokens/s and peak memory over peft's; DEVICE.md's H100 figure beside."""
    reference = args.device == "cuda" and args.shape in ("1b", "8b") and args.seq == 2048
    largest = max((r.get("peak_bytes", 0) for r in results), default=0)
    unit, unit_bytes = ("GiB", GIB) if largest >= GIB else ("MiB", 1024**2)  # tiny CPU rows are a few MiB
    header = (f"{'method':<6} {'row':<8} {'tokens/s':>10} {'vs peft':>7} {'step s':>8} {'peak ' + unit:>9} "
              f"{'vs peft':>7} {'MFU':>6} {'1st loss':>8} {'trainable':>11}")
    if reference:
        header += f"  {'H100 peft (DEVICE.md)':>30}"
    lines = [header, "-" * len(header)]
    done = {(r["row"], r["method"]): r for r in results if "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"{r['method']:<6} {r['row']:<8} failed: {r['error']}")
            continue
        peer = done.get(("peft", r["method"]))
        speed = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "-"
        memory = f"{r['peak_bytes'] / peer['peak_bytes']:.2f}x" if peer else "-"
        line = (f"{r['method']:<6} {r['row']:<8} {r['tokens_per_s']:10,.0f} {speed:>7} {r['step_s']:8.3f} "
                f"{r['peak_bytes'] / unit_bytes:9.2f} {memory:>7} {r['mfu']:6.1%} {r['first_loss']:8.3f} "
                f"{r['trainable_params']:11,d}")
        if reference:
            batch, tokens_per_s, peak_gib = H100_BASELINE[(args.shape, r["method"])]
            line += f"  {f'{tokens_per_s:,} tok/s, {peak_gib} GiB, batch {batch}':>30}"
        lines.append(line)
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    """Versions of the libraries the rows use (None when one is missing)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, defaults filled in per shape."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="1b")
    parser.add_argument("--method", choices=(*METHODS, "both"), default="both")
    parser.add_argument("--rows", default=",".join(LIBRARIES), help="comma-separated subset of lorakit,peft")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: 1b 4, 8b 2, 70b 1)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny 1)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast around forward (default on)")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                        help="the MFU denominator (default 989: H100 SXM bf16 dense, also the H200's)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: "library:method" here
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)  # internal: the child's result file
    args = parser.parse_args(argv)
    tiny = args.shape == "tiny"
    args.batch = args.batch or DEFAULT_BATCH[args.shape]
    args.seq = args.seq or (64 if tiny else 2048)
    args.steps = args.steps or (2 if tiny else 10)
    args.warmup = (1 if tiny else 2) if args.warmup is None else args.warmup
    for option in ("batch", "seq", "steps"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be a positive integer, got {getattr(args, option)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    args.libraries = [item.strip() for item in args.rows.split(",") if item.strip()]
    if not args.libraries or set(args.libraries) - set(LIBRARIES):
        parser.error(f"--rows: expected a comma-separated subset of {','.join(LIBRARIES)}, got {args.rows!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every (method, row) in its own subprocess, print the table, write the JSON."""
    args = parse_args(argv)
    if args.child is not None:
        child_main(args)
        return
    methods = list(METHODS) if args.method == "both" else [args.method]
    results = []
    for method in methods:
        for library in args.libraries:
            print(f"{method} {library}: building and stepping ...", file=sys.stderr, flush=True)
            results.append(spawn_row(args, library, method))
    config = llama_config(args.shape, args.seq)
    flops = flops_per_token(config, args.seq)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or
                                                                              platform.machine())
    print(f"\nTraining, random-init Llama {args.shape} (N = {matmul_params(config):,} matmul weights), "
          f"batch {args.batch} x {args.seq}, LoRA r={RANK} all-linear, AdamW lr {LR}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, bf16 autocast {'on' if args.autocast else 'off'}; "
          f"median of {args.steps} steps after {args.warmup} warm-up; {device_name}, torch {torch.__version__}")
    print(format_table(results, args))
    print(f"MFU = tokens/s x {flops['total']:,} FLOPs/token / ({args.peak_tflops:g} TFLOP/s x 1e12); "
          f"{FLOPS_FORMULA}; the peak is --peak-tflops (default 989: H100 SXM bf16 dense)")
    print(f"vocab {config.vocab_size}: a random-init model's first loss is about "
          f"ln(vocab) = {math.log(config.vocab_size):.3f}")
    if args.json:
        summary = {"shape": args.shape, "device": args.device, "device_name": device_name, "batch": args.batch,
                   "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
                   "gradient_checkpointing": args.gradient_checkpointing, "autocast": args.autocast,
                   "peak_tflops": args.peak_tflops, "matmul_params": matmul_params(config),
                   "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
                   "head_dim": config.hidden_size // config.num_attention_heads, "vocab": config.vocab_size,
                   "flops_per_token": flops, "flops_formula": FLOPS_FORMULA, "versions": versions(),
                   "rows": results}
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
