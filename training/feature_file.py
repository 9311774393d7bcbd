"""features.json, the file of top-activating examples written by gather_high_activations.py: its format,
writer and readers (whole, or streamed one feature at a time).

features.json (one feature per line):
  {"format": "top_activations", "version": 1,
   "source": {"kind": "sae"|"neurons", "sweep" | "sae" (a pretrained dictionary; key, key_name null), "key",
              "key_name" (the sweep parameter: l1, k, ...), "architecture",
              "make_positive_by", "hook", "model", "dataset_dir" | "dataset", "d_in", "context_length"},
   "n_tokens": int, "n_features": int, "top_k", "window_before", "window_after", "n_quantiles",
   "per_quantile", "sample_size", "histogram_bins", "n_random", "n_dead": int, "config": {flags of the run},
   "features": [
     {"id": int, "density": float, "max": float, "count": int (firing tokens),
      "shift": float (affine neurons only: the minimum subtracted),
      "top": [example, ...],
      "quantiles": [{"quantile": [lo, hi], "range": [min act, max act], "examples": [example, ...]}, ...],
      "random": [example, ...] (the least-activating windows of a shared random pool; see
                 training.top_activations; absent in files written before it existed),
      "histogram": {"lo": 0, "hi": max, "counts": [int] * histogram_bins, "sample": int},
      "text": str (training.render.render_feature_text)}, ...]}
  example = {"tokens": [str], "acts": [float | null], "center": int (index of the token the example
             is about), "activation": float, "sequence": int, "position": int}
  `acts` are this feature's activations on every token of the window (null: no stored activation,
  e.g. a special token Stage 1 left out). Numbers are rounded to 4 significant digits (`round_sig`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from training.chunks import read_json
from training.cli import UserError

FORMAT = "top_activations"
VERSION = 1
FEATURES_JSON = "features.json"
_FEATURES_OPEN = ',"features":[\n'
"""What ends the first (header) line of features.json."""


def round_sig(a: np.ndarray, digits: int = 4) -> np.ndarray:
    """`a` rounded to `digits` significant digits (float64; NaN and 0 stay as they are), each value the
    double nearest to its short decimal, so that JSON writes it short (0.1234, not 0.12340000271)."""
    a = np.asarray(a, dtype=np.float64)
    out = a.copy()
    ok = np.isfinite(a) & (a != 0)
    if not ok.any():
        return out
    v = a[ok]
    p = digits - 1 - np.floor(np.log10(np.abs(v))).astype(np.int64)
    res = np.empty_like(v)
    pos = p >= 0
    scale = 10.0 ** np.abs(p)
    res[pos] = np.round(v[pos] * scale[pos]) / scale[pos]
    res[~pos] = np.round(v[~pos] / scale[~pos]) * scale[~pos]
    out[ok] = res
    return out


def write_features_json(path: Path, header: dict[str, Any], features: Iterable[dict[str, Any]]) -> int:
    """Write features.json atomically (temporary file + rename): the header on the first line, then one
    feature per line (any iterable: written as it comes). Returns the file size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    head = json.dumps(header, separators=(",", ":"))
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(head[:-1] + _FEATURES_OPEN)
        for i, feat in enumerate(features):
            f.write((",\n" if i else "") + json.dumps(feat, separators=(",", ":"), ensure_ascii=False))
        f.write("\n]}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


class FeatureFile:
    """features.json opened for streaming: `header` (everything but the features) and iteration over the
    features read one line at a time (the layout `write_features_json` writes; other layouts are loaded
    whole). Indexing like the dict: f["source"], f["features"] (this object), f.get("n_dead")."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path} does not exist: run gather_high_activations.py first")
        try:
            with open(self.path, encoding="utf-8") as f:
                first = f.readline()
        except UnicodeDecodeError:
            first = ""
        self._whole: list[dict[str, Any]] | None = None
        if first.endswith(_FEATURES_OPEN):
            try:
                self.header = json.loads(first[:-len(_FEATURES_OPEN)] + "}")
            except json.JSONDecodeError:
                raise UserError(f"{self.path} has a damaged first line: rerun gather_high_activations.py to "
                                "regenerate it") from None
        else:
            data = read_features_json(self.path)
            self._whole = data.pop("features")
            self.header = data
        if self.header.get("format") != FORMAT:
            raise UserError(f"{self.path} is not a features.json written by gather_high_activations.py")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._whole is not None:
            yield from self._whole
            return
        with open(self.path, encoding="utf-8") as f:
            f.readline()
            for n, line in enumerate(f, start=2):
                line = line.rstrip().rstrip(",")
                if line in ("", "]}"):
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{self.path} line {n} is not a feature (truncated file?): regenerate it") from None

    def __getitem__(self, key: str) -> Any:
        return self if key == "features" else self.header[key]

    def get(self, key: str, default: Any = None) -> Any:
        """Header value (or `default`)."""
        return self.header.get(key, default)


def read_features_json(path: str | Path) -> dict[str, Any]:
    """features.json as a dict; a missing or foreign file is a UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: run gather_high_activations.py first")
    data = read_json(path, "rerun gather_high_activations.py to regenerate it")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("features"), list):
        raise UserError(f"{path} is not a features.json written by gather_high_activations.py")
    return data
