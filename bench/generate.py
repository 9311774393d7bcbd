#!/usr/bin/env python
"""Benchmark: tokens/s of generate_test_data.py against the bare forward pass of the same model on the same tokens.

Builds a randomly initialised model of Pythia-70M's shape (GPT-NeoX, 6 layers, d_model 512, 8 heads, d_mlp 2048,
vocab 50304) in a temporary folder, then, in one run and on the same token batches, times
  (a) the bare forward pass up to the last layer the hooks need (what any activation dump must pay), and
  (b) the full generation job: tokenise, forward, select and cast rows, shuffle, write and checksum chunks.
Prints the median tokens/s of each over --repeats runs and the ratio (b)/(a) in time.

    python bench/generate.py [--n_tokens 131072] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.generate import GenerateConfig, generate, token_batches  # noqa: E402
from training.hooks import resolve_hooks, stop_at_layer  # noqa: E402
from training.models import REPO_ROOT, load_model  # noqa: E402


def build_pythia70m_shape(folder: Path) -> None:
    """Save a random GPT-NeoX model of Pythia-70M's shape, with the embedded model's tokenizer, to `folder`."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                        intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25,
                        bos_token_id=0, eos_token_id=0)
    GPTNeoXForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(REPO_ROOT / "models" / "tiny-stdlib").save_pretrained(folder)


def main() -> None:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_tokens", type=int, default=131072, help="tokens per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each kind; the median is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    p.add_argument("--locations", nargs="+", default=["residual", "mlp"])
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_pythia70m_shape(model_dir)
        cfg = GenerateConfig(model=str(model_dir), dataset_folder=str(Path(tmp) / "data"), layers=args.layers,
                             locations=args.locations, chunk_size=args.n_tokens // 8, n_chunks=8,
                             device=args.device, skip_special_tokens=False)
        model = load_model(cfg.model, args.device)
        hooks = resolve_hooks(list(model.hook_dict), model.cfg.n_layers, cfg.layers, cfg.locations, None)
        stop = stop_at_layer(hooks, model.cfg.n_layers)
        n_batches = -(-args.n_tokens // (cfg.batch_size * cfg.context_length))
        batches = list(itertools.islice(token_batches(cfg, model.tokenizer), n_batches))

        def bare_forward() -> float:
            """Seconds for the forward pass over every batch, stopping where generation stops."""
            t0 = time.perf_counter()
            with torch.inference_mode():
                for tokens in batches:
                    model(tokens.to(args.device), return_type=None, stop_at_layer=stop)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        def full_generation(i: int) -> float:
            """Seconds of the generation loop (model loading excluded) writing n_tokens rows."""
            run = GenerateConfig(**{**vars(cfg), "dataset_folder": str(Path(tmp) / f"data{i}")})
            summary = generate(run, argv=["bench"])
            assert summary.tokens == args.n_tokens, summary.tokens
            return summary.seconds

        bare_forward()  # warm-up
        bare, full = [], []
        for i in range(args.repeats):
            bare.append(bare_forward())
            full.append(full_generation(i))
        n_bare = len(batches) * cfg.batch_size * cfg.context_length
        bare_rate = n_bare / statistics.median(bare)
        full_rate = args.n_tokens / statistics.median(full)
        print(f"\nmachine: {torch.get_num_threads()} torch threads, device {args.device}, torch {torch.__version__}")
        print(f"model: random Pythia-70M shape (6 layers, d_model 512), hooks {', '.join(hooks)}, stop_at_layer {stop}")
        print(f"{'':34}{'tokens/s (median of ' + str(args.repeats) + ')':>28}")
        print(f"{'bare forward pass':34}{bare_rate:>28,.0f}")
        print(f"{'generate_test_data (full job)':34}{full_rate:>28,.0f}")
        print(f"{'overhead of generation':34}{bare_rate / full_rate - 1:>28.1%}")


if __name__ == "__main__":
    main()
