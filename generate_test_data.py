#!/usr/bin/env python
"""Stage 1: run a TransformerLens model over a text dataset and write activation chunks to disk."""

from training.cli import run_cli
from training.distributed import env_world
from training.generate import GenerateConfig, generate


def main(cfg: GenerateConfig) -> None:
    """Generate (or resume) the dataset folder and print what was written."""
    summary = generate(cfg)
    if env_world()[0] == 0:          # under torchrun only rank 0 prints the summary
        print(summary)


if __name__ == "__main__":
    run_cli(main, __doc__, GenerateConfig,
            on_interrupt="interrupted: complete chunks are on disk; run the same command again to resume")
