"""Feature activations as plain text: every token followed by a block character for its activation.

  level      = ceil(8 * a / max) clipped to 1..8 when a > 0, 0 (no block) when a is 0, negative or unknown
  block      = U+2581..U+2588 (BLOCKS[level - 1]), lowest first
  tokens     = newlines shown as U+21B5, tabs as U+21E5, other control characters as their Control
               Pictures symbol (U+2400 + code), carriage returns as nothing

One place for this convention: features.json's text, the dashboards' shading, steering's bars and the
autointerp prompts all use it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

BLOCKS = "".join(chr(0x2581 + i) for i in range(8))
"""The eight block characters U+2581..U+2588, lowest first."""


def block_level(act: float | None, max_act: float) -> int:
    """0 (no block) for act <= 0, unknown or max <= 0, else ceil(8 * act / max) clipped to 1..8."""
    if act is None or not act > 0 or not max_act > 0:
        return 0
    return int(min(8, max(1, math.ceil(8 * act / max_act))))


_VISIBLE = {**{c: chr(0x2400 + c) for c in range(32)}, 0x7F: "\u2421", ord("\n"): "\u21b5", ord("\t"): "\u21e5",
            ord("\r"): None, 0x85: "\u21b5", 0x2028: "\u21b5", 0x2029: "\u21b5"}


def visible_token(tok: str) -> str:
    """A token as shown on one line: newline -> U+21B5, tab -> U+21E5, carriage return dropped, other
    control characters -> their Control Pictures symbol (U+2400 + code)."""
    return tok.translate(_VISIBLE)


def render_example(tokens: Sequence[str], acts: Sequence[float | None], max_act: float) -> str:
    """One line: each token followed by its block character (none when its activation is 0 or unknown)."""
    parts = []
    for tok, a in zip(tokens, acts):
        level = block_level(a, max_act)
        parts.append(visible_token(tok) + (BLOCKS[level - 1] if level else ""))
    return "".join(parts)


def render_feature_text(feat: dict[str, Any]) -> str:
    """The plain-text rendering of one feature entry of features.json (see the module docstring)."""
    lines = [f"feature {feat['id']}: density {feat['density']:.4g}, max {feat['max']:.4g}"]
    for ex in feat["top"]:
        lines.append("  " + render_example(ex["tokens"], ex["acts"], feat["max"]))
    for group in feat["quantiles"]:
        lo, hi = group["quantile"]
        lines.append(f" quantile {lo:.0%}-{hi:.0%} (activation {group['range'][0]:.3g}-{group['range'][1]:.3g}):")
        for ex in group["examples"]:
            lines.append("  " + render_example(ex["tokens"], ex["acts"], feat["max"]))
    return "\n".join(lines)
