"""A frozen copy of Stage 1's batch loop as of commit 63f03a3 (before the loop was pipelined): the reference that
tests/test_generate_pipeline.py checks the current `training.generate.generate` against, byte for byte.

Only the per-batch loop and the chunk filler are copied; the helpers around them (tokenising, the forward pass,
the writer, the manifest) are imported, so the two differ exactly in the code this copy freezes. Do not edit
(`capture` is looked up on training.generate at each call, so that tests may patch it for both).
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from training.chunks import CONTEXTS, MANIFEST, atomic_write_json
from training.cli import UserError
import training.generate as _gen
from training.generate import (PRECISIONS, ChunkWriter, GenerateConfig, Summary, check_disk_space,
                               chunk_permutation, new_manifest, prepare_folder, token_batches)
from training.hooks import resolve_hooks, stop_at_layer
from training.models import load_model, resolve_device


class LegacyChunkFiller:
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

    def add(self, acts: dict[str, torch.Tensor], exact: dict[str, torch.Tensor], norms: dict[str, torch.Tensor],
            token_ids: torch.Tensor,
            sequence_ids: torch.Tensor, positions: torch.Tensor, batch_seq: torch.Tensor,
            batch_tokens: torch.Tensor, batch_index: int, skipped: int) -> None:
        """Append the kept rows of batch `batch_index` (sequences `batch_seq` [b], tokens `batch_tokens` [b, ctx]),
        whose first `skipped` kept rows went into an earlier chunk: acts[h] [r, d] in storage precision on the CPU,
        exact[h] the same rows as the model computed them and norms[h] [r] their norms (any device), for the
        statistics."""
        self.contexts.append((batch_seq, batch_tokens))
        start, total = 0, len(token_ids)
        while start < total:
            take = min(total - start, self.chunk_size - self.fill)
            sl, dst = slice(start, start + take), self.perm[self.fill:self.fill + take]
            for h, a in acts.items():
                self.acts[h].index_copy_(0, dst, a[sl])
                part = exact[h][sl].float()
                self.sums[h] += (part.new_ones(len(part)) @ part).double().cpu()  # column sums; a matmul is fastest
                self.norm_sums[h] += norms[h][sl].double().sum().item()
            self.token_ids.index_copy_(0, dst, token_ids[sl])
            self.sequence_ids.index_copy_(0, dst, sequence_ids[sl])
            self.positions.index_copy_(0, dst, positions[sl])
            self.fill += take
            start += take
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



def legacy_generate(cfg: GenerateConfig, argv: Sequence[str] | None = None) -> Summary:
    """Write (or resume writing) the dataset folder described by `cfg`."""
    for name in ("n_chunks", "chunk_size", "context_length", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
    argv = list(sys.argv if argv is None else argv)
    root = Path(cfg.dataset_folder)
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device, cfg.dtype)
    n_layers = model.cfg.n_layers
    hooks = resolve_hooks(list(model.hook_dict), n_layers, cfg.layers, cfg.locations, cfg.hooks)
    stop = stop_at_layer(hooks, n_layers)
    if cfg.context_length > model.cfg.n_ctx:
        raise UserError(f"--context_length {cfg.context_length} exceeds the model's {model.cfg.n_ctx} positions")

    root.mkdir(parents=True, exist_ok=True)
    manifest = prepare_folder(cfg, root)
    probe = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.inference_mode():
        widths = {h: a.shape[-1] for h, a in _gen.capture(model, probe, hooks, stop).items()}
    if manifest is None:
        manifest = new_manifest(cfg, model, widths, argv)
    manifest["config"]["n_chunks"] = cfg.n_chunks
    done = len(manifest["chunks"])
    if done >= cfg.n_chunks or manifest.get("exhausted"):
        print(f"{root} is already complete ({done} chunk(s) per hook); nothing to do")
        return Summary(root, hooks, done, manifest["total_tokens"], 0, 0.0)
    check_disk_space(root, cfg, widths, cfg.n_chunks - done)
    for h in hooks:
        (root / h).mkdir(exist_ok=True)
    (root / CONTEXTS).mkdir(exist_ok=True)
    manifest["finished"] = False
    atomic_write_json(root / MANIFEST, manifest)

    writer = ChunkWriter(root, manifest)
    writer.start()
    start_batch, skip_rows = manifest["chunks"][-1]["resume_at"] if done else (0, 0)
    special = torch.tensor(manifest["special_token_ids"], dtype=torch.long)
    target = cfg.n_chunks * cfg.chunk_size
    precision = PRECISIONS[cfg.precision]
    max_value = torch.finfo(precision).max
    written_before = manifest["total_tokens"]
    t0 = time.perf_counter()
    bar = tqdm(total=target, initial=written_before, unit="tok", unit_scale=True, desc="generating",
               dynamic_ncols=True)

    filler = LegacyChunkFiller(widths, cfg.chunk_size, precision, writer.put, cfg.seed, done)
    produced = written_before
    try:
        batches = itertools.islice(token_batches(cfg, model.tokenizer), start_batch, None)
        with torch.inference_mode():
            for b, tokens in enumerate(batches, start=start_batch):
                seq_ids = torch.arange(tokens.shape[0]) + b * cfg.batch_size
                keep = ~torch.isin(tokens, special) if cfg.skip_special_tokens else torch.ones_like(tokens, dtype=torch.bool)
                if b == start_batch and skip_rows:
                    keep_idx = keep.flatten().nonzero()[:skip_rows, 0]
                    keep.view(-1)[keep_idx] = False
                acts = _gen.capture(model, tokens.to(device), hooks, stop)
                keep_dev = keep.to(device)
                rows, exact, norms = {}, {}, {}
                for h, a in acts.items():
                    exact[h] = a[keep_dev]
                    norms[h] = torch.linalg.vector_norm(exact[h], dim=1)
                    rows[h] = exact[h].to(precision)
                    # |x_i| <= ||x||, so only rows with a large norm need the elementwise overflow check
                    if not norms[h].max() <= max_value and not torch.isfinite(rows[h]).all():
                        raise UserError(f"activations at {h} overflow {cfg.precision} (largest |x| = "
                                        f"{exact[h].abs().max().item():.3g}): use --precision float32 or bfloat16")
                    rows[h] = rows[h].cpu()
                pos = torch.arange(tokens.shape[1]).expand_as(tokens)
                batch_rows = int(keep.sum())
                if produced + batch_rows > target:  # the last chunk takes only what it needs
                    batch_rows = target - produced
                    cut = keep.flatten().nonzero()[batch_rows:, 0]
                    keep.view(-1)[cut] = False
                    rows = {h: r[:batch_rows] for h, r in rows.items()}
                    exact = {h: r[:batch_rows] for h, r in exact.items()}
                    norms = {h: r[:batch_rows] for h, r in norms.items()}
                filler.add(rows, exact, norms, tokens[keep].to(torch.int32), seq_ids[:, None].expand_as(tokens)[keep],
                           pos[keep].to(torch.int32), seq_ids, tokens, b, skip_rows if b == start_batch else 0)
                produced += batch_rows
                bar.update(batch_rows)
                writer.check()
                if produced >= target:
                    break
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
                   writer.bytes_written, time.perf_counter() - t0)
