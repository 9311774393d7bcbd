"""The SAELens (>= 6) folder format, both ways: one dictionary per folder, loaded by SAELens' `SAE.load_from_disk`.

    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
                              (+ threshold [d_sae] for jumprelu; gated: b_gate, b_mag, r_mag instead of b_enc)
    cfg.json                  architecture, d_in, d_sae, dtype, apply_b_dec_to_input, normalize_activations,
                              reshape_activations (+ k, rescale_acts_by_decoder_norm for topk) and a metadata block
                              (model_name, hook_name, context_size, dataset_path, prepend_bos, sae_lens_version ...)
    sparsity.safetensors      "sparsity" [d_sae]: log10(feature density + 1e-10), when known

SAELens computes encode(x) = act((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc), decode(f) = f @ W_dec + b_dec;
this toolkit's dictionaries compute act((x - center) @ encoder.T + encoder_bias) and codes @ decoder + center, so
W_enc = encoder.T, b_enc = encoder_bias, W_dec = decoder, b_dec = center with apply_b_dec_to_input = true, and the
saved weights act on raw activations (normalize_activations "none"). A folder with apply_b_dec_to_input = false is
read with encoder_bias = b_enc + b_dec @ W_enc, the same function.

Per architecture (declared in its own module, training/architectures/<name>.py):
    to_saelens(params, member) -> (tensors, cfg fields): params are one member's unit-norm params ({center, encoder,
                                  encoder_bias, decoder, ...}), member its sweep fields ({"k": 32} ...); cfg fields
                                  at least {"architecture": SAELens name} plus what that SAELens config needs
    from_saelens(tensors, cfg) -> module, for the SAELens names it lists in `saelens_names`: tensors with b_dec
                                  already folded (see `_fold_b_dec`), cfg["architecture"] the SAELens name
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import training
from training.chunks import save_tensors
from training.cli import UserError
from training.dictionary import unit_norm_params

SAE_WEIGHTS, SAE_CFG, SPARSITY = "sae_weights.safetensors", "cfg.json", "sparsity.safetensors"
SAELENS_VERSION = "6.0.0"
"""The SAELens version written into cfg.json's metadata: the format is SAELens 6's (older readers would convert it)."""
UNIT_NORM_TOLERANCE = 1e-3
"""A TopK folder that ranks latents by pre-activation needs decoder rows of norm 1 within this (ours rank by
pre-activation times row norm)."""
LOG_DENSITY_FLOOR = 1e-10
"""Added to densities before log10 in sparsity.safetensors, as SAELens does (a dead feature: -10)."""

Params = dict[str, Tensor]


# ------------------------------------------------------------------------------------- per architecture
# Each architecture declares its own mapping (training/architectures/<name>.py: `to_saelens`, `from_saelens`,
# `saelens_names`); this module holds the folder format and the shared conversions.

def saelens_params(t: Params) -> Params:
    """SAELens tensors (b_dec folded) in our names: center, encoder [d_sae, d_in], encoder_bias, decoder."""
    return {"center": t["b_dec"], "encoder": t["W_enc"].T.contiguous(), "encoder_bias": t["b_enc"],
            "decoder": t["W_dec"]}


def plain_to_saelens(p: Params) -> Params:
    """Our center, encoder, encoder_bias, decoder (unit rows) as SAELens' W_enc, b_enc, W_dec, b_dec."""
    return {"W_enc": p.get("encoder", p["decoder"]).T, "b_enc": p["encoder_bias"], "W_dec": p["decoder"],
            "b_dec": p["center"]}


def saelens_module(name: str, tensors: Params, cfg: dict[str, Any], where: str) -> torch.nn.Module:
    """Our module for SAELens architecture `name` from its tensors (b_dec folded) and cfg; a one-line UserError
    naming `where` when no registered architecture reads it."""
    from training.architectures import by_saelens_name, saelens_names
    arch = by_saelens_name(name)
    if arch is None:
        raise UserError(f"{where}: SAELens architecture {name!r} is not supported (supported: "
                        f"{', '.join(saelens_names())})")
    return arch.from_saelens(tensors, {**cfg, "architecture": name})


def check_unit_rows(decoder: Tensor, why: str) -> None:
    """A one-line UserError unless every decoder row has norm 1 within UNIT_NORM_TOLERANCE (or 0)."""
    norms = decoder.float().norm(dim=-1)
    bad = ~(((norms - 1).abs() <= UNIT_NORM_TOLERANCE) | (norms == 0))
    if bool(bad.any()):
        raise UserError(f"decoder rows of norms up to {float(norms.max()):.4g} but {why}, which this toolkit's TopK "
                        "(ranking by pre-activation times row norm) cannot reproduce: not supported")


def _fold_b_dec(t: Params, cfg: dict[str, Any]) -> Params:
    """Tensors with apply_b_dec_to_input = false turned into the = true form (same function): every encoder bias
    gains b_dec @ W_enc (gated: the magnitude bias b_dec @ (W_enc * exp(r_mag)))."""
    if cfg.get("apply_b_dec_to_input", True):
        return t
    t = dict(t)
    shift = t["b_dec"] @ t["W_enc"]                                                    # [d_sae]
    for name in ("b_enc", "b_gate"):
        if name in t:
            t[name] = t[name] + shift
    if "b_mag" in t:
        t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()
    return t


# ------------------------------------------------------------------------------------- writing

def saelens_cfg(tensors: Params, fields: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """cfg.json of one exported dictionary: SAELens 6's fields and a metadata block from `info` (model_name,
    hook_name, context_size, dataset_path, prepend_bos, exclude_special_tokens, plus ours)."""
    d_sae, d_in = tensors["W_dec"].shape
    hook = info.get("hook_name") or ""
    return {"d_in": int(d_in), "d_sae": int(d_sae), "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none", **fields,
            "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
                         "model_class_name": "HookedTransformer", "hook_head_index": None,
                         "model_from_pretrained_kwargs": {}, "seqpos_slice": [None],
                         **info, "exported_by": f"sae-toolkit {training.__version__}"}}


def write_saelens(folder: str | Path, module: torch.nn.Module, info: dict[str, Any], member: dict[str, Any],
                  log_density: Tensor | None = None) -> Path:
    """Write `module` (architecture `module.architecture`) as a SAELens folder, replacing `folder` atomically
    (built beside it, then renamed); `info` goes into cfg.json's metadata, `member` are its sweep fields."""
    from training.architectures import get as get_architecture, names as architecture_names
    name = getattr(module, "architecture", None)
    arch = get_architecture(name) if name in architecture_names() else None
    if arch is None or arch.to_saelens is None:
        able = [n for n in architecture_names() if get_architecture(n).to_saelens is not None]
        raise UserError(f"no SAELens export for architecture {name!r} (exportable: {', '.join(able)})")
    params = unit_norm_params({n: p.detach().float().cpu() for n, p in module.named_parameters()}, arch.code_biases)
    tensors, fields = arch.to_saelens(params, member)
    tensors = {n: t.contiguous() for n, t in tensors.items()}
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / SAE_WEIGHTS, tensors)
    if log_density is not None:
        save_tensors(tmp / SPARSITY, {"sparsity": log_density.float().contiguous()})
    with open(tmp / SAE_CFG, "w") as f:
        json.dump(saelens_cfg(tensors, fields, info), f, indent=1)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def log10_density(density: Tensor) -> Tensor:
    """SAELens' log feature sparsity: log10(density + 1e-10), [d_sae]."""
    return (density.double() + LOG_DENSITY_FLOOR).log10().float()


# ------------------------------------------------------------------------------------- reading

def is_saelens_folder(path: Path) -> bool:
    """Whether `path` holds a SAELens dictionary."""
    return (path / SAE_WEIGHTS).exists() and (path / SAE_CFG).exists()


def read_saelens(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """(our module, cfg.json) of a SAELens folder; what this toolkit cannot reproduce exactly is a UserError."""
    from training.sweep_files import load_tensors
    path = Path(path)
    try:
        cfg = json.loads((path / SAE_CFG).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / SAE_CFG} is not readable JSON ({e})") from None
    arch = cfg.get("architecture", "standard")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in", False, None):
        raise UserError(f"{path}: normalize_activations {norm!r} rescales activations at run time, which this "
                        "toolkit does not do: not supported")
    meta = cfg.get("metadata") or {}
    if meta.get("hook_head_index", cfg.get("hook_head_index")) is not None:
        raise UserError(f"{path}: a dictionary of one attention head (hook_head_index) is not supported")
    tensors = {n: t.double() for n, t in load_tensors(path / SAE_WEIGHTS, "download or export it again",
                                                       str(device)).items()}  # folded in float64, then float32
    module = saelens_module(arch, _fold_b_dec(tensors, cfg), cfg, str(path))
    return module.float(), cfg


def saelens_info(cfg: dict[str, Any]) -> dict[str, Any]:
    """hook, model, context size and dataset recorded in a SAELens cfg.json (metadata block, or top level for
    folders older than SAELens 6)."""
    meta = {**{k: v for k, v in cfg.items() if k != "metadata"}, **(cfg.get("metadata") or {})}
    return {"hook": meta.get("hook_name") or meta.get("hook_point"), "model": meta.get("model_name"),
            "context_size": meta.get("context_size"), "dataset": meta.get("dataset_path"),
            "prepend_bos": meta.get("prepend_bos")}


# ------------------------------------------------------------------------------------- exporting sweeps

@dataclass
class ExportConfig:
    """Write members of a sweep as SAELens folders (export_saelens.py)."""

    sweep: str = "outputs/sweep"
    """Sweep folder written by basic_l1_sweep.py."""
    l1: float | None = None
    """Export the member with this L1 penalty (nearest key within 5%)."""
    k: int | None = None
    """Export the member with this k (TopK sweep)."""
    key: str | None = None
    """Export the member with this key as written in sweep.json (its sweep parameter's value; any architecture)."""
    all: bool = False
    """Export every member."""
    out: str = "outputs/saelens"
    """Folder to write into: one subfolder per member (l1_0.001, k_32), replaced if present."""


def member_info(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata block a sweep's dictionaries carry into cfg.json (from sweep.json and its Stage 1 manifest)."""
    manifest = meta.get("source_manifest") or {}
    gen = manifest.get("config") or {}
    return {"model_name": gen.get("model"), "hook_name": meta.get("hook"), "context_size": gen.get("context_length"),
            "dataset_path": gen.get("dataset"), "prepend_bos": gen.get("prepend_bos", False),
            "exclude_special_tokens": [int(t) for t in manifest.get("special_token_ids", [])]
            if gen.get("skip_special_tokens", True) else False,
            "sweep_sha256": meta.get("weights_sha256"), "architecture_trained": meta.get("architecture")}


def member_log_density(sweep: Path, label: str, meta: dict[str, Any]) -> Tensor | None:
    """log10 feature densities from the member's features.json (gather_high_activations.py) when it exists and was
    made from the sweep's current weights, else None."""
    path = sweep / "features" / label / "features.json"
    if not path.exists():
        return None
    from training.feature_file import FeatureFile
    features = FeatureFile(path)
    if (features.get("source") or {}).get("sweep_sha256") != meta.get("weights_sha256"):
        return None
    density = torch.zeros(int(features["n_features"]), dtype=torch.float64)
    for f in features:
        density[int(f["id"])] = float(f["density"])
    return log10_density(density)


def export_sweep(cfg: ExportConfig) -> list[Path]:
    """Write the chosen members of cfg.sweep as SAELens folders under cfg.out; returns the folders."""
    from training.sweep_files import key_label, key_name, load_member, read_sweep, select_member
    sweep = Path(cfg.sweep)
    meta = read_sweep(sweep)
    arch, keys = meta["architecture"], list(meta["keys"])
    chosen = [v for v in (cfg.l1, cfg.k, cfg.key) if v is not None]
    if cfg.all == bool(chosen) or len(chosen) > 1:
        raise UserError(f"give exactly one of --{key_name(arch)} (or --key) VALUE or --all (keys: "
                        f"{', '.join(f'{v:g}' for v in keys)})")
    wanted = keys if cfg.all else [select_member(sweep, cfg.l1, cfg.k, cfg.key, load=False)[0]]
    written = []
    for key in wanted:
        label = key_label(key_name(arch), key)
        member = {key_name(arch): key}
        info = {**member_info(meta), "sweep_key": member}
        module = load_member(sweep, key)
        written.append(write_saelens(Path(cfg.out) / label, module, info, member,
                                     member_log_density(sweep, label, meta)))
    return written


def main_export(cfg: ExportConfig) -> None:
    """export_saelens.py: export, then say where and how to load."""
    for folder in export_sweep(cfg):
        extra = " (with sparsity.safetensors)" if (folder / SPARSITY).exists() else ""
        print(f"wrote {folder}{extra}")
    print("load with SAELens: SAE.load_from_disk(FOLDER); with this toolkit: training.load_dictionary(FOLDER)")

