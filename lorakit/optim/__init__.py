"""Optimizers: 8-bit blockwise AdamW (bitsandbytes-compatible numerics) and its paged variant."""

from lorakit.optim.adamw8bit import AdamW8bit, PagedAdamW8bit, make_optimizer

__all__ = ["AdamW8bit", "PagedAdamW8bit", "make_optimizer"]
