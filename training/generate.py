"""Stage 1: run a language model over text and write activation chunks (see `training/chunks.py`)."""

from __future__ import annotations

import errno
import itertools
import json
import queue
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

import training
from training.chunks import (CONTEXTS, FORMAT_VERSION, MANIFEST, atomic_write_json, has_tokens, read_manifest,
                             remove_dataset, save_tensors)
from training.cli import UserError, config_diff, config_from_dict, config_to_dict
from training.distributed import session
from training.hooks import LOCATIONS, flatten_heads, resolve_hooks, stop_at_layer
from training.locks import folder_lock
from training.models import DEFAULT_MODEL, load_model, model_fingerprint, resolve_device
from training.prefetch import Prefetch
from training.repair import damaged_chunks
from training.sae_hooks import capture as hooks_capture
from training.text import iter_documents, pack_token_rows, special_token_ids
from training.transfer import Landing, to_device

PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class GenerateConfig:
    """Everything that decides the contents of a dataset folder (saved in its manifest)."""

    model: str = DEFAULT_MODEL
    """Model: a hub name (e.g. EleutherAI/pythia-70m-deduped) or a local Hugging Face folder."""
    dataset: str = "python-docs"
    """Text: a hub dataset name, a local .txt/.jsonl/.parquet file or folder, or python-docs (built in)."""
    dataset_split: str = "train"
    """Dataset split to read."""
    text_column: str | None = None
    """Column holding the text (default: detected; input_ids/tokens columns are used as they are)."""
    streaming: bool = False
    """Stream a hub dataset instead of downloading it whole."""
    dataset_folder: str = "activation_data"
    """Output folder: one sub-folder of chunks per hook, plus manifest.json."""
    layers: list[int] = field(default_factory=lambda: [0])
    """Layers to read activations from."""
    locations: list[str] = field(default_factory=lambda: ["residual"],
                                 metadata={"choices": list(LOCATIONS)})
    """Where in each layer: residual, mlp, mlpout, attn_concat, attn_out."""
    hooks: list[str] | None = None
    """Raw TransformerLens hook names, in addition to --layers x --locations."""
    n_chunks: int = 4
    """Number of chunks to write per hook (fewer if the dataset runs out)."""
    chunk_size: int = 131072
    """Rows (tokens) per chunk."""
    context_length: int = 128
    """Tokens per sequence fed to the model."""
    batch_size: int = 32
    """Sequences per forward pass."""
    skip_special_tokens: bool = True
    """Leave BOS/EOS/pad positions out of the dumped activations."""
    precision: str = field(default="float16", metadata={"choices": list(PRECISIONS)})
    """Storage precision of the activations."""
    dtype: str = field(default="float32", metadata={"choices": list(PRECISIONS)})
    """Precision the model runs in."""
    device: str | None = None
    """cpu, cuda, cuda:N or mps (default: cuda when available)."""
    seed: int = 0
    """Seed of the within-chunk row shuffle."""
    overwrite: bool = False
    """Replace an existing dataset folder whose manifest has other settings."""


# Settings that may differ on a resumed run: they do not change what is in the chunks.
RESUMABLE_CHANGES = ("n_chunks", "overwrite", "dataset_folder")


@dataclass
class Summary:
    """What a generation run wrote."""

    folder: Path
    hooks: list[str]
    chunks: int
    tokens: int
    bytes_written: int
    seconds: float
    repaired: int = 0
    """Listed chunks found missing or corrupt and rewritten."""
    already_complete: bool = False
    """The folder held every chunk asked for: no new chunk was written (`tokens` is then 0)."""

    def __str__(self) -> str:
        repaired = f"; repaired {self.repaired} missing or corrupt chunk(s)" if self.repaired else ""
        if self.already_complete:
            return (f"{self.folder} is already complete ({self.chunks} chunk(s) per hook)"
                    + (repaired or "; every chunk matches the manifest, nothing to do"))
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (f"wrote {self.tokens:,} tokens in {self.chunks} chunk(s) per hook for {len(self.hooks)} hook(s), "
                f"{self.bytes_written / 1e9:.2f} GB, {rate:,.0f} tokens/s, into {self.folder}{repaired}\n  hooks: "
                + ", ".join(self.hooks))


def token_batches(cfg: GenerateConfig, tokenizer: Any) -> Iterator[torch.Tensor]:
    """Packed token rows of the dataset, `batch_size` sequences at a time: [batch, context_length] int64."""
    docs = iter_documents(cfg.dataset, cfg.dataset_split, cfg.text_column, cfg.streaming)
    rows = pack_token_rows(docs, tokenizer, cfg.context_length)
    while batch := list(itertools.islice(rows, cfg.batch_size)):
        yield torch.stack([torch.as_tensor(r, dtype=torch.long) for r in batch])


def capture(model: Any, tokens: torch.Tensor, hooks: Sequence[str], stop: int | None) -> dict[str, torch.Tensor]:
    """Activations [batch, seq, d] at every hook from one forward pass that stops after the last needed block."""
    _, acts = hooks_capture(model, tokens, hooks, stop)
    return {h: flatten_heads(acts[h]) for h in hooks}


def chunk_pieces(fill: int, n: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, stop) of the runs of n new rows that go into one chunk each, the current one holding `fill` rows."""
    pieces, start = [], 0
    while start < n:
        stop = min(n, start + chunk_size - fill)
        pieces.append((start, stop))
        start, fill = stop, 0
    return pieces


@dataclass
class PlannedBatch:
    """One token batch prepared on the host: what the model runs on and which of its rows go into chunks."""

    index: int
    tokens: torch.Tensor        # [b, ctx] int64
    kept: torch.Tensor          # [k] int64: flat positions kept (special tokens and resumed rows left out)
    rows: int                   # how many of them go into chunks (all but in the last batch)
    token_ids: torch.Tensor     # [rows] int32
    sequence_ids: torch.Tensor  # [rows] int64
    positions: torch.Tensor     # [rows] int32
    batch_seq: torch.Tensor     # [b] int64: the batch's sequence ids
    skipped: int                # kept rows that went into chunks before a resume


def plan_batches(batches: Iterable[torch.Tensor], start_batch: int, skip_rows: int, batch_size: int,
                 special: torch.Tensor | None, produced: int, target: int) -> Iterator[PlannedBatch]:
    """Token batches `start_batch`, ... with their kept rows, until `target` rows are produced (from `produced`);
    `special` holds the token ids to leave out (None keeps every position)."""
    for b, tokens in enumerate(batches, start=start_batch):
        seq_ids = torch.arange(tokens.shape[0]) + b * batch_size
        keep = ~torch.isin(tokens, special) if special is not None else torch.ones_like(tokens, dtype=torch.bool)
        if b == start_batch and skip_rows:
            keep.view(-1)[keep.flatten().nonzero()[:skip_rows, 0]] = False
        kept = keep.flatten().nonzero()[:, 0]
        rows = min(len(kept), target - produced)  # the last chunk takes only what it needs
        keep.view(-1)[kept[rows:]] = False
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        yield PlannedBatch(b, tokens, kept, rows, tokens[keep].to(torch.int32),
                           seq_ids[:, None].expand_as(tokens)[keep], pos[keep].to(torch.int32), seq_ids,
                           skip_rows if b == start_batch else 0)
        produced += rows
        if produced >= target:
            return


def launch_batch(model: Any, batch: PlannedBatch, hooks: Sequence[str], stop: int | None, device: torch.device,
                 precision: torch.dtype, fill: int, chunk_size: int) -> tuple[Landing, dict[str, Any]]:
    """Queue the forward pass of `batch` and the selection, cast, statistics and host copies of its rows, without
    waiting for the device: (the copies on their way, the device tensors that the overflow checks may need)."""
    acts = capture(model, to_device(batch.tokens, device), hooks, stop)
    kept = to_device(batch.kept, device)
    pieces = chunk_pieces(fill, batch.rows, chunk_size)
    out: dict[Any, torch.Tensor] = {}
    keep_alive: dict[str, Any] = {}
    for h, a in acts.items():
        exact = a.reshape(-1, a.shape[-1]).index_select(0, kept)
        norms = torch.linalg.vector_norm(exact, dim=1)
        rows = exact.to(precision)
        parts = [exact[i:j].float() for i, j in pieces]
        # column sums as a matmul (fastest), and norm sums, of each piece that goes into one chunk
        out["sums", h] = (torch.stack([(p.new_ones(len(p)) @ p).double() for p in parts]) if parts
                          else exact.new_zeros(0, exact.shape[1], dtype=torch.float64))
        out["norm_sums", h] = (torch.stack([norms[i:j].double().sum() for i, j in pieces]) if pieces
                               else norms.new_zeros(0, dtype=torch.float64))
        # |x_i| <= ||x||: a norm that is not finite, or above the storage maximum, flags rows to look at
        out["flags", h] = torch.stack([~torch.isfinite(norms).all(), (norms > torch.finfo(precision).max).any()])
        out["rows", h] = rows[:batch.rows]
        keep_alive[h] = (exact, rows)
    return Landing(out, device), keep_alive


REMEDY = {"float16": "run it in --dtype bfloat16 or float32", "bfloat16": "run it in --dtype float32",
          "float32": "the model computes them even in float32: check the model"}


def check_overflow(hook: str, flags: torch.Tensor, exact: torch.Tensor, rows: torch.Tensor,
                   precision_name: str) -> None:
    """A UserError when the model's activations or their norms are not finite in the dtype the model ran in, or the
    rows overflow the storage precision (looks at the device tensors only when `flags` [2] says so)."""
    model_dtype = str(exact.dtype).removeprefix("torch.")
    if bool(flags[0]):
        what = ("activations" if not bool(torch.isfinite(exact).all()) else "activation norms")
        raise UserError(f"{what} at {hook} are not finite in {model_dtype}, the dtype the model runs in (--dtype): "
                        f"{REMEDY.get(model_dtype, 'run it in --dtype float32')}")
    if bool(flags[1]) and not bool(torch.isfinite(rows).all()):
        raise UserError(f"activations at {hook} overflow {precision_name} (largest |x| = "
                        f"{exact.abs().max().item():.3g}): use --precision float32 or bfloat16")


def chunk_permutation(seed: int, index: int, n: int) -> torch.Tensor:
    """Where each of the n rows of chunk `index` goes: a seeded permutation [n]."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


class ChunkFiller:
    """Collects the kept rows of every hook into shuffled chunk buffers and hands each full chunk to a writer.

    Row j of chunk i is stored straight at slot perm_i[j] (`chunk_permutation`), so the shuffle costs no extra
    pass; a short last chunk keeps its rows in the order of their slots.
    """

    def __init__(self, widths: dict[str, int], chunk_size: int, precision: torch.dtype, emit: Any,
                 seed: int, first_index: int):
        self.widths, self.chunk_size, self.precision, self.emit = widths, chunk_size, precision, emit
        self.seed, self.index = seed, first_index
        self.contexts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (sequence_ids [b], tokens [b, ctx])
        self._new_buffers()

    def _new_buffers(self) -> None:
        n = self.chunk_size
        self.acts = {h: torch.empty(n, d, dtype=self.precision) for h, d in self.widths.items()}
        self.token_ids = torch.empty(n, dtype=torch.int32)
        self.sequence_ids = torch.empty(n, dtype=torch.int64)
        self.positions = torch.empty(n, dtype=torch.int32)
        self.perm = chunk_permutation(self.seed, self.index, n)
        self.sums = {h: torch.zeros(d, dtype=torch.float64) for h, d in self.widths.items()}  # sum of rows [d]
        self.norm_sums = dict.fromkeys(self.widths, 0.0)                                    # sum of row norms
        self.fill = 0

    def add(self, acts: dict[str, torch.Tensor], sums: dict[str, torch.Tensor], norm_sums: dict[str, torch.Tensor],
            token_ids: torch.Tensor, sequence_ids: torch.Tensor, positions: torch.Tensor, batch_seq: torch.Tensor,
            batch_tokens: torch.Tensor, batch_index: int, skipped: int) -> None:
        """Append the kept rows of batch `batch_index` (sequences `batch_seq` [b], tokens `batch_tokens` [b, ctx]),
        whose first `skipped` kept rows went into an earlier chunk: acts[h] [r, d] in storage precision on the CPU,
        and per piece of the rows that goes into one chunk (`chunk_pieces(self.fill, r, chunk_size)`) the column
        sums sums[h] [pieces, d] and the norm sums norm_sums[h] [pieces] (float64, on the CPU) of the rows as the
        model computed them, for the statistics."""
        self.contexts.append((batch_seq, batch_tokens))
        start, total, piece = 0, len(token_ids), 0
        while start < total:
            take = min(total - start, self.chunk_size - self.fill)
            sl, dst = slice(start, start + take), self.perm[self.fill:self.fill + take]
            for h, a in acts.items():
                self.acts[h].index_copy_(0, dst, a[sl])
                self.sums[h] += sums[h][piece]
                self.norm_sums[h] += float(norm_sums[h][piece])
            self.token_ids.index_copy_(0, dst, token_ids[sl])
            self.sequence_ids.index_copy_(0, dst, sequence_ids[sl])
            self.positions.index_copy_(0, dst, positions[sl])
            self.fill += take
            start += take
            piece += 1
            if self.fill == self.chunk_size:
                self.flush((batch_index, skipped + start))
                self.contexts = [(batch_seq, batch_tokens)]

    def flush(self, resume: tuple[int, int] | None) -> None:
        """Emit the current buffers (possibly a short last chunk) with the point a later run resumes from."""
        if self.fill == 0:
            return
        n = self.fill
        rows = slice(None) if n == self.chunk_size else self.perm[:n].sort().values  # the slots in use
        seqs = torch.cat([s for s, _ in self.contexts])
        toks = torch.cat([t for _, t in self.contexts])
        sequence_ids = self.sequence_ids[rows]
        keep = torch.isin(seqs, sequence_ids.unique())
        self.emit(dict(acts={h: a[rows] for h, a in self.acts.items()}, token_ids=self.token_ids[rows],
                       sequence_ids=sequence_ids, positions=self.positions[rows],
                       context_ids=seqs[keep], context_tokens=toks[keep].to(torch.int32), resume=resume,
                       sums=self.sums, norm_sums=self.norm_sums))
        self.index += 1
        self._new_buffers()


class ChunkWriter(threading.Thread):
    """Background thread that writes and checksums chunks, then records them in the manifest."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        super().__init__(daemon=True)
        self.root, self.manifest = root, manifest
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.bytes_written = 0

    def put(self, item: dict[str, Any]) -> None:
        """Queue a chunk (blocks while the previous one is still being written)."""
        self.check()
        self.queue.put(item)

    def check(self) -> None:
        """Re-raise in the caller an error the writer hit."""
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep taking items, so a main thread blocked in put() wakes and sees the error
            try:
                self.write(item)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def write(self, item: dict[str, Any]) -> None:
        """Write one chunk for every hook, its contexts file, then the manifest (in that order)."""
        index = len(self.manifest["chunks"])
        n = len(item["token_ids"])
        digests, size = write_chunk_files(self.root, index, item, self.manifest["config"]["chunk_size"])
        self.bytes_written += size
        record_chunk(self.manifest, n, digests, item["sums"], item["norm_sums"], item["resume"])
        atomic_write_json(self.root / MANIFEST, self.manifest)


def record_chunk(manifest: dict[str, Any], n: int, digests: dict[str, str], sums: dict[str, torch.Tensor],
                 norm_sums: dict[str, float], resume: Sequence[int] | None) -> None:
    """Add the next chunk (n rows; each hook's file SHA-256, column sums [d] float64 and norm sum) to `manifest`,
    updating each hook's running mean and mean norm (in memory)."""
    index = len(manifest["chunks"])
    partial = n < manifest["config"]["chunk_size"]
    for hook, digest in digests.items():
        entry = manifest["hooks"][hook]
        rows = sum(c["rows"] for c in entry["chunks"])
        mean = torch.tensor(entry["mean"], dtype=torch.float64)
        entry["mean"] = ((mean * rows + sums[hook]) / (rows + n)).tolist()
        entry["mean_norm"] = (entry["mean_norm"] * rows + norm_sums[hook]) / (rows + n)
        entry["chunks"].append({"file": f"{index}.safetensors", "rows": n, "sha256": digest, "partial": partial})
    manifest["chunks"].append({"rows": n, "partial": partial, "resume_at": resume})
    manifest["total_tokens"] += n


def write_chunk_files(root: Path, index: int, item: dict[str, Any], chunk_size: int) -> tuple[dict[str, str], int]:
    """Write chunk `index` of every hook, then its contexts file: ({hook: SHA-256}, bytes written)."""
    n = len(item["token_ids"])
    meta = {"rows": n, "partial": n < chunk_size, "chunk": index}
    shared = {k: item[k] for k in ("token_ids", "sequence_ids", "positions")}
    digests, size = {}, 0
    for hook, acts in item["acts"].items():
        path = root / hook / f"{index}.safetensors"
        digests[hook] = save_tensors(path, {"activations": acts, **shared}, meta)
        size += path.stat().st_size
    ctx_path = root / CONTEXTS / f"{index}.safetensors"
    save_tensors(ctx_path, {"sequence_ids": item["context_ids"], "tokens": item["context_tokens"]}, meta)
    return digests, size + ctx_path.stat().st_size


def new_manifest(cfg: GenerateConfig, model: Any, widths: dict[str, int], argv: Sequence[str]) -> dict[str, Any]:
    """The manifest of an empty dataset folder."""
    return {
        "format_version": FORMAT_VERSION,
        "toolkit_version": training.__version__,
        "command": " ".join(shlex.quote(a) for a in argv),
        "config": config_to_dict(cfg),
        "model": {"name": cfg.model, "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
                  "d_vocab": model.cfg.d_vocab, "fingerprint": model_fingerprint(cfg.model)},
        "special_token_ids": sorted(special_token_ids(model.tokenizer)),
        "has_tokens": True,
        "hooks": {h: {"d": d, "mean": [0.0] * d, "mean_norm": 0.0, "chunks": []} for h, d in widths.items()},
        "chunks": [],
        "total_tokens": 0,
        "finished": False,
        "exhausted": False,
    }


def prepare_folder(cfg: GenerateConfig, root: Path) -> dict[str, Any] | None:
    """The manifest to resume from (None for a fresh start); refuses a folder made with other settings."""
    if not (root / MANIFEST).exists():
        return None
    old = read_manifest(root)
    if not has_tokens(old):
        if not cfg.overwrite:
            raise UserError(f"{root} holds imported activations (import_activations.py), which "
                            "generate_test_data.py cannot resume: pass --overwrite to replace them, or another "
                            "--dataset_folder")
        remove_dataset(root)
        return None
    if not old["chunks"]:  # a run that wrote nothing (an older version's failed start): nothing to keep
        remove_dataset(root)
        return None
    diff = config_diff(config_from_dict(GenerateConfig, old["config"]), cfg, ignore=RESUMABLE_CHANGES)
    if old["model"].get("fingerprint") != model_fingerprint(cfg.model):
        diff["model weights"] = ("other weights", "the model's current weights")
    if diff and not cfg.overwrite:
        detail = "; ".join(f"{k}: folder has {a!r}, asked {b!r}" for k, (a, b) in sorted(diff.items()))
        raise UserError(f"{root} was made with other settings ({detail}): pass the same flags to resume, "
                        "--overwrite to replace it, or another --dataset_folder")
    if cfg.overwrite and diff:
        remove_dataset(root)
        return None
    return old


def bytes_needed(cfg: GenerateConfig, widths: dict[str, int], n_new: int) -> int:
    """About how many bytes `n_new` more chunks take on disk (every hook's file and the contexts)."""
    bytes_per_row = sum(widths.values()) * PRECISIONS[cfg.precision].itemsize + 16 * (len(widths) + 1)
    return n_new * cfg.chunk_size * bytes_per_row


def check_disk_space(root: Path, cfg: GenerateConfig, widths: dict[str, int], n_new: int) -> None:
    """Refuse up front a run whose chunks would not fit on the disk."""
    need = bytes_needed(cfg, widths, n_new)
    free = shutil.disk_usage(root).free
    if need > free:
        raise UserError(f"{n_new} more chunk(s) need about {need / 1e9:.1f} GB but {root} has "
                        f"{free / 1e9:.1f} GB free: lower --n_chunks or --chunk_size, or choose another folder")


def land_batch(filler: ChunkFiller, batch: PlannedBatch, landing: Landing, keep_alive: dict[str, Any],
               precision_name: str) -> int:
    """Wait for the host copies of `batch` (the one sync), check them for overflow and add its rows to the chunks;
    returns the rows added."""
    host = landing.wait()
    for h, (exact, rows) in keep_alive.items():
        check_overflow(h, host["flags", h], exact, rows, precision_name)
    hooks = list(keep_alive)
    filler.add({h: host["rows", h] for h in hooks}, {h: host["sums", h] for h in hooks},
               {h: host["norm_sums", h] for h in hooks}, batch.token_ids, batch.sequence_ids, batch.positions,
               batch.batch_seq, batch.tokens, batch.index, batch.skipped)
    return batch.rows


def run_batches(model: Any, plans: Iterable[PlannedBatch], filler: ChunkFiller, hooks: Sequence[str],
                stop: int | None, device: torch.device, cfg: GenerateConfig, landed: Callable[[int], None]) -> int:
    """Run the model over the planned batches into `filler`, the device computing one batch while the host lands
    the previous one; calls `landed(rows)` after each; returns the rows added."""
    precision = PRECISIONS[cfg.precision]
    produced = 0
    with torch.inference_mode(), Prefetch(plans, depth=2) as batches:
        in_flight: tuple[PlannedBatch, Landing, dict[str, Any]] | None = None
        fill = 0
        for batch in itertools.chain(batches, [None]):  # None: land the last batch
            launched = None
            if batch is not None:
                launched = (batch, *launch_batch(model, batch, hooks, stop, device, precision, fill, cfg.chunk_size))
                fill = (fill + batch.rows) % cfg.chunk_size
            if in_flight is not None:  # the host's share of the previous batch, while the device runs this one
                rows = land_batch(filler, *in_flight, cfg.precision)
                produced += rows
                landed(rows)
            in_flight = launched
    return produced


def plan_from(cfg: GenerateConfig, model: Any, manifest: dict[str, Any], resume_at: Sequence[int], produced: int,
              target: int) -> Iterator[PlannedBatch]:
    """The planned batches from `resume_at` (batch, kept rows to skip) until `target` rows (from `produced`)."""
    start_batch, skip_rows = resume_at
    special = torch.tensor(manifest["special_token_ids"], dtype=torch.long)
    return plan_batches(itertools.islice(token_batches(cfg, model.tokenizer), start_batch, None), start_batch,
                        skip_rows, cfg.batch_size, special if cfg.skip_special_tokens else None, produced, target)


def regenerate_chunk(cfg: GenerateConfig, root: Path, manifest: dict[str, Any], index: int, model: Any,
                     hooks: Sequence[str], stop: int | None, device: torch.device, widths: dict[str, int]) -> None:
    """Compute chunk `index` again from the point the chunk before it ends and rewrite its files: chunks are
    deterministic, so they come out as the manifest lists them (checked)."""
    before = sum(c["rows"] for c in manifest["chunks"][:index])
    target = before + manifest["chunks"][index]["rows"]
    items: list[dict[str, Any]] = []
    filler = ChunkFiller(widths, cfg.chunk_size, PRECISIONS[cfg.precision], items.append, cfg.seed, index)
    resume_at = manifest["chunks"][index - 1]["resume_at"] if index else (0, 0)
    run_batches(model, plan_from(cfg, model, manifest, resume_at, before, target), filler, hooks, stop, device, cfg,
                lambda rows: None)
    filler.flush(None)
    digests, _ = write_chunk_files(root, index, items[0], cfg.chunk_size)
    for hook, digest in digests.items():
        if digest != manifest["hooks"][hook]["chunks"][index]["sha256"]:
            raise UserError(f"chunk {index} of {root / hook} came out different from the one the manifest lists (the "
                            "model or the software changed since): regenerate the folder with --overwrite")


def repair(cfg: GenerateConfig, root: Path, manifest: dict[str, Any], model: Any, hooks: Sequence[str],
           stop: int | None, device: torch.device, widths: dict[str, int]) -> int:
    """Check every chunk the manifest lists and rewrite the missing or corrupt ones; returns how many."""
    damaged = damaged_chunks(root, manifest)
    for hook in hooks:
        (root / hook).mkdir(exist_ok=True)
    (root / CONTEXTS).mkdir(exist_ok=True)
    for index, problems in damaged.items():
        print(f"repairing chunk {index} ({', '.join(problems)})", file=sys.stderr)
        regenerate_chunk(cfg, root, manifest, index, model, hooks, stop, device, widths)
    return len(damaged)


def generate(cfg: GenerateConfig, argv: Sequence[str] | None = None) -> Summary:
    """Write (or resume writing) the dataset folder described by `cfg`."""
    for name in ("n_chunks", "chunk_size", "context_length", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
    argv = list(sys.argv if argv is None else argv)
    root = Path(cfg.dataset_folder)
    with session() as shard:          # under torchrun: this rank's share of the chunks (write_dataset_split)
        device = resolve_device(shard.device(cfg.device))
        model = load_model(cfg.model, device, cfg.dtype)
        hooks, stop, widths = check_model(cfg, model, device)
        check_dataset(cfg)
        # one writer per dataset folder (rank 0 holds the lock for the whole job); nothing is written before the
        # inputs are checked
        with shard.main_context(lambda: folder_lock(root)):
            if shard.world_size == 1 and not (root / PARTS).is_dir():
                return write_dataset(cfg, root, model, hooks, stop, widths, device, argv)
            return write_dataset_split(cfg, root, model, hooks, stop, widths, device, argv, shard)


def check_model(cfg: GenerateConfig, model: Any, device: torch.device) -> tuple[list[str], int | None, dict[str, int]]:
    """The hooks to read, the block to stop after and each hook's width; a UserError for hooks or a context
    length the model does not have."""
    n_layers = model.cfg.n_layers
    hooks = resolve_hooks(list(model.hook_dict), n_layers, cfg.layers, cfg.locations, cfg.hooks)
    stop = stop_at_layer(hooks, n_layers)
    if cfg.context_length > model.cfg.n_ctx:
        raise UserError(f"--context_length {cfg.context_length} exceeds the model's {model.cfg.n_ctx} positions")
    probe = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.inference_mode():
        widths = {h: a.shape[-1] for h, a in capture(model, probe, hooks, stop).items()}
    return hooks, stop, widths


def check_dataset(cfg: GenerateConfig) -> None:
    """Open the dataset and read its first document: a UserError (missing file, no text column, unknown split, no
    document at all) comes before anything is written."""
    if next(iter_documents(cfg.dataset, cfg.dataset_split, cfg.text_column, cfg.streaming), None) is None:
        raise UserError(f"dataset {cfg.dataset!r} (split {cfg.dataset_split!r}) is empty: give a dataset with text")


def write_dataset(cfg: GenerateConfig, root: Path, model: Any, hooks: list[str], stop: int | None,
                  widths: dict[str, int], device: torch.device, argv: Sequence[str]) -> Summary:
    """Write (or resume writing) the chunks of `hooks` into the locked folder `root`; a run that ends (or fails)
    with no chunk in the folder leaves no dataset behind, so it cannot block the corrected rerun."""
    try:
        summary = extend_dataset(cfg, root, model, hooks, stop, widths, device, argv)
    except BaseException as e:
        if holds_no_chunk(root):
            remove_dataset(root)
        if isinstance(e, OSError) and (plain := disk_error(e, cfg, root, widths)) is not None:
            raise plain from None
        raise
    if summary.chunks == 0:
        remove_dataset(root)
        raise UserError(f"dataset {cfg.dataset!r} (split {cfg.dataset_split!r}) gives no token to store (shorter "
                        f"than --context_length {cfg.context_length}, or only special tokens): give a dataset with "
                        "more text")
    return summary


def chunks_on_disk(root: Path) -> int:
    """How many chunks the manifest in `root` lists (0 when there is none or it cannot be read)."""
    try:
        return len(json.loads((root / MANIFEST).read_text())["chunks"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def disk_error(e: OSError, cfg: GenerateConfig, root: Path, widths: dict[str, int]) -> UserError | None:
    """The one-line error for a full disk or a read-only folder met while writing `root` (None for others)."""
    where = e.filename or root
    if e.errno == errno.ENOSPC:
        n_new = max(1, cfg.n_chunks - chunks_on_disk(root))
        return UserError(f"the disk is full: no space left writing {where}; the {n_new} chunk(s) still to write "
                         f"need about {bytes_needed(cfg, widths, n_new) / 1e9:.2f} GB on the disk of {root}: free "
                         "space there (or choose another --dataset_folder) and rerun the same command to resume")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"{where} is read-only ({e.strerror}): make {root} writable or choose another "
                         "--dataset_folder")
    return None


def remove_stale_tmp(root: Path, hooks: Sequence[str]) -> None:
    """Delete the .tmp files that a killed run left in `root` (the folder is locked: no writer owns them)."""
    for folder in [root, *(root / h for h in hooks), root / CONTEXTS]:
        for tmp in folder.glob("*.tmp") if folder.is_dir() else ():
            tmp.unlink(missing_ok=True)


def holds_no_chunk(root: Path) -> bool:
    """Whether `root` has a Stage 1 manifest that lists no chunk (False when it cannot be read: left alone)."""
    try:
        return not json.loads((root / MANIFEST).read_text())["chunks"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def extend_dataset(cfg: GenerateConfig, root: Path, model: Any, hooks: list[str], stop: int | None,
                   widths: dict[str, int], device: torch.device, argv: Sequence[str]) -> Summary:
    """Repair the chunks already in `root`, then write the ones still missing."""
    remove_stale_tmp(root, hooks)
    manifest = prepare_folder(cfg, root)
    repaired = 0 if manifest is None else repair(cfg, root, manifest, model, hooks, stop, device, widths)
    if manifest is None:
        manifest = new_manifest(cfg, model, widths, argv)
    manifest["config"]["n_chunks"] = cfg.n_chunks
    done = len(manifest["chunks"])
    if done >= cfg.n_chunks or manifest.get("exhausted"):
        return Summary(root, hooks, done, 0, 0, 0.0, repaired, already_complete=True)
    check_disk_space(root, cfg, widths, cfg.n_chunks - done)
    for h in hooks:
        (root / h).mkdir(exist_ok=True)
    (root / CONTEXTS).mkdir(exist_ok=True)
    manifest["finished"] = False
    atomic_write_json(root / MANIFEST, manifest)

    writer = ChunkWriter(root, manifest)
    writer.start()
    target = cfg.n_chunks * cfg.chunk_size
    written_before = manifest["total_tokens"]
    t0 = time.perf_counter()
    bar = tqdm(total=target, initial=written_before, unit="tok", unit_scale=True, desc="generating",
               dynamic_ncols=True)

    def landed(rows: int) -> None:
        bar.update(rows)
        writer.check()

    filler = ChunkFiller(widths, cfg.chunk_size, PRECISIONS[cfg.precision], writer.put, cfg.seed, done)
    plans = plan_from(cfg, model, manifest, manifest["chunks"][-1]["resume_at"] if done else (0, 0),
                      written_before, target)
    try:
        produced = written_before + run_batches(model, plans, filler, hooks, stop, device, cfg, landed)
        filler.flush(None)
        writer.queue.put(None)
        writer.join()
        writer.check()
    finally:
        bar.close()
        if writer.is_alive():
            writer.queue.put(None)
            writer.join()
    manifest["finished"] = True
    manifest["exhausted"] = produced < target
    atomic_write_json(root / MANIFEST, manifest)
    return Summary(root, hooks, len(manifest["chunks"]), manifest["total_tokens"] - written_before,
                   writer.bytes_written, time.perf_counter() - t0, repaired)


# ------------------------------------------------------------------------------------- several ranks (torchrun)

PARTS = ".parts"
"""Folder of a dataset where the ranks of a distributed run record each chunk they wrote (`<index>.json`); rank 0
merges the records into the manifest, in chunk order, and removes the folder when the run ends."""


@dataclass
class ChunkPlan:
    """Where chunk `index` lies in the token stream, from the tokenisation alone (no model run)."""

    index: int
    start: tuple[int, int]
    """(batch, kept rows of that batch to skip) where the chunk begins."""
    before: int
    """Rows of the dataset before the chunk."""
    rows: int
    resume: tuple[int, int] | None
    """Where the next chunk begins (None after a short last chunk), as the manifest records it."""


def plan_chunks(cfg: GenerateConfig, model: Any, manifest: dict[str, Any]) -> list[ChunkPlan]:
    """Every chunk of the dataset `cfg` describes (at most --n_chunks), from one pass of the tokeniser: the kept rows
    of each batch decide which rows make up each chunk, exactly as one process fills them."""
    size, target = cfg.chunk_size, cfg.n_chunks * cfg.chunk_size
    special = torch.tensor(manifest["special_token_ids"], dtype=torch.long) if cfg.skip_special_tokens else None
    plans: list[ChunkPlan] = []
    produced, start = 0, (0, 0)
    for b, tokens in enumerate(token_batches(cfg, model.tokenizer)):
        kept = int((~torch.isin(tokens, special)).sum()) if special is not None else tokens.numel()
        taken = 0
        while taken < kept and produced < target:
            take = min(kept - taken, size - produced % size, target - produced)
            taken, produced = taken + take, produced + take
            if produced % size == 0:
                plans.append(ChunkPlan(len(plans), start, produced - size, size, (b, taken)))
                start = (b, taken)
        if produced >= target:
            break
    if produced % size:
        plans.append(ChunkPlan(len(plans), start, produced - produced % size, produced % size, None))
    return plans


class TokenStream:
    """The dataset's token batches read once, in order, by chunks that each start at some batch (the last batch
    handed out is kept, since the next chunk may begin inside it)."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self._it = iter(batches)
        self._next = 0
        self._last: tuple[int, torch.Tensor] | None = None

    def starting_at(self, b: int) -> Iterator[torch.Tensor]:
        """Batches b, b + 1, ... (b at least the last batch handed out)."""
        if self._last is not None and self._last[0] == b:
            yield self._last[1]
        else:
            if self._next > b:
                raise ValueError(f"batch {b} was passed already")
            while self._next < b:
                if next(self._it, None) is None:
                    return
                self._next += 1
        for tokens in self._it:
            self._last = (self._next, tokens)
            self._next += 1
            yield tokens


def compute_chunk(cfg: GenerateConfig, model: Any, plan: ChunkPlan, stream: TokenStream,
                  special: torch.Tensor | None, hooks: Sequence[str], stop: int | None, device: torch.device,
                  widths: dict[str, int], landed: Callable[[int], None]) -> dict[str, Any]:
    """Run the model over the batches of chunk `plan` alone: the chunk's item as `ChunkFiller` emits it."""
    items: list[dict[str, Any]] = []
    filler = ChunkFiller(widths, cfg.chunk_size, PRECISIONS[cfg.precision], items.append, cfg.seed, plan.index)
    plans = plan_batches(stream.starting_at(plan.start[0]), plan.start[0], plan.start[1], cfg.batch_size, special,
                         plan.before, plan.before + plan.rows)
    run_batches(model, plans, filler, hooks, stop, device, cfg, landed)
    filler.flush(None)
    item = items[0]
    got = None if item["resume"] is None else tuple(item["resume"])
    if len(item["token_ids"]) != plan.rows or got != plan.resume:
        raise RuntimeError(f"chunk {plan.index} came out with {len(item['token_ids'])} rows ending at {got}, planned "
                           f"{plan.rows} ending at {plan.resume}")
    return item


def write_part(root: Path, index: int, rank: int, digests: dict[str, str], item: dict[str, Any], size: int) -> None:
    """Record chunk `index`, just written by `rank`, in PARTS/<index>.json (atomically)."""
    atomic_write_json(root / PARTS / f"{index}.json", {
        "index": index, "rank": rank, "rows": len(item["token_ids"]), "resume_at": item["resume"],
        "sha256": digests, "sums": {h: t.tolist() for h, t in item["sums"].items()},
        "norm_sums": item["norm_sums"], "bytes": size})


def read_parts(root: Path, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """{index: record} of the chunks in PARTS beyond the manifest whose files are on disk with their checksums (a
    record of a chunk that a killed rank did not finish is dropped: the chunk is computed again)."""
    from training.chunks import file_sha256
    found: dict[int, dict[str, Any]] = {}
    done = len(manifest["chunks"])
    for path in sorted((root / PARTS).glob("*.json")) if (root / PARTS).is_dir() else ():
        try:
            part = json.loads(path.read_text())
            index = int(part["index"])
            ok = index >= done and set(part["sha256"]) == set(manifest["hooks"]) and all(
                (root / h / f"{index}.safetensors").is_file()
                and file_sha256(root / h / f"{index}.safetensors") == d for h, d in part["sha256"].items())
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok:
            found[index] = part
        else:
            path.unlink(missing_ok=True)
    return found


def merge_parts(root: Path, manifest: dict[str, Any], parts: dict[int, dict[str, Any]]) -> None:
    """Move the records that continue the manifest's chunks, in chunk order, from `parts` into `manifest` (in
    memory), removing their files from PARTS."""
    while (index := len(manifest["chunks"])) in parts:
        part = parts.pop(index)
        sums = {h: torch.tensor(v, dtype=torch.float64) for h, v in part["sums"].items()}
        resume = None if part["resume_at"] is None else tuple(part["resume_at"])
        record_chunk(manifest, part["rows"], part["sha256"], sums, part["norm_sums"], resume)
        (root / PARTS / f"{index}.json").unlink(missing_ok=True)


def take_in_parts(root: Path) -> None:
    """Merge into the manifest of `root` the chunks that a killed distributed run recorded in PARTS and that continue
    its chunks (before the manifest is checked, so that a run killed before its first merge keeps its chunks)."""
    if not (root / PARTS).is_dir() or not (root / MANIFEST).is_file():
        return
    try:
        manifest = read_manifest(root)
        parts = read_parts(root, manifest)
    except (OSError, ValueError, KeyError, TypeError):
        return                                             # prepare_folder reports a damaged manifest
    if len(manifest["chunks"]) in parts:
        merge_parts(root, manifest, parts)
        atomic_write_json(root / MANIFEST, manifest)


@dataclass
class SplitStart:
    """What rank 0 hands every rank before the chunks are shared out."""

    manifest: dict[str, Any]
    parts: list[int]
    """Chunks beyond the manifest already written (by a killed distributed run)."""
    repaired: int
    complete: bool


def start_split(cfg: GenerateConfig, root: Path, model: Any, hooks: list[str], stop: int | None,
                widths: dict[str, int], device: torch.device, argv: Sequence[str]) -> SplitStart:
    """Rank 0's share of the start: check and repair the chunks already in the locked `root`, take in what a killed
    distributed run recorded, and publish the manifest of the run."""
    remove_stale_tmp(root, hooks)
    take_in_parts(root)
    manifest = prepare_folder(cfg, root)
    repaired = 0 if manifest is None else repair(cfg, root, manifest, model, hooks, stop, device, widths)
    if manifest is None:
        shutil.rmtree(root / PARTS, ignore_errors=True)
        manifest = new_manifest(cfg, model, widths, argv)
    manifest["config"]["n_chunks"] = cfg.n_chunks
    parts = read_parts(root, manifest)
    merge_parts(root, manifest, parts)
    done = len(manifest["chunks"])
    if done >= cfg.n_chunks or manifest.get("exhausted"):
        shutil.rmtree(root / PARTS, ignore_errors=True)
        return SplitStart(manifest, [], repaired, True)
    check_disk_space(root, cfg, widths, cfg.n_chunks - done - len(parts))
    for h in hooks:
        (root / h).mkdir(exist_ok=True)
    (root / CONTEXTS).mkdir(exist_ok=True)
    (root / PARTS).mkdir(exist_ok=True)
    manifest["finished"] = False
    atomic_write_json(root / MANIFEST, manifest)
    return SplitStart(manifest, sorted(parts), repaired, False)


def finish_split(root: Path, manifest: dict[str, Any], plans: list[ChunkPlan], shares: list[list[int]]) -> None:
    """Rank 0's share of the end: merge every rank's records into the manifest, mark it finished (and exhausted when
    the text ran out), record how the work was split, publish it and remove PARTS."""
    parts = read_parts(root, manifest)
    merge_parts(root, manifest, parts)
    if len(manifest["chunks"]) != len(plans):
        raise UserError(f"{root}: chunks {sorted(set(range(len(plans))) - set(range(len(manifest['chunks']))))} "
                        "are missing after every rank finished (is --dataset_folder on a filesystem that every node "
                        "shares?): rerun the same command to complete them")
    manifest["finished"] = True
    manifest["exhausted"] = sum(p.rows for p in plans) < manifest["config"]["n_chunks"] * manifest["config"][
        "chunk_size"]
    runs = manifest.setdefault("distributed", {"runs": []})["runs"]
    runs.append({"world_size": len(shares), "rank_chunks": shares})
    atomic_write_json(root / MANIFEST, manifest)
    shutil.rmtree(root / PARTS, ignore_errors=True)


def write_dataset_split(cfg: GenerateConfig, root: Path, model: Any, hooks: list[str], stop: int | None,
                        widths: dict[str, int], device: torch.device, argv: Sequence[str], shard: Any) -> Summary:
    """Write the missing chunks of `root` with the work split by chunk across the ranks of `shard`: every rank plans
    the chunks from the tokeniser, runs the model for its share only and records each chunk it writes; rank 0 (which
    holds the folder's lock) merges the records into one manifest. The folder is the one a single process writes."""
    start: SplitStart = shard.on_main(start_split, cfg, root, model, hooks, stop, widths, device, argv)
    manifest = start.manifest
    if start.complete:
        return Summary(root, hooks, len(manifest["chunks"]), 0, 0, 0.0, start.repaired, already_complete=True)
    t0 = time.perf_counter()
    plans = plan_chunks(cfg, model, manifest)
    if not plans:
        raise UserError(f"dataset {cfg.dataset!r} (split {cfg.dataset_split!r}) gives no token to store (shorter "
                        f"than --context_length {cfg.context_length}, or only special tokens): give a dataset with "
                        "more text")
    todo = [p for p in plans[len(manifest["chunks"]):] if p.index not in start.parts]
    shares = [[p.index for p in todo[r::shard.world_size]] for r in range(shard.world_size)]
    mine = [p for p in todo if p.index in set(shares[shard.rank])]
    special = torch.tensor(manifest["special_token_ids"], dtype=torch.long) if cfg.skip_special_tokens else None
    stream = TokenStream(token_batches(cfg, model.tokenizer))
    bar = tqdm(total=sum(p.rows for p in mine), unit="tok", unit_scale=True, dynamic_ncols=True,
               desc=f"generating ({shard.world_size} ranks; rank 0's share)", disable=not shard.is_main)
    written = 0
    try:
        for plan in mine:
            item = compute_chunk(cfg, model, plan, stream, special, hooks, stop, device, widths, bar.update)
            digests, size = write_chunk_files(root, plan.index, item, cfg.chunk_size)
            write_part(root, plan.index, shard.rank, digests, item, size)
            written += size
    finally:
        bar.close()
    written = sum(shard.all_gather(written))
    shard.on_main(finish_split, root, manifest, plans, shares)
    return Summary(root, hooks, len(plans), sum(p.rows for p in todo), written, time.perf_counter() - t0,
                   start.repaired)
