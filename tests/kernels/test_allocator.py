"""retain_freed_memory: a loop that frees and re-allocates the same blocks stops page-faulting; restoring undoes it."""

import platform
import subprocess
import sys

import pytest

# Runs in a fresh interpreter: the setting is process-wide and would change every later test's memory.
PROBE = """
import resource, statistics, torch
from lorakit.kernels.allocator import restore_default_allocator, retain_freed_memory, retaining

import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = type("mallinfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in
    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]})

def mmapped_while_holding(megabytes):
    held = torch.ones(megabytes * 2**18)
    return libc.mallinfo2().hblkhd

def step_faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(mb * 2**18) for mb in (1, 3, 6, 12, 40, 3, 1, 12)]  # 78 MB of fp32, written
    del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = [step_faults() for _ in range(8)]
applied = retain_freed_memory()
after = [step_faults() for _ in range(8)]
again = retain_freed_memory() and retaining()
mmapped_retaining = mmapped_while_holding(200)
restored = restore_default_allocator() and not retaining()
print(statistics.median(before[1:]), applied, statistics.median(after[1:]), again, restored,
      mmapped_retaining, mmapped_while_holding(400))  # larger than any free chunk: no bin can serve it
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_steady_state_steps_stop_page_faulting():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    before, applied, after, again, restored, mmapped_retaining, mmapped_restored = out.stdout.split()
    assert applied == again == restored == "True"
    # glibc's defaults hand a block above its mmap threshold (at most 32 MiB) back at every free:
    # each step re-faults at least the 40 MiB block, 4 KiB a fault.
    assert float(before) >= 40 * 2**20 / 4096, out.stdout
    # Kept memory is re-used: the first step grows the heap once, later steps fault on nothing.
    assert float(after) <= 0.01 * float(before)
    # Retaining, a 200 MB block comes from the heap; with glibc's defaults back, a new 400 MB one from mmap again.
    assert int(mmapped_retaining) < 200 * 2**20 and int(mmapped_restored) >= 400 * 2**20, out.stdout


RELEASE_PROBE = """
import torch
from lorakit.kernels.allocator import release_freed_memory, retain_freed_memory

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

retain_freed_memory()  # every block from the heap, nothing trimmed at free: the holes a long load leaves
blocks = [torch.ones(2**21) for _ in range(20)]  # 20 x 8 MiB, written
del blocks[::2]  # every other one freed: ten 8 MiB holes between live blocks
before = resident()
released = release_freed_memory()
print(released, before - resident())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_release_returns_the_holes_between_live_blocks():
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, timeout=120, check=True)
    released, returned_bytes = out.stdout.split()
    assert released == "True"
    assert int(returned_bytes) >= 9 * 8 * 2**20, out.stdout  # nearly all of the ten holes
