"""Peak resident memory of loading a 4-bit (NF4) base from sharded safetensors: lorakit vs transformers + bitsandbytes.

    python benchmarks/load_memory.py                   # ~1.5B-parameter random Llama, 3 GB of bf16 shards (minutes)
    python benchmarks/load_memory.py --tiny            # a few-MB model through the same code path (smoke test)
    python benchmarks/load_memory.py --workdir DIR --keep --json out.json

The model is written once, shard by shard, each tensor generated on its own (this process never holds the
model): config.json, model-0000i-of-0000n.safetensors, model.safetensors.index.json, as save_pretrained
writes them, plus a small word-level tokenizer (load_model loads one; nothing comes from a hub). Each loader
then runs in a fresh process that imports everything and loads a 1-layer micro model once (one-time costs),
reads its resident memory (the baseline), loads the model, reads every weight once, and reports getrusage's
ru_maxrss (the peak). This driver imports no torch: a child's ru_maxrss starts from the peak of the process
that spawned it, so the driver must stay small.

The bound: 1.3 x (the 4-bit model's bytes, i.e. every parameter and buffer after lorakit's load, + one
decoder layer in bf16). lorakit's peak minus baseline must stay under it. MB = 1e6 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the driver must not import torch (see above); the workers import it where they use it
    from torch import nn

REPO = Path(__file__).resolve().parents[1]
BOUND_FACTOR = 1.3
# Llama shapes: TinyLlama-1.1B's widths with 31 layers instead of 22 (~1.50B parameters, untied head).
FULL = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 31,
        "num_attention_heads": 32, "num_key_value_heads": 4}
TINY = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2}
# Loaded once before the baseline is read, so the loaders' one-time costs (lazy imports, thread pools,
# kernel dispatch: ~20 MB, more than the tiny model) count as runtime, not as the model.
MICRO = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2}
FULL_SHARD_BYTES = 1_000_000_000
TINY_SHARD_BYTES = 1_500_000  # several shards even for the tiny model
WARMUP = "llama-micro-warmup"
LOADERS = {
    "lorakit": "lorakit load_model(nf4)",
    "bnb": "transformers + bitsandbytes nf4",
    "bf16": "transformers bf16 (no quantization)",
}


# ---- writing the model (its own process: torch + transformers) -------------------------------------------

def tensor_shapes(shape: dict) -> list[tuple[str, list[int]]]:
    """(name, shape) of every stored tensor of a LlamaForCausalLM with `shape`, from a meta-device model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    return [(name, list(tensor.shape)) for name, tensor in model.state_dict().items()]


def shard_plan(shapes: list[tuple[str, list[int]]], shard_bytes: int) -> list[list[tuple[str, list[int]]]]:
    """Tensors grouped in order into shards of at most `shard_bytes` of bf16 (a larger tensor gets its own)."""
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, dims in shapes:
        nbytes = 2 * _numel(dims)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def _numel(dims: list[int]) -> int:
    count = 1
    for size in dims:
        count *= size
    return count


def write_shard(path: Path, tensors: list[tuple[str, list[int]]], seed: int) -> None:
    """One bf16 safetensors file, each tensor drawn (std 0.02; norms 1) and written before the next is made."""
    import torch

    header, offset = {}, 0
    for name, dims in tensors:
        nbytes = 2 * _numel(dims)
        header[name] = {"dtype": "BF16", "shape": dims, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    generator = torch.Generator().manual_seed(seed)
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        for name, dims in tensors:
            if name.endswith("norm.weight"):
                value = torch.ones(dims, dtype=torch.bfloat16)
            else:
                value = (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16)
            handle.write(value.reshape(-1).view(torch.uint8).numpy().data)
            del value


def write_tokenizer(folder: Path) -> None:
    """A small word-level tokenizer: load_model loads the folder's tokenizer; its size is not the model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(253)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)


def write_model(folder: Path, shape: dict, shard_bytes: int) -> None:
    """Write config, shards, index and tokenizer into a temp folder beside `folder`, then rename it."""
    from transformers import LlamaConfig

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        LlamaConfig(**shape, tie_word_embeddings=False, dtype="bfloat16", bos_token_id=1,
                    eos_token_id=1, pad_token_id=0).save_pretrained(tmp)
        shards = shard_plan(tensor_shapes(shape), shard_bytes)
        weight_map, total = {}, 0
        for index, tensors in enumerate(shards):
            name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            write_shard(tmp / name, tensors, seed=index)
            for key, dims in tensors:
                weight_map[key] = name
                total += 2 * _numel(dims)
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
        write_tokenizer(tmp)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- measuring one loader (its own process) ---------------------------------------------------------------

def rss_bytes() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    """The kernel's high-water mark of this process's own resident memory (VmHWM), a check on ru_maxrss."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_kinds() -> dict[str, int]:
    """This process's resident bytes now by kind: RssAnon (heap, anonymous maps) and RssFile (mapped files)."""
    kinds = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("RssAnon:", "RssFile:")):
                kinds[line.split(":")[0]] = int(line.split()[1]) * 1024
    return kinds


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage once (tied weights, shared code tables)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def load(loader: str, folder: Path) -> nn.Module:
    """The model in `folder`, loaded by `loader` with the benchmark's settings."""
    import torch
    import transformers

    import lorakit.models

    if loader == "lorakit":
        return lorakit.models.load_model(str(folder), quantize="nf4", dtype=torch.bfloat16)[0]
    if loader == "bnb":
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.bfloat16)
        return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config,
                                                                 device_map="cpu", dtype=torch.bfloat16)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)


def measure(loader: str, folder: Path, warmup: Path) -> dict:
    """Load `folder` with `loader` in this (fresh) process, after one load of `warmup`; baseline, peak, bytes."""
    import gc
    import importlib.metadata
    import resource

    import bitsandbytes  # noqa: F401  (imported before the baseline in every run, used by "bnb")
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (loaded lazily by the loaders otherwise)

    import lorakit.models  # noqa: F401

    imports = rss_bytes()
    warm = load(loader, warmup)
    del warm
    gc.collect()
    baseline = rss_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = load(loader, folder)
    with torch.no_grad():
        # transformers' bf16 load leaves the weights as views of the mapped files, resident only once read;
        # read each once, as a forward would, so every row counts the model it holds. max(), not sum(): a
        # uint8 sum first makes an int64 copy.
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.max()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    resident = rss_kinds()
    return {"loader": loader, "versions": {name: importlib.metadata.version(name)
                                           for name in ("torch", "transformers", "bitsandbytes")},
            "imports_rss_bytes": imports, "baseline_rss_bytes": baseline,
            "peak_before_load_bytes": before,
            "peak_rss_bytes": peak, "vm_hwm_bytes": hwm_bytes(), "rss_after_load_bytes": rss_bytes(),
            "rss_anon_after_load_bytes": resident["RssAnon"], "rss_file_after_load_bytes": resident["RssFile"],
            "model_bytes": model_bytes(model) if loader == "lorakit" else None,
            "linear4bit_layers": sum(type(m).__name__ == "Linear4bit" for m in model.modules())}


# ---- the driver (no torch) --------------------------------------------------------------------------------

def layer_bf16_bytes(folder: Path) -> int:
    """Bytes of decoder layer 0 as stored (bf16), read from the shards' headers."""
    total = 0
    for path in sorted(folder.glob("model-*.safetensors")):
        with path.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, entry in header.items():
            if name.startswith("model.layers.0."):
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
    return total


def child(*args: str) -> dict:
    """Run this script's worker mode in a fresh process; its JSON answer."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], bound: int) -> list[str]:
    """One line per loader: peak, baseline, peak minus baseline and its ratio to the bound, resident kinds after."""
    header = (f"{'loader':<36} {'peak RSS MB':>11} {'baseline MB':>11} {'peak-baseline MB':>16} {'/ bound':>7} "
              f"{'bound':>7}   {'after: anon MB':>14} {'file MB':>7}")
    lines = [header, "-" * len(header)]
    for row in rows:
        load = row["peak_rss_bytes"] - row["baseline_rss_bytes"]
        verdict = ("met" if load <= bound else "NOT met") if row["loader"] == "lorakit" else "-"
        lines.append(f"{LOADERS[row['loader']]:<36} {row['peak_rss_bytes'] / 1e6:11,.0f} "
                     f"{row['baseline_rss_bytes'] / 1e6:11,.0f} {load / 1e6:16,.0f} {load / bound:6.2f}x "
                     f"{verdict:>7}   {row['rss_anon_after_load_bytes'] / 1e6:14,.0f} "
                     f"{row['rss_file_after_load_bytes'] / 1e6:7,.0f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where the model folder is written (reused if present); "
                        "default: a temp dir")
    parser.add_argument("--tiny", action="store_true", help="a few-MB model, same code path (smoke test)")
    parser.add_argument("--keep", action="store_true", help="keep the written model folder")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--loaders", default=",".join(LOADERS),
                        help=f"comma-separated, from {', '.join(LOADERS)} (default: all)")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, folder = args.worker[0], Path(args.worker[1])
        if mode == "write":
            if not (folder.parent / WARMUP).is_dir():
                write_model(folder.parent / WARMUP, MICRO, TINY_SHARD_BYTES)
            if not (folder / "model.safetensors.index.json").is_file():
                write_model(folder, TINY if args.tiny else FULL, TINY_SHARD_BYTES if args.tiny else FULL_SHARD_BYTES)
            print(json.dumps({"written": str(folder)}))
        else:
            print(json.dumps(measure(mode, folder, folder.parent / WARMUP)))
        return
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    unknown = sorted(set(loaders) - set(LOADERS))
    if unknown or "lorakit" not in loaders:
        parser.error(f"--loaders: expected a list from {', '.join(LOADERS)} that includes lorakit, got {args.loaders}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorakit-loadmem-"))
    workdir.mkdir(parents=True, exist_ok=True)
    folder = workdir / ("llama-tiny-random-bf16" if args.tiny else "llama-1.5b-random-bf16")
    try:
        if not (folder / "model.safetensors.index.json").is_file() or not (workdir / WARMUP).is_dir():
            print(f"writing {folder} ...", flush=True)
            child("--worker", "write", str(folder), *(["--tiny"] if args.tiny else []))
        rows = []
        for loader in loaders:
            rows.append(child("--worker", loader, str(folder)))
            print(f"{loader}: peak {rows[-1]['peak_rss_bytes'] / 1e6:,.0f} MB", flush=True)
        lorakit_row = rows[loaders.index("lorakit")]
        four_bit, layer = lorakit_row["model_bytes"], layer_bf16_bytes(folder)
        bound = round(BOUND_FACTOR * (four_bit + layer))
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        summary = {"folder": str(folder), "shards": len(set(index["weight_map"].values())),
                   "stored_bytes": index["metadata"]["total_size"], "parameters": index["metadata"]["total_size"] // 2,
                   "four_bit_model_bytes": four_bit, "layer_bf16_bytes": layer, "bound_bytes": bound,
                   "met": lorakit_row["peak_rss_bytes"] - lorakit_row["baseline_rss_bytes"] <= bound,
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "rows": rows}
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(workdir / WARMUP, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{summary['parameters'] / 1e9:.3f}B parameters in {summary['shards']} bf16 shards "
          f"({summary['stored_bytes'] / 1e6:,.0f} MB). 4-bit model (after lorakit's load): {four_bit / 1e6:,.1f} MB; "
          f"one decoder layer in bf16: {layer / 1e6:,.1f} MB; bound = {BOUND_FACTOR} x (4-bit + layer) = "
          f"{bound / 1e6:,.1f} MB.")
    print("peak RSS: getrusage ru_maxrss of a fresh process, after the load and one read of every weight; baseline: "
          "its RSS after the imports and one load of a 1-layer micro model by the same loader, before this load; "
          "after: its anonymous and file-mapped resident memory at the end.\n")
    print("\n".join(table(rows, bound)))
    for row in rows:
        if abs(row["vm_hwm_bytes"] - row["peak_rss_bytes"]) > 0.01 * row["peak_rss_bytes"]:
            print(f"warning: {row['loader']}: ru_maxrss {row['peak_rss_bytes']} differs from VmHWM "
                  f"{row['vm_hwm_bytes']}; the parent's peak leaked into the child's ru_maxrss")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
