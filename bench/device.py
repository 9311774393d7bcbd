"""What a benchmark needs to know about its device: synchronising it, its peak memory, the model FLOPs of a
dictionary's training step, and the datasheet peak those FLOPs are a fraction of (model FLOP utilisation, MFU).

Model FLOPs count the matrix products the maths needs (2 per multiply-add), as is usual for MFU: elementwise work
(ReLU, Adam, norms) and TopK's selection are left out, and TopK's sparse products count only its k active
features, whatever kernels carry them out.
"""

from __future__ import annotations

import resource
from typing import Any

import torch

DATASHEET_TFLOPS = {
    "H100/H200 SXM": {"bf16": 989.0, "tf32": 494.0},
    "A100": {"bf16": 312.0, "tf32": 156.0},
}
"""Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by GPU family and precision."""


def sync(device: torch.device | str) -> None:
    """Wait for the work queued on `device` itself (not the default CUDA device); no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory measurement on `device` (CUDA; the host RSS peak cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_initialized():    # before CUDA starts nothing has been allocated
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> dict[str, Any]:
    """{"kind": "device"|"host RSS", "mib": peak MiB, "label": one line}: CUDA's max_memory_allocated since the
    last reset; on other devices the process's peak resident set size, labelled as host memory."""
    device = torch.device(device)
    if device.type == "cuda":
        mib = torch.cuda.max_memory_allocated(device) / 2 ** 20
        return {"kind": "device", "mib": mib, "label": f"{mib:,.0f} MiB peak device memory"}
    mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": "host RSS", "mib": mib,
            "label": f"device memory n/a on {device.type} ({mib:,.0f} MiB peak host RSS of the process)"}


def member_step_flops(architecture: str, d_in: int, d_hidden: int, batch: int, k: int | None = None) -> int:
    """Model FLOPs of one training step of one dictionary on `batch` rows (forward and backward; the input needs
    no gradient). L1: 5 dense products of batch x d_in x d_hidden (encoder forward and weight gradient, decoder
    forward and weight gradient, gradient of the codes) = 10 B d h. TopK: a dense encoder forward (2 B d h) and
    4 products over the k active features only (decoder forward, code gradient, decoder and encoder weight
    gradients) = 2 B d h + 8 B k d."""
    if min(d_in, d_hidden, batch) < 1:
        raise ValueError(f"sizes must be positive (d_in {d_in}, d_hidden {d_hidden}, batch {batch})")
    if architecture == "l1":
        return 10 * batch * d_in * d_hidden
    if architecture == "topk":
        if k is None or not 1 <= k <= d_hidden:
            raise ValueError(f"TopK needs 1 <= k <= d_hidden (got k={k}, d_hidden {d_hidden})")
        return 2 * batch * d_in * d_hidden + 8 * batch * k * d_in
    raise ValueError(f"unknown architecture {architecture!r}: l1 or topk")


def gpu_family(name: str) -> str | None:
    """The DATASHEET_TFLOPS family of a CUDA device name (torch.cuda.get_device_name), None when not listed
    (PCIe and NVL H100/H200 have lower peaks than SXM and are not listed)."""
    upper = name.upper()
    if ("H100" in upper or "H200" in upper) and "PCIE" not in upper and "NVL" not in upper:
        return "H100/H200 SXM"
    if "A100" in upper:
        return "A100"
    return None


def peak_flops(device_name: str, precision: str, measured_matmul: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from): the datasheet peak of a known GPU at `precision` (bf16, tf32), else
    the matmul rate measured in the same run (None, "unknown" when there is neither)."""
    family = gpu_family(device_name)
    if family is not None and precision in DATASHEET_TFLOPS[family]:
        tflops = DATASHEET_TFLOPS[family][precision]
        return tflops * 1e12, f"datasheet {family} dense {precision} {tflops:g} TFLOP/s"
    if measured_matmul:
        return measured_matmul, f"matmul rate measured in this run, {measured_matmul / 1e12:.3g} TFLOP/s"
    return None, "unknown"


def mfu(flops_per_step: float, seconds_per_step: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s over the peak (None without a peak)."""
    if not peak or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / peak
