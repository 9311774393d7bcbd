"""Bring your own activations: write [n, d] arrays (.npy / .safetensors files, or arrays in memory) as a dataset folder.

The folder has the layout of `training/chunks.py` with activations only: each chunk holds `activations [n, d]`,
there is no contexts/ folder, and the manifest says so (`"has_tokens": false`, `"kind": "imported"`, model name
"imported", the inputs' names, sizes and shapes under `source`). Every Stage 2 tool reads it as it reads a
Stage 1 folder; the tools that need token ids (top-activating examples, their contexts) refuse it in one line.

How: the inputs are opened memory-mapped and checked (2-D, one width, a float dtype, non-empty) before anything
is written; one seeded permutation over all N input rows decides which rows go into which chunk (row j of chunk c
is input row perm[c * chunk_size + j]), so activations written in sequence order (row after row of one document)
end up mixed across the whole dataset. Each chunk gathers its rows from the memory maps in file order (sorted
indices, so reading sweeps each file forwards), checks they are finite, casts them to the storage precision
(refusing an overflow), writes them through `save_tensors` (temporary name, rename, SHA-256) and adds them to the
mean and mean-norm statistics. Everything is written into a hidden sibling folder that replaces --out only when
complete: an error or Ctrl-C leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import struct
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import training
from training.chunks import (CONTEXTS, FORMAT_VERSION, MANIFEST, atomic_write_json, mmap_tensors, remove_dataset,
                             save_tensors)
from training.cli import UserError, config_to_dict
from training.locks import output_lock

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SUFFIXES = (".npy", ".safetensors")
IMPORTED = "imported"
"""What the manifest's kind, model name and default hook say."""
_NP_FLOATS = (np.float16, np.float32, np.float64)
_TORCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class ImportConfig:
    """Which arrays to import, and how to store them (saved in the folder's manifest)."""

    input: list[str] | None = None
    """Activations [rows, width] (required): .npy or .safetensors files, concatenated in the order given; a folder
    stands for its .npy/.safetensors files in name order."""
    out: str | None = None
    """Dataset folder to write (required): manifest.json plus one folder of chunks; must be new or empty."""
    tensor: str | None = None
    """Tensor to read from .safetensors inputs holding several 2-D float tensors."""
    chunk_size: int = 262144
    """Rows per chunk (the last chunk may be shorter)."""
    precision: str = field(default="float32", metadata={"choices": list(PRECISIONS)})
    """Storage precision of the activations."""
    seed: int = 0
    """Seed of the row shuffle (one permutation over all input rows)."""
    hook: str = IMPORTED
    """Name of the chunk folder: best the model hook the activations came from (e.g. blocks.3.hook_resid_post), which
    evaluate_sweep.py and steer.py splice into."""
    overwrite: bool = False
    """Replace the dataset already in --out (a non-empty folder without manifest.json is never touched)."""


@dataclass
class Source:
    """One input: a 2-D float array read row by row (memory-mapped for files)."""

    name: str
    data: np.ndarray | torch.Tensor
    """[rows, width] float16/float32/float64 numpy array (or memmap), or a float torch tensor (bfloat16 too)."""
    info: dict[str, Any]
    """What the manifest records about it: name, rows, d, dtype (and bytes, tensor for files)."""

    @property
    def rows(self) -> int:
        """Number of rows."""
        return int(self.data.shape[0])


@dataclass
class ImportSummary:
    """What an import wrote."""

    hook_dir: Path
    n_inputs: int
    rows: int
    d: int
    chunks: int
    chunk_size: int
    precision: str
    bytes_written: int
    seconds: float

    def __str__(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        return (f"imported {self.rows:,} rows of width {self.d} from {self.n_inputs} input(s) into {self.chunks} "
                f"chunk(s) of up to {self.chunk_size:,} rows ({self.precision}), {self.bytes_written / 1e9:.2f} GB, "
                f"{rate:,.0f} rows/s, into {self.hook_dir}\n  train on it: basic_l1_sweep.py --dataset_dir "
                f"{shlex.quote(str(self.hook_dir))}")


# ------------------------------------------------------------------------------------- inputs


def one_line(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split()) or type(e).__name__


def resolve_inputs(items: Sequence[str | Path] | None) -> list[Path]:
    """The input files in order: files as given, folders expanded to their .npy/.safetensors files by name."""
    if not items:
        raise UserError("no input: pass --input FILE_OR_FOLDER [FILE ...] (.npy or .safetensors arrays [rows, width])")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted((p for p in item.iterdir() if p.suffix in SUFFIXES and p.is_file()), key=lambda p: p.name)
            if not found:
                raise UserError(f"folder {item} holds no .npy or .safetensors file: pass the files or another folder")
            files += found
        elif not item.exists():
            raise UserError(f"input {item} does not exist")
        elif item.suffix not in SUFFIXES:
            raise UserError(f"input {item} is neither .npy nor .safetensors: save the activations with numpy.save "
                            "or safetensors")
        else:
            files.append(item)
    seen: set[Path] = set()
    for f in files:
        if f.resolve() in seen:
            raise UserError(f"input {f} is given twice: pass each file once")
        seen.add(f.resolve())
    return files


def check_array(name: str, shape: Sequence[int], dtype: Any) -> None:
    """UserError unless shape is [rows > 0, width > 0] and dtype a supported float type."""
    if len(shape) != 2:
        raise UserError(f"{name} holds a {len(shape)}-D array of shape {list(shape)}: activations must be 2-D "
                        "[rows, width] (reshape it, e.g. x.reshape(-1, d))")
    if shape[0] == 0:
        raise UserError(f"{name} holds no rows (shape {list(shape)}): drop it from --input")
    if shape[1] == 0:
        raise UserError(f"{name} has width 0 (shape {list(shape)}): activations need at least one column")
    if isinstance(dtype, torch.dtype):
        ok = dtype in _TORCH_FLOATS
    else:
        ok = isinstance(dtype, np.dtype) and dtype.type in _NP_FLOATS
    if not ok:
        raise UserError(f"{name} holds {dtype} values: activations must be float16, bfloat16, float32 or float64")


def pick_tensor(path: Path, tensors: dict[str, torch.Tensor], name: str | None) -> str:
    """Which tensor of a safetensors file to import: `name`, else its only (2-D float) tensor."""
    if name is not None:
        if name not in tensors:
            raise UserError(f"{path} has no tensor {name!r}; it has: {', '.join(sorted(tensors)) or 'none'}")
        return name
    if len(tensors) == 1:
        return next(iter(tensors))
    floats = sorted(n for n, t in tensors.items() if t.dim() == 2 and t.dtype in _TORCH_FLOATS)
    if len(floats) == 1:
        return floats[0]
    listing = ", ".join(f"{n} {list(t.shape)} {dtype_name(t.dtype)}" for n, t in sorted(tensors.items()))
    if not floats:
        raise UserError(f"{path} holds no 2-D float tensor ({listing or 'no tensors'}): activations must be "
                        "[rows, width] floats")
    raise UserError(f"{path} holds several 2-D float tensors ({', '.join(floats)}): name one with --tensor NAME")


def open_file(path: Path, tensor: str | None) -> Source:
    """A .npy or .safetensors file as a memory-mapped Source (checked with `check_array`)."""
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{path} is not a readable .npy array ({one_line(e)})") from None
        check_array(str(path), arr.shape, arr.dtype)
        data: np.ndarray | torch.Tensor = arr
        extra: dict[str, Any] = {}
    else:
        try:
            tensors, _ = mmap_tensors(path)
        except (OSError, ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError) as e:
            raise UserError(f"{path} is not a readable .safetensors file ({one_line(e)})") from None
        chosen = pick_tensor(path, tensors, tensor)
        data = tensors[chosen]
        check_array(f"{path} tensor {chosen!r}", tuple(data.shape), data.dtype)
        extra = {"tensor": chosen}
    info = {"name": str(path), "path": str(path.resolve()), "bytes": path.stat().st_size, "rows": int(data.shape[0]),
            "d": int(data.shape[1]), "dtype": dtype_name(data.dtype), **extra}
    return Source(str(path), data, info)


def dtype_name(dtype: Any) -> str:
    """"float32" for np.float32 / torch.float32 alike."""
    return str(dtype).removeprefix("torch.")


def open_sources(sources: Sequence[np.ndarray | torch.Tensor | str | Path], tensor: str | None = None) -> list[Source]:
    """Every input as a checked Source; all must have the same width."""
    if not sources:
        raise UserError("no input: give at least one array or file")
    out: list[Source] = []
    for i, s in enumerate(sources):
        if isinstance(s, (str, Path)):
            out.append(open_file(Path(s), tensor))
            continue
        name = f"<array {i}>"
        if isinstance(s, torch.Tensor):
            s = s.detach().cpu()
        elif not isinstance(s, np.ndarray):
            raise UserError(f"input {i} is a {type(s).__name__}: give numpy arrays, torch tensors or file paths")
        check_array(name, tuple(s.shape), s.dtype)
        out.append(Source(name, s, {"name": name, "rows": int(s.shape[0]), "d": int(s.shape[1]),
                                    "dtype": dtype_name(s.dtype)}))
    d = out[0].data.shape[1]
    for s in out[1:]:
        if s.data.shape[1] != d:
            raise UserError(f"{s.name} is {s.data.shape[1]} wide but {out[0].name} is {d} wide: every input must "
                            "have the same width (the activations of one hook)")
    return out


# ------------------------------------------------------------------------------------- chunks


def row_permutation(n: int, seed: int) -> np.ndarray:
    """Where each output row comes from: a seeded permutation of the n input rows [n]."""
    dtype = torch.int32 if n < 2**31 else torch.int64
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed), dtype=dtype).numpy()


def take_rows(data: np.ndarray | torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Rows `rows` [m] (sorted) of one input as float32 [m, d]."""
    if isinstance(data, torch.Tensor):
        return data[torch.from_numpy(rows.astype(np.int64))].float()
    return torch.from_numpy(np.asarray(data[rows], dtype=np.float32))


def gather_rows(sources: Sequence[Source], starts: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """Input rows `rows` [n] (indices into the concatenated inputs, which begin at `starts`) as float32 [n, d],
    in the order given; each input is read in increasing row order."""
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    bounds = np.searchsorted(ordered, np.append(starts, starts[-1] + sources[-1].rows))
    out = torch.empty(len(rows), sources[0].data.shape[1], dtype=torch.float32)
    for s, src in enumerate(sources):
        lo, hi = bounds[s], bounds[s + 1]
        if hi > lo:
            where = torch.from_numpy(order[lo:hi].astype(np.int64))
            out.index_copy_(0, where, take_rows(src.data, ordered[lo:hi] - starts[s]))
    return out


def locate_row(sources: Sequence[Source], starts: np.ndarray, row: int) -> tuple[Source, int]:
    """(input, row within it) of row `row` of the concatenated inputs."""
    s = int(np.searchsorted(starts, row, side="right")) - 1
    return sources[s], row - int(starts[s])


def row_norms(x: torch.Tensor, rows: np.ndarray, sources: Sequence[Source], starts: np.ndarray) -> torch.Tensor:
    """Norms [n] of the rows of x [n, d] (input rows `rows` [n]); a UserError names the input and row of the first
    row holding a NaN or inf. (A non-finite value makes the norm non-finite, so only such rows are checked.)"""
    norms = torch.linalg.vector_norm(x, dim=1)
    suspect = (~torch.isfinite(norms)).nonzero()[:, 0]
    if len(suspect):
        bad = suspect[~torch.isfinite(x[suspect]).all(dim=1)]
        if len(bad):
            src, local = locate_row(sources, starts, int(rows[bad.numpy()].min()))
            raise UserError(f"{src.name} row {local:,} holds a NaN or infinite value: activations must be finite; "
                            "drop or fix such rows and import again")
        norms[suspect] = torch.linalg.vector_norm(x[suspect].double(), dim=1).float()  # finite but huge
    return norms


def to_precision(x: torch.Tensor, norms: torch.Tensor, precision: str) -> torch.Tensor:
    """x [n, d] float32 (row norms `norms` [n]) cast to the storage precision; an overflow to inf is a UserError."""
    dtype = PRECISIONS[precision]
    y = x.to(dtype)
    # |x_i| <= ||x||, so only a large norm calls for the elementwise check
    if not norms.max() <= torch.finfo(dtype).max and not bool(torch.isfinite(y).all()):
        raise UserError(f"the activations overflow {precision} (largest |x| = {x.abs().max().item():.3g}): "
                        "use --precision float32 or bfloat16")
    return y


# ------------------------------------------------------------------------------------- the folder


def check_hook_name(hook: str) -> None:
    """UserError unless `hook` can name the chunk folder."""
    if not hook or hook in (".", "..", CONTEXTS, MANIFEST) or "/" in hook or "\\" in hook or hook.startswith("."):
        raise UserError(f"--hook {hook!r} cannot name the chunk folder: use a plain name such as "
                        "blocks.3.hook_resid_post")


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, a non-empty folder (without --overwrite), or a non-dataset folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out {out} is not empty: pass --overwrite to replace the dataset in it, or choose a new "
                        "folder")
    if not (out / MANIFEST).exists():
        raise UserError(f"--out {out} is not empty and holds no dataset ({MANIFEST}): --overwrite only replaces a "
                        "dataset folder; choose a new or empty folder")


def check_disk_space(folder: Path, n_rows: int, d: int, precision: str) -> None:
    """Refuse up front an import whose chunks would not fit on the disk."""
    need = n_rows * d * PRECISIONS[precision].itemsize
    free = shutil.disk_usage(folder).free
    if need > free:
        raise UserError(f"the chunks need about {need / 1e9:.1f} GB but {folder} has {free / 1e9:.1f} GB free: "
                        "free some space, choose another --out, or a smaller --precision")


def install(tmp: Path, out: Path, hook: str) -> None:
    """Move the finished folder `tmp` to `out` (replacing the dataset there): chunks first, manifest last."""
    if out.is_dir():
        remove_dataset(out)
        if not any(out.iterdir()):
            out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    if (out / hook).exists():
        shutil.rmtree(out / hook)
    os.replace(tmp / hook, out / hook)
    os.replace(tmp / MANIFEST, out / MANIFEST)
    tmp.rmdir()


def new_manifest(cfg: ImportConfig, command: str, sources: Sequence[Source], d: int,
                 source: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest of an imported folder, before its chunks are added."""
    return {
        "format_version": FORMAT_VERSION,
        "toolkit_version": training.__version__,
        "command": command,
        "kind": IMPORTED,
        "has_tokens": False,
        "config": {**config_to_dict(cfg), "model": IMPORTED},
        "model": {"name": IMPORTED, "d_model": d},
        "source": {**(source or {}), "kind": IMPORTED, "inputs": [s.info for s in sources]},
        "special_token_ids": [],
        "hooks": {cfg.hook: {"d": d, "mean": [0.0] * d, "mean_norm": 0.0, "chunks": []}},
        "chunks": [],
        "total_tokens": 0,
        "finished": False,
        "exhausted": False,
    }


def write_chunk(path: Path, acts: torch.Tensor, index: int, partial: bool) -> dict[str, Any]:
    """Save chunk `index` (activations [m, d]) atomically; return its manifest entry."""
    digest = save_tensors(path, {"activations": acts}, {"rows": len(acts), "partial": partial, "chunk": index})
    return {"file": path.name, "rows": len(acts), "sha256": digest, "partial": partial}


def write_chunks(sources: Sequence[Source], folder: Path, cfg: ImportConfig, manifest: dict[str, Any]) -> int:
    """Write every chunk of the shuffled rows into folder/{hook}/ and record it in `manifest`; returns bytes written.
    A writer thread saves and checksums chunk i while the next one is gathered (at most two chunks in memory)."""
    starts = np.cumsum([0] + [s.rows for s in sources[:-1]])
    n = sum(s.rows for s in sources)
    perm = row_permutation(n, cfg.seed)
    entry = manifest["hooks"][cfg.hook]
    sums = torch.zeros(entry["d"], dtype=torch.float64)  # sum of rows [d]
    norm_sum, written = 0.0, 0

    def record(done: Future) -> None:
        nonlocal written
        chunk = done.result()
        entry["chunks"].append(chunk)
        manifest["chunks"].append({"rows": chunk["rows"], "partial": chunk["partial"], "resume_at": None})
        written += (folder / cfg.hook / chunk["file"]).stat().st_size
        bar.update(chunk["rows"])

    bar = tqdm(total=n, unit="row", unit_scale=True, desc="importing", dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="chunk-writer") as pool:
            pending: Future | None = None
            for index, lo in enumerate(range(0, n, cfg.chunk_size)):
                rows = perm[lo:lo + cfg.chunk_size]
                x = gather_rows(sources, starts, rows)                              # [m, d] float32
                norms = row_norms(x, rows, sources, starts)                         # [m]
                stored = to_precision(x, norms, cfg.precision)
                col = x.new_ones(len(x)) @ x  # column sums [d]; a matmul is fastest
                sums += col.double() if bool(torch.isfinite(col).all()) else x.sum(0, dtype=torch.float64)
                norm_sum += norms.double().sum().item()
                del x
                if pending is not None:
                    record(pending)
                path = folder / cfg.hook / f"{index}.safetensors"
                pending = pool.submit(write_chunk, path, stored, index, len(rows) < cfg.chunk_size)
            if pending is not None:
                record(pending)
    finally:
        bar.close()
    entry["mean"] = (sums / n).tolist()
    entry["mean_norm"] = norm_sum / n
    manifest["total_tokens"] = n
    manifest["finished"] = True
    return written


def import_sources(sources: Sequence[np.ndarray | torch.Tensor | str | Path], cfg: ImportConfig,
                   command: str = "", source: dict[str, Any] | None = None) -> ImportSummary:
    """Check every input and the output folder, then write the dataset folder described by `cfg`."""
    if cfg.chunk_size < 1:
        raise UserError(f"--chunk_size must be at least 1 (got {cfg.chunk_size})")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"unknown precision {cfg.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not cfg.out:
        raise UserError("no output folder: pass --out DIR")
    check_hook_name(cfg.hook)
    out = Path(cfg.out)
    check_out(out, cfg.overwrite)
    opened = open_sources(sources, cfg.tensor)
    d = int(opened[0].data.shape[1])
    n = sum(s.rows for s in opened)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_disk_space(out.parent, n, d, cfg.precision)
    tmp = out.resolve().parent / f".{out.resolve().name}.importing"
    t0 = time.perf_counter()
    with output_lock(out.resolve()):  # one writer per dataset folder (the lock sits beside it: it is swapped in)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed import
        try:
            (tmp / cfg.hook).mkdir(parents=True)
            manifest = new_manifest(cfg, command, opened, d, source)
            written = write_chunks(opened, tmp, cfg, manifest)
            atomic_write_json(tmp / MANIFEST, manifest)
            install(tmp, out, cfg.hook)
        except OSError as e:
            raise UserError(f"could not write {out}: {one_line(e)}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ImportSummary(out / cfg.hook, len(opened), n, d, len(manifest["chunks"]), cfg.chunk_size, cfg.precision,
                         written, time.perf_counter() - t0)


def write_activation_folder(sources: list[np.ndarray | torch.Tensor | Path], out: Path, *, chunk_size: int = 262144,
                            precision: str = "float32", seed: int = 0, hook: str = IMPORTED,
                            source: dict | None = None, tensor: str | None = None, overwrite: bool = False) -> Path:
    """Write `sources` ([n_i, d] arrays or .npy/.safetensors paths, concatenated in order) as a dataset folder at
    `out`, rows shuffled into chunks of `chunk_size`; `source` adds keys to the manifest's "source" record.
    Returns the hook folder (what `open_hook` and the sweep's --dataset_dir take)."""
    names = [str(s) if isinstance(s, (str, Path)) else f"<array {i}>" for i, s in enumerate(sources)]
    cfg = ImportConfig(input=names, out=str(out), tensor=tensor, chunk_size=chunk_size, precision=precision, seed=seed,
                       hook=hook, overwrite=overwrite)
    return import_sources(sources, cfg, "write_activation_folder", source).hook_dir


def run_import(cfg: ImportConfig, argv: Sequence[str] | None = None) -> ImportSummary:
    """Import the files and folders of `cfg.input` into the dataset folder `cfg.out` (import_activations.py)."""
    files = resolve_inputs(cfg.input)
    argv = list(sys.argv if argv is None else argv)
    return import_sources(files, cfg, " ".join(shlex.quote(a) for a in argv))
