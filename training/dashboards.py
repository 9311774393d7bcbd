"""Feature dashboards: a static site for one dictionary (or the model's neurons) that opens from disk.

Input: a features.json written by gather_high_activations.py (see training.feature_file), plus the
dictionary's decoder (from the sweep named in it) and the model's unembedding (from the model named in
the Stage 1 manifest). No server, no network: pages link one stylesheet and, for the index, two local
scripts (assets/index.js and index_data.js, loaded with <script src>, which works from file://).

Site layout:
    index.html                 every feature: sortable by id, density, max activation and (when given)
                               interpretation score; search by feature id ("123" or "#123") or by token text
    index_data.js              the index rows (window.FEATURE_INDEX)
    assets/style.css, index.js copied from training/dashboard_assets/
    features/{id}.html         one page per feature: density (+ where it sits among all features),
                               activation histogram, logit effects, top examples (each token shaded by its
                               activation, exact value on hover), quantile bands, nearest features
    prompts.html               with --prompt: which features fire on each token of each prompt

Definitions:
    logit effect of feature i   = (W_dec[i] mapped into the residual stream) @ W_U, a [d_vocab] vector:
                                  W_dec[i] itself for residual-stream hooks (resid_*, hook_mlp_out,
                                  hook_attn_out), W_dec[i] @ W_out[L] for blocks.L.mlp.hook_post,
                                  W_dec[i] @ W_O[L] (heads concatenated) for blocks.L.attn.hook_z. The
                                  final layer norm is ignored (direct path to the logits). The top and
                                  bottom `n_logits` tokens are shown. Neurons use the basis vectors e_i.
    nearest features            = the `n_neighbors` other features with the largest cosine similarity
                                  between unit decoder rows (dictionaries only).
    token shading               = 8 levels, level = ceil(8 * a / max of the feature), as the block
                                  characters of features.json; the hover title is the stored value.
    prompt view                 = the hook activations of the prompt (tokenised as is, no BOS added
                                  unless the tokenizer adds one), encoded like the features.json run; per
                                  token the `prompt_top` features with the largest activation > 0.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from training.chunks import has_tokens
from training.cli import UserError
from training.locks import output_lock
from training.models import DTYPE_CHOICES
from training.sweep_files import check_made_from, key_label, key_name, select_member
from training.feature_file import FEATURES_JSON, FeatureFile
from training.render import block_level, visible_token
from training.top_activations import NeuronScorer, SaeScorer

ASSETS = Path(__file__).resolve().parent / "dashboard_assets"
SITE_ASSETS = ("style.css", "index.js")


@dataclass
class DashboardConfig:
    """Which features.json to render, with what extras, and where."""

    features: str | None = None
    """features.json (or its folder) written by gather_high_activations.py."""
    sweep: str | None = None
    """Sweep folder: finds {sweep}/features/{member}/features.json and the dictionary (instead of --features)."""
    l1: float | None = None
    """L1 penalty of the sweep member (with --sweep)."""
    k: int | None = None
    """k of the sweep member (TopK sweeps, with --sweep)."""
    key: str | None = None
    """Sweep member by its key as written in sweep.json (with --sweep)."""
    sae: str | None = None
    """A pretrained dictionary (SAELens, sparsify or dictionary_learning folder, or hf:OWNER/REPO/PATH): finds outputs/features/{its folder name}/features.json, or the dictionary of --features (default: the one it records)."""
    output: str | None = None
    """Site folder (default: a dashboards/ folder next to features.json); replaced as a whole when rebuilt."""
    model: str | None = None
    """Model for the unembedding and --prompt (default: the model named in features.json)."""
    logits: bool = True
    """Show logit effects (loads the model's unembedding)."""
    n_logits: int = 10
    """Tokens shown in each of the top and bottom logit-effect tables."""
    n_neighbors: int = 8
    """Nearest features by decoder cosine shown per feature."""
    scores: str | None = None
    """Interpretation scores: an interp.jsonl of explain_features.py (score: detection accuracy, else clearness),
    or JSON {"id": score} or {"id": {"score": s, "explanation": "..."}} or a list of {"feature": id, "score": s,
    "explanation": "..."}."""
    prompt: list[str] | None = None
    """Text(s) to show the firing features of, token by token, on prompts.html (needs the model)."""
    prompt_top: int = 6
    """Features listed per prompt token."""
    feature_ids: list[int] | None = None
    """Build only these features' pages (and list only them)."""
    title: str | None = None
    """Site title (default: from the sweep member or hook)."""
    device: str | None = None
    """Device for the model and the prompt encoding (default: cuda when available)."""
    dtype: str = field(default="auto", metadata={"choices": list(DTYPE_CHOICES)})
    """Precision to run the model in; auto: the one features.json or Stage 1 records (float32 when no manifest records one)."""


# ------------------------------------------------------------------------------------- numbers

def logit_effects(directions: Tensor, w_u: Tensor, n: int, block: int = 1024
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top ids, top values, bottom ids, bottom values), each [F, n], of `directions [F, d] @ w_u [d, V]`;
    top in decreasing order, bottom in increasing order (most negative first)."""
    n = min(n, w_u.shape[1])
    outs: list[list[Tensor]] = [[], [], [], []]
    w = w_u.float()
    for s in range(0, len(directions), block):
        eff = directions[s:s + block].float() @ w
        tv, ti = eff.topk(n, dim=1)
        bv, bi = eff.topk(n, dim=1, largest=False)
        for lst, t in zip(outs, (ti, tv, bi, bv)):
            lst.append(t)
    return tuple(torch.cat(o) if o else torch.zeros(0, n) for o in outs)  # type: ignore[return-value]


def nearest_features(decoder: Tensor, n: int, block: int = 1024) -> tuple[Tensor, Tensor]:
    """(ids [F, n], cosines [F, n]) of each row's `n` most similar other rows by cosine similarity."""
    F = len(decoder)
    n = min(n, F - 1)
    unit = decoder.float() / decoder.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    ids, vals = [], []
    for s in range(0, F, block):
        sim = unit[s:s + block] @ unit.T                                            # [blk, F]
        r = torch.arange(len(sim))
        sim[r, r + s] = -math.inf
        v, i = sim.topk(n, dim=1)
        ids.append(i)
        vals.append(v)
    return (torch.cat(ids), torch.cat(vals)) if ids else (torch.zeros(0, n, dtype=torch.long), torch.zeros(0, n))


def residual_directions(model: Any, hook: str, decoder: Tensor) -> Tensor | None:
    """Decoder rows [F, width] mapped into the residual stream [F, d_model] (see the module docstring);
    None for hooks whose output weights are not known here."""
    d_model = model.cfg.d_model
    m = re.match(r"^blocks\.(\d+)\.(.+)$", hook)
    suffix = m.group(2) if m else hook
    layer = int(m.group(1)) if m else None
    with torch.no_grad():
        if suffix in ("mlp.hook_post",) and layer is not None:
            return decoder.float() @ model.W_out[layer].float()
        if suffix == "attn.hook_z" and layer is not None:
            w_o = model.W_O[layer].float()
            return decoder.float() @ w_o.reshape(-1, w_o.shape[-1])
        if decoder.shape[1] == d_model and suffix in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                                                       "hook_mlp_out", "hook_attn_out", "hook_embed"):
            return decoder.float()
    return None


def fmt(x: float | None) -> str:
    """A number for display: 4 significant digits, scientific notation when tiny or huge."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x == 0:
        return "0"
    a = abs(x)
    return f"{x:.4g}" if 1e-3 <= a < 1e5 else f"{x:.2e}"


def density_note(density: float) -> str:
    """"fires on 1 in N tokens" (or "never fired")."""
    if density <= 0:
        return "never fired"
    return f"fires on 1 in {1 / density:,.0f} tokens" if density < 0.5 else f"fires on {density:.0%} of tokens"


# ------------------------------------------------------------------------------------- SVG

def bars_svg(counts: Sequence[float], x_labels: Sequence[tuple[float, str]], width: int = 480, height: int = 130,
             marker: float | None = None, marker_label: str = "", color: str = "#fb8c3c") -> str:
    """An inline SVG bar chart of `counts` over [0, 1] of the x axis; `x_labels` are (fraction, text) ticks,
    `marker` an optional fraction of the x axis marked with a vertical line."""
    top, bottom, left, right = 8, 22, 4, 4
    w, h = width - left - right, height - top - bottom
    n = max(1, len(counts))
    peak = max(counts) if len(counts) and max(counts) > 0 else 1
    bw = w / n
    path = []
    for i, c in enumerate(counts):
        if c > 0:
            bh = max(1.0, h * c / peak)
            path.append(f"M{left + i * bw:.1f} {top + h}h{max(bw - 1, 0.6):.1f}v{-bh:.0f}h{-max(bw - 1, 0.6):.1f}z")
    parts = [f'<svg class="hist" viewBox="0 0 {width} {height}" role="img">',
             f'<path d="{"".join(path)}" fill="{color}"/>',
             f'<line x1="{left}" x2="{left + w}" y1="{top + h + .5}" y2="{top + h + .5}" stroke="#8c959f"/>']
    for frac, text in x_labels:
        x = left + frac * w
        anchor = "start" if frac <= 0.02 else "end" if frac >= 0.98 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{height - 6}" text-anchor="{anchor}">{html.escape(text)}</text>')
    if marker is not None:
        x = left + min(1.0, max(0.0, marker)) * w
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4}" y2="{top + h}" stroke="#8250df" stroke-width="2"/>')
        if marker_label:
            anchor = "end" if marker > 0.8 else "start"
            dx = -4 if marker > 0.8 else 4
            parts.append(f'<text x="{x + dx:.1f}" y="{top + 6}" text-anchor="{anchor}" style="fill:#8250df">'
                         f'{html.escape(marker_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


@dataclass
class DensityAxis:
    """Log10-density histogram of all features (dead features left out) and where a density falls on it."""

    lo: float
    hi: float
    counts: list[int]

    @classmethod
    def of(cls, densities: Sequence[float], bins: int = 40) -> "DensityAxis":
        """Histogram of log10 density over [floor(min), 0]."""
        live = np.log10([d for d in densities if d > 0]) if any(d > 0 for d in densities) else np.array([-1.0])
        lo, hi = float(min(math.floor(live.min()), -1)), 0.0
        counts, _ = np.histogram(live, bins=bins, range=(lo, hi))
        return cls(lo, hi, counts.tolist())

    def position(self, density: float) -> float | None:
        """Fraction of the x axis for `density` (None when it never fired)."""
        return None if density <= 0 else (math.log10(density) - self.lo) / (self.hi - self.lo)

    def svg(self, density: float | None = None) -> str:
        """The histogram, with `density` marked when given."""
        ticks = [((e - self.lo) / (self.hi - self.lo), f"1e{e}" if e else "1")
                 for e in range(int(self.lo), 1) if (int(self.lo) - e) % max(1, (int(-self.lo) + 5) // 6) == 0]
        marker = None if density is None else self.position(density)
        label = "" if density is None or density <= 0 else f"this feature: {fmt(density)}"
        return bars_svg(self.counts, ticks, marker=marker, marker_label=label, color="#9fb7d1")


def activation_svg(hist: dict[str, Any]) -> str:
    """The feature's activation histogram (sample of firing tokens) over [0, max]."""
    hi = hist["hi"]
    ticks = [(0.0, "0"), (0.5, fmt(hi / 2)), (1.0, fmt(hi))] if hi > 0 else [(0.0, "0")]
    return bars_svg(hist["counts"], ticks)


# ------------------------------------------------------------------------------------- HTML pieces

def esc(s: str) -> str:
    """HTML-escape text (quotes too)."""
    return html.escape(s, quote=True)


def token_spans(tokens: Sequence[str], acts: Sequence[float | None], max_act: float, center: int | None = None) -> str:
    """Tokens shaded by activation: `<b class=aN title=value>` (N = 1..8) for a non-zero activation (exact
    stored value in the title), class c added on the example's own token, class u for an unknown (not
    stored) activation, and bare text for activation 0 (keeps pages small)."""
    out = []
    for j, (tok, a) in enumerate(zip(tokens, acts)):
        text = esc(visible_token(tok)) or "\u2205"
        level = block_level(a, max_act)
        cls = [f"a{level}"] if level else []
        if j == center:
            cls.append("c")
        if a is None:
            cls.append("u")
        if not cls and a == 0:
            out.append(text)
            continue
        title = '"not stored"' if a is None else repr(a) if a else "0"
        c = cls[0] if len(cls) == 1 else '"' + " ".join(cls) + '"'
        out.append(f'<b class={c} title={title}>{text}</b>')
    return "".join(out)


def example_html(ex: dict[str, Any], max_act: float) -> str:
    """One example row: shaded tokens and the example's activation."""
    return f'<div class=ex><div class=toks>{token_spans(ex["tokens"], ex["acts"], max_act, ex["center"])}</div><i>{fmt(ex["activation"])}</i></div>'


def legend_html() -> str:
    """The 8 shading levels as a small legend."""
    return '<span class="legend">' + "".join(f'<span class="a{i}"></span>' for i in range(1, 9)) + "</span>"


def page(title: str, body: str, root: str, nav: str = "") -> str:
    """A whole HTML page; `root` is the relative path to the site root ("" or "../")."""
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<link rel=\"stylesheet\" href=\"{root}assets/style.css\"></head><body>\n{nav}<main>\n{body}\n</main></body></html>\n")


def top_tokens(feat: dict[str, Any], n: int = 6) -> list[str]:
    """Distinct tokens the feature's top examples are about, strongest first."""
    seen: list[str] = []
    for ex in feat["top"]:
        t = visible_token(ex["tokens"][ex["center"]])
        if t not in seen:
            seen.append(t)
        if len(seen) == n:
            break
    return seen


# ------------------------------------------------------------------------------------- site data

@dataclass
class SiteExtras:
    """What the features.json alone does not hold."""

    logits: tuple[list[list[tuple[str, float]]], list[list[tuple[str, float]]]] | None = None
    """(top, bottom) per feature: [(token, logit effect)]."""
    neighbors: tuple[np.ndarray, np.ndarray] | None = None
    """(ids [F, n], cosines [F, n])."""
    scores: dict[int, dict[str, Any]] = field(default_factory=dict)
    """{feature id: {"score": float, "explanation": str}}."""
    prompts: list[dict[str, Any]] | None = None
    """Prompt-view results (see `prompt_activations`)."""
    notes: list[str] = field(default_factory=list)
    """Why a section is missing (shown on the index page)."""


def source_line(doc: dict[str, Any]) -> str:
    """One line saying which dictionary and data the site shows."""
    src = doc["source"]
    if src["kind"] == "sae":
        what = (f"{src['architecture']} dictionary {src['sae']}" if src.get("sae") else
                f"{src['architecture']} dictionary {src['key_name']}={src['key']:g} of {Path(src['sweep']).name}")
    else:
        what = f"neurons ({src['make_positive_by']})"
    return (f"{what} · {src.get('model', '?')} · {src.get('hook', '?')} · {doc['n_tokens']:,} tokens · "
            f"{doc['n_features']:,} features")


def feature_page(feat: dict[str, Any], doc: dict[str, Any], axis: DensityAxis, extras: SiteExtras,
                 built: set[int], order: list[int], pos: int, title: str, summaries: dict[int, dict[str, Any]]) -> str:
    """The HTML of one feature's page."""
    i = feat["id"]
    prev_link = f'<a href="{order[pos - 1]}.html">‹ #{order[pos - 1]}</a>' if pos > 0 else ""
    next_link = f'<a href="{order[pos + 1]}.html">#{order[pos + 1]} ›</a>' if pos + 1 < len(order) else ""
    nav = (f'<nav class="top"><a href="../index.html">← all features</a><span class="note">{esc(title)}</span>'
           f'<span class="grow"></span>{prev_link}{next_link}</nav>\n')
    d, mx = feat["density"], feat["max"]
    cards = [f'<div class="card"><div class="k">density</div><div class="v" id="density" data-value="{d!r}">'
             f'{fmt(d)}</div><div class="n">{density_note(d)}</div></div>',
             f'<div class="card"><div class="k">max activation</div><div class="v" id="max" data-value="{mx!r}">'
             f'{fmt(mx)}</div><div class="n">over {doc["n_tokens"]:,} tokens</div></div>',
             f'<div class="card"><div class="k">firing tokens</div><div class="v" id="count">{feat["count"]:,}</div>'
             f'<div class="n">{"min subtracted: " + fmt(feat["shift"]) if "shift" in feat else "activation &gt; 0"}</div></div>']
    sc = extras.scores.get(i)
    named = [(k, label) for k, label in INTERP_CARDS if sc and sc.get(k) is not None]
    if named:
        cards += [f'<div class="card"><div class="k">{label}</div><div class="v" id="{k}">{fmt(float(sc[k]))}</div>'
                  f'<div class="n">{note}</div></div>' for k, label in named
                  for note in [INTERP_NOTES[k]]]
    elif sc and sc.get("score") is not None:
        cards.append(f'<div class="card"><div class="k">interpretation score</div><div class="v" id="score">'
                     f'{fmt(sc["score"])}</div></div>')
    body = [f'<h1>Feature {i}</h1><p class="sub">{esc(source_line(doc))}</p>']
    if sc and sc.get("explanation"):
        body.append(f'<p><b>Explanation:</b> {esc(str(sc["explanation"]))}</p>')
    body.append('<div class="cards">' + "".join(cards) + "</div>")
    hist = feat["histogram"]
    body.append('<div class="grid2"><figure>' + axis.svg(d) +
                "<figcaption>log<sub>10</sub> density of every live feature; this feature marked</figcaption></figure>"
                "<figure>" + activation_svg(hist) + f"<figcaption>activations on a uniform sample of {hist['sample']:,} "
                "firing tokens</figcaption></figure></div>")
    if extras.logits is not None:
        top, bottom = extras.logits[0][i], extras.logits[1][i]

        def table(rows: list[tuple[str, float]], head: str, cls: str) -> str:
            cells = "".join(f'<tr><td class="tok">{esc(visible_token(t))}</td><td class="num {cls}">{v:+.3f}</td></tr>'
                            for t, v in rows)
            return f'<table class="logits"><thead><tr><th>{head}</th><th class="num">logit</th></tr></thead><tbody>{cells}</tbody></table>'
        body.append("<h2>Logit effects</h2><p class=\"note\">Decoder direction through the unembedding "
                    "(direct path, final layer norm ignored).</p><div class=\"grid2\">" +
                    table(top, "promoted tokens", "pos") + table(bottom, "suppressed tokens", "negv") + "</div>")
    body.append(f'<h2>Top activations {legend_html()}</h2><p class="note">Tokens shaded by this feature\'s activation '
                '(hover for the value; unshaded: 0); the token each example is about is outlined.</p>')
    if feat["top"]:
        body.append("".join(example_html(ex, mx) for ex in feat["top"]))
    else:
        body.append('<p class="note">This feature never fired on the tokens read.</p>')
    if feat["quantiles"]:
        body.append("<h2>Activation quantiles</h2><p class=\"note\">Random firing tokens from evenly spaced "
                    "quantile bands of the feature's non-zero activations, lowest band first.</p>")
        for g in feat["quantiles"]:
            lo, hi = g["quantile"]
            body.append(f'<div class="band"><h3>quantile {lo:.0%}–{hi:.0%} · activation {fmt(g["range"][0])}–'
                        f'{fmt(g["range"][1])}</h3>' + "".join(example_html(ex, mx) for ex in g["examples"]) + "</div>")
    if extras.neighbors is not None:
        ids, cos = extras.neighbors
        links = []
        for j, c in zip(ids[i].tolist(), cos[i].tolist()):
            label = f'#{j} <span class="cos">cos {c:.3f}</span> ' + "".join(
                f'<span class="chip">{esc(t)}</span>' for t in summaries[j]["tokens"][:3])
            links.append(f'<a href="{j}.html">{label}</a>' if j in built else f"<span>{label}</span>")
        body.append('<h2>Nearest features (decoder cosine)</h2><div class="neighbors">' + "".join(links) + "</div>")
    return page(f"Feature {i} · {title}", "\n".join(body), "../", nav)


def index_page(doc: Any, axis: DensityAxis, extras: SiteExtras, title: str, n_listed: int, n_dead: int) -> str:
    """The HTML of index.html (rows come from index_data.js)."""
    has_score = any(s.get("score") is not None for s in extras.scores.values())
    cards = (f'<div class="cards"><div class="card"><div class="k">features</div><div class="v">{doc["n_features"]:,}</div>'
             f'<div class="n">{n_listed:,} listed</div></div>'
             f'<div class="card"><div class="k">tokens read</div><div class="v">{doc["n_tokens"]:,}</div></div>'
             f'<div class="card"><div class="k">never fired</div><div class="v">{n_dead:,}</div></div></div>')
    nav = '<nav class="top"><b>Feature dashboards</b><span class="grow"></span>'
    nav += '<a href="prompts.html">prompts</a>' if extras.prompts else ""
    nav += "</nav>\n"
    score_th = '<th class="sort num" data-key="3">score<span class="arrow"></span></th>' if has_score else ""
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in extras.notes)
    body = (f'<h1>{esc(title)}</h1><p class="sub">{esc(source_line(doc))}</p>{cards}{notes}'
            '<figure style="max-width:560px">' + axis.svg() +
            "<figcaption>log<sub>10</sub> density of every live feature</figcaption></figure>"
            '<div class="controls"><input id="search" type="search" placeholder="feature id (e.g. 123) or token text" '
            'autocomplete="off"><button id="prev">‹ prev</button><button id="next">next ›</button>'
            '<span id="count" class="note"></span></div>'
            '<noscript><p>The index needs JavaScript; every feature page works without it: features/0.html, ...</p></noscript>'
            '<table id="features"><thead><tr><th class="sort" data-key="0">feature<span class="arrow"></span></th>'
            '<th class="sort num" data-key="1">density<span class="arrow"></span></th>'
            f'<th class="sort num" data-key="2">max act.<span class="arrow"></span></th>{score_th}'
            "<th>top tokens</th></tr></thead><tbody></tbody></table>"
            '<script src="index_data.js"></script><script src="assets/index.js"></script>')
    return page(title, body, "", nav)


def index_data(summaries: list[dict[str, Any]], extras: SiteExtras) -> str:
    """index_data.js: window.FEATURE_INDEX = {has_score, rows: [[id, density, max, score, tokens, explanation]]}."""
    rows = []
    for f in summaries:
        sc = extras.scores.get(f["id"], {})
        rows.append([f["id"], f["density"], f["max"], sc.get("score"), "\u001f".join(f["tokens"]),
                     str(sc.get("explanation") or "")])
    has_score = any(r[3] is not None for r in rows)
    return "window.FEATURE_INDEX = " + json.dumps({"has_score": has_score, "rows": rows}, separators=(",", ":")) + ";\n"


def prompts_page(extras: SiteExtras, summaries: dict[int, dict[str, Any]], built: set[int], title: str) -> str:
    """prompts.html: per prompt the shaded tokens and, per token, the features firing most."""
    nav = '<nav class="top"><a href="index.html">← all features</a><span class="grow"></span></nav>\n'
    body = [f"<h1>Prompts</h1><p class=\"sub\">{esc(title)} · token shading: the strongest feature on the token, "
            "relative to that feature's max over the data</p>"]
    for n, pr in enumerate(extras.prompts or []):
        spans, rows = [], []
        for j, (tok, fires) in enumerate(zip(pr["tokens"], pr["features"])):
            text = esc(visible_token(tok)) or "\u2205"
            if fires:
                fid, a = fires[0]
                level = block_level(a, summaries[fid]["max"] if fid in summaries else a)
                tip = "; ".join(f"#{f} {fmt(v)}" for f, v in fires)
                spans.append(f'<a href="#p{n}t{j}"><span class="a{level}" title="{esc(tip)}">{text}</span></a>')
            elif pr.get("special", [False] * (j + 1))[j]:
                spans.append(f'<span class="u" title="special token: left out">{text}</span>')
            else:
                spans.append(f'<span title="no feature fires">{text}</span>')
            chips = " ".join(
                (f'<a class="chip" href="features/{f}.html">#{f} {fmt(v)}</a>' if f in built
                 else f'<span class="chip">#{f} {fmt(v)}</span>') for f, v in fires)
            if not fires and pr.get("special", [False] * (j + 1))[j]:
                chips = '<span class="note">special token: left out, as in the data</span>'
            rows.append(f'<tr id="p{n}t{j}"><td class="num">{j}</td><td class="tok">{text}</td><td>{chips}</td></tr>')
        body.append(f'<div class="prompt"><h3>prompt {n + 1}</h3><div class="toks">{"".join(spans)}</div>'
                    '<table class="fires"><thead><tr><th class="num">pos</th><th>token</th><th>features (activation)</th>'
                    f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')
    return page(f"Prompts · {title}", "\n".join(body), "", nav)


# ------------------------------------------------------------------------------------- building

INTERP_CARDS = (("clearness", "clearness (1-5)"), ("detection", "detection accuracy"), ("fuzzing", "fuzzing accuracy"))
"""Scores of an interp.jsonl shown as cards on a feature page."""
INTERP_NOTES = {"clearness": "the explainer's own rating", "detection": "balanced, held-out vs random windows",
                "fuzzing": "balanced, real vs moved highlights"}


def interp_scores(path: Path) -> dict[int, dict[str, Any]]:
    """Scores of an interp.jsonl (training.autointerp.files): score = detection accuracy, else clearness."""
    from training.autointerp.files import read_results
    out: dict[int, dict[str, Any]] = {}
    for fid, rec in read_results(path).items():
        if "skipped" in rec:
            continue
        score = rec.get("detection") if rec.get("detection") is not None else rec.get("clearness")
        out[fid] = {"score": None if score is None else float(score), "explanation": rec.get("explanation"),
                    **{k: rec.get(k) for k, _ in INTERP_CARDS if rec.get(k) is not None}}
    return out


def parse_scores(path: str | Path) -> dict[int, dict[str, Any]]:
    """Interpretation scores from an interp.jsonl or a JSON file (formats: see DashboardConfig.scores)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--scores {p} does not exist")
    if p.suffix == ".jsonl":
        return interp_scores(p)
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--scores {p} is not valid JSON ({e.msg} at line {e.lineno})") from None
    items = raw.items() if isinstance(raw, dict) else ((r.get("feature"), r) for r in raw if isinstance(r, dict))
    out: dict[int, dict[str, Any]] = {}
    for key, val in items:
        try:
            fid = int(key)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise UserError(f"--scores {p}: {key!r} is not a feature id") from None
        entry = dict(val) if isinstance(val, dict) else {"score": val}
        if entry.get("score") is not None:
            entry["score"] = float(entry["score"])
        out[fid] = entry
    return out


def summarize(feat: dict[str, Any]) -> dict[str, Any]:
    """What the index, the neighbour links and the prompt view need of a feature."""
    return {"id": feat["id"], "density": feat["density"], "max": feat["max"], "count": feat["count"],
            "tokens": top_tokens(feat)}


def build_site(out: str | Path, doc: Any, extras: SiteExtras | None = None,
               feature_ids: Sequence[int] | None = None, title: str | None = None) -> Path:
    """Write the site of features.json contents `doc` (a dict, or a FeatureFile that streams the features
    from disk: then one feature at a time is in memory) into folder `out`; built in a temporary folder
    next to it, then swapped in. Returns the path of index.html."""
    out = Path(out)
    extras = extras or SiteExtras()
    summaries: dict[int, dict[str, Any]] = {}
    for f in tqdm(doc["features"], desc="reading", unit="feature", dynamic_ncols=True, leave=False):
        summaries[f["id"]] = summarize(f)
        if f.get("score") is not None or f.get("explanation"):           # scores carried in features.json
            extras.scores.setdefault(f["id"], {"score": f.get("score"), "explanation": f.get("explanation")})
    if feature_ids is not None:
        bad = [i for i in feature_ids if i not in summaries]
        if bad:
            raise UserError(f"feature id {bad[0]} is out of range: this dictionary has features 0..{len(summaries) - 1}")
        order = list(dict.fromkeys(feature_ids))
    else:
        order = list(summaries)
    position = {i: p for p, i in enumerate(order)}
    built = set(order)
    title = title or default_title(doc)
    axis = DensityAxis.of([s["density"] for s in summaries.values()])
    n_dead = sum(1 for s in summaries.values() if s["count"] == 0)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "features").mkdir(parents=True)
    (tmp / "assets").mkdir()
    for name in SITE_ASSETS:
        shutil.copyfile(ASSETS / name, tmp / "assets" / name)
    bar = tqdm(total=len(order), desc="pages", unit="page", dynamic_ncols=True)
    for f in doc["features"]:
        if f["id"] in position:
            (tmp / "features" / f"{f['id']}.html").write_text(
                feature_page(f, doc, axis, extras, built, order, position[f["id"]], title, summaries),
                encoding="utf-8")
            bar.update()
    bar.close()
    (tmp / "index_data.js").write_text(index_data([summaries[i] for i in order], extras), encoding="utf-8")
    if extras.prompts:
        (tmp / "prompts.html").write_text(prompts_page(extras, summaries, built, title), encoding="utf-8")
    (tmp / "index.html").write_text(index_page(doc, axis, extras, title, len(order), n_dead), encoding="utf-8")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out / "index.html"


def default_title(doc: dict[str, Any]) -> str:
    """"sweep name · l1=0.001" or "neurons · hook"."""
    src = doc["source"]
    if src["kind"] == "sae" and src.get("sae"):
        return f"{Path(src['sae']).name} · {src.get('hook', '')}"
    if src["kind"] == "sae":
        return f"{Path(src['sweep']).name} · {src['key_name']}={src['key']:g}"
    return f"neurons · {src.get('hook', '')} · {src['make_positive_by']}"


# ------------------------------------------------------------------------------------- model, prompts, CLI entry

def vocab_strings(tokenizer: Any, ids: Sequence[int]) -> dict[int, str]:
    """{token id: tokenizer.decode([id])} for the given ids."""
    return {int(i): tokenizer.decode([int(i)]) for i in set(int(i) for i in ids)}


@torch.no_grad()
def prompt_activations(model: Any, hook: str, scorer: Any, prompts: Sequence[str], top: int,
                       shift: Tensor | None = None, device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """Per prompt: {"prompt", "tokens": [str], "features": per token [(feature id, activation)], strongest first,
    at most `top`, activation > 0, "special": per token whether it is a special token (left out, as Stage 1
    leaves them out of the data the features were gathered on)}."""
    from training.hooks import flatten_heads
    from training.sae_hooks import capture
    from training.text import special_token_ids
    tok = model.tokenizer
    special = special_token_ids(tok)
    out = []
    for text in prompts:
        ids = tok(text)["input_ids"][: model.cfg.n_ctx]
        if not ids:
            raise UserError(f"--prompt {text!r} has no tokens")
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        _, cached = capture(model, tokens, [hook])
        x = flatten_heads(cached[hook])[0].float()                               # [T, d]
        acts = scorer.codes_t(x)                                                  # [F, T]
        if shift is not None:
            acts = acts - shift.to(acts.device)[:, None]
        k = min(top, acts.shape[0])
        v, i = acts.T.topk(k, dim=1)                                              # [T, k]
        fires = [[] if t in special else [(int(f), round(float(a), 4)) for f, a in zip(fi, va) if a > 0]
                 for t, fi, va in zip(ids, i.tolist(), v.tolist())]
        out.append({"prompt": text, "tokens": [tok.decode([t]) for t in ids], "features": fires,
                    "special": [t in special for t in ids]})
    return out


def locate_features(cfg: DashboardConfig) -> Path:
    """The features.json the config names (--features, or --sweep with the member)."""
    if cfg.features:
        p = Path(cfg.features)
        return p / FEATURES_JSON if p.is_dir() else p
    if cfg.sae:
        from training.pretrained import pretrained_label
        path = Path("outputs") / "features" / pretrained_label(cfg.sae) / FEATURES_JSON
        if not path.exists():
            raise UserError(f"no {path}: gather the features of {cfg.sae} with gather_high_activations.py --sae "
                            "first, or pass --features")
        return path
    if cfg.sweep:
        key, _, meta = select_member(cfg.sweep, cfg.l1, cfg.k, cfg.key)
        label = key_label(key_name(meta["architecture"]), key)
        path = Path(cfg.sweep) / "features" / label / FEATURES_JSON
        if not path.exists() and not has_tokens(meta.get("source_manifest") or {}):
            raise UserError(f"no {path}: the sweep was trained on imported activations without token ids, so "
                            "gather its features with gather_high_activations.py --model and --dataset (running the "
                            "model they came from on text) first")
        return path
    raise UserError("give --features (a features.json from gather_high_activations.py), --sweep with --l1/--k, or "
                    "--sae")


@dataclass
class DashboardResult:
    """What a run built."""

    index: Path
    pages: int
    bytes: int
    seconds: float
    notes: list[str]

    def __str__(self) -> str:
        lines = [f"built {self.pages:,} feature pages ({self.bytes / 1e6:.1f} MB) in {self.seconds:.1f} s; "
                 f"open file://{self.index.resolve()}"]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def make_dashboards(cfg: DashboardConfig) -> DashboardResult:
    """Build the dashboard site of one features.json (with logit effects, neighbours, scores and prompts)."""
    t0 = time.perf_counter()
    for name in ("n_logits", "n_neighbors", "prompt_top"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative (got {getattr(cfg, name)})")
    path = locate_features(cfg)
    doc = FeatureFile(path)
    src = doc["source"]
    extras = SiteExtras()
    if cfg.scores:
        extras.scores = parse_scores(cfg.scores)

    from training.models import resolve_device
    device = resolve_device(cfg.device)
    decoder = scorer = shift = None
    manifest = None
    if src["kind"] == "sae":
        if cfg.sae or src.get("sae"):
            from training.pretrained import load_dictionary, pretrained_meta
            sweep = cfg.sae or src["sae"]
            pretrained = load_dictionary(sweep, device)
            module, sweep_meta = pretrained.module, pretrained_meta(pretrained, src.get("hook"), src.get("model"))
        else:
            sweep = cfg.sweep or src["sweep"]
            _, module, sweep_meta = select_member(sweep, key=str(src["key"]))
            check_made_from(path, src.get("sweep_sha256"), sweep, sweep_meta, "gather_high_activations.py")
        manifest = sweep_meta.get("source_manifest")
        decoder = module.decoder.detach().float()
        if decoder.shape[0] != doc["n_features"]:
            raise UserError(f"the dictionary in {sweep} has {decoder.shape[0]} features but {path} has "
                            f"{doc['n_features']}: pass the sweep it was gathered from")
        if cfg.n_neighbors and len(decoder) > 1:
            ids, cos = nearest_features(decoder, cfg.n_neighbors)
            extras.neighbors = (ids.numpy(), cos.numpy())
        if cfg.prompt:
            scorer = SaeScorer(module, device)
    else:
        decoder = torch.eye(doc["n_features"])
        if cfg.prompt:
            scorer = NeuronScorer(doc["n_features"], src["make_positive_by"])
            if src["make_positive_by"] == "affine":
                shift = torch.tensor([f.get("shift", 0.0) for f in doc["features"]])

    model = None
    if cfg.logits or cfg.prompt:
        from training.models import analysis_dtype, load_model
        name = cfg.model or src.get("model")
        if not name:
            raise UserError(f"{path} names no model: pass --model (or --no-logits without --prompt)")
        try:
            model = load_model(name, device, analysis_dtype(cfg.dtype, manifest, src.get("dtype")))
        except UserError as e:
            raise UserError(f"{e} (pass --model, or --no-logits to build without logit effects)") from None
    if cfg.logits and model is not None:
        dirs = residual_directions(model, src["hook"], decoder.to(device))
        if dirs is None:
            extras.notes.append(f"no logit effects: the output weights of hook {src['hook']} are not known here")
        else:
            with torch.no_grad():
                ti, tv, bi, bv = logit_effects(dirs, model.W_U.detach(), cfg.n_logits)
            strings = vocab_strings(model.tokenizer, torch.cat([ti.flatten(), bi.flatten()]).tolist())
            extras.logits = ([[(strings[int(t)], float(v)) for t, v in zip(r_i, r_v)] for r_i, r_v in zip(ti.tolist(), tv.tolist())],
                             [[(strings[int(t)], float(v)) for t, v in zip(r_i, r_v)] for r_i, r_v in zip(bi.tolist(), bv.tolist())])
    elif not cfg.logits:
        extras.notes.append("logit effects not computed (--no-logits)")
    if cfg.prompt:
        if scorer is None or model is None:
            raise UserError("--prompt needs the dictionary and the model")
        extras.prompts = prompt_activations(model, src["hook"], scorer, cfg.prompt, cfg.prompt_top, shift, device)

    out = Path(cfg.output) if cfg.output else path.parent / "dashboards"
    with output_lock(out):  # one writer per dashboards folder
        index = build_site(out, doc, extras, cfg.feature_ids, cfg.title)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    pages = len(list((out / "features").glob("*.html")))
    return DashboardResult(index, pages, size, time.perf_counter() - t0, extras.notes)
