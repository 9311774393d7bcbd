"""What every peer runner shares: arguments, the batch stream, the encode-rule check and the output writer.

Runs inside each peer's side venv (stdlib + numpy + torch + safetensors only). The encode/decode rule itself
is imported from `bench/peers.py` by file path, so the runners and the scorer use one definition.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import save_file

_spec = importlib.util.spec_from_file_location("_bench_peers_api", Path(__file__).resolve().parent.parent / "peers.py")
api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(api)

WEIGHT_NAMES = api.WEIGHT_NAMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train one peer SAE on the first --tokens rows of a float32 .npy")
    p.add_argument("--train_file", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--batch_size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--d_hidden", type=int, required=True)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--l1", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--options", type=str, default="{}",
                   help="JSON object of library-specific overrides (see each runner's OPTIONS)")
    a = p.parse_args(argv)
    a.options = json.loads(a.options)
    return a


def open_rows(train_file: Path, tokens: int) -> np.ndarray:
    """The first `tokens` rows of the .npy, memory-mapped; refuses a file that is too short or not 2-D."""
    arr = np.load(train_file, mmap_mode="r")
    if arr.ndim != 2:
        raise ValueError(f"{train_file}: expected a 2-D array [n, d_in], got shape {arr.shape}")
    if tokens > arr.shape[0]:
        raise ValueError(f"{train_file} has {arr.shape[0]} rows, fewer than tokens={tokens} (no silent reuse)")
    if tokens < 1:
        raise ValueError("tokens must be >= 1")
    return arr[:tokens]


def n_steps(tokens: int, batch_size: int) -> int:
    return math.ceil(tokens / batch_size)


def batches(rows: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive float32 batches of `batch_size` rows, in file order (the last one may be shorter)."""
    for i in range(0, rows.shape[0], batch_size):
        yield torch.from_numpy(np.array(rows[i:i + batch_size], dtype=np.float32, order="C", copy=True))


class Batches:
    """Re-iterable `batches(rows, batch_size)`: each iter() starts again at row 0 (so a library's norm
    estimate that walks the data first does not eat the training batches)."""

    def __init__(self, rows: np.ndarray, batch_size: int):
        self.rows, self.batch_size = rows, batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        return batches(self.rows, self.batch_size)

    def __len__(self) -> int:
        return n_steps(self.rows.shape[0], self.batch_size)


def check_rule(weights: dict[str, torch.Tensor], spec: dict, x: torch.Tensor, codes_lib: torch.Tensor,
               x_hat_lib: torch.Tensor, *, rtol: float = 1e-4) -> dict:
    """Assert that the common encode/decode rule on `weights` reproduces the library's own forward pass
    (`codes_lib`, `x_hat_lib`, both in raw activation space) on the rows `x`; returns the max abs diffs."""
    x = x.double()
    w = {k: v.double() for k, v in weights.items()}
    codes = api.encode_peer(w, spec, x)
    x_hat = api.decode_peer(w, codes)
    codes_lib, x_hat_lib = codes_lib.detach().double(), x_hat_lib.detach().double()
    assert codes.shape == codes_lib.shape, (codes.shape, codes_lib.shape)
    assert x_hat.shape == x_hat_lib.shape, (x_hat.shape, x_hat_lib.shape)
    dc = (codes - codes_lib).abs().max().item()
    dx = (x_hat - x_hat_lib).abs().max().item()
    tol_c = rtol * max(1.0, codes_lib.abs().max().item())
    tol_x = rtol * max(1.0, x_hat_lib.abs().max().item())
    print(f"encode-rule check on {x.shape[0]} rows: max|codes diff| = {dc:.3g} (tol {tol_c:.3g}), "
          f"max|x_hat diff| = {dx:.3g} (tol {tol_x:.3g})", flush=True)
    if not (dc <= tol_c and dx <= tol_x):
        raise AssertionError(f"the common encode rule does not reproduce the library's forward pass: "
                             f"codes diff {dc:.3g} > {tol_c:.3g} or x_hat diff {dx:.3g} > {tol_x:.3g}")
    return {"rows": int(x.shape[0]), "max_abs_diff_codes": dc, "max_abs_diff_x_hat": dx}


def check_rows(rows: np.ndarray, n: int = 256) -> torch.Tensor:
    return torch.from_numpy(np.array(rows[:n], dtype=np.float32, order="C", copy=True))


def write(out: Path, weights: dict[str, torch.Tensor], spec: dict) -> dict:
    """Write weights.safetensors (float32, contiguous) and spec.json into `out`; returns the spec."""
    out.mkdir(parents=True, exist_ok=True)
    d_hidden, d_in = weights["W_dec"].shape
    shapes = {"W_enc": (d_in, d_hidden), "b_enc": (d_hidden,), "W_dec": (d_hidden, d_in), "b_dec": (d_in,)}
    tensors = {}
    for name in WEIGHT_NAMES:
        t = weights[name].detach().to("cpu", torch.float32).contiguous()
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {shapes[name]}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} has non-finite entries: training diverged")
        tensors[name] = t
    missing = {"peer", "library_version", "activation", "k", "subtract_b_dec", "tokens", "batch_size", "lr",
               "seconds", "settings"} - set(spec)
    if missing:
        raise ValueError(f"spec lacks {sorted(missing)}")
    save_file(tensors, str(out / "weights.safetensors"))
    (out / "spec.json").write_text(json.dumps(spec, indent=1, default=str) + "\n")
    print(f"wrote {out / 'weights.safetensors'} and spec.json", flush=True)
    return spec


def base_spec(a: argparse.Namespace, peer: str, library_version: str, activation: str, k: int | None,
              subtract_b_dec: bool, seconds: float, settings: dict) -> dict:
    return {"peer": peer, "library_version": library_version, "activation": activation,
            "k": None if k is None else int(k), "subtract_b_dec": bool(subtract_b_dec), "tokens": a.tokens,
            "batch_size": a.batch_size, "lr": a.lr, "seconds": round(seconds, 3),
            "settings": {"steps": n_steps(a.tokens, a.batch_size), "seed": a.seed, "d_hidden": a.d_hidden,
                         "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                         "python": sys.version.split()[0], **settings}}


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def quiet_env() -> None:
    """No hub, no wandb, no telemetry from inside a runner."""
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                 "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)


def capped_warmup(default: int, steps: int, frac: float) -> int:
    """A library's default warm-up length, capped at `frac` of this run's steps (a default of 1000 steps
    cannot run inside a 100-step budget, and several libraries assert warm-up < total steps)."""
    return int(min(default, int(frac * steps)))
