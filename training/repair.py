"""Checks of a Stage 1 folder against its manifest: which chunks are missing or differ from what was written."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from training.chunks import CONTEXTS, file_sha256, mmap_tensors


def chunk_file_problem(path: Path, sha256: str) -> str | None:
    """Why the chunk file at `path` is not the one the manifest lists ("missing", "corrupt"), or None."""
    if not path.is_file():
        return "missing"
    return None if file_sha256(path) == sha256 else "corrupt"


def contexts_problem(path: Path, context_length: int) -> str | None:
    """Why the contexts file at `path` is unusable ("missing", "corrupt"), or None: the manifest holds no checksum
    of it, so its header and shapes are checked (and every byte read)."""
    if not path.is_file():
        return "missing"
    try:
        tensors, _ = mmap_tensors(path)
        seq, tokens = tensors["sequence_ids"], tensors["tokens"]
        good = (tokens.dim() == 2 and tokens.shape[1] == context_length and seq.shape == tokens.shape[:1]
                and set(tensors) == {"sequence_ids", "tokens"})
        tokens.sum(), seq.sum()  # every page readable
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return "corrupt"
    return None if good else "corrupt"


def damaged_chunks(root: Path, manifest: dict[str, Any]) -> dict[int, list[str]]:
    """{chunk index: ["hook/3.safetensors missing", ...]} for every listed chunk with a missing or corrupt file."""
    damaged: dict[int, list[str]] = {}
    context_length = manifest["config"]["context_length"]
    for i in range(len(manifest["chunks"])):
        for hook, entry in manifest["hooks"].items():
            info = entry["chunks"][i]
            if problem := chunk_file_problem(root / hook / info["file"], info["sha256"]):
                damaged.setdefault(i, []).append(f"{hook}/{info['file']} {problem}")
        if problem := contexts_problem(root / CONTEXTS / f"{i}.safetensors", context_length):
            damaged.setdefault(i, []).append(f"{CONTEXTS}/{i}.safetensors {problem}")
    return damaged
