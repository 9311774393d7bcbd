#!/usr/bin/env python
"""Replicate the toy-model experiment of Sharkey, Braun, Millidge (2022): train a grid of L1 sparse autoencoders
(L1 values x dictionary sizes) on synthetic data with known features and check the report's findings.
The default grid is the report's size (a GPU job); --quick runs a small grid on a CPU in a few minutes."""

from training.cli import run_cli
from training.replication import ReplicationConfig, run_replication


def main(cfg: ReplicationConfig) -> None:
    """Train and score the grid, write its folder, print the MMCS table and the findings."""
    print(run_replication(cfg))


if __name__ == "__main__":
    run_cli(main, __doc__, ReplicationConfig)
