#!/usr/bin/env python
"""The GPU check's driver (bench/gpu_check.sh installs the requirements, then runs this): the tests marked gpu,
Stage 1 on a random Pythia-70M-shaped model (bench/generate.py), and bench/sweep.py at the sizes the README's
targets name, each in its own process with a time limit; writes OUT_DIR/results.json and OUT_DIR/results.md (logs
in OUT_DIR/logs/) and prints the summary.

Without a CUDA GPU (or with --smoke) it runs the CPU-safe parts at a tiny smoke size and says what it skipped.

    python bench/gpu_check.py OUT_DIR [--smoke] [--skip_tests] [--budget_s 450]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SWEEP_SIZES = ((512, 8), (2048, 16))
"""(d_in, ratio) of the full run: 512 x 4096 and 2048 x 32768."""
SMOKE_SWEEP = ["--sizes", "16", "--ratio", "4", "--batch", "64", "--rounds", "1", "--n_models", "2"]
"""bench/sweep.py flags of the smoke run."""
MFU_TARGET, ENSEMBLE_TARGET = 0.5, 3.0
"""README targets: bf16 ensemble MFU at 2048 x 32768; ensemble over sequential members at 512 x 4096."""


def machine() -> dict[str, Any]:
    """torch, CUDA and the GPU (or the CPU count) of this machine."""
    info: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "python": sys.version.split()[0]}
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    else:
        info["cpus"] = os.cpu_count()
    return info


def run_step(name: str, cmd: list[str], timeout_s: float, out: Path) -> dict[str, Any]:
    """Run `cmd` from the repository root with a time limit, its output in out/logs/{name}.log; the outcome."""
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[gpu_check] {name}: {' '.join(cmd[1:])}", flush=True)
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s:.0f} s"
    seconds = time.perf_counter() - t0
    print(f"[gpu_check] {name}: {status} in {seconds:.0f} s", flush=True)
    return {"name": name, "status": status, "seconds": round(seconds, 1), "log": str(log.relative_to(out))}


def junit_counts(path: Path) -> dict[str, int]:
    """{"tests", "failures", "errors", "skipped"} from a pytest junit XML file (zeros when it is missing)."""
    if not path.exists():
        return {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}  # type: ignore[union-attr]


def gpu_tests(out: Path, timeout_s: float) -> dict[str, Any]:
    """The tests marked gpu (all skipped without CUDA)."""
    xml = out / "gpu_tests.xml"
    step = run_step("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                                  f"--junitxml={xml}", "tests/test_gpu.py"], timeout_s, out)
    counts = junit_counts(xml)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**step, **counts, "passed": passed}


def stage1(out: Path, dtype: str, smoke: bool, device: str, timeout_s: float) -> dict[str, Any]:
    """bench/generate.py: 2 layers x residual and mlp of the random Pythia-70M shape (smoke: a small model)."""
    path = out / f"stage1_{dtype}.json"
    size = ["--smoke", "--n_tokens", "2048", "--repeats", "1"] if smoke else ["--n_tokens", "131072", "--repeats", "3"]
    step = run_step(f"stage1_{dtype}", [sys.executable, "bench/generate.py", "--device", device, "--dtype", dtype,
                                        "--layers", "2", "3", "--locations", "residual", "mlp", "--json", str(path),
                                        *size], timeout_s, out)
    return {**step, "dtype": dtype, "figures": json.loads(path.read_text()) if path.exists() else None}


def sweep_bench(out: Path, precision: str, d_in: int | None, ratio: int | None, device: str,
                timeout_s: float) -> dict[str, Any]:
    """bench/sweep.py --quick (ensemble, sequential, matmul) at one size, 8 members (smoke: when d_in is None)."""
    name = f"sweep_{precision}_" + ("smoke" if d_in is None else f"{d_in}x{d_in * ratio}")  # type: ignore[operator]
    path = out / f"{name}.json"
    size = SMOKE_SWEEP if d_in is None else ["--sizes", str(d_in), "--ratio", str(ratio), "--n_models", "8",
                                             "--batch", "4096", "--rounds", "5"]
    step = run_step(name, [sys.executable, "bench/sweep.py", "--quick", "--device", device, "--precision", precision,
                           "--json", str(path), *size], timeout_s, out)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    return {**step, "precision": precision, "rows": rows}


def targets(sweeps: list[dict[str, Any]], smoke: bool) -> list[dict[str, Any]]:
    """The README's two targets, each met, missed or not measured."""
    rows = [(s["precision"], r) for s in sweeps for r in s["rows"]]
    checks = []
    mfu = [r["ensemble_mfu"] for p, r in rows if p == "bf16" and (r["d_in"], r["d_hidden"]) == (2048, 32768)]
    checks.append({"target": f"bf16 ensemble at 2048 x 32768: MFU >= {MFU_TARGET:.0%}",
                   "measured": f"{mfu[0]:.1%}" if mfu and mfu[0] is not None else None,
                   "met": None if smoke or not mfu or mfu[0] is None else mfu[0] >= MFU_TARGET})
    for precision in ("tf32", "bf16"):
        ratio = [r["ensemble_over_sequential"] for p, r in rows if p == precision and (r["d_in"], r["d_hidden"]) == (512, 4096)]
        checks.append({"target": f"{precision} ensemble at 512 x 4096: >= {ENSEMBLE_TARGET:g}x the 8 members one "
                                 "after another",
                       "measured": f"{ratio[0]:.2f}x" if ratio else None,
                       "met": None if smoke or not ratio else ratio[0] >= ENSEMBLE_TARGET})
    return checks


def _fmt(x: float | None, spec: str) -> str:
    """A number for the tables ("-" when missing)."""
    return "-" if x is None else format(x, spec)


def results_markdown(res: dict[str, Any]) -> str:
    """results.md: the machine, what ran and what was skipped, the tests, Stage 1, Stage 2 and the targets."""
    m = res["machine"]
    hw = (f"{m['gpu']} ({m['gpu_memory_gib']} GiB, compute capability {m['capability']})" if m["cuda_available"]
          else f"no CUDA GPU ({m['cpus']} CPUs)")
    lines = [f"# GPU check, {res['date']}", "",
             f"machine: {hw}; torch {m['torch']} (CUDA build {m['cuda_build']}); python {m['python']}",
             f"mode: {res['mode']}; {res['seconds']:.0f} s in all", ""]
    if res["skipped"]:
        lines += ["skipped:"] + [f"- {s}" for s in res["skipped"]] + [""]
    t = res.get("gpu_tests")
    if t:
        lines += ["## Tests marked gpu", "",
                  f"{t['status']}: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped "
                  f"(log {t['log']})", ""]
    lines += ["## Stage 1: random Pythia-70M shape, layers 2 and 3 x residual and mlp" +
              (" (smoke: a small model)" if res["smoke"] else ""), "",
              "| model dtype | bare forward tok/s | Stage 1 tok/s | overhead over the bare forward | peak memory | status |",
              "| --- | --- | --- | --- | --- | --- |"]
    for s in res["stage1"]:
        f = s["figures"] or {}
        lines.append(f"| {s['dtype']} | {_fmt(f.get('bare_tokens_per_s'), ',.0f')} | "
                     f"{_fmt(f.get('full_tokens_per_s'), ',.0f')} | {_fmt(f.get('overhead'), '.1%')} | "
                     f"{(f.get('peak_memory') or {}).get('label', '-')} | {s['status']} |")
    lines += ["", "## Stage 2: bench/sweep.py, L1 members, ensemble (a) against the same members one after another (b)",
              "", "| precision | d_in x d_hidden | members | (a) tok/s per member | (b) tok/s per member | (a)/(b) | "
                  "MFU (a) | MFU (b) | MFU against | peak memory (a) / (b) | status |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in res["sweeps"]:
        for r in s["rows"] or [None]:
            if r is None:
                lines.append(f"| {s['precision']} | - | - | - | - | - | - | - | - | - | {s['status']} |")
                continue
            mem = r["memory"]
            where = "device" if mem["ensemble"]["peak_kind"] == "device" else "host RSS"
            lines.append(
                f"| {s['precision']} | {r['d_in']} x {r['d_hidden']} | {r['n_models']} | "
                f"{_fmt(r['ensemble_tokens_per_s_per_member'], ',.0f')} | "
                f"{_fmt(r['sequential_tokens_per_s_per_member'], ',.0f')} | {_fmt(r['ensemble_over_sequential'], '.2f')} | "
                f"{_fmt(r['ensemble_mfu'], '.1%')} | {_fmt(r['sequential_mfu'], '.1%')} | {r['peak_source']} | "
                f"{mem['ensemble']['peak_mib']:,.0f} / {mem['sequential']['peak_mib']:,.0f} MiB {where} | {s['status']} |")
    lines += ["", "## Targets", ""]
    for c in res["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[c["met"]]
        lines.append(f"- {c['target']}: {verdict}" + (f" (measured {c['measured']})" if c["measured"] else ""))
    return "\n".join(lines) + "\n"


def failed_steps(res: dict[str, Any]) -> list[str]:
    """Names of the steps that did not end ok (a failed gpu test fails its step)."""
    steps = ([res["gpu_tests"]] if res["gpu_tests"] else []) + res["stage1"] + res["sweeps"]
    return [s["name"] for s in steps if s["status"] != "ok"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The driver's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", help="folder for results.md, results.json and logs/")
    p.add_argument("--smoke", action="store_true", help="tiny sizes even on a GPU (always so without one)")
    p.add_argument("--skip_tests", action="store_true", help="do not run the tests marked gpu")
    p.add_argument("--budget_s", type=float, default=450.0,
                   help="start no new step after this many seconds (the check should end within 8 minutes)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the check, write results.json and results.md, print the summary; the results."""
    args = parse_args(argv)
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    cuda = info["cuda_available"]
    smoke = args.smoke or not cuda
    device = "cuda" if cuda else "cpu"
    t0 = time.perf_counter()
    skipped: list[str] = []
    if not cuda:
        skipped.append("no CUDA GPU here: the gpu tests skip themselves, Stage 1 and bench/sweep.py ran at a tiny "
                       "smoke size on the CPU, tf32 and the full sizes (and so the targets) were not measured")
    elif smoke:
        skipped.append("--smoke: tiny sizes only, the targets were not measured")

    def in_budget(what: str) -> bool:
        """Whether there is time left to start `what` (noted as skipped when not)."""
        if time.perf_counter() - t0 < args.budget_s:
            return True
        skipped.append(f"{what}: not started, past the {args.budget_s:.0f} s budget")
        return False

    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": info,
                           "smoke": smoke, "mode": "smoke" if smoke else "full", "skipped": skipped,
                           "gpu_tests": None, "stage1": [], "sweeps": []}
    if args.skip_tests:
        skipped.append("the tests marked gpu (--skip_tests)")
    else:
        res["gpu_tests"] = gpu_tests(out, timeout_s=240)
    if in_budget("Stage 1 float32"):
        res["stage1"].append(stage1(out, "float32", smoke, device, timeout_s=120 if smoke else 150))
    if smoke:
        if in_budget("bench/sweep.py smoke"):
            res["sweeps"].append(sweep_bench(out, "fp32", None, None, device, timeout_s=120))
    else:
        for precision in ("tf32", "bf16"):
            for d_in, ratio in SWEEP_SIZES:
                if in_budget(f"bench/sweep.py {precision} {d_in} x {d_in * ratio}"):
                    res["sweeps"].append(sweep_bench(out, precision, d_in, ratio, device, timeout_s=150))
        if in_budget("Stage 1 bfloat16"):                  # last: the targets come first
            res["stage1"].append(stage1(out, "bfloat16", smoke, device, timeout_s=120))
    res["targets"] = targets(res["sweeps"], smoke)
    res["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(res, indent=1))
    text = results_markdown(res)
    (out / "results.md").write_text(text)
    print("\n" + text + f"\nwritten: {out / 'results.md'}, {out / 'results.json'}")
    return res


if __name__ == "__main__":
    failed = failed_steps(main())
    if failed:
        print(f"[gpu_check] failed: {', '.join(failed)} (see the logs)", file=sys.stderr)
    raise SystemExit(1 if failed else 0)
