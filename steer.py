#!/usr/bin/env python
"""Steer a model with dictionary features: add strength x a feature's unit decoder direction at the
dictionary's hook while generating, print unsteered and steered continuations side by side, and show
the feature's activation on the steered text (read by the unmodified model)."""

from training.cli import run_cli
from training.steering import SteerConfig, run_steer


def main(cfg: SteerConfig) -> None:
    """Run the steering comparison and print its report."""
    run_steer(cfg)


if __name__ == "__main__":
    run_cli(main, __doc__, SteerConfig)
