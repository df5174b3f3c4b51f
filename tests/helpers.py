"""Shared test helpers: small random-init transformers models built from configs (no downloads), devices, and a
`lorakit serve` process."""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def tiny_llama(seed: int = 0, vocab: int = 128, hidden: int = 64, layers: int = 2, tie: bool = False):
    """A random-init LlamaForCausalLM small enough for unit tests (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    """A random-init GPT2LMHeadModel (its projections are transformers Conv1D, fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def build_tiny_model_folder(folder: Path, tie: bool = True) -> Path:
    """A random-init 2-layer Llama (hidden 32) sized to the real SmolLM2 tokenizer, saved with that tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_train_config(model_dir: Path, train_file: Path, output_dir: Path, **overrides) -> dict:
    """Settings that train the tiny model in about a second per 5 steps (fp32, no quantization)."""
    settings = {"model": str(model_dir), "quantize": None, "train_file": str(train_file),
                "output_dir": str(output_dir), "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
                "batch_size": 4, "max_steps": 20, "learning_rate": 1e-2, "max_seq_len": 64, "warmup_ratio": 0.1,
                "bf16": False, "save_every": 1000, "eval_every": 1000, "tensorboard": False}
    return {**settings, **overrides}


def devices() -> list[str]:
    """The devices present: the CPU, and CUDA when a GPU is lent (kernel tests run on each)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_tokenizer(chat_template=None):
    """A word-level tokenizer with no chat template unless one is given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<pad> <eos> <unk> <| |> system user assistant hello hi there what is 1 2 3 4 + ? ! : .".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


PROMPT = [[3, 9, 10, 11, 4, 5, 6]]


def save_tiny(folder, tie=False):
    """A tiny random Llama and a word-level tokenizer saved the way transformers saves them."""
    model = tiny_llama(tie=tie)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def logits(model, ids=PROMPT, like=None):
    """Logits of `ids`; with `like`, first switch to like's attention (load_model picks lorakit's)."""
    if like is not None:
        model.set_attn_implementation(like.config._attn_implementation)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def fast_kernels(op: str, *args) -> list:
    """The implementations of a lorakit.kernels operation, other than its reference, that run these inputs here."""
    from lorakit.kernels.dispatch import TABLE, why_not

    return [kernel for kernel in TABLE[op][:-1] if why_not(kernel, op, *args) is None]


def make_adapter(folder, root, name, rank, seed, targets="all-linear"):
    """A PEFT adapter folder root/name for the model at `folder`, with random nonzero B (it changes the output)."""
    import lorakit as lk

    model, _ = lk.load_model(str(folder))
    torch.manual_seed(seed)
    lk.add_adapter(model, lk.LoraConfig(r=rank, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_B" in key:
                param.normal_(std=0.5)
    return lk.save_adapter(model, root / name)


class Served:
    """A `lorakit serve` process and its URL."""

    def __init__(self, model, adapters, *extra):
        command = [sys.executable, "-m", "lorakit", "serve", "--model", str(model), "--port", "0",
                   "--max-model-len", "256", *[f"--adapter={name}={path}" for name, path in adapters.items()], *extra]
        self.log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads could fill and stall the server
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.banner = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                self.log.seek(0)
                raise AssertionError(f"server exited: {self.log.read()[-2000:]}")
            self.banner.append(line)
            if "Ctrl-C" in line:
                break
        self.url = re.search(r"(http://[\d.]+:\d+)/v1", "".join(self.banner)).group(1)

    def stop(self) -> int:
        """Ctrl-C, and its exit status."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.kill()
