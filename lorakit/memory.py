"""Memory estimator: predicts the peak memory of a fine-tuning run from the model's shape alone.

The accounting (docs/memory.md has the derivation and a measured check):
- full fine-tune, AdamW, mixed precision: bf16 weights 2 + fp32 master 4 + bf16 grads 2 + fp32 Adam
  m, v 8 = 16 bytes/param (18 with fp32 grads, `grad_dtype=torch.float32`);
- LoRA: frozen base in the compute dtype (2 bytes/param) + the adapter with full training state;
- QLoRA: decoder linears in NF4 (0.5 byte/param + absmax: 0.5 bit/param in fp32 at block 64, ~0.127
  bit/param with double quant), embeddings/norms/head in the compute dtype, adapter as in LoRA.
Activations are what autograd saves per block (layer_activation_bytes): it depends on which weights train
and on the attention kind, "sdpa" or lorakit's CPU "plain" (attention_kind). The chunked loss adds one
chunk's logits and the reference kernels' fp32 temporaries (logits_bytes).
Peak = persistent state + max(activations + logits, gradients): during backward, each layer's saved
activations are freed as its gradients appear, so the two do not add up. With gradient checkpointing
the recomputed layer and the logits are never alive together, so only the larger of them counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from lorakit.constants import DEFAULT_BLOCKSIZE, NESTED_BLOCKSIZE, OPTIMIZERS
from lorakit.errors import LorakitError
from lorakit.kernels import attention as attention_module
from lorakit.optim.adamw8bit import bucket_sizes

GB = 1e9
METHODS = ("full", "lora", "qlora")
ADAPTER_KINDS = ("lora", "vera", "adalora")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_PRESETS = {"all-linear": ATTENTION + MLP, "attention": ATTENTION, "mlp": MLP,
                  "qv": ("q_proj", "v_proj")}
ATTENTION_KINDS = ("sdpa", "plain")  # transformers' sdpa; lorakit/kernels/attention.py's CPU path (see attention_kind)


@dataclass(frozen=True)
class ModelShape:
    """The numbers that fix a decoder-only transformer's memory (Llama/Mistral/Qwen2 or GPT-2 block)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: hidden // heads
    gated_mlp: bool = True  # gate/up/down (Llama) vs fc/proj (GPT-2)
    qkv_bias: bool = False  # Qwen2
    all_bias: bool = False  # GPT-2: every linear and norm has a bias
    positions: int = 0  # learned position embeddings (GPT-2); 0 for RoPE
    name: str = ""

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelShape:
        """Read a transformers config.json dict (Llama, Mistral, Qwen2, Gemma-like, or GPT-2)."""
        if "n_embd" in config:  # GPT-2 keys
            hidden = config["n_embd"]
            return cls(vocab=config["vocab_size"], hidden=hidden,
                       intermediate=config.get("n_inner") or 4 * hidden,
                       layers=config["n_layer"], heads=config["n_head"], kv_heads=config["n_head"],
                       tie_word_embeddings=config.get("tie_word_embeddings", True), gated_mlp=False,
                       all_bias=True, positions=config.get("n_positions", 1024),
                       name=config.get("_name_or_path", "") or "gpt2")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [key for key in required if key not in config]
        if missing:
            raise LorakitError(f"ModelShape.from_hf_config: config lacks {missing}; pass a Llama/Mistral/"
                               f"Qwen2/GPT-2 style config.json (model_type={config.get('model_type')!r})")
        return cls(vocab=config["vocab_size"], hidden=config["hidden_size"],
                   intermediate=config["intermediate_size"], layers=config["num_hidden_layers"],
                   heads=config["num_attention_heads"],
                   kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                   tie_word_embeddings=config.get("tie_word_embeddings", False),
                   head_dim=config.get("head_dim") or 0, qkv_bias=config.get("model_type") == "qwen2",
                   name=config.get("_name_or_path", "") or config.get("model_type", ""))

    @classmethod
    def from_name(cls, name: str) -> ModelShape:
        """A preset: llama-1b/3b/7b/8b/13b/65b/70b (or just '7b'), smollm2-135m."""
        key = name.lower().removesuffix("-instruct")
        key = _ALIASES.get(key, key)
        if key not in PRESETS:
            raise LorakitError(f"unknown model preset {name!r}; use one of {sorted(PRESETS)} "
                               f"or a path to a config.json / Hugging Face model folder")
        return PRESETS[key]


def _llama(name, vocab, hidden, inter, layers, heads, kv, tie=False, head_dim=0) -> ModelShape:
    return ModelShape(vocab, hidden, inter, layers, heads, kv, tie, head_dim, name=name)


PRESETS = {shape.name: shape for shape in (
    _llama("smollm2-135m", 49152, 576, 1536, 30, 9, 3, tie=True),
    _llama("llama-1b", 128256, 2048, 8192, 16, 32, 8, tie=True, head_dim=64),  # Llama 3.2 1B
    _llama("llama-3b", 128256, 3072, 8192, 28, 24, 8, tie=True, head_dim=128),  # Llama 3.2 3B
    _llama("llama-7b", 32000, 4096, 11008, 32, 32, 32),  # Llama 2 7B
    _llama("llama-8b", 128256, 4096, 14336, 32, 32, 8),  # Llama 3 8B
    _llama("llama-13b", 32000, 5120, 13824, 40, 40, 40),  # Llama 2 13B
    _llama("llama-65b", 32000, 8192, 22016, 80, 64, 64),  # LLaMA 65B (the QLoRA paper's)
    _llama("llama-70b", 32000, 8192, 28672, 80, 64, 8),  # Llama 2 70B
)}
_ALIASES = {"1b": "llama-1b", "3b": "llama-3b", "7b": "llama-7b", "8b": "llama-8b", "13b": "llama-13b",
            "65b": "llama-65b", "70b": "llama-70b", "smollm2-135m-instruct": "smollm2-135m",
            "smollm2": "smollm2-135m"}


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear in one decoder block, by its Llama module name."""
    h, q_out, kv_out = shape.hidden, shape.heads * shape.dim_head, shape.kv_heads * shape.dim_head
    attention = {"q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h)}
    if shape.gated_mlp:
        mlp = {"gate_proj": (h, shape.intermediate), "up_proj": (h, shape.intermediate),
               "down_proj": (shape.intermediate, h)}
    else:  # GPT-2's c_fc/c_proj, named as up/down so targets read the same
        mlp = {"up_proj": (h, shape.intermediate), "down_proj": (shape.intermediate, h)}
    return {**attention, **mlp}


def parameter_tensors(shape: ModelShape) -> list[tuple[str, int]]:
    """(name, numel) of every parameter tensor; decoder linears are named 'layers.{i}.{proj}'."""
    tensors = [("embed_tokens", shape.vocab * shape.hidden)]
    if shape.positions:
        tensors.append(("embed_positions", shape.positions * shape.hidden))
    norm_numel = 2 * shape.hidden if shape.all_bias else shape.hidden
    for i in range(shape.layers):
        for proj, (fan_in, fan_out) in linear_shapes(shape).items():
            tensors.append((f"layers.{i}.{proj}", fan_in * fan_out))
            if shape.all_bias or (shape.qkv_bias and proj in ("q_proj", "k_proj", "v_proj")):
                tensors.append((f"layers.{i}.{proj}.bias", fan_out))
        tensors += [(f"layers.{i}.input_norm", norm_numel), (f"layers.{i}.post_attention_norm", norm_numel)]
    tensors.append(("norm", norm_numel))
    if not shape.tie_word_embeddings:
        tensors.append(("lm_head", shape.vocab * shape.hidden))
    return tensors


def parameter_count(shape: ModelShape) -> int:
    """Total parameters of the model."""
    return sum(numel for _, numel in parameter_tensors(shape))


def resolve_targets(targets: str | tuple[str, ...] | list[str], shape: ModelShape) -> tuple[str, ...]:
    """Module names a LoRA targets: a preset (all-linear, attention, mlp, qv) or a list of names."""
    names = TARGET_PRESETS.get(targets) if isinstance(targets, str) else tuple(targets)
    known = tuple(linear_shapes(shape))
    if names is None or not names or any(name not in known for name in names):
        raise LorakitError(f"estimate: targets={targets!r} not understood; use one of "
                           f"{sorted(TARGET_PRESETS)} or a list of names from {known}")
    return names


def adapter_tensors(shape: ModelShape, rank: int, targets, use_dora: bool = False,
                    adapter: str = "lora") -> list[tuple[str, int]]:
    """(name, numel) of every trained adapter tensor, per target and layer.

    LoRA: A is r x in, B is out x r (DoRA adds m, out). AdaLoRA (rank = init_r): A, B and E (r).
    VeRA: lambda_b (out) and lambda_d (r); its shared random projections are frozen, so not trained.
    """
    _check_rank(rank)
    if adapter not in ADAPTER_KINDS:
        raise LorakitError(f"estimate: adapter must be one of {ADAPTER_KINDS}, got {adapter!r}")
    linears = linear_shapes(shape)
    tensors = []
    for i in range(shape.layers):
        for proj in resolve_targets(targets, shape):
            fan_in, fan_out = linears[proj]
            where = f"layers.{i}.{proj}"
            if adapter == "vera":
                tensors += [(f"{where}.vera_lambda_b", fan_out), (f"{where}.vera_lambda_d", rank)]
                continue
            tensors += [(f"{where}.lora_A", rank * fan_in), (f"{where}.lora_B", fan_out * rank)]
            if adapter == "adalora":
                tensors.append((f"{where}.lora_E", rank))
            if use_dora:
                tensors.append((f"{where}.lora_magnitude_vector", fan_out))
    return tensors


def nf4_bytes(numel: int, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True) -> float:
    """Bytes of one NF4 weight: packed nibbles, absmax (fp32, or uint8 + nested fp32), code tables."""
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * blocks + 16 * 4
    # uint8 absmax + one fp32 absmax per 256 of them + the 256-entry nested code + the fp32 offset
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 256 * 4 + 4 + 16 * 4


def optimizer_state_bytes(numel: int, optimizer: str, state_bytes: int = 4,
                          min_8bit_size: int = 4096) -> float:
    """Adam's m and v for one tensor: 2 x state_bytes each, or 8-bit blockwise (256) with fp32 absmax."""
    if optimizer == "adamw" or numel < min_8bit_size:
        return 2 * state_bytes * numel if optimizer == "adamw" else 8 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / 256)


def paged_device_state_bytes(numels: list[int], min_8bit_size: int = 4096) -> float:
    """The most state bytes PagedAdamW8bit holds on the device at once: its largest bucket's.

    8-bit and fp32-state tensors are bucketed apart (the optimizer groups them by state kind).
    """
    largest = 0.0
    for quantized in (True, False):
        sizes = [n for n in numels if (n >= min_8bit_size) == quantized]
        for bucket in bucket_sizes(sizes, quantized):
            largest = max(largest, sum(optimizer_state_bytes(n, "paged_adamw8bit", 4, min_8bit_size) for n in bucket))
    return largest


def attention_kind(device_type: str, seq_len: int) -> str:
    """The attention a model from `lorakit.load_model` trains with: "plain" or "sdpa" (lorakit/kernels/attention.py).

    On the CPU, lorakit runs a plain matmul-softmax-matmul while seq_len^2 <= attention.MAX_SCORES;
    everywhere else (and for longer sequences) transformers' sdpa runs.
    """
    if device_type == "cpu" and 1 < seq_len and seq_len * seq_len <= attention_module.MAX_SCORES:
        return "plain"
    return "sdpa"


def norm_activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, weight_trained: bool = True) -> float:
    """Bytes one HF RMSNorm saves: its input in fp32 (a copy unless fp32) and the fp32 rsqrt per token, plus the
    normalized input in the compute dtype when the weight trains (`weight * x` saves x only for the weight's
    gradient). Its output is counted where a trained linear saves it."""
    return tokens * (4 * shape.hidden + 4 + (dtype_bytes * shape.hidden if weight_trained else 0))


def lora_path_bytes(fan_in: int, fan_out: int, rank: int, tokens: int, dtype_bytes: int,
                    copies_A: bool = True) -> float:
    """Bytes one adapter saves besides its input x (saved for A's gradient, counted with the layer's input).

    Half-precision activations run lorakit.kernels.lora_linear (one autograd node per adapter, no dropout): it saves
    h = x A^T (r per token) and the adapter's own A and B, so nothing more. Otherwise
    (lora.add_low_rank_update) autograd also saves scale * B in the compute dtype (a new tensor, for h's
    gradient) and, when `copies_A`, the compute-dtype copy of A (for x's gradient: made when the adapter's
    dtype differs from the activations', not saved when x needs no gradient)."""
    if dtype_bytes == 2:
        return dtype_bytes * tokens * rank
    return dtype_bytes * (tokens * rank + fan_out * rank + (fan_in * rank if copies_A else 0))


def layer_activation_bytes(shape: ModelShape, batch: int, seq_len: int, dtype_bytes: int, attention: str = "sdpa",
                           targets: tuple[str, ...] | None = None, rank: int = 0, adapter_bytes: int = 4,
                           first: bool = False) -> float:
    """Bytes autograd saves for one decoder block (HF Llama, no dropout, no padding), counted with saved-tensor hooks.

    targets=None is a full fine-tune (every weight trains); otherwise the LoRA targets with their rank and
    adapter dtype bytes. A linear's input is saved only when the linear trains (a frozen weight needs no
    x for its gradient); `first` is the block after frozen embeddings (adapter methods), whose input needs
    no gradient: its first norm saves nothing, nor do (in fp32) the q, k, v adapters' A copies (exact when q, k
    and v all train, as with all-linear; with fewer of them the first block saves a little less than counted).
      - norms: norm_activation_bytes each; their outputs (s H) when a linear reading them trains;
      - attention "sdpa": q, k, v and the output (saved by the kernel whether o_proj trains or not) and an
        fp32 log-sum-exp per head: s (2 q + 2 kv) + 4 heads per token;
      - attention "plain" (lorakit/kernels/attention.py): the scaled q (s q), k and v (s kv each: a key-value head
        serves its query heads without copies), the probabilities of the causal blocks it computes
        (s B heads attention.causal_score_count(T), 10/16 of T^2 in four blocks) and, when o_proj trains,
        the output (s q); a causal mask is not saved (a padded batch's is, B T^2);
      - MLP: gate, silu(gate), up (s I each) and, when down_proj trains, their product (s I);
      - adapters: lora_path_bytes per target.
    RoPE's products with cos/sin save only cos/sin (shared by every layer, counted once in activation_bytes),
    and the residual sums save nothing.
    """
    s, d, tokens, hidden = dtype_bytes, shape.dim_head, batch * seq_len, shape.hidden
    q, kv = shape.heads * d, shape.kv_heads * d
    linears = linear_shapes(shape)
    full = targets is None
    trained = set(linears) if full else set(targets)
    norms = norm_activation_bytes(shape, tokens, s, weight_trained=full) * (1 if first and not full else 2)
    norm_outputs = tokens * s * hidden * (bool(trained & {"q_proj", "k_proj", "v_proj"})
                                          + bool(trained & {"gate_proj", "up_proj"}))
    if attention == "plain":
        scores = attention_module.causal_score_count(seq_len)
        core = tokens * s * (q + 2 * kv) + batch * shape.heads * scores * s
        core += tokens * s * q if "o_proj" in trained else 0
    else:
        core = tokens * (s * (2 * q + 2 * kv) + 4 * shape.heads)
    if shape.gated_mlp:
        mlp = tokens * s * shape.intermediate * (3 + ("down_proj" in trained))
    else:  # GPT-2: the activation's input, and its output when c_proj trains
        mlp = tokens * s * shape.intermediate * (1 + ("down_proj" in trained))
    adapters = 0.0
    if not full:
        for proj in targets:
            fan_in, fan_out = linears[proj]
            copies_A = adapter_bytes != s and not (first and proj in ("q_proj", "k_proj", "v_proj"))
            adapters += lora_path_bytes(fan_in, fan_out, rank, tokens, s, copies_A)
    return norms + norm_outputs + core + mlp + adapters


def activation_bytes(shape: ModelShape, batch: int, seq_len: int, dtype_bytes: int, checkpointing: bool,
                     attention: str = "sdpa", targets: tuple[str, ...] | None = None, rank: int = 0,
                     adapter_bytes: int = 4) -> float:
    """Saved activations of the decoder stack (arguments as layer_activation_bytes) and the final norm.

    With checkpointing: each layer's input plus one layer recomputed during backward. Without it: every
    layer (the trainer's forward runs with use_cache=False, so no KV cache is held).
    """
    tokens = batch * seq_len
    layer_args = (shape, batch, seq_len, dtype_bytes, attention, targets, rank, adapter_bytes)
    layer = layer_activation_bytes(*layer_args)
    outside = norm_activation_bytes(shape, tokens, dtype_bytes, weight_trained=targets is None)
    if not shape.positions:  # RoPE cos and sin, [T, head_dim] each, shared by all layers
        outside += 2 * seq_len * shape.dim_head * dtype_bytes
    if targets is None:  # a trained embedding's backward keeps the int64 token ids
        outside += 8 * tokens
    if checkpointing:
        return shape.layers * tokens * shape.hidden * dtype_bytes + layer + outside
    first = layer if targets is None else layer_activation_bytes(*layer_args, first=True)
    return (shape.layers - 1) * layer + first + outside


def logits_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, chunk: int | None,
                 head_trained: bool = False) -> float:
    """Peak bytes of the loss on top of the saved activations.

    Plain (chunk None, the HF loss): at the start of backward the logits (s), the fp32 log-softmax and two
    fp32 gradients, V (s + 12) per token, the shifted int64 labels, and the final hidden (s H) when the
    head trains. Chunked (lorakit.kernels.cross_entropy.chunked_cross_entropy): the gradients are formed during the
    forward, in one reused [rows, V] logits buffer in the compute dtype (rows = min(chunk, tokens)). The
    reference kernels, which run on GPUs, with LORAKIT_COMPILE=0 and under a dispatch mode, add per chunk
    an fp32 copy of the logits (none in fp32) and, inside torch.logsumexp, an fp32 x - max of the same
    size (a temporary within one op: lorakit.profiling's PeakMemoryTracker cannot see it, allocator_peak_bytes
    can). On the CPU the compiled kernels keep those values in registers and the loss needs only the buffer;
    this models the reference. The loss keeps grad_hidden [tokens, H] (s) for backward and 21 bytes per token (two int64
    targets, a bool mask, an fp32 row scale) plus three fp32 values per chunk row. When the head trains, its
    fp32 gradient [V, H] accumulates across chunks, and each chunk's grad_logits^T @ hidden (s) and its fp32
    upcast are alive after the chunk's own temporaries died.
    """
    s, vocab, hidden = dtype_bytes, shape.vocab, shape.hidden
    if chunk is None:
        return tokens * (vocab * (s + 12) + 8 + (s * hidden if head_trained else 0))
    rows = min(chunk, tokens)
    upcast = 4 if s < 4 else 0  # .float() of a compute-dtype tensor is a copy, of an fp32 one a no-op
    temporaries = rows * vocab * (upcast + 4)
    head = 0.0
    if head_trained:
        head = 4 * vocab * hidden
        temporaries = max(temporaries, vocab * hidden * (s + upcast))
    return rows * vocab * s + temporaries + head + tokens * (s * hidden + 21) + 12 * rows


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes of a training run, by component; `total` is the predicted device peak."""

    method: str
    params: int
    trainable_params: int
    weights: float  # model weights on the device (compute dtype, or NF4 for the quantized linears)
    master_weights: float  # fp32 copy of the trained weights when they are used in a lower precision
    adapter: float  # LoRA A and B
    gradients: float
    optimizer: float  # optimizer state on the device
    optimizer_host: float  # paged optimizer state kept in CPU memory
    activations: float
    logits: float
    total: float

    def as_dict(self) -> dict:
        """All fields as a plain dict (bytes)."""
        return asdict(self)

    def table(self) -> str:
        """A readable two-column table in GB (1e9 bytes), 2 decimals."""
        rows = [(f.name, getattr(self, f.name)) for f in fields(self)
                if f.name not in ("method", "params", "trainable_params")]
        lines = [f"method {self.method}: {self.params / 1e9:.2f}B params, "
                 f"{self.trainable_params / 1e6:.2f}M trainable"]
        lines += [f"  {name:<15} {value / GB:10.2f} GB" for name, value in rows]
        return "\n".join(lines)


def _dtype_bytes(dtype: torch.dtype, what: str) -> int:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LorakitError(f"estimate: {what} must be a floating torch.dtype (e.g. torch.bfloat16), "
                           f"got {dtype!r}")
    return dtype.itemsize


def _check_rank(rank: int) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise LorakitError(f"estimate: rank must be a positive int, got {rank!r}")


@dataclass(frozen=True)
class StepSettings:
    """How one training step runs, as far as its memory goes: estimate's settings, checked when made.

    Trained tensors live in param_dtype: for full fine-tuning with param_dtype wider than
    compute_dtype that is an fp32 master copy beside the compute-dtype weights. grad_dtype defaults
    to compute_dtype for full fine-tuning (the 16-bytes accounting) and to param_dtype for adapters.
    attention is "sdpa" or "plain", the kind lorakit trains with (attention_kind(device_type, seq_len)).
    The targets are checked by estimate, against the model's linears.
    """

    method: str = "lora"
    rank: int = 16
    targets: str | tuple[str, ...] | list[str] = "all-linear"
    batch: int = 1
    seq_len: int = 2048
    optimizer: str = "adamw"
    gradient_checkpointing: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    param_dtype: torch.dtype = torch.float32
    grad_dtype: torch.dtype | None = None
    chunked_ce: bool = True
    ce_chunk: int = 1024
    quant_blocksize: int = DEFAULT_BLOCKSIZE
    double_quant: bool = True
    attention: str = "sdpa"
    use_dora: bool = False
    adapter: str = "lora"  # lora, vera or adalora (rank is then VeRA's r or AdaLoRA's init_r)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LorakitError(f"estimate: method must be one of {METHODS}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise LorakitError(f"estimate: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.batch < 1 or self.seq_len < 1:
            raise LorakitError(f"estimate: batch and seq_len must be >= 1, got batch={self.batch}, "
                               f"seq_len={self.seq_len}")
        if self.attention not in ATTENTION_KINDS:
            raise LorakitError(f"estimate: attention must be one of {ATTENTION_KINDS} (see attention_kind), "
                               f"got {self.attention!r}")
        _dtype_bytes(self.compute_dtype, "compute_dtype")
        _dtype_bytes(self.param_dtype, "param_dtype")
        if self.method != "full":  # a full fine-tune has no adapter, so no rank
            _check_rank(self.rank)
        if self.grad_dtype is not None:
            _dtype_bytes(self.grad_dtype, "grad_dtype")

    @property
    def grad_bytes(self) -> int:
        """Bytes per gradient value: grad_dtype, else compute_dtype (full) or param_dtype (adapters)."""
        return (self.grad_dtype or (self.compute_dtype if self.method == "full" else self.param_dtype)).itemsize


def estimate(shape: ModelShape, settings: StepSettings | None = None) -> MemoryEstimate:
    """Predict a training step's memory from the model shape (StepSettings' defaults when settings is None)."""
    settings = settings or StepSettings()
    tensors = parameter_tensors(shape)
    params = sum(numel for _, numel in tensors)
    weights, master, adapter, trained = _weights_and_trained(shape, tensors, settings)
    trainable = sum(numel for _, numel in trained)
    optimizer_device, optimizer_host = _optimizer_bytes([numel for _, numel in trained], settings)
    activations, logits, overlap = _activation_and_loss_bytes(shape, settings)
    gradients = float(trainable * settings.grad_bytes)
    total = weights + master + adapter + optimizer_device + max(activations + logits - overlap, gradients)
    return MemoryEstimate(settings.method, params, trainable, weights, master, adapter, gradients,
                          float(optimizer_device), float(optimizer_host), float(activations), float(logits),
                          float(total))


def _weights_and_trained(shape: ModelShape, tensors: list[tuple[str, int]],
                         settings: StepSettings) -> tuple[float, float, float, list[tuple[str, int]]]:
    """Bytes of the weights, of the fp32 master copy and of the adapter, and the (name, numel) that train."""
    compute_bytes, param_bytes = settings.compute_dtype.itemsize, settings.param_dtype.itemsize
    params = sum(numel for _, numel in tensors)
    if settings.method == "full":
        master = float(params * param_bytes) if param_bytes != compute_bytes else 0.0
        return float(params * compute_bytes), master, 0.0, tensors
    trained = adapter_tensors(shape, settings.rank, settings.targets, settings.use_dora, settings.adapter)
    adapter = float(sum(numel for _, numel in trained) * param_bytes)
    if settings.method == "lora":
        return float(params * compute_bytes), 0.0, adapter, trained
    # qlora: every decoder linear weight in NF4, the rest in the compute dtype
    weights = sum(nf4_bytes(numel, settings.quant_blocksize, settings.double_quant) if _is_decoder_linear(name)
                  else numel * compute_bytes for name, numel in tensors)
    return weights, 0.0, adapter, trained


def _optimizer_bytes(numels: list[int], settings: StepSettings) -> tuple[float, float]:
    """Optimizer state bytes (on the device, in host memory) for the trained tensors' numels."""
    states = [optimizer_state_bytes(numel, settings.optimizer, settings.param_dtype.itemsize) for numel in numels]
    if settings.optimizer == "paged_adamw8bit":
        # Paged: states live in host memory; one bucket's states visit the device during its update.
        return paged_device_state_bytes(numels), sum(states)
    return sum(states), 0.0


def _activation_and_loss_bytes(shape: ModelShape, settings: StepSettings) -> tuple[float, float, float]:
    """Saved activations, the loss's peak, and how much of the two are never alive together."""
    compute_bytes = settings.compute_dtype.itemsize
    lora_targets = None if settings.method == "full" else resolve_targets(settings.targets, shape)
    activation_args = (shape, settings.batch, settings.seq_len, compute_bytes)
    adapter_args = (settings.attention, lora_targets, settings.rank, settings.param_dtype.itemsize)
    activations = activation_bytes(*activation_args, settings.gradient_checkpointing, *adapter_args)
    logits = logits_bytes(shape, settings.batch * settings.seq_len, compute_bytes,
                          settings.ce_chunk if settings.chunked_ce else None, head_trained=settings.method == "full")
    # With checkpointing the recomputed layer appears only after the loss's backward freed its memory.
    overlap = (min(layer_activation_bytes(*activation_args, *adapter_args), logits)
               if settings.gradient_checkpointing else 0.0)
    return activations, logits, overlap


def _is_decoder_linear(name: str) -> bool:
    return name.startswith("layers.") and name.endswith("_proj")


def load_shape(model: str) -> ModelShape:
    """The shape of `model` as the trainer names it: the embedded name, a preset, an HF folder, a config.json,
    or a .safetensors file with its config.json beside it."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise LorakitError(f"estimate: folder {model} has no config.json; pass a Hugging Face model folder, "
                               f"a config.json or a preset name")
    elif path.suffix == ".safetensors":
        path = path.parent / "config.json"
    elif path.suffix != ".json":
        if path.exists():
            raise LorakitError(f"estimate: {model} is not a config.json, a model folder or a .safetensors file "
                               f"(a .gguf model: pass the name of a preset with its shape)")
        return ModelShape.from_name(model)
    return ModelShape.from_hf_config(read_config_json(path))


def read_config_json(path: Path) -> dict:
    """A config.json as a dict, or a one-line error saying what is wrong with the file."""
    if not path.is_file():
        raise LorakitError(f"estimate: no config file at {path}; pass a preset name, a model folder or a config.json")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise LorakitError(f"estimate: {path} is not UTF-8 text; pass a transformers config.json") from None
    except json.JSONDecodeError as exc:
        raise LorakitError(f"estimate: {path} is not valid JSON (line {exc.lineno}: {exc.msg}); "
                           f"pass a transformers config.json") from None
    if not isinstance(data, dict):
        raise LorakitError(f"estimate: {path} holds a JSON {type(data).__name__}, expected a JSON object "
                           f"(a transformers config.json)")
    return data


def estimate_from_spec(model: str, settings: StepSettings | None = None) -> MemoryEstimate:
    """estimate() for a preset name ('7b', 'smollm2-135m'), a config.json path, or an HF model folder."""
    return estimate(load_shape(model), settings)


def comparison_table(sizes=("7b", "70b"), settings: StepSettings | None = None) -> str:
    """Full vs LoRA vs QLoRA for each size (each with settings): weights+grads+optimizer and the peak, in GB."""
    settings = settings or StepSettings()
    header = (f"{'model':<12} {'method':<6} {'params':>8} {'weights':>9} {'grads':>8} {'optim':>8} "
              f"{'w+g+opt':>9} {'activ':>8} {'peak':>9}")
    lines = [header, "-" * len(header)]
    for size in sizes:
        shape = ModelShape.from_name(size)
        for method in METHODS:
            est = estimate(shape, replace(settings, method=method))
            held = est.weights + est.master_weights + est.adapter
            static = held + est.gradients + est.optimizer
            lines.append(f"{shape.name:<12} {method:<6} {est.params / 1e9:7.2f}B {held / GB:9.2f} "
                         f"{est.gradients / GB:8.2f} {est.optimizer / GB:8.2f} {static / GB:9.2f} "
                         f"{(est.activations + est.logits) / GB:8.2f} {est.total / GB:9.2f}")
    return "\n".join(lines)


def plot_memory_vs_size(path: str, sizes=("1b", "3b", "7b", "8b", "13b", "70b"),
                        settings: StepSettings | None = None) -> str:
    """Write a PNG of predicted peak memory vs model size for full/LoRA/QLoRA (each with settings); returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = settings or StepSettings()
    shapes = sorted((ModelShape.from_name(size) for size in sizes), key=parameter_count)
    billions = [parameter_count(shape) / 1e9 for shape in shapes]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        totals = [estimate(shape, replace(settings, method=method)).total / GB for shape in shapes]
        ax.plot(billions, totals, marker="o", label=method)
    for limit in (24, 48, 80):
        ax.axhline(limit, color="gray", linestyle="--", linewidth=0.8)
        ax.text(billions[0], limit * 1.04, f"{limit} GB", color="gray", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("predicted peak memory (GB)")
    ax.set_title("Training memory: full fine-tune vs LoRA vs QLoRA (r=16, bs 1 x 2048, bf16)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

