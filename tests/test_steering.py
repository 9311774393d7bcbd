"""Steering: feature/strength parsing, sampling filters, the hook's exact effect (residual and attn.hook_z),
strength 0 = unsteered, CLI output and errors, and a measured steering effect on the embedded model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import load_sweep
from training.cli import UserError, run_cli
from training.dictionary import SparseLinearAutoencoder
from training.generate import GenerateConfig, generate
from training.models import load_model
from training.steering import (BLOCKS, SteerConfig, add_vector_hook, block_bar, block_levels, feature_activations,
                               filter_logits, generate_tokens, hook_activations, load_for_steering,
                               parse_feature_args, render_activations, run_steer, sample_next,
                               side_by_side, steer, steering_runs, steering_vector)
from training.sweep import SweepConfig, run_sweep
from training.sweep_files import select_member

HOOK = "blocks.1.hook_resid_post"
EMBEDDED = Path(__file__).resolve().parent.parent / "models" / "tiny-stdlib"


@pytest.fixture(scope="module")
def neox(tiny_neox_dir):
    """The tiny random GPT-NeoX fixture as a TransformerBridge."""
    return load_model(str(tiny_neox_dir), "cpu")


@pytest.fixture(scope="module")
def fixture_sweep(tiny_neox_dir, tmp_path_factory) -> Path:
    """A small L1 sweep (keys 1e-3, 1e-2, 1e-1; 64 features) at blocks.1.hook_resid_post of the tiny GPT-NeoX."""
    from conftest import fixture_documents
    root = tmp_path_factory.mktemp("steer-fixture")
    (root / "docs.txt").write_text("\n\n".join(fixture_documents(300)))
    generate(GenerateConfig(model=str(tiny_neox_dir), dataset=str(root / "docs.txt"), dataset_folder=str(root / "chunks"),
                            layers=[1], n_chunks=2, chunk_size=1000, context_length=32, device="cpu"), argv=["x"])
    run_sweep(SweepConfig(dataset_dir=str(root / "chunks" / HOOK), output_dir=str(root / "sweep"), ratio=2,
                          l1_value_min=-3, l1_value_max=-1, l1_value_n=3, batch_size=250, device="cpu",
                          center_init="mean", log_every=100))
    return root / "sweep"


def random_sae(d_in: int, d_hidden: int = 16, seed: int = 0) -> SparseLinearAutoencoder:
    """An L1 dictionary with random weights (unit decoder rows)."""
    torch.manual_seed(seed)
    sae = SparseLinearAutoencoder(d_in, d_hidden)
    with torch.no_grad():
        sae.encoder.normal_()
        sae.encoder_bias.fill_(0.1)
    return sae


# ------------------------------------------------------------------------------------- pure functions

def test_runs_from_features_and_strengths():
    assert steering_runs(7) == [{7: 8.0}]
    assert steering_runs([3, 5], [2, -4]) == [{3: 2.0, 5: 2.0}, {3: -4.0, 5: -4.0}]
    assert steering_runs({3: 1.5, 5: -2}) == [{3: 1.5, 5: -2.0}]
    with pytest.raises(UserError, match="not both"):
        steering_runs({3: 1.0}, 2.0)
    assert parse_feature_args(123, None, [2, 8]) == [{123: 2.0}, {123: 8.0}]
    assert parse_feature_args(None, ["4:-3", "9"], [1, 2]) == [{9: 1.0, 4: -3.0}, {9: 2.0, 4: -3.0}]
    assert parse_feature_args(None, ["4:-3", "9:0.5"], None) == [{4: -3.0, 9: 0.5}]
    assert parse_feature_args(1, ["2"], None) == [{1: 8.0, 2: 8.0}]
    with pytest.raises(UserError, match="--strength has no effect"):
        parse_feature_args(None, ["4:-3"], [2.0])
    with pytest.raises(UserError, match="bad feature 'x:1'"):
        parse_feature_args(None, ["x:1"], None)
    with pytest.raises(UserError, match="no feature to steer"):
        parse_feature_args(None, None, [1.0])


def test_steering_vector_uses_unit_decoder_directions():
    sae = random_sae(4, 3)
    with torch.no_grad():
        sae.decoder.copy_(torch.tensor([[3.0, 0, 0, 4], [0, 2, 0, 0], [1, 1, 1, 1]]))
        sae.center.fill_(100.0)  # no center in the vector
    assert torch.allclose(steering_vector(sae, {0: 10.0}), torch.tensor([6.0, 0, 0, 8]))
    assert torch.allclose(steering_vector(sae, {0: 5.0, 1: -1.0}), torch.tensor([3.0, -1, 0, 4]))
    with pytest.raises(UserError, match=r"feature 3 is out of range: this dictionary has features 0\.\.2"):
        steering_vector(sae, {3: 1.0})


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    kept = lambda out: torch.isfinite(out).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False]
    # mass strictly before each sorted token: 0, 0.5, 0.8 -> keep while below top_p
    assert kept(filter_logits(logits, top_p=0.7)) == [True, True, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True]
    assert kept(filter_logits(logits[[2, 0, 1]], top_p=0.6)) == [False, True, True]
    g = torch.Generator().manual_seed(0)
    assert sample_next(torch.tensor([0.0, 5.0, 1.0]), g, temperature=0) == 1
    assert all(sample_next(torch.tensor([0.0, 5.0, 1.0]), g, top_k=1) == 1 for _ in range(20))
    draws = [sample_next(torch.tensor([0.0, 0.0, -math.inf]), g) for _ in range(200)]
    assert 2 not in draws and 60 < draws.count(0) < 140


def test_block_characters():
    assert BLOCKS == "▁▂▃▄▅▆▇█"
    values = torch.tensor([0.0, 0.1, 0.5, 0.51, 1.0, -1.0, 2.0])
    # ceil(8 * v / vmax) clipped to 1..8; 0 for v <= 0
    assert block_levels(values, 1.0) == [0, 1, 4, 5, 8, 0, 8]
    assert block_bar(values, 1.0) == " ▁▄▅█ █"
    assert block_bar(values, 0.0) == " " * 7
    shown = render_activations(["de", "f\n  ", "x"], torch.tensor([0.0, 1.0, 0.5]), 1.0, 80).splitlines()
    assert shown == ["def↵", "  ██", "  x", "██▄"]
    wrapped = render_activations(["abc", "de", "\tf"], torch.tensor([1.0, 0.0, 1.0]), 1.0, 5, [True, True, False])
    assert wrapped == "abcde\n███\n⇥f\n"  # wrapped at 5 characters; the last token has no bar


def test_side_by_side_and_stacked():
    out = side_by_side([("a", "one two three"), ("b", "four\nfive")], 30, min_column=10).splitlines()
    assert out[0].startswith("a") and "│ b" in out[0] and "─┼─" in out[1]
    assert out[2].startswith("one two three") and out[2].endswith("│ four") and out[3].endswith("│ five")
    stacked = side_by_side([("a", "x"), ("b", "y")], 40, min_column=30)
    assert stacked == "── a ──\nx\n\n── b ──\ny"


# ------------------------------------------------------------------------------------- hooks on the bridge

@pytest.mark.parametrize("hook, downstream", [("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"),
                                              ("blocks.1.attn.hook_z", None)])
def test_hook_adds_exactly_strength_times_unit_decoder(neox, hook, downstream):
    n_heads, d_head = neox.cfg.n_heads, neox.cfg.d_head
    sae = random_sae(neox.cfg.d_model if "resid" in hook else n_heads * d_head)
    with torch.no_grad():
        sae.decoder[3] *= 2.5  # not unit: the vector must still be unit * strength
    seen: dict[str, torch.Tensor] = {}
    capture = lambda key: (lambda act, hook: seen.__setitem__(key, act.clone()))  # noqa: E731
    tokens = torch.tensor([[5, 17, 40, 3, 99, 12]])
    vector = steering_vector(sae, {3: 6.0})  # [d_in]
    hooks = [(hook, capture("in")), (hook, add_vector_hook(vector)), (hook, capture("out"))]
    if downstream:
        hooks.append((downstream, capture("next")))
    with torch.no_grad():
        clean = neox(tokens, return_type="logits")
        with neox.hooks(fwd_hooks=hooks):
            steered = neox(tokens, return_type="logits")
        after = neox(tokens, return_type="logits")
    unit = sae.decoder[3].detach() / sae.decoder[3].detach().norm()
    expected_shape = (1, 6, n_heads, d_head) if "hook_z" in hook else (1, 6, neox.cfg.d_model)
    assert seen["in"].shape == expected_shape
    assert torch.allclose(vector, 6.0 * unit, atol=1e-6)
    # the hook's output is exactly its input + the vector (heads reshaped), at every position
    assert torch.equal(seen["out"], seen["in"] + vector.reshape(expected_shape[2:]))
    assert torch.allclose((seen["out"] - seen["in"]).flatten(2), 6.0 * unit.expand(1, 6, -1), atol=1e-5)
    if downstream:
        assert torch.equal(seen["next"], seen["out"])  # the rest of the model reads the steered value
    assert (steered - clean).abs().max() > 1e-4
    assert torch.equal(after, clean)  # the hook is gone after the context


def test_hook_width_mismatch_is_one_line(neox):
    hook = add_vector_hook(torch.ones(7))
    with pytest.raises(UserError, match=r"7 values but the activation at .* is \[1, 6, 32\]"):
        hook(torch.zeros(1, 6, 32), None)


def test_hook_activations_match_hugging_face(neox, tiny_neox_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_neox_dir)).eval()
    ids = [5, 17, 40, 3, 99, 12]
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]  # after block 0
    assert torch.allclose(hook_activations(neox, "blocks.0.hook_resid_post", ids), ref, atol=1e-5)
    z = hook_activations(neox, "blocks.0.attn.hook_z", ids)
    assert z.shape == (6, neox.cfg.n_heads * neox.cfg.d_head)
    sae = random_sae(32)
    toks, acts = feature_activations(neox, sae, "blocks.0.hook_resid_post", ids, [2, 7])
    assert len(toks) == 6 and torch.allclose(acts, sae.encode(ref)[:, [2, 7]], atol=1e-5)


# ------------------------------------------------------------------------------------- generation

@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9),
                                      dict(temperature=0.0)])
def test_strength_zero_equals_unsteered(neox, sampling):
    sae = random_sae(32)
    result = steer(neox, sae, HOOK, [3], [0.0, 50.0], prompt="The quiet cat", max_new_tokens=12, seed=3,
                   stop_at_eos=False, **sampling)
    assert len(result.unsteered.token_ids) == 12
    assert result.steered[0].token_ids == result.unsteered.token_ids
    assert result.steered[0].text == result.unsteered.text
    # a second run with the same seed repeats itself; the activations are those of the unmodified model
    again = steer(neox, sae, HOOK, 3, 0.0, prompt="The quiet cat", max_new_tokens=12, seed=3, stop_at_eos=False,
                  **sampling)
    assert again.unsteered.token_ids == result.unsteered.token_ids
    _, acts = feature_activations(neox, sae, HOOK, result.prompt_ids + result.steered[1].token_ids, [3])
    assert torch.equal(acts, result.steered[1].activations)


def test_sampling_depends_on_seed_and_matches_a_manual_loop(neox):
    prompt = neox.to_tokens("The quiet cat")[0].tolist()
    a = generate_tokens(neox, prompt, 15, seed=0)
    assert generate_tokens(neox, prompt, 15, seed=1) != a
    g, ids = torch.Generator().manual_seed(0), list(prompt)
    with torch.no_grad():
        for _ in range(15):
            probs = neox(torch.tensor([ids]), return_type="logits")[0, -1].softmax(-1)
            ids.append(int(torch.multinomial(probs, 1, generator=g)))
    assert a == ids[len(prompt):]


# ------------------------------------------------------------------------------------- CLI

def cli(argv: list[str]) -> None:
    """Run steer.py's main on `argv`."""
    run_cli(run_steer, "", SteerConfig, argv)


def test_cli_prints_continuations_bars_and_summary(fixture_sweep, tmp_path, capsys):
    out = tmp_path / "r.json"
    cli(["--sweep", str(fixture_sweep), "--l1", "1e-2", "--feature", "5", "--strength", "0", "4", "--prompt",
         "The quiet cat", "--max_new_tokens", "10", "--seed", "0", "--width", "120", "--save_json", str(out),
         "--no-stop_at_eos"])
    printed = capsys.readouterr().out
    assert "hook blocks.1.hook_resid_post" in printed and "l1=0.01 (64 features)" in printed
    assert "unsteered" in printed and "#5×0" in printed and "#5×4" in printed and "│" in printed
    assert "feature 5 on the steered text (#5×4), read by the unmodified model" in printed
    assert any(c in printed for c in BLOCKS)
    saved = json.loads(out.read_text())
    assert [r["label"] for r in saved["runs"]] == ["unsteered", "#5×0", "#5×4"]
    assert saved["runs"][0]["token_ids"] == saved["runs"][1]["token_ids"] and len(saved["runs"][0]["token_ids"]) == 10
    assert len(saved["runs"][2]["activations"]) == len(saved["prompt_ids"]) + 10


def test_notebook_api_and_topk_sweeps(fixture_sweep, tmp_path):
    model, sae, hook = load_for_steering(fixture_sweep, l1=0.01)
    assert hook == HOOK and sae.decoder.shape == (64, 32)
    result = steer(model, sae, hook, {5: 3.0, 9: -2.0}, prompt="The quiet cat", max_new_tokens=5, stop_at_eos=False)
    assert result.features == [5, 9] and result.steered[0].label == "#5×3 #9×-2"
    assert "unsteered" in str(result) and result.steered[0].activations.shape == (len(result.prompt_ids) + 5, 2)
    run_sweep(SweepConfig(dataset_dir=str(fixture_sweep.parent / "chunks" / HOOK), output_dir=str(tmp_path / "tk"),
                          architecture="topk", k_values=[2, 8], ratio=2, batch_size=250, max_tokens=500, device="cpu"))
    key, sae, meta = select_member(tmp_path / "tk", k=8)
    assert key == 8 and sae.k == 8
    with pytest.raises(UserError, match="--k 5 is not in the sweep .*: its k values are 2, 8"):
        select_member(tmp_path / "tk", k=5)
    with pytest.raises(UserError, match="is a TopK sweep: choose its dictionary with --k"):
        select_member(tmp_path / "tk", l1=0.01)


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "{missing}", "--feature", "1"], "sweep .*missing does not exist"),
    (["--l1", "0.5", "--feature", "1"], r"--l1 0.5 is not in the sweep .*: its L1 values are 0.001, 0.01, 0.1"),
    (["--feature", "1"], r"holds 3 dictionaries: choose one with --l1 \(one of 0.001, 0.01, 0.1\)"),
    (["--k", "4", "--feature", "1"], r"is an L1 sweep: choose its dictionary with --l1"),
    (["--l1", "0.01", "--feature", "64"], r"feature 64 is out of range: this dictionary has features 0\.\.63"),
    (["--l1", "0.01", "--features", "3:1", "-1"], r"feature -1 is out of range"),
    (["--l1", "0.01", "--feature", "1", "--prompt", ""], "empty prompt: pass --prompt TEXT"),
    (["--l1", "0.01", "--feature", "1", "--top_p", "1.5"], r"--top_p must be in \(0, 1\]"),
    (["--l1", "0.01", "--feature", "1", "--max_new_tokens", "63"], "exceeds the model's 64 positions"),
    (["--l1", "0.01", "--feature", "1", "--model", "/nonexistent/model"], "model folder /nonexistent/model does not exist"),
])
def test_cli_errors_are_one_line(fixture_sweep, tmp_path, capsys, argv, message):
    argv = [a.replace("{missing}", str(tmp_path / "missing")) for a in argv]
    if "--sweep" not in argv:
        argv = ["--sweep", str(fixture_sweep)] + argv
    if "--prompt" not in argv:
        argv += ["--prompt", "The cat"]
    with pytest.raises(SystemExit) as info:
        cli(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1

    assert re.search(message, err), err


# ------------------------------------------------------------------------------------- the embedded model

EMBEDDED_HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def embedded_sweep(tmp_path_factory) -> Path:
    """Stage 1 chunks of the embedded model (python-docs, last block's residual) and a one-member L1 sweep on them."""
    assert (EMBEDDED / "config.json").exists(), (
        f"the embedded model {EMBEDDED} is missing: train it with train_tiny_lm.py (this test must not be skipped)")
    root = tmp_path_factory.mktemp("steer-embedded")
    generate(GenerateConfig(model=str(EMBEDDED), dataset="python-docs", dataset_folder=str(root / "chunks"),
                            layers=[1], n_chunks=8, chunk_size=2000, context_length=64, device="cpu"), argv=["x"])
    run_sweep(SweepConfig(dataset_dir=str(root / "chunks" / EMBEDDED_HOOK), output_dir=str(root / "sweep"), ratio=4,
                          l1_values=[0.3], batch_size=500, n_repetitions=8, adam_lr=3e-3, device="cpu",
                          center_init="mean", log_every=1000))
    return root


def persistent_features(model, sae, tokens: torch.Tensor, n: int) -> list[int]:
    """The `n` features with the highest persistence P(fires at t+1 | fires at t) on `tokens: [rows, seq]`
    (unmodified model), among those firing on 0.5%..30% of the tokens: features of a state that lasts
    (inside code, a list, a heading...) rather than of one token, the ones a constant push can sustain."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[EMBEDDED_HOOK], return_type=None)
        act = cache[EMBEDDED_HOOK]
        fire = sae.encode(act.reshape(-1, act.shape[-1])).reshape(*tokens.shape, -1) > 0  # [rows, seq, d_hidden]
    density = fire.float().mean((0, 1))
    persistence = (fire[:, :-1] & fire[:, 1:]).float().sum((0, 1)) / fire[:, :-1].float().sum((0, 1)).clamp(min=1)
    eligible = (density > 0.005) & (density < 0.3)
    return torch.where(eligible, persistence, torch.tensor(-1.0)).argsort(descending=True)[:n].tolist()


PROMPTS = ["The following example shows how to", "import os\n", "Return the"]


def steering_effects(model, sae, features: list[int], strength: float, seed: int = 0) -> torch.Tensor:
    """effects: [n, n], effects[i, j] = mean activation of feature j on the tokens generated while steering
    feature i at `strength`, minus that on the unsteered continuation (30 tokens, temperature 1, the same
    seed), averaged over PROMPTS. The diagonal is the steered feature itself."""
    effects = torch.zeros(len(features), len(features))
    for prompt in PROMPTS:
        r = steer(model, sae, EMBEDDED_HOOK, [{f: strength} for f in features], prompt=prompt, max_new_tokens=30,
                  seed=seed)
        base = r.mean_activation(r.unsteered)  # [n], columns in the order of `features`
        effects += torch.stack([r.mean_activation(run) - base for run in r.steered]) / len(PROMPTS)
    return effects


def test_positive_strength_raises_the_feature_on_the_steered_text(embedded_sweep):
    model = load_model(str(EMBEDDED), "cpu")
    sae = load_sweep(embedded_sweep / "sweep")[0.3]
    tokens = load_file(str(embedded_sweep / "chunks" / "contexts" / "0.safetensors"))["tokens"][:64]
    features = persistent_features(model, sae, tokens, 8)
    effects = steering_effects(model, sae, features, 16.0)
    own = effects.diag()  # [8]: each feature's rise when it is the one steered
    others = (effects.sum(0) - own) / (len(features) - 1)  # [8]: its mean rise when another feature is steered
    # measured over 3 sweep seeds x 2 sampling seeds: own rise 0.29..0.87 (mean of 8 features), others' 0.0..0.19,
    # 5-8 of the 8 features rise; the activations themselves are 0..~3
    assert own.mean() > 0.1, effects
    assert own.mean() > others.mean() + 0.1, effects


def test_greedy_loop_matches_hugging_face_generate():
    assert (EMBEDDED / "config.json").exists(), f"the embedded model {EMBEDDED} is missing"
    from transformers import AutoModelForCausalLM
    model = load_model(str(EMBEDDED), "cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(EMBEDDED)).eval()
    prompt = model.to_tokens("def read_file(path):")[0].tolist()
    ours = generate_tokens(model, prompt, 20, temperature=0)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref


def test_pretrained_dictionary_steers_like_the_sweep_member(fixture_sweep, tmp_path):
    from training.saelens import ExportConfig, export_sweep
    [folder] = export_sweep(ExportConfig(sweep=str(fixture_sweep), l1=0.01, out=str(tmp_path / "saelens")))
    _, sae, hook = load_for_steering(None, sae=str(folder))                  # hook and model from its cfg.json
    model, member, _ = load_for_steering(fixture_sweep, l1=0.0101)           # nearest key, within 5%
    assert hook == HOOK and torch.allclose(sae.decoder, member.decoder, atol=1e-6)
    a = steer(model, sae, hook, {5: 3.0}, prompt="The quiet cat", max_new_tokens=5, stop_at_eos=False)
    b = steer(model, member, hook, {5: 3.0}, prompt="The quiet cat", max_new_tokens=5, stop_at_eos=False)
    assert a.steered[0].token_ids == b.steered[0].token_ids
    with pytest.raises(UserError, match="--sae names the dictionary: drop --l1"):
        load_for_steering(None, l1=0.01, sae=str(folder))
