#!/usr/bin/env python
"""Bring your own activations: write [rows, width] arrays from .npy/.safetensors files as a dataset folder."""

from training.activation_import import ImportConfig, run_import
from training.cli import run_cli


def main(cfg: ImportConfig) -> None:
    """Import the arrays and print what was written."""
    print(run_import(cfg))


if __name__ == "__main__":
    run_cli(main, __doc__, ImportConfig, on_interrupt="interrupted: nothing was written (--out is as it was)")
