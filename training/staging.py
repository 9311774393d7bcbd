"""Pinned, double-buffered staging of Stage 2's chunks for a CUDA device.

The prefetch thread gathers each chunk's shuffled rows straight into one of two pinned host buffers, so that the
training loop's `non_blocking=True` copies of batches really overlap the device's work. A buffer is refilled only
after the device has finished copying out of it: the consumer `release`s a buffer when it has queued its last copy,
which records a fence (a CUDA event) that the next `gather` into that buffer waits on.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch


class Fence(Protocol):
    """A point in the device's queue that the host can wait for."""

    def record(self) -> None: ...

    def wait(self) -> None: ...


class CudaFence:
    """A CUDA event on the current stream."""

    def __init__(self) -> None:
        self.event = torch.cuda.Event()

    def record(self) -> None:
        """Mark the current end of the current stream's queue."""
        self.event.record()

    def wait(self) -> None:
        """Block until the device has reached the mark."""
        self.event.synchronize()


class PinnedStaging:
    """`slots` reusable host buffers (pinned when `pin`) that chunks are gathered into in turn."""

    def __init__(self, slots: int = 2, pin: bool = True, fence: Callable[[], Fence] = CudaFence):
        self.pin, self.make_fence = pin, fence
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.fences: list[Fence | None] = [None] * slots

    @property
    def slots(self) -> int:
        """How many buffers there are."""
        return len(self.buffers)

    def gather(self, slot: int, acts: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """acts[perm] ([n, d], acts' dtype) written into buffer `slot`, once the device is done with what it held."""
        fence, self.fences[slot] = self.fences[slot], None
        if fence is not None:
            fence.wait()
        numel = len(perm) * acts[0].numel() if len(acts) else 0
        buf = self.buffers[slot]
        if buf is None or buf.dtype != acts.dtype or buf.numel() < numel:
            self.buffers[slot] = buf = torch.empty(numel, dtype=acts.dtype, pin_memory=self.pin)
        out = buf[:numel].view(len(perm), *acts.shape[1:])
        return torch.index_select(acts, 0, perm, out=out)

    def release(self, slot: int) -> None:
        """Say that the consumer has queued its last copy out of buffer `slot` (records the fence gather waits on)."""
        fence = self.make_fence()
        fence.record()
        self.fences[slot] = fence


def staging_for(device: torch.device) -> PinnedStaging | None:
    """Pinned double buffers for a CUDA device; None (plain pageable chunks, as before) anywhere else."""
    return PinnedStaging() if device.type == "cuda" else None
