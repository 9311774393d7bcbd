#!/usr/bin/env python
"""Benchmark: training throughput of Gated ensembles (fused and vmap(grad) backends) against L1's and the matmul limit.

One process, kinds timed round-robin (one step each per round, a warm-up round dropped), medians over --rounds. The
limit is bench/sweep.py's: the rate of one member's five L1 GEMMs (torch.mm, fp32) shared by the n_models members,
i.e. 10 d_in d_hidden flops per token; a Gated step needs seven GEMMs (14 d_in d_hidden flops per token: the encoder
product, two decodings, the decoder gradient, two code gradients and the encoder gradient), so its own limit is
10/14 of that.

    python bench/gated_speed.py [--d_in 512] [--ratio 8] [--n_models 8] [--batch 1024] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.ensemble import Ensemble, make_members  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d_in", type=int, default=512)
    p.add_argument("--ratio", type=int, default=8)
    p.add_argument("--n_models", type=int, default=8)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, d, h, b = args.n_models, args.d_in, args.ratio * args.d_in, args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g) * torch.linspace(0.2, 2, d) + 0.5
    w, codes = torch.randn(h, d, generator=g), torch.randn(b, h, generator=g)
    out_bh, out_bd, out_hd = torch.empty(b, h), torch.empty(b, d), torch.empty(h, d)

    def matmul(_: torch.Tensor) -> None:
        """One member's five L1 GEMMs, as bench/sweep.py times them."""
        torch.mm(x, w.T, out=out_bh)
        torch.mm(x, w.T, out=out_bh)
        torch.mm(codes, w, out=out_bd)
        torch.mm(codes.T, x, out=out_hd)
        torch.mm(codes.T, x, out=out_hd)

    def ensemble(arch: str, backend: str = "fused") -> Ensemble:
        torch.manual_seed(0)
        return Ensemble(make_members(arch, n, d, h), {"lr": [1e-4] * n, "l1": [0.1] * n}, backend=backend)

    kinds = {"matmul": matmul, "l1 (fused)": ensemble("l1").step, "gated (fused)": ensemble("gated").step,
             "gated (autograd)": ensemble("gated", "autograd").step}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds + 1):
        for k, step in kinds.items():
            t = time.perf_counter()
            step(x)
            if r:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    limit = b / med["matmul"] / n
    print(f"{n} members, d_in {d}, d_hidden {h}, batch {b}; {platform.processor() or platform.machine()}, "
          f"{args.threads} torch thread(s) of {os.cpu_count()} CPUs; medians of {args.rounds} rounds")
    print(f"{'kind':>17} | {'tok/s/member':>12} | {'/ L1 limit':>10} | {'/ gated limit':>13}")
    for k in kinds:
        if k != "matmul":
            tps = b / med[k]
            print(f"{k:>17} | {tps:12.0f} | {tps / limit:10.0%} | {tps / (limit * 10 / 14):13.0%}")
    print(f"{'L1 matmul limit':>17} | {limit:12.0f} |")


if __name__ == "__main__":
    main()
