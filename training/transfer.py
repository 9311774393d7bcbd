"""Host <-> device copies that do not block: pinned staging and non-blocking copies on CUDA, plain copies elsewhere."""

from __future__ import annotations

from typing import Hashable

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor `t` on `device`: through pinned memory without blocking on CUDA, a plain `.to` elsewhere."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Landing:
    """Device tensors on their way to the host: non-blocking copies into host buffers (pinned on CUDA, so that the
    copies overlap the host's work), handed over by `wait`, the one host sync for them all."""

    def __init__(self, tensors: dict[Hashable, torch.Tensor], device: torch.device):
        pin = device.type == "cuda"
        self.host = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t, non_blocking=pin)
                     for k, t in tensors.items()}
        self.event = torch.cuda.Event() if pin else None
        if self.event is not None:
            self.event.record()

    def wait(self) -> dict[Hashable, torch.Tensor]:
        """The host tensors, once every copy has landed."""
        if self.event is not None:
            self.event.synchronize()
        return self.host
