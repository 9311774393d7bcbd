"""Hook naming: locations map to TransformerLens names, bad names list the valid ones, early stopping."""

from __future__ import annotations

import pytest
import torch

from training.cli import UserError
from training.hooks import describe_valid_hooks, flatten_heads, hook_layer, resolve_hooks, stop_at_layer

VALID = [f"blocks.{i}.{s}" for i in range(3) for s in
         ["hook_resid_post", "mlp.hook_post", "hook_mlp_out", "attn.hook_z", "hook_attn_out"]] + ["hook_embed"]


def test_locations_map_to_transformerlens_names():
    names = resolve_hooks(VALID, 3, [1], ["residual", "mlp", "mlpout", "attn_concat", "attn_out"], ["hook_embed"])
    assert names == ["blocks.1.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out",
                     "blocks.1.attn.hook_z", "blocks.1.hook_attn_out", "hook_embed"]


def test_duplicates_are_dropped():
    assert resolve_hooks(VALID, 3, [0], ["residual"], ["blocks.0.hook_resid_post"]) == ["blocks.0.hook_resid_post"]


def test_errors_list_valid_names():
    with pytest.raises(UserError, match=r"layers 0\.\.2"):
        resolve_hooks(VALID, 3, [3], ["residual"], None)
    with pytest.raises(UserError, match=r"valid hooks: hook_embed, blocks\.\{0\.\.2\}\.attn\.hook_z"):
        resolve_hooks(VALID, 3, [], [], ["blocks.0.nope"])
    with pytest.raises(UserError, match="choose from residual, mlp"):
        resolve_hooks(VALID, 3, [0], ["bogus"], None)


def test_stop_at_layer():
    assert hook_layer("blocks.12.hook_resid_post") == 12 and hook_layer("hook_embed") is None
    assert stop_at_layer(["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"], 6) == 2
    assert stop_at_layer(["blocks.5.hook_resid_post"], 6) is None
    assert stop_at_layer(["ln_final.hook_normalized", "blocks.0.hook_resid_post"], 6) is None
    assert "blocks.{0..2}.hook_resid_post" in describe_valid_hooks(VALID)


def test_flatten_heads():
    z = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    flat = flatten_heads(z)
    assert flat.shape == (2, 3, 20) and torch.equal(flat[1, 2, 5:10], z[1, 2, 1])
