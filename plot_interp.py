#!/usr/bin/env python
"""Plot interp.jsonl runs of explain_features.py: clearness rating counts and detection accuracies, grouped
bars for several runs (e.g. features vs neurons) -> PNG."""

from training.autointerp.plots import PlotInterpConfig, plot_interp
from training.cli import run_cli


def main(cfg: PlotInterpConfig) -> None:
    """Draw the figure and print where it is."""
    path, counts, _ = plot_interp(cfg)
    for label, c, n in zip(counts.labels, counts.clearness, counts.n_scored):
        print(f"{label}: {n:,} features rated; clearness 1..5 = {' '.join(map(str, c.tolist()))}")
    print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main, __doc__, PlotInterpConfig)
