#!/usr/bin/env python
"""Benchmark: training throughput of the SAE ensemble against one-at-a-time training and the matmul limit.

For each size (d_in, d_hidden = ratio * d_in), on the same synthetic data, batch and step count:
  (a) ensemble      the fused vmap ensemble of n_models L1 dictionaries, one step = every member;
  (b) sequential    the same members trained one after another with the same single-model maths
                    (the fused step on a 1-member ensemble: no vmap, no stacking);
  (c) matmul rate   median torch.mm time on the SAE's GEMM shapes (fp32, or bf16), giving the matmul-bound limit
                    in tokens/s per member: a dense L1 dictionary costs 10 * d_in * d_hidden flops per
                    token (forward 4, backward 6: the input needs no gradient).
Context rows: the plain vmap(grad(loss)) ensemble (backend="autograd"), plain PyTorch (autograd +
torch.optim.Adam) one member at a time, and TopK ensembles with the sparse (k active rows,
embedding_bag) against the dense decoder.
Each measurement runs in a fresh subprocess (clean peak RSS); times are medians over --steps steps
after 2 warm-up steps.

    python bench/sweep.py [--sizes 128 512] [--ratio 8] [--n_models 8] [--steps 5] [--batch 4096]
                          [--device cpu|cuda] [--precision fp32|tf32|bf16] [--k 32] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.ensemble import Ensemble, make_members  # noqa: E402

KINDS = ("matmul", "ensemble", "sequential", "vmap_autograd", "torch_sequential", "topk_sparse", "topk_dense")


# ----------------------------------------------------------------------------- measurement (worker side)

def _sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA), so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], n: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of n calls of fn, each synchronised."""
    out = []
    for _ in range(n):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def _batches(n: int, batch: int, d_in: int, device: torch.device) -> list[torch.Tensor]:
    """n synthetic batches [batch, d_in]: anisotropic Gaussian around an offset (same for every kind)."""
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.2, 2.0, d_in)
    return [(torch.randn(batch, d_in, generator=g) * scale + 0.5).to(device) for _ in range(n)]


def _precision_context(precision: str, device: torch.device) -> Any:
    """tf32: TF32 matmuls (CUDA); bf16: autocast to bfloat16 (the fused kernels follow it too)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def matmul_rate(d_in: int, d_hidden: int, batch: int, device: torch.device, precision: str = "fp32",
                repeats: int = 7) -> float:
    """flop/s of torch.mm over the five GEMMs of an L1 step (median time per shape, out= buffers);
    fp32 operands, or bf16 ones for --precision bf16 (tf32 follows the backend flag)."""
    _precision_context(precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=g).to(device, dtype)
    w = torch.randn(d_hidden, d_in, generator=g).to(device, dtype)
    codes = torch.randn(batch, d_hidden, generator=g).to(device, dtype)
    out_bh = torch.empty(batch, d_hidden, device=device, dtype=dtype)
    out_bd = torch.empty(batch, d_in, device=device, dtype=dtype)
    out_hd = torch.empty(d_hidden, d_in, device=device, dtype=dtype)
    shapes = [  # (call, how many per step)
        (lambda: torch.mm(x, w.T, out=out_bh), 2),          # encoder forward; d loss/d codes = g @ W_dec^T
        (lambda: torch.mm(codes, w, out=out_bd), 1),        # decoder forward
        (lambda: torch.mm(codes.T, x, out=out_hd), 2),      # decoder and encoder weight gradients
    ]
    seconds = 0.0
    for call, count in shapes:
        _timed(call, 2, device)
        seconds += count * statistics.median(_timed(call, repeats, device))
    return 10 * batch * d_in * d_hidden / seconds


def _l1_hparams(n: int) -> dict[str, torch.Tensor]:
    """Learning rates and L1 coefficients of n members (a spread, as in a sweep)."""
    return {"lr": torch.full((n,), 1e-3, dtype=torch.float64), "l1": torch.logspace(-1, 1, n, dtype=torch.float64)}


def run_kind(kind: str, d_in: int, d_hidden: int, n_models: int, batch: int, steps: int, device: torch.device,
             precision: str, k: int) -> dict[str, float]:
    """Measure one configuration; returns {"step_s": median seconds per step of every member, ...}."""
    if kind == "matmul":
        return {"flops_per_s": matmul_rate(d_in, d_hidden, batch, device, precision)}
    xs = _batches(4, batch, d_in, device)
    ctx = _precision_context(precision, device)

    def run(step: Callable[[torch.Tensor], Any], n_steps: int) -> list[float]:
        i = iter(range(10 ** 9))
        with ctx:
            return _timed(lambda: step(xs[next(i) % len(xs)]), n_steps, device)

    if kind in ("ensemble", "vmap_autograd", "topk_sparse", "topk_dense"):
        if kind.startswith("topk"):
            members = make_members("topk", n_models, d_in, d_hidden, k=[k] * n_models, device=device)
            ens = Ensemble(members, {"lr": torch.full((n_models,), 1e-3)}, topk_decoder=kind.split("_")[1])
        else:
            members = make_members("l1", n_models, d_in, d_hidden, device=device)
            ens = Ensemble(members, _l1_hparams(n_models), backend="autograd" if kind == "vmap_autograd" else "fused")
        ens.init_center(xs[0])
        run(ens.step, 2)
        times = run(ens.step, steps)
        assert not bool(ens.frozen.any())
        return {"step_s": statistics.median(times)}
    if kind == "sequential":
        members = make_members("l1", n_models, d_in, d_hidden, device=device)
        hp = _l1_hparams(n_models)
        total = 0.0
        for i, member in enumerate(members):
            one = Ensemble([member], {name: v[i:i + 1] for name, v in hp.items()})
            one.init_center(xs[0])
            run(one.step, 2)
            total += statistics.median(run(one.step, steps))
            del one
        return {"step_s": total}
    if kind == "torch_sequential":
        members = make_members("l1", n_models, d_in, d_hidden, device=device)
        l1s = _l1_hparams(n_models)["l1"].tolist()
        total = 0.0
        for member, l1 in zip(members, l1s):
            opt = torch.optim.Adam(member.parameters(), lr=1e-3)

            def step(x: torch.Tensor, member=member, opt=opt, l1=l1) -> None:
                opt.zero_grad(set_to_none=True)
                member.loss(x, l1)[0].backward()
                member.project_decoder_grad_()
                opt.step()
                member.normalize_decoder_()
            run(step, 2)
            total += statistics.median(run(step, steps))
        return {"step_s": total}
    raise ValueError(f"unknown kind {kind!r}")


def worker(spec: dict[str, Any]) -> None:
    """Subprocess entry: run one measurement and print it as one JSON line."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    result = run_kind(spec["kind"], spec["d_in"], spec["d_hidden"], spec["n_models"], spec["batch"], spec["steps"],
                      device, spec["precision"], spec["k"])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver

def measure(spec: dict[str, Any]) -> dict[str, float]:
    """Run `spec` in a fresh Python process; return its result dict."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stderr[-3000:]}")


def machine_line(device: torch.device, threads: int) -> str:
    """One line describing the hardware and software."""
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), platform.processor())
        hw = f"{model}, {os.cpu_count()} logical CPUs, torch threads {threads}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"machine: {hw}; torch {torch.__version__}; load average at start {load:.2f}"


def fmt_rate(tokens_per_s: float) -> str:
    """Tokens/s with a k/M suffix."""
    return f"{tokens_per_s / 1e6:.2f}M" if tokens_per_s >= 1e6 else f"{tokens_per_s / 1e3:.1f}k"


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run every measurement, print the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512], help="d_in values")
    p.add_argument("--ratio", type=int, default=8, help="d_hidden = ratio * d_in")
    p.add_argument("--n_models", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after 2 warm-up steps)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32, help="k of the TopK rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                   help="tf32: CUDA only; bf16: autocast (CPU or CUDA), matmul limit from bf16 torch.mm")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="only (a), (b), (c): skip the context rows")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    device = torch.device(args.device)
    if args.precision == "tf32" and device.type != "cuda":
        p.error("--precision tf32 needs a CUDA device")
    threads = args.threads or torch.get_num_threads()
    kinds = KINDS[:3] if args.quick else KINDS
    print(machine_line(device, threads))
    print(f"batch {args.batch}, n_models {args.n_models}, precision {args.precision}, median of {args.steps} steps "
          f"after 2 warm-up; tok/s = tokens per second per member (each member sees every token)\n")

    rows = []
    for d_in in args.sizes:
        d_hidden = args.ratio * d_in
        res = {}
        for kind in kinds:
            spec = dict(kind=kind, d_in=d_in, d_hidden=d_hidden, n_models=args.n_models, batch=args.batch,
                        steps=args.steps, device=str(device), precision=args.precision, k=args.k, threads=args.threads)
            res[kind] = measure(spec)
            print(f"  measured {d_in}x{d_hidden} {kind}: {res[kind]}", file=sys.stderr, flush=True)
        rows.append((d_in, d_hidden, res))

    print("L1 dictionaries (dense): (a) ensemble vs (b) the same members one after another vs (c) the matmul limit")
    head = (f"{'d_in x d_hidden':>16} | {'mm GFLOP/s':>10} | {'limit tok/s':>11} | {'(a) ens':>8} | {'(b) seq':>8} "
            f"| {'(a)/(b)':>7} | {'(a)/limit':>9} | {'(b)/limit':>9} | {'RSS a/b MB':>11}")
    print(head)
    print("-" * len(head))
    for d_in, d_hidden, res in rows:
        rate = res["matmul"]["flops_per_s"]
        limit = rate / (10 * d_in * d_hidden)
        a = args.batch / res["ensemble"]["step_s"]
        b = args.batch / res["sequential"]["step_s"]
        print(f"{f'{d_in} x {d_hidden}':>16} | {rate / 1e9:10.1f} | {fmt_rate(limit):>11} | {fmt_rate(a):>8} | "
              f"{fmt_rate(b):>8} | {a / b:7.2f} | {a / limit:9.0%} | {b / limit:9.0%} | "
              f"{res['ensemble']['peak_rss_mb']:5.0f}/{res['sequential']['peak_rss_mb']:<5.0f}")
    if args.quick:
        return
    print("\ncontext: tok/s per member (fraction of the L1 matmul limit)")
    head = (f"{'d_in x d_hidden':>16} | {'plain vmap(grad)':>16} | {'torch+Adam seq':>16} | "
            f"{f'TopK k={args.k} sparse':>18} | {'TopK dense dec':>16} | {'sparse/dense':>12}")
    print(head)
    print("-" * len(head))
    for d_in, d_hidden, res in rows:
        limit = res["matmul"]["flops_per_s"] / (10 * d_in * d_hidden)

        def cell(kind: str, width: int) -> str:
            tps = args.batch / res[kind]["step_s"]
            return f"{fmt_rate(tps)} ({tps / limit:.0%})".rjust(width)
        sparse, dense = res["topk_sparse"]["step_s"], res["topk_dense"]["step_s"]
        print(f"{f'{d_in} x {d_hidden}':>16} | {cell('vmap_autograd', 16)} | {cell('torch_sequential', 16)} | "
              f"{cell('topk_sparse', 18)} | {cell('topk_dense', 16)} | {dense / sparse:11.2f}x")
    print(f"\npeak RSS MB: " + "; ".join(
        f"{d}x{h}: " + ", ".join(f"{k} {r[k]['peak_rss_mb']:.0f}" for k in kinds if k != "matmul")
        for d, h, r in rows))


if __name__ == "__main__":
    main()
