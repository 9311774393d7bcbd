"""Dictionaries trained elsewhere, as this toolkit's modules: `load_dictionary(path)` reads a SAELens folder
(training/saelens.py), a sparsify folder or a dictionary_learning folder, local or on the Hugging Face hub.

    sparsify            sae.safetensors: encoder.weight [d_sae, d_in], encoder.bias [d_sae], W_dec [d_sae, d_in],
                        b_dec [d_in]; cfg.json: k, num_latents / expansion_factor, activation ("topk"), d_in ...
                        codes = TopK(ReLU((x - b_dec) @ encoder.weight.T + encoder.bias)), x_hat = codes @ W_dec + b_dec
    dictionary_learning ae.pt (a state dict, read with torch.load(weights_only=True)) + config.json {"trainer":
                        {"dict_class", "activation_dim", "dict_size", "k", "lm_name", "layer", ...}}; dict_class
                        AutoEncoder, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReluAutoEncoder,
                        GatedAutoEncoder, AutoEncoderNew (their encode/decode, see `_DL_READERS`)

A hub name `hf:OWNER/REPO/PATH` is fetched with huggingface_hub into its cache (only PATH's files) and read from
there; once cached it loads offline.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from training.cli import UserError
from training.saelens import saelens_module

HUB_PREFIX = "hf:"
SPARSIFY_WEIGHTS, SPARSIFY_CFG = "sae.safetensors", "cfg.json"
DL_WEIGHTS, DL_CFG = "ae.pt", "config.json"
FORMATS = "a SAELens folder (sae_weights.safetensors + cfg.json), a sparsify folder (sae.safetensors + cfg.json) or " \
          "a dictionary_learning folder (ae.pt + config.json)"


@dataclass
class Pretrained:
    """A dictionary read from disk or the hub, with what it was trained for (None: not recorded)."""

    module: torch.nn.Module
    """Our module (eval mode; parameters require grad only when loaded `trainable`)."""
    hook: str | None
    """TransformerLens hook name it reads (e.g. blocks.6.hook_resid_post)."""
    model: str | None
    """Model it was trained on."""
    format: str
    """saelens, sparsify or dictionary_learning."""
    source: str
    """The path or hub name it was loaded from."""
    context_size: int | None = None
    dataset: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    """The folder's own configuration (cfg.json / config.json)."""

    @property
    def architecture(self) -> str:
        """Our architecture name of the module (l1, topk, jumprelu, gated)."""
        return str(getattr(self.module, "architecture", "?"))

    @property
    def label(self) -> str:
        """A short folder-safe name: the last path part."""
        return pretrained_label(self.source)


def pretrained_label(source: str) -> str:
    """Folder-safe name of a pretrained dictionary: the last part of its path or hub name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.rstrip("/")).name) or "sae"


def load_dictionary(path: str | Path, device: str | torch.device = "cpu", trainable: bool = False,
                    cache_dir: str | Path | None = None) -> Pretrained:
    """The dictionary in `path` (a folder or an ae.pt in it, or hf:OWNER/REPO/PATH) as our module, in eval mode
    with `requires_grad=False` unless `trainable`; a folder of no known format is a one-line UserError."""
    source = str(path)
    folder = hub_folder(source[len(HUB_PREFIX):], cache_dir) if source.startswith(HUB_PREFIX) else Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"dictionary {source} does not exist: give {FORMATS}, or hf:OWNER/REPO/PATH")
    from training.saelens import is_saelens_folder, read_saelens, saelens_info
    if is_saelens_folder(folder):
        module, cfg = read_saelens(folder, device)
        what = saelens_info(cfg)
        out = Pretrained(module, what["hook"], what["model"], "saelens", source, what["context_size"],
                         what["dataset"], cfg)
    elif (folder / SPARSIFY_WEIGHTS).exists() and (folder / SPARSIFY_CFG).exists():
        out = read_sparsify(folder, source, device)
    elif (folder / DL_WEIGHTS).exists():
        out = read_dictionary_learning(folder, source, device)
    else:
        raise UserError(f"{folder} holds no dictionary this toolkit reads: expected {FORMATS}")
    out.module = out.module.to(device).eval().requires_grad_(trainable)
    return out


def load_dictionaries(paths: list[str], device: str | torch.device = "cpu") -> list[Pretrained]:
    """`load_dictionary` of each path (the --sae flag of the tools)."""
    return [load_dictionary(p, device) for p in paths]


# ------------------------------------------------------------------------------------- the hub

def hub_folder(name: str, cache_dir: str | Path | None = None) -> Path:
    """The local folder of hub path OWNER/REPO[/PATH] in the huggingface_hub cache, fetched only when it is not
    cached yet (so a cached dictionary loads offline)."""
    parts = name.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise UserError(f"hub name hf:{name} is not hf:OWNER/REPO or hf:OWNER/REPO/PATH")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    patterns = [f"{sub}/*"] if sub else None
    try:
        root = snapshot_download(repo, allow_patterns=patterns, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        try:
            root = snapshot_download(repo, allow_patterns=patterns, cache_dir=cache_dir)
        except Exception as e:  # offline, no such repo, no access: one line
            raise UserError(f"could not fetch hf:{name} from the hub and it is not cached "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    folder = Path(root) / sub
    if not folder.is_dir():
        raise UserError(f"hf:{name}: the repository {repo} has no folder {sub!r}")
    return folder


# ------------------------------------------------------------------------------------- sparsify

def read_sparsify(folder: Path, source: str, device: str | torch.device) -> Pretrained:
    """A sparsify (EleutherAI) TopK folder as a TopKAutoencoder (its decoder rows must be unit: sparsify ranks
    latents by pre-activation)."""
    from training.saelens import check_unit_rows
    from training.sweep_files import load_tensors
    cfg = _read_json(folder / SPARSIFY_CFG)
    if cfg.get("activation", "topk") != "topk" or cfg.get("skip_connection") or cfg.get("transcode"):
        raise UserError(f"{folder}: only sparsify TopK autoencoders are supported (this one has activation "
                        f"{cfg.get('activation')!r}, skip_connection {cfg.get('skip_connection')}, transcode "
                        f"{cfg.get('transcode')})")
    t = load_tensors(folder / SPARSIFY_WEIGHTS, "download it again", str(device))
    tensors = {"W_enc": t["encoder.weight"].double().T, "b_enc": t["encoder.bias"].double(),
               "W_dec": t["W_dec"].double(), "b_dec": t["b_dec"].double()}
    check_unit_rows(tensors["W_dec"], "sparsify ranks latents by pre-activation alone")
    module = saelens_module("topk", tensors, {"k": int(cfg["k"]), "rescale_acts_by_decoder_norm": True},
                            str(folder)).float()
    m = re.fullmatch(r"layers\.(\d+)", folder.name)
    hook = f"blocks.{m.group(1)}.hook_resid_post" if m else None  # sparsify's default hookpoint: a layer's output
    return Pretrained(module, hook, cfg.get("model"), "sparsify", source, info=cfg)


# ------------------------------------------------------------------------------------- dictionary_learning

def _dl_standard(s: dict[str, Tensor], trainer: dict[str, Any]) -> torch.nn.Module:
    """AutoEncoder: ReLU(encoder(x - bias)), decoder(f) + bias."""
    return _as_saelens("standard", {"W_enc": s["encoder.weight"].T, "b_enc": s["encoder.bias"],
                                    "W_dec": s["decoder.weight"].T, "b_dec": s["bias"]})


def _dl_new(s: dict[str, Tensor], trainer: dict[str, Any]) -> torch.nn.Module:
    """AutoEncoderNew: ReLU(encoder(x)), decoder(f) with the decoder's bias (folded into our center form)."""
    center, enc = s["decoder.bias"], s["encoder.weight"]
    return _as_saelens("standard", {"W_enc": enc.T, "b_enc": s["encoder.bias"] + enc @ center,
                                    "W_dec": s["decoder.weight"].T, "b_dec": center})


def _dl_topk(s: dict[str, Tensor], trainer: dict[str, Any]) -> torch.nn.Module:
    """AutoEncoderTopK: TopK(ReLU(encoder(x - b_dec))), decoder(f) + b_dec (unit decoder rows)."""
    from training.saelens import check_unit_rows
    tensors = {"W_enc": s["encoder.weight"].T, "b_enc": s["encoder.bias"], "W_dec": s["decoder.weight"].T,
               "b_dec": s["b_dec"]}
    check_unit_rows(tensors["W_dec"], "dictionary_learning's TopK ranks latents by pre-activation alone")
    k = int(s["k"]) if "k" in s else int(trainer["k"])
    return _as_saelens("topk", tensors, {"k": k, "rescale_acts_by_decoder_norm": True})


def _dl_batchtopk(s: dict[str, Tensor], trainer: dict[str, Any]) -> torch.nn.Module:
    """BatchTopKSAE / MatryoshkaBatchTopKSAE at inference: ReLU(pre) * (ReLU(pre) > threshold), one threshold on
    pre-activations with unit decoder rows (= JumpReLU: ReLU(pre) * (pre > threshold), a negative, unset threshold
    acting as 0)."""
    if "W_enc" in s:  # Matryoshka: parameters in x @ W form
        tensors = {"W_enc": s["W_enc"], "b_enc": s["b_enc"], "W_dec": s["W_dec"], "b_dec": s["b_dec"]}
    else:
        tensors = {"W_enc": s["encoder.weight"].T, "b_enc": s["encoder.bias"], "W_dec": s["decoder.weight"].T,
                   "b_dec": s["b_dec"]}
    tensors["threshold"] = torch.full_like(tensors["b_enc"], float(s["threshold"]))
    return _as_saelens("jumprelu", tensors)


def _dl_jumprelu(s: dict[str, Tensor], trainer: dict[str, Any]) -> torch.nn.Module:
    """JumpReluAutoEncoder: ReLU(pre * (pre > threshold)) with pre = x @ W_enc + b_enc (b_dec not subtracted)."""
    return _as_saelens("jumprelu", {"W_enc": s["W_enc"], "b_enc": s["b_enc"] + s["b_dec"] @ s["W_enc"],
                                    "W_dec": s["W_dec"], "b_dec": s["b_dec"], "threshold": s["threshold"]})


def _dl_gated(s: dict[str, Tensor], trainer: dict[str, Any]) -> torch.nn.Module:
    """GatedAutoEncoder: x_enc = encoder(x - decoder_bias); gate and magnitude paths as SAELens' gated SAE."""
    return _as_saelens("gated", {"W_enc": s["encoder.weight"].T, "b_gate": s["gate_bias"], "b_mag": s["mag_bias"],
                                 "r_mag": s["r_mag"], "W_dec": s["decoder.weight"].T, "b_dec": s["decoder_bias"]})


def _as_saelens(name: str, tensors: dict[str, Tensor], cfg: dict[str, Any] | None = None) -> torch.nn.Module:
    """Our module for tensors in SAELens' form (b_dec subtracted before the encoder) of SAELens architecture `name`."""
    return saelens_module(name, tensors, cfg or {}, "dictionary_learning")


_DL_READERS: dict[str, Callable[[dict[str, Tensor], dict[str, Any]], torch.nn.Module]] = {
    "AutoEncoder": _dl_standard, "AutoEncoderNew": _dl_new, "AutoEncoderTopK": _dl_topk,
    "BatchTopKSAE": _dl_batchtopk, "MatryoshkaBatchTopKSAE": _dl_batchtopk, "JumpReluAutoEncoder": _dl_jumprelu,
    "GatedAutoEncoder": _dl_gated,
}
"""dictionary_learning dict_class -> our module from its state dict."""


def read_dictionary_learning(folder: Path, source: str, device: str | torch.device) -> Pretrained:
    """A dictionary_learning folder (ae.pt + config.json) as our module; ae.pt is read with weights_only=True."""
    cfg = _read_json(folder / DL_CFG) if (folder / DL_CFG).exists() else {}
    trainer = cfg.get("trainer") or {}
    kind = trainer.get("dict_class")
    if kind not in _DL_READERS:
        raise UserError(f"{folder / DL_CFG}: dictionary_learning dict_class {kind!r} is not supported "
                        f"(supported: {', '.join(_DL_READERS)})")
    try:
        state = torch.load(folder / DL_WEIGHTS, map_location=device, weights_only=True)
    except Exception as e:  # a pickle with code in it, a truncated file: one line
        raise UserError(f"{folder / DL_WEIGHTS} is not a plain state dict this toolkit can read safely "
                        f"({type(e).__name__})") from None
    state = {n: t.double() if t.is_floating_point() else t for n, t in state.items()}  # folded in float64
    try:
        module = _DL_READERS[kind](state, trainer).float()
    except KeyError as e:
        raise UserError(f"{folder / DL_WEIGHTS} lacks tensor {e} of a {kind}") from None
    layer = trainer.get("layer")
    m = re.search(r"resid_post_layer_(\d+)", str(folder))
    hook = trainer.get("hook_name") or (f"blocks.{m.group(1)}.hook_resid_post" if m else
                                        f"blocks.{layer}.hook_resid_post" if isinstance(layer, int) else None)
    return Pretrained(module, hook, trainer.get("lm_name"), "dictionary_learning", source,
                      (cfg.get("buffer") or {}).get("ctx_len"), None, cfg)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; anything else is a one-line UserError."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


# ------------------------------------------------------------------------------------- what the tools work on

@dataclass
class Picked:
    """The one dictionary a tool works on: a sweep member (--sweep with --l1/--k/--key) or a pretrained one (--sae)."""

    module: torch.nn.Module
    meta: dict[str, Any]
    """sweep.json, or for a pretrained dictionary the same fields (`pretrained_meta`)."""
    label: str
    """Folder-safe name: l1_0.001, k_32, or the pretrained folder's name."""
    name: str
    """For people: "l1=0.001", or a pretrained dictionary's architecture."""
    where: str
    """The sweep folder or --sae path it came from."""
    key: float | int | None
    """The sweep member's key (None for a pretrained dictionary)."""
    source: dict[str, Any]
    """The fields that name it in a features.json "source"."""


def pretrained_meta(p: Pretrained, hook: str | None = None, model: str | None = None) -> dict[str, Any]:
    """A pretrained dictionary described with sweep.json's fields (architecture, hook, d_in, d_hidden and a source
    manifest holding its model, dataset and context size), flags `hook` / `model` overriding its own metadata."""
    hook = hook or p.hook
    if not hook:
        raise UserError(f"{p.source} records no hook it was trained on: pass --hook")
    recorded = {"model": model or p.model, "dataset": p.dataset, "context_length": p.context_size}
    d_hidden, d_in = p.module.decoder.shape
    return {"architecture": p.architecture, "hook": hook, "d_in": int(d_in), "d_hidden": int(d_hidden),
            "pretrained": p.source, "format": p.format,
            "source_manifest": {"config": {n: v for n, v in recorded.items() if v is not None}}}


def pick_dictionary(sweep: str | Path | None, l1: float | None = None, k: int | None = None,
                    key: str | float | None = None, sae: str | None = None, hook: str | None = None,
                    model: str | None = None, device: str | torch.device = "cpu") -> Picked:
    """The dictionary of --sae (`load_dictionary`; its hook and model unless `hook` / `model` are given) or else
    the sweep member chosen by --l1 / --k / --key (`training.sweep_files.select_member`)."""
    from training.sweep_files import key_label, key_name, select_member
    if sae is not None:
        if any(v is not None for v in (l1, k, key)):
            raise UserError("--sae names the dictionary: drop --l1/--k/--key (they choose a member of --sweep)")
        p = load_dictionary(sae, device)
        meta = pretrained_meta(p, hook, model)
        source = {"kind": "sae", "sae": str(Path(sae).resolve()) if not sae.startswith(HUB_PREFIX) else sae,
                  "key": None, "key_name": None, "architecture": p.architecture, "d_in": meta["d_in"],
                  "format": p.format}
        return Picked(p.module, meta, p.label, p.architecture, sae, None, source)
    if sweep is None:
        raise UserError("give --sweep (with --l1/--k when it has several members) or --sae (a pretrained dictionary)")
    chosen, module, meta = select_member(sweep, l1, k, key, device)
    if hook is not None and hook != meta["hook"]:
        raise UserError(f"--hook {hook}: the sweep's dictionaries read {meta['hook']}")
    name = key_name(meta["architecture"])
    source = {"kind": "sae", "sweep": str(Path(sweep).resolve()), "key": chosen, "key_name": name,
              "architecture": meta["architecture"], "d_in": meta["d_in"], "sweep_sha256": meta.get("weights_sha256")}
    return Picked(module, meta, key_label(name, chosen), f"{name}={chosen:g}", str(sweep), chosen, source)
