"""Time the two ways find_circuit.py measures edges on the embedded model (dictionaries at layers 0 and 1):
attribution (one forward, one backward per target) against ablating every live feature (batched forwards).

    python bench/circuits.py [--sweeps DIR DIR] [--repeats 5] [--threads 1]

Without --sweeps it trains two small one-member L1 sweeps of the embedded model in a temporary folder first.
Prints a table of medians (seconds) per prompt, the number of edges, and the machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.circuits import (Site, ablation_effects, attribution_scores, clean_run, live_sources,  # noqa: E402
                               make_sites, sweep_dictionaries)
from training.models import load_model  # noqa: E402
from training.steering import prompt_token_ids  # noqa: E402

PROMPTS = ["def read_file(self, path):", "import os\nimport sys\n", "The following example shows how to"]
MODEL = "models/tiny-stdlib"


def train_sweeps(root: Path) -> list[str]:
    """Two one-member L1 sweeps (layers 0 and 1) of the embedded model, as the tests train them."""
    from training.generate import GenerateConfig, generate
    from training.sweep import SweepConfig, run_sweep
    generate(GenerateConfig(model=MODEL, dataset="python-docs", dataset_folder=str(root / "chunks"), layers=[0, 1],
                            n_chunks=2, chunk_size=2000, context_length=64, device="cpu"), argv=["bench"])
    for layer in (0, 1):
        run_sweep(SweepConfig(dataset_dir=str(root / "chunks" / f"blocks.{layer}.hook_resid_post"),
                              output_dir=str(root / f"l{layer}"), ratio=2, l1_values=[0.3], batch_size=500,
                              n_repetitions=2, adam_lr=3e-3, device="cpu", center_init="mean", log_every=1000))
    return [str(root / "l0"), str(root / "l1")]


def median_time(fn, repeats: int) -> tuple[float, object]:
    """(median seconds over `repeats` calls, the last result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweeps", nargs="+")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sweeps = args.sweeps or train_sweeps(Path(tmp))
        model = load_model(MODEL, "cpu")
        sites: list[Site] = make_sites(sweep_dictionaries(sweeps), model)
        print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{args.threads} thread(s), cpu; medians of {args.repeats}")
        print(f"{'prompt':<38} {'live':>9} {'edges':>6} {'attribution s':>14} {'ablation s':>11} {'ratio':>6}")
        for prompt in PROMPTS:
            tokens = torch.tensor([prompt_token_ids(model, prompt)])
            clean = clean_run(model, sites, tokens, False, 5)
            t_attr, attr = median_time(lambda: attribution_scores(model, sites, tokens, clean, False), args.repeats)
            t_abl, _ = median_time(lambda: [ablation_effects(model, sites, tokens, clean, k,
                                                             live_sources(clean, sites[k]), False)
                                            for k in range(len(sites))], args.repeats)
            live = "/".join(str(len(live_sources(clean, s))) for s in sites)
            print(f"{prompt!r:<38} {live:>9} {len(attr):>6} {t_attr:>14.3f} {t_abl:>11.3f} {t_abl / t_attr:>6.1f}")


if __name__ == "__main__":
    main()
