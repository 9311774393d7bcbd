#!/usr/bin/env python
"""Export sweep members as SAELens folders (sae_weights.safetensors + cfg.json), loadable with SAE.load_from_disk."""

from training.cli import run_cli
from training.saelens import ExportConfig, main_export

if __name__ == "__main__":
    run_cli(main_export, __doc__, ExportConfig)
