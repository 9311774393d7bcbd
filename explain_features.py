#!/usr/bin/env python
"""Explain every feature of a features.json with a chat model (OpenAI-compatible endpoint; key from the
environment or .env), rate each explanation's clearness, optionally score it by detection and fuzzing
-> interp.jsonl (resumable)."""

from training.autointerp.run import ExplainConfig, explain_features
from training.cli import run_cli


def main(cfg: ExplainConfig) -> None:
    """Run and print the summary (tokens used, cost when known)."""
    print(explain_features(cfg))


if __name__ == "__main__":
    run_cli(main, __doc__, ExplainConfig, on_interrupt="interrupted: rerun the same command to resume")
