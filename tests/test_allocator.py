"""retain_freed_memory: a loop that frees and re-allocates the same blocks stops page-faulting."""

import platform
import subprocess
import sys

import pytest

# Runs in a fresh interpreter: the setting is process-wide and would change every later test's memory.
PROBE = """
import resource, statistics, torch
from lorakit.allocator import retain_freed_memory

def step_faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(mb * 2**18) for mb in (1, 3, 6, 12, 40, 3, 1, 12)]  # 78 MB of fp32, written
    del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = [step_faults() for _ in range(8)]
applied = retain_freed_memory()
after = [step_faults() for _ in range(8)]
print(statistics.median(before[1:]), applied, statistics.median(after[1:]), retain_freed_memory())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_steady_state_steps_stop_page_faulting():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    before, applied, after, again = out.stdout.split()
    assert applied == again == "True"
    # glibc's defaults hand a block above its mmap threshold (at most 32 MiB) back at every free:
    # each step re-faults at least the 40 MiB block, 4 KiB a fault.
    assert float(before) >= 40 * 2**20 / 4096, out.stdout
    # Kept memory is re-used: the first step grows the heap once, later steps fault on nothing.
    assert float(after) <= 0.01 * float(before)
