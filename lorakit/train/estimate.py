"""What a `lorakit train` run will hold in memory: the step estimate plus the process around it.

`lorakit.memory.estimate` predicts the tensors of one training step. A user asks a different question,
"will this run fit on this machine?", so this module maps a TrainConfig onto that estimate with the
trainer's own choices (base dtype, attention kind, loss, optimizer) and adds what the process holds
besides tensors: the runtime baseline (Python, torch, transformers, the tokenizer, compiled kernels) and
the load peak (the streaming loader holds the finished weights plus one tensor in transit).

On the CPU the process peak is baseline + max(load peak, train peak). On a GPU the step's tensors are
device memory (`torch.cuda.max_memory_allocated` terms, `device_peak_bytes`) and the host holds the
baseline, the weights while they load, and a paged optimizer's states.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.errors import LorakitError
from lorakit.memory import (
    GB,
    METHODS,
    MemoryEstimate,
    ModelShape,
    StepSettings,
    attention_kind,
    estimate,
    linear_shapes,
    load_shape,
)
from lorakit.streaming import CHUNK_BYTES
from lorakit.train.config import TrainConfig

# Max RSS of `lorakit train` on a 2-layer, hidden-32 Llama with the SmolLM2 tokenizer (its tensors are
# under 4 MB): the interpreter, torch, transformers, the tokenizer and the compiled CPU kernels. It is a
# property of the software stack, not the model; benchmarks/memory_process.py --tiny re-measures it.
RUNTIME_BASELINE_BYTES = 600e6
DEVICES = ("cpu", "cuda")
# What --json prints, and what each key means (bytes unless named otherwise); `lorakit estimate --help` shows it.
JSON_KEYS = {
    "model": "the model's name or path",
    "method": "full, lora or qlora",
    "device": "cpu or cuda",
    "params": "parameters of the base model",
    "trainable_params": "parameters that train (the adapter's, or all for full)",
    "weights_bytes": "base weights as held (compute dtype, NF4/FP4 linears for qlora)",
    "adapter_bytes": "adapter weights (fp32)",
    "master_weights_bytes": "fp32 master copy (full fine-tuning in bf16 only)",
    "gradients_bytes": "gradients of what trains",
    "optimizer_bytes": "optimizer state where the step runs",
    "optimizer_host_bytes": "paged optimizer state kept in host memory",
    "activations_bytes": "what autograd saves for backward",
    "logits_bytes": "the loss's logits and its temporaries",
    "train_peak_bytes": "peak tensor bytes of a training step",
    "load_peak_bytes": "peak tensor bytes while the model loads",
    "runtime_baseline_bytes": "resident memory of the runtime before any model tensor",
    "process_peak_bytes": "predicted max RSS of the `lorakit train` process",
    "device_peak_bytes": "predicted torch.cuda.max_memory_allocated (cuda only, else null)",
}


@dataclass(frozen=True)
class RunEstimate:
    """The step estimate of a run and the process-level figures around it (bytes)."""

    model: str
    device: str
    step: MemoryEstimate
    load_peak: float
    runtime_baseline: float

    @property
    def train_peak(self) -> float:
        """Tensor bytes at the step's peak; on the CPU the paged optimizer's host states are in it too."""
        return self.step.total + (self.step.optimizer_host if self.device == "cpu" else 0.0)

    @property
    def device_peak(self) -> float | None:
        """The GPU's max_memory_allocated for the step, or None on the CPU."""
        return self.step.total if self.device == "cuda" else None

    @property
    def process_peak(self) -> float:
        """Predicted max RSS of the training process."""
        if self.device == "cpu":
            return self.runtime_baseline + max(self.load_peak, self.train_peak)
        return self.runtime_baseline + max(self.load_peak, self.step.optimizer_host)

    def as_json(self) -> dict:
        """The figures under JSON_KEYS' names."""
        step = self.step
        values = {
            "model": self.model, "method": step.method, "device": self.device, "params": step.params,
            "trainable_params": step.trainable_params, "weights_bytes": step.weights,
            "adapter_bytes": step.adapter, "master_weights_bytes": step.master_weights,
            "gradients_bytes": step.gradients, "optimizer_bytes": step.optimizer,
            "optimizer_host_bytes": step.optimizer_host, "activations_bytes": step.activations,
            "logits_bytes": step.logits, "train_peak_bytes": self.train_peak, "load_peak_bytes": self.load_peak,
            "runtime_baseline_bytes": self.runtime_baseline, "process_peak_bytes": self.process_peak,
            "device_peak_bytes": self.device_peak,
        }
        assert list(values) == list(JSON_KEYS)
        return values

    def table(self) -> str:
        """What the estimate covers, one line per term, in GB (1e9 bytes)."""
        step = self.step
        where = "GPU" if self.device == "cuda" else "CPU"
        lines = [f"{self.model}: {step.method} on the {where}, {step.params / 1e9:.3f}B params, "
                 f"{step.trainable_params / 1e6:.2f}M trainable",
                 f"  {'weights':<22} {step.weights / GB:8.3f} GB",
                 f"  {'adapter':<22} {step.adapter / GB:8.3f} GB"]
        if step.master_weights:
            lines.append(f"  {'fp32 master weights':<22} {step.master_weights / GB:8.3f} GB")
        lines += [f"  {'gradients':<22} {step.gradients / GB:8.3f} GB",
                  f"  {'optimizer':<22} {step.optimizer / GB:8.3f} GB"]
        if step.optimizer_host:
            lines.append(f"  {'optimizer (paged, host)':<22} {step.optimizer_host / GB:8.3f} GB")
        lines += [f"  {'activations':<22} {step.activations / GB:8.3f} GB",
                  f"  {'logits and loss':<22} {step.logits / GB:8.3f} GB",
                  f"  {'= training step peak':<22} {self.train_peak / GB:8.3f} GB"
                  + ("  (torch.cuda.max_memory_allocated)" if self.device == "cuda" else ""),
                  f"  {'load peak':<22} {self.load_peak / GB:8.3f} GB",
                  f"  {'runtime baseline':<22} {self.runtime_baseline / GB:8.3f} GB",
                  f"  {'= process peak (RSS)':<22} {self.process_peak / GB:8.3f} GB"]
        return "\n".join(lines)


def load_peak_bytes(shape: ModelShape, weights: float, quantized: bool) -> float:
    """Tensor bytes while the streaming loader runs: the finished weights plus what one tensor needs in transit.

    Each tensor is converted from its stored dtype through one reused buffer (CHUNK_BYTES), straight into
    its place; a quantized linear is read whole in its stored dtype (at most fp32) and encoded from an fp32
    copy, so the largest decoder linear's two copies sit on top of the weights. The model is built in host memory, on a
    GPU run too, before it moves to the device.
    """
    if not quantized:
        return weights + CHUNK_BYTES
    largest = max(fan_in * fan_out for fan_in, fan_out in linear_shapes(shape).values())
    return weights + largest * (4 + 4) + CHUNK_BYTES


def method_of(cfg: TrainConfig) -> str:
    """lora for a float base, qlora for a 4-bit one."""
    return "lora" if cfg.quantize is None else "qlora"


def device_of(cfg: TrainConfig) -> str:
    """The device the run trains on: the config's `device`, with auto = cuda when PyTorch sees one."""
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def attention_for(cfg: TrainConfig, device: str) -> str:
    """The attention kind the trainer runs: lorakit's plain CPU attention for auto on short CPU sequences.

    eager is transformers' attention, whose saved probabilities are closest to the plain kind's.
    """
    if cfg.attn_implementation == "sdpa" or not cfg.fast_kernels:  # without fast kernels auto keeps sdpa
        return "sdpa"
    if cfg.attn_implementation == "eager":
        return "plain"
    return attention_kind(device, cfg.max_seq_len)


def estimate_run(cfg: TrainConfig, device: str | None = None, method: str | None = None,
                 baseline_bytes: float | None = None) -> RunEstimate:
    """Predict the memory of `lorakit train` with `cfg` on `device` (default: the config's device)."""
    device = device or device_of(cfg)
    if device not in DEVICES:
        raise LorakitError(f"estimate: device must be one of {DEVICES}, got {device!r}")
    method = method or method_of(cfg)
    if method not in METHODS:
        raise LorakitError(f"estimate: method must be one of {METHODS}, got {method!r}")
    shape = load_shape(cfg.model)
    adapter = cfg.adapter_config()
    rank = adapter.init_r if cfg.adapter == "adalora" else adapter.r
    compute_dtype = cfg.compute_dtype()
    settings = StepSettings(method=method, rank=rank, targets=adapter.target_modules, batch=cfg.batch_size,
                            seq_len=cfg.max_seq_len, optimizer=cfg.optimizer,
                            gradient_checkpointing=cfg.gradient_checkpointing, compute_dtype=compute_dtype,
                            chunked_ce=cfg.chunked_loss, attention=attention_for(cfg, device),
                            use_dora=getattr(adapter, "use_dora", False), adapter=cfg.adapter)
    step = estimate(shape, settings)
    load = load_peak_bytes(shape, step.weights, quantized=method == "qlora")
    baseline = RUNTIME_BASELINE_BYTES if baseline_bytes is None else float(baseline_bytes)
    return RunEstimate(cfg.model, device, step, load, baseline)
