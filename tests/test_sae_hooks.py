"""Dictionaries at hooks (training.sae_hooks): capture, splice modes, error-preserving ablation, attribution leaves
and gradients, on residual, MLP and attention hooks of the tiny random GPT-NeoX; the public splice API; and that
every tool captures activations through the one `run_with_cache` call."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import training
from training.cli import UserError
from training.dictionary import SparseLinearAutoencoder, TopKAutoencoder
from training.models import load_model
from training.sae_hooks import (ablate_each, ablate_features, capture, run_with_saes, splice, splice_hook)

REPO = Path(__file__).resolve().parent.parent
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.0.attn.hook_z", "blocks.1.hook_attn_out"]


@pytest.fixture(scope="module")
def neox(tiny_neox_dir):
    """The tiny random GPT-NeoX fixture as a TransformerBridge."""
    return load_model(str(tiny_neox_dir), "cpu")


@pytest.fixture(scope="module")
def tokens(neox) -> torch.Tensor:
    """Two rows of fixture text, [2, 12]."""
    torch.manual_seed(0)
    return torch.randint(1, neox.cfg.d_vocab, (2, 12))


def width(model, hook: str, tokens: torch.Tensor) -> int:
    """Flattened activation width at `hook`."""
    _, acts = capture(model, tokens[:, :2], [hook])
    return math.prod(acts[hook].shape[2:])


def random_sae(d_in: int, d_hidden: int = 24, seed: int = 0, topk: int | None = None):
    """A dictionary with random weights whose features fire often (positive bias)."""
    torch.manual_seed(seed)
    sae = TopKAutoencoder(d_in, d_hidden, topk) if topk else SparseLinearAutoencoder(d_in, d_hidden)
    with torch.no_grad():
        sae.encoder.normal_()
        sae.encoder_bias.fill_(0.2)
        sae.decoder.normal_()
        sae.center.normal_()
    return sae


@pytest.mark.parametrize("hook", HOOKS)
def test_read_codes_are_the_dictionary_on_the_same_hook(neox, tokens, hook):
    """Codes recorded while splicing are encode() of the very activation `capture` gives at that hook."""
    sae = random_sae(width(neox, hook, tokens))
    clean, acts = capture(neox, tokens, [hook], logits=True)
    with splice(neox, {hook: sae}, "read") as rec:
        logits = neox(tokens, return_type="logits")
    assert torch.equal(logits, clean)                                   # reading changes nothing
    x = acts[hook].reshape(2, 12, -1)
    assert torch.allclose(rec.codes[hook], sae.encode(x.reshape(24, -1)).reshape(2, 12, -1))
    assert (rec.codes[hook] > 0).any()


@pytest.mark.parametrize("hook", HOOKS)
def test_ablation_that_changes_nothing_is_exactly_the_clean_run(neox, tokens, hook):
    sae = random_sae(width(neox, hook, tokens), topk=5)
    clean, _ = capture(neox, tokens, [hook], logits=True)
    with splice(neox, {hook: sae}, edits={hook: ablate_each([-1, -1])}) as rec:
        same = neox(tokens, return_type="logits")
    assert torch.equal(same, clean)
    busiest = int(rec.codes[hook][1].sum(0).argmax())                    # fires in row 1
    with splice(neox, {hook: sae}, edits={hook: ablate_each([-1, busiest])}):
        one = neox(tokens, return_type="logits")
    assert torch.equal(one[0], clean[0]) and not torch.allclose(one[1], clean[1])


@pytest.mark.parametrize("hook", HOOKS)
def test_ablation_keeps_the_error_term(neox, tokens, hook):
    """Ablating features F is the clean activation minus sum_{i in F} f_i * decoder_i (the error term kept),
    checked against a hand-written hook."""
    sae = random_sae(width(neox, hook, tokens))
    feats = [1, 4, 7]

    def by_hand(act, hook=None):
        flat = act.reshape(act.shape[0] * act.shape[1], -1)
        f = sae.encode(flat)[:, feats]                                      # [n, 3]
        return (flat - f @ sae.decoder[feats]).reshape(act.shape)

    want = neox.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, by_hand)])
    with splice(neox, {hook: sae}, edits={hook: ablate_features(feats)}):
        got = neox(tokens, return_type="logits")
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("mode", ["sae", "error", "zero"])
def test_splice_modes_match_the_evaluation_hook(neox, tokens, mode):
    """run_with_saes gives exactly what the evaluation's splice hook gave with a precomputed reconstruction
    (keep mask: the first position keeps its clean activation)."""
    hook = "blocks.0.hook_resid_post"
    sae = random_sae(neox.cfg.d_model)
    keep = torch.zeros(2, 12, dtype=torch.bool)
    keep[:, 0] = True
    _, acts = capture(neox, tokens, [hook])
    x_hat = sae.decode(sae.encode(acts[hook].reshape(24, -1).float()))
    want = neox.run_with_hooks(tokens, return_type="logits",
                               fwd_hooks=[(hook, splice_hook(lambda a: x_hat, mode, keep))])
    got, codes = run_with_saes(neox, tokens, {hook: None if mode == "zero" else sae}, mode, keep=keep)
    assert torch.equal(got, want)
    if mode == "error":
        clean, _ = capture(neox, tokens, [hook], logits=True)
        assert torch.allclose(got, clean, atol=1e-5)


def test_run_with_saes_is_differentiable(neox, tokens):
    """Gradients reach the dictionaries' weights and the codes of both spliced hooks."""
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    saes = {h: random_sae(neox.cfg.d_model, seed=i) for i, h in enumerate(hooks)}
    logits, codes = run_with_saes(neox, tokens, saes, "sae")
    assert set(codes) == set(hooks) and codes[hooks[0]].shape == (2, 12, 24)
    g = torch.autograd.grad(logits[:, -1, 5].sum(), [saes[hooks[0]].decoder, codes[hooks[1]]])
    assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0


def test_attribution_leaves_give_the_gradient_of_the_output(neox, tokens):
    """Attribution splicing: the forward value is the clean one, and the leaves' gradient equals the gradient of
    the same quantity with respect to a hand-made codes leaf."""
    hook = "blocks.0.hook_resid_post"
    sae = random_sae(neox.cfg.d_model)
    clean, _ = capture(neox, tokens, [hook], logits=True)
    with torch.enable_grad(), splice(neox, {hook: sae}, attribution=True) as rec:
        logits = neox(tokens, return_type="logits")
        g_leaf, g_err = torch.autograd.grad(logits[0, -1, 3], [rec.leaves[hook], rec.errors[hook]])
    assert torch.allclose(logits, clean, atol=1e-5)
    # d logit / d error = d logit / d activation, and d / d codes = that times the decoder
    act = {}

    def leaf_hook(a, hook=None):
        act["x"] = a.detach().requires_grad_(True)
        return act["x"]

    with torch.enable_grad():
        out = neox.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, leaf_hook)])
        g_x, = torch.autograd.grad(out[0, -1, 3], [act["x"]])
    assert torch.allclose(g_err, g_x, atol=1e-5, rtol=1e-3)
    assert torch.allclose(g_leaf, g_x @ sae.decoder.detach().T, atol=1e-4, rtol=1e-3)


def test_errors_are_one_line(neox, tokens):
    with pytest.raises(UserError, match="no hook 'blocks.9.hook_resid_post'"):
        with splice(neox, {"blocks.9.hook_resid_post": random_sae(8)}):
            pass
    with pytest.raises(UserError, match="reads 8 values but the model's activation there has 32"):
        run_with_saes(neox, tokens, {"blocks.0.hook_resid_post": random_sae(8)})


def test_public_api_is_exported_lazily(neox, tokens):
    hook = "blocks.1.hook_resid_post"
    sae = random_sae(neox.cfg.d_model)
    a, ca = training.run_with_saes(neox, tokens, {hook: sae})
    with training.splice(neox, {hook: sae}, mode="sae") as rec:
        b = neox(tokens, return_type="logits")
    assert torch.equal(a, b) and torch.equal(ca[hook], rec.codes[hook])


def test_one_run_with_cache_in_the_library():
    """Every tool captures through training.sae_hooks.capture (tiny_lm's smoke check aside)."""
    sites = {p.name: len(re.findall(r"\.run_with_cache\(", p.read_text())) for p in (REPO / "training").glob("*.py")}
    assert {n: c for n, c in sites.items() if c} == {"sae_hooks.py": 1, "tiny_lm.py": 1}
