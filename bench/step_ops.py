#!/usr/bin/env python
"""Dispatched ops per ensemble step at real sizes, on the meta device (no memory, no GPU; the off-CPU code path).

A step's cost at real sizes on a GPU is largely kernel launches; this counts the ops that would launch one (views,
bare allocations and host-side ops left out) with a TorchDispatchMode, per phase and for the whole step, and prints
them. tests/test_ensemble.py bounds the same counts.

    python bench/step_ops.py [--n_models 8] [--d_in 2048] [--ratio 32] [--batch 4096] [--unit_decoder]
                             [--grad_clip 0.01] [--list]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class DeviceOps(TorchDispatchMode):
    """Records the ops that touch a tensor on `device_type` and do work there: views and bare allocations
    (which launch no kernel) and host-side ops are left out."""

    FREE = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "_unsafe_view"}

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type, self.ops = device_type, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if (any(t.device.type == self.device_type for t in tensors) and not func.is_view
                and func._schema.name.split("::")[-1] not in self.FREE):
            self.ops.append(str(func))
        return out


def step_ops(n_models: int, d_in: int, ratio: int, batch: int, unit_decoder: bool, grad_clip: float, stats: bool
             ) -> list[str]:
    """The ops of one L1 step (after a first one that allocates the workspace) on the meta device."""
    from training.ensemble import Ensemble, make_members        # here: the test imports DeviceOps alone
    ens = Ensemble(make_members("l1", n_models, d_in, ratio * d_in, device="meta"),
                   {"lr": [1e-3] * n_models, "l1": [0.1] * n_models}, unit_decoder=unit_decoder, grad_clip=grad_clip)
    x = torch.empty(batch, d_in, device="meta")
    ens.step(x)
    with DeviceOps("meta") as ops:
        ens.step(x, stats=stats)
    return ops.ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_models", type=int, default=8)
    p.add_argument("--d_in", type=int, default=2048)
    p.add_argument("--ratio", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--unit_decoder", action="store_true")
    p.add_argument("--grad_clip", type=float, default=0.01)
    p.add_argument("--list", action="store_true", help="print every op of the step without stats, in order")
    a = p.parse_args()
    print(f"L1 step, {a.n_models} members, d_in {a.d_in} x {a.ratio}, batch {a.batch}, unit_decoder "
          f"{a.unit_decoder}, grad_clip {a.grad_clip}; meta device, torch {torch.__version__}")
    print(f"{'step':<28}{'ops':>5}")
    for stats in (False, True):
        ops = step_ops(a.n_models, a.d_in, a.ratio, a.batch, a.unit_decoder, a.grad_clip, stats)
        print(f"{'logged (stats=True)' if stats else 'not logged (stats=False)':<28}{len(ops):>5}")
        if a.list and not stats:
            listed = ops
    if a.list:
        for i, op in enumerate(listed):
            print(f"{i:>3} {op}")
        print(collections.Counter(op.split(".")[1] for op in listed).most_common(6))


if __name__ == "__main__":
    main()
