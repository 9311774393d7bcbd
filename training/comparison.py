"""Several evaluated sweeps side by side: their Pareto frontiers overlaid (one colour per architecture) and each read
at L0 = 16, 32, 64 (comparison.json, comparison.md and two plots, written atomically into one folder).

Each sweep is evaluated as `evaluate_sweep.py` evaluates one (its own report.json, report.md, plots); the comparison
reads the members' explained variance and CE loss score against L0 from those reports. A frontier is read at an L0 by
linear interpolation in log L0 between the two frontier members bracketing it (training/frontier.py), and not at
all ("—") outside the L0 range the sweep measured.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import training
from training.architectures import get as get_architecture
from training.architectures import names as architecture_names
from training.chunks import atomic_write_json
from training.cli import UserError
from training.evaluate import EvaluateConfig, _json_safe, atomic_write_text, evaluate_sweep, read_sweep
from training.frontier import TARGET_L0, frontier_points, values_at_l0

COMPARISON_JSON, COMPARISON_MD = "comparison.json", "comparison.md"
METRICS = {"explained_variance": "explained variance", "ce_loss_score": "CE loss score"}
"""The member metrics compared (report.json names: their labels); both rise towards a perfect dictionary."""
COMPARISON_PLOTS = {"explained_variance": "comparison_ev_vs_l0.png", "ce_loss_score": "comparison_ce_vs_l0.png"}
SAME_TEXT = ("model", "hook", "dataset", "dataset_split")
"""What every compared sweep must have been evaluated on alike."""


@dataclass
class CompareConfig(EvaluateConfig):
    """evaluate_sweep.py's flags: the evaluation's, with one or several sweeps (several: compared in one report)."""

    sweep: list[str] = field(default_factory=lambda: ["outputs/sweep"])  # type: ignore[assignment]
    """Sweep folder(s) written by basic_l1_sweep.py; several: each is evaluated, then their frontiers are compared in
    --comparison_dir."""
    comparison_dir: str = "outputs/comparison"
    """Where the comparison of several sweeps goes (comparison.md, comparison.json, two plots)."""


def per_sweep_configs(cfg: CompareConfig) -> list[EvaluateConfig]:
    """One EvaluateConfig per --sweep (the other flags shared); a sweep named twice is a UserError."""
    seen = [Path(s).resolve() for s in cfg.sweep]
    if not cfg.sweep:
        raise UserError("--sweep needs at least one sweep folder")
    dup = next((s for s, r in zip(cfg.sweep, seen) if seen.count(r) > 1), None)
    if dup is not None:
        raise UserError(f"sweep {dup} is given twice: name each sweep once")
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EvaluateConfig) if f.name != "sweep"}
    return [EvaluateConfig(sweep=s, **shared) for s in cfg.sweep]


# ------------------------------------------------------------------------------------- the comparison


def sweep_label(report: dict[str, Any], reports: Sequence[dict[str, Any]]) -> str:
    """The architecture's title ("TopK"), with the sweep folder's name when another compared sweep shares it."""
    ev = report["evaluated"]
    title = get_architecture(ev["architecture"]).title
    shared = sum(r["evaluated"]["architecture"] == ev["architecture"] for r in reports) > 1
    return f"{title} ({Path(ev['sweep']).name})" if shared else title


def _number(v: Any) -> float:
    """v as a float (NaN for None: report.json writes non-finite values as null)."""
    return float("nan") if v is None else float(v)


def compare_reports(reports: Sequence[dict[str, Any]], targets: Sequence[float] = TARGET_L0) -> dict[str, Any]:
    """The comparison of evaluated sweeps (their report.json contents): per sweep its members' (L0, metric), each
    metric's Pareto frontier and the frontier read at every target L0 (None outside the measured range)."""
    if not reports:
        raise UserError("nothing to compare: give at least one evaluated sweep")
    first = reports[0]["evaluated"]
    for r in reports[1:]:
        ev = r["evaluated"]
        differ = [k for k in SAME_TEXT if ev.get(k) != first.get(k)]
        if differ:
            raise UserError(f"sweeps {first['sweep']} and {ev['sweep']} were evaluated on different "
                            f"{', '.join(differ)} ({', '.join(repr(first.get(k)) for k in differ)} vs "
                            f"{', '.join(repr(ev.get(k)) for k in differ)}): compare sweeps of one model and hook on "
                            "one text")
    sweeps = []
    for r in reports:
        ev, members = r["evaluated"], r["members"]
        l0 = [_number(m["l0"]) for m in members]
        entry: dict[str, Any] = {
            "sweep": ev["sweep"], "architecture": ev["architecture"], "label": sweep_label(r, reports),
            "sweep_sha256": ev.get("sweep_sha256"), "n_tokens": ev.get("n_tokens"),
            "keys": [m["key"] for m in members], "l0": l0, "metrics": {}}
        for metric in METRICS:
            values = [_number(m[metric]) for m in members]
            entry["metrics"][metric] = {
                "values": values,
                "frontier": [list(p) for p in frontier_points(l0, values)],
                "at_l0": values_at_l0(l0, values, targets)}
        sweeps.append(entry)
    return _json_safe({
        "toolkit_version": training.__version__, "targets": list(targets), "metrics": dict(METRICS),
        "evaluated_on": {k: first.get(k) for k in SAME_TEXT}, "sweeps": sweeps,
        "plots": dict(COMPARISON_PLOTS),
        "definition": "each metric's Pareto frontier against L0 (members no other member of the sweep beats on both) "
                      "read at each target L0 by linear interpolation in log L0 between the two frontier members "
                      "bracketing it; none outside the frontier's L0 range (never extrapolated)"})


def _cell(v: float | None) -> str:
    """A table cell: the value to 4 decimals, or an em dash where the frontier does not reach."""
    return "—" if v is None else f"{v:.4f}"


def l0_range(entry: dict[str, Any]) -> str:
    """"lo–hi" of the L0 a sweep's members span (finite, > 0)."""
    usable = [v for v in entry["l0"] if v is not None and math.isfinite(v) and v > 0]
    return f"{min(usable):.1f}–{max(usable):.1f}" if usable else "—"


def comparison_table(comparison: dict[str, Any]) -> list[str]:
    """Markdown rows: one per sweep, each metric's frontier read at every target L0, and the measured L0 range."""
    targets = comparison["targets"]
    short = {"explained_variance": "EV", "ce_loss_score": "CE score"}
    head = ["architecture"] + [f"{short.get(m, m)} @ L0={t:g}" for m in comparison["metrics"] for t in targets] + [
        "L0 range"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in comparison["sweeps"]:
        cells = [_cell(v) for m in comparison["metrics"] for v in s["metrics"][m]["at_l0"]]
        lines.append("| " + " | ".join([s["label"]] + cells + [l0_range(s)]) + " |")
    return lines


def comparison_markdown(comparison: dict[str, Any]) -> str:
    """comparison.md: what was compared, the table at the target L0s, how it was read, the plots."""
    on = comparison["evaluated_on"]
    lines = ["# Sweep comparison", "",
             f"- model `{on['model']}`, hook `{on['hook']}`, text `{on['dataset']}` split `{on['dataset_split']}`"]
    lines += [f"- {s['label']}: `{s['sweep']}` ({len(s['keys'])} members, {s['n_tokens']:,} tokens evaluated)"
              for s in comparison["sweeps"]]
    lines += ["", "## At matched L0", ""] + comparison_table(comparison) + [
        "", f"EV = explained variance, CE score = CE loss score (1 = clean model, 0 = activation zero-ablated). Each "
        f"value: {comparison['definition']}; — where the sweep has no members on both sides of that L0. L0 range: "
        "the smallest and largest mean active features per token among the sweep's members. Higher is better at a "
        "given L0.", "",
        f"![explained variance vs L0]({COMPARISON_PLOTS['explained_variance']})",
        f"![CE loss score vs L0]({COMPARISON_PLOTS['ce_loss_score']})", ""]
    return "\n".join(lines)


def architecture_colour(architecture: str) -> str:
    """The matplotlib colour of an architecture: its place in the registry ("C0", "C1", ...), the same in every
    comparison."""
    known = architecture_names()
    return f"C{known.index(architecture) % 10}" if architecture in known else "0.3"


@dataclass
class ComparisonResult:
    """What a comparison produced (comparison.json's contents) and where."""

    comparison: dict[str, Any]
    folder: Path

    def __str__(self) -> str:
        targets = self.comparison["targets"]
        rows = []
        for metric, label in self.comparison["metrics"].items():
            rows.append(f"{label} on the Pareto frontier at L0 = {', '.join(f'{t:g}' for t in targets)}:")
            width = max(len(s["label"]) for s in self.comparison["sweeps"])
            for s in self.comparison["sweeps"]:
                cells = " ".join(f"{_cell(v):>8}" for v in s["metrics"][metric]["at_l0"])
                rows.append(f"  {s['label']:<{width}} " + cells
                            + f"   (L0 {l0_range(s)})")
        return ("\n".join(rows) + f"\n— : outside the sweep's measured L0 range (not extrapolated)\nwrote "
                f"{self.folder / COMPARISON_MD}, {self.folder / COMPARISON_JSON} and {len(COMPARISON_PLOTS)} plots")


def write_comparison(reports: Sequence[dict[str, Any]], folder: str | Path,
                     targets: Sequence[float] = TARGET_L0) -> ComparisonResult:
    """Compare evaluated sweeps' reports and write comparison.json, comparison.md and the plots into `folder`."""
    from training.evaluate import write_frontier_plots
    comparison = compare_reports(reports, targets)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_frontier_plots(comparison, folder, architecture_colour)
    atomic_write_text(folder / COMPARISON_MD, comparison_markdown(comparison))
    atomic_write_json(folder / COMPARISON_JSON, comparison)
    return ComparisonResult(comparison, folder)


def evaluate_and_compare(cfg: CompareConfig, show: Any = print) -> ComparisonResult | None:
    """Evaluate every --sweep (each result passed to `show` as it finishes); with several, compare them into
    --comparison_dir."""
    configs = per_sweep_configs(cfg)
    if len(configs) > 1 and Path(cfg.comparison_dir).resolve() in [Path(s).resolve() for s in cfg.sweep]:
        raise UserError(f"--comparison_dir {cfg.comparison_dir} is one of the sweeps: give another folder")
    for one in configs:                         # every sweep readable and finished before any is evaluated
        read_sweep(Path(one.sweep), one.allow_unfinished)
    reports = []
    for one in configs:
        result = evaluate_sweep(one)
        show(result)
        reports.append(result.report)
    if len(reports) == 1:
        return None
    return write_comparison(reports, cfg.comparison_dir)
