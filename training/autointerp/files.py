"""interp.jsonl, the results of explain_features.py: one JSON object per feature, appended as each feature is
finished (a killed run loses at most the features in flight; their replies are in the cache).

    {"feature": int, "model": str, "settings": str (hash of everything that changes the answers),
     "explanation": str | null, "clearness": 1..5 | null, "scratch": str,
     "detection": float | null (balanced accuracy), "detection_detail": {"tpr", "tnr", "n_positive",
       "n_negative", "truth", "answers"},
     "fuzzing": float | null, "fuzzing_detail": {...},
     "prompts": {"explain" | "detection" | "fuzzing": hash of the messages sent},
     "errors": {"explain" | "detection" | "fuzzing": one-line reason that step has no score},
     "skipped": reason (a feature that never fired: nothing asked),
     "usage": {"prompt_tokens", "completion_tokens"}}

A later line for the same feature replaces an earlier one (`read_results`). No API key is ever written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from training.cli import UserError


def repair_tail(path: Path) -> None:
    """Cut a torn last line (no final newline: the writer was killed mid-line) so appends stay line-aligned."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        f.truncate(data.rfind(b"\n") + 1)


def append_line(path: Path, obj: dict[str, Any]) -> None:
    """Append one JSON object as a line and make it durable (flush + fsync)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file (after cutting a torn last line); a damaged line is a UserError."""
    if not path.exists():
        return
    repair_tail(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {n} is not JSON: move the file away to start over") from None
            if isinstance(obj, dict):
                yield obj


def read_results(path: str | Path) -> dict[int, dict[str, Any]]:
    """{feature id: its last record} of an interp.jsonl."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist: run explain_features.py first")
    out: dict[int, dict[str, Any]] = {}
    for obj in read_lines(p):
        if "feature" not in obj:
            raise UserError(f"{p} is not an interp.jsonl written by explain_features.py")
        out[int(obj["feature"])] = obj
    return out
