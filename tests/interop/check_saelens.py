"""SAELens' side of the interop check (run with the venv that has sae-lens; see `make interop`).

    python tests/interop/check_saelens.py check-export DIR  load DIR/export/*/* with SAE.load_from_disk and compare
                                                           SAELens' encode/decode with ours (DIR/ours.safetensors)
    python tests/interop/check_saelens.py make-native DIR   save SAEs of every inference architecture SAELens has
                                                           (standard, topk, jumprelu, gated; apply_b_dec_to_input
                                                           both ways) to DIR/native with their outputs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TOLERANCE = 1e-5


def check_export(out: Path) -> float:
    """Max abs difference between SAELens' encode/decode of our exported folders and ours."""
    from sae_lens import SAE
    ref = load_file(str(out / "ours.safetensors"))
    x, worst = ref["x"], 0.0
    for folder in sorted(p for p in (out / "export").glob("*/*") if p.is_dir()):
        name = f"{folder.parent.name}/{folder.name}"
        sae = SAE.load_from_disk(str(folder))
        with torch.no_grad():
            codes = sae.encode(x)
            x_hat = sae.decode(codes)
        d_codes = float((codes - ref[f"{name}/codes"]).abs().max())
        d_dec = float((x_hat - ref[f"{name}/x_hat"]).abs().max())
        worst = max(worst, d_codes, d_dec)
        print(f"ours {name:>20} -> SAELens {type(sae).__name__:<11} (hook {sae.cfg.metadata.hook_name}): "
              f"max |encode diff| {d_codes:.2e}, max |decode diff| {d_dec:.2e}")
    return worst


def make_native(out: Path) -> None:
    """Random SAEs of SAELens' inference architectures saved by SAELens itself, and their outputs."""
    from sae_lens import (GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig,
                          TopKSAE, TopKSAEConfig)
    from sae_lens.saes.sae import SAEMetadata
    torch.manual_seed(0)
    d_in, d_sae = 16, 48
    x = 2 * torch.randn(512, d_in)
    record = {"x": x}
    kinds = {
        "standard": (StandardSAE, StandardSAEConfig, {}),
        "standard_no_b_dec_in": (StandardSAE, StandardSAEConfig, {"apply_b_dec_to_input": False}),
        "topk": (TopKSAE, TopKSAEConfig, {"k": 6}),
        "topk_rescaled": (TopKSAE, TopKSAEConfig, {"k": 6, "rescale_acts_by_decoder_norm": True}),
        "jumprelu_no_b_dec_in": (JumpReLUSAE, JumpReLUSAEConfig, {"apply_b_dec_to_input": False}),
        "gated": (GatedSAE, GatedSAEConfig, {}),
        "gated_no_b_dec_in": (GatedSAE, GatedSAEConfig, {"apply_b_dec_to_input": False}),
    }
    for name, (cls, cfg_cls, extra) in kinds.items():
        meta = SAEMetadata(model_name="tiny-model", hook_name="blocks.1.hook_resid_post", context_size=32)
        sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=meta, **extra))
        with torch.no_grad():
            for pname, p in sae.named_parameters():
                p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else d_in ** -0.5))
            if name == "topk":  # rows of norm 1: the only TopK that ranks by pre alone we can reproduce
                sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
            if "jumprelu" in name:
                sae.threshold.copy_(torch.rand(d_sae) * 0.5)
            codes = sae.encode(x)
            record[f"{name}/codes"] = codes
            record[f"{name}/x_hat"] = sae.decode(codes)
        sae.save_model(out / "native" / name)
    save_file({k: v.contiguous() for k, v in record.items()}, str(out / "native.safetensors"))
    print(f"SAELens saved {len(kinds)} dictionaries to {out / 'native'}")


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    if mode == "check-export":
        worst = check_export(folder)
        print(json.dumps({"direction": "ours -> SAELens", "max_abs_diff": worst}))
        sys.exit(0 if worst <= TOLERANCE else 1)
    elif mode == "make-native":
        make_native(folder)
    else:
        sys.exit(f"unknown mode {mode!r}")
