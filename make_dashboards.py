#!/usr/bin/env python
"""Static feature dashboards (index + one page per feature + prompt view) from a features.json; open index.html from disk."""

import sys

from training.cli import run_cli
from training.dashboards import DashboardConfig, make_dashboards


def merge_repeated(argv: list[str], flag: str) -> list[str]:
    """Let a list flag be repeated (`--prompt a --prompt b`): gather every occurrence's values into one."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + ([flag, *values] if values else [])


def main(cfg: DashboardConfig) -> None:
    """Build the site and print where it is."""
    print(make_dashboards(cfg))


if __name__ == "__main__":
    run_cli(main, __doc__, DashboardConfig, merge_repeated(sys.argv[1:], "--prompt"))
