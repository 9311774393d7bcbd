"""Every registered architecture through every analysis tool, and learning known features: for each name in
`training.architectures.names()` a tiny sweep on Stage 1 chunks of the embedded model is evaluated (report written,
metrics finite, the error-term splice gives the clean loss back), its top activations gathered (against a brute-force
encoding), its dashboards built and its features steered; then all the sweeps are compared in one report. A new
architecture is covered by registering it: nothing here names one (member keys come from its sweep parameter)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training import load_sweep, open_hook
from training.architectures import Architecture, get, names
from training.comparison import COMPARISON_JSON, COMPARISON_MD, CompareConfig, evaluate_and_compare
from training.dashboards import DashboardConfig, make_dashboards
from training.ensemble import Ensemble, make_members
from training.evaluate import REPORT_JSON, REPORT_MD, EvaluateConfig, evaluate_sweep
from training.generate import GenerateConfig, generate
from training.steering import load_for_steering, steer
from training.sweep import SweepConfig, member_keys, run_sweep
from training.toy import ToyConfig, make_features, make_generator, sample_batch
from training.feature_file import read_features_json, round_sig
from training.top_activations import TopActivationsConfig, gather

EMBEDDED = Path(__file__).resolve().parent.parent / "models" / "tiny-stdlib"
HOOK = "blocks.1.hook_resid_post"
N_TOKENS = 400

SWEEP_KEYS = {"l1": [0.01, 0.1], "k": [4, 16]}
"""Member keys of the tiny sweeps, by sweep parameter (at --activation_norm 1, 256 features of a 128-wide hook)."""
LEARNING_KEYS = {"l1": [0.1, 1.5], "k": [2, 3], "l0_coefficient": [0.03, 0.3]}
"""Member keys of the learning check, by sweep parameter (data with 3 active features per row, E||x||^2 = 1)."""
LEARNING_OPTIONS = {"matryoshka_prefixes": [0.5, 1.0]}
"""Architecture options of the learning check, by name (the others at their defaults): two nested halves (the
default's first prefix must reconstruct alone, so it holds broad mixtures of the true features)."""


def keys_for(arch: Architecture, table: dict[str, list]) -> list:
    """The architecture's member keys from `table` by its sweep parameter; else an integer parameter is taken
    for a count of active features (like k), a real one for a sparsity penalty (like the L1 coefficient)."""
    if arch.sweep_param in table:
        return table[arch.sweep_param]
    return table["k"] if arch.sweep_param_integer else table["l1"]


def sweep_config(arch: Architecture, keys: list, **kw) -> SweepConfig:
    """A SweepConfig of `arch` whose members are `keys` (set through the --<sweep_param>_values flag)."""
    flag = f"{arch.sweep_param}_values"
    assert flag in {f.name for f in dataclasses.fields(SweepConfig)}, (
        f"SweepConfig has no --{flag} for {arch.name}'s sweep parameter {arch.sweep_param!r}")
    cfg = SweepConfig(architecture=arch.name, **{flag: keys}, **kw)
    assert member_keys(cfg) == keys
    return cfg


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """Stage 1 chunks of the embedded model on its corpus: hook blocks.1.hook_resid_post, 2 chunks of 1000 rows."""
    assert (EMBEDDED / "config.json").exists(), f"the embedded model {EMBEDDED} is missing"
    root = tmp_path_factory.mktemp("every-arch-chunks")
    generate(GenerateConfig(model=str(EMBEDDED), dataset="python-docs", dataset_folder=str(root), layers=[1],
                            n_chunks=2, chunk_size=1000, context_length=32, device="cpu"), argv=["x"])
    return root


@pytest.fixture(scope="module")
def sweeps(stage1, tmp_path_factory) -> dict[str, Path]:
    """{architecture: folder of its 2-member sweep} (2 passes over the 2000 rows, batch 200)."""
    out = tmp_path_factory.mktemp("every-arch-sweeps")
    folders = {}
    for name in names():
        arch = get(name)
        run_sweep(sweep_config(arch, keys_for(arch, SWEEP_KEYS), dataset_dir=str(stage1 / HOOK),
                               output_dir=str(out / name), ratio=2, batch_size=200, adam_lr=3e-3, n_repetitions=2,
                               device="cpu", center_init="mean", log_every=1000, holdout_rows=200))
        folders[name] = out / name
    return folders


FINITE_METRICS = ("l0", "explained_variance", "mse", "cossim", "ce_loss_with_sae", "ce_loss_score",
                  "kl_div_with_sae", "frac_dead")


@pytest.mark.parametrize("name", names())
def test_every_analysis_tool_on_the_architecture(name, sweeps, stage1):
    arch, folder = get(name), sweeps[name]
    keys = keys_for(arch, SWEEP_KEYS)
    saes = load_sweep(folder)
    assert list(saes) == keys and all(type(m) is arch.module for m in saes.values())

    # evaluation: report written, every metric finite, the error term spliced back gives the clean loss
    evaluate_sweep(EvaluateConfig(sweep=str(folder), n_tokens=N_TOKENS, batch_size=8, device="cpu"))
    report = json.loads((folder / REPORT_JSON).read_text())
    assert (folder / REPORT_MD).exists() and report["evaluated"]["architecture"] == name
    assert [m["key"] for m in report["members"]] == keys
    for m in report["members"]:
        for metric in FINITE_METRICS:
            assert isinstance(m[metric], (int, float)) and math.isfinite(m[metric]), (metric, m[metric])
        assert 0 < m["l0"] <= 256 and m["explained_variance"] > 0
        assert m["ce_loss_with_error"] == pytest.approx(m["ce_loss_without_sae"], abs=1e-4)

    # top activations: each feature's maximum is the brute-force maximum of the module's own encoding
    key = keys[-1]
    res = gather(TopActivationsConfig(sweep=str(folder), key=str(key), device="cpu", top_k=4))
    data = read_features_json(res.path)
    chunks = list(open_hook(stage1 / HOOK).iter_chunks())
    with torch.no_grad():
        codes = saes[key].encode(torch.cat([c["activations"].float() for c in chunks]))       # [2000, 256]
    assert data["n_tokens"] == codes.shape[0] and data["n_features"] == codes.shape[1] == 256
    assert [f["max"] for f in data["features"]] == pytest.approx(
        round_sig(codes.max(0).values.double().numpy()).tolist(), rel=1e-3, abs=1e-6)
    live = [f for f in data["features"] if f["top"]]
    assert live and all(len(f["top"]) <= 4 for f in live)

    # dashboards: one page per feature and the index
    site = make_dashboards(DashboardConfig(sweep=str(folder), key=str(key), device="cpu", n_logits=3))
    assert site.pages == 256 and site.index.exists() and "<html" in site.index.read_text().lower()

    # steering: strength 0 leaves the continuation unchanged, and the steered feature is read back on every token
    model, sae, hook = load_for_steering(folder, key=str(key), device="cpu")
    feature = int(np.argmax([f["max"] for f in data["features"]]))
    result = steer(model, sae, hook, [{feature: 0.0}, {feature: 8.0}], prompt="def main", max_new_tokens=6,
                   temperature=0.0, stop_at_eos=False)
    zero, strong = result.steered
    assert zero.token_ids == result.unsteered.token_ids
    assert strong.activations.shape == (len(result.prompt_ids) + 6, 1) and torch.isfinite(strong.activations).all()


def test_every_architecture_compared_in_one_report(sweeps, tmp_path):
    """evaluate_sweep.py --sweep A B ...: one comparison of all the registered architectures' sweeps."""
    seen = []
    res = evaluate_and_compare(CompareConfig(sweep=[str(sweeps[n]) for n in names()], n_tokens=N_TOKENS,
                                             batch_size=8, device="cpu", comparison_dir=str(tmp_path / "cmp")),
                               show=seen.append)
    assert len(seen) == len(names()) and res is not None
    c = json.loads((tmp_path / "cmp" / COMPARISON_JSON).read_text())
    assert [s["architecture"] for s in c["sweeps"]] == list(names())
    md = (tmp_path / "cmp" / COMPARISON_MD).read_text()
    for n in names():
        assert f"| {get(n).title} |" in md
    for s in c["sweeps"]:
        for metric in ("explained_variance", "ce_loss_score"):
            got = s["metrics"][metric]
            assert got["frontier"] and all(v is None or math.isfinite(v) for v in got["at_l0"])


# ----------------------------------------------------------------------------- learning known features

def test_learning_keys_are_taken_from_the_sweep_parameter():
    integer = dataclasses.replace(get(names()[0]), sweep_param="new_int", sweep_param_integer=True)
    real = dataclasses.replace(integer, sweep_param="new_real", sweep_param_integer=False)
    assert keys_for(integer, LEARNING_KEYS) == LEARNING_KEYS["k"]
    assert keys_for(real, LEARNING_KEYS) == LEARNING_KEYS["l1"]


@pytest.mark.parametrize("name", names())
def test_every_architecture_recovers_known_features(name):
    """48 known unit directions in d = 24, about 3 active per row with frequencies decaying 0.99 per feature
    (training/toy.py), scaled to E||x||^2 = 1 as the sweep scales: the best member's decoder has, for each true
    direction, a row at mean max cosine >= 0.95 after 1500 steps of 256 rows (Adam lr 1e-2, no clipping)."""
    arch = get(name)
    toy = ToyConfig(n_features=48, d=24, avg_active=3, decay=0.99, seed=0)
    features = make_features(toy)
    acts, _ = sample_batch(toy, features, 48000, make_generator(toy))
    acts = acts / acts.square().sum(-1).mean().sqrt()
    keys = keys_for(arch, LEARNING_KEYS)
    torch.manual_seed(0)
    members = make_members(name, len(keys), 24, 96, keys=keys, seed=1, init_norm=arch.default_init_norm)
    options = {option: LEARNING_OPTIONS[option] for option in arch.options if option in LEARNING_OPTIONS}
    ens = Ensemble(members, {"lr": [1e-2] * len(keys), arch.sweep_param: keys}, dead_window=20 * 256, k_aux=12,
                   arch_options=options)
    for rep in range(8):
        for i, x in enumerate(acts.split(256)[:-1]):
            stats = ens.step(x)
            if i % 50 == 49:
                ens.resample_dead(acts[:8192], step=rep * 1000 + i)
    rows = torch.nn.functional.normalize(ens.params["decoder"].float(), dim=-1)               # [N, 96, 24]
    mean_max_cos = (rows @ features.float().T).amax(1).mean(-1)                                 # [N]
    assert not stats["frozen"].any()
    assert mean_max_cos.max() >= 0.95, mean_max_cos.tolist()


# ----------------------------------------------------------------------------- the benchmarks cover the registry

def test_bench_architectures_trains_and_compares_every_architecture(stage1, tmp_path, capsys):
    from bench.architectures import RESULTS_JSON, main
    keys = [f"{n}=" + ",".join(str(v) for v in keys_for(get(n), SWEEP_KEYS)) for n in names()]
    out = main(["--dataset_dir", str(stage1), "--out", str(tmp_path), "--max_tokens", "1200", "--batch_size", "200",
                "--ratio", "2", "--n_tokens", "200", "--device", "cpu", "--keys", *keys])
    printed = capsys.readouterr().out
    assert [s["architecture"] for s in out["sweeps"]] == list(names())
    assert json.loads((tmp_path / RESULTS_JSON).read_text())["passes"] == 1
    assert "on the Pareto frontier at L0 = 16, 32, 64" in printed and (tmp_path / "comparison" / COMPARISON_MD).exists()
    for n in names():
        assert json.loads((tmp_path / n / "sweep.json").read_text())["keys"] == keys_for(get(n), SWEEP_KEYS)
    again = main(["--dataset_dir", str(stage1), "--out", str(tmp_path), "--max_tokens", "1200", "--batch_size", "200",
                  "--ratio", "2", "--n_tokens", "200", "--device", "cpu", "--keys", *keys])
    assert all(s["train_seconds"] is None for s in again["sweeps"])        # finished with the same flags: reused
    assert "reusing the finished sweep" in capsys.readouterr().out


def test_bench_sweep_times_every_architecture():
    from bench.sweep import architecture_kinds, summarise, time_size
    kinds = ["bmm"] + architecture_kinds(list(names()))
    assert kinds[1:] == [f"{n}/{b}" for n in names() for b in ("fused", "autograd")
                         if b == "autograd" or get(n).fused_grads]
    times = time_size(dict(d_in=16, d_hidden=64, n_models=2, batch=64, device="cpu", precision="fp32", k=4,
                           kinds=kinds, rounds=1))
    seconds = {kind: t[0] for kind, t in times.items()}
    row = summarise(16, 64, seconds, {}, 2, 64, "fp32", "cpu")
    assert list(row["architectures"]) == list(names())
    assert row["bmm_limit_tokens_per_s_per_member"] == pytest.approx(64 / seconds["bmm"])
    assert row["bmm_flops_per_s"] == pytest.approx(2 * 10 * 64 * 16 * 64 / seconds["bmm"])
    for n in names():
        assert set(row["architectures"][n]) == ({"fused", "autograd"} if get(n).fused_grads else {"autograd"})
        for backend, path in row["architectures"][n].items():
            assert path["tokens_per_s_per_member"] == pytest.approx(64 / seconds[f"{n}/{backend}"])
            assert path["fraction_of_bmm_limit"] == pytest.approx(seconds["bmm"] / seconds[f"{n}/{backend}"])
