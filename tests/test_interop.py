"""Interop: sweep members chosen by printed keys, SAELens export checked by our own reader, the foreign formats read
by training.load_dictionary (against independent re-implementations of each library's encode), the hub cache, and
(where the side venv with sae-lens exists) the SAELens check of `make interop`."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from interop.ours import HOOK, MODEL, fake_sweep, sweeps
from training import load_dictionary, load_sweep
from training.cli import UserError
from training.dictionary import SparseLinearAutoencoder, TopKAutoencoder
from training.pretrained import load_dictionary as load_hub
from training.architectures.gated import GatedAutoencoder
from training.architectures.jumprelu import JumpReLUAutoencoder
from training.saelens import ExportConfig, export_sweep
from training.sweep_files import load_member, select_member

ROOT = Path(__file__).resolve().parent.parent
X = 2 * torch.randn(256, 16, generator=torch.Generator().manual_seed(3))


def close(a, b, tol=1e-5):
    assert float((a - b).abs().max()) <= tol


# ------------------------------------------------------------------------------------- sweep members

def test_loaded_sweeps_are_frozen_and_members_found_by_printed_key(tmp_path, capsys):
    sweep = fake_sweep(tmp_path / "s", "l1", [1e-3, 0.4641589])
    saes = load_sweep(sweep)
    assert all(not p.requires_grad for m in saes.values() for p in m.parameters())
    assert all(not m.training for m in saes.values())
    assert all(p.requires_grad for p in load_sweep(sweep, trainable=True)[1e-3].parameters())
    with pytest.raises(KeyError, match=r"saes.member\(0.46\)"):
        saes[0.46]
    assert saes.member(0.46) is saes[0.4641589]
    assert "using the nearest member, l1 = 0.4641589" in capsys.readouterr().err
    saes.member(1e-3)
    assert capsys.readouterr().err == ""                                         # exact: nothing said
    with pytest.raises(UserError, match=r"--l1 0.3 is not in .* \(none within 5%\): its L1 values are 0.001, 0.464"):
        saes.member(0.3)
    key, one, meta = select_member(sweep, l1=0.464)
    assert key == 0.4641589 and meta["keys"] == [1e-3, 0.4641589]
    for name, p in saes[key].named_parameters():                                 # read alone: the same weights
        assert torch.equal(p, dict(one.named_parameters())[name])
    topk = fake_sweep(tmp_path / "t", "topk", [4, 8])
    assert load_member(topk, 8).k == 8
    with pytest.raises(UserError, match="--k 5 is not in the sweep .*: its k values are 4, 8"):
        select_member(topk, k=5)


# ------------------------------------------------------------------------------------- SAELens export

@pytest.mark.parametrize("arch, keys, tied", [("l1", [1e-3, 1e-2], False), ("l1", [1e-2], True), ("topk", [4, 8], False)])
def test_saelens_export_layout_and_round_trip(tmp_path, arch, keys, tied):
    sweep = fake_sweep(tmp_path / "s", arch, keys, tied=tied)
    folders = export_sweep(ExportConfig(sweep=str(sweep), all=True, out=str(tmp_path / "out")))
    assert [f.name for f in folders] == [f"{'l1' if arch == 'l1' else 'k'}_{k:g}" for k in keys]
    for folder, (key, ours) in zip(folders, load_sweep(sweep).items()):
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == ("standard" if arch == "l1" else "topk")
        assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"], cfg["apply_b_dec_to_input"]) == \
            (16, 48, "none", True)
        assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == MODEL
        assert cfg["metadata"]["context_size"] == 32 and cfg["metadata"]["sae_lens_version"] >= "6"
        if arch == "topk":
            assert cfg["k"] == key and cfg["rescale_acts_by_decoder_norm"] is False
        t = load_file(str(folder / "sae_weights.safetensors"))
        assert {n: tuple(v.shape) for n, v in t.items()} == \
            {"W_enc": (16, 48), "b_enc": (48,), "W_dec": (48, 16), "b_dec": (16,)}
        # SAELens' maths on the exported tensors, written out: act((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec
        pre = (X - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
        if arch == "l1":
            codes = pre.relu()
        else:
            top = pre.topk(key, dim=-1)
            codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        with torch.no_grad():
            close(codes, ours.encode(X))
            close(codes @ t["W_dec"] + t["b_dec"], ours.decode(ours.encode(X)))
            back = load_dictionary(folder)
            assert (back.hook, back.model, back.format) == (HOOK, MODEL, "saelens")
            assert type(back.module) is type(ours) and not any(p.requires_grad for p in back.module.parameters())
            close(back.module.encode(X), ours.encode(X))


def saelens_encode(t: dict[str, torch.Tensor], cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens 6's encode of an exported folder, written out from its documented maths (x - b_dec first)."""
    xc = x - t["b_dec"]
    if cfg["architecture"] == "gated":
        gate = xc @ t["W_enc"] + t["b_gate"]
        magnitude = xc @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]
        return magnitude.relu() * (gate > 0)
    pre = xc @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "topk":
        top = pre.topk(cfg["k"], dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    if cfg["architecture"] == "jumprelu":
        return pre.relu() * (pre > t["threshold"])
    assert cfg["architecture"] == "standard"
    return pre.relu()


@pytest.mark.parametrize("sweep_name", list(sweeps()))
def test_every_architecture_exports_to_saelens_and_reads_back(tmp_path, sweep_name):
    arch, keys, tied = sweeps()[sweep_name]
    sweep = fake_sweep(tmp_path / "s", arch, keys, tied=tied)
    folders = export_sweep(ExportConfig(sweep=str(sweep), all=True, out=str(tmp_path / "out")))
    assert len(folders) == len(keys)
    for folder, (key, ours) in zip(folders, load_sweep(sweep).items()):
        cfg = json.loads((folder / "cfg.json").read_text())
        t = load_file(str(folder / "sae_weights.safetensors"))
        with torch.no_grad():
            codes = ours.encode(X)
            assert codes.abs().sum() > 0 and (codes == 0).any()                    # some codes on, some off
            close(saelens_encode(t, cfg, X), codes)
            close(saelens_encode(t, cfg, X) @ t["W_dec"] + t["b_dec"], ours.decode(codes))
            close(load_dictionary(folder).module.encode(X), codes)


def test_export_needs_one_member_choice(tmp_path):
    sweep = fake_sweep(tmp_path / "s", "l1", [1e-3, 1e-2])
    with pytest.raises(UserError, match=r"give exactly one of --l1 \(or --key\) VALUE or --all"):
        export_sweep(ExportConfig(sweep=str(sweep), out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="is an L1 sweep: choose its dictionary with --l1"):
        export_sweep(ExportConfig(sweep=str(sweep), k=4, out=str(tmp_path / "o")))
    [folder] = export_sweep(ExportConfig(sweep=str(sweep), l1=0.0101, out=str(tmp_path / "o")))
    assert folder.name == "l1_0.01"


# ------------------------------------------------------------------------------------- foreign folders

def _random(*shape, scale=0.3, seed=0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _saelens_folder(path: Path, cfg: dict, tensors: dict) -> Path:
    path.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"d_in": 16, "d_sae": 48, "normalize_activations": "none",
                                               "metadata": {"sae_lens_version": "6.5.0", "hook_name": HOOK,
                                                            "model_name": MODEL}, **cfg}))
    return path


def test_saelens_jumprelu_gated_batchtopk_folders(tmp_path):
    W_enc, W_dec, b_dec = _random(16, 48, scale=0.25, seed=1), _random(48, 16, seed=2), _random(16, seed=3)
    b, thr = _random(48, seed=4), _random(48, seed=5).abs()
    jump = load_dictionary(_saelens_folder(tmp_path / "j", {"architecture": "jumprelu", "apply_b_dec_to_input": False},
                                           {"W_enc": W_enc, "b_enc": b, "W_dec": W_dec, "b_dec": b_dec,
                                            "threshold": thr}))
    pre = X @ W_enc + b                                                           # b_dec not subtracted
    assert isinstance(jump.module, JumpReLUAutoencoder) and jump.hook == HOOK
    close(jump.module.encode(X), pre.relu() * (pre > thr))
    r_mag, b_mag = _random(48, seed=6), _random(48, seed=7)
    gated = load_dictionary(_saelens_folder(tmp_path / "g", {"architecture": "gated"},
                                            {"W_enc": W_enc, "b_gate": b, "b_mag": b_mag, "r_mag": r_mag,
                                             "W_dec": W_dec, "b_dec": b_dec}))
    x_in = X - b_dec
    expected = ((x_in @ W_enc + b) > 0) * (x_in @ (W_enc * r_mag.exp()) + b_mag).relu()
    assert isinstance(gated.module, GatedAutoencoder)
    close(gated.module.encode(X), expected)
    close(gated.module.decode(expected), expected @ W_dec + b_dec)
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    bt = load_dictionary(_saelens_folder(tmp_path / "b", {"architecture": "batchtopk", "k": 8,
                                                          "rescale_acts_by_decoder_norm": False},
                                         {"W_enc": W_enc, "b_enc": b, "W_dec": unit, "b_dec": b_dec,
                                          "topk_threshold": torch.tensor(0.2)}))
    pre = x_in @ W_enc + b
    close(bt.module.encode(X), pre.relu() * (pre > 0.2))
    with pytest.raises(UserError, match="normalize_activations 'layer_norm' .* not supported"):
        load_dictionary(_saelens_folder(tmp_path / "n", {"architecture": "standard", "normalize_activations": "layer_norm"},
                                        {"W_enc": W_enc, "b_enc": b, "W_dec": W_dec, "b_dec": b_dec}))
    with pytest.raises(UserError, match="cannot reproduce"):                   # TopK ranking by pre, rows not unit
        load_dictionary(_saelens_folder(tmp_path / "t", {"architecture": "topk", "k": 4},
                                        {"W_enc": W_enc, "b_enc": b, "W_dec": 3 * unit, "b_dec": b_dec}))


def _sparsify_encode(x, t, k):
    """sparsify's SparseCoder.encode + decode, re-implemented: TopK(ReLU((x - b_dec) @ W.T + b)), @ W_dec + b_dec."""
    acts = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    top = acts.topk(k, dim=-1)
    codes = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
    return codes, codes @ t["W_dec"] + t["b_dec"]


def test_sparsify_folder(tmp_path):
    folder = tmp_path / "layers.6"
    folder.mkdir()
    W_dec = _random(48, 16, seed=1)
    t = {"encoder.weight": _random(48, 16, seed=2), "encoder.bias": _random(48, seed=3),
         "W_dec": W_dec / W_dec.norm(dim=-1, keepdim=True), "b_dec": _random(16, seed=4)}
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 3, "normalize_decoder": True,
                                                 "num_latents": 48, "k": 5, "multi_topk": False,
                                                 "skip_connection": False, "transcode": False, "d_in": 16}))
    sae = load_dictionary(folder)
    assert isinstance(sae.module, TopKAutoencoder) and sae.module.k == 5 and sae.format == "sparsify"
    assert sae.hook == "blocks.6.hook_resid_post"
    codes, x_hat = _sparsify_encode(X, t, 5)
    close(sae.module.encode(X), codes)
    close(sae.module.decode(sae.module.encode(X)), x_hat)


def _dl_folder(path: Path, dict_class: str, state: dict, **trainer) -> Path:
    path.mkdir(parents=True)
    torch.save(state, path / "ae.pt")
    (path / "config.json").write_text(json.dumps({"trainer": {"dict_class": dict_class, "activation_dim": 16,
                                                              "dict_size": 48, "lm_name": MODEL, "layer": 3,
                                                              **trainer}, "buffer": {"ctx_len": 128}}))
    return path


def test_dictionary_learning_folders(tmp_path):
    enc, dec = _random(48, 16, seed=1), _random(16, 48, seed=2)              # nn.Linear layouts
    bias, eb = _random(16, seed=3), _random(48, seed=4)
    std = load_dictionary(_dl_folder(tmp_path / "resid_post_layer_3" / "trainer_0", "AutoEncoder",
                                     {"encoder.weight": enc, "encoder.bias": eb, "decoder.weight": dec, "bias": bias}))
    assert isinstance(std.module, SparseLinearAutoencoder) and std.hook == "blocks.3.hook_resid_post"
    assert std.model == MODEL and std.context_size == 128
    f = torch.relu((X - bias) @ enc.T + eb)                                   # AutoEncoder.encode / decode
    close(std.module.encode(X), f)
    close(std.module.decode(f), f @ dec.T + bias)
    unit = dec / dec.norm(dim=0, keepdim=True)
    topk = load_dictionary(_dl_folder(tmp_path / "tk", "AutoEncoderTopK", {
        "encoder.weight": enc, "encoder.bias": eb, "decoder.weight": unit, "b_dec": bias,
        "k": torch.tensor(6, dtype=torch.int), "threshold": torch.tensor(-1.0)}, k=6))
    post = torch.relu((X - bias) @ enc.T + eb)                                # AutoEncoderTopK.encode
    top = post.topk(6, dim=-1)
    close(topk.module.encode(X), torch.zeros_like(post).scatter(-1, top.indices, top.values))
    bt = load_dictionary(_dl_folder(tmp_path / "bt", "BatchTopKSAE", {
        "encoder.weight": enc, "encoder.bias": eb, "decoder.weight": unit, "b_dec": bias,
        "k": torch.tensor(6, dtype=torch.int), "threshold": torch.tensor(0.15)}))
    close(bt.module.encode(X), post * (post > 0.15))                         # BatchTopKSAE.encode(use_threshold)
    W_enc, W_dec, thr = enc.T.contiguous(), dec.T.contiguous(), _random(48, seed=5).abs()
    jr = load_dictionary(_dl_folder(tmp_path / "jr", "JumpReluAutoEncoder",
                                    {"W_enc": W_enc, "b_enc": eb, "W_dec": W_dec, "b_dec": bias, "threshold": thr}))
    pre = X @ W_enc + eb                                                      # JumpReluAutoEncoder.encode
    close(jr.module.encode(X), torch.relu(pre * (pre > thr)))
    r_mag, gb, mb = _random(48, seed=6), _random(48, seed=7), _random(48, seed=8)
    gated = load_dictionary(_dl_folder(tmp_path / "g", "GatedAutoEncoder", {
        "encoder.weight": enc, "decoder.weight": dec, "decoder_bias": bias, "r_mag": r_mag, "gate_bias": gb,
        "mag_bias": mb}))
    x_enc = (X - bias) @ enc.T                                                # GatedAutoEncoder.encode
    close(gated.module.encode(X), ((x_enc + gb) > 0) * torch.relu(r_mag.exp() * x_enc + mb))


def test_pickles_are_never_unpickled(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"encoder": torch.nn.Linear(2, 2)}, folder / "ae.pt")          # a module object: needs unpickling
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    with pytest.raises(UserError, match="not a plain state dict this toolkit can read safely"):
        load_dictionary(folder)
    with pytest.raises(UserError, match="holds no dictionary this toolkit reads"):
        load_dictionary(tmp_path)


def test_hub_names_load_from_the_cache_offline(tmp_path, monkeypatch):
    sweep = fake_sweep(tmp_path / "s", "l1", [1e-2])
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--some-saes"
    export_sweep(ExportConfig(sweep=str(sweep), all=True, out=str(repo / "snapshots" / commit / "layer1")))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sae = load_hub("hf:someone/some-saes/layer1/l1_0.01", cache_dir=tmp_path / "cache")
    assert sae.hook == HOOK and sae.source == "hf:someone/some-saes/layer1/l1_0.01"
    close(sae.module.encode(X), load_sweep(sweep)[1e-2].encode(X))
    with pytest.raises(UserError, match="could not fetch hf:someone/other from the hub and it is not cached"):
        load_hub("hf:someone/other", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------- SAELens itself

SAELENS_PYTHON = Path(os.environ.get("SAELENS_VENV", ROOT.parent / "venv-saelens")) / "bin" / "python"


@pytest.mark.skipif(not SAELENS_PYTHON.exists(), reason="no side venv with sae-lens (make interop creates it)")
def test_saelens_loads_our_exports_and_we_load_its_saves(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda py, script, mode: subprocess.run([str(py), str(ROOT / "tests" / "interop" / script), mode,
                                                   str(tmp_path)], check=True, capture_output=True, text=True,
                                                  env=env).stdout
    run(sys.executable, "ours.py", "export")
    there = json.loads(run(SAELENS_PYTHON, "check_saelens.py", "check-export").splitlines()[-1])
    metrics = json.loads(run(SAELENS_PYTHON, "check_saelens.py", "check-metrics").splitlines()[-1])
    run(SAELENS_PYTHON, "check_saelens.py", "make-native")
    back = json.loads(run(sys.executable, "ours.py", "check-native").splitlines()[-1])
    assert there["max_abs_diff"] <= 1e-5 and back["max_abs_diff"] <= 1e-5
    assert metrics["worst_fraction_of_tolerance"] <= 1


def test_export_writes_log_density_from_the_members_features(tmp_path):
    from training.feature_file import FEATURES_JSON, FORMAT, write_features_json
    sweep = fake_sweep(tmp_path / "s", "topk", [4])
    meta = json.loads((sweep / "sweep.json").read_text())
    density = [0.0, 0.5] + [1e-3] * 46
    path = sweep / "features" / "k_4" / FEATURES_JSON
    header = {"format": FORMAT, "version": 1, "n_features": 48, "n_tokens": 1000,
              "source": {"kind": "sae", "sweep_sha256": meta["weights_sha256"]}}
    write_features_json(path, header, ({"id": i, "density": d} for i, d in enumerate(density)))
    [folder] = export_sweep(ExportConfig(sweep=str(sweep), k=4, out=str(tmp_path / "out")))
    log = load_file(str(folder / "sparsity.safetensors"))["sparsity"]
    assert log.shape == (48,) and log[0] == pytest.approx(-10.0) and log[1] == pytest.approx(math.log10(0.5))
    header["source"]["sweep_sha256"] = "another sweep's"                        # made from other weights: left out
    write_features_json(path, header, ({"id": i, "density": d} for i, d in enumerate(density)))
    [folder] = export_sweep(ExportConfig(sweep=str(sweep), k=4, out=str(tmp_path / "out")))
    assert not (folder / "sparsity.safetensors").exists()


def test_export_script_cli(tmp_path, capsys):
    sweep = fake_sweep(tmp_path / "s", "l1", [1e-3, 0.4641589])
    out = subprocess.run([sys.executable, str(ROOT / "export_saelens.py"), "--sweep", str(sweep), "--l1", "0.46",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and f"wrote {tmp_path / 'out' / 'l1_0.464159'}" in out.stdout
    assert "using the nearest member, l1 = 0.4641589" in out.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "export_saelens.py"), "--sweep", str(sweep), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "give exactly one of --l1 (or --key) VALUE or --all" in bad.stderr


def test_export_picks_any_architecture_member_by_key(tmp_path):
    sweep = fake_sweep(tmp_path / "s", "jumprelu", [1e-3, 1e-2])
    [folder] = export_sweep(ExportConfig(sweep=str(sweep), key="0.01", out=str(tmp_path / "o")))
    assert folder.name == "l0_coefficient_0.01" and json.loads((folder / "cfg.json").read_text())["architecture"] == \
        "jumprelu"
