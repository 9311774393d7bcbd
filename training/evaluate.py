"""Stage 3: evaluate every dictionary of a sweep on held-out text and pick one (report.json, report.md, plots).

For each batch of held-out token rows [batch, seq] the model runs once clean (logits + the hook's
activations, cached) and once with the hook zero-ablated; then, per member, its codes and
reconstruction of the cached activations feed the reconstruction/sparsity accumulators
(`training.metrics.EvalStats`), and one forward pass with the reconstruction spliced in (plus one
with the SAE error term kept, `--with_error`) feeds its `training.metrics.SpliceStats`.
Cost per batch: 2 + N (or 2 + 2N with the error-term check) forward passes for N members.

Positions evaluated: the ones Stage 1 dumped. When Stage 1 skipped special tokens (its default),
positions holding a special token (BOS/EOS separators, PAD) are left out of every average and keep
their clean activation in the spliced runs: the dictionaries never saw them.

Outputs, in the sweep folder, each written atomically: report.json, report.md, ev_vs_l0.png,
ce_score_vs_l0.png, dead_vs_key.png, density_histograms.png.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

import training
from training.architectures import get as get_architecture
from training.chunks import CONTEXTS, atomic_write_json, has_tokens, mmap_tensors
from training.cli import UserError, config_to_dict
from training.locks import folder_lock
from training.metrics import (EvalStats, SparsityStats, SpliceStats, kl_div, log_density_histogram,
                              next_token_ce)
from training.models import DTYPE_CHOICES
from training.sae_hooks import capture, run_with_saes
from training.sweep_files import PRETRAINED, format_key, key_name, load_sweep, read_sweep

REPORT_JSON, REPORT_MD = "report.json", "report.md"
EVALUATE_LOCK = ".evaluate.lock"
PLOTS = {"ev": "ev_vs_l0.png", "ce": "ce_score_vs_l0.png", "dead": "dead_vs_key.png",
         "density": "density_histograms.png"}
HELD_OUT_SPLITS = ("validation", "test")
"""Splits tried, in order, for the default held-out evaluation split."""

KNEE_DEFINITION = (
    "the knee of the explained-variance-versus-L0 curve is the member farthest above its chord: with u = log10(L0) "
    "and v = explained variance, each min-max rescaled to [0, 1] over the members with L0 > 0 and explained "
    "variance > 0, the chord joins the member with "
    "the smallest L0 to the one with the largest, and the knee maximises the perpendicular distance above it (the "
    "point after which more active features stop buying much explained variance)")


@dataclass
class EvaluateConfig:
    """What to evaluate and on which text (defaults: what the sweep's sweep.json and Stage 1 manifest record)."""

    sweep: str = "outputs/sweep"
    """Sweep folder written by basic_l1_sweep.py (holds sweep.json and sweep.safetensors)."""
    sae: list[str] | None = None
    """Pretrained dictionaries to evaluate instead of a sweep (SAELens, sparsify or dictionary_learning folders, or hf:OWNER/REPO/PATH), all at one hook of one model."""
    output_dir: str | None = None
    """Where the report goes with --sae (default: outputs/evaluation/{first dictionary's folder name})."""
    model: str | None = None
    """Model (hub name or local folder); default: the one Stage 1 ran."""
    hook: str | None = None
    """Hook to splice the dictionaries into; default: the hook the sweep was trained on."""
    dataset: str | None = None
    """Text to evaluate on; default: the dataset Stage 1 read."""
    dataset_split: str | None = None
    """Split; default: validation (or test) when the dataset has one, else the training split minus the sequences Stage 1 used."""
    text_column: str | None = None
    """Column holding the text; default: Stage 1's (when the dataset is Stage 1's), else detected."""
    context_length: int | None = None
    """Tokens per sequence; default: Stage 1's."""
    n_tokens: int = 200000
    """Evaluate on at least this many (non-special) token positions, in whole sequences."""
    batch_size: int = 16
    """Sequences per forward pass."""
    device: str | None = None
    """cpu, cuda, cuda:N or mps (default: cuda when available)."""
    dtype: str = field(default="auto", metadata={"choices": list(DTYPE_CHOICES)})
    """Precision to run the model in; auto: the one Stage 1 ran it in (float32 when no manifest records one)."""
    dense_threshold: float = 0.1
    """A feature is dense when active on more than this fraction of the evaluated tokens."""
    histogram_bins: int = 30
    """Bins of the log10 feature-density histograms."""
    with_error: bool = True
    """Also run each member spliced with its error term kept (must give the clean loss back; one more forward per member)."""
    allow_unfinished: bool = False
    """Evaluate a sweep whose training has not finished (its last saved weights)."""
    keep_special_in_ablation: bool = False
    """Keep special-token positions clean in the zero-ablation baseline (departs from SAELens, which zeroes every position)."""


# ------------------------------------------------------------------------------------- the knee


class Knee(NamedTuple):
    """The knee of a curve and how it was found."""

    index: int | None
    """Index (into the inputs) of the knee, None when there is none (see `knee_point`)."""
    distances: list[float | None]
    """Per point: perpendicular distance above the chord in the rescaled plane (None: point not usable)."""
    reason: str
    """One line: why this point, or why there is no knee."""


def knee_point(l0: Sequence[float], ev: Sequence[float]) -> Knee:
    """Knee of explained variance against L0: the point farthest above the chord on (log10 L0, EV).

    Usable points have finite L0 > 0 and finite EV > 0 (a dictionary explaining no more variance than the
    mean is no candidate, and would stretch the chord). Coordinates u = log10 L0 and v = EV are min-max
    rescaled to [0, 1] over the usable points (so the answer does not depend on units); the chord joins
    the usable point of smallest L0 to the one of largest L0 (ties: the first); each point's distance is
    its signed perpendicular distance to that line, positive above it (more EV than the chord gives at
    that L0). The knee is the point of largest positive distance (ties: the smaller L0); there is none
    with fewer than 3 usable points, all L0 equal, or no point strictly above the chord (a straight or
    convex curve).
    """
    usable = [i for i in range(len(l0)) if math.isfinite(l0[i]) and l0[i] > 0 and math.isfinite(ev[i]) and ev[i] > 0]
    distances: list[float | None] = [None] * len(l0)
    if len(usable) < 3:
        return Knee(None, distances, f"no knee: {len(usable)} usable member(s), at least 3 are needed")
    u = {i: math.log10(l0[i]) for i in usable}
    u_lo, u_hi = min(u.values()), max(u.values())
    v_lo, v_hi = min(ev[i] for i in usable), max(ev[i] for i in usable)
    if u_hi == u_lo:
        return Knee(None, distances, "no knee: every member has the same L0")
    v_span = v_hi - v_lo if v_hi > v_lo else 1.0
    pts = {i: ((u[i] - u_lo) / (u_hi - u_lo), (ev[i] - v_lo) / v_span) for i in usable}
    a = pts[min(usable, key=lambda i: u[i])]
    b = pts[max(usable, key=lambda i: u[i])]
    dx, dy = b[0] - a[0], b[1] - a[1]
    norm = math.hypot(dx, dy)
    for i in usable:
        px, py = pts[i][0] - a[0], pts[i][1] - a[1]
        distances[i] = (dx * py - dy * px) / norm  # cross product: > 0 left of a->b, i.e. above the chord
    above = [i for i in usable if distances[i] > 1e-12]  # type: ignore[operator]
    if not above:
        return Knee(None, distances, "no knee: no member lies above the chord (the curve is straight or convex)")
    best = max(above, key=lambda i: (distances[i], -l0[i]))  # type: ignore[arg-type, return-value]
    return Knee(best, distances, f"largest distance above the chord ({distances[best]:.3f} of the rescaled plane)")


def pareto_front(l0: Sequence[float], ev: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, by increasing L0: no other point has L0 <= and EV >= with one strict."""
    ok = [i for i in range(len(l0)) if math.isfinite(l0[i]) and math.isfinite(ev[i])]
    front = [i for i in ok if not any((l0[j] <= l0[i] and ev[j] >= ev[i]) and (l0[j] < l0[i] or ev[j] > ev[i])
                                      for j in ok)]
    return sorted(front, key=lambda i: l0[i])


# ------------------------------------------------------------------------------------- the sweep


# ------------------------------------------------------------------------------------- what text


@dataclass
class Evaluated:
    """What an evaluation runs on (resolved from the config, sweep.json and the Stage 1 manifest)."""

    model: str
    hook: str
    dataset: str
    dataset_split: str
    text_column: str | None
    context_length: int
    skip_sequences: int
    """Packed sequences skipped at the start of the split (those Stage 1 consumed, when it is the training split)."""
    held_out: str
    """One line: why this text is held out from training (or that it may not be)."""
    exclude_special: bool
    """Whether special-token positions are left out (as Stage 1 left them out of the training data)."""
    special_token_ids: list[int] = field(default_factory=list)


def consumed_sequences(meta: dict[str, Any]) -> tuple[int, bool]:
    """(sequences of the training split Stage 1 read, whether exact): max sequence id in its contexts + 1.

    Without the Stage 1 folder, an estimate from the manifest, 2 * ceil(total_tokens / context_length): an upper
    bound while under half the positions hold special tokens (the dumped rows leave those out).
    """
    manifest = meta.get("source_manifest", {})
    root = Path(meta.get("dataset_dir", "")).parent
    files = sorted((root / CONTEXTS).glob("*.safetensors")) if (root / CONTEXTS).is_dir() else []
    if files:
        top = -1
        for f in files:
            ids = mmap_tensors(f)[0]["sequence_ids"]
            if len(ids):
                top = max(top, int(ids.max()))
        return top + 1, True
    ctx = int(manifest.get("config", {}).get("context_length", 1))
    return 2 * math.ceil(int(manifest.get("total_tokens", 0)) / ctx), False


def resolve_text(cfg: EvaluateConfig, meta: dict[str, Any]) -> Evaluated:
    """The model, hook, dataset, split and skip of the evaluation; flags override what the sweep records."""
    from training.text import available_splits
    manifest = meta.get("source_manifest", {}) or {}
    gen = manifest.get("config", {}) or {}
    imported = not has_tokens(manifest)
    if imported:
        missing = [f"--{n}" for n in ("model", "dataset", "context_length") if getattr(cfg, n) is None]
        if missing:
            raise UserError(f"the sweep was trained on imported activations ({meta.get('dataset_dir')}), which "
                            f"record no model or text: pass {', '.join(missing)} (the model they came from, text "
                            "to run it on and its sequence length; the CE loss needs all three)")
        gen = {}
    model = cfg.model or gen.get("model")
    if not model:
        raise UserError("the sweep's source manifest records no model: pass --model")
    hook = cfg.hook or meta.get("hook")
    dataset = cfg.dataset or gen.get("dataset")
    if not dataset:
        raise UserError("the sweep's source manifest records no dataset: pass --dataset")
    context_length = cfg.context_length or gen.get("context_length")
    if not context_length:
        raise UserError("the sweep's source manifest records no context length: pass --context_length")
    if context_length < 2:
        raise UserError(f"--context_length must be at least 2 (got {context_length})")
    same_dataset = dataset == gen.get("dataset")
    text_column = cfg.text_column or (gen.get("text_column") if same_dataset else None)
    train_split = gen.get("dataset_split", "train") if same_dataset else None
    splits = available_splits(dataset)
    split = cfg.dataset_split
    if split is None:
        split = next((s for s in HELD_OUT_SPLITS if s in splits and s != train_split), None) or train_split or (
            splits[0] if splits else "train")
    elif split not in splits:
        raise UserError(f"unknown split {split!r} of dataset {dataset!r}; it has {sorted(splits)}")
    skip = 0
    if meta.get("pretrained"):
        held_out = "overlap with the dictionaries' training data unknown (pretrained dictionaries)"
    elif same_dataset and split == train_split:
        skip, exact = consumed_sequences(meta)
        how = "" if exact else " (estimated: the Stage 1 folder is gone)"
        why = ", the dataset has no other" if cfg.dataset_split is None else ""
        held_out = (f"same split as training{why}: the first {skip:,} sequences, which Stage 1 read{how}, "
                    "are skipped")
    elif same_dataset:
        held_out = f"held out from training (Stage 1 read split {train_split!r})"
    elif imported:
        held_out = "overlap with the training data unknown (the sweep was trained on imported activations)"
    else:
        held_out = f"another dataset than the training text (Stage 1 read {gen.get('dataset')!r})"
    return Evaluated(model=model, hook=hook, dataset=dataset, dataset_split=split, text_column=text_column,
                     context_length=int(context_length), skip_sequences=skip, held_out=held_out,
                     exclude_special=bool(gen.get("skip_special_tokens", True)),
                     special_token_ids=[int(t) for t in manifest.get("special_token_ids", [])])


def token_rows(ev: Evaluated, tokenizer: Any) -> Iterator[list[int]]:
    """Packed token rows of the evaluation text, as Stage 1 packs them, after the skipped sequences."""
    from training.text import iter_documents, pack_token_rows
    docs = iter_documents(ev.dataset, ev.dataset_split, ev.text_column)
    return itertools.islice(pack_token_rows(docs, tokenizer, ev.context_length), ev.skip_sequences, None)


def token_batches(rows: Iterator[list[int]], batch_size: int, special: Tensor, n_tokens: int
                  ) -> Iterator[tuple[Tensor, Tensor]]:
    """(tokens [b, seq] int64, evaluated-position mask [b, seq]) until >= n_tokens positions, in whole sequences."""
    seen = 0
    while seen < n_tokens and (batch := list(itertools.islice(rows, batch_size))):
        tokens = torch.tensor(batch, dtype=torch.long)
        mask = ~torch.isin(tokens, special)
        per_row = mask.sum(1).cumsum(0)
        need = int((per_row < n_tokens - seen).sum()) + 1  # rows until the target is reached
        tokens, mask = tokens[:need], mask[:need]
        seen += int(mask.sum())
        yield tokens, mask


# ------------------------------------------------------------------------------------- evaluation


@dataclass
class MemberStats:
    """The accumulators of one member."""

    recon: EvalStats
    splice: SpliceStats = field(default_factory=SpliceStats)


def _add_sum(stats: SpliceStats, key: str, total: float) -> None:
    """Add a float64 sum of per-position values to stats.sums[key] (what SpliceStats.update accumulates)."""
    stats.sums[key] = stats.sums.get(key, 0.0) + total


def _masked_sum(values: Tensor, mask: Tensor) -> float:
    """float64 sum of values at the mask's True positions."""
    return values.double()[mask.to(values.device)].sum().item()


@torch.no_grad()
def evaluate_batch(model: Any, hook: str, tokens: Tensor, mask: Tensor, members: Sequence[torch.nn.Module],
                   stats: Sequence[MemberStats], with_error: bool, ablate_all: bool = True) -> None:
    """Update every member's accumulators on tokens [b, seq] (mask [b, seq]: positions evaluated and spliced; the
    zero-ablation baseline zeroes every position when `ablate_all`, as SAELens does, else only those)."""
    logits_clean, acts = capture(model, tokens, [hook], logits=True)          # [b, seq, vocab]
    act = acts.pop(hook)                                                      # [b, seq, *rest]
    b, s = tokens.shape
    flat = act.reshape(b * s, -1).float()                                     # [b*seq, d_in]
    keep = ~mask                                                               # clean activation kept there
    ce_mask, kl_mask = mask[:, :-1], mask
    n_ce, n_kl = int(ce_mask.sum()), int(kl_mask.sum())

    def run(member: torch.nn.Module | None, mode: str, clean: Tensor | None = keep) -> Tensor:
        """Logits [b, seq, vocab] with `member` spliced in at the hook as `mode` (see training.sae_hooks), positions
        where `clean` is True left as they were."""
        logits, _ = run_with_saes(model, tokens, {hook: member}, mode, keep=clean)
        return logits

    ce_clean = _masked_sum(next_token_ce(logits_clean, tokens), ce_mask)
    logits_zero = run(None, "zero", None if ablate_all else keep)
    ce_zero = _masked_sum(next_token_ce(logits_zero, tokens), ce_mask)
    kl_zero = _masked_sum(kl_div(logits_clean, logits_zero), kl_mask)
    del logits_zero
    rows = mask.reshape(-1).to(flat.device)
    for member, st in zip(members, stats):
        codes = member.encode(flat)                                           # [b*seq, d_hidden]
        x_hat = member.decode(codes)                                          # [b*seq, d_in]
        st.recon.update(flat[rows], x_hat[rows], codes[rows])
        passes = [("spliced", "sae")] + ([("with_error", "error")] if with_error else [])
        for name, mode in passes:
            logits = run(member, mode)
            _add_sum(st.splice, f"ce_{name}", _masked_sum(next_token_ce(logits, tokens), ce_mask))
            _add_sum(st.splice, f"kl_{name}", _masked_sum(kl_div(logits_clean, logits), kl_mask))
            del logits
        _add_sum(st.splice, "ce_clean", ce_clean)
        _add_sum(st.splice, "ce_zero", ce_zero)
        _add_sum(st.splice, "kl_zero", kl_zero)
        st.splice.n_ce += n_ce
        st.splice.n_kl += n_kl


def member_report(architecture: str, key: float | int, st: MemberStats, bins: int) -> dict[str, Any]:
    """All metrics of one member (see training.metrics for definitions) and its log10-density histogram."""
    m = st.recon.compute()
    splice = st.splice.compute()
    if "ce_loss_with_error" in splice:
        splice["ce_with_error_delta"] = splice["ce_loss_with_error"] - splice["ce_loss_without_sae"]
    density = st.recon.sparsity.feature_density()
    n = st.recon.sparsity.n
    lo = math.floor(math.log10(1.0 / n)) if n > 0 else -8
    hist = log_density_histogram(density, bins=bins, log10_range=(float(lo), 0.0))
    return {"key": key, key_name(architecture): key, **m, **splice,
            "density_histogram": {"log10_edges": hist.edges.tolist(), "counts": hist.counts.tolist(),
                                  "n_dead": hist.n_dead}}


# ------------------------------------------------------------------------------------- result


@dataclass
class EvaluationResult:
    """What an evaluation produced (the contents of report.json)."""

    report: dict[str, Any]
    folder: Path
    seconds: float

    def table(self) -> str:
        """The end-of-run summary: one row per member, the knee marked with *."""
        arch = self.report["evaluated"]["architecture"]
        knee = self.report["knee"]["index"]
        rows = [f"  {key_name(arch):>9} {'L0':>8} {'expl.var':>8} {'cos':>6} {'dead%':>6} {'dense%':>6} "
                f"{'CE spl.':>8} {'CE score':>8} {'KL':>7}"]
        for i, m in enumerate(self.report["members"]):
            mark = "*" if i == knee else " "
            rows.append(f"{mark} {_key(m['key']):>9} {_f(m['l0'], '.1f'):>8} {_f(m['explained_variance'], '.4f'):>8} "
                        f"{_f(m['cossim'], '.3f'):>6} {_f(100 * m['frac_dead'], '.1f'):>6} "
                        f"{_f(100 * m['frac_dense'], '.1f'):>6} {_f(m['ce_loss_with_sae'], '.4f'):>8} "
                        f"{_f(m['ce_loss_score'], '.4f'):>8} {_f(m['kl_div_with_sae'], '.4f'):>7}")
        return "\n".join(rows)

    def __str__(self) -> str:
        ev = self.report["evaluated"]
        knee = self.report["knee"]
        rec = (f"recommended: {format_key(ev['architecture'], knee['key'])} (knee of explained variance vs L0)"
               if knee["index"] is not None else f"recommended: none ({knee['reason']})")
        return (f"evaluated {len(self.report['members'])} dictionaries on {ev['n_tokens']:,} tokens of "
                f"{ev['dataset']} [{ev['dataset_split']}] at {ev['hook']} in {self.seconds:.0f} s "
                f"(clean CE {_f(self.report['clean']['ce_loss_without_sae'], '.4f')}, zero-ablated "
                f"{_f(self.report['clean']['ce_loss_with_ablation'], '.4f')})\n{self.table()}\n{rec}\n"
                f"wrote {self.folder / REPORT_JSON}, {self.folder / REPORT_MD} and {len(PLOTS)} plots")


def _key(key: float | int | str) -> str:
    """A member's key in a table: 3 significant digits, or a pretrained dictionary's name as is."""
    return key if isinstance(key, str) else format(key, ".3g")


def _f(v: Any, spec: str) -> str:
    """A number formatted with spec, or "n/a" for None/NaN."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _json_safe(obj: Any) -> Any:
    """obj with non-finite floats replaced by None (strict JSON has no NaN/inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------- main


def report_folder(cfg: EvaluateConfig) -> Path:
    """Where the report goes: the sweep folder, or with --sae --output_dir (default outputs/evaluation/{name})."""
    if not cfg.sae:
        return Path(cfg.sweep)
    from training.pretrained import pretrained_label
    return Path(cfg.output_dir) if cfg.output_dir else Path("outputs") / "evaluation" / pretrained_label(cfg.sae[0])


def evaluate_sweep(cfg: EvaluateConfig) -> EvaluationResult:
    """Evaluate the sweep in cfg.sweep (or the --sae dictionaries), holding the evaluation lock of the report's
    folder (one evaluation writes a report)."""
    folder = report_folder(cfg)
    if cfg.sae:
        folder.mkdir(parents=True, exist_ok=True)
    if not folder.is_dir():
        return _evaluate(cfg)  # which says what is missing (locking would create the folder)
    with folder_lock(folder, EVALUATE_LOCK, what=f"the evaluation report of {folder}"):
        return _evaluate(cfg)


def evaluation_members(cfg: EvaluateConfig, device: Any) -> tuple[dict[str, Any], list[Any], list[Any]]:
    """(sweep.json or the pretrained dictionaries' description, keys, modules) of what cfg evaluates."""
    if not cfg.sae:
        meta = read_sweep(Path(cfg.sweep), cfg.allow_unfinished)
        saes = load_sweep(cfg.sweep, device)
        return meta, list(saes), list(saes.values())
    from training.pretrained import load_dictionary, pretrained_meta
    loaded = [load_dictionary(s, device) for s in cfg.sae]
    metas = [pretrained_meta(p, cfg.hook, cfg.model) for p in loaded]
    what = {(m["hook"], m["source_manifest"]["config"].get("model"), m["d_in"]) for m in metas}
    if len(what) > 1:
        raise UserError(f"the --sae dictionaries read different (hook, model, width)s {sorted(map(str, what))}: "
                        "evaluate them separately, or pass --hook and --model")
    keys = [p.label for p in loaded]
    keys = [k if keys.count(k) == 1 else f"{k}#{i}" for i, k in enumerate(keys)]
    meta = {**metas[0], "architecture": PRETRAINED, "finished": True, "saes": list(cfg.sae),
            "architectures": [p.architecture for p in loaded]}
    return meta, keys, [p.module for p in loaded]


def _evaluate(cfg: EvaluateConfig) -> EvaluationResult:
    """Evaluate every member of the sweep in cfg.sweep and write report.json, report.md and the plots there."""
    from training.hooks import describe_valid_hooks
    from training.models import analysis_dtype, load_model, resolve_device

    for name in ("n_tokens", "batch_size", "histogram_bins"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
    if not 0 <= cfg.dense_threshold <= 1:
        raise UserError(f"--dense_threshold must be in [0, 1] (got {cfg.dense_threshold})")
    folder = report_folder(cfg)
    device = resolve_device(cfg.device)
    meta, keys, members = evaluation_members(cfg, device)
    ev = resolve_text(cfg, meta)
    dtype = analysis_dtype(cfg.dtype, meta.get("source_manifest"))
    model = load_model(ev.model, device, dtype)
    if ev.hook not in model.hook_dict:
        raise UserError(f"hook {ev.hook!r} is not in model {ev.model!r}; valid hooks: "
                        f"{describe_valid_hooks(list(model.hook_dict))}")
    if ev.context_length > model.cfg.n_ctx:
        raise UserError(f"--context_length {ev.context_length} exceeds the model's {model.cfg.n_ctx} positions")
    if not ev.special_token_ids:
        from training.text import special_token_ids
        ev.special_token_ids = sorted(special_token_ids(model.tokenizer))
    special = torch.tensor(ev.special_token_ids if ev.exclude_special else [], dtype=torch.long)
    arch = meta["architecture"]
    stats = [MemberStats(EvalStats(sparsity=SparsityStats(dense_threshold=cfg.dense_threshold))) for _ in members]

    t0 = time.perf_counter()
    # tokenised up front (ids only: small), so that the bar counts to the tokens the text actually holds
    batches = list(token_batches(token_rows(ev, model.tokenizer), cfg.batch_size, special, cfg.n_tokens))
    if batches:
        _check_width(model, ev.hook, batches[0][0][:1].to(device), meta["d_in"], ev.model)
    n_seq, n_tok = 0, 0
    bar = tqdm(total=sum(int(mask.sum()) for _, mask in batches), unit="tok", unit_scale=True,
               desc=f"evaluating {len(members)} members", dynamic_ncols=True)
    try:
        for tokens, mask in batches:
            evaluate_batch(model, ev.hook, tokens.to(device), mask.to(device), members, stats, cfg.with_error,
                           ablate_all=not cfg.keep_special_in_ablation)
            n_seq += len(tokens)
            n_tok += int(mask.sum())
            bar.update(int(mask.sum()))
    finally:
        bar.close()
    if n_tok == 0:
        raise UserError(f"no tokens to evaluate on in split {ev.dataset_split!r} of {ev.dataset!r}"
                        + (f" after the {ev.skip_sequences:,} sequences Stage 1 used" if ev.skip_sequences else "")
                        + ": pass another --dataset or --dataset_split")
    if n_tok < cfg.n_tokens:
        print(f"warning: the text ran out after {n_tok:,} tokens (asked --n_tokens {cfg.n_tokens:,})")
    seconds = time.perf_counter() - t0

    reports = [member_report(arch, k, st, cfg.histogram_bins) for k, st in zip(keys, stats)]
    knee = knee_point([m["l0"] for m in reports], [m["explained_variance"] for m in reports])
    first = reports[0]
    report = {
        "toolkit_version": training.__version__,
        "evaluated": {
            "sweep": str(folder.resolve()), "sweep_sha256": meta.get("weights_sha256"), "architecture": arch, "key_name": key_name(arch), "keys": keys,
            **({"saes": meta["saes"], "architectures": meta["architectures"]} if "saes" in meta else {}),
            "model": ev.model, "hook": ev.hook, "dataset": ev.dataset, "dataset_split": ev.dataset_split,
            "text_column": ev.text_column, "context_length": ev.context_length, "held_out": ev.held_out,
            "skip_sequences": ev.skip_sequences, "n_tokens": n_tok, "n_tokens_requested": cfg.n_tokens,
            "n_sequences": n_seq, "excluded_token_ids": ev.special_token_ids if ev.exclude_special else [],
            "exclusion": exclusion_note(ev), "dense_threshold": cfg.dense_threshold, "device": str(device),
            "dtype": dtype,
            "seconds": seconds, "config": config_to_dict(cfg)},
        "clean": {n: first[n] for n in ("ce_loss_without_sae", "ce_loss_with_ablation", "kl_div_with_ablation")},
        "knee": {"index": knee.index, "key": None if knee.index is None else keys[knee.index],
                 "reason": knee.reason, "definition": KNEE_DEFINITION, "distances": knee.distances},
        "pareto_front": [keys[i] for i in pareto_front([m["l0"] for m in reports],
                                                       [m["explained_variance"] for m in reports])],
        "members": reports,
        "plots": dict(PLOTS),
    }
    report = _json_safe(report)
    write_plots(report, folder)
    atomic_write_text(folder / REPORT_MD, report_markdown(report))
    atomic_write_json(folder / REPORT_JSON, report)
    return EvaluationResult(report, folder, seconds)


def _check_width(model: Any, hook: str, tokens: Tensor, d_in: int, name: str) -> None:
    """Raise a UserError unless the model's activation at `hook` is d_in wide (flattened)."""
    _, acts = capture(model, tokens, [hook])
    width = int(math.prod(acts[hook].shape[2:]))
    if width != d_in:
        raise UserError(f"model {name!r} gives {width}-wide activations at {hook!r} but the sweep's dictionaries "
                        f"take {d_in}: pass the --model (and --hook) the sweep was trained on")


def exclusion_note(ev: Evaluated) -> str:
    """One line: which positions are left out of the averages, and why."""
    if not ev.exclude_special:
        return "no positions excluded (Stage 1 kept special tokens, so the dictionaries were trained on them)"
    return (f"positions holding a special token (ids {ev.special_token_ids}: BOS/EOS/PAD) are left out of every "
            "average and keep their clean activation in the spliced runs (the zero-ablated baseline zeroes them too, as "
            "SAELens does, unless --keep_special_in_ablation), because Stage 1 left them out of the "
            "training data; a CE term at position t (predicting token t+1) is dropped when token t is special")


# ------------------------------------------------------------------------------------- writing


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to path through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: what was evaluated, the recommendation and why, one table row per member, the plots."""
    ev, knee, clean = report["evaluated"], report["knee"], report["clean"]
    arch = ev["architecture"]
    name = "dictionary" if arch == PRETRAINED else get_architecture(arch).key_column
    lines = [f"# Sweep evaluation: `{ev['sweep']}`", "",
             f"- model `{ev['model']}`" + (f" in {ev['dtype']}" if ev.get("dtype") else "")
             + f", hook `{ev['hook']}`, {ev['architecture']} dictionaries",
             f"- text: `{ev['dataset']}` split `{ev['dataset_split']}`: {ev['held_out']}",
             f"- {ev['n_tokens']:,} token positions in {ev['n_sequences']:,} sequences of {ev['context_length']}",
             f"- excluded: {ev['exclusion']}",
             f"- clean next-token CE {_f(clean['ce_loss_without_sae'], '.4f')} nats, with the hook zero-ablated "
             f"{_f(clean['ce_loss_with_ablation'], '.4f')} nats", ""]
    if knee["index"] is not None:
        m = report["members"][knee["index"]]
        lines += [f"## Recommended: {format_key(arch, knee['key'])}", "",
                  f"L0 {_f(m['l0'], '.1f')}, explained variance {_f(m['explained_variance'], '.4f')}, "
                  f"CE loss score {_f(m['ce_loss_score'], '.4f')}, dead {_f(100 * m['frac_dead'], '.1f')}%.", "",
                  f"Why: {KNEE_DEFINITION}. Sparser members lose explained variance quickly; denser ones gain "
                  "little for their extra active features. Check its CE loss score and dead fraction in the table "
                  "before using it.", ""]
    else:
        lines += ["## Recommended: none", "", f"{knee['reason']}; pick from the table.", ""]
    lines += [f"| {name} | L0 | expl. var | MSE | cos sim | norm ratio | L1 norm | dead % | dense % | "
              "CE spliced | CE loss score | KL spliced | KL div score | CE w/ error − clean |",
              "|" + "---:|" * 14]
    for i, m in enumerate(report["members"]):
        key = f"**{_key(m['key'])}** ◀" if i == knee["index"] else _key(m["key"])
        lines.append(
            f"| {key} | {_f(m['l0'], '.1f')} | {_f(m['explained_variance'], '.4f')} | {_f(m['mse'], '.4g')} | "
            f"{_f(m['cossim'], '.4f')} | {_f(m['l2_ratio'], '.3f')} | {_f(m['l1'], '.3g')} | "
            f"{_f(100 * m['frac_dead'], '.1f')} | {_f(100 * m['frac_dense'], '.1f')} | "
            f"{_f(m['ce_loss_with_sae'], '.4f')} | {_f(m['ce_loss_score'], '.4f')} | {_f(m['kl_div_with_sae'], '.4f')} | "
            f"{_f(m['kl_div_score'], '.4f')} | "
            f"{_f(m.get('ce_with_error_delta'), '.1e')} |")
    lines += ["", "Definitions (training/metrics.py; SAELens' and SAEBench's): MSE = mean over tokens of "
              "‖x − x̂‖² (summed over dimensions); explained variance 1 − Σ‖x − x̂‖² / "
              "Σ‖x − mean(x)‖²; cos sim and norm ratio ‖x̂‖/‖x‖ are means over tokens; L0 and L1 norm are means "
              "over tokens of the number and the sum of active codes; dead = never active over the evaluated "
              f"tokens; dense = active on more than {ev['dense_threshold']:g} of them; CE loss score = (CE zero − "
              "CE spliced) / (CE zero − CE clean); KL = KL(clean ‖ spliced) per position, nats; KL div score = (KL zero − "
              "KL spliced) / KL zero; the zero-ablated run zeroes "
              + ("every position except special tokens" if report["evaluated"]["config"].get(
                  "keep_special_in_ablation") else "every position, as SAELens does") + "; the last column "
              "splices SAE output + error term, which must give the clean CE back (a check of the splicing).", "",
              f"![explained variance vs L0]({PLOTS['ev']})", f"![CE loss score vs L0]({PLOTS['ce']})",
              f"![dead fraction]({PLOTS['dead']})", f"![feature density]({PLOTS['density']})", ""]
    return "\n".join(lines)


def _save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _label(arch: str, key: float | int) -> str:
    """Short point label: "1e-03" for an L1 penalty, "k=32", a pretrained dictionary's name."""
    if isinstance(key, str):
        return key
    return get_architecture(arch).short_key(key)


def write_plots(report: dict[str, Any], folder: Path) -> None:
    """The four PNG figures of report["plots"] (matplotlib, Agg backend), into folder."""
    import matplotlib
    matplotlib.use("Agg")
    ev, knee = report["evaluated"], report["knee"]["index"]
    arch, members = ev["architecture"], report["members"]
    title = f"{ev['hook']}  ({ev['n_tokens']:,} tokens of {ev['dataset']} [{ev['dataset_split']}])"
    usable = [i for i, d in enumerate(report["knee"]["distances"]) if d is not None]
    _save_figure(plot_vs_l0(members, "explained_variance", "explained variance", arch, knee, title,
                            front=report["pareto_front"], chord=usable), folder / PLOTS["ev"])
    _save_figure(plot_vs_l0(members, "ce_loss_score", "CE loss score  (1 = clean, 0 = zero-ablated)", arch, knee,
                            title), folder / PLOTS["ce"])
    _save_figure(plot_dead(members, arch, ev["dense_threshold"], title), folder / PLOTS["dead"])
    _save_figure(plot_densities(members, arch, ev["dense_threshold"], title), folder / PLOTS["density"])


def _ok(v: Any) -> bool:
    """Whether v is a finite number."""
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_vs_l0(members: list[dict[str, Any]], metric: str, ylabel: str, arch: str, knee: int | None, title: str,
               front: Sequence[Any] = (), chord: Sequence[int] = ()) -> Any:
    """A metric against L0 (log axis), every point labelled by its key; the knee ringed, the Pareto front joined,
    the chord drawn between the first and last of the members (indices) in `chord`."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.8))
    pts = [(m["l0"], m[metric], m["key"], i) for i, m in enumerate(members)
           if _ok(m["l0"]) and m["l0"] > 0 and _ok(m[metric])]
    pts.sort()
    if pts:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, color="0.75", lw=1, zorder=1)
        on_front = [p for p in pts if p[2] in front]
        if on_front:
            ax.plot([p[0] for p in on_front], [p[1] for p in on_front], "-", color="C0", lw=2, zorder=2,
                    label="Pareto frontier")
        ax.scatter(xs, ys, color="C0", s=36, zorder=3)
        ends = [p for p in pts if p[3] in chord]  # the members the knee is chosen among
        if len(ends) >= 2:
            ax.plot([ends[0][0], ends[-1][0]], [ends[0][1], ends[-1][1]], "--", color="0.5", lw=1,
                    label="chord (knee definition)")
        for x, y, key, i in pts:
            ax.annotate(_label(arch, key), (x, y), textcoords="offset points", xytext=(8, -14 if i % 2 else 7),
                        fontsize=8)
        ax.margins(x=0.08, y=0.1)
        k = [p for p in pts if p[3] == knee]
        if k:
            ax.scatter([k[0][0]], [k[0][1]], s=220, facecolors="none", edgecolors="C3", lw=2, zorder=4,
                       label=f"knee: {format_key(arch, k[0][2])}")
        if arch != PRETRAINED and not get_architecture(arch).sweep_param_integer:
            ax.text(0.02, 0.97, f"points labelled by their {get_architecture(arch).key_column}",
                    transform=ax.transAxes, va="top", fontsize=8, color="0.3")
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no member with L0 > 0 and a finite value", ha="center", transform=ax.transAxes)
    ax.set_xlabel("L0 (mean active features per token, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel.split('  ')[0]} vs L0\n{title}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def _plain_log_ticks(axis: Any) -> None:
    """Label a log axis at 1, 2, 5 x 10^n with plain numbers (2, 5, 10, 20 ...) instead of 2 x 10^0."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_dead(members: list[dict[str, Any]], arch: str, dense_threshold: float, title: str) -> Any:
    """Dead and dense feature fractions (percent) against the members' keys: a log axis for real-valued ones (L1
    penalty), log2 with integer ticks for integer ones (k)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = [m["key"] for m in members]
    xs = list(range(len(keys))) if arch == PRETRAINED else keys
    ax.plot(xs, [100 * m["frac_dead"] for m in members], "o-", color="C3", label="dead (never active)")
    ax.plot(xs, [100 * m["frac_dense"] for m in members], "s--", color="C1",
            label=f"dense (active on > {dense_threshold:g} of tokens)")
    if arch == PRETRAINED:
        ax.set_xticks(xs, keys, rotation=30, fontsize=8)
        ax.set_xlabel("dictionary")
    elif not get_architecture(arch).sweep_param_integer:
        positive = [k for k in keys if k > 0]
        if len(positive) == len(keys):
            ax.set_xscale("log")
        elif positive:  # an L1 penalty of 0: linear near 0, log above the smallest positive one
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xlabel(f"{get_architecture(arch).key_axis} (log scale)")
    else:
        ax.set_xscale("log", base=2)
        ax.set_xticks(keys, [str(int(k)) for k in keys])
        ax.set_xlabel(f"{get_architecture(arch).key_axis} (log2 scale)")
    ax.set_ylabel("% of features")
    ax.set_ylim(bottom=-2, top=max(5.0, 1.1 * max(100 * max(m["frac_dead"], m["frac_dense"]) for m in members)))
    ax.set_title(f"dead and dense features\n{title}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_densities(members: list[dict[str, Any]], arch: str, dense_threshold: float, title: str) -> Any:
    """One panel per member: histogram of log10 feature density, dead features as a red bar on the left."""
    import matplotlib.pyplot as plt
    n = len(members)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, m in zip(axes.flat, members):
        h = m["density_histogram"]
        edges, counts = h["log10_edges"], h["counts"]
        width = edges[1] - edges[0]
        span = edges[-1] - edges[0]
        ax.bar(edges[:-1], counts, width=width, align="edge", color="C0")
        dead_x = edges[0] - 0.14 * span  # the dead bar sits apart, left of the axis range
        ax.bar([dead_x], [h["n_dead"]], width=max(width, 0.05 * span), align="center", color="C3")
        ax.axvline(edges[0] - 0.07 * span, color="0.6", lw=0.8)
        if dense_threshold > 0:
            ax.axvline(math.log10(dense_threshold), color="C1", ls="--", lw=1)
        ax.set_title(f"{format_key(arch, m['key'])}: L0 {_f(m['l0'], '.1f')}\n"
                     f"dead {h['n_dead']}, dense {int(m['n_dense'])}", fontsize=9)
        ticks = list(range(math.ceil(edges[0]), math.floor(edges[-1]) + 1))
        ax.set_xticks([dead_x] + ticks, ["dead"] + [str(t) for t in ticks], fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("log10 feature density")
    for ax in axes[:, 0]:
        ax.set_ylabel("features")
    fig.suptitle(f"feature density (fraction of tokens a feature is active on; dashed: dense threshold "
                 f"{dense_threshold:g})\n{title}", fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- several sweeps


def plot_frontiers(comparison: dict[str, Any], metric: str, colour: Any) -> Any:
    """Every compared sweep's members (dots) and Pareto frontier (line) of `metric` against L0 (log axis), one colour
    per architecture (`colour(name)`, another line style for a second sweep of one), the target L0s dotted."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles, seen = ["-", "--", ":", "-."], {}
    for s in comparison["sweeps"]:
        arch = s["architecture"]
        style = styles[seen.get(arch, 0) % len(styles)]
        seen[arch] = seen.get(arch, 0) + 1
        pts = [(x, y) for x, y in zip(s["l0"], s["metrics"][metric]["values"]) if _ok(x) and x > 0 and _ok(y)]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colour(arch), s=18, alpha=0.45, zorder=2)
        front = s["metrics"][metric]["frontier"]
        ax.plot([p[0] for p in front], [p[1] for p in front], style, marker="o", ms=5, color=colour(arch), lw=2,
                zorder=3, label=f"{s['label']} ({len(front)} on frontier)")
    for t in comparison["targets"]:
        ax.axvline(t, color="0.6", ls=":", lw=1, zorder=1)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel("L0 (mean active features per token, log scale)")
    label = comparison["metrics"][metric]
    ax.set_ylabel(label + ("  (1 = clean, 0 = zero-ablated)" if metric == "ce_loss_score" else ""))
    on = comparison["evaluated_on"]
    ax.set_title(f"{label} vs L0: Pareto frontiers (lines), all members (dots)\n{on['hook']} of {on['model']}",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    return fig


def write_frontier_plots(comparison: dict[str, Any], folder: Path, colour: Any) -> None:
    """The PNG figures of comparison["plots"] ({metric: file name}; matplotlib, Agg backend), into folder."""
    import matplotlib
    matplotlib.use("Agg")
    for metric, name in comparison["plots"].items():
        _save_figure(plot_frontiers(comparison, metric, colour), folder / name)
