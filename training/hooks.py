"""Map (layer, location) pairs to TransformerLens hook names, validate them, and shape their activations."""

from __future__ import annotations

import re
from typing import Sequence

import torch

from training.cli import UserError

LOCATIONS = {
    "residual": "blocks.{layer}.hook_resid_post",
    "mlp": "blocks.{layer}.mlp.hook_post",
    "mlpout": "blocks.{layer}.hook_mlp_out",
    "attn_concat": "blocks.{layer}.attn.hook_z",
    "attn_out": "blocks.{layer}.hook_attn_out",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def hook_layer(name: str) -> int | None:
    """The block index of a `blocks.L.*` hook name, None for hooks outside the blocks."""
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


def describe_valid_hooks(valid: Sequence[str]) -> str:
    """Compact listing of hook names: block hooks as `blocks.{0..N-1}.suffix` patterns."""
    suffixes = sorted({m.group(2) for n in valid if (m := _BLOCK.match(n))})
    layers = sorted({int(m.group(1)) for n in valid if (m := _BLOCK.match(n))})
    others = sorted(n for n in valid if not _BLOCK.match(n))
    span = f"{{{layers[0]}..{layers[-1]}}}" if layers else "{}"
    return ", ".join(others + [f"blocks.{span}.{s}" for s in suffixes])


def resolve_hooks(valid: Sequence[str], n_layers: int, layers: Sequence[int],
                  locations: Sequence[str], raw_hooks: Sequence[str] | None) -> list[str]:
    """Hook names for `layers` x `locations` plus raw names, checked against the model's `valid` hooks."""
    names: list[str] = []
    for loc in locations:
        if loc not in LOCATIONS:
            raise UserError(f"unknown location {loc!r}: choose from {', '.join(LOCATIONS)}")
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise UserError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")
        names += [LOCATIONS[loc].format(layer=layer) for loc in locations]
    names += list(raw_hooks or [])
    valid_set = set(valid)
    for name in names:
        if name not in valid_set:
            raise UserError(f"unknown hook {name!r}; valid hooks: {describe_valid_hooks(valid)}")
    return list(dict.fromkeys(names))


def stop_at_layer(names: Sequence[str], n_layers: int) -> int | None:
    """The first block that no hook in `names` needs, or None if the whole model must run."""
    layers = [hook_layer(n) for n in names]
    if any(layer is None for layer in layers):
        return None
    last = max(layers)  # type: ignore[type-var]
    return last + 1 if last + 1 < n_layers else None


def flatten_heads(acts: torch.Tensor) -> torch.Tensor:
    """[batch, seq, *rest] -> [batch, seq, prod(rest)] (attn.hook_z is per head: concatenate heads)."""
    return acts.reshape(acts.shape[0], acts.shape[1], -1)
