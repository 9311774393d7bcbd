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

Architecture rows (--architectures, default every registered one; none with --quick): an ensemble of n_models
members of each architecture (keys: `ARCH_KEYS` by sweep parameter; the sweep's default gradient clipping and the
architecture's decoder init norm) trained by its fused gradient (where it declares one) and by autograd, in
tokens/s per member and as a fraction of the dense batched-matmul limit measured in the same run: (d) "bmm", the
five products of a dense dictionary step done by torch.bmm over the n_models members at once, into preallocated
outputs: encoder forward [N, B, d] @ [N, d, h], code gradient [N, B, d] @ [N, d, h], decoder forward
[N, B, h] @ [N, h, d], decoder weight gradient [N, h, B] @ [N, B, d], encoder weight gradient [N, d, B] @ [N, B, h]
(B = batch, d = d_in, h = d_hidden). FLOPs counted: 2 per multiply-add of those five products, 10 B d h per member
per step; nothing else (activation, loss, Adam, norms, TopK selection are not counted). The limit is B / (seconds
of one bmm step) tokens/s per member, and a fraction is (tokens/s per member) / limit = bmm seconds / step
seconds: how close a whole training step comes to a step doing only a dense dictionary's matrix products. An
architecture that skips dense products (a sparse TopK decoder) can exceed 100%.

The machine may be shared, so every kind of a size lives in one process and the kinds are timed
round-robin, one step each per round: a burst of foreign load hits all of them alike. The table shows
medians over --rounds rounds after a warm-up round. Peak memory comes from a separate short run per
kind (a fresh process each): device memory (torch.cuda.max_memory_allocated) on CUDA, else the host's peak
RSS, labelled so. MFU (model FLOP utilisation) = model FLOPs per step (bench/device.py: 10 B d_in d_hidden
per L1 member) / seconds / the device's peak: the datasheet dense peak of a known GPU at the precision
(H100/H200 SXM, A100; bf16, tf32), else the matmul rate (c) measured in the same run.

    python bench/sweep.py [--sizes 128 512] [--ratio 8] [--n_models 8] [--rounds 5] [--batch 4096]
                          [--device cpu|cuda] [--precision fp32|tf32|bf16] [--k 32] [--quick] [--json PATH]
                          [--architectures NAME ...] [--only_architectures]
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

from bench.device import member_step_flops, mfu, peak_flops, reset_peak_memory, sync  # noqa: E402
from bench.device import peak_memory as device_peak_memory  # noqa: E402
from training.architectures import get as get_architecture  # noqa: E402
from training.architectures import names as architecture_names  # noqa: E402
from training.ensemble import Ensemble, make_members  # noqa: E402
from training.sweep import SweepConfig  # noqa: E402

KINDS = ("matmul", "ensemble", "sequential", "vmap_autograd", "torch_sequential", "topk_sparse", "topk_dense")
BACKENDS = ("fused", "autograd")
Step = Callable[[torch.Tensor], Any]


# ----------------------------------------------------------------------------- the things timed

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


def bmm_step(d_in: int, d_hidden: int, n_models: int, batch: int, device: torch.device, precision: str) -> Step:
    """The five products of a dense dictionary step for every member at once, torch.bmm into preallocated outputs
    (see the module docstring: the dense batched-matmul limit of the architecture rows)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)
    x, w_enc, w_dec, grad_out = rand(n_models, batch, d_in), rand(n_models, d_in, d_hidden), rand(
        n_models, d_hidden, d_in), rand(n_models, batch, d_in)
    codes, grad_codes = rand(n_models, batch, d_hidden), rand(n_models, batch, d_hidden)
    out_bh = torch.empty(n_models, batch, d_hidden, device=device, dtype=dtype)
    out_bd = torch.empty(n_models, batch, d_in, device=device, dtype=dtype)
    out_hd = torch.empty(n_models, d_hidden, d_in, device=device, dtype=dtype)
    out_dh = torch.empty(n_models, d_in, d_hidden, device=device, dtype=dtype)

    def step(_: torch.Tensor) -> None:
        torch.bmm(x, w_enc, out=out_bh)                              # encoder forward
        torch.bmm(grad_out, w_dec.transpose(1, 2), out=out_bh)       # code gradient
        torch.bmm(codes, w_dec, out=out_bd)                          # decoder forward
        torch.bmm(codes.transpose(1, 2), grad_out, out=out_hd)       # decoder weight gradient
        torch.bmm(x.transpose(1, 2), grad_codes, out=out_dh)         # encoder weight gradient
    return step


ARCH_KEYS = {"l1": lambda n, k: torch.logspace(-1, 1, n, dtype=torch.float64).tolist(), "k": lambda n, k: [k] * n}
"""Member keys of an architecture row by sweep parameter (n members, the --k flag); others: [k] * n for an integer
parameter, the L1 spread for a real one."""


def architecture_keys(name: str, n_models: int, k: int) -> list:
    """The n_models member keys of architecture `name`'s row."""
    arch = get_architecture(name)
    keys = ARCH_KEYS.get(arch.sweep_param, ARCH_KEYS["k"] if arch.sweep_param_integer else ARCH_KEYS["l1"])
    return keys(n_models, k)


def architecture_kinds(names: list[str]) -> list[str]:
    """The timed kinds of the architecture rows: "name/fused" (where it has a fused gradient) and "name/autograd"."""
    return [f"{n}/{b}" for n in names for b in BACKENDS if b == "autograd" or get_architecture(n).fused_grads]


def architecture_step(kind: str, d_in: int, d_hidden: int, n_models: int, device: torch.device, k: int,
                      x0: torch.Tensor) -> Step:
    """One training step of an n_models ensemble of the architecture in `kind` ("name/backend")."""
    name, backend = kind.split("/")
    arch = get_architecture(name)
    keys = architecture_keys(name, n_models, k)
    members = make_members(name, n_models, d_in, d_hidden, keys=keys, init_norm=arch.default_init_norm,
                           device=device)
    ens = Ensemble(members, {"lr": [1e-3] * n_models, arch.sweep_param: keys}, backend=backend,
                   grad_clip=SweepConfig().grad_clip)
    ens.init_center(x0)
    return ens.step


def build(kind: str, d_in: int, d_hidden: int, n_models: int, batch: int, device: torch.device, precision: str,
          k: int, x0: torch.Tensor) -> Step:
    """A callable doing one training step of every member (or the GEMMs of one member, for "matmul"; of every
    member, batched, for "bmm")."""
    if kind == "matmul":
        return matmul_step(d_in, d_hidden, batch, device, precision)
    if kind == "bmm":
        return bmm_step(d_in, d_hidden, n_models, batch, device, precision)
    if "/" in kind:
        return architecture_step(kind, d_in, d_hidden, n_models, device, k, x0)
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
                    sync(device)
                    t = time.perf_counter()
                    step(x)
                    sync(device)
                    if r:
                        times[kind].append(time.perf_counter() - t)
    return times


def peak_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of a fresh process doing two steps of one kind: {"peak_mib", "peak_kind" ("device" on CUDA,
    else "host RSS"), "peak_rss_mb"}."""
    device = torch.device(spec["device"])
    reset_peak_memory(device)
    xs = _batches(2, spec["batch"], spec["d_in"], device)
    step = build(spec["kind"], spec["d_in"], spec["d_hidden"], spec["n_models"], spec["batch"], device,
                 spec["precision"], spec["k"], xs[0])
    with _precision_context(spec["precision"], device):
        for x in xs:
            step(x)
    sync(device)
    peak = device_peak_memory(device)
    return {"peak_mib": peak["mib"], "peak_kind": peak["kind"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


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

def device_name(device: torch.device) -> str:
    """The CUDA device's name (what the datasheet table is keyed by), else the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


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
    if tokens_per_s < 1e3:
        return f"{tokens_per_s:.0f}"
    return f"{tokens_per_s / 1e3:.2f}k" if tokens_per_s < 1e4 else f"{tokens_per_s / 1e3:.1f}k"


def summarise(d_in: int, d_hidden: int, seconds: dict[str, float], memory: dict[str, dict[str, Any]],
              n_models: int, batch: int, precision: str, name: str) -> dict[str, Any]:
    """The derived figures of one size: tokens/s per member, MFU against the device's peak, peak memory."""
    flops = member_step_flops("l1", d_in, d_hidden, batch)              # one member's step
    matmul_rate = flops / seconds["matmul"] if "matmul" in seconds else n_models * flops / seconds["bmm"]
    peak, peak_source = peak_flops(name, precision, matmul_rate)
    out: dict[str, Any] = {
        "d_in": d_in, "d_hidden": d_hidden, "n_models": n_models, "batch": batch, "precision": precision,
        "device_name": name, "seconds": seconds, "memory": memory, "member_step_flops": flops,
        "matmul_flops_per_s": matmul_rate, "peak_flops_per_s": peak, "peak_source": peak_source,
        "limit_tokens_per_s_per_member": matmul_rate / (10 * d_in * d_hidden * n_models)}
    for kind in ("ensemble", "sequential"):
        if kind in seconds:
            out[f"{kind}_tokens_per_s_per_member"] = batch / seconds[kind]
            out[f"{kind}_mfu"] = mfu(n_models * flops, seconds[kind], peak)
    if "ensemble" in seconds and "sequential" in seconds:
        out["ensemble_over_sequential"] = seconds["sequential"] / seconds["ensemble"]
    if "bmm" in seconds:
        out["bmm_flops_per_s"] = n_models * flops / seconds["bmm"]
        out["bmm_limit_tokens_per_s_per_member"] = batch / seconds["bmm"]
        out["architectures"] = {}
        for kind in seconds:
            if "/" in kind:
                name, backend = kind.split("/")
                out["architectures"].setdefault(name, {})[backend] = {
                    "tokens_per_s_per_member": batch / seconds[kind],
                    "fraction_of_bmm_limit": seconds["bmm"] / seconds[kind]}
    return out


def size_label(row: dict[str, Any]) -> str:
    """"d_in x d_hidden" of a summary row."""
    return f"{row['d_in']} x {row['d_hidden']}"


def _memory_cell(mem: dict[str, dict[str, Any]], kinds: tuple[str, ...]) -> str:
    """"a / b MiB" of the kinds' peak memory."""
    return " / ".join(f"{mem[k]['peak_mib']:.0f}" for k in kinds) + " MiB"


def print_architecture_table(rows: list[dict[str, Any]], args: Any) -> None:
    """One row per architecture and size: tok/s per member and the fraction of the dense bmm limit, fused and
    autograd ("-": no fused gradient)."""
    rows = [r for r in rows if r.get("architectures")]
    if not rows:
        return
    print(f"\narchitectures: {args.n_models} members, tok/s per member (fraction of the dense batched-matmul limit "
          "(d): 10 B d_in d_hidden FLOPs per member per step, torch.bmm over the members, same run)")
    head = (f"{'architecture':>14} | {'d_in x d_hidden':>16} | {'(d) bmm GFLOP/s':>15} | {'limit tok/s':>11} | "
            f"{'fused':>16} | {'autograd':>16} | {'fused/autograd':>14}")
    print(head)
    print("-" * len(head))
    for r in rows:
        for name, paths in r["architectures"].items():
            def cell(backend: str) -> str:
                if backend not in paths:
                    return "-".rjust(16)
                p = paths[backend]
                return f"{fmt_rate(p['tokens_per_s_per_member'])} ({p['fraction_of_bmm_limit']:.0%})".rjust(16)
            ratio = (f"{paths['fused']['tokens_per_s_per_member'] / paths['autograd']['tokens_per_s_per_member']:.2f}x"
                     if "fused" in paths and "autograd" in paths else "-")
            print(f"{name:>14} | {size_label(r):>16} | {r['bmm_flops_per_s'] / 1e9:15.1f} | "
                  f"{fmt_rate(r['bmm_limit_tokens_per_s_per_member']):>11} | {cell('fused')} | {cell('autograd')} | "
                  f"{ratio:>14}")


def print_tables(rows: list[dict[str, Any]], args: Any, kinds: tuple[str, ...]) -> None:
    """The L1 table ((a), (b), (c), MFU, peak memory) and the context table, from median seconds per step."""
    if "ensemble" not in kinds:
        return
    where = rows[0]["memory"]["ensemble"]["peak_kind"] if rows else "device"
    mem_head = "peak dev mem a / b" if where == "device" else "peak host RSS a / b"
    print("L1 dictionaries: (a) ensemble, (b) the same members one after another, (c) the matmul limit.\n"
          f"tok/s = tokens each member trains on per second; limit = matmul rate / (10 d_in d_hidden "
          f"x {args.n_models} members); MFU against {rows[0]['peak_source'] if rows else '-'}"
          + ("" if where == "device" else "; device memory n/a on this device: host peak RSS shown instead"))
    head = (f"{'d_in x d_hidden':>16} | {'mm GFLOP/s':>10} | {'limit tok/s':>11} | {'(a) ens':>8} | "
            f"{'(b) seq':>8} | {'(a)/(b)':>7} | {'(a)/limit':>9} | {'(b)/limit':>9} | {'MFU a / b':>11} | "
            f"{mem_head:>20}")
    print(head)
    print("-" * len(head))
    for r in rows:
        a, b = r["ensemble_tokens_per_s_per_member"], r["sequential_tokens_per_s_per_member"]
        limit = r["limit_tokens_per_s_per_member"]
        m = "n/a" if r["ensemble_mfu"] is None else f"{r['ensemble_mfu']:.0%} / {r['sequential_mfu']:.0%}"
        print(f"{size_label(r):>16} | {r['matmul_flops_per_s'] / 1e9:10.1f} | "
              f"{fmt_rate(limit):>11} | {fmt_rate(a):>8} | {fmt_rate(b):>8} | {a / b:7.2f} | {a / limit:9.0%} | "
              f"{b / limit:9.0%} | {m:>11} | {_memory_cell(r['memory'], ('ensemble', 'sequential')):>20}")
    if "vmap_autograd" not in kinds:
        return
    print(f"\ncontext: tok/s per member (fraction of the L1 matmul limit); TopK k={args.k}")
    head = (f"{'d_in x d_hidden':>16} | {'plain vmap(grad)':>16} | {'torch+Adam seq':>16} | {'(a)/torch seq':>13} | "
            f"{'TopK sparse dec':>16} | {'TopK dense dec':>16} | {'sparse/dense':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        sec = r["seconds"]
        limit = args.batch / sec["matmul"] / args.n_models

        def cell(kind: str, width: int) -> str:
            tps = args.batch / sec[kind]
            return f"{fmt_rate(tps)} ({tps / limit:.0%})".rjust(width)
        print(f"{size_label(r):>16} | {cell('vmap_autograd', 16)} | "
              f"{cell('torch_sequential', 16)} | {sec['torch_sequential'] / sec['ensemble']:12.1f}x | "
              f"{cell('topk_sparse', 16)} | {cell('topk_dense', 16)} | {sec['topk_dense'] / sec['topk_sparse']:11.2f}x")
    print(f"\npeak memory MiB ({where}): " + "; ".join(
        size_label(r).replace(" ", "") + ": " + ", ".join(f"{k} {r['memory'][k]['peak_mib']:.0f}"
                                                     for k in kinds if k in r["memory"]) for r in rows))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's flags."""
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
    p.add_argument("--json", help="also write the figures of every size to this JSON file")
    p.add_argument("--architectures", nargs="*", default=None,
                   help="architecture rows to time (default: every registered one; none with --quick)")
    p.add_argument("--only_architectures", action="store_true",
                   help="time only the architecture rows and their dense batched-matmul limit (d)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker and args.precision == "tf32" and torch.device(args.device).type != "cuda":
        p.error("--precision tf32 needs a CUDA device")
    if args.architectures is None:
        args.architectures = [] if args.quick and not args.only_architectures else list(architecture_names())
    unknown = [n for n in args.architectures if n not in architecture_names()]
    if unknown:
        p.error(f"unknown architecture {unknown[0]!r}: choose among {', '.join(architecture_names())}")
    if args.only_architectures and not args.architectures:
        p.error("--only_architectures needs at least one architecture")
    return args


def timed_kinds(args: argparse.Namespace) -> tuple[str, ...]:
    """Every kind this run times: the L1 kinds (all, (a)-(c) with --quick, none with --only_architectures), then
    the dense batched-matmul limit and the architecture rows."""
    base = () if args.only_architectures else (KINDS[:3] if args.quick else KINDS)
    arch = tuple(["bmm"] + architecture_kinds(args.architectures)) if args.architectures else ()
    return base + arch


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every kind at every size (one worker process per size, one per kind for memory); the summaries."""
    device = torch.device(args.device)
    kinds = timed_kinds(args)
    rows = []
    for d_in in args.sizes:
        d_hidden = args.ratio * d_in
        base = dict(d_in=d_in, d_hidden=d_hidden, n_models=args.n_models, batch=args.batch, device=str(device),
                    precision=args.precision, k=args.k, threads=args.threads)
        times = run_worker({**base, "job": "time", "kinds": list(kinds), "rounds": args.rounds})
        seconds = {kind: statistics.median(t) for kind, t in times.items()}
        print(f"  {d_in}x{d_hidden} seconds per round: "
              + ", ".join(f"{k} {[round(v, 4) for v in t]}" for k, t in times.items()), file=sys.stderr, flush=True)
        memory = {kind: run_worker({**base, "job": "memory", "kind": kind}) for kind in kinds
                  if kind in KINDS and kind != "matmul"}                  # the architecture rows: time only
        rows.append(summarise(d_in, d_hidden, seconds, memory, args.n_models, args.batch, args.precision,
                              device_name(device)))
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]] | None:
    """Parse flags, run every measurement, print the tables (and write --json); the summaries."""
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return None
    device = torch.device(args.device)
    threads = args.threads or torch.get_num_threads()
    kinds = timed_kinds(args)
    print(machine_line(device, threads))
    print(f"batch {args.batch}, n_models {args.n_models}, precision {args.precision}, medians of {args.rounds} "
          f"round-robin rounds after a warm-up round; {load_line()} at start")
    rows = measure(args)
    print(f"{load_line()} at end\n")
    print_tables(rows, args, kinds)
    print_architecture_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(device, threads), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
