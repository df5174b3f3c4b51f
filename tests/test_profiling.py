"""The peak trackers: bytes of the storages ops create, and the CPU allocator's peak."""

import torch

from lorakit.profiling import PeakMemoryTracker, allocator_peak_bytes


def test_tracker_counts_live_and_peak_bytes():
    x = torch.ones(1000)
    with PeakMemoryTracker() as tracker:
        y = x * 2  # 4000 bytes
        z = y + 1  # 4000 more
        view = z[:10]  # a view: nothing new
        del y
    assert tracker.peak_bytes == 8000 and tracker.live_bytes == 4000
    assert view.numel() == 10


def test_tracker_misses_a_kernels_internal_temporary_that_the_allocator_sees():
    logits = torch.randn(256, 1024)  # 1 MiB of fp32
    with PeakMemoryTracker() as tracker:
        torch.logsumexp(logits, dim=-1)
    assert tracker.peak_bytes == 4 * 256  # the result only
    # logsumexp computes x - max into a temporary as big as its input, inside the one op
    assert allocator_peak_bytes(lambda: torch.logsumexp(logits, dim=-1)) >= logits.nbytes + 4 * 256

