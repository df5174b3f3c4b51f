"""Adapter layers: y = base(x) + scale * B(A(dropout(x))) for Linear, Embedding and Conv2d bases.

Attribute names (`base_layer`, `lora_A`, `lora_B`, `lora_embedding_A`...) are PEFT's, so that a
module's state-dict keys are PEFT's in-memory keys less the `base_model.model.` prefix.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.dora import Magnitude, fold_dora, unfold_dora
from lorakit.errors import LorakitError
from lorakit.kernels.dora_linear import add_dora_update, dora_linear, row_norm, row_norm_reference
from lorakit.kernels.lora_linear import add_low_rank_update, lora_linear


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """alpha/r, or alpha/sqrt(r) with rsLoRA (keeps the update's magnitude stable as r grows)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_quantized(module: nn.Module) -> bool:
    """A quantized linear layer (lorakit's Linear4bit or alike): has `quant_state` and `dequantize()`."""
    return hasattr(module, "quant_state") and callable(getattr(module, "dequantize", None))


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, transformers Conv1D, or a quantized linear exposing `dequantize()`."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    return is_quantized(module)


def base_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base layer's float weight in its own layout (dequantized for 4-bit layers), detached."""
    if is_quantized(layer):
        weight = layer.dequantize()
    else:
        weight = layer.weight.detach()
    return weight if dtype is None else weight.to(dtype)


class LoraLayer(nn.Module):
    """State shared by every adapter layer: several named adapters, any subset active."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds, in insertion order."""
        return list(self.scaling)

    def _register(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = lora_scale(alpha, r, use_rslora)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delete(self, name: str) -> None:
        """Remove one adapter's weights from this layer (unmerging it first)."""
        if name in self.merged_adapters:
            self.unmerge([name])
        for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout"):
            container = getattr(self, attr, None)
            if container is not None and name in container:
                del container[name]
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def _live_adapters(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n in self.scaling and n not in self.merged_adapters]

    def delta_weight(self, name: str) -> torch.Tensor:  # pragma: no cover - overridden
        """scale * B @ A in the base weight's layout, fp32."""
        raise NotImplementedError

    def merge(self, names: list[str] | None = None) -> None:
        """Add the adapters' deltas into the base weight (in place; exact within fp rounding)."""
        for name in names if names is not None else list(self.active_adapters):
            if name in self.merged_adapters or name not in self.scaling:
                continue
            self._merge_one(name)
            self.merged_adapters.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtract merged adapters' deltas from the base weight, newest first."""
        for name in reversed(list(self.merged_adapters)):
            if names is not None and name not in names:
                continue
            self._unmerge_one(name)
            self.merged_adapters.remove(name)

    def _merge_one(self, name: str) -> None:
        self._add_to_base(self.delta_weight(name))

    def _unmerge_one(self, name: str) -> None:
        self._add_to_base(-self.delta_weight(name))

    def merged_weight(self, names: list[str], weight: torch.Tensor) -> torch.Tensor:
        """`weight` (fp32, the base's layout) with adapters `names` folded in, leaving the layer as it is."""
        for name in names:
            weight = weight + self.delta_weight(name)
        return weight

    def _add_to_base(self, delta: torch.Tensor) -> None:
        base = self.base_layer
        if is_quantized(base):
            # A 4-bit base can't take an exact in-place add: dequantize, add, requantize (PEFT does the same).
            merged = base.dequantize(torch.float32) + delta.to(base.compute_dtype).float()
            self.base_layer = requantize_like(base, merged)
            return
        with torch.no_grad():
            base.weight.data = (base.weight.data.float() + delta).to(base.weight.dtype)

    def _set_base(self, weight: torch.Tensor) -> None:
        base = self.base_layer
        if is_quantized(base):
            self.base_layer = requantize_like(base, weight.to(base.compute_dtype).float())
            return
        with torch.no_grad():
            base.weight.data = weight.to(base.weight.dtype)


def requantize_like(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new quantized layer of the same class and settings as `layer`, holding `weight`."""
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    state = layer.quant_state
    return type(layer).from_linear(
        plain, quant_type=state.quant_type, blocksize=state.blocksize, double_quant=state.nested,
        compute_dtype=layer.compute_dtype,
    )


def _adapter_dtype(base: nn.Module) -> torch.dtype | None:
    """PEFT casts new adapters to the base dtype then upcasts half types to fp32: round through it."""
    dtype = getattr(base, "compute_dtype", None) or getattr(getattr(base, "weight", None), "dtype", None)
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


class LoraLinear(LoraLayer):
    """LoRA around nn.Linear, transformers Conv1D (fan_in_fan_out) or a 4-bit Linear."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (PEFT's name)
        # ("norm", name): the last no-grad row norm with copies of the A and B it came from; "weight_sq": ||W||²
        # per row keyed by W's version; ("merged", name): the norm a merge divided by, for its unmerge. Never saved.
        self._dora_cache: dict = {}

    def add(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
            init: bool | str = True, use_dora: bool = False, loftq_config: dict | None = None) -> None:
        """Create adapter `name`: A [r, in], B [out, r]; A random and B zero unless `init` says otherwise."""
        self._register(name, r, alpha, dropout, use_rslora)
        device = _param_device(self.base_layer)
        # Same construction order as PEFT so that seeded inits are bit-identical.
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device)
        self._init(name, init, loftq_config or {})
        if use_dora:
            self.lora_magnitude_vector[name] = Magnitude(self._initial_magnitude(name))

    def _initial_magnitude(self, name: str) -> torch.Tensor:
        """||W + s·B·A|| per output row (PEFT's DoRA init; the base weight after any init changed it)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        norm = row_norm_reference(self.weight_out_in(torch.float32), A, B, self.scaling[name])
        dtype = _adapter_dtype(self.base_layer)
        return norm if dtype is None else norm.to(dtype).float()

    def weight_out_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as [out, in] in `dtype` (dequantized for 4-bit, transposed for Conv1D), detached."""
        weight = base_weight(self.base_layer, dtype)
        return weight.T if self.fan_in_fan_out else weight

    def _base_stamp(self) -> tuple:
        base = self.base_layer
        tensor = base.packed if is_quantized(base) else base.weight
        return _stamp(tensor)

    def _weight_sq(self, weight: torch.Tensor) -> torch.Tensor:
        key = ("weight_sq", self._base_stamp(), weight.dtype)
        hit = self._dora_cache.get("weight_sq")
        if hit is None or hit[0] != key:
            hit = (key, weight.detach().float().square().sum(1))
            self._dora_cache["weight_sq"] = hit
        return hit[1]

    def dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """||W + s·B·A|| per output row of DoRA adapter `name` (fp32, detached).

        Computed afresh whenever gradients are on (training moves A and B every step). Under no_grad (eval,
        generation) it is reused while A and B hold the same values: compared, not trusted by version,
        since fused optimizers and FSDP's gathers change values without bumping tensor versions.
        """
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        weight_sq = self._weight_sq(weight) if weight.dtype in (torch.bfloat16, torch.float16) else None
        if torch.is_grad_enabled():
            return row_norm(weight, A, B, self.scaling[name], weight_sq)
        key = (self._base_stamp(), weight.dtype, self.scaling[name])
        hit = self._dora_cache.get(("norm", name))
        if hit is None or hit[0] != key or not torch.equal(hit[1], A) or not torch.equal(hit[2], B):
            hit = (key, A.detach().clone(), B.detach().clone(), row_norm(weight, A, B, self.scaling[name], weight_sq))
            self._dora_cache[("norm", name)] = hit
        return hit[3]

    def delete(self, name: str) -> None:
        """Remove one adapter's weights from this layer (unmerging it first)."""
        super().delete(name)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self._dora_cache.pop(("norm", name), None)
        self._dora_cache.pop(("merged", name), None)

    def _merge_one(self, name: str) -> None:
        if name not in self.lora_magnitude_vector:
            return super()._merge_one(name)
        current = base_weight(self.base_layer, torch.float32)
        self._set_base(self.merged_weight([name], current, unmerged=self._unmerged(current)))

    def _unmerge_one(self, name: str) -> None:
        if name not in self.lora_magnitude_vector:
            return super()._unmerge_one(name)
        current = base_weight(self.base_layer, torch.float32)
        self._set_base(self._unfold(name, current))

    def _unmerged(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` with every merged adapter taken out again, newest first (DoRA's norm needs the bare W)."""
        for name in reversed(self.merged_adapters):
            weight = self._unfold(name, weight)
        return weight

    def _unfold(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return weight - self.delta_weight(name)
        norm = self._dora_cache[("merged", name)]
        return unfold_dora(weight, self.delta_weight(name), self.lora_magnitude_vector[name].weight, norm,
                           self.fan_in_fan_out)

    def merged_weight(self, names: list[str], weight: torch.Tensor,
                      unmerged: torch.Tensor | None = None) -> torch.Tensor:
        """`weight` (fp32, the base's layout) with adapters `names` folded in; DoRA's norms use `unmerged`."""
        bare = weight if unmerged is None else unmerged
        for name in names:
            delta = self.delta_weight(name)
            if name not in self.lora_magnitude_vector:
                weight = weight + delta
                continue
            bare_out_in = bare.T if self.fan_in_fan_out else bare
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            norm = row_norm_reference(bare_out_in, A, B, self.scaling[name])
            self._dora_cache[("merged", name)] = norm  # unmerge divides by this same norm
            weight = fold_dora(weight, delta, self.lora_magnitude_vector[name].weight, norm, self.fan_in_fan_out)
        return weight

    def _init(self, name: str, init: bool | str, loftq_config: dict) -> None:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if init is False:
                return
            if init == "loftq":
                from lorakit.loftq import init_loftq

                init_loftq(self, name, loftq_config)
                return
            if isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
                self._init_from_base(name, init)
                return
            if init == "gaussian":
                nn.init.normal_(A, std=1 / self.r[name])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
            dtype = _adapter_dtype(self.base_layer)
            if dtype is not None:
                A.copy_(A.to(dtype).float())

    def _init_from_base(self, name: str, init: str) -> None:
        """PiSSA / OLoRA: start the adapter on W's principal part and subtract it from the base."""
        if is_quantized(self.base_layer):
            raise LorakitError(f"init_lora_weights={init!r} needs a float base weight; quantize after adding it")
        r, scale = self.r[name], self.scaling[name]
        weight = base_weight(self.base_layer, torch.float32)
        weight = weight.T if self.fan_in_fan_out else weight
        if init == "olora":
            q, rr = torch.linalg.qr(weight)
            B, A = q[:, :r], rr[:r]
        else:
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            else:
                niter = int(init.rsplit("_", 1)[1])
                U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
                Vh = V.T
            root = torch.sqrt(S[:r] / scale)
            A, B = root[:, None] * Vh[:r], U[:, :r] * root[None, :]
        self.lora_A[name].weight.copy_(A)
        self.lora_B[name].weight.copy_(B)
        residual = weight - scale * (B @ A)
        base = self.base_layer.weight
        base.data = (residual.T if self.fan_in_fan_out else residual).to(base.dtype).contiguous()

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * B @ A in the base weight's layout ([out, in], or [in, out] for Conv1D), fp32."""
        delta = (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Base output plus each live adapter's low-rank (or DoRA) update."""
        live = self._live_adapters()
        if len(live) == 1 and not self.fan_in_fan_out and not args and not kwargs:
            name = live[0]
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            if name in self.lora_magnitude_vector:
                return dora_linear(x, self.base_layer, A, B, self.lora_magnitude_vector[name].weight,
                                   self.lora_dropout[name], self.scaling[name], self.weight_out_in,
                                   partial(self.dora_norm, name))
            return lora_linear(x, self.base_layer, A, B, self.lora_dropout[name], self.scaling[name])
        result = self.base_layer(x, *args, **kwargs)
        for name in live:
            A, B, dropout = self.lora_A[name].weight, self.lora_B[name].weight, self.lora_dropout[name]
            if name not in self.lora_magnitude_vector:
                result = add_low_rank_update(result, dropout(x), A, B, self.scaling[name])
                continue
            # PEFT's DoRA takes x·Wᵀ from the running result when x sees no dropout, else recomputes it.
            clean = isinstance(dropout, nn.Identity) or not self.training
            weight = self.weight_out_in(x.dtype if x.dtype in (torch.bfloat16, torch.float16) else A.dtype)
            result = add_dora_update(result, dropout(x), weight, self.base_layer.bias, A, B,
                                     self.lora_magnitude_vector[name].weight, self.scaling[name],
                                     self.dora_norm(name, weight), result if clean else None)
        return result

    def extra_repr(self) -> str:
        return f"adapters={self.r}, active={self.active_adapters}, merged={self.merged_adapters}"


class LoraEmbedding(LoraLayer):
    """LoRA around nn.Embedding: A [r, num_embeddings] zero, B [dim, r] normal (PEFT's init)."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
            init: bool | str = True, use_dora: bool = False, loftq_config: dict | None = None) -> None:
        """Create adapter `name` on the embedding table."""
        _refuse_dora(use_dora, "Embedding")
        if isinstance(init, str) and init != "gaussian":
            raise LorakitError(f"init_lora_weights={init!r} is not available for embeddings")
        self._register(name, r, alpha, dropout, use_rslora)
        base, device = self.base_layer, self.base_layer.weight.device
        A = torch.randn(r, base.num_embeddings, device=device)
        B = torch.randn(base.embedding_dim, r, device=device)
        if init is not False:
            nn.init.zeros_(A)
            nn.init.normal_(B)
        self.lora_embedding_A[name] = nn.Parameter(A)
        self.lora_embedding_B[name] = nn.Parameter(B)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * (B @ A)^T, shaped like the embedding table [num_embeddings, dim]."""
        B, A = self.lora_embedding_B[name].float(), self.lora_embedding_A[name].float()
        return (B @ A).T * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Base embedding plus each live adapter's low-rank lookup."""
        result = self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        for name in self._live_adapters():
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            looked_up = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type,
                                    base.scale_grad_by_freq, base.sparse)
            result = result + ((looked_up @ B.T) * self.scaling[name]).to(result.dtype)
        return result


class LoraConv2d(LoraLayer):
    """LoRA around nn.Conv2d: A is a conv with the base's kernel, B a 1x1 conv (diffusion UNets)."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1 or base_layer.dilation not in ((1, 1), 1):
            raise LorakitError("LoRA on Conv2d supports groups=1 and dilation=1 only")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def add(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
            init: bool | str = True, use_dora: bool = False, loftq_config: dict | None = None) -> None:
        """Create adapter `name` on the convolution."""
        _refuse_dora(use_dora, "Conv2d")
        if isinstance(init, str) and init != "gaussian":
            raise LorakitError(f"init_lora_weights={init!r} is not available for Conv2d")
        self._register(name, r, alpha, dropout, use_rslora)
        base, device = self.base_layer, self.base_layer.weight.device
        self.lora_A[name] = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                      bias=False, device=device)
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, (1, 1), (1, 1), bias=False, device=device)
        if init is not False:
            with torch.no_grad():
                if init == "gaussian":
                    nn.init.normal_(self.lora_A[name].weight, std=1 / r)
                else:
                    nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B[name].weight)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * B∘A as one conv kernel [out, in, kh, kw]."""
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        if A.shape[2:] == (1, 1):
            delta = (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2))[:, :, None, None]
        else:
            delta = F.conv2d(A.permute(1, 0, 2, 3), B).permute(1, 0, 2, 3)
        return delta * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Base convolution plus each live adapter's low-rank convolution."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self._live_adapters():
            A, B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(A.weight.dtype))
            result = result + (B(A(h)) * self.scaling[name]).to(result.dtype)
        return result


class ModulesToSave(nn.Module):
    """A trainable copy of a whole module per adapter (e.g. a classifier head), PEFT's modules_to_save."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def add(self, name: str) -> None:
        """Copy the original module for adapter `name`, trainable."""
        import copy

        self.modules_to_save[name] = copy.deepcopy(self.original_module).requires_grad_(True)

    def delete(self, name: str) -> None:
        """Drop adapter `name`'s copy."""
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def active_module(self) -> nn.Module:
        """The module that runs: the first active adapter's copy, else the original."""
        for name in self.active_adapters:
            if not self.disabled and name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        """Run the active copy (or the original when adapters are off)."""
        return self.active_module()(*args, **kwargs)


def _stamp(tensor: torch.Tensor) -> tuple[int, int]:
    # A tensor's storage and in-place version: changes whenever its values may have changed.
    return tensor.data_ptr(), tensor._version


def _refuse_dora(use_dora: bool, kind: str) -> None:
    if use_dora:
        raise LorakitError(f"use_dora=True is supported on linear layers only, not on {kind}; "
                           f"leave {kind} layers out of target_modules or use plain LoRA")


def _param_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def wrap_layer(module: nn.Module) -> LoraLayer:
    """Wrap a supported base layer in the matching adapter layer."""
    if is_linear_like(module):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    raise LorakitError(
        f"LoRA cannot wrap {type(module).__name__}: supported are Linear, transformers Conv1D, "
        "4-bit Linear, Embedding and Conv2d"
    )
