"""Hot operations, each with a plain-PyTorch reference and its fast implementations, chosen by one table.

`python -m lorakit.kernels` prints the choice for this machine; LORAKIT_KERNELS=reference forces the
references. Importing this package registers every operation in `dispatch.TABLE`.
"""

from lorakit.kernels import (
    attention,
    cache_attention,
    cross_entropy,
    dequant_4bit,
    dora_linear,
    lora_linear,
    multi_lora,
    rms_norm,
    swiglu,
)
from lorakit.kernels.dispatch import TABLE, Kernel, forced_reference, select, why_not

__all__ = ["TABLE", "Kernel", "attention", "cache_attention", "cross_entropy", "dequant_4bit", "dora_linear",
           "forced_reference",
           "lora_linear", "multi_lora", "rms_norm", "select", "swiglu", "why_not"]
