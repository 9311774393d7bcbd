#!/usr/bin/env python
"""Benchmark: gather_high_activations.py on a synthetic Stage 1 folder with a random dictionary; dashboard site size.

Writes, in a temporary folder, a Stage 1 hook folder of --n_rows rows of d=--d fp16 activations (x ~ N(0, I),
context length 128, every position stored, rows shuffled within chunks of 262144), its contexts files, a byte-level
BPE tokenizer, and a one-member L1 sweep folder holding a random --d_hidden-wide dictionary (unit encoder rows,
bias -2, so each feature fires on about 2% of tokens). Times the whole gathering run (both passes, the JSON
building and writing) --repeats times and prints the median, plus the machine load (1-minute load average
before and after). With --site_features N it also builds the dashboard site of a random N-feature dictionary
(synthetic features.json, random W_U) and prints its size and build time.

    python bench/top_activations.py [--n_rows 1000000] [--d 128] [--d_hidden 4096] [--repeats 3]
    python bench/top_activations.py --n_rows 0 --site_features 16384      # site size only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.chunks import CONTEXTS, MANIFEST, atomic_write_json, save_tensors  # noqa: E402

CONTEXT_LENGTH = 128


def write_tokenizer(folder: Path, vocab_size: int = 1024) -> Path:
    """A byte-level BPE tokenizer trained on generated English-like text, saved to `folder`."""
    from training.tiny_lm import train_tokenizer
    words = ["the", "parser", "returns", "a", "list", "of", "tokens", "when", "called", "with", "file", "open",
             "read", "write", "value", "error", "import", "class", "def", "self", "module", "string", "number"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 40)) + "." for _ in range(400)]
    train_tokenizer(texts, vocab_size).save_pretrained(folder)
    return folder


def write_synthetic_folder(root: Path, n_rows: int, d: int, model: str, vocab_size: int,
                           chunk_size: int = 262144, context_length: int = CONTEXT_LENGTH, seed: int = 0,
                           hook: str = "blocks.0.hook_resid_post", acts: torch.Tensor | None = None) -> Path:
    """A Stage 1 dataset folder with one hook (x ~ N(0, I) unless `acts [n_rows, d]` is given); returns the hook folder.

    Sequence s holds rows s*L .. s*L+L-1 in order (position = row % L); rows are shuffled within each chunk and
    contexts/{i} holds the token ids of every sequence with a row in chunk i, as Stage 1 writes them.
    """
    g = torch.Generator().manual_seed(seed)
    (root / hook).mkdir(parents=True, exist_ok=True)
    (root / CONTEXTS).mkdir(exist_ok=True)
    n_seq = -(-n_rows // context_length)
    tokens = torch.randint(1, vocab_size, (n_seq, context_length), generator=g, dtype=torch.int32)
    chunks, total = [], 0
    mean = torch.zeros(d, dtype=torch.float64)
    for i, start in enumerate(range(0, n_rows, chunk_size)):
        rows = torch.arange(start, min(n_rows, start + chunk_size))
        x = (torch.randn(len(rows), d, generator=g) if acts is None else acts[rows].float()).to(torch.float16)
        perm = torch.randperm(len(rows), generator=g)
        seq, pos = rows // context_length, rows % context_length
        path = root / hook / f"{i}.safetensors"
        digest = save_tensors(path, {"activations": x[perm], "token_ids": tokens[seq, pos][perm],
                                     "sequence_ids": seq[perm].long(), "positions": pos[perm].int()},
                              {"rows": len(rows), "chunk": i})
        useq = seq.unique()
        save_tensors(root / CONTEXTS / f"{i}.safetensors", {"sequence_ids": useq.long(), "tokens": tokens[useq]})
        chunks.append({"file": path.name, "rows": len(rows), "sha256": digest, "partial": False})
        mean += x.double().sum(0)
        total += len(rows)
    manifest = {"format_version": 1, "config": {"model": model, "dataset": "synthetic", "dataset_split": "train",
                                                "text_column": None, "context_length": context_length,
                                                "chunk_size": chunk_size},
                "model": {"name": model}, "special_token_ids": [0],
                "hooks": {hook: {"d": d, "mean": (mean / max(1, total)).tolist(), "mean_norm": 0.0,
                                 "chunks": chunks}},
                "chunks": [{"rows": c["rows"]} for c in chunks], "total_tokens": total, "finished": True}
    atomic_write_json(root / MANIFEST, manifest)
    return root / hook


def write_random_sweep(folder: Path, dataset_dir: Path, d: int, d_hidden: int, bias: float = -2.0, seed: int = 0,
                       l1: float = 1e-3, manifest: dict | None = None) -> Path:
    """A one-member L1 sweep folder (sweep.json + sweep.safetensors) holding a random dictionary."""
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(d_hidden, d, generator=g)
    dec /= dec.norm(dim=1, keepdim=True)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / "sweep.safetensors", {"center": torch.zeros(1, d), "encoder": dec[None].clone(),
                                                "encoder_bias": torch.full((1, d_hidden), bias),
                                                "decoder": dec[None].clone()})
    if manifest is None:
        manifest = json.loads((dataset_dir.parent / MANIFEST).read_text())
    atomic_write_json(folder / "sweep.json", {
        "architecture": "l1", "tied": False, "d_in": d, "d_hidden": d_hidden, "hook": dataset_dir.name,
        "dataset_dir": str(dataset_dir.resolve()), "keys": [l1], "members": [{"l1": l1}], "finished": True,
        "config": {}, "source_manifest": manifest})
    return folder


def synthetic_features(n: int, top_k: int = 20, n_quantiles: int = 5, per_quantile: int = 3, window: int = 15,
                       seed: int = 0, n_tokens: int = 1_000_000) -> tuple[dict, Iterator[dict]]:
    """(features.json header, iterator over its features) for `n` random features (see training.feature_file):
    log-uniform densities, a quarter of the window tokens active, word-like tokens; the shape of a real run
    with these settings. The features are generated lazily."""
    from training.feature_file import FORMAT, VERSION, round_sig
    from training.render import render_feature_text
    rng = np.random.default_rng(seed)
    words = [" the", " of", " parser", " return", "(", ")", " self", ".", " value", " =", " file", "ing", " data",
             "\n", " list", " import", " error", " in", " for", ":", " string", " to", " a", " open"]

    def example(center_act: float) -> dict:
        acts = np.where(rng.random(window) < 0.25, rng.random(window) * center_act, 0.0)
        acts[window - 5] = center_act
        return {"tokens": [str(w) for w in rng.choice(words, window)], "acts": round_sig(acts).tolist(),
                "center": window - 5, "activation": float(round_sig(np.array([center_act]))[0]),
                "sequence": int(rng.integers(0, 10 ** 5)), "position": int(rng.integers(10, 128))}

    def features() -> Iterator[dict]:
        for i in range(n):
            density = float(round_sig(np.array([10 ** rng.uniform(-5, -0.5)]))[0])
            mx = float(round_sig(np.array([rng.uniform(0.5, 20)]))[0])
            top = [example(mx * (1 - 0.02 * j)) for j in range(top_k)]
            groups = [{"quantile": [q / n_quantiles, (q + 1) / n_quantiles],
                       "range": round_sig(np.array([mx * q / n_quantiles, mx * (q + 1) / n_quantiles])).tolist(),
                       "examples": [example(mx * (q + 0.5) / n_quantiles) for _ in range(per_quantile)]}
                      for q in range(n_quantiles)]
            f = {"id": i, "density": density, "max": mx, "count": int(density * n_tokens), "top": top,
                 "quantiles": groups, "histogram": {"lo": 0.0, "hi": mx, "counts": rng.integers(0, 30, 24).tolist(),
                                                    "sample": 128}}
            f["text"] = render_feature_text(f)
            yield f
    header = {"format": FORMAT, "version": VERSION, "n_tokens": n_tokens, "n_features": n, "n_dead": 0,
              "source": {"kind": "sae", "sweep": "synthetic", "key": 0.001, "key_name": "l1", "architecture": "l1",
                         "model": "synthetic", "hook": "blocks.0.hook_resid_post", "d_in": 128},
              "top_k": top_k, "window_before": window - 5, "window_after": 4, "n_quantiles": n_quantiles,
              "per_quantile": per_quantile}
    return header, features()


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def bench_gather(args: argparse.Namespace, tmp: Path) -> None:
    """Time gather_high_activations on the synthetic folder; print the table."""
    from training.top_activations import TopActivationsConfig, gather
    tok = write_tokenizer(tmp / "tokenizer", args.vocab)
    t = time.perf_counter()
    hook_dir = write_synthetic_folder(tmp / "data", args.n_rows, args.d, str(tok), args.vocab)
    sweep = write_random_sweep(tmp / "sweep", hook_dir, args.d, args.d_hidden)
    print(f"synthetic folder: {args.n_rows:,} rows x {args.d} in {time.perf_counter() - t:.1f} s")
    times, loads = [], []
    for r in range(args.repeats):
        before = load1()
        t = time.perf_counter()
        res = gather(TopActivationsConfig(sweep=str(sweep), n_tokens=args.n_rows, device="cpu",
                                          output=str(tmp / f"out{r}")))
        times.append(time.perf_counter() - t)
        loads.append((before, load1()))
        print(res.__str__().splitlines()[0])
    print(f"\n{'features':>9} {'tokens':>10} {'median s':>9} {'min s':>7} {'tokens/s':>10} {'json MB':>8} "
          f"{'load before/after':>18}  (cpus: {os.cpu_count()})")
    med = statistics.median(times)
    print(f"{args.d_hidden:>9,} {args.n_rows:>10,} {med:>9.1f} {min(times):>7.1f} {args.n_rows / med:>10,.0f} "
          f"{res.bytes / 1e6:>8.1f} {'; '.join(f'{a:.1f}/{b:.1f}' for a, b in loads):>18}")


def bench_site(args: argparse.Namespace, tmp: Path) -> None:
    """Write a synthetic N-feature features.json, then build its dashboard site streaming from disk (random
    decoder and W_U for the logit effects and neighbours); print size, time and peak memory."""
    import resource

    from training.dashboards import SiteExtras, build_site, logit_effects, nearest_features
    from training.feature_file import FeatureFile, write_features_json
    n, d, vocab = args.site_features, args.d, 8192
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    json_bytes = write_features_json(tmp / "features.json", *synthetic_features(n, seed=0))
    print(f"synthetic features.json for {n:,} features ({json_bytes / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s")
    decoder = torch.randn(n, d, generator=g)
    w_u = torch.randn(d, vocab, generator=g)
    strings = [f" tok{i}" for i in range(vocab)]
    before = load1()
    t = time.perf_counter()
    ti, tv, bi, bv = logit_effects(decoder / decoder.norm(dim=1, keepdim=True), w_u, 10)
    ids, cos = nearest_features(decoder, 8)
    extras = SiteExtras(logits=([[(strings[a], b) for a, b in zip(r, s)] for r, s in zip(ti.tolist(), tv.tolist())],
                                [[(strings[a], b) for a, b in zip(r, s)] for r, s in zip(bi.tolist(), bv.tolist())]),
                        neighbors=(ids.numpy(), cos.numpy()))
    index = build_site(tmp / "site", FeatureFile(tmp / "features.json"), extras)
    secs = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    site = index.parent
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    files = sum(1 for p in site.rglob("*") if p.is_file())
    print(f"\n{'site features':>13} {'files':>7} {'size MB':>8} {'KB/feature':>10} {'build s':>8} "
          f"{'peak RSS MB':>11} {'load before/after':>18}")
    print(f"{n:>13,} {files:>7,} {size / 1e6:>8.1f} {size / 1e3 / n:>10.1f} {secs:>8.1f} {rss:>11.0f} "
          f"{f'{before:.1f}/{load1():.1f}':>18}")


def main() -> None:
    """Run the benchmark(s) and print the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_rows", type=int, default=1_000_000, help="stored rows (0: skip the gathering benchmark)")
    p.add_argument("--d", type=int, default=128, help="activation width")
    p.add_argument("--d_hidden", type=int, default=4096, help="dictionary width")
    p.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary size")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--site_features", type=int, default=0, help="also build a dashboard site of this many features")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.n_rows > 0:
            bench_gather(args, Path(tmp))
        if args.site_features > 0:
            bench_site(args, Path(tmp))


if __name__ == "__main__":
    main()
