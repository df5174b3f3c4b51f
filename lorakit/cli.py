"""The `lorakit` command: parses arguments and calls the library; errors become one line + exit code."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from lorakit.constants import DEFAULT_MODEL, DEMO_ADAPTERS, OPTIMIZERS, QUANT_TYPES
from lorakit.errors import LorakitError


class Parser(argparse.ArgumentParser):
    """argparse with lorakit's error contract: one line on stderr, exit 2 (raised, so main() prints it)."""

    def error(self, message: str) -> None:
        raise LorakitError(f"{self.prog}: {message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _quiet_transformers() -> None:
    """No transformers load bars or advice lines: they would bury lorakit's own one-line messages on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _cmd_demo(args: argparse.Namespace) -> int:
    from lorakit.files import check_writable
    from lorakit.train.demo import run_demo

    check_writable(Path(args.out), "--out")
    _quiet_transformers()
    results = run_demo(args.out, steps=args.steps, batch_size=args.batch_size, n_heldout=args.heldout,
                       overwrite=args.overwrite, progress=not args.quiet, adapter=args.adapter)
    target_met = results["base_accuracy"] <= 0.3 and results["tuned_accuracy"] >= 0.9
    print(f"base {results['base_accuracy']:.2f} -> tuned {results['tuned_accuracy']:.2f} "
          f"({'target met' if target_met else 'target NOT met'}: base <= 0.30, tuned >= 0.90)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from lorakit.train.config import load_config
    from lorakit.train.trainer import train

    overrides = list(args.set or [])
    if args.out:
        overrides.append(f"output_dir={args.out}")
    cfg = load_config(args.config, overrides)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from lorakit.train.distributed import launch

        extra = [] if cfg.distributed != "none" else ["--set", "distributed=ddp"]
        return launch(args.nproc, _without_nproc(args.argv) + extra)
    _quiet_transformers()
    results = train(cfg, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 reports the run
    diverged = results.get("diverged_at_step")
    warning = f" (DIVERGED at step {diverged}: the adapter is not usable)" if diverged else ""
    print(f"done: {results['steps']} steps, final loss {results['final_loss']:.4f}, "
          f"adapter in {results['adapter_dir']}{warning}")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line less its --nproc option, for the processes it starts."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            kept.append(item)
    return kept


def _parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    """'[NAME=]DIR' items -> (name, dir); the first unnamed one is 'default'."""
    pairs = []
    for index, spec in enumerate(specs):
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = ("default" if index == 0 else f"adapter{index}"), spec
        pairs.append((name, folder))
    return pairs


def _load_with_adapters(model_spec: str, adapters: list[str], quantize: str | None, active: str | None):
    from lorakit.inject import set_adapter
    from lorakit.models import load_model
    from lorakit.peft_format import load_adapter

    _quiet_transformers()
    model, tokenizer = load_model(model_spec, quantize=quantize)
    pairs = _parse_adapters(adapters)
    for name, folder in pairs:
        load_adapter(model, folder, name=name)
    if pairs:
        names = active.split(",") if active else [name for name, _ in pairs]
        set_adapter(model, names)
    return model, tokenizer


def _generate_requests(args: argparse.Namespace) -> int:
    """--requests FILE: every line through the batched multi-adapter engine, results as JSONL."""
    from lorakit.files import check_writable, write_text_atomic
    from lorakit.models import load_model
    from lorakit.serve.batch import read_requests, run_requests
    from lorakit.serve.engine import Engine, encode

    if args.prompt is not None or args.active:
        raise LorakitError("--requests runs a file of requests; drop --prompt / --active (each line names its adapter)")
    requests = read_requests(args.requests)
    if args.output:
        check_writable(Path(args.output), "--output")
    pairs = _parse_adapters(args.adapter or [])
    _quiet_transformers()
    model, tokenizer = load_model(args.model, quantize=_quant(args.quantize))
    for item in requests:
        item.setdefault("max_new_tokens", args.max_new_tokens)
        item.setdefault("temperature", args.temperature)
    # Each cache slot holds the longest request; at most 64 run at once.
    context = max(len(encode(tokenizer, item.get("prompt", item.get("messages")))) + int(item["max_new_tokens"])
                  for item in requests)
    engine = Engine(model, tokenizer, max_loras=max(1, min(len(pairs), 16)), max_cpu_loras=max(16, len(pairs)),
                    max_batch=min(64, len(requests)), max_model_len=context)
    for name, folder in pairs:
        engine.add_adapter(name, folder)
    text = "".join(json.dumps(result) + "\n" for result in run_requests(engine, requests, progress=not args.quiet))
    if args.output:
        write_text_atomic(Path(args.output), text)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    if args.requests:
        return _generate_requests(args)
    model, tokenizer = _load_with_adapters(args.model, args.adapter or [], _quant(args.quantize), args.active)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []

    def reply(user_text: str) -> str:
        messages = history + [{"role": "user", "content": user_text}]
        if args.raw or not getattr(tokenizer, "chat_template", None):
            text = user_text
        else:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=args.raw)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                 temperature=args.temperature if args.temperature > 0 else None, top_p=None,
                                 top_k=None, streamer=streamer, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        history.extend([{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}])
        return answer

    if args.prompt is not None:
        reply(args.prompt)
        return 0
    print("chat with the model; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        reply(line)
    return 0


def _quant(value: str | None) -> str | None:
    return None if value in (None, "none") else value


def _cmd_merge(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    import torch

    from lorakit.files import check_writable
    from lorakit.inject import unload

    out = Path(args.out)
    check_writable(out, "--out")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise LorakitError(f"--out {out} is not empty; pass --overwrite or choose another --out")
    model, tokenizer = _load_with_adapters(args.model, args.adapter, None, None)
    model = unload(model, merge=True)
    model.to(getattr(torch, args.dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged model written to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lorakit.spectrum import describe_adapter

    print(describe_adapter(args.adapter_dir, per_layer=args.layers))
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from lorakit.files import check_new_file
    from lorakit.memory import plot_memory_vs_size
    from lorakit.train.config import load_config
    from lorakit.train.estimate import estimate_run

    if args.plot:  # checked before any work, so a bad path costs nothing
        check_new_file(Path(args.plot), "--plot", suffix=".png")
    cfg = load_config(args.config, args.set or [])
    # typed flag values replace the config's (no YAML round trip: a path such as "null" stays a path)
    flags = {"model": args.model, "batch_size": args.batch, "max_seq_len": args.seq_len, "optimizer": args.optimizer,
             "gradient_checkpointing": args.gradient_checkpointing,
             "lora": None if args.rank is None else {**cfg.lora, "r": args.rank}}
    changes = {key: value for key, value in flags.items() if value is not None}
    if args.method == "lora":
        changes["quantize"] = None
    elif args.method == "qlora" and cfg.quantize is None:  # a config's fp4 stays fp4
        changes["quantize"] = "nf4"
    cfg = replace(cfg, **changes)
    run = estimate_run(cfg, device=args.device, method="full" if args.method == "full" else None,
                       baseline_bytes=None if args.baseline_mb is None else args.baseline_mb * 1e6)
    if args.json:
        print(json.dumps(run.as_json()))
    else:
        print(run.table())
    if args.plot:
        plot_memory_vs_size(args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = Parser(prog="lorakit", description="LoRA and QLoRA fine-tuning, PEFT-compatible.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_merge(sub)
    _add_inspect(sub)
    _add_estimate(sub)
    _add_serve(sub)
    return parser


def _add_demo(sub: argparse._SubParsersAction) -> None:
    """The `lorakit demo` subcommand."""
    p = sub.add_parser("demo", help="QLoRA-teach the embedded model a task it can't do, and measure it",
                       description="Fine-tune SmolLM2-135M-Instruct (NF4 base, r=16, all linear layers) to "
                       "normalise dates to ISO 8601; measure held-out exact match before and after.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=positive_int, default=120, help="training steps (default: 120)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="examples per step (default: 16)")
    p.add_argument("--heldout", type=positive_int, default=100, help="held-out examples to score (default: 100)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished demo in --out")
    p.add_argument("--adapter", choices=DEMO_ADAPTERS, default="lora",
                   help="what to train on the NF4 base: lora (default), dora, vera or adalora")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)


def _add_train(sub: argparse._SubParsersAction) -> None:
    """The `lorakit train` subcommand."""
    p = sub.add_parser("train", help="fine-tune an adapter from a YAML config",
                       description="Train a LoRA/QLoRA adapter. CONFIG is a YAML file whose keys are "
                       "TrainConfig's (see README); --set overrides any key, e.g. --set lora.r=8.")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--out", help="output folder (same as --set output_dir=...)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="train as N processes on this machine (torchrun; distributed: ddp unless set)")
    p.set_defaults(func=_cmd_train)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    """The `lorakit generate` subcommand."""
    p = sub.add_parser("generate", help="generate text, with or without adapters (streamed)",
                       description="Generate from a prompt, or chat interactively when --prompt is absent.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, HF folder, .gguf or .safetensors "
                   f"(default: {DEFAULT_MODEL})")
    p.add_argument("--adapter", action="append", metavar="[NAME=]DIR", help="adapter folder (repeatable)")
    p.add_argument("--active", metavar="NAME[,NAME]", help="which loaded adapters are active (default: all)")
    p.add_argument("--prompt", help="the user message; omit for an interactive chat")
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to generate (default: 128)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--quantize", choices=[*QUANT_TYPES, "none"], default="none", help="4-bit base (default: none)")
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt is the raw text")
    p.add_argument("--requests", metavar="JSONL", help="a file of requests ({\"prompt\"|\"messages\", \"adapter\", "
                   "...} per line), run batched through the multi-adapter engine")
    p.add_argument("--output", metavar="JSONL", help="with --requests: write the results here (default: stdout)")
    p.add_argument("--quiet", action="store_true", help="with --requests: no progress bar")
    p.set_defaults(func=_cmd_generate)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    """The `lorakit merge` subcommand."""
    p = sub.add_parser("merge", help="fold an adapter into the base and write a HF model folder",
                       description="Merge adapters into the float base weights and save a folder that "
                       "transformers.AutoModelForCausalLM.from_pretrained loads.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model (default: {DEFAULT_MODEL})")
    p.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR", help="adapter (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype of the merged model (default: float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_merge)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    """The `lorakit inspect` subcommand."""
    p = sub.add_parser("inspect", help="show an adapter's config, ranks, sizes and spectrum",
                       description="Read a PEFT/lorakit adapter folder and summarise it.")
    p.add_argument("adapter_dir", help="adapter folder")
    p.add_argument("--layers", action="store_true", help="one line per adapted layer with its spectrum")
    p.set_defaults(func=_cmd_inspect)


def _add_estimate(sub: argparse._SubParsersAction) -> None:
    """The `lorakit estimate` subcommand."""
    from lorakit.train.estimate import JSON_KEYS

    keys = "\n".join(f"  {key:<24} {meaning}" for key, meaning in JSON_KEYS.items())
    p = sub.add_parser("estimate", help="predict a training run's memory (full / LoRA / QLoRA)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Predict the memory of `lorakit train CONFIG`: weights, adapter, gradients, "
                       "optimizer,\nactivations, the load peak and the runtime baseline, and the whole process's "
                       "peak RSS.\nWithout CONFIG the trainer's defaults apply; flags and --set override either.",
                       epilog=f"--json prints one object with these keys (bytes unless named otherwise):\n{keys}")
    p.add_argument("config", nargs="?", help="a training config YAML (as for lorakit train)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--model", help=f"preset (e.g. llama-7b), HF folder, config.json or .safetensors "
                   f"(default: the config's, else {DEFAULT_MODEL})")
    p.add_argument("--method", choices=["full", "lora", "qlora"],
                   help="lora = float base, qlora = NF4 base, full = every weight trains (default: the config's; "
                   "the trainer's default is qlora)")
    p.add_argument("--rank", type=positive_int, help="LoRA rank (default: the config's, else 16)")
    p.add_argument("--batch", type=positive_int, help="sequences per step (default: the config's, else 8)")
    p.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default: the config's, else 512)")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="(default: the config's, else adamw)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each layer in backward (default: the config's, else off)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="where it trains (default: the config's device; auto = cuda when present, else cpu)")
    p.add_argument("--baseline-mb", type=non_negative_float,
                   help="the runtime's resident memory before any model tensor, in MB (default: measured, 600)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object (keys below)")
    p.add_argument("--plot", metavar="PNG", help="also write memory vs model size for the three methods")
    p.set_defaults(func=_cmd_estimate)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """The `lorakit serve` subcommand."""
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with many adapters on one base",
                       description="Serve the base and its adapters over the OpenAI API (/v1/chat/completions, "
                       "/v1/completions, /v1/models), vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, "
                       "/health and /metrics. A request's \"model\" names an adapter or the base.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model: name, HF folder, .gguf or .safetensors "
                   f"(default: {DEFAULT_MODEL})")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="an adapter to serve as NAME (repeatable)")
    p.add_argument("--max-loras", type=positive_int, default=16, help="adapters in the compute tables (default: 16)")
    p.add_argument("--max-cpu-loras", type=positive_int, default=64, help="adapters kept in memory (default: 64)")
    p.add_argument("--max-lora-rank", type=positive_int, default=64, help="the largest rank served (default: 64)")
    p.add_argument("--max-batch", type=positive_int, default=64, help="sequences decoded together (default: 64)")
    p.add_argument("--max-model-len", type=positive_int, default=1024,
                   help="tokens per sequence, prompt and completion (default: 1024)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="requests waiting for a slot before new ones get 429 (default: 256)")
    p.add_argument("--quantize", choices=[*QUANT_TYPES, "none"], default="none", help="4-bit base (default: none)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = a free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: no key)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from lorakit.models import load_model
    from lorakit.serve.engine import Engine
    from lorakit.serve.server import serve

    pairs = _parse_adapters(args.adapter or [])
    unnamed = [spec for spec in args.adapter or [] if "=" not in spec]
    if unnamed:
        raise LorakitError(f"--adapter {unnamed[0]}: give it a name clients use as \"model\": --adapter NAME=DIR")
    if any(name == "auto" for name, _ in pairs):
        raise LorakitError("--adapter auto=...: \"auto\" is the routing model's name; choose another name")
    _quiet_transformers()
    model, tokenizer = load_model(args.model, quantize=_quant(args.quantize))
    engine = Engine(model, tokenizer, max_loras=args.max_loras, max_cpu_loras=max(args.max_cpu_loras, args.max_loras),
                    max_lora_rank=args.max_lora_rank, max_batch=args.max_batch, max_model_len=args.max_model_len)
    for name, folder in pairs:
        engine.add_adapter(name, folder)
    base_id = Path(args.model).name if os.sep in args.model else args.model
    serve(engine, base_id, args.host, args.port, args.api_key, args.max_queue, announce=lambda text: print(
        text, flush=True))
    return 0


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Print each warning as one `lorakit: warning: ...` line (not Python's two-line file:line form)."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"lorakit: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _os_error_line(exc: OSError) -> str:
    """An OSError as 'PATH: reason' (the path it names, if any)."""
    where = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or str(exc)
    return f"{where}: {reason}" if where else reason


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; every failure prints one line and exits non-zero (no traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    with _one_line_warnings():
        try:
            args = build_parser().parse_args(argv)
            args.argv = argv
            return args.func(args)
        except LorakitError as exc:
            if debug:
                raise
            if not (getattr(exc, "quiet_when_launched", False) and os.environ.get("LORAKIT_LAUNCHED")):
                print(f"lorakit: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("lorakit: interrupted", file=sys.stderr)
            return 130
        except OSError as exc:  # the file system said no (disk full, permissions, a path that vanished)
            if debug:
                raise
            print(f"lorakit: error: {_os_error_line(exc)}", file=sys.stderr)
            return 2
        except Exception as exc:  # a defect in lorakit or a library: still one line, the traceback on request
            if debug:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"lorakit: error: unexpected {type(exc).__name__}: {first} (rerun with --debug for the traceback "
                  "and report it)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
