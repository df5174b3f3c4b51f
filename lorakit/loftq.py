"""LoftQ initialisation (Li et al. 2023, arXiv 2310.08659): an NF4 base Q and a rank-r adapter, Q + s·B·A ≈ W.

The alternating steps of PEFT's `utils/loftq_utils.py::loftq_init`, on the [out, in] weight W in fp32:

    target = W
    N times:  Q = deq(NF4(target))            blocks of 64, fp32 absmax, no double quantization
              U, S, Vh = svd(W - Q)
              B, A = U_r·sqrt(S_r / s), sqrt(S_r / s)·Vh_r
              target = W - s·B·A

The base weight becomes Q in the base's dtype, so quantizing the model afterwards to NF4 (blocksize 64,
no double quantization) gives back Q's codes exactly.

Scaling: PEFT does not divide S by s = lora_alpha / r, so its s·B·A reproduces W - Q only when
lora_alpha == r (its LoftQ example uses 16/16). lorakit divides: with lora_alpha == r the division is by
1.0 and the result is PEFT's (bit for bit on the CPU, tests/test_loftq.py); with any other alpha the
adapter still starts on W - Q, where PEFT's would start on s times it.

Two more choices where PEFT has none:
- transformers Conv1D (weight stored [in, out]) is decomposed as its [out, in] transpose, the layout
  transformers quantizes it in; PEFT passes the stored layout and gets A and B of the wrong shapes.
- a bf16/fp16 base is quantized from the target rounded to that dtype, so that the stored base is
  exactly deq(Q) and requantizing reproduces Q; PEFT quantizes in fp32 and rounds Q afterwards.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora import _adapter_dtype, is_quantized
from lorakit.quant import dequantize_4bit, quantize_4bit

# PEFT quantizes with bnb.nn.Params4bit(quant_type="nf4", compress_statistics=False): its default block of 64.
LOFTQ_BLOCKSIZE = 64
LOFTQ_BITS = 4


def nf4_roundtrip(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """deq(NF4(weight)) in `dtype` (default: the weight's): blocks of 64, fp32 absmax, as LoftQ quantizes."""
    dtype = dtype or weight.dtype
    packed, state = quantize_4bit(weight.to(dtype), blocksize=LOFTQ_BLOCKSIZE, quant_type="nf4",
                                  double_quant=False)
    return dequantize_4bit(packed, state, dtype)


def loftq_decompose(weight: torch.Tensor, r: int, scale: float = 1.0, num_iter: int = 1,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's alternating steps on an [out, in] weight: (Q, A, B) with Q + scale·B@A ≈ weight.

    Q is deq(NF4(.)) in `dtype` (default: the weight's); A [r, in] and B [out, r] are fp32.
    """
    if weight.dim() != 2:
        raise LorakitError(f"LoftQ: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if not 1 <= r <= min(weight.shape):
        raise LorakitError(f"LoftQ: rank r={r} must be between 1 and min(out, in) = {min(weight.shape)} for a "
                           f"{tuple(weight.shape)} weight; lower r (or rank_pattern) for this layer")
    if num_iter < 1:
        raise LorakitError(f"LoftQ: loftq_iter must be >= 1, got {num_iter}")
    dtype = dtype or weight.dtype
    weight = weight.detach().float()
    target = weight
    for step in range(num_iter):
        q = nf4_roundtrip(target, dtype)
        U, S, Vh = torch.linalg.svd(weight - q.float(), full_matrices=False)
        root = torch.sqrt(S[:r] / scale)
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]
        if step + 1 < num_iter:
            target = weight - scale * (B @ A)
    return q, A, B


def reconstruction_error(weight: torch.Tensor, q: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         scale: float = 1.0) -> float:
    """||W - (Q + scale·B@A)||_F in fp32, all in the [out, in] layout."""
    approx = q.float() + scale * (B.float() @ A.float())
    return torch.linalg.matrix_norm(weight.float() - approx).item()


def init_loftq(layer: nn.Module, name: str, loftq_config: dict) -> None:
    """Set adapter `name` of a LoraLinear to LoftQ's A and B, and its float base weight to deq(Q), in place."""
    base = layer.base_layer
    if is_quantized(base):
        raise LorakitError(
            f"init_lora_weights='loftq' (adapter {name!r}) needs the float base weight, but this layer is already "
            f"4-bit ({type(base).__name__}); add the LoftQ adapter to the float model before quantize_model, save "
            "it with lorakit.loftq_save.save_loftq, and load the quantized backbone with its loftq_init adapter"
        )
    bits = loftq_config.get("loftq_bits", LOFTQ_BITS)
    if bits != LOFTQ_BITS:
        raise LorakitError(f"loftq_config.loftq_bits must be 4 (NF4), got {bits!r}")
    weight = base.weight.detach()
    q, A, B = loftq_decompose(weight.T if layer.fan_in_fan_out else weight, layer.r[name], layer.scaling[name],
                              loftq_config.get("loftq_iter", 1), dtype=weight.dtype)
    # Adapters of a half-precision base hold half-rounded values in fp32, as PEFT leaves them.
    adapter_dtype = _adapter_dtype(base)
    for param, value in ((layer.lora_A[name].weight, A), (layer.lora_B[name].weight, B)):
        param.copy_(value if adapter_dtype is None else value.to(adapter_dtype))
    base.weight.data = (q.T if layer.fan_in_fan_out else q).contiguous()


__all__ = ["LOFTQ_BLOCKSIZE", "init_loftq", "loftq_decompose", "nf4_roundtrip", "reconstruction_error"]
