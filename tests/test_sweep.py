"""Stage 2 end to end: the CLI on chunks written by Stage 1, outputs, resume, errors, and a learning check."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.sweep as sweep_mod
from training import load_sweep
from bench.top_activations import write_synthetic_folder
from conftest import sweep_killed_at_chunk
from training.chunks import atomic_write_json
from training.cli import UserError, run_cli
from training.generate import GenerateConfig, generate
from training.sweep import SweepConfig, lr_scale, l1_scale, run_sweep
from training.sweep_config import l1_values
from training.sweep_files import checkpoint_files, checkpoint_weights

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="session")
def chunk_root(tiny_neox_dir, tmp_path_factory) -> Path:
    """A Stage 1 dataset folder (tiny GPT-NeoX, two hooks, 4 chunks of 1000 rows)."""
    from conftest import fixture_documents
    text = tmp_path_factory.mktemp("sweep-text") / "docs.txt"
    text.write_text("\n\n".join(fixture_documents(600)))
    root = tmp_path_factory.mktemp("sweep-chunks")
    generate(GenerateConfig(model=str(tiny_neox_dir), dataset=str(text), dataset_folder=str(root), layers=[0, 1],
                            n_chunks=4, chunk_size=1000, context_length=32, device="cpu"), argv=["x"])
    return root


def cfg_for(root: Path, out: Path, **kw) -> SweepConfig:
    """A small, fast sweep config."""
    base = dict(dataset_dir=str(root / HOOK), output_dir=str(out), ratio=2, l1_value_min=-3, l1_value_max=-1,
                l1_value_n=3, batch_size=250, log_every=2, device="cpu", center_init="mean", holdout_rows=0)
    base.update(kw)
    return SweepConfig(**base)


def test_schedules():
    cfg = SweepConfig(lr_warmup_fraction=0.1, lr_decay_fraction=0.2, l1_warmup_fraction=0.5)
    assert lr_scale(0, 100, cfg) == pytest.approx(0.1) and lr_scale(9, 100, cfg) == 1.0
    assert lr_scale(50, 100, cfg) == 1.0 and lr_scale(90, 100, cfg) == pytest.approx(0.5) and lr_scale(99, 100, cfg) == pytest.approx(0.05)
    assert l1_scale(0, 100, cfg) == pytest.approx(0.02) and l1_scale(49, 100, cfg) == 1.0
    assert l1_values(SweepConfig(l1_value_min=-4, l1_value_max=-2, l1_value_n=3)) == [1e-4, 1e-3, 1e-2]
    assert l1_values(SweepConfig(l1_values=[0.5, 2.0])) == [0.5, 2.0]


@pytest.mark.parametrize("architecture", ["l1", "topk"])
def test_raw_space_params_fold_the_input_scale_and_decoder_norms(architecture):
    from training.dictionary import SparseLinearAutoencoder, TopKAutoencoder
    from training.sweep import raw_space_params

    def make():
        return SparseLinearAutoencoder(6, 10) if architecture == "l1" else TopKAutoencoder(6, 10, k=3)
    torch.manual_seed(0)
    trained = make()
    with torch.no_grad():
        trained.center.normal_()
        trained.encoder_bias.normal_()
        trained.decoder.mul_(torch.linspace(0.05, 3.0, 10).unsqueeze(-1))   # free rows of different norms
    norms = trained.decoder.norm(dim=-1).detach()
    scale = 2.5
    raw = make()
    raw.load_state_dict(raw_space_params(dict(trained.named_parameters()), scale))
    x = torch.randn(7, 6)
    assert torch.allclose(raw.encode(x), trained.encode(scale * x) * norms / scale, atol=1e-6)
    assert torch.allclose(raw(x), trained(scale * x) / scale, atol=1e-6)
    assert torch.allclose(raw.decoder.norm(dim=-1), torch.ones(10))
    assert torch.allclose(raw.decoder * norms.unsqueeze(-1), trained.decoder, atol=1e-6)


def test_cli_end_to_end_and_load(chunk_root, tmp_path, capsys):
    out = tmp_path / "out"
    run_cli(lambda c: print(run_sweep(c)), "", SweepConfig,
            ["--dataset_dir", str(chunk_root / HOOK), "--output_dir", str(out), "--ratio", "2", "--l1_value_min", "-2",
             "--l1_value_max", "0", "--l1_value_n", "3", "--batch_size", "250", "--n_repetitions", "2",
             "--log_every", "4", "--device", "cpu"])
    printed = capsys.readouterr().out
    # 4 chunks of 1000 rows, the last 500 held out: 4 + 4 + 4 + 2 batches of 250 per repetition
    assert "trained 3 dictionaries for 28 steps" in printed and "expl. var" in printed
    assert "scored on 500 held-out rows" in printed and "tokens/s per member" in printed
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["finished"] and meta["keys"] == [0.01, 0.1, 1.0] and meta["d_hidden"] == 64 and meta["hook"] == HOOK
    assert meta["source_manifest"]["config"]["chunk_size"] == 1000
    assert {"l0", "explained_variance", "mse", "dead_fraction"} <= set(meta["members"][0])
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [s for s in range(4, 29, 4) for _ in range(3)]
    assert {"loss", "mse", "explained_variance", "l0", "dead_fraction", "l1"} <= set(lines[0])
    saes = load_sweep(out)
    assert list(saes) == [0.01, 0.1, 1.0]
    stacked = load_file(str(out / "sweep.safetensors"))
    assert torch.equal(saes[0.1].decoder, stacked["decoder"][1])
    acts = torch.randn(5, 32)
    codes = saes[0.01].encode(acts)
    assert codes.shape == (5, 64) and (codes >= 0).all()
    assert torch.allclose(saes[0.01].decode(codes), saes[0.01](acts))
    assert torch.allclose(saes[0.01].decoder.norm(dim=1), torch.ones(64), atol=1e-5)
    # larger penalties give sparser codes
    l0 = [m["l0"] for m in meta["members"]]
    assert l0[0] > l0[-1]


def test_dataset_root_with_one_hook_and_topk(chunk_root, tmp_path):
    root = tmp_path / "one"
    shutil.copytree(chunk_root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["hooks"]["blocks.0.hook_resid_post"]
    atomic_write_json(root / "manifest.json", manifest)
    result = run_sweep(SweepConfig(dataset_dir=str(root), output_dir=str(tmp_path / "o"), architecture="topk",
                                   k_values=[2, 8], ratio=2, batch_size=250, device="cpu", log_every=4))
    saes = load_sweep(tmp_path / "o")
    assert list(saes) == [2, 8] and result.metrics[0]["l0"] <= 2 and result.metrics[1]["l0"] <= 8
    assert (saes[2].encode(torch.randn(4, 32)) != 0).sum(1).max() <= 2


def test_resume_reaches_the_uninterrupted_result(chunk_root, tmp_path, monkeypatch):
    run_sweep(cfg_for(chunk_root, tmp_path / "whole", n_repetitions=2, save_after_every=True))
    with sweep_killed_at_chunk(6):  # killed while training on the second chunk of the second repetition
        run_sweep(cfg_for(chunk_root, tmp_path / "killed", n_repetitions=2, save_after_every=True))
    assert json.loads((tmp_path / "killed" / "checkpoint.json").read_text())["progress"]["step"] == 20
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 22, "tok')                                     # a kill in the middle of an append
    run_sweep(cfg_for(chunk_root, tmp_path / "killed", n_repetitions=2, save_after_every=True, resume=True))
    a, b = load_file(str(tmp_path / "whole" / "sweep.safetensors")), load_file(str(tmp_path / "killed" / "sweep.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("kw, message", [
    (dict(l1_value_min=-1, l1_value_max=-3), "--l1_value_min -1 is above --l1_value_max -3"),
    (dict(batch_size=5000), r"--batch_size 5000 is larger than a chunk \(1000 rows\)"),
    (dict(device="cuda"), "no usable GPU"),
    (dict(device="mps"), r"--device mps: the sweep cannot train on MPS \(it has no float64"),
    (dict(device="mps:0"), "--device mps:0: the sweep cannot train on MPS"),
    (dict(device="gpu"), "unknown device 'gpu': use cpu, cuda or cuda:N$"),
    (dict(precision="tf32"), "--precision tf32 needs a CUDA device"),
    (dict(resume=True), "no checkpoint.json"),
    (dict(adam_lr=-1.0), r"--adam_lr must be positive \(got -1.0\)"),
    (dict(adam_lr=float("nan")), r"--adam_lr must be positive \(got nan\)"),
    (dict(adam_lr=float("inf")), r"--adam_lr must be positive \(got inf\)"),
    (dict(adam_lr=0.0), r"--adam_lr must be positive \(got 0.0\)"),
    (dict(l1_values=[0.1, float("nan")]), r"--l1_values must be finite and not negative \(got nan\)"),
    (dict(l1_values=[-0.1]), r"--l1_values must be finite and not negative \(got -0.1\)"),
    (dict(l1_values=[float("inf")]), r"--l1_values must be finite and not negative \(got inf\)"),
    (dict(l1_value_min=float("nan")), r"--l1_value_min must be a finite number"),
    (dict(l1_value_n=0), r"--l1_value_n must be at least 1 \(got 0\)"),
    (dict(architecture="topk", k_values=[0]), r"--k_values must be at least 1 each \(got 0\)"),
    (dict(architecture="topk", k_values=[4, -2]), r"--k_values must be at least 1 each \(got -2\)"),
    (dict(architecture="topk", k_values=[65]), "--k_values 65 exceeds the dictionary size 64"),
    (dict(architecture="topk", tied=True), "--tied applies to the l1 architecture only"),
    (dict(architecture="relu"), "unknown --architecture 'relu'"),
    (dict(batch_size=0), r"--batch_size must be at least 1 \(got 0\)"),
    (dict(batch_size=-5), r"--batch_size must be at least 1 \(got -5\)"),
    (dict(n_repetitions=0), r"--n_repetitions must be at least 1"),
    (dict(log_every=0), r"--log_every must be at least 1"),
    (dict(dead_window_tokens=0), r"--dead_window_tokens must be at least 1"),
    (dict(resample_every=-1), r"--resample_every must be 0 or more"),
    (dict(holdout_rows=-1), r"--holdout_rows must be 0 or more"),
    (dict(max_tokens=0), r"--max_tokens must be at least 1"),
    (dict(max_tokens=100), "no full batch of 250 rows to train on"),
    (dict(lr_warmup_fraction=1.5), r"--lr_warmup_fraction must be a fraction between 0 and 1 \(got 1.5\)"),
    (dict(lr_decay_fraction=-0.1), r"--lr_decay_fraction must be a fraction between 0 and 1"),
    (dict(l1_warmup_fraction=float("nan")), r"--l1_warmup_fraction must be a fraction between 0 and 1 \(got nan\)"),
    (dict(activation_norm=-1.0), r"--activation_norm must be 0 \(off\) or positive \(got -1.0\)"),
    (dict(activation_norm=float("nan")), r"--activation_norm must be 0 \(off\) or positive \(got nan\)"),
    (dict(grad_clip=float("nan")), r"--grad_clip must be 0 \(off\) or positive \(got nan\)"),
    (dict(grad_clip=-0.5), r"--grad_clip must be 0 \(off\) or positive"),
    (dict(ratio=0.0), r"--ratio must be positive \(got 0.0\)"),
    (dict(ratio=float("inf")), r"--ratio must be positive \(got inf\)"),
    (dict(decoder_init_norm=0.0), r"--decoder_init_norm must be positive"),
    (dict(decoder_init_norm=float("nan")), r"--decoder_init_norm must be positive"),
])
def test_bad_input_gets_one_line_error(chunk_root, tmp_path, kw, message):
    if kw.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so --device cuda is valid")
    with pytest.raises(UserError, match=message) as info:
        run_sweep(cfg_for(chunk_root, tmp_path / "o", **kw))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()            # nothing written before the flags are known good


def test_flag_errors_from_the_command_line_leave_no_folder(chunk_root, tmp_path, capsys):
    from training.sweep import main_sweep
    base = ["--dataset_dir", str(chunk_root / HOOK), "--device", "cpu", "--batch_size", "250"]
    cases = [(["--adam_lr", "-1"], "error: --adam_lr must be positive (got -1.0)"),
             (["--adam_lr", "nan"], "error: --adam_lr must be positive (got nan)"),
             (["--l1_values", "nan"], "error: --l1_values must be finite and not negative (got nan)"),
             (["--architecture", "topk", "--k_values", "0"], "error: --k_values must be at least 1 each (got 0)"),
             (["--batch_size", "0"], "error: --batch_size must be at least 1 (got 0)")]
    for dry_run in ([], ["--dry_run"]):
        for flags, message in cases:
            out = tmp_path / "deep" / "o"
            with pytest.raises(SystemExit) as info:
                run_cli(lambda c: print(main_sweep(c)), "", SweepConfig, base + ["--output_dir", str(out)] + flags + dry_run)
            assert info.value.code == 2 and capsys.readouterr().err.strip() == message
            assert not (tmp_path / "deep").exists()


def test_output_dir_that_is_a_file_and_missing_dataset_dir(chunk_root, tmp_path):
    from training.sweep import sweep_memory_report
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        for run in (run_sweep, sweep_memory_report):
            with pytest.raises(UserError, match=f"--output_dir {out}: {tmp_path / 'f'} is a file, not a folder"):
                run(cfg_for(chunk_root, out))
    assert (tmp_path / "f").read_text() == "x"
    with pytest.raises(UserError, match=f"--dataset_dir {tmp_path / 'none'} does not exist: run generate_test_data"):
        run_sweep(SweepConfig(dataset_dir=str(tmp_path / "none"), output_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_bad_dataset_folders(chunk_root, tmp_path):
    with pytest.raises(UserError, match="does not exist: run generate_test_data.py first"):
        run_sweep(cfg_for(tmp_path / "missing", tmp_path / "o"))
    (tmp_path / "nomanifest" / HOOK).mkdir(parents=True)
    (tmp_path / "nomanifest" / HOOK / "0.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no manifest.json"):
        run_sweep(cfg_for(tmp_path / "nomanifest", tmp_path / "o"))
    (tmp_path / "bare").mkdir()
    with pytest.raises(UserError, match="is empty"):
        run_sweep(SweepConfig(dataset_dir=str(tmp_path / "bare"), output_dir=str(tmp_path / "o")))
    with pytest.raises(UserError, match=f"several hooks; name one folder: .*blocks.0.hook_resid_post, .*{HOOK}"):
        run_sweep(SweepConfig(dataset_dir=str(chunk_root), output_dir=str(tmp_path / "o"), device="cpu"))


def test_existing_output_and_changed_resume_flags(chunk_root, tmp_path):
    run_sweep(cfg_for(chunk_root, tmp_path / "o", max_tokens=1000))
    with pytest.raises(UserError, match="already holds a sweep: pass --resume"):
        run_sweep(cfg_for(chunk_root, tmp_path / "o"))
    with pytest.raises(UserError, match=r"--resume with different flags \(--ratio: run has 2, asked 4\)"):
        run_sweep(cfg_for(chunk_root, tmp_path / "o", max_tokens=1000, ratio=4, resume=True))
    run_sweep(cfg_for(chunk_root, tmp_path / "o", overwrite=True, max_tokens=500))
    assert json.loads((tmp_path / "o" / "sweep.json").read_text())["progress"]["tokens"] == 500


def test_corrupt_chunk_is_named(chunk_root, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(chunk_root, root)
    path = root / HOOK / "2.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x55
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"chunk .*2\.safetensors does not match the checksum"):
        run_sweep(cfg_for(root, tmp_path / "o"))


def test_wandb_missing_is_a_clear_error(chunk_root, tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError()) if name == "wandb" else real_import(name, *a, **k))
    with pytest.raises(UserError, match="--wandb_project needs wandb"):
        run_sweep(cfg_for(chunk_root, tmp_path / "o", wandb_project="x"))


def test_sweep_recovers_known_sparse_features(tmp_path):
    from training.metrics import cosine_matrix
    from training.toy import ToyConfig, make_features, make_generator, sample_batch
    toy = ToyConfig(n_features=48, d=24, avg_active=3, decay=0.99, seed=0)
    features = make_features(toy)
    acts, _ = sample_batch(toy, features, 48000, make_generator(toy))
    write_synthetic_folder(tmp_path / "toy", len(acts), toy.d, model="none", vocab_size=2, chunk_size=12000,
                           hook="synthetic", acts=acts)
    run_sweep(SweepConfig(dataset_dir=str(tmp_path / "toy"), output_dir=str(tmp_path / "o"), ratio=4,
                          l1_values=[0.02, 0.4, 6.0], batch_size=256, n_repetitions=8, adam_lr=1e-2, device="cpu",
                          center_init="zero", log_every=100))
    saes = load_sweep(tmp_path / "o")
    matched = {l1: (cosine_matrix(features, sae.decoder.detach()).amax(1) > 0.9).float().mean().item()
               for l1, sae in saes.items()}
    assert matched[0.4] > 0.9, matched
    assert matched[0.02] < matched[0.4] and matched[6.0] < matched[0.4]


def test_bf16_autocast_trains(chunk_root, tmp_path):
    result = run_sweep(cfg_for(chunk_root, tmp_path / "o", precision="bf16", max_tokens=2000))
    assert result.progress.step == 8 and all(torch.isfinite(torch.tensor(m["explained_variance"])) for m in result.metrics)
    assert load_sweep(tmp_path / "o")[1e-3].decoder.dtype == torch.float32


def test_dry_run_prints_the_estimate_and_trains_nothing(chunk_root, tmp_path, capsys):
    from training.memory import estimate_sweep, format_bytes
    from training.sweep import main_sweep
    out = tmp_path / "o"
    run_cli(lambda c: print(main_sweep(c)), "", SweepConfig,
            ["--dataset_dir", str(chunk_root / HOOK), "--output_dir", str(out), "--ratio", "2", "--l1_value_n", "3",
             "--batch_size", "250", "--device", "cpu", "--dry_run"])
    printed = capsys.readouterr().out
    est = estimate_sweep("l1", 3, 250, 32, 64)
    assert "3 l1 members x d_in 32 x d_hidden 64, batch 250, fp32 on cpu" in printed
    for part in (est.params, est.optimizer, est.workspace, est.peak):
        assert format_bytes(part) in printed
    assert re.search(r"available .* GiB   \(.+\): (fits|does NOT fit)", printed)
    assert not out.exists()
    run_cli(lambda c: print(main_sweep(c)), "", SweepConfig,
            ["--dataset_dir", str(chunk_root / HOOK), "--output_dir", str(out), "--ratio", "1e7", "--batch_size", "250",
             "--device", "cpu", "--dry_run"])
    assert "does NOT fit: lower --batch_size, --ratio or the members" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_cli(lambda c: print(main_sweep(c)), "", SweepConfig,
                ["--dataset_dir", str(chunk_root / HOOK), "--ratio", "-1", "--dry_run", "--device", "cpu"])
    assert capsys.readouterr().err.strip() == "error: --ratio must be positive (got -1.0)"


def test_dry_run_of_several_hooks_counts_every_hooks_state_and_one_hooks_step_buffers(tmp_path, capsys):
    from bench.multi_hook import write_multi_hook_folder
    from training.memory import estimate_sweep, format_bytes
    from training.sweep import main_sweep
    root = write_multi_hook_folder(tmp_path / "data", ["a", "b", "c"], 2000, 16, 1000)
    out = tmp_path / "o"
    run_cli(lambda c: print(main_sweep(c)), "", SweepConfig,
            ["--dataset_dir", str(root), "--hooks", "a", "c", "--output_dir", str(out), "--ratio", "4",
             "--l1_value_n", "3", "--batch_size", "250", "--device", "cpu", "--dry_run"])
    printed = capsys.readouterr().out
    one = estimate_sweep("l1", 3, 250, 16, 64)
    assert "dry run: 2 hooks, batch 250, fp32 on cpu" in printed
    assert printed.count("l1 members x d_in 16 x d_hidden 64") == 2 and "  a: 3" in printed and "  c: 3" in printed
    assert f"parameters          {format_bytes(2 * one.params)}" in printed
    assert f"optimizer           {format_bytes(2 * one.optimizer)}" in printed
    assert f"step workspace      {format_bytes(one.workspace)}" in printed
    assert f"peak (estimate)     {format_bytes(2 * (one.params + one.optimizer) + one.workspace + one.transient)}" \
        in printed
    assert not out.exists()


def test_resampling_resume_on_another_device_string_equals_the_uninterrupted_run(chunk_root, tmp_path, monkeypatch):
    kw = dict(n_repetitions=2, save_after_every=True, resample_every=3, dead_window_tokens=500,
              l1_value_min=-1, l1_value_max=0.5)
    run_sweep(cfg_for(chunk_root, tmp_path / "whole", **kw))
    run_sweep(cfg_for(chunk_root, tmp_path / "never", **{**kw, "resample_every": 0}))
    with sweep_killed_at_chunk(6):
        run_sweep(cfg_for(chunk_root, tmp_path / "killed", **kw))
    checkpoint = load_file(str(checkpoint_weights(tmp_path / "killed")))
    assert not [k for k in checkpoint if k.startswith("rng")]          # nothing device-specific is stored
    run_sweep(cfg_for(chunk_root, tmp_path / "killed", **kw, device="cpu:0", resume=True))
    a, b = (load_file(str(tmp_path / name / "sweep.safetensors")) for name in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    never = load_file(str(tmp_path / "never" / "sweep.safetensors"))
    assert not torch.equal(a["decoder"], never["decoder"])                 # resampling did happen
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()


def test_a_crash_in_the_final_evaluation_loses_nothing(chunk_root, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(sweep_mod, "evaluate", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_sweep(cfg_for(chunk_root, tmp_path / "o", max_tokens=1000))       # 4 steps, no save on the way
    assert json.loads((tmp_path / "o" / "checkpoint.json").read_text())["progress"]["step"] == 4
    assert not json.loads((tmp_path / "o" / "sweep.json").read_text())["finished"]
    trained = load_file(str(tmp_path / "o" / "sweep.safetensors"))
    monkeypatch.undo()
    resumed = run_sweep(cfg_for(chunk_root, tmp_path / "o", max_tokens=1000, resume=True))
    whole = run_sweep(cfg_for(chunk_root, tmp_path / "whole", max_tokens=1000))
    assert resumed.progress.step == 4 and resumed.metrics == whole.metrics
    final = load_file(str(tmp_path / "o" / "sweep.safetensors"))
    assert all(torch.equal(trained[k], final[k]) for k in trained)
    assert json.loads((tmp_path / "o" / "sweep.json").read_text())["finished"]


def test_a_checkpoint_with_an_older_versions_generator_state_resumes(chunk_root, tmp_path, monkeypatch):
    from training.chunks import save_tensors
    monkeypatch.setattr(sweep_mod, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg_for(chunk_root, tmp_path / "o", max_tokens=1000))
    out = tmp_path / "o"
    saved, path = json.loads((out / "checkpoint.json").read_text()), checkpoint_weights(out)
    # the layout of an older version: checkpoint.safetensors (with a generator state) beside config and progress
    save_tensors(out / "checkpoint.safetensors", {**load_file(str(path)), "rng.resample": torch.Generator().get_state()})
    path.unlink()
    atomic_write_json(out / "checkpoint.json", {"config": saved["config"], "progress": saved["progress"]})
    monkeypatch.undo()
    assert run_sweep(cfg_for(chunk_root, tmp_path / "o", max_tokens=1000, resume=True)).progress.step == 4


def test_precision_defaults_to_tf32_on_cuda_and_the_switches_are_restored(chunk_root, tmp_path, monkeypatch):
    from training.precision import backend_flags, restore_backend_flags, resolve_precision, setup_precision

    def legacy() -> tuple:
        return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32)
    assert resolve_precision(None, torch.device("cuda")) == "tf32"
    assert resolve_precision(None, torch.device("cpu")) == "fp32" and resolve_precision("bf16", torch.device("cpu")) == "bf16"
    initial = backend_flags()
    before = legacy()
    assert before[1] is False, "a test left TF32 on"
    try:
        with setup_precision(SweepConfig(), torch.device("cuda")):
            assert legacy() == ("high", True, True)
        assert legacy() == before
        with pytest.raises(KeyboardInterrupt), setup_precision(SweepConfig(precision="fp32"), torch.device("cuda")):
            assert legacy() == ("highest", False, False)
            raise KeyboardInterrupt
        assert legacy() == before
        for setting in ("medium", "high"):                       # a notebook's own setting survives
            torch.set_float32_matmul_precision(setting)
            mine = legacy()
            with setup_precision(SweepConfig(precision="fp32"), torch.device("cuda")):
                assert legacy() == ("highest", False, False)
            assert legacy() == mine
        restore_backend_flags(initial)
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # ... also one set with the newer API
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            mine = backend_flags()
            with setup_precision(SweepConfig(precision="fp32"), torch.device("cuda")):
                assert legacy() == ("highest", False, False)
            assert backend_flags() == mine
            restore_backend_flags(initial)
        assert legacy() == before

        run_sweep(cfg_for(chunk_root, tmp_path / "cpu", max_tokens=500))
        assert json.loads((tmp_path / "cpu" / "sweep.json").read_text())["config"]["precision"] == "fp32"
        assert legacy() == before
        run_sweep(cfg_for(chunk_root, tmp_path / "cpu", max_tokens=500, precision="bf16", resume=True))  # on a GPU
        assert json.loads((tmp_path / "cpu" / "sweep.json").read_text())["config"]["precision"] == "bf16"

        def die(*args, **kwargs):
            assert legacy() == ("high", True, True)              # the run on "cuda" did switch TF32 on
            raise RuntimeError("out of memory")
        monkeypatch.setattr(sweep_mod, "resolve_device", lambda _: torch.device("cuda"))
        monkeypatch.setattr(sweep_mod, "prepare_output", die)
        with pytest.raises(RuntimeError, match="out of memory"):
            run_sweep(cfg_for(chunk_root, tmp_path / "cuda"))
        assert legacy() == before
    finally:
        restore_backend_flags(initial)


def _topk(root: Path, out: Path, **kw) -> SweepConfig:
    """A small TopK sweep whose latents die quickly, so that the aux-K loss switches on and off."""
    return cfg_for(root, out, architecture="topk", k_values=[2, 8], dead_window_tokens=500, **kw)


def _same_weights(a: Path, b: Path) -> bool:
    """Both sweep folders hold bit-identical dictionaries."""
    wa, wb = load_file(str(a / "sweep.safetensors")), load_file(str(b / "sweep.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_topk_weights_do_not_depend_on_log_every(chunk_root, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_mod, "AUX_REFRESH_STEPS", 3)
    run_sweep(_topk(chunk_root, tmp_path / "a", log_every=2, n_repetitions=2))
    run_sweep(_topk(chunk_root, tmp_path / "b", log_every=5, n_repetitions=2))
    assert _same_weights(tmp_path / "a", tmp_path / "b")
    aux = [json.loads(ln)["aux"] for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert 0 in aux and max(aux) > 0   # the aux-K loss was off, then on


def test_killed_topk_sweep_resumes_bit_exactly(chunk_root, tmp_path, monkeypatch):
    # killed at step 20 with latents dead but the aux-K loss still off (first refresh at step 24)
    monkeypatch.setattr(sweep_mod, "AUX_REFRESH_STEPS", 24)
    run_sweep(_topk(chunk_root, tmp_path / "whole", n_repetitions=2, save_after_every=True))
    with sweep_killed_at_chunk(6):  # killed while training on the second chunk of the second repetition
        run_sweep(_topk(chunk_root, tmp_path / "killed", n_repetitions=2, save_after_every=True))
    assert json.loads((tmp_path / "killed" / "checkpoint.json").read_text())["progress"]["step"] == 20
    run_sweep(_topk(chunk_root, tmp_path / "killed", n_repetitions=2, save_after_every=True, resume=True))
    assert _same_weights(tmp_path / "whole", tmp_path / "killed")
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()


def _poison(root: Path, chunk: int, row: int, value: float) -> None:
    """Put `value` into one activation of `chunk` (stored order) and record the file's new checksum, as a writer
    that accepted non-finite activations would have."""
    from training.chunks import mmap_tensors, save_tensors
    path = root / HOOK / f"{chunk}.safetensors"
    tensors = {k: v.clone() for k, v in mmap_tensors(path)[0].items()}
    tensors["activations"][row, 3] = value
    digest = save_tensors(path, tensors)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["hooks"][HOOK]["chunks"][chunk]["sha256"] = digest
    atomic_write_json(root / "manifest.json", manifest)


@pytest.mark.parametrize("chunk, row, value, holdout", [
    (2, 17, float("nan"), 0), (0, 999, float("inf"), 0), (3, 5, float("-inf"), 500),
    (3, 900, float("nan"), 500),                         # in the held-out tail, which training never reads
])
def test_non_finite_chunk_stops_the_sweep_naming_it(chunk_root, tmp_path, chunk, row, value, holdout):
    root = tmp_path / "c"
    shutil.copytree(chunk_root, root)
    _poison(root, chunk, row, value)
    with pytest.raises(UserError, match=rf"^chunk \S*/{chunk}\.safetensors holds NaN or inf activations "
                                        rf"\(first at row {row}\): regenerate") as info:
        run_sweep(cfg_for(root, tmp_path / "o", n_repetitions=2, holdout_rows=holdout))
    assert "\n" not in str(info.value)
    meta = tmp_path / "o" / "sweep.json"
    assert not meta.exists() or not json.loads(meta.read_text())["finished"]


def test_all_finite_is_exact():
    from training.sweep_data import all_finite
    x = torch.randn(1000, 8)
    assert all_finite(x) and all_finite(x.bfloat16()) and all_finite(torch.zeros(0, 8))
    big = torch.full((4, 4), 3e38)                         # a sum would overflow; every value is finite
    assert all_finite(big)
    for value in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[999, 7] = value
        assert not all_finite(y) and not all_finite(y.half()) and not all_finite(y.bfloat16())
    pair = x.clone()
    pair[0, 0], pair[1, 0] = float("inf"), float("-inf")
    assert not all_finite(pair)


def test_flag_diverged_criterion():
    from training.sweep import flag_diverged
    rows = [{"explained_variance": ev, "frozen": frozen} for ev, frozen in
            [(0.9, False), (-0.5, False), (-1.0, False), (-1.01, False), (-3e9, False), (float("nan"), False),
             (float("-inf"), False), (float("-inf"), True)]]
    assert [m["diverged"] for m in flag_diverged(rows)] == [False, False, False, True, True, True, True, False]


def test_an_unfinished_dataset_warns_in_one_line(chunk_root, tmp_path, capsys):
    root = tmp_path / "c"
    shutil.copytree(chunk_root, root)
    run_sweep(cfg_for(root, tmp_path / "a", max_tokens=500))
    assert "warning" not in capsys.readouterr().err
    manifest = json.loads((root / "manifest.json").read_text())
    atomic_write_json(root / "manifest.json", {**manifest, "finished": False})
    run_sweep(cfg_for(root, tmp_path / "b", max_tokens=500))
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warnings == [f"warning: {root} is not finished (generate_test_data.py still running or interrupted): "
                        "training on its 4 complete chunks only; a later --resume on more chunks will be refused"]


@pytest.mark.parametrize("change, detail", [("fewer", "3 chunks now, 4 then"),
                                            ("rewritten", "same 4 chunks, other checksums")])
def test_resume_after_the_dataset_changed_is_refused(chunk_root, tmp_path, change, detail):
    root = tmp_path / "c"
    shutil.copytree(chunk_root, root)
    cfg = cfg_for(root, tmp_path / "o", max_tokens=1000)
    run_sweep(cfg)
    before = (tmp_path / "o" / "sweep.safetensors").read_bytes()
    assert run_sweep(cfg_for(root, tmp_path / "o", max_tokens=1000, resume=True)).progress.step == 4  # unchanged: fine
    if change == "fewer":
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["hooks"][HOOK]["chunks"].pop()
        atomic_write_json(root / "manifest.json", manifest)
    else:
        _poison(root, 1, 10, 0.25)
    with pytest.raises(UserError, match=rf"^--resume: the dataset {root / HOOK} changed since this run started "
                                        rf"\({detail}\) and the run's schedule was computed for the old one: "
                                        "restore it, or start over with --overwrite$"):
        run_sweep(cfg_for(root, tmp_path / "o", max_tokens=1000, resume=True))
    assert (tmp_path / "o" / "sweep.safetensors").read_bytes() == before


def test_a_checkpoint_without_a_dataset_record_resumes(chunk_root):
    from training.sweep import Progress, check_same_dataset, dataset_digest, open_dataset
    data = open_dataset(cfg_for(chunk_root, chunk_root / "unused"))
    check_same_dataset(Progress(), data)                                   # written by an older version
    check_same_dataset(Progress(dataset_chunks=4, dataset_digest=dataset_digest(data)), data)
    with pytest.raises(UserError, match=r"\(same 4 chunks, other checksums\)"):
        check_same_dataset(Progress(dataset_chunks=4, dataset_digest="0" * 64), data)


def test_too_little_free_space_is_refused_up_front(chunk_root, tmp_path, monkeypatch):
    from collections import namedtuple
    from training.memory import format_bytes
    from training.sweep import save_bytes
    usage = namedtuple("usage", "total used free")
    cfg = cfg_for(chunk_root, tmp_path / "deep" / "o", max_tokens=1000)
    one = save_bytes(cfg, 3, 32)
    assert one == 3 * 4 * (32 + 64 + 2 * 64 * 32) * 4 + 8 * 3 * 64 + (1 << 20)
    monkeypatch.setattr(sweep_mod.shutil, "disk_usage", lambda path: usage(10 ** 12, 0, 2 * one - 1))
    with pytest.raises(UserError, match=rf"^--output_dir {cfg.output_dir}: the sweep needs "
                                        rf"{format_bytes(2 * one).strip()} free on the disk of {tmp_path} \(a save "
                                        rf"writes the new checkpoint beside the old one\) but "
                                        rf"{format_bytes(2 * one - 1).strip()} is free: free space or choose"):
        run_sweep(cfg)
    assert not (tmp_path / "deep").exists()
    monkeypatch.setattr(sweep_mod.shutil, "disk_usage", lambda path: usage(10 ** 12, 0, 2 * one))
    run_sweep(cfg)
    o = tmp_path / "deep" / "o"
    held = sum(f.stat().st_size for f in [o / "sweep.safetensors", *checkpoint_files(o).values()])
    assert held <= one                                           # the estimate bounds what a save writes
    monkeypatch.setattr(sweep_mod.shutil, "disk_usage", lambda path: usage(10 ** 12, 0, 2 * one - held))
    run_sweep(cfg_for(chunk_root, tmp_path / "deep" / "o", max_tokens=1000, resume=True))  # its files count as room


@pytest.mark.parametrize("how", ["permissions", "mount"])
def test_a_read_only_output_folder_is_reported_as_read_only(chunk_root, tmp_path, monkeypatch, how):
    import os
    folder = tmp_path / "ro"
    folder.mkdir()
    if how == "permissions":
        real_access = os.access
        monkeypatch.setattr(sweep_mod.os, "access",                       # as chmod 555 would for a non-root user
                            lambda p, mode: False if Path(p) == folder and mode & os.W_OK else real_access(p, mode))
    else:
        real_statvfs = os.statvfs

        class ReadOnly:
            def __init__(self, st):
                self.st = st
                self.f_flag = st.f_flag | os.ST_RDONLY

            def __getattr__(self, name):
                return getattr(self.st, name)
        monkeypatch.setattr(sweep_mod.os, "statvfs", lambda p: ReadOnly(real_statvfs(p)) if Path(p) == folder
                            else real_statvfs(p))
    for out in (folder, folder / "sub"):
        with pytest.raises(UserError, match=rf"^--output_dir {out}: {folder} is read-only: make it writable or "):
            run_sweep(cfg_for(chunk_root, out))
    assert list(folder.iterdir()) == []


def test_a_full_disk_during_a_save_is_one_line_and_resume_recovers(chunk_root, tmp_path, monkeypatch):
    import builtins
    import errno
    run_sweep(cfg_for(chunk_root, tmp_path / "whole", n_repetitions=2))
    out = tmp_path / "o"
    real_open, opened = builtins.open, {"n": 0}

    def full_disk_open(file, mode="r", *args, **kwargs):
        path = Path(file) if isinstance(file, (str, Path)) else None
        if path is not None and path.parent == out and path.name.endswith(".tmp") and "w" in mode:
            opened["n"] += 1
            if opened["n"] > 4:                    # the first save (4 files) fits; the last one fills the disk
                with real_open(path, "wb") as f:
                    f.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk_open)
    with pytest.raises(UserError, match=rf"^writing {out}/\S+\.tmp: no space left on its disk: free space \(or fix "
                                        r"the folder\) and rerun with --resume") as info:
        run_sweep(cfg_for(chunk_root, out, n_repetitions=2))
    assert "\n" not in str(info.value) and not list(out.glob("*.tmp"))
    monkeypatch.undo()
    run_sweep(cfg_for(chunk_root, out, n_repetitions=2, resume=True))
    assert _same_weights(tmp_path / "whole", out)


def test_a_permission_error_reading_the_dataset_is_not_reported_as_a_write(chunk_root, tmp_path, monkeypatch):
    import errno

    def unreadable(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(chunk_root / HOOK / "0.safetensors"))
    monkeypatch.setattr(sweep_mod, "load_chunk", unreadable)
    with pytest.raises(PermissionError):
        run_sweep(cfg_for(chunk_root, tmp_path / "o"))


class Killed(Exception):
    """A kill -9 at a crash point of a save."""


def crash_at(monkeypatch, k: int) -> dict:
    """Make the k-th file operation of the sweep's saves die as a kill would: a half-written temporary file left
    beside its target, nothing else; returns the counter (with the target hit)."""
    import training.sweep_files as files_mod
    seen = {"n": 0, "path": None}

    def point(path: Path) -> None:
        seen["n"] += 1
        if seen["n"] == k:
            seen["path"] = path
            path.with_name(path.name + ".tmp").write_bytes(b"\\x00half")
            raise Killed(str(path))
    monkeypatch.setattr(files_mod, "crash_point", point)
    return seen


def test_a_kill_at_every_crash_point_of_every_save_resumes_to_the_uninterrupted_result(chunk_root, tmp_path,
                                                                                      monkeypatch):
    kw = dict(save_after_every=True, max_tokens=3000)                 # saves after chunks 1 and 2, and the last
    run_sweep(cfg_for(chunk_root, tmp_path / "whole", **kw))
    counted = crash_at(monkeypatch, 0)
    run_sweep(cfg_for(chunk_root, tmp_path / "count", **kw))
    n_points = counted["n"]
    assert n_points >= 3 * 3 + 2                                      # 3 saves of >= 3 operations, the final json
    whole = tmp_path / "whole"
    reference = load_file(str(whole / "sweep.safetensors"))
    hit = []
    for k in range(1, n_points + 1):
        out = tmp_path / f"k{k}"
        seen = crash_at(monkeypatch, k)
        with pytest.raises(Killed):
            run_sweep(cfg_for(chunk_root, out, **kw))
        hit.append(seen["path"].name)
        monkeypatch.undo()
        run_sweep(cfg_for(chunk_root, out, **kw, resume=(out / "checkpoint.json").exists()))
        got = load_file(str(out / "sweep.safetensors"))
        assert got.keys() == reference.keys() and all(torch.equal(got[n], reference[n]) for n in got), k
        assert (out / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text(), k
        a, b = (json.loads((d / "sweep.json").read_text()) for d in (whole, out))
        assert a["members"] == b["members"] and a["progress"] == b["progress"] and b["finished"], k
        def names(d: Path) -> list[str]:
            return sorted(re.sub(r"checkpoint-\d+", "checkpoint-G", p.name) for p in d.iterdir())
        assert names(out) == names(whole), k                           # one generation, no temporary file
        shutil.rmtree(out)
    assert {"checkpoint.json", "sweep.json", "sweep.safetensors"} <= set(hit)
    assert any(name.startswith("checkpoint-") for name in hit)


def test_resume_cross_checks_the_checkpoint(chunk_root, tmp_path):
    from training.chunks import save_tensors
    out = tmp_path / "o"
    run_sweep(cfg_for(chunk_root, out, save_after_every=True, max_tokens=2000))
    saved = json.loads((out / "checkpoint.json").read_text())
    path = checkpoint_weights(out)
    assert saved["format"] == 2 and saved["progress"]["step"] == 8 and path.exists()
    legacy = out / "checkpoint.safetensors"

    def refused(message: str) -> None:
        with pytest.raises(UserError, match=message) as info:
            run_sweep(cfg_for(chunk_root, out, save_after_every=True, max_tokens=2000, resume=True))
        assert "\n" not in str(info.value)
    # progress of step 4 beside the weights of step 8, as an older version's torn save left them
    state = load_file(str(path))
    save_tensors(legacy, state)
    atomic_write_json(out / "checkpoint.json", {"config": saved["config"], "progress": {**saved["progress"], "step": 4}})
    refused(r"checkpoint.safetensors holds the optimizer state of step 8 but its progress says step 4 .*--overwrite")
    atomic_write_json(out / "checkpoint.json", {"config": saved["config"], "progress": saved["progress"]})
    assert run_sweep(cfg_for(chunk_root, out, save_after_every=True, max_tokens=2000, resume=True)).progress.step == 8
    assert not legacy.exists()                                         # replaced by a generation file
    saved, path = json.loads((out / "checkpoint.json").read_text()), checkpoint_weights(out)
    atomic_write_json(out / "checkpoint.json", {**saved, "progress": {**saved["progress"], "step": 4}})
    refused(r"holds progress .* but .*checkpoint.json says")
    atomic_write_json(out / "checkpoint.json", saved)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    refused(r"checkpoint-\d+.safetensors does not match the checksum recorded for it .*--overwrite")
    atomic_write_json(out / "checkpoint.json", {**saved, "progress": {**saved["progress"], "epoch": 1}})
    refused(r"checkpoint.json holds progress fields \['epoch'\] this version does not know")
    (out / "checkpoint.json").write_text("{garbage")
    refused(r"checkpoint.json is not valid JSON .*start the sweep again with --overwrite")


@pytest.fixture(scope="module")
def small_sweep(chunk_root, tmp_path_factory) -> Path:
    """A finished 3-member L1 sweep (4 steps)."""
    out = tmp_path_factory.mktemp("small") / "o"
    run_sweep(cfg_for(chunk_root, out, max_tokens=1000))
    return out


def damaged_copy(src: Path, dst: Path) -> Path:
    """A copy of sweep folder `src` at `dst`, to damage."""
    shutil.copytree(src, dst)
    return dst


def one_line(call, message: str) -> None:
    """`call()` raises a UserError of one line matching `message`."""
    with pytest.raises(UserError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_sweep_json_records_the_weights_checksum(small_sweep):
    from training.chunks import file_sha256
    meta = json.loads((small_sweep / "sweep.json").read_text())
    assert meta["weights_sha256"] == file_sha256(small_sweep / "sweep.safetensors")
    saved = json.loads((small_sweep / "checkpoint.json").read_text())
    assert saved["weights_sha256"] == file_sha256(checkpoint_weights(small_sweep))


def test_a_one_bit_flip_in_the_weights_is_refused(small_sweep, tmp_path):
    out = damaged_copy(small_sweep, tmp_path / "o")
    path = out / "sweep.safetensors"
    tensors = load_file(str(path))
    raw = bytearray(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    start = 8 + size + json.loads(raw[8:8 + size])["decoder"]["data_offsets"][0]
    raw[start + 3] ^= 0x40             # the top exponent bit of the decoder's first float32: x * 2^128
    path.write_bytes(bytes(raw))
    assert load_file(str(path))["decoder"][0, 0, 0].abs() > 1e30
    one_line(lambda: load_sweep(out), r"sweep.safetensors does not match the checksum recorded for it .*rerun "
                                      r"basic_l1_sweep.py --output_dir")
    assert list(load_sweep(out, verify=False)) == [1e-3, 1e-2, 1e-1]          # the way to skip the checks
    meta = json.loads((out / "sweep.json").read_text())
    del meta["weights_sha256"]                                                # a sweep of an older version
    atomic_write_json(out / "sweep.json", meta)
    one_line(lambda: load_sweep(out), r"decoder row 0 of member 0 has norm .*, not 1 \(corrupt or modified\)")
    path.write_bytes(path.read_bytes()[:30])                                  # a bad safetensors header
    one_line(lambda: load_sweep(out, verify=False), r"sweep.safetensors is not a readable safetensors file")
    assert tensors["decoder"].shape == (3, 64, 32)


def test_sweep_json_that_disagrees_with_the_tensors_is_refused(small_sweep, tmp_path):
    from training.sweep_files import select_member
    out = damaged_copy(small_sweep, tmp_path / "o")
    meta = json.loads((out / "sweep.json").read_text())
    atomic_write_json(out / "sweep.json", {**meta, "keys": meta["keys"][:2], "members": meta["members"][:2]})
    one_line(lambda: load_sweep(out), r"sweep.safetensors holds tensors .*\(3, 64, 32\).* but .*sweep.json "
                                      r"describes .*\(2, 64, 32\)")
    atomic_write_json(out / "sweep.json", {**meta, "keys": meta["keys"][:2]})
    one_line(lambda: load_sweep(out), r"sweep.json is not a valid sweep description \(2 keys but 3 members\)")
    atomic_write_json(out / "sweep.json", {**meta, "d_hidden": 65})
    one_line(lambda: load_sweep(out, verify=False), r"holds tensors .* but .* describes")
    (out / "sweep.json").write_text('{"architecture": "l1", "keys": [0.1')
    for call in (lambda: load_sweep(out), lambda: select_member(out, l1=0.1)):
        one_line(call, r"sweep.json is not valid JSON \(.*\): rerun basic_l1_sweep.py")
    (out / "sweep.json").write_text("[1, 2]")
    one_line(lambda: load_sweep(out), r"sweep.json is not a valid sweep description \(not a JSON object\)")


def test_garbage_json_files_are_one_line_through_the_cli(small_sweep, tmp_path, capsys):
    from training.sweep_files import read_sweep
    from training.feature_file import FeatureFile, read_features_json
    out = damaged_copy(small_sweep, tmp_path / "o")
    (out / "sweep.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda c: load_sweep(c.output_dir), "", SweepConfig, ["--output_dir", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {out / 'sweep.json'} is not valid JSON")
    one_line(lambda: read_sweep(out), r"sweep.json is not valid JSON")
    features = tmp_path / "features.json"
    for garbage in (b"{not json", b"\xff\xfe", b"[1, 2]", b'{"format": 1}'):
        features.write_bytes(garbage)
        one_line(lambda: read_features_json(features), r"features.json (is not valid JSON|is not a features.json)")
        one_line(lambda: FeatureFile(features), r"features.json (is not valid JSON|is not a features.json)")


def test_an_all_frozen_sweep_is_an_error_and_a_finite_explosion_is_flagged(chunk_root, tmp_path):
    with pytest.raises(UserError, match=r"every member hit a NaN/inf loss or gradient and was frozen, so the sweep in "
                                        r".* is not finished: .*lower --adam_lr \(now 1e\+06\)$"):
        run_sweep(cfg_for(chunk_root, tmp_path / "nan", adam_lr=1e6, max_tokens=1000))
    meta = json.loads((tmp_path / "nan" / "sweep.json").read_text())
    assert not meta["finished"] and all(m["frozen"] for m in meta["members"])
    # lr 1e3 now freezes: a gradient norm past ~1.8e19 has a squared norm that overflows float32, which freezes
    result = run_sweep(cfg_for(chunk_root, tmp_path / "big", adam_lr=30, max_tokens=2000))
    assert all(not m["frozen"] and m["diverged"] for m in result.metrics), result.metrics
    printed = str(result)
    assert "diverged" in result.table().splitlines()[1] and "warning: members [0.001, 0.01, 0.1] diverged" in printed
    assert all(m["diverged"] for m in json.loads((tmp_path / "big" / "sweep.json").read_text())["members"])
    fine = run_sweep(cfg_for(chunk_root, tmp_path / "fine", max_tokens=2000))
    assert not any(m["diverged"] for m in fine.metrics) and "warning" not in str(fine)
