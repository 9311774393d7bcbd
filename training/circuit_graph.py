"""Draw a feature circuit: circuit.json (every node and edge), circuit.dot, circuit.svg (graphviz) and index.html.

Nodes are boxes "site.feature" labelled with the feature's top contexts (tokens shaded by activation) and the
tokens its decoder direction most raises and lowers through the unembedding; error nodes are dashed, logit nodes
are ellipses. Edges are blue for positive and red for negative effects, with opacity and width by
|effect| / max |effect|. A note node states the share of the collected |effect| the drawn edges carry.
`extend` merges a run into the circuit.json already there: the same edge's effects add up.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Sequence

import torch

from training.chunks import atomic_write_json
from training.cli import UserError

FORMAT = "feature_circuit"
DOT_TIMEOUT_S = 120


def check_graphviz() -> str:
    """The path of graphviz's `dot`; a UserError when it is not installed."""
    dot = shutil.which("dot")
    if dot is None:
        raise UserError("graphviz's `dot` is not installed: apt-get install graphviz (Debian/Ubuntu), "
                        "brew install graphviz (macOS)")
    return dot


def _atomic_write_text(path: Path, text: str) -> None:
    """Write text to path through a temporary file and os.replace."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- node descriptions

def _prompt_context(tokens: Sequence[str], acts: torch.Tensor, before: int = 8, after: int = 3) -> dict[str, Any]:
    """An example window of the prompt around the position where `acts [seq]` is largest."""
    c = int(acts.argmax())
    lo, hi = max(0, c - before), min(len(tokens), c + after + 1)
    return {"tokens": list(tokens[lo:hi]), "acts": [round(float(a), 4) for a in acts[lo:hi]], "center": c - lo,
            "source": "prompt"}


def describe_nodes(graph: dict[str, Any], sites: Sequence[Any], model: Any, codes: dict[str, torch.Tensor],
                   prompt_ids: Sequence[int], n_contexts: int, gathered: dict[str, list[dict[str, Any]]] | None = None,
                   n_tokens: int = 3) -> None:
    """Add to each feature node its top contexts (features.json when the site has one, else those `gathered` on
    the fly, else the prompt's), the tokens its direction most raises/lowers ("up", "down") and its dashboard
    page when one exists (in place)."""
    from training.dashboards import logit_effects, residual_directions
    from training.feature_file import read_features_json
    by_name = {s.name: s for s in sites}
    prompt_tokens = [model.tokenizer.decode([t]) for t in prompt_ids]
    files: dict[str, list[dict[str, Any]] | None] = {}
    for nid, node in graph["nodes"].items():
        if node["kind"] != "feature":
            continue
        site, i = by_name[node["site"]], node["feature"]
        if site.name not in files:
            files[site.name] = read_features_json(site.features_json)["features"] if site.features_json else None
        feats = files[site.name]
        if feats is not None and i < len(feats) and feats[i].get("top"):
            node["contexts"] = [dict(ex, source="features.json") for ex in feats[i]["top"][:n_contexts]]
        elif gathered and gathered.get(nid):
            node["contexts"] = gathered[nid][:n_contexts]
        else:
            node["contexts"] = [_prompt_context(prompt_tokens, codes[site.name][:, i])]
        dirs = residual_directions(model, site.hook, site.sae.decoder[i:i + 1].detach())
        if dirs is not None:
            ti, tv, bi, bv = logit_effects(dirs, model.W_U.detach(), n_tokens)
            node["up"] = [[model.tokenizer.decode([int(t)]), round(float(v), 4)] for t, v in zip(ti[0], tv[0])]
            node["down"] = [[model.tokenizer.decode([int(t)]), round(float(v), 4)] for t, v in zip(bi[0], bv[0])]
        if site.dashboards is not None and (site.dashboards / "features" / f"{i}.html").exists():
            node["dashboard"] = str((site.dashboards / "features" / f"{i}.html").resolve())


# ------------------------------------------------------------------------------------- the graph as data

def circuit_graph(circuit: Any, sites: Sequence[Any]) -> dict[str, Any]:
    """The JSON form of a Circuit: nodes, kept edges, totals for the share drawn, site order and run info."""
    measured = sum(abs(e.weight) for e in circuit.edges)
    drawn = sum(abs(e.weight) for e in circuit.kept)
    return {"format": FORMAT, "version": 1,
            "sites": [{"name": s.name, "hook": s.hook, "dictionary": s.label} for s in sites],
            "nodes": circuit.nodes,
            "edges": [{"source": e.source, "target": e.target, "attribution": e.attribution, "ablation": e.ablation,
                       "weight": e.weight} for e in circuit.kept],
            "totals": {"measured": measured, "drawn": drawn, "n_measured": len(circuit.edges),
                       "n_drawn": len(circuit.kept)},
            "runs": [_json_safe(circuit.info)]}


def _json_safe(obj: Any) -> Any:
    """obj with non-finite floats replaced by None."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def read_graph(path: Path) -> dict[str, Any]:
    """circuit.json as a dict; a missing or foreign file is a UserError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--extend: {path} does not exist: run find_circuit.py without --extend first") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}): delete it or write to another --out") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a circuit.json written by find_circuit.py")
    return data


def merge_graphs(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` extended by `new`: nodes united (new descriptions win), the same edge's effects summed, totals
    summed, runs appended. Sites must name the same hooks."""
    old_sites = {s["name"]: s["hook"] for s in old["sites"]}
    for s in new["sites"]:
        if old_sites.get(s["name"], s["hook"]) != s["hook"]:
            raise UserError(f"--extend: the circuit in place has site {s['name']} at {old_sites[s['name']]}, this run "
                            f"at {s['hook']}: use another --out")
    sites = old["sites"] + [s for s in new["sites"] if s["name"] not in old_sites]
    edges = {(e["source"], e["target"]): dict(e) for e in old["edges"]}
    for e in new["edges"]:
        key = (e["source"], e["target"])
        if key in edges:
            merged = edges[key]
            for f in ("attribution", "ablation", "weight"):
                a, b = merged.get(f), e.get(f)
                merged[f] = None if a is None and b is None else (a or 0.0) + (b or 0.0)
        else:
            edges[key] = dict(e)
    totals = {k: old["totals"].get(k, 0) + new["totals"].get(k, 0) for k in new["totals"]}
    return {**new, "sites": sites, "nodes": {**old["nodes"], **new["nodes"]}, "edges": list(edges.values()),
            "totals": totals, "runs": old.get("runs", []) + new["runs"]}


def share_drawn(graph: dict[str, Any]) -> float:
    """Sum |effect| of the drawn edges / sum |effect| of every edge measured (1 when nothing was measured)."""
    t = graph["totals"]
    return t["drawn"] / t["measured"] if t["measured"] > 0 else 1.0


# ------------------------------------------------------------------------------------- DOT

def _shade(a: float | None, top: float) -> str:
    """Background colour of a token with activation a: white (0) to orange (top)."""
    if a is None or top <= 0 or a <= 0:
        return "#ffffff"
    x = min(1.0, a / top)
    g, b = round(255 - 120 * x), round(255 - 230 * x)
    return f"#ff{g:02x}{b:02x}"


def _text(s: str) -> str:
    """A token or string made safe for a graphviz HTML label."""
    from training.render import visible_token
    return html.escape(visible_token(s), quote=True) or "&#8709;"


def _context_row(ex: dict[str, Any]) -> str:
    """One context as a row of shaded token cells."""
    acts = ex["acts"]
    top = max([a for a in acts if a is not None] or [0.0])
    border = ' BORDER="1"'
    cells = "".join(f'<TD BGCOLOR="{_shade(a, top)}"{border if j == ex["center"] else ""}>{_text(t)}</TD>'
                    for j, (t, a) in enumerate(zip(ex["tokens"], acts)))
    return f'<TR><TD ALIGN="LEFT"><TABLE BORDER="0" CELLSPACING="0" CELLPADDING="1"><TR>{cells}</TR></TABLE></TD></TR>'


def node_label(nid: str, node: dict[str, Any]) -> str:
    """Graphviz HTML label of a node."""
    if node["kind"] == "logit":
        return f'<<B>{_text(node["token"])}</B><BR/><FONT POINT-SIZE="9">log p {node["value"]:.3g}</FONT>>'
    if node["kind"] == "error":
        return f"<<I>{_text(nid)}</I><BR/><FONT POINT-SIZE=\"9\">what the dictionary misses</FONT>>"
    rows = [f'<TR><TD ALIGN="LEFT"><B>{_text(nid)}</B>  <FONT POINT-SIZE="9">act {node["value"]:.3g} '
            f'(max {node["max_on_prompt"]:.3g})</FONT></TD></TR>']
    rows += [_context_row(ex) for ex in node.get("contexts", [])]
    if node.get("up") or node.get("down"):
        up = " ".join(_text(t) for t, _ in node.get("up", []))
        down = " ".join(_text(t) for t, _ in node.get("down", []))
        rows.append(f'<TR><TD ALIGN="LEFT"><FONT POINT-SIZE="9" COLOR="#1f4fd8">&#8593; {up}</FONT>  '
                    f'<FONT POINT-SIZE="9" COLOR="#c62828">&#8595; {down}</FONT></TD></TR>')
    return f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="1">{"".join(rows)}</TABLE>>'


def _quote(s: str) -> str:
    """A DOT double-quoted string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def edge_style(weight: float, top: float) -> dict[str, str]:
    """Colour (blue positive, red negative, alpha by |weight| / top) and width of an edge."""
    rel = min(1.0, abs(weight) / top) if top > 0 else 1.0
    alpha = round(40 + 215 * rel)
    rgb = "1f4fd8" if weight >= 0 else "c62828"
    return {"color": f"#{rgb}{alpha:02x}", "penwidth": f"{0.5 + 4.5 * rel:.2f}"}


def to_dot(graph: dict[str, Any], out: Path | None = None) -> str:
    """The circuit as a DOT digraph: one rank per site in forward order, logits last, the share-drawn note."""
    nodes, edges = graph["nodes"], graph["edges"]
    top = max((abs(e["weight"]) for e in edges), default=0.0)
    lines = ["digraph circuit {", '  graph [rankdir=TB, newrank=true, fontname="DejaVu Sans", nodesep=0.25];',
             '  node [shape=box, fontname="DejaVu Sans", fontsize=10, style=rounded];',
             '  edge [arrowsize=0.6];']
    order = [s["name"] for s in graph["sites"]] + ["logit"]
    for name in order:
        members = [n for n, v in nodes.items() if (v.get("site") if v["kind"] != "logit" else "logit") == name]
        if not members:
            continue
        lines.append("  { rank=same;")
        for nid in sorted(members):
            v = nodes[nid]
            attrs = {"id": _quote(nid), "tooltip": _quote(nid)}
            if v["kind"] == "logit":
                attrs["shape"] = "ellipse"
            elif v["kind"] == "error":
                attrs["style"] = '"rounded,dashed"'
            if v.get("dashboard"):
                link = os.path.relpath(v["dashboard"], out) if out is not None else v["dashboard"]
                attrs["URL"], attrs["target"] = _quote(link), '"_blank"'
            attr = ", ".join(f"{k}={val}" for k, val in attrs.items())
            lines.append(f"    {_quote(nid)} [label={node_label(nid, v)}, {attr}];")
        lines.append("  }")
    for e in edges:
        st = edge_style(e["weight"], top)
        tip = f"{e['source']} -> {e['target']}: {e['weight']:+.4g}"
        if e.get("attribution") is not None:
            tip += f" (attribution {e['attribution']:+.4g})"
        lines.append(f'  {_quote(e["source"])} -> {_quote(e["target"])} [color="{st["color"]}", '
                     f'penwidth={st["penwidth"]}, tooltip={_quote(tip)}];')
    t = graph["totals"]
    note = (f"drawn: {100 * share_drawn(graph):.1f}% of the total |effect| "
            f"({t['n_drawn']} of {t['n_measured']} edges measured; {len(graph['runs'])} run(s))")
    lines.append(f'  "share" [shape=note, style="", label={_quote(note)}, id="share"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_svg(dot_text: str, svg: Path) -> None:
    """Lay the DOT out with graphviz's `dot` into `svg` (atomically); a failure is a UserError."""
    dot = check_graphviz()
    out = subprocess.run([dot, "-Tsvg"], input=dot_text.encode(), capture_output=True, timeout=DOT_TIMEOUT_S)
    if out.returncode != 0:
        first = (out.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[0]
        raise UserError(f"graphviz could not lay the circuit out: {first}")
    tmp = svg.with_name(svg.name + ".tmp")
    tmp.write_bytes(out.stdout)
    os.replace(tmp, svg)


# ------------------------------------------------------------------------------------- HTML

def to_html(graph: dict[str, Any], svg_text: str, out: Path) -> str:
    """index.html: run information, the SVG inline (its nodes link to the dashboards) and a table of nodes."""
    svg = svg_text[svg_text.find("<svg"):]
    run = graph["runs"][-1]
    agree = run.get("agreement") or {}
    rho = agree.get("spearman")
    rows = []
    for nid, v in sorted(graph["nodes"].items()):
        link = (f'<a href="{html.escape(os.path.relpath(v["dashboard"], out))}">dashboard</a>'
                if v.get("dashboard") else "")
        what = {"feature": f"feature {v.get('feature')} at {v.get('hook')}", "error": f"error at {v.get('hook')}",
                "logit": f"log p({html.escape(repr(v.get('token')))})"}[v["kind"]]
        rows.append(f"<tr><td>{html.escape(nid)}</td><td>{what}</td><td>{'' if v.get('value') is None else format(v['value'], '.4g')}</td><td>{link}</td></tr>")
    prompts = "".join(f"<li><code>{html.escape(str(r.get('prompt')))}</code></li>" for r in graph["runs"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Feature circuit</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}} .graph{{overflow:auto;border:1px solid #ddd}}</style>
</head><body>
<h1>Feature circuit</h1>
<p>Prompts:</p><ul id="prompts">{prompts}</ul>
<p id="summary">{len(graph['nodes'])} nodes, {len(graph['edges'])} edges; drawn edges carry
{100 * share_drawn(graph):.1f}% of the total |effect|. Attribution vs ablation (latest run): Spearman
{'n/a' if rho is None else f'{rho:.3f}'} over {agree.get('n_pairs', 0)} edges. Blue: positive effect, red: negative.</p>
<div class="graph">{svg}</div>
<h2>Nodes</h2>
<table id="nodes"><tr><th>node</th><th>what</th><th>measure</th><th>page</th></tr>{''.join(rows)}</table>
</body></html>
"""


def write_outputs(circuit: Any, sites: Sequence[Any], model: Any, prompt_ids: Sequence[int], out: Path,
                  n_contexts: int, extend: bool, gathered: dict[str, list[dict[str, Any]]] | None = None
                  ) -> dict[str, Path]:
    """Write circuit.json, circuit.dot, circuit.svg and index.html into `out` (extending the circuit there);
    `gathered`: contexts found on the fly, by node id (see describe_nodes)."""
    graph = circuit_graph(circuit, sites)
    describe_nodes(graph, sites, model, circuit.codes, prompt_ids, n_contexts, gathered)
    paths = {k: out / f"circuit.{k}" for k in ("json", "dot", "svg")} | {"html": out / "index.html"}
    if extend:
        graph = merge_graphs(read_graph(paths["json"]), graph)
    out.mkdir(parents=True, exist_ok=True)
    dot_text = to_dot(graph, out)
    render_svg(dot_text, paths["svg"])
    _atomic_write_text(paths["dot"], dot_text)
    atomic_write_json(paths["json"], _json_safe(graph))
    _atomic_write_text(paths["html"], to_html(graph, paths["svg"].read_text(encoding="utf-8"), out))
    return paths
