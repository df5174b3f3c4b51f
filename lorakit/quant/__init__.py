"""4-bit (NF4/FP4) quantization, bitsandbytes-exact: tensor math, the Linear4bit module, checkpoints."""

from lorakit.quant.checkpoint import load_bnb_state_dict, load_quantized, save_quantized, to_bnb_state_dict
from lorakit.quant.linear4bit import Linear4bit, QuantConfig, quantize_model, quantized_bytes_per_param
from lorakit.quant.nf4 import (
    ALLOWED_BLOCKSIZES,
    FP4_CODE,
    NF4_CODE,
    QuantState,
    dequantize_4bit,
    dequantize_4bit_reference,
    quantize_4bit,
)

__all__ = [
    "ALLOWED_BLOCKSIZES", "FP4_CODE", "NF4_CODE", "Linear4bit", "QuantConfig", "QuantState", "dequantize_4bit",
    "dequantize_4bit_reference", "load_bnb_state_dict", "load_quantized", "quantize_4bit", "quantize_model",
    "quantized_bytes_per_param", "save_quantized", "to_bnb_state_dict",
]
