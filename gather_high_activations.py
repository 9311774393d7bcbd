#!/usr/bin/env python
"""Top-activating examples (with context) of every feature of a dictionary, or of the model's neurons -> features.json."""

from training.cli import run_cli
from training.top_activations import TopActivationsConfig, gather


def main(cfg: TopActivationsConfig) -> None:
    """Gather, write features.json and print a summary."""
    print(gather(cfg))


if __name__ == "__main__":
    run_cli(main, __doc__, TopActivationsConfig)
