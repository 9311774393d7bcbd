"""Top-activating examples of every feature of a dictionary, or of every basis direction of the model.

One streaming pass over the activations (Stage 1 chunks, or a model run on text) encodes each batch
with one matmul and keeps, per feature and all features at once, a running top-k of activations
(`torch.topk` over the k kept + the batch's candidates) and a uniform random sample of the tokens it
fires on (the `sample_size` firing tokens with the largest random priority: reservoir sampling by
random keys). Memory is independent of the number of tokens. A second, cheaper pass reads only the
rows inside the context windows of the chosen examples to get each window's per-token activations.

Definitions (n = tokens processed, a_f(t) = activation of feature f on token t):
  density_f  = #{t : a_f(t) > 0} / n
  max_f      = max_t a_f(t)
  top        = the `top_k` tokens with the largest a_f(t) > 0, in decreasing order
  quantiles  = the firing-token sample, sorted by activation and cut into `n_quantiles` bands of equal
               count (band q covers the quantiles [q/Q, (q+1)/Q] of the feature's non-zero activations);
               `per_quantile` examples evenly spaced inside each band
  histogram  = counts of that sample in `histogram_bins` equal bins over [0, max_f]
  neurons (`make_positive_by`):  abs: |x|;  relu: max(x, 0);
               affine: x - min over the processed tokens (shifted so that the minimum is 0; a token
               "fires" when it is above that minimum)
  random     = `n_random` context windows per feature from a pool of 20 * n_random windows around
               uniformly drawn tokens (seeded with seed + 1, independent of the sample above): the
               windows whose largest activation of the feature is smallest, ties in pool order (so
               for a sparse feature: random windows where it does not fire at all); they are the
               non-activating examples of autointerp's detection scoring
  text       = training.render.render_feature_text of the entry (block characters, see training.render)

The file written is features.json, whose format lives in training.feature_file.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from training.chunks import CONTEXTS, HookData, mmap_tensors, open_hook, require_tokens
from training.cli import UserError, config_to_dict
from training.feature_file import FEATURES_JSON, FORMAT, VERSION, round_sig, write_features_json
from training.locks import folder_lock
from training.models import DTYPE_CHOICES, analysis_dtype, manifest_dtype, resolve_device, resolve_model_path
from training.render import render_feature_text
from training.sweep_files import read_sweep_json

POSITIVE_BY = ("abs", "relu", "affine")


@dataclass
class TopActivationsConfig:
    """What to gather the top-activating examples of, from which data, and how many."""

    sweep: str | None = None
    """Sweep folder (basic_l1_sweep.py output) whose dictionary's features to gather."""
    l1: float | None = None
    """L1 penalty of the sweep member to use (L1 sweeps)."""
    k: int | None = None
    """k of the sweep member to use (TopK sweeps)."""
    key: str | None = None
    """Sweep member by its key as written in sweep.json (either kind); not needed for a one-member sweep."""
    sae: str | None = None
    """A pretrained dictionary instead of a sweep member: a SAELens, sparsify or dictionary_learning folder, or hf:OWNER/REPO/PATH (its hook and model unless --hook / --model)."""
    neurons: bool = False
    """Gather the model's own basis directions (neurons or residual dimensions) instead of dictionary features."""
    make_positive_by: str = field(default="abs", metadata={"choices": list(POSITIVE_BY)})
    """--neurons only: abs |x|; relu max(x, 0); affine x - min over the data (shifted so the minimum is 0)."""
    dataset_dir: str | None = None
    """Stage 1 hook folder of stored activations (default: the sweep's dataset_dir)."""
    model: str | None = None
    """Instead of stored activations: run this model (hub name or local folder) on --dataset."""
    dataset: str | None = None
    """Text to run --model on: python-docs, a local file/folder, or a hub dataset."""
    dataset_split: str = "train"
    """Split of --dataset."""
    text_column: str | None = None
    """Text column of --dataset (default: detected)."""
    hook: str | None = None
    """Hook to read with --model (default: the sweep's hook)."""
    context_length: int | None = None
    """Tokens per sequence with --model (default: the sweep's Stage 1 context length, else 128)."""
    tokenizer: str | None = None
    """Tokenizer for decoding stored token ids (default: the model named in the Stage 1 manifest)."""
    n_tokens: int = 2_000_000
    """Tokens to process at most (stored rows in stored order, or tokens of text)."""
    top_k: int = 20
    """Top-activating examples kept per feature."""
    window_before: int = 10
    """Context tokens shown before each example's token."""
    window_after: int = 4
    """Context tokens shown after each example's token."""
    n_quantiles: int = 5
    """Evenly spaced activation-quantile bands to show random examples from."""
    per_quantile: int = 3
    """Examples per quantile band."""
    sample_size: int = 128
    """Firing tokens sampled uniformly at random per feature (source of the quantile examples and histogram)."""
    histogram_bins: int = 24
    """Bins of each feature's activation histogram."""
    n_random: int = 10
    """Least-activating windows kept per feature from a random pool of 20 x this many (autointerp's
    non-activating examples); 0: none."""
    batch_size: int | None = None
    """Rows encoded per matmul (default: about 32M codes per batch, at most 65536 rows)."""
    seed: int = 0
    """Seed of the random sample."""
    device: str | None = None
    """cpu, cuda, cuda:N or mps (default: cuda when available)."""
    dtype: str = field(default="auto", metadata={"choices": list(DTYPE_CHOICES)})
    """Precision to run --model in; auto: the one Stage 1 ran it in (float32 when no manifest records one)."""
    output: str | None = None
    """Output file (or folder to put features.json in); default: {sweep}/features/{l1_X|k_X}/features.json,
    outputs/features/{folder name}/features.json for --sae, or outputs/neurons/{hook}-{make_positive_by}/features.json for --neurons."""


# ------------------------------------------------------------------------------------- what is scored

class Scorer(Protocol):
    """Maps activation rows to non-negative feature activations (raw values for affine neurons)."""

    n_features: int
    all_fire: bool
    """True when every token counts as firing (affine neurons): the random sample is then shared."""

    def codes_t(self, x: Tensor) -> Tensor:
        """Activations of every feature on rows `x [b, d]`, transposed: [n_features, b]."""

    def at(self, x: Tensor, rows: Tensor, feats: Tensor) -> Tensor:
        """Activation of feature feats[s] on row x[rows[s]] for every s: [S] (`rows` ascending)."""


class SaeScorer:
    """Features of a dictionary (L1: ReLU(W(x - c) + b); TopK: the same kept on the k largest pre-activations;
    a module with a `threshold` (BatchTopK, Matryoshka): kept where above it; a module whose `linear_scoring` is
    False, e.g. Gated: its own `encode`, on whole rows)."""

    all_fire = False

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.n_features = module.decoder.shape[0]
        self.module = (None if getattr(module, "linear_scoring", False)
                       else copy.deepcopy(module).to(device, torch.float32).eval())
        if self.module is not None:  # an encoder of another form (e.g. Gated): the module's own encode
            return
        with torch.no_grad():
            self.w = module.encoder_weight().detach().to(device, torch.float32).contiguous()      # [F, d]
            center = module.center.detach().to(device, torch.float32)
            self.b = module.encoder_bias.detach().to(device, torch.float32) - self.w @ center     # [F]
        self.n_features = self.w.shape[0]
        threshold = getattr(module, "threshold", None)       # BatchTopK-style: codes where pre > threshold, each row
        self.threshold = (None if threshold is None
                          else threshold.detach().to(device, torch.float32).expand(self.n_features).contiguous())
        self.k = getattr(module, "k", None) if threshold is None else None

    def codes_t(self, x: Tensor) -> Tensor:
        """[F, b] codes (one matmul; TopK: scatter of the k kept values per row)."""
        if self.module is not None:
            with torch.no_grad():
                return self.module.encode(x).T.contiguous()
        if self.k is None:
            codes = torch.addmm(self.b[:, None], self.w, x.T).relu_()
            return codes if self.threshold is None else codes.mul_(codes > self.threshold[:, None])
        pre = torch.addmm(self.b, x, self.w.T)                                    # [b, F]
        vals, idx = pre.topk(self.k, dim=1)
        out = torch.zeros(self.n_features, x.shape[0], device=x.device)
        cols = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.k)
        out[idx.reshape(-1), cols] = vals.relu_().reshape(-1)
        return out

    def at(self, x: Tensor, rows: Tensor, feats: Tensor, block: int = 65536) -> Tensor:
        """Per-slot activations; L1 by row-feature dot products, TopK by encoding whole rows in blocks."""
        out = torch.empty(len(rows), device=x.device)
        if self.module is not None:
            with torch.no_grad():
                for s in range(0, len(rows), block):
                    out[s:s + block] = self.module.encode(x[rows[s:s + block]]).gather(
                        1, feats[s:s + block, None]).squeeze(1)
            return out
        if self.k is None:
            for s in range(0, len(rows), block):
                r, f = rows[s:s + block], feats[s:s + block]
                v = ((x[r] * self.w[f]).sum(1) + self.b[f]).relu_()
                out[s:s + block] = v if self.threshold is None else v.mul_(v > self.threshold[f])
            return out
        starts = torch.searchsorted(rows, torch.arange(0, len(x) + block, block, device=rows.device))
        for j, r0 in enumerate(range(0, len(x), block)):
            s0, s1 = int(starts[j]), int(starts[j + 1])
            if s0 == s1:
                continue
            r = rows[s0:s1] - r0
            if self.module is not None:
                with torch.no_grad():
                    out[s0:s1] = self.module.encode(x[r0:r0 + block])[r, feats[s0:s1]]
                continue
            pre = torch.addmm(self.b, x[r0:r0 + block], self.w.T)                # [rows, F]
            kth = pre.topk(self.k, dim=1).values[:, -1]
            v = pre[r, feats[s0:s1]]
            out[s0:s1] = torch.where(v >= kth[r], v.relu(), torch.zeros_like(v))
        return out


class NeuronScorer:
    """The model's basis directions: activation = |x_i|, max(x_i, 0), or raw x_i (affine, shifted later)."""

    def __init__(self, d: int, make_positive_by: str):
        if make_positive_by not in POSITIVE_BY:
            raise UserError(f"--make_positive_by {make_positive_by!r}: choose one of {', '.join(POSITIVE_BY)}")
        self.n_features, self.mode = d, make_positive_by
        self.all_fire = make_positive_by == "affine"

    def _positive(self, v: Tensor) -> Tensor:
        """abs / relu / identity (affine is shifted once the minimum is known)."""
        return v.abs() if self.mode == "abs" else v.relu() if self.mode == "relu" else v

    def codes_t(self, x: Tensor) -> Tensor:
        """[d, b] = transform(x).T."""
        return self._positive(x.T.contiguous())

    def at(self, x: Tensor, rows: Tensor, feats: Tensor) -> Tensor:
        """transform(x[rows, feats])."""
        return self._positive(x[rows, feats])


# ------------------------------------------------------------------------------------- running statistics

class RunningTop:
    """Per feature: running top-k activations, a uniform sample of firing tokens, firing counts, minimum.

    Rows are identified by int64 keys (sequence * context_length + position). Both the top-k and the
    sample keep, per feature, the k entries with the largest score (the activation; for the sample, the
    token's random priority u in (0, 1], 0 where the feature does not fire): each batch, `torch.topk` along
    the token axis of the batch, then of [kept k + the batch's k] (all features at once).
    """

    def __init__(self, n_features: int, top_k: int, sample_size: int, all_fire: bool, device: torch.device,
                 seed: int = 0, pool_size: int = 0):
        F = n_features
        self.k, self.r, self.all_fire = top_k, sample_size, all_fire
        self.top_values = torch.full((F, top_k), -math.inf, device=device)        # [F, k] descending
        self.top_rows = torch.full((F, top_k), -1, dtype=torch.long, device=device)
        self.sample_priority = torch.zeros(F, sample_size, device=device)        # [F, R] descending; 0 = empty
        self.sample_values = torch.zeros(F, sample_size, device=device)
        self.sample_rows = torch.full((F, sample_size), -1, dtype=torch.long, device=device)
        self.count = torch.zeros(F, dtype=torch.long, device=device)             # firing tokens
        self.minimum = torch.full((F,), math.inf, device=device)                  # all_fire only
        self.at_minimum = torch.zeros(F, dtype=torch.long, device=device)
        self.n_tokens = 0
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._buf: Tensor | None = None
        self.pool_priority = torch.zeros(pool_size, device=device)              # [P] descending; 0 = empty
        self.pool_rows = torch.full((pool_size,), -1, dtype=torch.long, device=device)
        self.pool_generator = torch.Generator(device=device).manual_seed(seed + 1)

    @staticmethod
    def merge(score: Tensor, payload: list[Tensor], new_score: Tensor, new_payload: list[Tensor]
              ) -> tuple[Tensor, list[Tensor]]:
        """The k = score.shape[1] largest per feature of kept `score [F, k]` and `new_score [F, j]`; payloads follow."""
        best, i = torch.cat([score, new_score], 1).topk(score.shape[1], dim=1)
        return best, [torch.cat([p, q], 1).gather(1, i) for p, q in zip(payload, new_payload)]

    @torch.no_grad()
    def update(self, acts_t: Tensor, rows: Tensor) -> None:
        """Fold in one batch: `acts_t [F, b]` activations of every feature on the rows with keys `rows [b]`."""
        F, b = acts_t.shape
        v, i = acts_t.topk(min(self.k, b), dim=1)                                 # [F, <=k]
        self.top_values, (self.top_rows,) = self.merge(self.top_values, [self.top_rows], v, [rows[i]])
        u = 1 - torch.rand(b, generator=self.generator, device=acts_t.device)    # (0, 1] priorities
        r = min(self.r, b)
        if self.all_fire:
            bmin = acts_t.min(1).values
            eq = (acts_t == bmin[:, None]).sum(1)
            self.at_minimum = torch.where(bmin < self.minimum, eq,
                                          torch.where(bmin == self.minimum, self.at_minimum + eq, self.at_minimum))
            self.minimum = torch.minimum(self.minimum, bmin)
            self.count += b
            pu, pi = u.topk(r)                                                    # every token fires: one sample
            sp, sv, sr = pu.expand(F, r), acts_t[:, pi], rows[pi].expand(F, r)
        else:
            if self._buf is None or self._buf.shape[0] != F or self._buf.shape[1] < b:
                self._buf = torch.empty_like(acts_t)
            keys = torch.sign(acts_t, out=self._buf[:, :b])                       # 1 where firing, else 0
            self.count += keys.sum(1).long()
            keys.mul_(u)                                                          # priority where firing, else 0
            sp, si = keys.topk(r, dim=1)
            sv, sr = acts_t.gather(1, si), rows[si]
        self.sample_priority, (self.sample_values, self.sample_rows) = self.merge(
            self.sample_priority, [self.sample_values, self.sample_rows], sp, [sv, sr])
        if len(self.pool_rows):                                                   # tokens for the random pool
            pu, pi = (1 - torch.rand(b, generator=self.pool_generator, device=acts_t.device)).topk(
                min(len(self.pool_rows), b))
            best, (kept,) = self.merge(self.pool_priority[None], [self.pool_rows[None]], pu[None], [rows[pi][None]])
            self.pool_priority, self.pool_rows = best[0], kept[0]
        self.n_tokens += b

    def shift(self) -> Tensor:
        """What is subtracted from every activation: the minimum (affine), else 0. [F]"""
        if self.all_fire and self.n_tokens:
            return self.minimum
        return torch.zeros_like(self.minimum)

    def density(self) -> Tensor:
        """Fraction of the processed tokens on which each feature fires: [F] float64."""
        count = self.count - (self.at_minimum if self.all_fire else 0)
        return count.double() / max(1, self.n_tokens)


# ------------------------------------------------------------------------------------- data sources

class Source(Protocol):
    """Where activation rows and their tokens come from."""

    context_length: int
    d: int

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(x [b, d] float32, row keys [b] int64) for up to n_tokens rows."""

    def rows_with_keys(self, keys: np.ndarray) -> Iterator[tuple[Tensor, np.ndarray]]:
        """(x [m, d] float32, keys [m]) of the rows whose key is in sorted `keys` (each row once)."""

    def tokens(self, sequences: np.ndarray) -> dict[int, np.ndarray]:
        """{sequence id: its token ids [context_length]} for the given sequences."""


def row_keys(sequence_ids: Tensor, positions: Tensor, context_length: int) -> Tensor:
    """key = sequence * context_length + position, int64 [n]."""
    return sequence_ids.long() * context_length + positions.long()


class StoredSource:
    """Rows of a Stage 1 hook folder, in stored order, up to `n_tokens`."""

    def __init__(self, data: HookData, n_tokens: int, device: torch.device):
        require_tokens(data.manifest, data.root / data.hook, "gather_high_activations.py",
                       "--model and --dataset (run the model they came from on text)")
        self.data, self.n_tokens, self.device = data, n_tokens, device
        self.context_length = int(data.manifest["config"]["context_length"])
        self.d = data.d
        self.total = min(n_tokens, data.n_rows)
        self.last_chunk = 0

    def _scan_range(self) -> range:
        """Chunks that can hold rows of any sequence seen so far (a sequence may spill into later chunks)."""
        smallest = max(1, min(c.rows for c in self.data.chunks))
        extra = 1 + self.context_length // smallest
        return range(min(len(self.data.chunks), self.last_chunk + 1 + extra))

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Stored rows in order, `batch_size` at a time (a chunk's last batch may be shorter)."""
        left = self.total
        for i in range(len(self.data.chunks)):
            if left <= 0:
                break
            self.last_chunk = i
            t = self.data.load(i, verify=True)
            n = min(left, len(t["activations"]))
            keys = row_keys(t["sequence_ids"][:n], t["positions"][:n], self.context_length)
            for s in range(0, n, batch_size):
                e = min(n, s + batch_size)
                yield t["activations"][s:e].to(self.device, torch.float32), keys[s:e].to(self.device)
            left -= n

    def rows_with_keys(self, keys: np.ndarray) -> Iterator[tuple[Tensor, np.ndarray]]:
        """Scan the chunks that may hold the wanted rows; read only those rows."""
        for i in self._scan_range():
            t = self.data.load(i, verify=True)
            k = row_keys(t["sequence_ids"], t["positions"], self.context_length).numpy()
            hit = np.nonzero(np.isin(k, keys))[0]
            if len(hit):
                yield t["activations"][torch.from_numpy(hit)].to(self.device, torch.float32), k[hit]

    def tokens(self, sequences: np.ndarray) -> dict[int, np.ndarray]:
        """Token ids from contexts/{i}.safetensors."""
        out: dict[int, np.ndarray] = {}
        for i in self._scan_range():
            path = self.data.root / CONTEXTS / f"{i}.safetensors"
            if not path.exists():
                raise UserError(f"{path} is missing: the dataset folder is incomplete; regenerate it")
            ctx, _ = mmap_tensors(path)
            ids = ctx["sequence_ids"].numpy()
            for j in np.nonzero(np.isin(ids, sequences))[0]:
                out.setdefault(int(ids[j]), ctx["tokens"][int(j)].numpy().copy())
        return out


class TextSource:
    """Rows computed by running a model on text (special tokens left out, as Stage 1 does)."""

    def __init__(self, model: Any, hook: str, documents: Iterator[Any], context_length: int, n_tokens: int,
                 device: torch.device, batch_sequences: int = 32):
        from training.hooks import hook_layer
        from training.text import pack_token_rows, special_token_ids
        if context_length > model.cfg.n_ctx:
            raise UserError(f"--context_length {context_length} exceeds the model's {model.cfg.n_ctx} positions")
        if hook not in model.hook_dict:
            raise UserError(f"hook {hook!r} is not a hook of this model (e.g. blocks.0.hook_resid_post)")
        self.model, self.hook, self.device = model, hook, device
        self.context_length, self.n_tokens, self.batch_sequences = context_length, n_tokens, batch_sequences
        layer = hook_layer(hook)
        self.stop = layer + 1 if layer is not None and layer + 1 < model.cfg.n_layers else None
        self.special = torch.tensor(sorted(special_token_ids(model.tokenizer)), dtype=torch.long)
        self.rows = pack_token_rows(documents, model.tokenizer, context_length)
        self.sequences: list[np.ndarray] = []
        self.total = n_tokens
        self.d = int(self._run(torch.zeros(1, 2, dtype=torch.long)).shape[-1])

    @torch.no_grad()
    def _run(self, tokens: Tensor) -> Tensor:
        """Activations at the hook: [batch, seq, d] float32."""
        from training.hooks import flatten_heads
        from training.sae_hooks import capture
        _, acts = capture(self.model, tokens.to(self.device), [self.hook], self.stop)
        return flatten_heads(acts[self.hook]).float()

    def _rows(self, first_seq: int, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Kept rows (x [r, d], keys [r]) of sequences first_seq.. with token ids `tokens [B, L]`."""
        acts = self._run(tokens)
        keep = ~torch.isin(tokens, self.special)
        seq = torch.arange(first_seq, first_seq + len(tokens))[:, None].expand_as(tokens)
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        return acts[keep.to(acts.device)], row_keys(seq[keep], pos[keep], self.context_length)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Forward passes of `batch_sequences` sequences until n_tokens rows."""
        left = self.n_tokens
        while left > 0:
            batch = list(itertools.islice(self.rows, self.batch_sequences))
            if not batch:
                break
            tokens = torch.tensor(batch, dtype=torch.long)
            first = len(self.sequences)
            self.sequences.extend(np.asarray(batch, dtype=np.int32))
            x, keys = self._rows(first, tokens)
            x, keys = x[:left], keys[:left]
            left -= len(x)
            for s in range(0, len(x), batch_size):
                yield x[s:s + batch_size], keys[s:s + batch_size].to(x.device)

    def rows_with_keys(self, keys: np.ndarray) -> Iterator[tuple[Tensor, np.ndarray]]:
        """Run the model again on the sequences that hold the wanted rows."""
        seqs = np.unique(keys // self.context_length)
        for s in range(0, len(seqs), self.batch_sequences):
            batch = seqs[s:s + self.batch_sequences]
            tokens = torch.from_numpy(np.stack([self.sequences[int(q)] for q in batch])).long()
            x, k = self._rows(0, tokens)
            k = k.numpy()
            k = batch[k // self.context_length] * self.context_length + k % self.context_length  # true sequence ids
            hit = np.isin(k, keys)
            if hit.any():
                yield x[torch.from_numpy(hit).to(x.device)], k[hit]

    def tokens(self, sequences: np.ndarray) -> dict[int, np.ndarray]:
        """The token rows kept from the first pass."""
        return {int(s): self.sequences[int(s)] for s in sequences}


# ------------------------------------------------------------------------------------- the gathering

@dataclass
class Examples:
    """Flat table of chosen examples: feature, row key and activation, and where they are shown."""

    feature: np.ndarray   # [E] int64
    key: np.ndarray       # [E] int64 row key
    value: np.ndarray     # [E] float64 activation (shifted)
    group: np.ndarray     # [E] int64: -1 for top examples, q for quantile band q


def choose_examples(stats: RunningTop, n_quantiles: int, per_quantile: int
                    ) -> tuple[Examples, list[list[tuple[int, float, float]]]]:
    """The top examples and the quantile-band examples of every feature, and per feature its bands
    [(band, min act, max act)] (see the module docstring for the band definition)."""
    shift = stats.shift()[:, None]
    tv = (stats.top_values - shift).cpu().numpy()
    tr = stats.top_rows.cpu().numpy()
    F, k = tv.shape
    keep = (tr >= 0) & (tv > 0)
    feat_top = np.repeat(np.arange(F), k).reshape(F, k)
    parts = [(feat_top[keep], tr[keep], tv[keep], np.full(int(keep.sum()), -1))]

    sv = (stats.sample_values - shift).cpu().numpy()
    sr = stats.sample_rows.cpu().numpy()
    valid = (stats.sample_priority.cpu().numpy() > 0) & (sv > 0)
    bands: list[list[tuple[int, float, float]]] = [[] for _ in range(F)]
    fs, ks, vs, gs = [], [], [], []
    for f in range(F):
        vals, rws = sv[f][valid[f]], sr[f][valid[f]]
        n = len(vals)
        if n == 0:
            continue
        order = np.argsort(vals, kind="stable")
        vals, rws = vals[order], rws[order]
        for q in range(n_quantiles):
            lo, hi = (q * n) // n_quantiles, ((q + 1) * n) // n_quantiles
            if hi <= lo:
                continue
            take = np.unique(np.linspace(lo, hi - 1, min(per_quantile, hi - lo)).round().astype(np.int64))
            bands[f].append((q, float(vals[lo]), float(vals[hi - 1])))
            fs.extend([f] * len(take))
            ks.extend(rws[take].tolist())
            vs.extend(vals[take].tolist())
            gs.extend([q] * len(take))
    parts.append((np.asarray(fs, dtype=np.int64), np.asarray(ks, dtype=np.int64), np.asarray(vs, dtype=np.float64),
                  np.asarray(gs, dtype=np.int64)))
    ex = Examples(*(np.concatenate([p[i] for p in parts]) for i in range(4)))
    return ex, bands


def window_activations(source: Source, scorer: Scorer, ex: Examples, shift: np.ndarray, before: int, after: int,
                       device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(positions [E, W], activations [E, W]) of every example's window (W = before + 1 + after): the
    position in its sequence (-1 outside it) and the example feature's activation there (NaN: not stored)."""
    L = source.context_length
    offsets = np.arange(-before, after + 1)
    seq, pos = ex.key // L, ex.key % L
    P = pos[:, None] + offsets[None, :]
    valid = (P >= 0) & (P < L)
    P = np.where(valid, P, -1)
    acts = np.full(P.shape, np.nan)
    slot = np.nonzero(valid.ravel())[0]
    skey = (seq[:, None] * L + P).ravel()[slot]
    sfeat = np.repeat(ex.feature, P.shape[1])[slot]
    order = np.argsort(skey, kind="stable")
    sorted_keys = skey[order]
    wanted = np.unique(sorted_keys)
    flat = acts.ravel()
    bar = tqdm(total=len(wanted), desc="context windows", unit="row", unit_scale=True, dynamic_ncols=True)
    for x, keys in source.rows_with_keys(wanted):
        lo = np.searchsorted(sorted_keys, keys, "left")
        counts = np.searchsorted(sorted_keys, keys, "right") - lo
        rows = np.repeat(np.arange(len(keys)), counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        hit = order[np.repeat(lo, counts) + within]
        f = sfeat[hit]
        v = scorer.at(x, torch.from_numpy(rows).to(device), torch.from_numpy(f).to(device)).double().cpu().numpy()
        flat[slot[hit]] = v - shift[f]
        bar.update(len(keys))
    bar.close()
    return P, acts


def random_examples(source: Source, scorer: Scorer, stats: RunningTop, shift: np.ndarray, n_random: int,
                    before: int, after: int, device: torch.device) -> tuple[Examples, np.ndarray, np.ndarray]:
    """(examples with group -2, positions [E, W], activations [E, W]) of the `n_random` pool windows with the
    smallest window maximum of each feature (see the module docstring), like `window_activations`'s."""
    L, F = source.context_length, stats.top_values.shape[0]
    W = before + 1 + after
    centers = stats.pool_rows[stats.pool_rows >= 0].cpu().numpy()                 # [Pn] in pool (random) order
    empty = Examples(*(np.zeros(0, dtype=t) for t in (np.int64, np.int64, np.float64, np.int64)))
    if n_random <= 0 or len(centers) == 0:
        return empty, np.zeros((0, W), dtype=np.int64), np.zeros((0, W))
    P = (centers % L)[:, None] + np.arange(-before, after + 1)[None, :]          # [Pn, W]
    valid = (P >= 0) & (P < L)
    P = np.where(valid, P, -1)
    keys = (centers // L)[:, None] * L + P
    wanted = np.unique(keys[valid])
    X = torch.zeros(len(wanted), source.d, device=device)                        # [rows, d]
    found = np.zeros(len(wanted), dtype=bool)
    for x, k in source.rows_with_keys(wanted):
        at = np.searchsorted(wanted, k)
        X[torch.from_numpy(at).to(device)] = x
        found[at] = True
    slot = np.where(valid, np.searchsorted(wanted, np.where(valid, keys, wanted[0])), 0)   # [Pn, W] row of X
    stored = valid & found[slot]
    shift_t = torch.from_numpy(shift).float().to(device)[:, None, None]
    mask = torch.from_numpy(stored).to(device)
    block = max(1, (1 << 25) // max(1, F * W))
    wmax = torch.empty(F, len(centers), device=device)                           # [F, Pn]
    for s in range(0, len(centers), block):
        rows = X[torch.from_numpy(slot[s:s + block].ravel()).to(device)]           # [b * W, d]
        codes = scorer.codes_t(rows).reshape(F, -1, W) - shift_t                   # [F, b, W]
        codes = codes.masked_fill(~mask[None, s:s + block], -math.inf).amax(2)
        wmax[:, s:s + block] = torch.where(torch.isinf(codes), math.inf, codes)   # nothing stored: never chosen
    chosen = torch.sort(wmax, dim=1, stable=True).indices[:, :n_random].cpu().numpy()      # [F, n]
    ok = (np.take_along_axis(wmax.cpu().numpy(), chosen, 1) < math.inf).ravel()
    feat = np.repeat(np.arange(F), chosen.shape[1])[ok]
    win = chosen.ravel()[ok]
    # per-token activations of each chosen (feature, window); rows in ascending order for Scorer.at
    e_idx, w_idx = np.nonzero(stored[win])
    rows_x = slot[win[e_idx], w_idx]
    order = np.argsort(rows_x, kind="stable")
    e_idx, w_idx, rows_x = e_idx[order], w_idx[order], rows_x[order]
    vals = scorer.at(X, torch.from_numpy(rows_x).to(device), torch.from_numpy(feat[e_idx]).to(device))
    acts = np.full((len(win), W), np.nan)
    acts[e_idx, w_idx] = vals.double().cpu().numpy() - shift[feat[e_idx]]
    value = np.nan_to_num(acts[:, before], nan=0.0)
    ex = Examples(feat.astype(np.int64), centers[win].astype(np.int64), value, np.full(len(win), -2, dtype=np.int64))
    return ex, P[win], acts


class TokenDecoder:
    """Token id -> its text (tokenizer.decode of the single id), cached."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            s = self.cache.get(i)
            if s is None:
                s = self.cache[i] = self.tokenizer.decode([i])
            out.append(s)
        return out


def build_features(stats: RunningTop, ex: Examples, bands: list, positions: np.ndarray, acts: np.ndarray,
                   tokens: dict[int, np.ndarray], decode: TokenDecoder, L: int, n_quantiles: int,
                   histogram_bins: int, with_random: bool = False) -> Iterator[dict[str, Any]]:
    """The entries of the "features" list of features.json, one at a time (see the module docstring)."""
    F = stats.top_values.shape[0]
    shift_t = stats.shift().double()
    shift = shift_t.cpu().numpy()
    density = stats.density().cpu().numpy()
    count = (stats.count - (stats.at_minimum if stats.all_fire else 0)).cpu().numpy()
    maxes = stats.top_values[:, 0].double().cpu().numpy() - shift
    maxes = np.where(np.isfinite(maxes) & (maxes > 0), maxes, 0.0)
    # histogram of the firing-token sample over [0, max]
    sv = (stats.sample_values.double() - shift_t[:, None]).cpu().numpy()
    valid = (stats.sample_priority.cpu().numpy() > 0) & (sv > 0)
    hist = np.zeros((F, histogram_bins), dtype=np.int64)
    safe = np.where(maxes > 0, maxes, 1.0)[:, None]
    bins = np.clip(np.floor(sv / safe * histogram_bins), 0, histogram_bins - 1).astype(np.int64)
    np.add.at(hist, (np.nonzero(valid)[0], bins[valid]), 1)

    r_acts, r_vals = round_sig(acts), round_sig(ex.value)
    r_max, r_density, r_shift = round_sig(maxes), round_sig(density), round_sig(shift)
    seq, pos = ex.key // L, ex.key % L
    order = np.lexsort((np.arange(len(ex.feature)), ex.feature))      # by feature, then as chosen
    starts = np.searchsorted(ex.feature[order], np.arange(F + 1))

    def example(e: int) -> dict[str, Any]:
        p = positions[e][positions[e] >= 0]
        a = r_acts[e][positions[e] >= 0]
        return {"tokens": decode(tokens[int(seq[e])][p].tolist()),
                "acts": [None if math.isnan(v) else v for v in a.tolist()],
                "center": int(np.argmax(p == pos[e])), "activation": float(r_vals[e]),
                "sequence": int(seq[e]), "position": int(pos[e])}

    for f in tqdm(range(F), desc="building", unit="feature", dynamic_ncols=True):
        mine = order[starts[f]:starts[f + 1]]
        top = [example(e) for e in mine if ex.group[e] == -1]
        per_band: dict[int, list[dict[str, Any]]] = {}
        for e in mine:
            if ex.group[e] >= 0:
                per_band.setdefault(int(ex.group[e]), []).append(example(e))
        groups = [{"quantile": [q / n_quantiles, (q + 1) / n_quantiles],
                   "range": round_sig(np.array([lo, hi])).tolist(), "examples": per_band.get(q, [])}
                  for q, lo, hi in bands[f]]
        random = [example(e) for e in mine if ex.group[e] == -2]
        entry: dict[str, Any] = {"id": f, "density": float(r_density[f]), "max": float(r_max[f]),
                                 "count": int(count[f])}
        if stats.all_fire:
            entry["shift"] = float(r_shift[f])
        entry.update({"top": top, "quantiles": groups, **({"random": random} if with_random else {}),
                      "histogram": {"lo": 0.0, "hi": float(r_max[f]), "counts": hist[f].tolist(),
                                    "sample": int(valid[f].sum())}})
        entry["text"] = render_feature_text(entry)
        yield entry


# ------------------------------------------------------------------------------------- members, sources, output

def model_of(meta: dict[str, Any]) -> str:
    """The model a (pretrained) dictionary's description records; a UserError when none."""
    name = ((meta.get("source_manifest") or {}).get("config") or {}).get("model")
    if not name:
        raise UserError(f"{meta.get('pretrained', 'the dictionary')} records no model: pass --model")
    return name


def load_tokenizer(name: str) -> Any:
    """The Hugging Face tokenizer of model `name` (local folder or hub id); failures are one line."""
    from transformers import AutoTokenizer
    from training.models import REPO_ROOT
    local = [c for c in (Path(name), REPO_ROOT / name) if c.is_dir()]
    path = str(local[0]) if local else resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any loading failure becomes one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load the tokenizer of {name!r} ({first}): pass --tokenizer with a local "
                        "model or tokenizer folder") from None


def default_output(cfg: TopActivationsConfig, label: str | None, hook: str) -> Path:
    """Where features.json goes when --output is not given."""
    if cfg.output:
        out = Path(cfg.output)
        return out if out.suffix == ".json" else out / FEATURES_JSON
    if label is not None and cfg.sae is not None:
        return Path("outputs") / "features" / label / FEATURES_JSON
    if label is not None:
        return Path(cfg.sweep) / "features" / label / FEATURES_JSON  # type: ignore[arg-type]
    return Path("outputs") / "neurons" / f"{hook}-{cfg.make_positive_by}" / FEATURES_JSON


@dataclass
class GatherResult:
    """What a run produced."""

    path: Path
    n_features: int
    n_tokens: int
    n_dead: int
    bytes: int
    seconds: float
    preview: list[str]

    def __str__(self) -> str:
        rate = self.n_tokens / self.seconds if self.seconds > 0 else 0.0
        head = (f"wrote the top examples of {self.n_features:,} features over {self.n_tokens:,} tokens "
                f"({self.n_dead:,} never fired) to {self.path} ({self.bytes / 1e6:.1f} MB) in {self.seconds:.1f} s "
                f"({rate:,.0f} tokens/s)")
        return "\n".join([head, *self.preview])


def check_config(cfg: TopActivationsConfig) -> None:
    """One-line errors for impossible flag values."""
    for name in ("n_tokens", "top_k"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
    for name in ("window_before", "window_after", "n_quantiles", "per_quantile", "sample_size", "n_random"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative (got {getattr(cfg, name)})")
    if cfg.histogram_bins < 1:
        raise UserError(f"--histogram_bins must be at least 1 (got {cfg.histogram_bins})")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1 (got {cfg.batch_size})")
    if cfg.sweep is None and cfg.sae is None and not cfg.neurons:
        raise UserError("give --sweep (the features of a dictionary), --sae (a pretrained one) or --neurons (the "
                        "model's basis directions)")
    if cfg.neurons and any(v is not None for v in (cfg.l1, cfg.k, cfg.key, cfg.sae)):
        raise UserError("--neurons gathers the model's own directions: drop --l1/--k/--key/--sae")
    if cfg.sae is not None and cfg.dataset is None and cfg.dataset_dir is None:
        raise UserError("--sae needs activations to read: --dataset (text to run the dictionary's model, or --model, "
                        "on) or --dataset_dir (a Stage 1 hook folder)")
    if (cfg.model is None) != (cfg.dataset is None) and cfg.sae is None:
        raise UserError("--model and --dataset go together (run the model on text); give both, or neither to "
                        "read stored activations")
    if cfg.model is not None and cfg.dataset_dir is not None:
        raise UserError("give either --dataset_dir (stored activations) or --model with --dataset, not both")


def open_source(cfg: TopActivationsConfig, sweep_meta: dict[str, Any] | None, device: torch.device
                ) -> tuple[Any, Any, dict[str, Any]]:
    """(source, tokenizer, description of where the data comes from) for the config."""
    if cfg.model is not None:
        from training.models import load_model
        from training.text import iter_documents
        hook = cfg.hook or (sweep_meta or {}).get("hook")
        if hook is None:
            raise UserError("--neurons with --model needs --hook (e.g. blocks.0.hook_resid_post)")
        L = cfg.context_length or int(((sweep_meta or {}).get("source_manifest") or {}).get("config", {})
                                      .get("context_length", 128))
        dtype = analysis_dtype(cfg.dtype, (sweep_meta or {}).get("source_manifest"))
        model = load_model(cfg.model, device, dtype)
        docs = iter_documents(cfg.dataset, cfg.dataset_split, cfg.text_column)  # type: ignore[arg-type]
        src = TextSource(model, hook, docs, L, cfg.n_tokens, device)
        return src, model.tokenizer, {"model": cfg.model, "dataset": cfg.dataset, "dataset_split": cfg.dataset_split,
                                      "hook": hook, "context_length": L, "dtype": dtype}
    path = cfg.dataset_dir or (sweep_meta or {}).get("dataset_dir")
    if path is None:
        raise UserError("--neurons needs --dataset_dir (a Stage 1 hook folder) or --model with --dataset")
    data = open_hook(path)
    src = StoredSource(data, cfg.n_tokens, device)
    model_name = data.manifest["config"]["model"]
    tokenizer = load_tokenizer(cfg.tokenizer or model_name)
    return src, tokenizer, {"model": model_name, "dataset_dir": str(Path(data.root).resolve() / data.hook),
                            "hook": data.hook, "context_length": src.context_length,
                            "dtype": manifest_dtype(data.manifest)}


def gather(cfg: TopActivationsConfig) -> GatherResult:
    """Gather the top-activating examples of every feature (or neuron) and write features.json."""
    check_config(cfg)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    label = meta = None
    source_info: dict[str, Any]
    if not cfg.neurons:
        from training.pretrained import pick_dictionary
        picked = pick_dictionary(cfg.sweep, cfg.l1, cfg.k, cfg.key, cfg.sae, cfg.hook if cfg.sae else None,
                                 cfg.model, device)
        module, meta, label = picked.module, picked.meta, picked.label
        if cfg.sae is not None and cfg.dataset is not None and cfg.model is None:
            cfg = replace(cfg, model=model_of(meta))
    elif cfg.sweep is not None:
        meta = read_sweep_json(cfg.sweep)
    source, tokenizer, where = open_source(cfg, meta, device)
    if cfg.neurons:
        scorer: Any = NeuronScorer(source.d, cfg.make_positive_by)
        source_info = {"kind": "neurons", "make_positive_by": cfg.make_positive_by, "d_in": source.d}
    else:
        if source.d != meta["d_in"]:  # type: ignore[index]
            raise UserError(f"the activations are {source.d} wide but the dictionary reads {meta['d_in']}: "  # type: ignore[index]
                            "use the data (hook) the sweep was trained on")
        scorer = SaeScorer(module, device)
        source_info = dict(picked.source)
    source_info.update(where)
    out_path = default_output(cfg, label, where["hook"])
    with folder_lock(out_path.parent):  # one writer per features folder
        F = scorer.n_features
        batch = cfg.batch_size or max(256, min(65536, (1 << 25) // max(1, F)))
        stats = RunningTop(F, cfg.top_k, cfg.sample_size, scorer.all_fire, device, cfg.seed, 20 * cfg.n_random)
        bar = tqdm(total=source.total, desc="encoding", unit="tok", unit_scale=True, dynamic_ncols=True)
        with torch.no_grad():
            for x, keys in source.batches(batch):
                stats.update(scorer.codes_t(x), keys)
                bar.update(len(keys))
        bar.close()
        if stats.n_tokens == 0:
            raise UserError("no tokens to read: the dataset is empty")

        ex, bands = choose_examples(stats, cfg.n_quantiles, cfg.per_quantile)
        shift = stats.shift().double().cpu().numpy()
        positions, acts = window_activations(source, scorer, ex, shift, cfg.window_before, cfg.window_after,
                                             device)
        if cfg.n_random:
            rex, rpos, racts = random_examples(source, scorer, stats, shift, cfg.n_random, cfg.window_before,
                                               cfg.window_after, device)
            ex = Examples(*(np.concatenate([getattr(ex, n), getattr(rex, n)])
                            for n in ("feature", "key", "value", "group")))
            positions, acts = np.concatenate([positions, rpos]), np.concatenate([acts, racts])
        tokens = source.tokens(np.unique(ex.key // source.context_length))
        features = build_features(stats, ex, bands, positions, acts, tokens, TokenDecoder(tokenizer),
                                  source.context_length, cfg.n_quantiles, cfg.histogram_bins, cfg.n_random > 0)
        counts = (stats.count - (stats.at_minimum if stats.all_fire else 0)).cpu()
        n_dead = int((counts == 0).sum())
        header = {"format": FORMAT, "version": VERSION, "source": source_info, "n_tokens": stats.n_tokens,
                  "n_features": F, "top_k": cfg.top_k, "window_before": cfg.window_before,
                  "window_after": cfg.window_after, "n_quantiles": cfg.n_quantiles, "per_quantile": cfg.per_quantile,
                  "sample_size": cfg.sample_size, "histogram_bins": cfg.histogram_bins, "n_random": cfg.n_random,
                  "n_dead": n_dead,
                  "config": config_to_dict(cfg)}
        strongest = set((stats.top_values[:, 0] - stats.shift()).topk(min(3, F)).indices.tolist())
        shown: dict[int, str] = {}

        def keep_preview(feats: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            for f in feats:
                if f["id"] in strongest and f["top"]:
                    shown[f["id"]] = f["text"]
                yield f
        size = write_features_json(out_path, header, keep_preview(features))
        preview = [line for i in sorted(shown, key=lambda i: -float(stats.top_values[i, 0]))
                   for line in shown[i].split("\n")[:3]]
        return GatherResult(out_path, F, stats.n_tokens, n_dead, size, time.perf_counter() - t0, preview)
