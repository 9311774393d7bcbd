#!/usr/bin/env python
"""Benchmark: training throughput of the SAE ensemble against one-at-a-time training and the matmul limit.

For each size (d_in, d_hidden = ratio * d_in), on the same synthetic batches:
  (a) ensemble      the fused vmap ensemble of n_models L1 dictionaries; one step = every member;
  (b) sequential    the same members trained one after another with the same single-model maths
                    (the fused step on 1-member ensembles: no vmap, no stacking, one shared workspace);
  (c) matmul rate   median torch.mm time on the SAE's five GEMM shapes (fp32, or bf16 with
                    --precision bf16), giving the matmul-bound limit in tokens/s per member: a dense
                    L1 dictionary costs 10 * d_in * d_hidden flops per token (4 forward, 6 backward,
                    the input needs no gradient), shared by the n_models members.
Context rows: the plain vmap(grad(loss)) ensemble (backend="autograd"), plain PyTorch one member at a
time (autograd + torch.optim.Adam + the decoder-norm constraint), and TopK ensembles with the sparse
decoder (k active rows: embedding_bag forward, CSR products backward) against the dense one.

The machine may be shared, so every kind of a size lives in one process and the kinds are timed
round-robin, one step each per round: a burst of foreign load hits all of them alike. The table shows
medians over --rounds rounds after a warm-up round. Peak RSS comes from a separate short run per
kind (a fresh process each).

    python bench/sweep.py [--sizes 128 512] [--ratio 8] [--n_models 8] [--rounds 5] [--batch 4096]
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
Step = Callable[[torch.Tensor], Any]


# ----------------------------------------------------------------------------- the things timed

def _sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA), so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(n: int, batch: int, d_in: int, device: torch.device) -> list[torch.Tensor]:
    """n synthetic batches [batch, d_in]: anisotropic Gaussian around an offset (the same for every kind)."""
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


def _l1_hparams(n: int) -> dict[str, torch.Tensor]:
    """Learning rates and L1 coefficients of n members (a spread, as in a sweep)."""
    return {"lr": torch.full((n,), 1e-3, dtype=torch.float64), "l1": torch.logspace(-1, 1, n, dtype=torch.float64)}


def matmul_step(d_in: int, d_hidden: int, batch: int, device: torch.device, precision: str) -> Step:
    """One member's five L1 GEMMs with torch.mm into preallocated outputs (fp32 operands, or bf16)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=g).to(device, dtype)
    w = torch.randn(d_hidden, d_in, generator=g).to(device, dtype)
    codes = torch.randn(batch, d_hidden, generator=g).to(device, dtype)
    out_bh = torch.empty(batch, d_hidden, device=device, dtype=dtype)
    out_bd = torch.empty(batch, d_in, device=device, dtype=dtype)
    out_hd = torch.empty(d_hidden, d_in, device=device, dtype=dtype)

    def step(_: torch.Tensor) -> None:
        torch.mm(x, w.T, out=out_bh)        # encoder forward
        torch.mm(x, w.T, out=out_bh)        # d loss / d codes = g @ W_dec^T (same shape)
        torch.mm(codes, w, out=out_bd)      # decoder forward
        torch.mm(codes.T, x, out=out_hd)    # decoder weight gradient
        torch.mm(codes.T, x, out=out_hd)    # encoder weight gradient
    return step


def build(kind: str, d_in: int, d_hidden: int, n_models: int, batch: int, device: torch.device, precision: str,
          k: int, x0: torch.Tensor) -> Step:
    """A callable doing one training step of every member (or the GEMMs of one member, for "matmul")."""
    if kind == "matmul":
        return matmul_step(d_in, d_hidden, batch, device, precision)
    if kind in ("ensemble", "vmap_autograd", "topk_sparse", "topk_dense"):
        if kind.startswith("topk"):
            members = make_members("topk", n_models, d_in, d_hidden, k=[k] * n_models, device=device)
            ens = Ensemble(members, {"lr": [1e-3] * n_models}, topk_decoder=kind.split("_")[1])
        else:
            members = make_members("l1", n_models, d_in, d_hidden, device=device)
            ens = Ensemble(members, _l1_hparams(n_models), backend="autograd" if kind == "vmap_autograd" else "fused")
        ens.init_center(x0)
        return ens.step
    if kind == "sequential":
        hp = _l1_hparams(n_models)
        singles = [Ensemble([m], {name: v[i:i + 1] for name, v in hp.items()})
                   for i, m in enumerate(make_members("l1", n_models, d_in, d_hidden, device=device))]
        for one in singles:
            one.init_center(x0)

        def sequential_step(x: torch.Tensor) -> None:
            for one in singles:
                one._ws = singles[0]._ws      # one workspace, as when training one member after another
                one.step(x)
        return sequential_step
    if kind == "torch_sequential":
        members = make_members("l1", n_models, d_in, d_hidden, device=device)
        for m in members:
            m.init_center(x0)
        pairs = [(m, torch.optim.Adam(m.parameters(), lr=1e-3), l1)
                 for m, l1 in zip(members, _l1_hparams(n_models)["l1"].tolist())]

        def torch_step(x: torch.Tensor) -> None:
            for member, opt, l1 in pairs:
                opt.zero_grad(set_to_none=True)
                member.loss(x, l1)[0].backward()
                member.project_decoder_grad_()
                opt.step()
                member.normalize_decoder_()
        return torch_step
    raise ValueError(f"unknown kind {kind!r}")


# ----------------------------------------------------------------------------- worker processes

def time_size(spec: dict[str, Any]) -> dict[str, list[float]]:
    """Seconds per call of every kind, timed round-robin: {kind: [seconds per round]}."""
    device = torch.device(spec["device"])
    xs = _batches(4, spec["batch"], spec["d_in"], device)
    steps = {kind: build(kind, spec["d_in"], spec["d_hidden"], spec["n_models"], spec["batch"], device,
                         spec["precision"], spec["k"], xs[0]) for kind in spec["kinds"]}
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    with _precision_context(spec["precision"], device):
        for r in range(spec["rounds"] + 1):                 # round 0 warms up
            for kind, step in steps.items():
                for _ in range(2 if r == 0 else 1):
                    x = xs[(r + len(times[kind])) % len(xs)]
                    _sync(device)
                    t = time.perf_counter()
                    step(x)
                    _sync(device)
                    if r:
                        times[kind].append(time.perf_counter() - t)
    return times


def peak_memory(spec: dict[str, Any]) -> dict[str, float]:
    """Peak RSS (and CUDA memory) in MiB of a fresh process doing two steps of one kind."""
    device = torch.device(spec["device"])
    xs = _batches(2, spec["batch"], spec["d_in"], device)
    step = build(spec["kind"], spec["d_in"], spec["d_hidden"], spec["n_models"], spec["batch"], device,
                 spec["precision"], spec["k"], xs[0])
    with _precision_context(spec["precision"], device):
        for x in xs:
            step(x)
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def worker(spec: dict[str, Any]) -> None:
    """Subprocess entry: run `spec["job"]` and print its result as one JSON line."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = time_size(spec) if spec["job"] == "time" else peak_memory(spec)
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(spec: dict[str, Any]) -> Any:
    """Run `spec` in a fresh Python process; return its result."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stderr[-3000:]}")


# ----------------------------------------------------------------------------- report

def machine_line(device: torch.device, threads: int) -> str:
    """One line describing the hardware and software."""
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), platform.processor())
        hw = f"{model}, {os.cpu_count()} logical CPUs, torch threads {threads}"
    return f"machine: {hw}; torch {torch.__version__}"


def load_line() -> str:
    """The 1-minute load average (foreign load slows every kind alike; see the module docstring)."""
    return f"load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""


def fmt_rate(tokens_per_s: float) -> str:
    """Tokens/s with a k/M suffix."""
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    return f"{tokens_per_s / 1e3:.2f}k" if tokens_per_s < 1e4 else f"{tokens_per_s / 1e3:.1f}k"


def print_tables(rows: list[tuple[int, int, dict[str, float], dict[str, dict[str, float]]]], args: Any,
                 kinds: tuple[str, ...]) -> None:
    """The L1 table ((a), (b), (c)) and the context table, from median seconds per step."""
    print("L1 dictionaries: (a) ensemble, (b) the same members one after another, (c) the matmul limit.\n"
          f"tok/s = tokens each member trains on per second; limit = matmul rate / (10 d_in d_hidden "
          f"x {args.n_models} members)")
    head = (f"{'d_in x d_hidden':>16} | {'mm GFLOP/s':>10} | {'limit tok/s':>11} | {'(a) ens':>8} | "
            f"{'(b) seq':>8} | {'(a)/(b)':>7} | {'(a)/limit':>9} | {'(b)/limit':>9} | {'peak RSS a / b':>14}")
    print(head)
    print("-" * len(head))
    for d_in, d_hidden, sec, mem in rows:
        rate = 10 * args.batch * d_in * d_hidden / sec["matmul"]
        limit = rate / (10 * d_in * d_hidden * args.n_models)       # n_models members share the machine
        a, b = args.batch / sec["ensemble"], args.batch / sec["sequential"]
        rss = f"{mem['ensemble']['peak_rss_mb']:.0f} / {mem['sequential']['peak_rss_mb']:.0f} MB"
        print(f"{f'{d_in} x {d_hidden}':>16} | {rate / 1e9:10.1f} | {fmt_rate(limit):>11} | {fmt_rate(a):>8} | "
              f"{fmt_rate(b):>8} | {a / b:7.2f} | {a / limit:9.0%} | {b / limit:9.0%} | {rss:>14}")
    if len(kinds) <= 3:
        return
    print(f"\ncontext: tok/s per member (fraction of the L1 matmul limit); TopK k={args.k}")
    head = (f"{'d_in x d_hidden':>16} | {'plain vmap(grad)':>16} | {'torch+Adam seq':>16} | {'(a)/torch seq':>13} | "
            f"{'TopK sparse dec':>16} | {'TopK dense dec':>16} | {'sparse/dense':>12}")
    print(head)
    print("-" * len(head))
    for d_in, d_hidden, sec, _ in rows:
        limit = args.batch / sec["matmul"] / args.n_models

        def cell(kind: str, width: int) -> str:
            tps = args.batch / sec[kind]
            return f"{fmt_rate(tps)} ({tps / limit:.0%})".rjust(width)
        print(f"{f'{d_in} x {d_hidden}':>16} | {cell('vmap_autograd', 16)} | {cell('torch_sequential', 16)} | "
              f"{sec['torch_sequential'] / sec['ensemble']:12.1f}x | {cell('topk_sparse', 16)} | "
              f"{cell('topk_dense', 16)} | {sec['topk_dense'] / sec['topk_sparse']:11.2f}x")
    print("\npeak RSS MB: " + "; ".join(
        f"{d}x{h}: " + ", ".join(f"{k} {m[k]['peak_rss_mb']:.0f}" for k in kinds if k != "matmul")
        for d, h, _, m in rows))


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run every measurement, print the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512], help="d_in values")
    p.add_argument("--ratio", type=int, default=8, help="d_hidden = ratio * d_in")
    p.add_argument("--n_models", type=int, default=8)
    p.add_argument("--rounds", "--steps", type=int, default=5, dest="rounds",
                   help="timed rounds (one step of every kind each) after a warm-up round")
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
    print(f"batch {args.batch}, n_models {args.n_models}, precision {args.precision}, medians of {args.rounds} "
          f"round-robin rounds after a warm-up round; {load_line()} at start")

    rows = []
    for d_in in args.sizes:
        d_hidden = args.ratio * d_in
        base = dict(d_in=d_in, d_hidden=d_hidden, n_models=args.n_models, batch=args.batch, device=str(device),
                    precision=args.precision, k=args.k, threads=args.threads)
        times = run_worker({**base, "job": "time", "kinds": list(kinds), "rounds": args.rounds})
        seconds = {kind: statistics.median(t) for kind, t in times.items()}
        print(f"  {d_in}x{d_hidden} seconds per round: "
              + ", ".join(f"{k} {[round(v, 4) for v in t]}" for k, t in times.items()), file=sys.stderr, flush=True)
        memory = {kind: run_worker({**base, "job": "memory", "kind": kind}) for kind in kinds if kind != "matmul"}
        rows.append((d_in, d_hidden, seconds, memory))
    print(f"{load_line()} at end\n")
    print_tables(rows, args, kinds)


if __name__ == "__main__":
    main()
