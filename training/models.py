"""Load a language model through TransformerLens 4 (hub name or local Hugging Face folder)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from training.cli import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "models/tiny-stdlib"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)
"""Values of the analysis tools' --dtype flag (auto: the dtype Stage 1 ran the model in)."""


def resolve_device(device: str | None) -> torch.device:
    """The torch device for `device` (None: cuda when available, else cpu); unusable devices are a UserError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for CUDA but this machine has no usable GPU: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device} asked for MPS but it is not available here: use --device cpu")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name` (float32, float16, bfloat16)."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def manifest_dtype(manifest: dict[str, Any] | None) -> str | None:
    """The dtype Stage 1 ran its model in, as its manifest records it (None: no manifest, or imported activations)."""
    if not manifest or not manifest.get("has_tokens", True):
        return None
    name = (manifest.get("config") or {}).get("dtype")
    return name if name in DTYPES else None


def analysis_dtype(flag: str, manifest: dict[str, Any] | None, recorded: str | None = None) -> str:
    """The dtype an analysis tool loads the model in: `flag`; for "auto" the `recorded` one (a dtype an earlier
    tool wrote down), else the Stage 1 manifest's, else float32."""
    if flag == "auto":
        return (recorded if recorded in DTYPES else None) or manifest_dtype(manifest) or "float32"
    if flag not in DTYPES:
        raise UserError(f"unknown --dtype {flag!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    return flag


def resolve_model_path(name: str) -> str:
    """A local folder for `name` if one exists (relative to cwd, then to the repo), else `name` as a hub id."""
    for candidate in (Path(name), REPO_ROOT / name):
        if candidate.is_dir():
            if not (candidate / "config.json").exists():
                raise UserError(f"model folder {candidate} has no config.json: give a folder saved with "
                                "save_pretrained (model and tokenizer) or a hub name")
            return str(candidate.resolve())
    if name.startswith((".", "/")) or name.count("/") > 1:
        raise UserError(f"model folder {name} does not exist")
    return name


def load_model(name: str, device: torch.device | str | None = None, dtype: str = "float32"):
    """Boot `name` (hub id or local folder) as a TransformerLens TransformerBridge in eval mode."""
    from transformer_lens.model_bridge import TransformerBridge

    path = resolve_model_path(name)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stderr(quiet):
            model = TransformerBridge.boot_transformers(path, device=str(dev), dtype=resolve_dtype(dtype))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - every loading failure becomes one line for the user
        offline = " (this machine may be offline: pass a local model folder)" if not os.path.isdir(path) else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model {name!r}: {first}{offline}") from None
    model.eval()
    return model


def model_fingerprint(name: str, sample: int = 1 << 20) -> str | None:
    """A hash of a local model folder's config and weight files (size, first and last MiB); None for hub names.

    Stage 1 records it so that resuming into a folder whose model has since been retrained is refused.
    """
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return None
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(sample))
            fh.seek(max(0, size - sample))
            h.update(fh.read(sample))
    return h.hexdigest()
