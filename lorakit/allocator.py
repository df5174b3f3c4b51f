"""Keep freed CPU memory in the process, so a training loop stops page-faulting on its own activations.

Every step frees and re-allocates the same activation-sized blocks. With glibc's defaults a block above
the mmap threshold (128 KiB, raised on the fly up to 32 MiB) goes back to the kernel when freed, and the
top of the heap is trimmed, so the next step touches fresh pages again: one fault per 4 KiB page. On the
2-core VM a fault cost 1.8-4.2 us (measured twice within an hour); a SmolLM2 QLoRA step of lorakit took 60k
of them (0.1-0.25 s) and one of peft's bf16 recipe 270k (0.5-1.1 s). Keeping freed memory is what PyTorch's CUDA caching
allocator does on the GPU and what preloading jemalloc or tcmalloc does on the CPU; the cost is that the
process keeps its peak footprint until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
_NEVER = 2**31 - 1  # the largest value mallopt's int parameter takes


@functools.cache
def retain_freed_memory() -> bool:
    """Tell glibc malloc to keep freed blocks for reuse (no per-block mmap, no heap trim); False where not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(M_TRIM_THRESHOLD, _NEVER):
        return False
    # Some glibc versions refuse a threshold above 32 MiB; switching mmap off does the same there.
    return bool(mallopt(M_MMAP_THRESHOLD, _NEVER) or mallopt(M_MMAP_MAX, 0))
