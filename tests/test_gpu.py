"""On a CUDA GPU (skipped without one; run with `pytest -m gpu`, or bench/gpu_check.sh): tiny L1 and TopK sweeps
saving after every chunk under tf32 and bf16, a sweep killed and resumed on the GPU, a GPU checkpoint resumed on
the CPU, and the device memory of saving and evaluating against that of a training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.ensemble
import training.sweep as sweep_mod
from bench.top_activations import write_synthetic_folder
from training import load_sweep
from training.cli import run_cli
from training.sweep import SweepConfig, run_sweep

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (these are the gpu tests)")]

D = 64


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory) -> Path:
    """A synthetic Stage 1 folder: 6 chunks of 2048 rows, d 64."""
    return write_synthetic_folder(tmp_path_factory.mktemp("gpu-data"), n_rows=6 * 2048, d=D, model="synthetic",
                                  vocab_size=100, chunk_size=2048)


def sweep_argv(hook_dir: Path, out: Path, *extra: str) -> list[str]:
    """Flags of a small GPU sweep saving after every chunk (2 repetitions of 6 chunks, batch 256)."""
    return ["--dataset_dir", str(hook_dir), "--output_dir", str(out), "--ratio", "4", "--batch_size", "256",
            "--n_repetitions", "2", "--save_after_every", "--log_every", "4", "--center_init", "mean",
            "--holdout_rows", "1024", *extra]


def sweep(argv: list[str]) -> object:
    """Run basic_l1_sweep.py's entry point with these flags."""
    return run_cli(run_sweep, "", SweepConfig, argv)


def kill_after(monkeypatch, steps: int) -> None:
    """Make the ensemble raise KeyboardInterrupt (as Ctrl-C does) at its `steps`+1-th training step."""
    real, seen = training.ensemble.Ensemble.step, {"n": 0}

    def dying(self, *args, **kwargs):
        seen["n"] += 1
        if seen["n"] > steps:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)
    monkeypatch.setattr(training.ensemble.Ensemble, "step", dying)


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The saved sweep's tensors."""
    return load_file(str(out / "sweep.safetensors"))


ARCHS = {"l1": ["--l1_values", "0.01", "0.1", "1.0"], "topk": ["--architecture", "topk", "--k_values", "4", "8"]}


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_tiny_sweeps_train_and_save_on_the_gpu(hook_dir, tmp_path, arch, precision):
    result = sweep(sweep_argv(hook_dir, tmp_path / "o", "--device", "cuda", "--precision", precision, *ARCHS[arch]))
    assert (tmp_path / "o" / "checkpoint.json").exists() or (tmp_path / "o" / "sweep.json").exists()
    saes = load_sweep(tmp_path / "o")
    assert len(saes) == len(result.keys)
    x = torch.randn(32, D)
    for sae in saes.values():
        assert all(torch.isfinite(p).all() for p in sae.parameters())
        assert sae(x).shape == x.shape
    assert not any(m["frozen"] for m in result.metrics)
    assert max(m["explained_variance"] for m in result.metrics) > 0.05


@pytest.mark.parametrize("arch", list(ARCHS))
def test_killed_and_resumed_on_the_gpu(hook_dir, tmp_path, monkeypatch, arch):
    argv = ["--device", "cuda", "--precision", "tf32", *ARCHS[arch]]
    sweep(sweep_argv(hook_dir, tmp_path / "whole", *argv))
    kill_after(monkeypatch, 60)                        # in the second repetition (44 steps per repetition)
    with pytest.raises(SystemExit):                    # the CLI turns Ctrl-C into exit 130
        sweep(sweep_argv(hook_dir, tmp_path / "killed", *argv))
    assert (tmp_path / "killed" / "checkpoint.json").exists()
    monkeypatch.undo()
    sweep(sweep_argv(hook_dir, tmp_path / "killed", *argv, "--resume"))
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=f"{arch} {k}: resumed on the GPU differs from the uninterrupted run")


def test_gpu_checkpoint_resumes_on_the_cpu(hook_dir, tmp_path, monkeypatch):
    argv = ["--precision", "fp32", *ARCHS["l1"]]
    sweep(sweep_argv(hook_dir, tmp_path / "whole", "--device", "cuda", *argv))
    kill_after(monkeypatch, 60)
    with pytest.raises(SystemExit):
        sweep(sweep_argv(hook_dir, tmp_path / "killed", "--device", "cuda", *argv))
    monkeypatch.undo()
    sweep(sweep_argv(hook_dir, tmp_path / "killed", "--device", "cpu", *argv, "--resume"))
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:                                        # other kernels after the resume: close, not bit for bit
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-3)


def test_save_and_evaluation_stay_within_the_training_step_memory(tmp_path_factory, monkeypatch):
    """Peak device memory of every save and of the final evaluation stays within 5% of a training step's."""
    hook = write_synthetic_folder(tmp_path_factory.mktemp("gpu-mem"), n_rows=4 * 8192, d=256, model="synthetic",
                                  vocab_size=100, chunk_size=8192)
    device = torch.device("cuda")
    peaks: dict[str, list[int]] = {"step": [], "save": [], "evaluate": []}

    def measured(name: str, fn):
        def wrapper(*args, **kwargs):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = fn(*args, **kwargs)
            torch.cuda.synchronize(device)
            peaks[name].append(torch.cuda.max_memory_allocated(device))
            return out
        return wrapper
    monkeypatch.setattr(training.ensemble.Ensemble, "step", measured("step", training.ensemble.Ensemble.step))
    monkeypatch.setattr(sweep_mod, "save_sweep", measured("save", sweep_mod.save_sweep))
    monkeypatch.setattr(sweep_mod, "evaluate", measured("evaluate", sweep_mod.evaluate))
    sweep(["--dataset_dir", str(hook), "--output_dir", str(tmp_path_factory.mktemp("gpu-mem-out")), "--ratio", "32",
           "--l1_values", "0.01", "0.03", "0.1", "0.3", "--batch_size", "2048", "--save_after_every",
           "--holdout_rows", "4096", "--device", "cuda", "--precision", "tf32", "--log_every", "100"])
    step = max(peaks["step"])
    assert peaks["save"] and peaks["evaluate"], peaks
    assert max(peaks["save"]) <= 1.05 * step, f"a save peaked at {max(peaks['save']) / 2**20:.0f} MiB, a step at " \
                                              f"{step / 2**20:.0f} MiB"
    assert max(peaks["evaluate"]) <= 1.05 * step, f"the evaluation peaked at {max(peaks['evaluate']) / 2**20:.0f} " \
                                                  f"MiB, a step at {step / 2**20:.0f} MiB"
