#!/usr/bin/env python
"""Stage 3: evaluate every dictionary of a sweep on held-out text; write report.json, report.md and plots into it.
With several --sweep folders, evaluate each, then compare their frontiers in --comparison_dir."""

from training.cli import run_cli
from training.comparison import CompareConfig, evaluate_and_compare


def main(cfg: CompareConfig) -> None:
    """Evaluate the sweep(s), printing each summary table and recommended member; then the comparison, if several."""
    comparison = evaluate_and_compare(cfg, show=print)
    if comparison is not None:
        print(comparison)


if __name__ == "__main__":
    run_cli(main, __doc__, CompareConfig)
