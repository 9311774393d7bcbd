"""SAELens' side of the interop check (run with the venv that has sae-lens; see `make interop`).

    python tests/interop/check_saelens.py check-export DIR  load DIR/export/*/* with SAE.load_from_disk and compare
                                                           SAELens' encode/decode with ours (DIR/ours.safetensors)
    python tests/interop/check_saelens.py check-metrics DIR compare SAELens' eval metrics of those folders on a toy
                                                           model (DIR/toy.safetensors) with ours (DIR/ours_metrics.json)
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


class TokenStore:
    """Stands in for SAELens' ActivationsStore in its evals: hands out the toy model's tokens."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        return self.tokens[:n]


METRIC_RTOL, METRIC_ATOL = 1e-4, 1e-5
"""Tolerance of the metric comparison: SAELens reduces in float32, we in float64."""


def check_metrics(out: Path) -> float:
    """Worst difference, as a fraction of the tolerance, between SAELens' eval metrics (`get_sparsity_and_variance_
    metrics`, `get_downstream_reconstruction_metrics`, one batch of the toy model's tokens) of our exported folders and
    ours (DIR/ours_metrics.json); above 1 fails."""
    from sae_lens import SAE
    from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from toy_model import ToyLM
    ours = json.loads((out / "ours_metrics.json").read_text())
    toy = load_file(str(out / "toy.safetensors"))
    tokens = toy["tokens"]
    worst = 0.0
    for name, mine in ours.items():
        sae = SAE.load_from_disk(str(out / "export" / name))
        model, store, n = ToyLM(toy, sae.cfg.metadata.hook_name), TokenStore(tokens), len(tokens)
        theirs, features = get_sparsity_and_variance_metrics(
            sae, model, store, ActivationScaler(), n_batches=1, compute_l2_norms=True, compute_sparsity_metrics=True,
            compute_variance_metrics=True, compute_featurewise_density_statistics=True, eval_batch_size_prompts=n,
            model_kwargs={})
        theirs.update(get_downstream_reconstruction_metrics(
            sae, model, store, ActivationScaler(), compute_kl=True, compute_ce_loss=True, n_batches=1,
            eval_batch_size_prompts=n))
        theirs["feature_density"] = features["feature_density"]
        ratios = {}
        for metric, value in mine.items():
            a, b = torch.tensor(value, dtype=torch.float64), torch.tensor(theirs[metric], dtype=torch.float64)
            ratios[metric] = float(((a - b).abs() / (METRIC_ATOL + METRIC_RTOL * b.abs())).max())
        metric = max(ratios, key=ratios.get)
        worst = max(worst, ratios[metric])
        print(f"ours {name:>20} vs SAELens evals: {len(ratios)} metrics, worst {metric} at {ratios[metric]:.2e} of "
              f"the tolerance (ours {mine[metric] if metric != 'feature_density' else '[...]'}, SAELens "
              f"{theirs[metric] if metric != 'feature_density' else '[...]'})")
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
    elif mode == "check-metrics":
        worst = check_metrics(folder)
        print(json.dumps({"direction": "our metrics vs SAELens evals", "worst_fraction_of_tolerance": worst}))
        sys.exit(0 if worst <= 1 else 1)
    elif mode == "make-native":
        make_native(folder)
    else:
        sys.exit(f"unknown mode {mode!r}")
