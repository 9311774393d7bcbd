"""bench/peers.py: the common encode/decode rule on hand-computed tensors, and the "reference" peer end to end.

The library peers (SAELens, dictionary_learning, sparsify) need side venvs installed from PyPI, so they are
exercised by hand (`python bench/peers.py --smoke DIR`), not here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.peers import (PEERS, WEIGHT_NAMES, decode_peer, encode_peer, ensure_env, load_peer, make_synthetic,
                         train_peer)


def tiny_weights() -> dict[str, torch.Tensor]:
    # d_in = 2, d_hidden = 3
    return {"W_enc": torch.tensor([[1.0, -1.0, 2.0], [0.5, 1.0, -1.0]]), "b_enc": torch.tensor([0.0, 0.5, -1.0]),
            "W_dec": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), "b_dec": torch.tensor([1.0, -1.0])}


def test_encode_relu_with_and_without_b_dec():
    w = tiny_weights()
    x = torch.tensor([[3.0, 1.0], [1.0, -1.0]])
    # x - b_dec = [[2, 2], [0, 0]]; @ W_enc = [[3, 0, 2], [0, 0, 0]]; + b_enc = [[3, .5, 1], [0, .5, -1]]
    codes = encode_peer(w, {"activation": "relu", "k": None, "subtract_b_dec": True}, x)
    assert torch.allclose(codes, torch.tensor([[3.0, 0.5, 1.0], [0.0, 0.5, 0.0]]))
    # without the shift: x @ W_enc = [[3.5, -2, 5], [0.5, -2, 3]]; + b_enc = [[3.5, -1.5, 4], [0.5, -1.5, 2]]
    codes = encode_peer(w, {"activation": "relu", "k": None, "subtract_b_dec": False}, x)
    assert torch.allclose(codes, torch.tensor([[3.5, 0.0, 4.0], [0.5, 0.0, 2.0]]))
    # decode: codes @ W_dec + b_dec = [[3.5 + 4, 4] + [1, -1], [0.5 + 2, 2] + [1, -1]]
    assert torch.allclose(decode_peer(w, codes), torch.tensor([[8.5, 3.0], [3.5, 1.0]]))


def test_encode_topk_keeps_k_largest_then_relu():
    w = tiny_weights()
    x = torch.tensor([[3.0, 1.0], [1.0, -1.0]])
    # pre (with shift) = [[3, .5, 1], [0, .5, -1]] -> top 1: [[3, 0, 0], [0, .5, 0]]
    codes = encode_peer(w, {"activation": "topk", "k": 1, "subtract_b_dec": True}, x)
    assert torch.allclose(codes, torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0]]))
    # top 2: [[3, 0, 1], [0, .5, 0]] (second row keeps 0 and .5; relu leaves the 0 at 0)
    codes = encode_peer(w, {"activation": "topk", "k": 2, "subtract_b_dec": True}, x)
    assert torch.allclose(codes, torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.5, 0.0]]))
    # a negative pre among the top k is still cut by the relu
    w2 = dict(w, b_enc=torch.tensor([-10.0, -10.0, -10.0]))
    codes = encode_peer(w2, {"activation": "topk", "k": 2, "subtract_b_dec": True}, x)
    assert (codes == 0).all()
    with pytest.raises(ValueError):
        encode_peer(w, {"activation": "topk", "k": 4, "subtract_b_dec": True}, x)
    with pytest.raises(ValueError):
        encode_peer(w, {"activation": "gelu", "k": None, "subtract_b_dec": True}, x)


def test_load_peer_checks_shapes(tmp_path):
    w = tiny_weights()
    spec = {"peer": "x", "activation": "relu", "k": None, "subtract_b_dec": True}
    save_file(w, str(tmp_path / "weights.safetensors"))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    weights, got = load_peer(tmp_path)
    assert got == spec and set(weights) == set(WEIGHT_NAMES)
    save_file(dict(w, b_enc=torch.zeros(4)), str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="b_enc"):
        load_peer(tmp_path)


def test_reference_peer_end_to_end(tmp_path):
    assert PEERS == ("saelens", "dictionary_learning", "sparsify", "reference")
    data = make_synthetic(tmp_path / "acts.npy", n=50_000, d_in=16, n_dirs=64, mean_active=3.0)
    out = tmp_path / "ref"
    spec = train_peer("reference", data, out, tokens=48_000, batch_size=256, lr=3e-3, d_hidden=64, l1=1.0,
                      threads=1)
    assert spec["peer"] == "reference" and spec["activation"] == "relu" and spec["subtract_b_dec"] is True
    assert spec["tokens"] == 48_000 and spec["batch_size"] == 256 and spec["settings"]["steps"] == 188
    assert spec["settings"]["l1"] == 1.0 and spec["seconds"] > 0 and spec["settings"]["torch_threads"] == 1
    assert spec["settings"]["rule_check"]["max_abs_diff_x_hat"] < 1e-4
    raw = load_file(str(out / "weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in raw.items()} == {"W_enc": (16, 64), "b_enc": (64,), "W_dec": (64, 16),
                                                          "b_dec": (16,)}
    assert all(v.dtype == torch.float32 for v in raw.values())
    assert torch.allclose(raw["W_dec"].norm(dim=1), torch.ones(64), atol=1e-5)  # rows renormalised each step
    weights, spec2 = load_peer(out)
    assert spec2 == spec
    x = torch.from_numpy(np.load(data)[-2000:])  # held out
    codes = encode_peer(weights, spec, x)
    x_hat = decode_peer(weights, codes)
    fvu = (((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item()
    l0 = (codes > 0).float().sum(-1).mean().item()
    assert fvu < 0.6 and 0 < l0 < 64, (fvu, l0)


def test_train_peer_reports_runner_failure(tmp_path):
    data = tmp_path / "acts.npy"
    np.save(data, np.zeros((100, 4), dtype=np.float32))
    with pytest.raises(RuntimeError, match="fewer than tokens"):
        train_peer("reference", data, tmp_path / "out", tokens=1000, d_hidden=8)


def test_ensure_env_reference_is_our_python():
    import sys
    assert str(ensure_env("reference")) == sys.executable
    with pytest.raises(ValueError):
        ensure_env("nope")


def test_train_peer_reuses_only_an_identical_request(tmp_path, capsys):
    data = make_synthetic(tmp_path / "acts.npy", n=6_000, d_in=8, n_dirs=16, mean_active=2.0)
    out = tmp_path / "ref"
    kw = dict(tokens=4_096, batch_size=256, lr=3e-3, d_hidden=16, l1=1.0, threads=1)
    first = train_peer("reference", data, out, **kw)
    again = train_peer("reference", data, out, reuse=True, **kw)
    assert again == first and "reusing" in capsys.readouterr().out
    changed = train_peer("reference", data, out, reuse=True, **{**kw, "l1": 0.5})   # another request: retrained
    assert changed["settings"]["l1"] == 0.5 and "reusing" not in capsys.readouterr().out
    train_peer("reference", data, out, **{**kw, "l1": 0.5})                         # reuse off: always retrained
    assert "reusing" not in capsys.readouterr().out
