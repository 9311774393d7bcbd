"""The README documents every flag of every tool, as the config dataclasses define them."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from training.cli import flags_markdown

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
CONFIGS = [("training.generate", "GenerateConfig"), ("training.sweep_config", "SweepConfig"),
           ("training.comparison", "CompareConfig"), ("training.tiny_lm", "TinyLMConfig"),
           ("training.replication", "ReplicationConfig"), ("training.steering", "SteerConfig"),
           ("training.top_activations", "TopActivationsConfig"), ("training.dashboards", "DashboardConfig"),
           ("training.activation_import", "ImportConfig"), ("training.saelens", "ExportConfig"),
           ("training.circuits", "CircuitConfig"), ("training.autointerp.run", "ExplainConfig"),
           ("training.autointerp.plots", "PlotInterpConfig")]


@pytest.mark.parametrize("module, name", CONFIGS)
def test_readme_has_the_flag_table(module, name):
    cls = getattr(importlib.import_module(module), name)
    table = flags_markdown(cls)
    assert table in README, f"README's flag table for {name} is out of date; regenerate it with " \
                            f"training.cli.flags_markdown({name})"


def test_flags_markdown_lists_every_field():
    from training.sweep import SweepConfig
    table = flags_markdown(SweepConfig)
    assert "| `--l1_value_min` | `-2.0` | log10 of the smallest L1 penalty. |" in table
    assert "| `--k_values` | `16 32 64 128` |" in table


def test_every_relative_link_of_the_readme_is_a_tracked_file():
    """Links and images into the checkout resolve on a fresh clone (not to an ignored or missing file)."""
    import re
    import subprocess
    root = Path(__file__).resolve().parent.parent
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", README)
               if not re.match(r"[a-z]+:", t) and not t.startswith("#")}
    assert targets, "the README links to no file of the checkout (did the pattern break?)"
    tracked = set(subprocess.run(["git", "ls-files", *sorted(targets)], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.split())
    assert targets <= tracked, f"README links to files that are not tracked: {sorted(targets - tracked)}"
