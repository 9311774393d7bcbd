"""The on-disk activation format: chunk files, the manifest, and memory-mapped reading.

Layout of a dataset folder written by `generate_test_data.py`:

    {folder}/manifest.json                      what was run, per hook its width, chunks and statistics
    {folder}/{hook_name}/{i}.safetensors        activations [n, d], token_ids [n], sequence_ids [n], positions [n]
    {folder}/contexts/{i}.safetensors           sequence_ids [m], tokens [m, context_length]: every sequence
                                                that has a row in chunk i, so each row's context can be rebuilt

Chunk i of every hook holds the same rows (same tokens, same order). Rows are shuffled within a chunk.

A folder written by `import_activations.py` (training/activation_import.py) holds activations only: its chunks
have no token_ids, sequence_ids or positions, there is no contexts/ folder, and its manifest says
`"has_tokens": false` (a manifest without the key has tokens). Tools that need tokens call `require_tokens`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from training.cli import UserError

MANIFEST = "manifest.json"
CONTEXTS = "contexts"
FORMAT_VERSION = 1
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL"}
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
"""The activations' dtype in chunk files, by the manifest's config.precision."""
_NP_DTYPES = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "F64": np.float64,
              "I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_}


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path) -> None:
    """Rename the written and fsynced file `tmp` to `path`, then flush the folder entry."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` through a temporary file, fsynced, and a rename (no .tmp left on failure)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path, advice: str) -> Any:
    """The JSON in `path`; a missing, unreadable or invalid file is a one-line UserError ending in `advice`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {advice}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not valid JSON ({reason}): {advice}") from None


def file_sha256(path: Path, block: int = 1 << 24) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(block):
            h.update(buf)
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any] | None = None) -> str:
    """Save CPU tensors as a safetensors file atomically (temporary name, then rename); return its SHA-256.

    Written here rather than by `safetensors.save_file` so that the bytes go from each tensor to the file and
    the hash in one pass, with no serialised copy and no re-read (it is on the hot path of Stage 1). The layout
    is the safetensors format: u64 header size, JSON header (names sorted, `info` as sorted JSON under the one
    metadata key "info", padded to 8 bytes), then the tensors' bytes in header order. Same input, same bytes.
    The file is fsynced before the rename that publishes it, and the folder entry after it.
    """
    names = sorted(tensors)
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if info is not None:
        header["__metadata__"] = {"info": json.dumps(info, sort_keys=True)}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for part in (struct.pack("<Q", len(blob)), blob):
                f.write(part)
                digest.update(part)
            for name in names:
                t = tensors[name].detach().contiguous()
                data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
                f.write(data)
                digest.update(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill leaves no partial file behind
        raise
    return digest.hexdigest()


def mmap_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Memory-map every tensor of a safetensors file (no copy until touched); also return its `info` metadata."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{len(head)} bytes: not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"header of {n} bytes in a file of {size} bytes: not a safetensors file")
        header = json.loads(f.read(n))
    meta = json.loads((header.pop("__metadata__", None) or {}).get("info", "{}"))
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if end == start:
            arr = np.zeros(shape, dtype=_NP_DTYPES[info["dtype"]])
        else:
            arr = np.memmap(path, dtype=_NP_DTYPES[info["dtype"]], mode="c", offset=8 + n + start, shape=(count,))
        t = torch.from_numpy(arr).reshape(shape)
        out[name] = t.view(torch.bfloat16) if info["dtype"] == "BF16" else t
    return out, meta


@dataclass(frozen=True)
class ChunkInfo:
    """One chunk file of one hook."""

    path: Path
    rows: int
    sha256: str


@dataclass
class HookData:
    """The chunks of one hook in a dataset folder, read memory-mapped."""

    root: Path
    hook: str
    d: int
    chunks: list[ChunkInfo]
    manifest: dict[str, Any]
    verified: set[int] = field(default_factory=set, repr=False, compare=False)
    """Chunks whose checksum this object has already checked (each file is hashed once per HookData: once per run)."""
    _locks: dict[int, threading.Lock] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_rows(self) -> int:
        """Rows over all complete chunks."""
        return sum(c.rows for c in self.chunks)

    @property
    def mean(self) -> torch.Tensor:
        """Mean activation [d] over all stored rows, from the manifest."""
        return torch.tensor(self.manifest["hooks"][self.hook]["mean"])

    @property
    def has_tokens(self) -> bool:
        """Whether the chunks hold token ids, sequence ids and positions (False for imported activations)."""
        return has_tokens(self.manifest)

    def load(self, i: int, verify: bool = False) -> dict[str, torch.Tensor]:
        """Chunk i memory-mapped: activations [n, d], and token_ids [n], sequence_ids [n], positions [n] when
        the folder has tokens; `verify` checks the file against its checksum the first time this object loads it."""
        info = self.chunks[i]
        if not info.path.exists():
            raise UserError(f"chunk {info.path} listed in the manifest is missing: {self.remedy}")
        if verify:
            self.verify(i)
        try:
            tensors, _ = mmap_tensors(info.path)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error):
            raise UserError(f"chunk {info.path} has a damaged header: {self.remedy}") from None
        self.check_header(info, tensors)
        return tensors

    @property
    def remedy(self) -> str:
        """What to do about a damaged chunk of this folder."""
        if self.has_tokens:
            return "rerun generate_test_data.py with the same flags, which repairs it"
        return "import the activations again with import_activations.py"

    def check_header(self, info: ChunkInfo, tensors: dict[str, torch.Tensor]) -> None:
        """A UserError when a chunk's activations do not have the shape [rows, d] and the precision the manifest
        says (read from the header only)."""
        acts = tensors.get("activations")
        want = STORAGE_DTYPES.get(self.manifest.get("config", {}).get("precision"))
        if acts is None or tuple(acts.shape) != (info.rows, self.d) or (want is not None and acts.dtype != want):
            found = "no activations" if acts is None else f"{list(acts.shape)} {str(acts.dtype).removeprefix('torch.')}"
            raise UserError(f"chunk {info.path} holds {found}, not the [{info.rows}, {self.d}] "
                            f"{self.manifest.get('config', {}).get('precision')} the manifest lists: {self.remedy}")

    def verify(self, i: int) -> None:
        """Check chunk i against the manifest's checksum unless this object already has (a UserError if it differs);
        threads may check different chunks at once."""
        with self._locks.setdefault(i, threading.Lock()):  # dict.setdefault is atomic under the GIL
            if i in self.verified:
                return
            info = self.chunks[i]
            if file_sha256(info.path) != info.sha256:
                raise UserError(f"chunk {info.path} does not match the checksum in the manifest (corrupt or "
                                f"modified): {self.remedy}")
            self.verified.add(i)

    def iter_chunks(self, verify: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Every chunk in order, memory-mapped."""
        for i in range(len(self.chunks)):
            yield self.load(i, verify)

    def context(self, chunk: int, row: int, before: int = 10, after: int = 4) -> tuple[list[int], int]:
        """Token ids around row `row` of chunk `chunk` (window clipped to its sequence) and the row's index in it."""
        require_tokens(self.manifest, self.root / self.hook, "HookData.context")
        t = self.load(chunk)
        seq, pos = int(t["sequence_ids"][row]), int(t["positions"][row])
        ctx, _ = mmap_tensors(self.root / CONTEXTS / f"{chunk}.safetensors")
        where = (ctx["sequence_ids"] == seq).nonzero()
        if len(where) == 0:
            raise UserError(f"sequence {seq} is missing from {self.root / CONTEXTS}/{chunk}.safetensors")
        tokens = ctx["tokens"][int(where[0, 0])]
        lo, hi = max(0, pos - before), min(len(tokens), pos + after + 1)
        return tokens[lo:hi].tolist(), pos - lo


def has_tokens(manifest: dict[str, Any]) -> bool:
    """Whether a dataset folder's chunks hold token ids, sequence ids and positions, with contexts/ beside them."""
    return bool(manifest.get("has_tokens", True))


def require_tokens(manifest: dict[str, Any], where: str | Path, tool: str, alternative: str = "") -> None:
    """A one-line UserError when the folder `where` holds imported activations without token ids."""
    if not has_tokens(manifest):
        raise UserError(f"{where} holds imported activations without token ids: {tool} needs a folder written by "
                        f"generate_test_data.py{', or ' + alternative if alternative else ''}")


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of dataset folder `root`; a missing one is a UserError."""
    path = root / MANIFEST
    if not path.exists():
        raise UserError(f"no {MANIFEST} in {root}: not a dataset folder written by generate_test_data.py")
    return json.loads(path.read_text())


def remove_dataset(root: Path) -> None:
    """Delete the dataset in folder `root`: its manifest first, then its chunk folders and contexts/."""
    try:
        hooks = list(json.loads((root / MANIFEST).read_text()).get("hooks", {}))
    except (OSError, ValueError):
        hooks = []
    (root / MANIFEST).unlink(missing_ok=True)
    for name in hooks + [CONTEXTS]:
        if name and "/" not in name and name not in (".", ".."):
            shutil.rmtree(root / name, ignore_errors=True)


def list_hooks(root: str | Path) -> list[str]:
    """Hook names stored in dataset folder `root`."""
    return list(read_manifest(Path(root))["hooks"])


def open_hook(path: str | Path, hook: str | None = None) -> HookData:
    """Open one hook's chunks, given its folder (`{root}/{hook}`) or the root and the hook name."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset folder {path} does not exist: run generate_test_data.py first")
    if hook is None and not (path / MANIFEST).exists() and (path.parent / MANIFEST).exists():
        root, hook = path.parent, path.name
    else:
        root = path
    manifest = read_manifest(root)
    hooks = manifest["hooks"]
    if hook is None:
        if len(hooks) != 1:
            raise UserError(f"{root} holds several hooks; name one folder: "
                            + ", ".join(str(root / h) for h in hooks))
        hook = next(iter(hooks))
    if hook not in hooks:
        raise UserError(f"hook {hook!r} is not in {root}; it has: {', '.join(hooks)}")
    chunks = [ChunkInfo(root / hook / c["file"], c["rows"], c["sha256"]) for c in hooks[hook]["chunks"]]
    if not chunks:
        raise UserError(f"{root / hook} has no complete chunk yet: run generate_test_data.py to completion")
    return HookData(root, hook, hooks[hook]["d"], chunks, manifest)
