"""Linear4bit: a frozen nn.Linear stored as NF4/FP4 blocks, dequantized on the fly in each forward.

The module holds the packed 4-bit weight and its quantization state as buffers (so `.to(device)` and
`state_dict()` work), computes `y = x @ W_deq.T + b` in `compute_dtype`, and backpropagates to the input
only: the dequantized weight is rebuilt in backward instead of being saved, which is where QLoRA's memory
saving comes from. `quantize_model` swaps a model's linears for this module one layer at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.constants import ALLOWED_BLOCKSIZES, DEFAULT_BLOCKSIZE, QUANT_TYPES
from lorakit.errors import LorakitError
from lorakit.quant.nf4 import QuantState, dequantize_4bit, quantize_4bit

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_compute_dtype(value: torch.dtype | str, where: str = "compute_dtype") -> torch.dtype:
    """A torch dtype from a dtype or its name ("bfloat16", "float16", "float32", with or without "torch.")."""
    if isinstance(value, torch.dtype) and value in COMPUTE_DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[value.removeprefix("torch.")]
    raise LorakitError(f"{where}={value!r} is not supported; use one of {sorted(COMPUTE_DTYPES)}")


@dataclass
class QuantConfig:
    """How to quantize a model's linear layers (the usual QLoRA setting is the default)."""

    quant_type: str = "nf4"
    blocksize: int = DEFAULT_BLOCKSIZE
    double_quant: bool = True
    compute_dtype: torch.dtype | str = torch.bfloat16

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise LorakitError(
                f"QuantConfig.quant_type={self.quant_type!r} is not supported; use one of {QUANT_TYPES}"
            )
        if isinstance(self.blocksize, bool) or self.blocksize not in ALLOWED_BLOCKSIZES:
            raise LorakitError(
                f"QuantConfig.blocksize={self.blocksize!r} is not supported; "
                f"use one of {tuple(ALLOWED_BLOCKSIZES)}"
            )
        if not isinstance(self.double_quant, bool):
            raise LorakitError(f"QuantConfig.double_quant={self.double_quant!r} must be true or false")
        self.compute_dtype = parse_compute_dtype(self.compute_dtype, "QuantConfig.compute_dtype")


def check_weight(weight: torch.Tensor, where: str) -> None:
    """Raise LorakitError unless `weight` is a non-empty, materialized, floating-point 2-D matrix."""
    if weight.dim() != 2:
        raise LorakitError(f"{where}: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise LorakitError(
            f"{where}: expected a floating-point weight, got {weight.dtype}; cast it to float first"
        )
    if weight.numel() == 0:
        raise LorakitError(f"{where}: the weight is empty (shape {tuple(weight.shape)}); nothing to quantize")
    if weight.is_meta:
        raise LorakitError(f"{where}: the weight is on the meta device; load real weights before quantizing")


class _Matmul4bit(torch.autograd.Function):
    """y = x @ deq(W).T + b; saves only the packed weight and its state, never the dequantized matrix."""

    @staticmethod
    def forward(ctx, x, packed, bias, state: QuantState):
        weight = dequantize_4bit(packed, state, x.dtype)
        ctx.save_for_backward(packed)
        ctx.state = state  # references the module's own state tensors: no copy
        # F.linear with the bias fused, as bitsandbytes does, so outputs match bit for bit
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ dequantize_4bit(packed, ctx.state, grad_y.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in 4 bits (NF4 or FP4, bitsandbytes layout)."""

    def __init__(
        self,
        packed: torch.Tensor,
        state: QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | str = torch.bfloat16,
    ) -> None:
        super().__init__()
        if len(state.shape) != 2:
            raise LorakitError(
                f"Linear4bit: quant state shape {tuple(state.shape)} is not a 2-D [out, in] weight"
            )
        self.out_features, self.in_features = (int(d) for d in state.shape)
        self.compute_dtype = parse_compute_dtype(compute_dtype, "Linear4bit.compute_dtype")
        # The non-tensor half of the state; the tensors live in buffers so .to() moves them.
        self.weight_dtype = state.dtype
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("quant_map", state.code)
        self.nested_blocksize = state.state2.blocksize if state.nested else None
        self.nested_dtype = state.state2.dtype if state.nested else None
        if state.nested:
            self.register_buffer("nested_offset", state.offset.reshape(()))
            self.register_buffer("nested_absmax", state.state2.absmax)
            self.register_buffer("nested_quant_map", state.state2.code)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        quant_type: str = "nf4",
        blocksize: int = DEFAULT_BLOCKSIZE,
        double_quant: bool = True,
        compute_dtype: torch.dtype | str = torch.bfloat16,
        where: str = "Linear4bit",
    ) -> Linear4bit:
        """Quantize a float [out, in] weight (and keep its bias) into a new Linear4bit."""
        config = QuantConfig(quant_type, blocksize, double_quant, compute_dtype)
        check_weight(weight, where)
        packed, state = quantize_4bit(
            weight.detach().contiguous(),
            blocksize=config.blocksize,
            quant_type=config.quant_type,
            double_quant=config.double_quant,
        )
        return cls(packed, state, bias, config.compute_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = DEFAULT_BLOCKSIZE,
        double_quant: bool = True,
        compute_dtype: torch.dtype | str = torch.bfloat16,
    ) -> Linear4bit:
        """Quantize an nn.Linear into a new Linear4bit (the linear itself is left untouched)."""
        if not isinstance(linear, nn.Linear):
            raise LorakitError(f"Linear4bit.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(
            linear.weight,
            linear.bias,
            quant_type,
            blocksize,
            double_quant,
            compute_dtype,
            where=f"Linear4bit.from_linear({linear.out_features}x{linear.in_features})",
        )

    @property
    def quant_state(self) -> QuantState:
        """The QuantState over this module's current buffers (device follows the module)."""
        state2 = None
        if self.nested_blocksize is not None:
            state2 = QuantState(
                absmax=self.nested_absmax,
                shape=self.nested_absmax.shape,
                dtype=self.nested_dtype,
                blocksize=self.nested_blocksize,
                quant_type="dynamic",
                code=self.nested_quant_map,
                offset=None,
                state2=None,
            )
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            code=self.quant_map,
            offset=self.nested_offset if state2 is not None else None,
            state2=state2,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [out, in] weight as a float tensor (default: compute_dtype)."""
        return dequantize_4bit(self.packed, self.quant_state, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _Matmul4bit.apply(x.to(self.compute_dtype), self.packed, bias, self.quant_state)
        return y.to(x.dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear with the dequantized weight (default dtype: the original weight's dtype)."""
        dtype = dtype or self.weight_dtype
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device="meta",
            dtype=dtype,
        )
        linear.weight = nn.Parameter(self.dequantize(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=False)
        return linear

    def quantized_nbytes(self) -> int:
        """Bytes held by the quantized weight: packed codes, absmax and all quantization constants."""
        tensors = [*self.buffers(recurse=False), *([self.packed] if "packed" in self._parameters else [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def store_packed_as(self, dtype: torch.dtype) -> None:
        """Hold the packed codes as a frozen Parameter viewed as `dtype` (bitsandbytes' quant_storage).

        FSDP shards floating-point parameters only; the bytes stay as they are, so dequantization (which
        reads them as bytes) is unchanged. Whatever gathers the parameter must not cast it: see
        train/distributed.py, which refuses a mixed-precision param_dtype other than `dtype`.
        """
        data = self.packed.detach().reshape(-1)
        data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
        size = torch.empty((), dtype=dtype).element_size()
        if not dtype.is_floating_point or data.numel() % size:
            raise LorakitError(f"Linear4bit {self.out_features}x{self.in_features}: its {data.numel()} packed bytes "
                               f"cannot be stored as {dtype} (a floating dtype whose size divides them is needed)")
        self._buffers.pop("packed", None)
        self._parameters.pop("packed", None)
        self.packed = nn.Parameter(data.view(dtype).reshape(-1, 1), requires_grad=False)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype)/.half() cast every float buffer, which would silently round absmax and the
        # code tables; keep their dtypes (only the device follows) so the numerics stay bitsandbytes'.
        # The packed codes held as a float Parameter (store_packed_as) are bytes, and are kept alike.
        before = {name: buf for name, buf in self._buffers.items() if buf is not None}
        packed = self._parameters.get("packed")
        packed = None if packed is None else packed.data  # _apply swaps the Parameter's data, not the object
        super()._apply(fn, recurse)
        for name, buf in before.items():
            if self._buffers[name].dtype != buf.dtype:
                self._buffers[name] = buf.to(device=self._buffers[name].device)
        if packed is not None and self.packed.dtype != packed.dtype:
            self.packed = nn.Parameter(packed.to(device=self.packed.device), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        nested = "+double_quant" if self.nested_blocksize is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"{self.quant_type}{nested}, blocksize={self.blocksize}, compute_dtype={self.compute_dtype}"
        )


def _is_adapter_wrapper(module: nn.Module) -> bool:
    # The LoRA layer wraps its base as `base_layer`; duck-typed so quant/ does not import lora.py.
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def _matches(name: str, entries: Sequence[str]) -> bool:
    return any(name == entry or name.endswith("." + entry) for entry in entries)


def _output_head(model: nn.Module) -> nn.Module | None:
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None


def quantization_targets(model: nn.Module, skip: Sequence[str] | None = None) -> list[str]:
    """Names of the nn.Linear layers quantize_model swaps: all but the output head, `skip` and adapter internals."""
    if isinstance(skip, str):
        skip = [skip]
    skip = list(skip or [])
    head = _output_head(model)
    targets, wrapped, all_linear = [], [], []
    wrapper_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrapper_prefixes):
            continue  # the base and adapter linears inside a LoRA layer
        if _is_adapter_wrapper(module):
            wrapper_prefixes.append(name)
            wrapped.append(name)
            continue
        if not isinstance(module, nn.Linear) or not name:
            continue
        all_linear.append(name)
        if module is head or _matches(name, skip):
            continue
        targets.append(name)
    if wrapped:
        warnings.warn(
            f"quantize_model: skipped {len(wrapped)} LoRA-wrapped layer(s) (e.g. {wrapped[0]}); "
            "quantize the model before adding adapters",
            stacklevel=3,
        )
    if not targets:
        found = ", ".join(all_linear[:8]) + (" ..." if len(all_linear) > 8 else "") if all_linear else "none"
        raise LorakitError(
            f"quantize_model: no nn.Linear layer left to quantize (linear layers: {found}; skip={skip}); "
            "check `skip` and that adapters were not added before quantizing"
        )
    return targets


def quantize_model(model: nn.Module, config: QuantConfig, skip: Sequence[str] | None = None) -> nn.Module:
    """Swap the model's nn.Linear layers for Linear4bit in place (output head and `skip` excluded)."""
    if not isinstance(config, QuantConfig):
        raise LorakitError(
            f"quantize_model: config must be a lorakit QuantConfig, got {type(config).__name__}"
        )
    for name in quantization_targets(model, skip):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        quantized = quantize_weight(linear.weight, linear.bias, config, f"quantize_model: layer {name!r}")
        setattr(parent, child_name, quantized)
        del linear  # the last reference: its float weight is freed before the next layer is quantized
    return model


def quantize_weight(weight: torch.Tensor, bias: torch.Tensor | None, config: QuantConfig, where: str) -> Linear4bit:
    """A Linear4bit holding `weight` (and `bias`) quantized as `config` says."""
    return Linear4bit.from_weight(weight, bias, config.quant_type, config.blocksize, config.double_quant,
                                  config.compute_dtype, where=where)


def quantized_bytes_per_param(model: nn.Module) -> float:
    """Bytes per weight held by all Linear4bit layers (codes + absmax + constants): ~0.52 for NF4+DQ."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise LorakitError(
            "quantized_bytes_per_param: the model has no Linear4bit layer; run quantize_model first"
        )
    n_params = sum(m.in_features * m.out_features for m in layers)
    return sum(m.quantized_nbytes() for m in layers) / n_params


__all__ = [
    "Linear4bit",
    "QuantConfig",
    "quantization_targets",
    "quantize_model",
    "quantize_weight",
    "quantized_bytes_per_param",
    "check_weight",
    "parse_compute_dtype",
    "QUANT_TYPES",
]
