"""bench/device.py: model FLOPs of a training step (by hand and against torch's FLOP counter), datasheet peaks and
MFU, synchronising the device asked for, and peak memory labelled by where it was measured."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.device import gpu_family, member_step_flops, mfu, peak_flops, peak_memory, sync
from training.dictionary import SparseLinearAutoencoder


def test_member_step_flops_by_hand():
    # L1, B=2, d=3, h=5: five products of 2*3*5 multiply-adds, 2 FLOPs each = 10 * 30 = 300
    assert member_step_flops("l1", d_in=3, d_hidden=5, batch=2) == 300
    # TopK k=2: dense encoder forward 2*2*3*5 = 60, four products over 2 active rows 4 * 2*(2*2*3) = 96
    assert member_step_flops("topk", d_in=3, d_hidden=5, batch=2, k=2) == 156
    # TopK with every feature active costs what L1 does
    assert member_step_flops("topk", d_in=3, d_hidden=5, batch=2, k=5) == member_step_flops("l1", 3, 5, 2) == 300
    assert member_step_flops("l1", 2048, 32768, 4096) == 10 * 4096 * 2048 * 32768
    for bad in (dict(architecture="topk", d_in=3, d_hidden=5, batch=2),
                dict(architecture="topk", d_in=3, d_hidden=5, batch=2, k=6),
                dict(architecture="gated", d_in=3, d_hidden=5, batch=2),
                dict(architecture="l1", d_in=0, d_hidden=5, batch=2)):
        with pytest.raises(ValueError):
            member_step_flops(**bad)


def test_l1_flops_match_torch_flop_counter():
    """An autograd L1 step (the input and the fixed center need no gradient) does exactly the counted products."""
    torch.manual_seed(0)
    sae = SparseLinearAutoencoder(24, 96)
    sae.center.requires_grad_(False)
    x = torch.randn(16, 24)
    with FlopCounterMode(display=False) as counter:
        loss, _ = sae.loss(x, 0.1)
        loss.backward()
    assert counter.get_total_flops() == member_step_flops("l1", 24, 96, 16)


def test_datasheet_peaks_and_mfu():
    assert gpu_family("NVIDIA H100 80GB HBM3") == gpu_family("NVIDIA H200") == "H100/H200 SXM"
    assert gpu_family("NVIDIA A100-SXM4-80GB") == gpu_family("NVIDIA A100-PCIE-40GB") == "A100"
    assert gpu_family("NVIDIA H100 PCIe") is None and gpu_family("NVIDIA H200 NVL") is None
    assert gpu_family("NVIDIA GeForce RTX 4090") is None
    assert peak_flops("NVIDIA H200", "bf16")[0] == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "tf32", measured_matmul=1e12)[0] == 494e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "tf32")[0] == 156e12
    peak, source = peak_flops("NVIDIA H200", "fp32", measured_matmul=5e13)     # no datasheet fp32 entry
    assert peak == 5e13 and "measured" in source
    assert peak_flops("cpu", "fp32") == (None, "unknown")
    # 8 members x 10 B d h FLOPs in 0.1 s against 989 TFLOP/s
    flops = 8 * member_step_flops("l1", 2048, 32768, 4096)
    assert mfu(flops, 0.1, 989e12) == pytest.approx(flops / 0.1 / 989e12)
    assert mfu(flops, 0.1, None) is None


def test_sync_waits_on_the_device_asked(monkeypatch):
    calls: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    sync(torch.device("cuda:1"))
    sync("cuda:0")
    sync("cpu")
    assert calls == [torch.device("cuda:1"), torch.device("cuda:0")]


def test_peak_memory_is_labelled_on_cpu():
    peak = peak_memory("cpu")
    assert peak["kind"] == "host RSS" and peak["mib"] > 10
    assert peak["label"].startswith("device memory n/a on cpu") and "host RSS" in peak["label"]
