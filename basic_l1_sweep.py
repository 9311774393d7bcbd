#!/usr/bin/env python
"""Stage 2: train an ensemble of sparse autoencoders, one per L1 penalty (or k), on activation chunks."""

from training.cli import run_cli
from training.sweep import SweepConfig, main_sweep


def main(cfg: SweepConfig) -> None:
    """Train (or resume) the sweep and print its summary table (or, with --dry_run, its memory estimate)."""
    text = main_sweep(cfg)
    if text:                 # under torchrun only rank 0 prints the summary
        print(text)


if __name__ == "__main__":
    run_cli(main, __doc__, SweepConfig,
            on_interrupt="interrupted: the last checkpoint is on disk; add --resume to the same command to continue")
