#!/usr/bin/env python
"""Benchmark: tokens/s of generate_test_data.py against the bare forward pass of the same model on the same tokens.

Builds a randomly initialised model of Pythia-70M's shape (GPT-NeoX, 6 layers, d_model 512, 8 heads, d_mlp 2048,
vocab 50304) in a temporary folder, then, in one run and on the same token batches, times
  (a) the bare forward pass up to the last layer the hooks need (what any activation dump must pay), and
  (b) the full generation job: tokenise, forward, select and cast rows, shuffle, write and checksum chunks.
Prints the median tokens/s of each over --repeats runs, the ratio (b)/(a) in time, and the peak device memory
(host RSS off CUDA, labelled so). Every timing waits for the device in use (--device cuda:1 waits on cuda:1).

    python bench/generate.py [--n_tokens 131072] [--repeats 3] [--device cpu] [--dtype float32] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.device import peak_memory, reset_peak_memory, sync  # noqa: E402
from training.generate import GenerateConfig, generate, token_batches  # noqa: E402
from training.hooks import resolve_hooks, stop_at_layer  # noqa: E402
from training.models import REPO_ROOT, load_model  # noqa: E402


PYTHIA_70M = dict(d_model=512, n_layers=6, n_heads=8, vocab_size=50304)
"""Pythia-70M's shape (d_mlp = 4 d_model)."""
SMOKE = dict(d_model=64, n_layers=4, n_heads=4, vocab_size=4096)
"""A small shape for smoke runs on a CPU (the vocabulary of the embedded tokenizer)."""


def build_pythia70m_shape(folder: Path, d_model: int = 512, n_layers: int = 6, n_heads: int = 8,
                          vocab_size: int = 50304) -> None:
    """Save a random GPT-NeoX model of Pythia-70M's shape (or a smaller one), with the embedded model's tokenizer,
    to `folder`."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers,
                        num_attention_heads=n_heads, intermediate_size=4 * d_model, max_position_embeddings=2048,
                        rotary_pct=0.25, bos_token_id=0, eos_token_id=0)
    GPTNeoXForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(REPO_ROOT / "models" / "tiny-stdlib").save_pretrained(folder)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_tokens", type=int, default=131072, help="tokens per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each kind; the median is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="precision the model runs in")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    p.add_argument("--locations", nargs="+", default=["residual", "mlp"])
    p.add_argument("--smoke", action="store_true", help=f"a small model ({SMOKE}) instead of Pythia-70M's shape")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, time (a) and (b) on the same batches; the figures."""
    shape = SMOKE if args.smoke else PYTHIA_70M
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_pythia70m_shape(model_dir, **shape)
        cfg = GenerateConfig(model=str(model_dir), dataset_folder=str(Path(tmp) / "data"), layers=args.layers,
                             locations=args.locations, chunk_size=args.n_tokens // 8, n_chunks=8,
                             device=args.device, dtype=args.dtype, skip_special_tokens=False)
        model = load_model(cfg.model, args.device, args.dtype)
        device = next(model.parameters()).device
        hooks = resolve_hooks(list(model.hook_dict), model.cfg.n_layers, cfg.layers, cfg.locations, None)
        stop = stop_at_layer(hooks, model.cfg.n_layers)
        n_batches = -(-args.n_tokens // (cfg.batch_size * cfg.context_length))
        batches = list(itertools.islice(token_batches(cfg, model.tokenizer), n_batches))

        def bare_forward() -> float:
            """Seconds for the forward pass over every batch, stopping where generation stops."""
            sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                for tokens in batches:
                    model(tokens.to(device), return_type=None, stop_at_layer=stop)
            sync(device)
            return time.perf_counter() - t0

        def full_generation(i: int) -> float:
            """Seconds of the generation loop (model loading excluded) writing n_tokens rows."""
            run = GenerateConfig(**{**vars(cfg), "dataset_folder": str(Path(tmp) / f"data{i}")})
            summary = generate(run, argv=["bench"])
            assert summary.tokens == args.n_tokens, summary.tokens
            return summary.seconds

        bare_forward()  # warm-up
        reset_peak_memory(device)
        bare, full = [], []
        for i in range(args.repeats):
            bare.append(bare_forward())
            full.append(full_generation(i))
        memory = peak_memory(device)
    n_bare = len(batches) * cfg.batch_size * cfg.context_length
    bare_rate = n_bare / statistics.median(bare)
    full_rate = args.n_tokens / statistics.median(full)
    return {"device": str(device), "dtype": args.dtype, "shape": shape, "hooks": hooks, "stop_at_layer": stop,
            "n_tokens": args.n_tokens, "repeats": args.repeats, "bare_seconds": bare, "full_seconds": full,
            "bare_tokens_per_s": bare_rate, "full_tokens_per_s": full_rate,
            "overhead": bare_rate / full_rate - 1, "peak_memory": memory}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table (and write --json); the figures."""
    args = parse_args(argv)
    r = measure(args)
    what = "small smoke model" if args.smoke else "random Pythia-70M shape"
    print(f"\nmachine: {torch.get_num_threads()} torch threads, device {r['device']}, torch {torch.__version__}")
    print(f"model: {what} ({r['shape']['n_layers']} layers, d_model {r['shape']['d_model']}, {args.dtype}), "
          f"hooks {', '.join(r['hooks'])}, stop_at_layer {r['stop_at_layer']}")
    print(f"{'':34}{'tokens/s (median of ' + str(args.repeats) + ')':>28}")
    print(f"{'bare forward pass':34}{r['bare_tokens_per_s']:>28,.0f}")
    print(f"{'generate_test_data (full job)':34}{r['full_tokens_per_s']:>28,.0f}")
    print(f"{'overhead of generation':34}{r['overhead']:>28.1%}")
    print(f"memory: {r['peak_memory']['label']}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
