"""Keep freed CPU memory in the process, so a training loop stops page-faulting on its own activations.

Every step frees and re-allocates the same activation-sized blocks. With glibc's defaults a block above
the mmap threshold (128 KiB, raised on the fly up to 32 MiB) goes back to the kernel when freed, and the
top of the heap is trimmed, so the next step touches fresh pages again: one fault per 4 KiB page.
Keeping freed memory is what PyTorch's CUDA caching allocator does on the GPU and what preloading
jemalloc or tcmalloc does on the CPU; the cost is that the process keeps its peak footprint. This is a
process-wide setting: `lk.enable_fast_training` names it in what it returns, and
`lk.disable_fast_training` puts glibc's defaults back.
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
# glibc's defaults (malloc/malloc.c); setting them fixes the thresholds that glibc otherwise raises on the fly
DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}
_RETAINING = [False]


@functools.cache
def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt():
    libc = _libc()
    return None if libc is None else libc.mallopt


def retain_freed_memory() -> bool:
    """Tell glibc malloc to keep freed blocks for reuse (no per-block mmap, no heap trim); False where not glibc."""
    mallopt = _mallopt()
    if mallopt is None or not mallopt(M_TRIM_THRESHOLD, _NEVER):
        return False
    # Some glibc versions refuse a threshold above 32 MiB; switching mmap off does the same there.
    _RETAINING[0] = bool(mallopt(M_MMAP_THRESHOLD, _NEVER) or mallopt(M_MMAP_MAX, 0))
    return _RETAINING[0]


def retaining() -> bool:
    """True while retain_freed_memory's setting is in force."""
    return _RETAINING[0]


def restore_default_allocator() -> bool:
    """Put glibc's default thresholds back and return the memory kept meanwhile; False where not glibc."""
    libc = _libc()
    if libc is None:
        return False
    ok = all(libc.mallopt(param, value) for param, value in DEFAULTS.items())
    libc.malloc_trim(0)  # the new thresholds apply to later frees; what is held now goes back here
    _RETAINING[0] = False
    return ok


def release_freed_memory() -> bool:
    """Return every free page glibc malloc holds, holes between live blocks too, to the kernel; False if not glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
