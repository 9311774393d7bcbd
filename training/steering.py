"""Steer a language model with a dictionary feature and read the feature back on what it wrote.

Steering: during generation, `strength * decoder[f] / ||decoder[f]||` (the feature's unit decoder
direction, without decoder bias or center) is added to the activation at the dictionary's hook, at
every position, through TransformerLens hooks on the `TransformerBridge`. Several features add
their vectors up: v = sum_f strength_f * unit(decoder[f]). At `attn.hook_z` ([batch, seq, heads,
d_head]) the dictionary's d_in is heads * d_head and v is reshaped to [heads, d_head].

Generation is our own loop (full forward of the whole sequence with the hook active, sample the
last position's next token, append), with a CPU `torch.Generator` seeded with `seed` for every
continuation, so the unsteered and every steered continuation draw the same random numbers.

Reading back: the prompt + continuation token ids go through the UNMODIFIED model; the feature's
activation is the dictionary's code (`sae.encode`) of the activation at the hook, per token.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from training.chunks import atomic_write_json, has_tokens
from training.cli import UserError
from training.locks import output_lock
from training.models import DTYPE_CHOICES
from training.render import BLOCKS, block_level, visible_token
from training.sae_hooks import add_vector_hook, capture  # noqa: F401 (add_vector_hook: part of this module's API)
from training.text import special_token_ids

DEFAULT_STRENGTH = 8.0
"""Strength used when none is given (activation units: the decoder directions have unit norm)."""

FeatureSpec = int | Sequence[int] | dict[int, float] | Sequence[dict[int, float]]


# ------------------------------------------------------------------------------------- what to steer

def steering_runs(features: FeatureSpec, strength: float | Sequence[float] | None = None) -> list[dict[int, float]]:
    """The steered runs as [{feature id: strength}], one dict per continuation.

    - `dict` {id: strength} (or a list of such dicts): those runs as given; `strength` must be None.
    - `int` or list of ids: one run per value of `strength` (a float or a list: dose-response), every
      listed feature steered at that same strength at once; `strength` None means DEFAULT_STRENGTH.
    """
    if isinstance(features, dict) or (isinstance(features, (list, tuple)) and features
                                      and all(isinstance(f, dict) for f in features)):
        if strength is not None:
            raise UserError("give strengths either per feature ({id: strength}) or with strength=, not both")
        runs = [features] if isinstance(features, dict) else list(features)
        out = [{int(f): float(s) for f, s in run.items()} for run in runs]  # type: ignore[union-attr]
    else:
        ids = [features] if isinstance(features, int) else [int(f) for f in features]  # type: ignore[union-attr]
        strengths = [DEFAULT_STRENGTH] if strength is None else (
            [float(strength)] if isinstance(strength, (int, float)) else [float(s) for s in strength])
        if not strengths:
            raise UserError("no strength given: pass at least one")
        out = [{f: s for f in ids} for s in strengths]
    if not out or any(not run for run in out):
        raise UserError("no feature to steer: pass at least one feature id")
    return out


def parse_feature_args(feature: int | None, features: Sequence[str] | None,
                       strength: Sequence[float] | None) -> list[dict[int, float]]:
    """Runs from the CLI flags: `--feature ID`, `--features ID[:STRENGTH] ...`, `--strength S [S ...]`.

    A feature written `id:strength` keeps that strength in every run; each bare id gets each value of
    --strength in turn (one continuation per value: dose-response; default 8). When every feature
    has its own strength there is one run and --strength must be left out.
    """
    fixed: dict[int, float] = {}
    bare: list[int] = []
    specs = ([str(feature)] if feature is not None else []) + list(features or [])
    if not specs:
        raise UserError("no feature to steer: pass --feature ID or --features ID[:STRENGTH] ...")
    for spec in specs:
        head, sep, tail = spec.partition(":")
        try:
            fid = int(head)
            value = float(tail) if sep else None
        except ValueError:
            raise UserError(f"bad feature {spec!r}: write a feature id (123) or id:strength (123:-4)") from None
        if value is None:
            bare.append(fid)
        else:
            fixed[fid] = value
    if not bare:
        if strength:
            raise UserError("--strength has no effect when every feature has its own strength (id:strength): "
                            "drop --strength or write some features without one")
        return [fixed]
    return [{**{f: s for f in bare}, **fixed} for s in (strength or [DEFAULT_STRENGTH])]


def check_features(runs: Sequence[dict[int, float]], d_hidden: int) -> None:
    """UserError for a feature id outside 0..d_hidden-1."""
    for run in runs:
        for f in run:
            if not 0 <= f < d_hidden:
                raise UserError(f"feature {f} is out of range: this dictionary has features 0..{d_hidden - 1}")


def steering_vector(sae: Any, strengths: dict[int, float]) -> Tensor:
    """v: [d_in] = sum over features f of strength_f * decoder[f] / ||decoder[f]|| (no bias, no center)."""
    decoder = sae.decoder.detach()  # [d_hidden, d_in]
    check_features([strengths], decoder.shape[0])
    v = torch.zeros(decoder.shape[1], dtype=decoder.dtype, device=decoder.device)
    for f, s in strengths.items():
        v = v + s * decoder[f] / decoder[f].norm()
    return v


# ------------------------------------------------------------------------------------- sampling

def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """logits: [vocab] with every token outside the top-k and outside the nucleus set to -inf.

    Nucleus (top-p): sort probabilities descending and keep the shortest prefix whose sum reaches
    top_p (a token is kept when the mass strictly before it is below top_p; the first is always kept).
    """
    out = logits.clone()
    if top_k is not None and top_k < out.numel():
        kth = out.topk(top_k).values[-1]
        out[out < kth] = -math.inf
    if top_p is not None and top_p < 1.0:
        probs, order = out.softmax(-1).sort(descending=True)
        before = probs.cumsum(-1) - probs  # mass strictly before each sorted token
        drop = before >= top_p
        drop[0] = False
        out[order[drop]] = -math.inf
    return out


def sample_next(logits: Tensor, generator: torch.Generator, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None) -> int:
    """The next token id from last-position `logits: [vocab]`: argmax when temperature is 0, else a draw
    from softmax(filter_logits(logits) / temperature) with `generator` (a CPU generator)."""
    logits = logits.detach().float().cpu()
    if temperature == 0:
        return int(logits.argmax())
    probs = (filter_logits(logits, top_k, top_p) / temperature).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_tokens(model: Any, prompt_ids: Sequence[int], max_new_tokens: int, *, seed: int = 0,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    fwd_hooks: Sequence[tuple[str, Callable]] = (), stop_token: int | None = None,
                    on_token: Callable[[], None] | None = None) -> list[int]:
    """The new token ids after `prompt_ids`: each step runs the whole sequence through `model` with
    `fwd_hooks` active and samples the next token (see `sample_next`) with a generator seeded `seed`;
    stops after `max_new_tokens` or right after `stop_token`."""
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    ids = list(prompt_ids)
    new: list[int] = []
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids], device=device), return_type="logits")  # [1, seq, vocab]
            nxt = sample_next(logits[0, -1], generator, temperature, top_k, top_p)
            ids.append(nxt)
            new.append(nxt)
            if on_token is not None:
                on_token()
            if stop_token is not None and nxt == stop_token:
                break
    return new


def model_device(model: Any) -> torch.device:
    """The device of the model's parameters."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device(getattr(model.cfg, "device", None) or "cpu")


# ------------------------------------------------------------------------------------- reading back

def prompt_token_ids(model: Any, prompt: str, prepend_bos: bool | None = None) -> list[int]:
    """Token ids of `prompt` as the model's `to_tokens` gives them (BOS per the model's default, or
    `prepend_bos`); an empty prompt is a UserError."""
    if not prompt:
        raise UserError("empty prompt: pass --prompt TEXT")
    ids = model.to_tokens(prompt, prepend_bos=prepend_bos, truncate=False)[0].tolist()
    if not ids:
        raise UserError("the prompt gives no tokens: pass a longer --prompt")
    return ids


def check_hook(model: Any, hook: str) -> None:
    """UserError when the model has no hook called `hook`."""
    if hook not in model.hook_dict:
        raise UserError(f"the model has no hook {hook!r}: pass --model with the model the sweep was trained on")


@torch.no_grad()
def hook_activations(model: Any, hook: str, token_ids: Sequence[int]) -> Tensor:
    """Activations [seq, d_in] at `hook` of the unmodified model on `token_ids` (heads concatenated
    for attn.hook_z)."""
    check_hook(model, hook)
    tokens = torch.tensor([list(token_ids)], device=model_device(model))
    _, acts = capture(model, tokens, [hook])
    act = acts[hook]
    return act.reshape(act.shape[0], act.shape[1], -1)[0]


@torch.no_grad()
def feature_activations(model: Any, sae: Any, hook: str, text: str | Sequence[int] | Tensor,
                        features: Sequence[int] | None = None,
                        prepend_bos: bool | None = None) -> tuple[list[str], Tensor]:
    """(token strings, activations [seq, len(features)] or [seq, d_hidden] when `features` is None):
    the dictionary's codes at `hook` of the unmodified model on `text` (a string, tokenised with
    `prompt_token_ids`, or token ids)."""
    if isinstance(text, str):
        ids = prompt_token_ids(model, text, prepend_bos)
    else:
        ids = text.flatten().tolist() if isinstance(text, Tensor) else list(text)
    if features is not None:
        check_features([{f: 0.0 for f in features}], sae.decoder.shape[0])
    acts = hook_activations(model, hook, ids)
    codes = sae.encode(acts.to(sae.decoder.device, sae.decoder.dtype)).float().cpu()  # [seq, d_hidden]
    if features is not None:
        codes = codes[:, list(features)]
    return token_strings(model.tokenizer, ids), codes


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token id decoded on its own."""
    return [tokenizer.decode([i]) for i in ids]


# ------------------------------------------------------------------------------------- the whole thing

@dataclass
class Continuation:
    """One generated continuation and its feature activations read back by the unmodified model."""

    strengths: dict[int, float]
    """{feature id: strength} added while generating ({} for the unsteered one)."""
    token_ids: list[int]
    """The new token ids (without the prompt)."""
    text: str
    """The new tokens decoded."""
    activations: Tensor
    """[prompt + new tokens, n_features]: codes of the result's `features` on prompt + continuation."""

    @property
    def label(self) -> str:
        """'unsteered' or e.g. '#123×8' / '#12×4 #40×-2'."""
        return "unsteered" if not self.strengths else " ".join(f"#{f}×{s:g}" for f, s in self.strengths.items())


@dataclass
class SteeringResult:
    """The unsteered and the steered continuations of one prompt, with feature activations."""

    prompt: str
    prompt_ids: list[int]
    """Prompt token ids (with BOS when the model prepends one)."""
    hook: str
    features: list[int]
    """Every feature steered in some run, in order: the columns of each `Continuation.activations`."""
    unsteered: Continuation
    steered: list[Continuation]
    token_strings: dict[int, str] = field(default_factory=dict)
    """{token id: decoded string} for every token shown."""
    special_ids: set[int] = field(default_factory=set)
    """Ids of special tokens (BOS/EOS...): left out of activation statistics and of the bar scale."""
    settings: dict[str, Any] = field(default_factory=dict)
    """seed, temperature, top_k, top_p, max_new_tokens."""

    @property
    def runs(self) -> list[Continuation]:
        """The unsteered continuation then the steered ones."""
        return [self.unsteered, *self.steered]

    def continuation_mask(self, run: Continuation) -> Tensor:
        """Bool [prompt + new tokens]: True on generated tokens that are not special tokens."""
        ids = self.prompt_ids + run.token_ids
        mask = torch.tensor([i not in self.special_ids for i in ids], dtype=torch.bool)
        mask[: len(self.prompt_ids)] = False
        return mask

    def mean_activation(self, run: Continuation) -> Tensor:
        """[n_features]: mean feature activation over the run's generated (non-special) tokens (0 if none)."""
        mask = self.continuation_mask(run)
        return run.activations[mask].mean(0) if mask.any() else torch.zeros(len(self.features))

    def firing_fraction(self, run: Continuation) -> Tensor:
        """[n_features]: fraction of the run's generated (non-special) tokens where the feature is > 0."""
        mask = self.continuation_mask(run)
        return (run.activations[mask] > 0).float().mean(0) if mask.any() else torch.zeros(len(self.features))

    def __str__(self) -> str:
        return render_result(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (token ids, texts, activations as lists)."""
        return {"prompt": self.prompt, "prompt_ids": self.prompt_ids, "hook": self.hook, "features": self.features,
                "settings": self.settings,
                "runs": [{"label": r.label, "strengths": {str(f): s for f, s in r.strengths.items()},
                          "token_ids": r.token_ids, "text": r.text,
                          "tokens": [self.token_strings[i] for i in self.prompt_ids + r.token_ids],
                          "activations": r.activations.tolist(),
                          "mean_activation": self.mean_activation(r).tolist(),
                          "firing_fraction": self.firing_fraction(r).tolist()} for r in self.runs]}


def steer(model: Any, sae: Any, hook: str, features: FeatureSpec, strength: float | Sequence[float] | None = None,
          prompt: str = "", max_new_tokens: int = 60, seed: int = 0, temperature: float = 1.0,
          top_k: int | None = None, top_p: float | None = None, prepend_bos: bool | None = None,
          stop_at_eos: bool = True, progress: bool = False) -> SteeringResult:
    """Generate the unsteered continuation of `prompt` and one steered continuation per run of
    `steering_runs(features, strength)` (same seed and sampling settings), then read the steered
    features back on each text with the unmodified model."""
    runs = steering_runs(features, strength)
    check_features(runs, sae.decoder.shape[0])
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    check_hook(model, hook)
    ids = prompt_token_ids(model, prompt, prepend_bos)
    n_ctx = model.cfg.n_ctx
    if len(ids) + max_new_tokens > n_ctx:
        raise UserError(f"the prompt ({len(ids)} tokens) plus --max_new_tokens {max_new_tokens} exceeds the model's "
                        f"{n_ctx} positions: shorten one of them")
    width = hook_activations(model, hook, ids[:1]).shape[-1]
    if width != sae.decoder.shape[1]:
        raise UserError(f"the dictionary reads {sae.decoder.shape[1]} values but {hook} has {width} in this model: "
                        "use the model the sweep was trained on")
    eos = getattr(model.tokenizer, "eos_token_id", None) if stop_at_eos else None
    settings = dict(seed=seed, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
    sample = dict(seed=seed, temperature=temperature, top_k=top_k, top_p=top_p, stop_token=eos)
    bar = tqdm(total=max_new_tokens * (1 + len(runs)), unit="tok", desc="generating", disable=not progress)
    with bar:
        generated = [generate_tokens(model, ids, max_new_tokens, on_token=bar.update, **sample)]
        for run in runs:
            hooks = [(hook, add_vector_hook(steering_vector(sae, run)))]
            generated.append(generate_tokens(model, ids, max_new_tokens, fwd_hooks=hooks, on_token=bar.update,
                                             **sample))
    feats = list(dict.fromkeys(f for run in runs for f in run))
    conts = []
    for strengths, new in zip([{}, *runs], generated):
        _, acts = feature_activations(model, sae, hook, ids + new, feats)
        conts.append(Continuation(strengths, new, model.tokenizer.decode(new), acts))
    all_ids = sorted(set(ids).union(*(c.token_ids for c in conts)))
    return SteeringResult(prompt, ids, hook, feats, conts[0], conts[1:],
                          token_strings=dict(zip(all_ids, token_strings(model.tokenizer, all_ids))),
                          special_ids=special_token_ids(model.tokenizer), settings=settings)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """UserError for sampling settings out of range."""
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1 (got {max_new_tokens})")
    if temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or positive (got {temperature})")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top_k must be at least 1 (got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1] (got {top_p})")


# ------------------------------------------------------------------------------------- display

def block_levels(values: Tensor, vmax: float) -> list[int]:
    """Bar height 0..8 per value (training.render.block_level): 0 for values <= 0 (or vmax <= 0), else
    ceil(8 * value / vmax) clipped to 1..8."""
    return [block_level(float(v), vmax) for v in values]


def block_bar(values: Tensor, vmax: float) -> str:
    """One character per value: a space for level 0, else BLOCKS[level - 1] (U+2581..U+2588)."""
    return "".join(" " if lv == 0 else BLOCKS[lv - 1] for lv in block_levels(values, vmax))


def render_activations(tokens: Sequence[str], values: Tensor, vmax: float, width: int,
                       shown: Sequence[bool] | None = None) -> str:
    """Tokens on one line and, under each token, its bar character repeated over the token's width.
    A newline inside a token is shown as ↵ and ends the line (what follows it, e.g. indentation, starts
    the next one); lines also wrap at `width`. Tokens with `shown` False get no bar."""
    levels = block_bar(values, vmax)
    lines: list[str] = []
    text, bars = "", ""
    for i, (tok, ch) in enumerate(zip(tokens, levels)):
        ch = ch if shown is None or shown[i] else " "
        pieces = tok.split("\n")
        for k, piece in enumerate(pieces):
            disp = visible_token(piece) + ("↵" if k < len(pieces) - 1 else "")
            if text and len(text) + len(disp) > width:
                lines += [text, bars.rstrip()]
                text, bars = "", ""
            text, bars = text + disp, bars + ch * len(disp)
            if k < len(pieces) - 1:
                lines += [text, bars.rstrip()]
                text, bars = "", ""
    if text:
        lines += [text, bars.rstrip()]
    return "\n".join(lines)


def wrap_text(text: str, width: int) -> list[str]:
    """`text` wrapped at `width`, keeping its own line breaks (tabs as 4 spaces)."""
    out: list[str] = []
    for line in text.expandtabs(4).split("\n"):
        out += textwrap.wrap(line, width, drop_whitespace=True) or [""]
    return out


def side_by_side(columns: Sequence[tuple[str, str]], width: int, min_column: int = 28) -> str:
    """(header, text) columns next to each other within `width`, separated by │; stacked one under
    the other when a column would be narrower than `min_column`."""
    n = len(columns)
    col = (width - 3 * (n - 1)) // n
    if col < min_column:
        return "\n\n".join(f"── {h} ──\n" + "\n".join(wrap_text(t, width)) for h, t in columns)
    cells = [[h[:col], "─" * col, *wrap_text(t, col)] for h, t in columns]
    rows = max(len(c) for c in cells)
    lines = []
    for r in range(rows):
        parts = [(c[r] if r < len(c) else "").ljust(col) for c in cells]
        sep = "─┼─" if r == 1 else " │ "
        lines.append(sep.join(parts).rstrip())
    return "\n".join(lines)


def render_result(result: SteeringResult, width: int | None = None, header: str = "") -> str:
    """The report: continuations side by side, each steered text with its feature bars, a summary table."""
    width = width or shutil.get_terminal_size((120, 40)).columns
    out = [header] if header else []
    out.append(f"prompt: {result.prompt!r}  ({len(result.prompt_ids)} tokens; "
               + ", ".join(f"{k} {v}" for k, v in result.settings.items() if v is not None) + ")")
    out.append("")
    out.append(side_by_side([(r.label, r.text) for r in result.runs], width))
    strings = result.token_strings
    for j, f in enumerate(result.features):
        runs = [r for r in result.steered if f in r.strengths]
        masks = {id(r): [i not in result.special_ids for i in result.prompt_ids + r.token_ids] for r in runs}
        vmax = max((float(r.activations[torch.tensor(masks[id(r)]), j].max()) if any(masks[id(r)]) else 0.0)
                   for r in runs)
        for r in runs:
            out.append("")
            scale = f"{BLOCKS[-1]} = {vmax:.3g}" if vmax > 0 else "it never fires on these texts"
            out.append(f"feature {f} on the steered text ({r.label}), read by the unmodified model; {scale}")
            toks = [strings[i] for i in result.prompt_ids + r.token_ids]
            out.append(render_activations(toks, r.activations[:, j], vmax, width, masks[id(r)]))
    out.append("")
    out.append(summary_table(result))
    return "\n".join(out)


def summary_table(result: SteeringResult) -> str:
    """One row per run: per feature, mean activation over the generated tokens and the fraction firing."""
    label_w = max(9, *(len(r.label) for r in result.runs))
    head = f"{'run':<{label_w}}" + "".join(f"  {'#' + str(f) + ' mean':>12} {'firing':>7}" for f in result.features)
    rows = [head]
    for r in result.runs:
        mean, fire = result.mean_activation(r), result.firing_fraction(r)
        rows.append(f"{r.label:<{label_w}}" + "".join(f"  {float(m):>12.4g} {100 * float(p):>6.0f}%"
                                                      for m, p in zip(mean, fire)))
    return ("feature activation on the generated tokens (unmodified model; mean code, % of tokens > 0):\n"
            + "\n".join(rows))


# ------------------------------------------------------------------------------------- sweeps

def load_for_steering(sweep: str | Path | None, l1: float | None = None, k: int | None = None,
                      model: str | None = None, device: str | None = None, dtype: str = "auto",
                      sae: str | None = None, hook: str | None = None, key: str | float | None = None
                      ) -> tuple[Any, Any, str]:
    """(model, dictionary, hook) ready for `steer`: the sweep's member chosen by `l1`/`k`/`key` (or the pretrained
    dictionary `sae`, see training.pretrained) and the model its activations came from (or `model`), in `dtype`
    (auto: the one Stage 1 ran it in)."""
    from training.models import analysis_dtype, load_model, resolve_device
    from training.pretrained import pick_dictionary
    dev = resolve_device(device)
    picked = pick_dictionary(sweep, l1, k, key, sae=sae, hook=hook, model=model, device=dev)
    meta = picked.meta
    loaded = load_model(model_name(meta, model), dev, analysis_dtype(dtype, meta.get("source_manifest")))
    check_sweep_hook(loaded, meta)
    return loaded, picked.module, meta["hook"]


def save_result(path: str | Path, result: SteeringResult) -> None:
    """Write `result.to_dict()` as JSON, atomically."""
    atomic_write_json(Path(path), result.to_dict())


def check_sweep_hook(model: Any, meta: dict[str, Any]) -> None:
    """UserError when the model lacks the sweep's hook because the sweep's activations were imported under
    another name (other cases are `check_hook`'s)."""
    if not has_tokens(meta.get("source_manifest") or {}) and meta["hook"] not in model.hook_dict:
        raise UserError(f"the sweep was trained on activations imported as hook {meta['hook']!r}, which this model "
                        "does not have: import them with --hook set to the hook they came from (e.g. "
                        "blocks.3.hook_resid_post) and train the sweep again")


def hook_norm(meta: dict[str, Any]) -> float | None:
    """The mean activation norm at the sweep's hook recorded by Stage 1, if any."""
    return ((meta.get("source_manifest") or {}).get("hooks", {}).get(meta.get("hook"), {}) or {}).get("mean_norm")


def model_name(meta: dict[str, Any], override: str | None) -> str:
    """`override`, else the model recorded in the sweep's source manifest."""
    if override:
        return override
    if not has_tokens(meta.get("source_manifest") or {}):
        raise UserError("the sweep was trained on imported activations, which record no model: pass --model (the "
                        "model they came from)")
    name = ((meta.get("source_manifest") or {}).get("config") or {}).get("model")
    if not name:
        raise UserError("the sweep records no model: pass --model")
    return name



# ------------------------------------------------------------------------------------- CLI

@dataclass
class SteerConfig:
    """Steer generation with dictionary features (steer.py)."""

    sweep: str = "outputs/sweep"
    """Sweep folder written by basic_l1_sweep.py."""
    l1: float | None = None
    """L1 penalty of the dictionary to use (one of the sweep's, nearest within 5%; may be left out when it has one dictionary)."""
    k: int | None = None
    """k of the dictionary to use, for a TopK sweep."""
    key: str | None = None
    """The dictionary by its key as written in sweep.json (its sweep parameter's value; any architecture)."""
    sae: str | None = None
    """A pretrained dictionary instead of a sweep member: a SAELens, sparsify or dictionary_learning folder, or hf:OWNER/REPO/PATH."""
    hook: str | None = None
    """Hook to steer at (default: the one the dictionary was trained on)."""
    feature: int | None = None
    """Feature id to steer with."""
    features: list[str] | None = None
    """Several features steered at once: `ID` (takes each --strength in turn) or `ID:STRENGTH` (fixed)."""
    strength: list[float] | None = None
    """Strength(s) added along the unit decoder direction (default 8); several values: one continuation each."""
    prompt: str = ""
    """Text to continue."""
    max_new_tokens: int = 60
    """Tokens to generate per continuation."""
    seed: int = 0
    """Seed of the sampling generator, the same for every continuation."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy)."""
    top_k: int | None = None
    """Sample only among the k most likely tokens."""
    top_p: float | None = None
    """Sample only within the smallest set of tokens whose probability reaches top_p."""
    prepend_bos: bool | None = None
    """Put BOS before the prompt (default: the model's own setting)."""
    stop_at_eos: bool = True
    """End a continuation at the end-of-text token."""
    model: str | None = None
    """Model to steer (default: the one the sweep's activations came from)."""
    device: str | None = None
    """cpu, cuda, cuda:N or mps (default: cuda when available)."""
    dtype: str = field(default="auto", metadata={"choices": list(DTYPE_CHOICES)})
    """Precision to run the model in; auto: the one Stage 1 ran it in (float32 when no manifest records one)."""
    threads: int | None = None
    """Torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)."""
    width: int | None = None
    """Output width in characters (default: the terminal's)."""
    save_json: str | None = None
    """Also write the result (token ids, texts, activations) to this JSON file."""


def run_steer(cfg: SteerConfig) -> SteeringResult:
    """Steer as `cfg` says, holding the lock on --save_json's file when there is one (one writer per output)."""
    with output_lock(cfg.save_json) if cfg.save_json else contextlib.nullcontext():
        return _steer(cfg)


def _steer(cfg: SteerConfig) -> SteeringResult:
    """Load the sweep's dictionary and its model, steer, print the report; returns the result."""
    from training.models import analysis_dtype, load_model, resolve_device
    if not cfg.prompt:
        raise UserError("empty prompt: pass --prompt TEXT")
    runs = parse_feature_args(cfg.feature, cfg.features, cfg.strength)
    check_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    from training.pretrained import pick_dictionary
    picked = pick_dictionary(cfg.sweep, cfg.l1, cfg.k, cfg.key, sae=cfg.sae, hook=cfg.hook, model=cfg.model,
                             device=device)
    sae, meta = picked.module, picked.meta
    check_features(runs, sae.decoder.shape[0])
    name = model_name(meta, cfg.model)
    model = load_model(name, device, analysis_dtype(cfg.dtype, meta.get("source_manifest")))
    check_sweep_hook(model, meta)
    result = steer(model, sae, meta["hook"], runs, prompt=cfg.prompt, max_new_tokens=cfg.max_new_tokens,
                   seed=cfg.seed, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   prepend_bos=cfg.prepend_bos, stop_at_eos=cfg.stop_at_eos, progress=True)
    norm = hook_norm(meta)
    header = (f"model {name} · hook {meta['hook']}"
              + (f" (mean activation norm {norm:.3g})" if norm else "")
              + f" · dictionary {picked.name} ({sae.decoder.shape[0]} features) from {picked.where}")
    print(render_result(result, cfg.width, header))
    if cfg.save_json:
        save_result(cfg.save_json, result)
        print(f"saved the result to {cfg.save_json}")
    return result
