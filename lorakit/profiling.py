"""Measured memory: the peak bytes of tensors that real ops allocate (lorakit.memory predicts them).

PeakMemoryTracker counts the storages ops create, deterministically and on any device; allocator_peak_bytes
reads the CPU allocator's events, so it also sees temporaries allocated inside a kernel. Tests and
benchmarks hold memory.estimate to these figures (docs/memory.md).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemoryTracker(TorchDispatchMode):
    """Counts the bytes of tensor storages allocated by ops run inside it, and their peak.

    Deterministic on any device (it sees every aten op, forward and backward, on this thread):
    a storage counts from the op that created it until its last tensor dies. Storages created
    before the tracker started (the model's weights) are not counted. It sees ops' outputs only,
    not temporaries a kernel allocates and frees inside itself (torch.logsumexp's x - max, as big
    as its input): allocator_peak_bytes sees those on the CPU.
    """

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storages: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self._storages.pop(key, None)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            # Views and in-place results share an input's storage: not a new allocation.
            if nbytes == 0 or key in inputs or key in self._storages:
                continue
            self._storages[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._release(k, n))
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


def allocator_peak_bytes(run: Callable[[], object]) -> int:
    """Peak of the bytes the CPU allocator handed out and not yet took back while run() ran.

    Read from torch.profiler's memory events, so unlike PeakMemoryTracker it includes the temporaries
    ops allocate inside their kernels. Frees of storages made before run() count against the peak (as
    on a device). Run a PeakMemoryTracker inside run() to get both figures for one step.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [event for event in prof.profiler.kineto_results.events()
              if event.name() == "[memory]" and event.device_type() == DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):  # stable: ties keep recorded order
        live += event.nbytes()
        peak = max(peak, live)
    return peak
