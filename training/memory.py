"""Device-memory estimates of a sweep (for `basic_l1_sweep.py --dry_run`) and a tracker that measures them.

Estimates are pure functions of the shapes, in bytes. N = members, d = d_in, h = d_hidden, B = batch rows,
C = rows per fused-L1 pass (= B), 4-byte fp32 parameters; `compute` is the matmul dtype's item size
(4 fp32/tf32, 2 bf16 autocast).

`DeviceMemoryTracker` counts the live bytes of the tensors created while it is active (views share their
storage and count once); on the meta device it stands in for an accelerator at any size, in seconds.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from training.architectures import get as get_architecture

GiB = 1 << 30
FP32 = 4


# ----------------------------------------------------------------------------- estimates

def param_bytes(n_models: int, d_in: int, d_hidden: int, tied: bool = False) -> int:
    """Stacked fp32 params: center [N, d] + encoder [N, h, d] (not when tied) + encoder_bias [N, h] + decoder [N, h, d]."""
    matrices = 1 if tied else 2
    return FP32 * n_models * (d_in + d_hidden + matrices * d_hidden * d_in)


def optimizer_bytes(n_models: int, d_in: int, d_hidden: int, tied: bool = False) -> int:
    """Adam moments, gradients and update scratch (4 x params) + dead-latent counters [N, h] int64."""
    return 4 * param_bytes(n_models, d_in, d_hidden, tied) + 8 * n_models * d_hidden


def workspace_bytes(architecture: str, n_models: int, batch: int, d_in: int, d_hidden: int,
                    tied: bool = False, compute: int = FP32) -> int:
    """The fused step's buffers, kept between steps (training.fused.Workspace), as the architecture's
    declaration counts them (training/architectures/<name>.py `workspace_bytes`)."""
    return get_architecture(architecture).workspace_bytes(n_models, batch, d_in, d_hidden, tied, compute)


def step_transient_bytes(architecture: str, n_models: int, batch: int, d_in: int, d_hidden: int,
                         k_max: int = 0) -> int:
    """Temporaries of one step on top of the workspace: the batch [B, d] and the architecture's own
    (`transient_bytes`; `k_max`: the largest member key where that sizes them, e.g. TopK's k)."""
    return batch * d_in * FP32 + get_architecture(architecture).transient_bytes(n_models, batch, d_in, d_hidden, k_max)


def eval_block_rows(architecture: str, batch: int) -> int:
    """Rows per evaluation block: its codes fit in the freed workspace (the architecture's `eval_block_rows`)."""
    return get_architecture(architecture).eval_block_rows(batch)


@dataclass
class MemoryEstimate:
    """Estimated device bytes of a sweep's training step, by part."""

    params: int
    optimizer: int
    workspace: int
    transient: int

    @property
    def peak(self) -> int:
        """The training step's peak; saving, evaluation, resampling and resuming stay below it."""
        return self.params + self.optimizer + self.workspace + self.transient


def estimate_sweep(architecture: str, n_models: int, batch: int, d_in: int, d_hidden: int, tied: bool = False,
                   compute: int = FP32, k_max: int = 0) -> MemoryEstimate:
    """Every part of the estimate for one sweep shape."""
    return MemoryEstimate(param_bytes(n_models, d_in, d_hidden, tied), optimizer_bytes(n_models, d_in, d_hidden, tied),
                          workspace_bytes(architecture, n_models, batch, d_in, d_hidden, tied, compute),
                          step_transient_bytes(architecture, n_models, batch, d_in, d_hidden, k_max))


def combined_estimate(ests: list[MemoryEstimate]) -> MemoryEstimate:
    """Sweeps trained in turns by one process (a multi-hook run): all their parameters and optimizer states live at
    once, the step buffers of one at a time (the largest workspace and temporaries: a bound)."""
    return MemoryEstimate(sum(e.params for e in ests), sum(e.optimizer for e in ests),
                          max(e.workspace for e in ests), max(e.transient for e in ests))


def available_bytes(device: torch.device) -> tuple[int | None, str]:
    """(free bytes on `device`, where the figure comes from); None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, "torch.cuda.mem_get_info"
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages"
        except (ValueError, OSError, AttributeError):
            return None, "unknown"
    return None, "unknown"


def format_bytes(n: int) -> str:
    """n bytes in MiB below 1 GiB, else GiB (right-aligned, 9 characters for the number)."""
    return f"{n / GiB:9.2f} GiB" if n >= GiB else f"{n / (1 << 20):9.2f} MiB"


def memory_report(est: MemoryEstimate, available: int | None, source: str, headline: str) -> str:
    """The --dry_run printout: each part in GiB, the peak, and whether it fits in `available` bytes."""
    rows = [headline,
            f"  parameters          {format_bytes(est.params)}",
            f"  optimizer           {format_bytes(est.optimizer)}   (Adam moments, gradients, scratch, counters)",
            f"  step workspace      {format_bytes(est.workspace)}",
            f"  step temporaries    {format_bytes(est.transient)}",
            f"  peak (estimate)     {format_bytes(est.peak)}   (saving, evaluation, resampling and resume stay below)"]
    if available is None:
        rows.append("  available           unknown: cannot say whether it fits")
    else:
        verdict = "fits" if est.peak <= available else "does NOT fit: lower --batch_size, --ratio or the members"
        rows.append(f"  available           {format_bytes(available)}   ({source}): {verdict}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- measurement

class DeviceMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensors created on `device` while active (each storage once, until freed).

    On the meta device it simulates an accelerator: a copy to the CPU is kept on meta but counted as host
    memory (one of at most `small_host` elements becomes a real CPU tensor filled with `fill`, so host code
    can read it), ops on host-only inputs make host tensors, and reading a meta scalar gives `fill`.
    """

    def __init__(self, device: str | torch.device = "meta", fill: float = 1, small_host: int = 1 << 20):
        super().__init__()
        self.device, self.fill, self.small_host = torch.device(device), fill, small_host
        self.live = self.peak = 0
        self._device_keys: set[int] = set()
        self._host_keys: set[int] = set()

    def reset_peak(self) -> int:
        """Start a new peak from the bytes live now; returns them."""
        self.peak = self.live
        return self.live

    def _tag(self, t: torch.Tensor) -> str | None:
        """"device", "host" or None (not created under the tracker) for a tensor's storage."""
        key = t.untyped_storage()._cdata
        return "device" if key in self._device_keys else "host" if key in self._host_keys else None

    def _track(self, t: torch.Tensor, host: bool) -> None:
        """Record a new storage as device (counted) or host memory, forgotten when it is freed."""
        st = t.untyped_storage()
        key = st._cdata
        if key in self._device_keys or key in self._host_keys:
            return
        if host:
            self._host_keys.add(key)
            weakref.finalize(st, self._host_keys.discard, key)
            return
        n = st.nbytes()
        self._device_keys.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        """A counted storage was freed."""
        self._device_keys.discard(key)
        self.live -= n

    def _as_meta(self, a: Any) -> Any:
        """A real CPU tensor (of more than one element) as a host tensor on meta; anything else as is."""
        if isinstance(a, torch.Tensor) and not a.is_meta and a.numel() > 1:
            t = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
            self._track(t, host=True)
            return t
        return a

    def _host_copy(self, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor | None:
        """Meta simulation of `t.to("cpu")`: a real CPU tensor of `fill` when small, else None (kept on meta)."""
        return torch.full(t.shape, self.fill, dtype=dtype or t.dtype) if t.numel() <= self.small_host else None

    def _output_is_host(self, inputs: list[torch.Tensor], kwargs: dict, to_host: bool) -> bool:
        """Meta simulation: does an op's new output live on the host? Yes when copied or placed there, or when
        its inputs (of more than one element) are all on the host."""
        if to_host or kwargs.get("device") is not None:
            return to_host or torch.device(kwargs["device"]).type == "cpu"
        tags = {self._tag(t) for t in inputs if t.numel() > 1 and t.layout == torch.strided}
        return "host" in tags and "device" not in tags

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        meta = self.device.type == "meta"
        inputs = _tensors((args, kwargs))
        to_host = False
        if meta and inputs and inputs[0].is_meta:
            if func is torch.ops.aten._local_scalar_dense.default:
                return type(torch.tensor(0, dtype=inputs[0].dtype).item())(self.fill)
            to_host = (func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None
                       and torch.device(kwargs["device"]).type == "cpu")
            if to_host:
                small = self._host_copy(inputs[0], kwargs.get("dtype"))
                if small is not None:
                    return small
                kwargs = {**kwargs, "device": self.device}
        if meta and any(t.is_meta for t in inputs) and any(not t.is_meta and t.numel() > 1 for t in inputs):
            args, kwargs = tree_map(self._as_meta, (args, kwargs))                       # real CPU meets meta
            inputs = _tensors((args, kwargs))
        try:
            out = func(*args, **kwargs)
        except NotImplementedError:
            if not (meta and "out" in kwargs):             # sparse kernels lack meta versions: their out= result
                raise                                       # is all they would leave behind
            out = kwargs["out"]
        host = meta and self._output_is_host(inputs, kwargs, to_host)
        for t in _tensors(out):
            if t.device == self.device and t.layout == torch.strided:
                self._track(t, host)
        return out


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors in a nest of tuples, lists and dicts."""
    return [a for a in tree_flatten(tree)[0] if isinstance(a, torch.Tensor)]


def measure_peak(fn: Any, tracker: DeviceMemoryTracker) -> tuple[Any, int]:
    """(fn(), the peak bytes it added above the bytes live before it) under an active `tracker`."""
    base = tracker.reset_peak()
    result = fn()
    return result, tracker.peak - base
