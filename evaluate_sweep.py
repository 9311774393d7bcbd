#!/usr/bin/env python
"""Stage 3: evaluate every dictionary of a sweep on held-out text; write report.json, report.md and plots into it."""

from training.cli import run_cli
from training.evaluate import EvaluateConfig, evaluate_sweep


def main(cfg: EvaluateConfig) -> None:
    """Evaluate the sweep and print the summary table and the recommended member."""
    print(evaluate_sweep(cfg))


if __name__ == "__main__":
    run_cli(main, __doc__, EvaluateConfig)
