"""Feature circuits: how much each dictionary feature at one hook drives each feature at the next and the logits.

Sites are dictionaries at hooks, in forward order s_0, s_1, ... On one prompt, with codes f^k = encode(x^k) at site
k and a measure m(.) of a quantity at the last position (or summed over positions with `sum_positions`):

    ablation effect   E(i -> j)  = m(f^{k+1}_j)_clean - m(f^{k+1}_j)_{f^k_i = 0}
    logit effect      E(i -> t)  = m(log p(t))_clean - m(log p(t))_{f^k_i = 0}      (t: a logit token, last site)
    error effect      E(err_k -> j) = m_clean - m_{x^k replaced by decode(f^k)}
The ablation is error-preserving, x^k -> x^k + decode(f^k with f^k_i = 0 at every position) - decode(f^k), so the
SAE's error term stays in the model (an ablation that changes nothing is exactly the clean run). Positive: the
source raises the target.

    attribution       A(i -> j)  = sum_p f^k_{p,i} * d m(f^{k+1}_j) / d f^k_{p,i}     (activation x gradient)
    error attribution A(err_k -> j) = sum_{p,d} e^k_{p,d} * d m / d e^k_{p,d},  e^k = x^k - decode(f^k)
computed with attribution splicing (codes and errors as gradient leaves, Marks et al. 2024): one backward pass per
target; A is the first-order estimate of E. Sources are the features firing at some position of the prompt
("live"), targets the features whose measure is non-zero; logit tokens the most likely next tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from training.cli import UserError
from training.models import DTYPE_CHOICES
from training.sae_hooks import ablate_each, splice

METHODS = ("attribution", "ablation")


# ------------------------------------------------------------------------------------- data

@dataclass
class Site:
    """A dictionary at a hook, and where its feature pages live."""

    hook: str
    sae: Any
    name: str
    """Node prefix: the hook's block index ("0"), with the hook kind when one block has several sites."""
    label: str
    """Where the dictionary came from, for people."""
    features_json: Path | None = None
    dashboards: Path | None = None


@dataclass
class Edge:
    """One source -> target effect (node ids "site.feature", "site.err", "logit.TOKEN_ID")."""

    source: str
    target: str
    attribution: float | None = None
    ablation: float | None = None

    @property
    def weight(self) -> float:
        """The ablation effect when measured, else the attribution estimate."""
        return self.ablation if self.ablation is not None else float(self.attribution or 0.0)


@dataclass
class Circuit:
    """Every measured edge, the graph's nodes (endpoints of edges above the threshold) and run information."""

    edges: list[Edge]
    kept: list[Edge]
    nodes: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    codes: dict[str, Tensor] = field(default_factory=dict, repr=False)
    """Clean codes [seq, d_hidden] by site name (for the labels' prompt contexts)."""

    def share_drawn(self) -> float:
        """sum |weight| over kept edges / sum |weight| over every measured edge (1 when nothing was measured)."""
        total = sum(abs(e.weight) for e in self.edges)
        return sum(abs(e.weight) for e in self.kept) / total if total > 0 else 1.0


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson correlation of the ranks (ties get their mean rank); NaN for fewer
    than 2 pairs or a constant input."""
    x, y = torch.tensor(list(a), dtype=torch.float64), torch.tensor(list(b), dtype=torch.float64)
    if len(x) < 2:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else math.nan


def _ranks(v: Tensor) -> Tensor:
    """1-based ranks of v [n], ties given the mean of their ranks."""
    order = v.argsort(stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(1, len(v) + 1, dtype=v.dtype)
    for value in v.unique():
        tie = v == value
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


# ------------------------------------------------------------------------------------- measuring

def measure(values: Tensor, sum_positions: bool) -> Tensor:
    """values [batch, seq, n] -> [batch, n]: the last position, or the sum over positions."""
    return values.sum(1) if sum_positions else values[:, -1]


def _logprobs(logits: Tensor) -> Tensor:
    """log-softmax in float32: [batch, seq, vocab]."""
    return torch.log_softmax(logits.float(), dim=-1)


@dataclass
class CleanRun:
    """Codes, measures and log-probabilities of the unmodified model."""

    codes: dict[str, Tensor]      # site name -> [seq, d_hidden]
    measures: dict[str, Tensor]   # site name -> [d_hidden]
    logp: Tensor                  # [vocab] measure of the log-probabilities
    tokens: list[int]             # logit tokens: the most likely next tokens


@torch.no_grad()
def clean_run(model: Any, sites: Sequence[Site], tokens: Tensor, sum_positions: bool, n_logits: int) -> CleanRun:
    """The unmodified run with every site's codes read at its hook (tokens [1, seq])."""
    with splice(model, {s.hook: s.sae for s in sites}, "read") as rec:
        logits = model(tokens, return_type="logits")
    logp = _logprobs(logits)
    top = logp[0, -1].topk(min(n_logits, logp.shape[-1])).indices.tolist()
    codes = {s.name: rec.codes[s.hook][0].float() for s in sites}
    return CleanRun(codes, {s.name: measure(rec.codes[s.hook].float(), sum_positions)[0] for s in sites},
                    measure(logp, sum_positions)[0], top)


def live_sources(clean: CleanRun, site: Site) -> list[int]:
    """Features of `site` that fire (> 0) at some position of the prompt."""
    return torch.nonzero((clean.codes[site.name] > 0).any(0)).flatten().tolist()


def live_targets(clean: CleanRun, site: Site) -> list[int]:
    """Features of `site` whose measure is non-zero."""
    return torch.nonzero(clean.measures[site.name] != 0).flatten().tolist()


def attribution_scores(model: Any, sites: Sequence[Site], tokens: Tensor, clean: CleanRun, sum_positions: bool,
                       first: int = 0) -> dict[tuple[str, str], float]:
    """{(source id, target id): A} for sites first.. (see the module docstring): features and errors of site k to
    the live features of site k+1, and of the last site to the logit tokens."""
    out: dict[tuple[str, str], float] = {}
    with torch.enable_grad(), splice(model, {s.hook: s.sae for s in sites}, attribution=True) as rec:
        logits = model(tokens, return_type="logits")
        logp = measure(_logprobs(logits), sum_positions)[0]                      # [vocab]
        for k in range(first, len(sites)):
            src = sites[k]
            leaf, err = rec.leaves[src.hook], rec.errors[src.hook]              # [1, seq, h], [1, seq, d]
            sources = live_sources(clean, src)
            if k + 1 < len(sites):
                nxt = sites[k + 1]
                m = measure(rec.codes[nxt.hook], sum_positions)[0]             # [h']
                targets = [(f"{nxt.name}.{j}", m[j]) for j in live_targets(clean, nxt)]
            else:
                targets = [(f"logit.{t}", logp[t]) for t in clean.tokens]
            for target, value in targets:
                if not value.requires_grad:       # the target does not depend on this site (e.g. parallel blocks)
                    g_leaf = g_err = None
                else:
                    g_leaf, g_err = torch.autograd.grad(value, [leaf, err], retain_graph=True, allow_unused=True)
                scores = (leaf.detach() * g_leaf).sum((0, 1)) if g_leaf is not None else torch.zeros(leaf.shape[-1])
                for i in sources:
                    out[(f"{src.name}.{i}", target)] = float(scores[i])
                out[(f"{src.name}.err", target)] = float((err.detach() * g_err).sum()) if g_err is not None else 0.0
    return out


def _targets_of(model_out: Tensor, rec: Any, sites: Sequence[Site], k: int, clean: CleanRun,
                sum_positions: bool) -> tuple[list[str], Tensor, Tensor]:
    """(target ids, clean measures [n], measures [batch, n]) downstream of site k in a batch of runs."""
    if k + 1 < len(sites):
        nxt = sites[k + 1]
        ids = live_targets(clean, nxt)
        m = measure(rec.codes[nxt.hook].float(), sum_positions)[:, ids]
        return [f"{nxt.name}.{j}" for j in ids], clean.measures[nxt.name][ids], m
    m = measure(_logprobs(model_out), sum_positions)[:, clean.tokens]
    return [f"logit.{t}" for t in clean.tokens], clean.logp[clean.tokens], m


@torch.no_grad()
def ablation_effects(model: Any, sites: Sequence[Site], tokens: Tensor, clean: CleanRun, k: int,
                     features: Sequence[int], sum_positions: bool, batch_size: int = 32
                     ) -> dict[tuple[str, str], float]:
    """{(source id, target id): E} for each of `features` of site k, ablated one per sequence of a batch of copies
    of the prompt (error-preserving; the downstream site is only read)."""
    out: dict[tuple[str, str], float] = {}
    src = sites[k]
    saes = {src.hook: src.sae, **({sites[k + 1].hook: sites[k + 1].sae} if k + 1 < len(sites) else {})}
    for start in range(0, len(features), batch_size):
        chunk = list(features[start:start + batch_size])
        batch = tokens.expand(len(chunk), -1)
        with splice(model, saes, "read", edits={src.hook: ablate_each(chunk)}) as rec:
            logits = model(batch, return_type="logits")
        names, base, m = _targets_of(logits, rec, sites, k, clean, sum_positions)
        effect = base[None] - m                                                 # [chunk, n]
        for r, i in enumerate(chunk):
            for c, t in enumerate(names):
                out[(f"{src.name}.{i}", t)] = float(effect[r, c])
    return out


@torch.no_grad()
def error_effects(model: Any, sites: Sequence[Site], tokens: Tensor, clean: CleanRun, k: int,
                  sum_positions: bool) -> dict[tuple[str, str], float]:
    """{(site k's error id, target id): E}: site k's activation replaced by its reconstruction."""
    src = sites[k]
    saes = {src.hook: src.sae, **({sites[k + 1].hook: sites[k + 1].sae} if k + 1 < len(sites) else {})}
    modes = {h: "read" for h in saes} | {src.hook: "sae"}
    with splice(model, saes, modes) as rec:
        logits = model(tokens, return_type="logits")
    names, base, m = _targets_of(logits, rec, sites, k, clean, sum_positions)
    return {(f"{src.name}.err", t): float(base[c] - m[0, c]) for c, t in enumerate(names)}


# ------------------------------------------------------------------------------------- the circuit

def find_circuit(model: Any, sites: Sequence[Site], tokens: Tensor, *, threshold: float = 1e-3,
                 method: str = "attribution", confirm: int = 50, sum_positions: bool = False,
                 features_from: int = 0, n_logits: int = 5, batch_size: int = 32, max_edges: int | None = None
                 ) -> Circuit:
    """Attribution scores for every edge from the sites at block >= features_from, ablation effects for the
    sources of the `confirm` strongest (method "attribution") or of every edge ("ablation") and for the error
    nodes; the edges whose effect (ablation, else attribution) reaches `threshold` in size are kept, at most
    `max_edges` of them (the strongest)."""
    from training.hooks import hook_layer
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}: choose {' or '.join(METHODS)}")
    if threshold < 0:
        raise UserError(f"--threshold must be >= 0 (got {threshold})")
    first = next((k for k, s in enumerate(sites) if (hook_layer(s.hook) or 0) >= features_from), None)
    if first is None:
        raise UserError(f"no dictionary at block {features_from} or later: lower --features_from")
    clean = clean_run(model, sites, tokens, sum_positions, n_logits)
    attr = attribution_scores(model, sites, tokens, clean, sum_positions, first)
    abl: dict[tuple[str, str], float] = {}
    for k in range(first, len(sites)):
        live = live_sources(clean, sites[k])
        if method == "attribution":
            ranked = sorted(((abs(v), p) for p, v in attr.items() if p[0].split(".")[0] == sites[k].name
                             and not p[0].endswith(".err")), reverse=True)
            strongest = {int(p[0].rsplit(".", 1)[1]) for _, p in ranked[:confirm]}
            live = [i for i in live if i in strongest]
        abl.update(ablation_effects(model, sites, tokens, clean, k, live, sum_positions, batch_size))
        abl.update(error_effects(model, sites, tokens, clean, k, sum_positions))
    edges = [Edge(s, t, attr.get((s, t)), abl.get((s, t))) for s, t in dict.fromkeys([*attr, *abl])]
    kept = [e for e in edges if abs(e.weight) >= threshold and e.weight != 0]
    if max_edges is not None and len(kept) > max_edges:
        kept = sorted(kept, key=lambda e: -abs(e.weight))[:max_edges]
    both = [(e.attribution, e.ablation) for e in edges if e.attribution is not None and e.ablation is not None
            and not e.source.endswith(".err") and (e.attribution != 0 or e.ablation != 0)]
    info = {"method": method, "threshold": threshold, "max_edges": max_edges, "sum_positions": sum_positions,
            "features_from": features_from, "confirm": confirm, "n_edges_measured": len(edges),
            "n_ablated_pairs": sum(e.ablation is not None for e in edges),
            "agreement": {"spearman": rank_correlation(*zip(*both)) if len(both) > 1 else math.nan,
                          "n_pairs": len(both),
                          "definition": "Spearman rank correlation of attribution and ablation effect over the "
                                        "feature edges measured both ways (pairs where both are 0 left out)"}}
    circuit = Circuit(edges, kept, {}, info, clean.codes)
    circuit.nodes = circuit_nodes(model, sites, clean, kept)
    info["share_drawn"] = circuit.share_drawn()
    return circuit


def circuit_nodes(model: Any, sites: Sequence[Site], clean: CleanRun, kept: Sequence[Edge]
                  ) -> dict[str, dict[str, Any]]:
    """{node id: node record} for the endpoints of the kept edges (labels filled in by `describe_nodes`)."""
    by_name = {s.name: s for s in sites}
    nodes: dict[str, dict[str, Any]] = {}
    for nid in dict.fromkeys(n for e in kept for n in (e.source, e.target)):
        prefix, rest = nid.rsplit(".", 1)
        if prefix == "logit":
            t = int(rest)
            nodes[nid] = {"kind": "logit", "token_id": t, "token": model.tokenizer.decode([t]),
                          "value": float(clean.logp[t])}
        elif rest == "err":
            nodes[nid] = {"kind": "error", "site": prefix, "hook": by_name[prefix].hook}
        else:
            i = int(rest)
            acts = clean.codes[prefix][:, i]
            nodes[nid] = {"kind": "feature", "site": prefix, "hook": by_name[prefix].hook, "feature": i,
                          "value": float(clean.measures[prefix][i]), "max_on_prompt": float(acts.max())}
    return nodes


# ------------------------------------------------------------------------------------- contexts on the fly

def stage1_token_rows(metas: Sequence[dict[str, Any]], n_rows: int) -> Tensor | None:
    """Up to n_rows token sequences [rows, seq] from the Stage 1 folder of the first sweep that has one (its
    contexts/*.safetensors), None when none does."""
    from training.chunks import CONTEXTS, mmap_tensors
    for meta in metas:
        folder = Path(meta.get("dataset_dir") or "").parent / CONTEXTS
        files = sorted(folder.glob("*.safetensors"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
        rows: list[Tensor] = []
        for f in files:
            rows.append(mmap_tensors(f)[0]["tokens"].long())
            if sum(len(r) for r in rows) >= n_rows:
                break
        if rows:
            return torch.cat(rows)[:n_rows]
    return None


@torch.no_grad()
def gather_contexts(model: Any, sites: Sequence[Site], nodes: dict[str, dict[str, Any]], rows: Tensor,
                    n_contexts: int, before: int = 8, after: int = 3, batch_size: int = 16
                    ) -> dict[str, list[dict[str, Any]]]:
    """{feature node id: its n_contexts strongest windows in token rows [R, S]} (special-token positions left
    out, as Stage 1 leaves them out); examples as in features.json plus "source": "stage1"."""
    from training.text import special_token_ids
    wanted: dict[str, list[int]] = {}
    for v in nodes.values():
        if v["kind"] == "feature":
            wanted.setdefault(v["site"], []).append(v["feature"])
    if not wanted or len(rows) == 0:
        return {}
    by_name = {s.name: s for s in sites if s.name in wanted}
    special = torch.tensor(sorted(special_token_ids(model.tokenizer)), dtype=torch.long)
    device = next(model.parameters()).device
    acts: dict[str, list[Tensor]] = {n: [] for n in by_name}
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        with splice(model, {s.hook: s.sae for s in by_name.values()}, "read") as rec:
            model(batch.to(device), return_type=None)
        skip = torch.isin(batch, special).to(device)
        for n, s in by_name.items():
            a = rec.codes[s.hook][..., wanted[n]].float()                    # [b, S, k]
            acts[n].append(a.masked_fill(skip[..., None], 0).cpu())
    out: dict[str, list[dict[str, Any]]] = {}
    for n, chunks in acts.items():
        a = torch.cat(chunks)                                                 # [R, S, k]
        S = a.shape[1]
        for col, feat in enumerate(wanted[n]):
            flat = a[..., col].flatten()
            top = flat.topk(min(n_contexts, len(flat)))
            examples = []
            for value, idx in zip(top.values.tolist(), top.indices.tolist()):
                if value <= 0:
                    break
                r, p = divmod(idx, S)
                lo, hi = max(0, p - before), min(S, p + after + 1)
                examples.append({"tokens": [model.tokenizer.decode([int(t)]) for t in rows[r, lo:hi]],
                                 "acts": [round(float(x), 4) for x in a[r, lo:hi, col]], "center": p - lo,
                                 "activation": round(value, 4), "source": "stage1"})
            if examples:
                out[f"{n}.{feat}"] = examples
    return out


# ------------------------------------------------------------------------------------- CLI

@dataclass
class CircuitConfig:
    """Find and draw a feature circuit (find_circuit.py)."""

    sweeps: list[str] = field(default_factory=list)
    """Sweep folders, one per hook, as DIR or DIR:KEY (KEY: the member's L1 penalty or k; may be left out for a
    one-member sweep)."""
    sae: list[str] = field(default_factory=list)
    """Pretrained dictionaries, one per hook (SAELens, sparsify or dictionary_learning folders, or hf:OWNER/REPO/PATH;
    hook and model from their own metadata)."""
    prompt: str = ""
    """Text the circuit is found on."""
    threshold: float = 1e-3
    """Keep edges whose effect (ablation, else attribution) is at least this in size."""
    method: str = field(default="attribution", metadata={"choices": list(METHODS)})
    """attribution: rank edges by activation x gradient, confirm the strongest by ablation; ablation: ablate every live feature."""
    confirm: int = 50
    """With --method attribution: ablate the sources of this many strongest attributed edges per layer."""
    features_from: int = 0
    """First block whose dictionary features are sources."""
    sum_positions: bool = False
    """Measure effects summed over positions (default: at the last position)."""
    n_logits: int = 5
    """Logit nodes: the most likely next tokens."""
    max_edges: int = 300
    """Draw at most this many edges, the strongest (graphviz slows down on thousands)."""
    n_contexts: int = 3
    """Top contexts shown per feature node."""
    context_rows: int = 64
    """For dictionaries without a features.json: Stage 1 sequences run to find each feature's top contexts
    (0, or no Stage 1 folder: the prompt's own context)."""
    out: str = "outputs/circuit"
    """Output folder: circuit.dot, circuit.svg, circuit.json, index.html."""
    extend: bool = False
    """Add this run's edges to the circuit already in --out (effects of the same edge add up)."""
    model: str | None = None
    """Model to run (default: the one the sweeps' activations came from)."""
    prepend_bos: bool | None = None
    """Put BOS before the prompt (default: the model's own setting)."""
    batch_size: int = 32
    """Ablations run at once (one prompt copy each)."""
    device: str | None = None
    """cpu, cuda, cuda:N or mps (default: cuda when available)."""
    dtype: str = field(default="auto", metadata={"choices": list(DTYPE_CHOICES)})
    """Precision to run the model in; auto: the one Stage 1 ran it in (float32 when no manifest records one)."""


def parse_sweep_arg(arg: str) -> tuple[Path, float | None]:
    """DIR or DIR:KEY -> (folder, key or None)."""
    head, sep, tail = arg.rpartition(":")
    if sep and head and not Path(arg).exists():
        try:
            return Path(head), float(tail)
        except ValueError:
            raise UserError(f"--sweeps {arg!r}: the part after ':' must be the member's L1 penalty or k") from None
    return Path(arg), None


def sweep_dictionaries(args: Sequence[str], device: torch.device | str = "cpu"
                       ) -> list[tuple[str, Any, str, dict[str, Any], Path | None]]:
    """(hook, dictionary, label, sweep.json, features.json or None) for each --sweeps argument."""
    from training.pretrained import pick_dictionary
    out = []
    for arg in args:
        path, key = parse_sweep_arg(arg)
        if not (path / "sweep.json").exists():
            raise UserError(f"--sweeps {arg}: {path} is not a sweep folder (no sweep.json): pass the --output_dir "
                            "of basic_l1_sweep.py")
        picked = pick_dictionary(path, key=key, device=device)
        features = path / "features" / picked.label / "features.json"
        out.append((picked.meta["hook"], picked.module, f"{path}:{picked.key:g}", picked.meta,
                    features if features.exists() else None))
    return out


def pretrained_dictionaries(paths: Sequence[str], model: str | None, device: torch.device | str = "cpu"
                            ) -> list[tuple[str, Any, str, dict[str, Any], Path | None]]:
    """(hook, dictionary, label, description, features.json or None) for each --sae argument (any format
    training.load_dictionary reads; hook and model from its own metadata)."""
    from training.pretrained import pick_dictionary
    out = []
    for path in paths:
        picked = pick_dictionary(None, sae=path, model=model, device=device)
        features = Path("outputs") / "features" / picked.label / "features.json"  # where gathering puts them
        out.append((picked.meta["hook"], picked.module, picked.label, picked.meta,
                    features if features.exists() else None))
    return out


def dictionary_entries(cfg: CircuitConfig, device: torch.device | str = "cpu"
                       ) -> list[tuple[str, Any, str, dict[str, Any], Path | None]]:
    """(hook, dictionary, label, sweep.json or description, features.json or None) of every dictionary the flags
    name: members of this project's sweeps and pretrained dictionaries."""
    if not cfg.sweeps and not cfg.sae:
        raise UserError("no dictionaries: pass --sweeps DIR[:KEY] and/or --sae PATH (one per hook, at least one)")
    return sweep_dictionaries(cfg.sweeps, device) + pretrained_dictionaries(cfg.sae, cfg.model, device)


def make_sites(entries: Sequence[tuple[str, Any, str, dict[str, Any] | None, Path | None]], model: Any) -> list[Site]:
    """Sites in forward order, named by block (plus hook kind where one block has several); hooks checked."""
    from training.hooks import describe_valid_hooks, hook_layer
    order = {h: i for i, h in enumerate(model.hook_dict)}
    seen: set[str] = set()
    for hook, *_ in entries:
        if hook not in order:
            raise UserError(f"the model has no hook {hook!r} (valid: {describe_valid_hooks(list(model.hook_dict))}): "
                            "pass the --model the dictionaries were trained on")
        if hook in seen:
            raise UserError(f"two dictionaries at {hook}: give one per hook")
        seen.add(hook)
    entries = sorted(entries, key=lambda e: order[e[0]])
    layers = [hook_layer(e[0]) for e in entries]
    sites = []
    for (hook, sae, label, _meta, feats), layer in zip(entries, layers):
        name = str(layer) if layer is not None else hook
        if layer is None or layers.count(layer) > 1:
            name = (f"{layer}" if layer is not None else "") + "_" + hook.rsplit(".", 1)[-1].removeprefix("hook_")
        dash = feats.parent / "dashboards" if feats is not None and (feats.parent / "dashboards").is_dir() else None
        sites.append(Site(hook, sae, name, label, feats, dash))
    return sites


def circuit_model_name(metas: Sequence[dict[str, Any]], override: str | None) -> str:
    """The model the sweeps' activations came from (all the same), or `override`."""
    from training.steering import model_name
    if override:
        return override
    names = {model_name(m, None) for m in metas}
    if len(names) > 1:
        raise UserError(f"the sweeps come from different models ({', '.join(sorted(names))}): pass --model, or "
                        "sweeps of one model")
    return names.pop()


def run_find_circuit(cfg: CircuitConfig) -> tuple[Circuit, dict[str, Path]]:
    """Load the dictionaries and the model, find the circuit on the prompt, write the outputs."""
    from training.circuit_graph import check_graphviz, write_outputs
    from training.locks import output_lock
    from training.models import analysis_dtype, load_model, resolve_device
    from training.steering import check_sweep_hook, prompt_token_ids
    if not cfg.prompt:
        raise UserError("empty prompt: pass --prompt TEXT")
    for name in ("n_logits", "batch_size", "confirm", "max_edges"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.extend:
        from training.circuit_graph import read_graph
        read_graph(Path(cfg.out) / "circuit.json")  # a missing or foreign circuit is refused before any work
    check_graphviz()
    device = resolve_device(cfg.device)
    entries = dictionary_entries(cfg, device)
    metas = [e[3] for e in entries]
    name = circuit_model_name(metas, cfg.model)
    model = load_model(name, device, analysis_dtype(cfg.dtype, metas[0].get("source_manifest")))
    for meta in metas:
        check_sweep_hook(model, meta)
    sites = make_sites(entries, model)
    ids = prompt_token_ids(model, cfg.prompt, cfg.prepend_bos)
    if len(ids) > model.cfg.n_ctx:
        raise UserError(f"the prompt has {len(ids)} tokens; the model takes {model.cfg.n_ctx}: shorten it")
    tokens = torch.tensor([ids], device=device)
    circuit = find_circuit(model, sites, tokens, threshold=cfg.threshold, method=cfg.method, confirm=cfg.confirm,
                           sum_positions=cfg.sum_positions, features_from=cfg.features_from,
                           n_logits=cfg.n_logits, batch_size=cfg.batch_size, max_edges=cfg.max_edges)
    circuit.info.update({"prompt": cfg.prompt, "model": name, "config": dataclasses.asdict(cfg),
                         "sites": [{"name": s.name, "hook": s.hook, "dictionary": s.label} for s in sites]})
    todo = {k: v for k, v in circuit.nodes.items() if v["kind"] == "feature"
            and next(s for s in sites if s.name == v["site"]).features_json is None}
    rows = stage1_token_rows(metas, cfg.context_rows) if cfg.context_rows > 0 and todo else None
    gathered = gather_contexts(model, sites, todo, rows, cfg.n_contexts) if rows is not None else {}
    with output_lock(cfg.out):  # one writer per output folder (--extend reads, merges and rewrites it)
        paths = write_outputs(circuit, sites, model, tokens[0].tolist(), Path(cfg.out), cfg.n_contexts, cfg.extend,
                              gathered)
    return circuit, paths
