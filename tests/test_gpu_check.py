"""bench/gpu_check.sh cannot rot unseen: on this CPU machine it runs its CPU-safe parts at the smoke size (install
skipped) and writes results.md / results.json saying what it skipped; the targets and the report by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import junit_counts, results_markdown, targets

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "bench" / "gpu_check.sh"


def fake_venv(folder: Path) -> Path:
    """A folder whose bin/python runs this test's interpreter (so the script needs no install)."""
    (folder / "bin").mkdir(parents=True)
    py = folder / "bin" / "python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
    return folder


def test_script_runs_its_cpu_safe_parts(tmp_path):
    env = {**os.environ, "GPU_CHECK_SKIP_INSTALL": "1", "VENV": str(fake_venv(tmp_path / "venv")),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = tmp_path / "out"
    proc = subprocess.run([str(SCRIPT), str(out), "--skip_tests"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "results.md").read_text()
    assert md in proc.stdout                                            # the summary is printed
    assert "mode: smoke" in md and "no CUDA GPU here" in md and "(--skip_tests)" in md
    res = json.loads((out / "results.json").read_text())
    (s1,) = res["stage1"]
    assert s1["status"] == "ok" and s1["figures"]["full_tokens_per_s"] > 0 and s1["figures"]["bare_tokens_per_s"] > 0
    assert s1["figures"]["peak_memory"]["kind"] == "host RSS"
    assert s1["figures"]["hooks"] == ["blocks.2.hook_resid_post", "blocks.2.mlp.hook_post",
                                      "blocks.3.hook_resid_post", "blocks.3.mlp.hook_post"]
    (sw,) = res["sweeps"]
    (row,) = sw["rows"]
    assert sw["status"] == "ok" and row["ensemble_tokens_per_s_per_member"] > 0 and row["ensemble_over_sequential"] > 0
    assert 0 < row["ensemble_mfu"] and row["peak_source"].startswith("matmul rate measured")   # no datasheet: a CPU
    assert [t["met"] for t in res["targets"]] == [None, None, None]
    assert (out / "logs" / "stage1_float32.log").exists()


def test_script_usage():
    proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: bench/gpu_check.sh OUT_DIR")


def row(d_in: int, d_hidden: int, mfu: float, ratio: float) -> dict:
    """A bench/sweep.py summary row with the figures the targets read."""
    mem = {"peak_mib": 1024.0, "peak_kind": "device"}
    return {"d_in": d_in, "d_hidden": d_hidden, "n_models": 8, "ensemble_tokens_per_s_per_member": 1e6,
            "sequential_tokens_per_s_per_member": 1e6 / ratio, "ensemble_over_sequential": ratio,
            "ensemble_mfu": mfu, "sequential_mfu": mfu / ratio, "peak_source": "datasheet H100/H200 SXM",
            "memory": {"ensemble": mem, "sequential": mem}}


def test_targets_and_report_by_hand():
    sweeps = [{"name": "a", "status": "ok", "precision": "tf32", "rows": [row(512, 4096, 0.2, 3.5)]},
              {"name": "b", "status": "ok", "precision": "bf16", "rows": [row(512, 4096, 0.1, 2.0)]},
              {"name": "c", "status": "ok", "precision": "bf16", "rows": [row(2048, 32768, 0.55, 6.0)]}]
    checks = targets(sweeps, smoke=False)
    assert [c["met"] for c in checks] == [True, True, False]
    assert checks[0]["measured"] == "55.0%" and checks[2]["measured"] == "2.00x"
    assert [c["met"] for c in targets(sweeps, smoke=True)] == [None, None, None]
    assert targets([], smoke=False)[0] == {"target": "bf16 ensemble at 2048 x 32768: MFU >= 50%", "measured": None,
                                           "met": None}
    res = {"date": "d", "machine": {"cuda_available": True, "gpu": "NVIDIA H200", "gpu_memory_gib": 139.8,
                                    "capability": "9.0", "torch": "2.13.0", "cuda_build": "12.8", "python": "3.11"},
           "mode": "full", "smoke": False, "seconds": 300.0, "skipped": [], "stage1": [],
           "gpu_tests": {"status": "ok", "passed": 8, "failures": 0, "errors": 0, "skipped": 0, "log": "logs/x"},
           "sweeps": sweeps, "targets": checks}
    md = results_markdown(res)
    assert "NVIDIA H200 (139.8 GiB" in md and "ok: 8 passed, 0 failed, 0 skipped" in md
    assert "| bf16 | 2048 x 32768 | 8 | 1,000,000 | 166,667 | 6.00 | 55.0% | 9.2% |" in md
    assert "- bf16 ensemble at 512 x 4096: >= 3x the 8 members one after another: NOT met (measured 2.00x)" in md


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="0" failures="1" skipped="2" '
                   'tests="8"></testsuite></testsuites>')
    assert junit_counts(xml) == {"tests": 8, "failures": 1, "errors": 0, "skipped": 2}
    assert junit_counts(tmp_path / "missing.xml") == {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}


def test_full_plan_on_a_gpu(tmp_path, monkeypatch):
    """With CUDA (faked), the driver runs the issue's sizes and precisions and checks the targets from them."""
    import bench.gpu_check as gc
    calls: list[tuple] = []
    fake_rows = {(512, 8): row(512, 4096, 0.3, 4.0), (2048, 16): row(2048, 32768, 0.6, 7.0)}
    monkeypatch.setattr(gc, "machine", lambda: {"cuda_available": True, "gpu": "NVIDIA H200", "gpu_memory_gib": 139.8,
                                                "capability": "9.0", "torch": "t", "cuda_build": "12", "python": "3"})
    monkeypatch.setattr(gc, "gpu_tests", lambda out, timeout_s: {
        "name": "gpu_tests", "status": "ok", "passed": 8, "failures": 0, "errors": 0, "skipped": 0, "log": "l"})
    monkeypatch.setattr(gc, "stage1", lambda out, dtype, smoke, device, timeout_s: calls.append(
        ("stage1", dtype, smoke, device)) or {"name": "s", "status": "ok", "dtype": dtype, "figures": None})
    monkeypatch.setattr(gc, "sweep_bench", lambda out, precision, d_in, ratio, device, timeout_s: calls.append(
        ("sweep", precision, d_in, ratio, device)) or {"name": "w", "status": "ok", "precision": precision,
                                                        "rows": [fake_rows[(d_in, ratio)]]})
    res = gc.main([str(tmp_path)])
    assert calls == [("stage1", "float32", False, "cuda"), ("sweep", "tf32", 512, 8, "cuda"),
                     ("sweep", "tf32", 2048, 16, "cuda"), ("sweep", "bf16", 512, 8, "cuda"),
                     ("sweep", "bf16", 2048, 16, "cuda"), ("stage1", "bfloat16", False, "cuda")]
    assert res["mode"] == "full" and res["skipped"] == [] and gc.failed_steps(res) == []
    assert [t["met"] for t in res["targets"]] == [True, True, True]
    assert "- bf16 ensemble at 2048 x 32768: MFU >= 50%: met (measured 60.0%)" in (tmp_path / "results.md").read_text()
    calls.clear()
    res = gc.main([str(tmp_path), "--budget_s", "0"])                 # out of time: nothing starts, and it says so
    assert calls == [] and sum("past the 0 s budget" in s for s in res["skipped"]) == 6
