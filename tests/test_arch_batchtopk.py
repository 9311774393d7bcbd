"""The BatchTopK architecture: its loss against an independent implementation, the threshold's update and inference
rule, save / load / resume through the sweep, NaN isolation, and recovery of known features. The `check_*` helpers
take the architecture's name and options; tests/test_arch_matryoshka.py runs them on the Matryoshka architecture."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.sweep as sweep_mod
from conftest import sweep_killed_at_chunk
from test_sweep import HOOK, _same_weights, cfg_for, chunk_root  # noqa: F401 (chunk_root: the dataset fixture)
from training.architectures import get
from training.architectures.batchtopk import THRESHOLD_BETA, BatchTopKAutoencoder
from training.cli import UserError
from training.dictionary import decoder_norms
from training.ensemble import Ensemble, make_members
from training.metrics import cosine_matrix
from training.sweep import run_sweep
from training.sweep_files import checkpoint_weights, load_sweep
from training.toy import ToyConfig, make_features, make_generator, sample_batch

F64 = torch.float64
REPO = Path(__file__).resolve().parent.parent


def _data(n: int, d: int, seed: int = 0, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype) * torch.linspace(0.5, 2.0, d, dtype=dtype) + 0.3


def reference_loss(params: dict, x: torch.Tensor, k: int, ends: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent BatchTopK / Matryoshka loss: keep the scores at or above the (k*B)-th largest of the batch (by
    sorting), then sum each prefix's squared error per token, averaged over tokens. Returns (loss, min kept score)."""
    pre = (x - params["center"]) @ params["encoder"].T + params["encoder_bias"]
    scores = pre * params["decoder"].norm(dim=-1)
    cut = scores.detach().flatten().sort(descending=True).values[k * x.shape[0] - 1]
    kept = scores.detach() >= cut
    codes = torch.where(kept, pre.clamp_min(0), torch.zeros_like(pre))
    total = 0
    for m in ends:
        err = x - (codes[:, :m] @ params["decoder"][:m] + params["center"])
        total = total + (err ** 2).sum() / x.shape[0]
    return total, scores[kept & (pre > 0)].min()


def check_loss_and_gradient_against_reference(name: str, ends: list[int], options: dict) -> None:
    """The fused gradient and the loss of each member (different k) equal the reference's autograd ones."""
    arch = get(name)
    torch.manual_seed(0)
    ks = [2, 5, 3]
    members = make_members(name, 3, 8, 32, keys=ks, dtype=F64, init_norm=0.5)
    ens = Ensemble(members, {"lr": [1e-3] * 3}, arch_options=options)
    x = _data(40, 8)
    ens.init_center(x[:7])
    with torch.no_grad():
        stats = ens._gradients(x, {})
    assert ens.member_state["ends"] == ends
    for i, k in enumerate(ks):
        params = {n: t[i].detach().clone().requires_grad_(n != "threshold") for n, t in ens.params.items()}
        loss, min_kept = reference_loss(params, x, k, ends)
        grads = torch.autograd.grad(loss, [params[n] for n in arch.param_names if n != "threshold"])
        torch.testing.assert_close(stats["loss"][i], loss.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats["min_kept"][i], min_kept.detach(), rtol=1e-10, atol=1e-12)
        assert stats["l0"][i] == pytest.approx(k)                            # k * B entries kept, all positive here
        for n, g in zip([n for n in arch.param_names if n != "threshold"], grads):
            torch.testing.assert_close(ens._grads[n][i], g, rtol=1e-9, atol=1e-11, msg=n)
        assert torch.equal(ens._grads["threshold"][i], torch.zeros((), dtype=F64))


def test_loss_and_gradient_equal_an_independent_implementation():
    check_loss_and_gradient_against_reference("batchtopk", [32], {})


def test_the_module_loss_is_the_functional_one():
    torch.manual_seed(1)
    sae = BatchTopKAutoencoder(8, 32, 3, dtype=F64)
    x = _data(16, 8)
    params = {n: p.detach().clone().requires_grad_() for n, p in sae.named_parameters()}
    want, _ = reference_loss(params, x, 3, [32])
    total, parts = sae.loss(x)
    torch.testing.assert_close(total, want)
    assert set(parts) == {"mse", "aux"} and parts["aux"] == 0
    codes = sae.encode_batch(x)
    assert (codes > 0).sum() == 3 * 16 and not torch.equal((codes > 0).sum(1), torch.full((16,), 3))


def test_threshold_is_a_linearly_weighted_mean_then_an_ema_of_the_smallest_kept_score():
    """Frozen params (lr 0): the estimate after t batches is the mean of their smallest kept scores weighted 1..t
    (recent batches count more while the codes still grow), then an EMA of decay beta."""
    torch.manual_seed(0)
    ens = Ensemble(make_members("batchtopk", 2, 8, 32, keys=[2, 4], dtype=F64, init_norm=0.5), {"lr": [0.0, 0.0]})
    seen = []
    for step in range(5):
        x = _data(32, 8, seed=step)
        seen.append(ens.step(x)["min_kept"].clone())
        w = torch.arange(1, len(seen) + 1, dtype=F64)                               # weights 1, 2, ..., t
        want = (torch.stack(seen) * w[:, None]).sum(0) / w.sum()
        torch.testing.assert_close(ens.params["threshold"], want)
    assert ens.member_state["threshold_batches"].tolist() == [5.0, 5.0]
    ens.member_state["threshold_batches"].fill_(10 ** 6)                           # long past the running mean
    before = ens.params["threshold"].clone()
    m = ens.step(_data(32, 8, seed=9))["min_kept"]
    torch.testing.assert_close(ens.params["threshold"], before + (1 - THRESHOLD_BETA) * (m - before))


def test_inference_encodes_each_token_by_the_threshold():
    torch.manual_seed(0)
    ens = Ensemble(make_members("batchtopk", 2, 8, 32, keys=[2, 4], dtype=F64, init_norm=0.5), {"lr": [1e-2] * 2})
    for s in range(4):
        ens.step(_data(64, 8, seed=s))
    x = _data(50, 8, seed=7)
    codes = ens.encode(x)
    for i, sae in enumerate(ens.unstack()):
        assert isinstance(sae, BatchTopKAutoencoder) and sae.threshold == ens.params["threshold"][i]
        pre = (x - sae.center) @ sae.encoder.T + sae.encoder_bias
        want = torch.where(pre * decoder_norms(dict(sae.named_parameters())) > sae.threshold, pre.clamp_min(0), 0)
        torch.testing.assert_close(sae.encode(x), want)
        torch.testing.assert_close(codes[i], want)
        torch.testing.assert_close(sae.encode(x[:1]), sae.encode(x)[:1])       # a token alone: the same codes
        torch.testing.assert_close(sae(x), want @ sae.decoder + sae.center)


def check_nan_member_is_frozen_others_unchanged(name: str, options: dict) -> None:
    """A member whose loss is NaN is frozen (params and threshold kept); the others train as without it."""
    torch.manual_seed(0)
    members = make_members(name, 3, 8, 32, keys=[2, 3, 4], dtype=F64, init_norm=0.5)
    with torch.no_grad():
        members[1].encoder[0, 0] = math.nan
    ens = Ensemble(members, {"lr": [1e-2] * 3}, arch_options=options)
    alone = Ensemble([members[0], members[2]], {"lr": [1e-2] * 2}, arch_options=options)
    frozen = {n: t[1].clone() for n, t in ens.params.items()}
    for s in range(3):
        x = _data(32, 8, seed=s)
        assert ens.step(x)["frozen"].tolist() == [False, True, False]
        alone.step(x)
    for n, t in ens.params.items():
        torch.testing.assert_close(t[[0, 2]], alone.params[n], rtol=1e-12, atol=1e-14, msg=n)
        torch.testing.assert_close(t[1], frozen[n], rtol=0, atol=0, equal_nan=True, msg=n)
    assert ens.params["threshold"][1] == 0 and (ens.params["threshold"][[0, 2]] > 0).all()


def test_nan_member_is_frozen_others_unchanged():
    check_nan_member_is_frozen_others_unchanged("batchtopk", {})


def check_recovers_known_features(name: str, options: dict) -> float:
    """Best member's mean over ground-truth features of the max cosine with a decoder row (toy data, seconds)."""
    toy = ToyConfig(n_features=32, d=16, avg_active=3, decay=0.99, seed=0)
    features = make_features(toy)
    acts, _ = sample_batch(toy, features, 32768, make_generator(toy))
    torch.manual_seed(0)
    ens = Ensemble(make_members(name, 2, 16, 64, keys=[1, 2], init_norm=0.5), {"lr": [1e-2] * 2},
                   dead_window=2000, arch_options=options)
    ens.init_center(acts[:4096])
    for _ in range(4):
        for i, x in enumerate(acts.split(256)):
            ens.step(x)
            if i % 24 == 0:
                ens.resample_dead(x)                        # switches the aux-K loss on when latents die
    return max(cosine_matrix(features, ens.params["decoder"][i]).amax(1).mean().item() for i in range(2))


def test_recovers_known_features():
    assert check_recovers_known_features("batchtopk", {}) >= 0.95


def _cfg(root: Path, out: Path, architecture: str, **kw):
    return cfg_for(root, out, architecture=architecture, k_values=[2, 8], dead_window_tokens=500, **kw)


def check_sweep_saves_a_threshold_that_loads(root: Path, out: Path, name: str, **kw) -> None:
    """run_sweep then load_sweep: the modules (threshold in raw units) encode raw rows as the trained ensemble encodes
    scaled rows, and the sweep.json L0 is the inference rule's."""
    result = run_sweep(_cfg(root, out, name, activation_norm=3.0, **kw))
    meta = json.loads((out / "sweep.json").read_text())
    scale = meta["progress"]["input_scale"]
    assert scale != 1.0 and meta["architecture"] == name
    saes = load_sweep(out)
    assert set(saes) == {2, 8} and all(type(s) is get(name).module for s in saes.values())
    ens = Ensemble.from_state_dict(load_file(str(checkpoint_weights(out))))
    rows = load_file(str(root / HOOK / "0.safetensors"))["activations"][:500].float()
    codes = ens.encode(rows * scale) / scale * decoder_norms(ens.params).unsqueeze(1)  # unit rows: codes * norms
    for i, k in enumerate([2, 8]):
        sae = saes[k]
        assert sae.threshold > 0
        torch.testing.assert_close(sae.threshold, ens.params["threshold"][i] / scale)
        torch.testing.assert_close(sae.encode(rows), codes[i], rtol=1e-4, atol=1e-5)
        l0 = (sae.encode(rows) > 0).sum(-1).double().mean().item()
        assert 0.3 * k < l0 < 3 * k, (k, l0)                                    # the threshold, not all latents
    assert [m["l0"] for m in result.metrics] == [m["l0"] for m in meta["members"]]


def test_sweep_saves_a_threshold_that_loads(chunk_root, tmp_path):  # noqa: F811
    check_sweep_saves_a_threshold_that_loads(chunk_root, tmp_path / "o", "batchtopk")


def check_killed_sweep_resumes_bit_exactly(root: Path, tmp_path: Path, name: str, monkeypatch, **kw) -> None:
    """Killed in the second repetition with the aux-K loss off, resumed: the uninterrupted run's weights, threshold
    and metrics."""
    monkeypatch.setattr(sweep_mod, "AUX_REFRESH_STEPS", 24)
    run_sweep(_cfg(root, tmp_path / "whole", name, n_repetitions=2, save_after_every=True, **kw))
    with sweep_killed_at_chunk(6):
        run_sweep(_cfg(root, tmp_path / "killed", name, n_repetitions=2, save_after_every=True, **kw))
    assert json.loads((tmp_path / "killed" / "checkpoint.json").read_text())["progress"]["step"] == 20
    run_sweep(_cfg(root, tmp_path / "killed", name, n_repetitions=2, save_after_every=True, resume=True, **kw))
    assert _same_weights(tmp_path / "whole", tmp_path / "killed")
    assert "threshold" in load_file(str(tmp_path / "whole" / "sweep.safetensors"))
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()


def test_killed_sweep_resumes_bit_exactly(chunk_root, tmp_path, monkeypatch):  # noqa: F811
    check_killed_sweep_resumes_bit_exactly(chunk_root, tmp_path, "batchtopk", monkeypatch)


def test_basic_l1_sweep_trains_batchtopk_end_to_end(chunk_root, tmp_path):  # noqa: F811
    out = tmp_path / "o"
    run = subprocess.run([sys.executable, str(REPO / "basic_l1_sweep.py"), "--architecture", "batchtopk",
                          "--dataset_dir", str(chunk_root / HOOK), "--output_dir", str(out), "--ratio", "2",
                          "--k_values", "2", "4", "--batch_size", "250", "--device", "cpu", "--holdout_rows", "0",
                          "--max_tokens", "2000"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    saes = load_sweep(out)
    assert set(saes) == {2, 4} and all(s.threshold > 0 for s in saes.values())
    bad = subprocess.run([sys.executable, str(REPO / "basic_l1_sweep.py"), "--architecture", "batchtopk",
                          "--dataset_dir", str(chunk_root / HOOK), "--output_dir", str(tmp_path / "b"),
                          "--k_values", "2", "--tied"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_a_k_above_the_dictionary_is_one_line(chunk_root, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match="--k_values 999 exceeds the dictionary size 64"):
        run_sweep(cfg_for(chunk_root, tmp_path / "o", architecture="batchtopk", k_values=[2, 999]))


def test_gather_high_activations_scores_by_the_threshold():
    from training.top_activations import SaeScorer
    torch.manual_seed(0)
    sae = BatchTopKAutoencoder(8, 32, 3, init_norm=1.0)                      # unit rows, as saved dictionaries
    with torch.no_grad():
        sae.threshold.fill_(0.05)
    x = _data(20, 8, dtype=torch.float32)
    scorer = SaeScorer(sae, torch.device("cpu"))
    codes = sae.encode(x)
    torch.testing.assert_close(scorer.codes_t(x), codes.T, rtol=1e-5, atol=1e-6)
    rows, feats = torch.arange(20).repeat_interleave(32), torch.arange(32).repeat(20)
    torch.testing.assert_close(scorer.at(x, rows, feats), codes.reshape(-1), rtol=1e-5, atol=1e-6)
    assert (codes == 0).any() and (codes > 0).any()
