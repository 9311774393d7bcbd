"""Tests of training/metrics.py: each metric against a hand computation on tiny tensors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training import metrics as M

# ----------------------------------------------------------------------------- reconstruction
# x = [[1, 2], [3, 4]], x_hat = [[1, 1], [2, 4]]: errors [[0, 1], [1, 0]], sum of squares 2.
# mean_t x = [2, 3]; x - mean = [[-1, -1], [1, 1]]: total sum of squares 4.
X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
X_HAT = torch.tensor([[1.0, 1.0], [2.0, 4.0]])


def test_mse_both_normalisations() -> None:
    """mse per token (SAELens, SAEBench, the training loss) 2 / 2 = 1; per element 2 / 4 = 0.5."""
    assert M.mse(X, X_HAT) == pytest.approx(1.0)
    assert M.mse_per_element(X, X_HAT) == pytest.approx(0.5)


def test_relative_reconstruction_bias() -> None:
    """mean ||x_hat||^2 = (2 + 20) / 2 = 11; mean <x, x_hat> = (3 + 22) / 2 = 12.5; ratio 0.88; 1 for x_hat = x,
    0.5 for x_hat = x / 2 (shrinkage)."""
    assert M.relative_reconstruction_bias(X, X_HAT) == pytest.approx(11 / 12.5, rel=1e-12)
    assert M.relative_reconstruction_bias(X, X) == pytest.approx(1.0)
    assert M.relative_reconstruction_bias(X, 0.5 * X) == pytest.approx(0.5)


def test_explained_variance_centred() -> None:
    """1 - 2/4 = 0.5 (centred on the token mean; centring on zero would give 1 - 2/30)."""
    assert M.explained_variance(X, X_HAT) == pytest.approx(0.5)
    assert M.normalized_mse(X, X_HAT) == pytest.approx(0.5)
    assert M.explained_variance(X, X) == pytest.approx(1.0)
    assert M.explained_variance(X, X.mean(0).expand_as(X)) == pytest.approx(0.0)


def test_cosine_similarity() -> None:
    """Token 1: 3 / (sqrt5 sqrt2); token 2: 22 / (5 sqrt20); mean of the two."""
    expected = (3 / math.sqrt(10) + 22 / (5 * math.sqrt(20))) / 2
    assert M.cosine_similarity(X, X_HAT) == pytest.approx(expected, rel=1e-12)


def test_norm_ratio() -> None:
    """Token 1: sqrt2 / sqrt5; token 2: sqrt20 / 5; mean of the two."""
    expected = (math.sqrt(2 / 5) + math.sqrt(20) / 5) / 2
    assert M.norm_ratio(X, X_HAT) == pytest.approx(expected, rel=1e-12)
    assert M.norm_ratio(X, 0.5 * X) == pytest.approx(0.5)
    tiny = torch.tensor([[1e-5, 0.0], [3.0, 4.0]])                # ||x|| < 1e-4 counts as 1 (SAELens' l2_ratio)
    assert M.norm_ratio(tiny, torch.tensor([[2.0, 0.0], [3.0, 4.0]])) == pytest.approx((2.0 + 1.0) / 2)


# ----------------------------------------------------------------------------- sparsity
# 4 tokens, 3 features. Active per token: 1, 2, 0, 1 -> L0 = 1; |codes| sums 2, 4, 0, 1 -> L1 = 7/4.
# Feature 0 fires on 1/4 tokens, feature 1 on 3/4 (the -3 counts: non-zero), feature 2 never.
CODES = torch.tensor([[0.0, 2.0, 0.0], [1.0, -3.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def test_l0_l1() -> None:
    """L0 = 4/4 = 1, L1 = 7/4."""
    assert M.l0(CODES) == 1.0
    assert M.l1(CODES) == pytest.approx(1.75)


def test_density_dead_dense() -> None:
    """Density [1/4, 3/4, 0]; dead = feature 2; dense above 0.5 = feature 1, above 0.1 = features 0, 1."""
    density = M.feature_density(CODES)
    assert density.tolist() == [0.25, 0.75, 0.0]
    assert M.dead_features(density).tolist() == [False, False, True]
    assert M.dense_features(density, threshold=0.5).tolist() == [False, True, False]
    assert M.dense_features(density).tolist() == [True, True, False]


def test_log_density_histogram() -> None:
    """log10 0.25 = -0.60 in [-1, -0.5), log10 0.75 = -0.12 in [-0.5, 0]; one dead feature apart."""
    hist = M.log_density_histogram(M.feature_density(CODES), bins=2, log10_range=(-1.0, 0.0))
    assert hist.counts.tolist() == [1, 1]
    assert hist.edges.tolist() == [-1.0, -0.5, 0.0]
    assert hist.n_dead == 1
    # density 1 (log 0) sits on the right edge and is counted in the last bin; 1e-3 is clamped into the first
    hist = M.log_density_histogram(torch.tensor([1.0, 1e-3, 0.0, 0.0]), bins=torch.tensor([-2.0, -1.0, 0.0]))
    assert hist.counts.tolist() == [1, 1] and hist.n_dead == 2


# ----------------------------------------------------------------------------- streaming == one-shot


def test_streaming_matches_one_shot() -> None:
    """Accumulating uneven batches gives the one-shot numbers on the concatenation (float64 rounding only)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 16, generator=g) * 3 + 10  # large mean: explained variance must centre exactly
    x_hat = x + 0.5 * torch.randn(1000, 16, generator=g)
    codes = torch.relu(torch.randn(1000, 32, generator=g) - 1.0)
    codes[:, 5] = 0  # one dead feature
    stats = M.EvalStats(sparsity=M.SparsityStats(dense_threshold=0.15))
    for lo, hi in [(0, 1), (1, 300), (300, 301), (301, 1000)]:
        stats.update(x[lo:hi], x_hat[lo:hi], codes[lo:hi])
    got = stats.compute()
    density = M.feature_density(codes)
    want = {
        "mse": M.mse(x, x_hat),
        "mse_per_element": M.mse_per_element(x, x_hat),
        "relative_reconstruction_bias": M.relative_reconstruction_bias(x, x_hat),
        "l2_norm_in": x.double().norm(dim=-1).mean().item(),
        "l2_norm_out": x_hat.double().norm(dim=-1).mean().item(),
        "explained_variance": M.explained_variance(x, x_hat),
        "normalized_mse": M.normalized_mse(x, x_hat),
        "cossim": M.cosine_similarity(x, x_hat),
        "l2_ratio": M.norm_ratio(x, x_hat),
        "l0": M.l0(codes),
        "l1": M.l1(codes),
        "n_dead": float(M.dead_features(density).sum()),
        "n_dense": float(M.dense_features(density, 0.15).sum()),
    }
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-14), k
    assert got["l0"] == want["l0"]  # integer counts: exact
    assert got["n_dead"] == 1.0 and got["n_tokens"] == 1000.0
    assert torch.equal(stats.sparsity.feature_density(), density)


# ----------------------------------------------------------------------------- between dictionaries


def test_mmcs_directional() -> None:
    """a = e1, e2; b = (1, 1), (0, -2). cos: a0-b0 1/sqrt2, a0-b1 0, a1-b0 1/sqrt2, a1-b1 -1.

    mmcs(a, b) = 1/sqrt2; mmcs(b, a) = (1/sqrt2 + max(0, -1)) / 2.
    """
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -2.0]])
    assert M.mmcs(a, b) == pytest.approx(1 / math.sqrt(2))
    assert M.mmcs(b, a) == pytest.approx(1 / (2 * math.sqrt(2)))
    assert M.mmcs_both(a, b) == pytest.approx((1 / math.sqrt(2), 1 / (2 * math.sqrt(2))))
    assert M.mmcs(a, b, chunk_size=1) == pytest.approx(M.mmcs(a, b))


def _unit(deg: float) -> list[float]:
    """Unit vector at an angle in degrees."""
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def test_hungarian_beats_greedy() -> None:
    """b at 0 and 60 degrees, a at 20 and -30 degrees.

    cos: a0-b0 cos20 = .940, a0-b1 cos40 = .766, a1-b0 cos30 = .866, a1-b1 cos90 = 0.
    Greedy a0->b0 totals .940; optimal a0->b1, a1->b0 totals 1.632. Threshold .8: only a1 matched.
    """
    a = torch.tensor([_unit(20), _unit(-30)])
    b = torch.tensor([_unit(0), _unit(60)]) * 3.0  # scale must not matter
    m = M.hungarian_match(a, b, threshold=0.8)
    assert m.pairs.tolist() == [[0, 1], [1, 0]]
    assert m.cosines.tolist() == pytest.approx([math.cos(math.radians(40)), math.cos(math.radians(30))], abs=1e-6)
    assert m.frac_matched == 0.5


def test_hungarian_rectangular() -> None:
    """3 rows of a, 2 of b: 2 pairs, the third row of a counts as unmatched."""
    a = torch.tensor([_unit(0), _unit(90), _unit(45)])
    b = torch.tensor([_unit(90), _unit(0)])
    m = M.hungarian_match(a, b, threshold=0.9)
    assert m.pairs.tolist() == [[0, 1], [1, 0]]
    assert m.cosines.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert m.frac_matched == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- CE / KL helpers by hand


def test_next_token_ce_by_hand() -> None:
    """Logits (0, 0, ln2) at position 0: p = (1/4, 1/4, 1/2); next token 2 -> CE ln2, token 0 -> ln4."""
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [5.0, 1.0, 2.0]]])  # [1, 2, 3]
    assert M.next_token_ce(logits, torch.tensor([[1, 2]])).shape == (1, 1)
    assert M.next_token_ce(logits, torch.tensor([[1, 2]])).item() == pytest.approx(math.log(2))
    assert M.next_token_ce(logits, torch.tensor([[1, 0]])).item() == pytest.approx(math.log(4))


def test_kl_by_hand() -> None:
    """KL((1/2, 1/4, 1/4) || uniform) = 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 1/2 ln(9/8)."""
    p = torch.tensor([[[math.log(2), 0.0, 0.0]]])
    q = torch.zeros(1, 1, 3)
    assert M.kl_div(p, q).item() == pytest.approx(0.5 * math.log(9 / 8), rel=1e-6)
    assert M.kl_div(p, p).item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- splicing into a tiny model


def _build_tiny_model(path: Path) -> None:
    """Save a random 2-layer GPT-NeoX and a byte-level BPE tokenizer (<|endoftext|> = bos/eos/unk) to path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the cat sat on the mat", "sparse autoencoders find features", "hello world"] * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=len(fast), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64, initializer_range=0.2, bos_token_id=0, eos_token_id=0,
    )
    GPTNeoXForCausalLM(cfg).save_pretrained(path)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory):
    """A TransformerBridge booted from the tiny model saved on disk."""
    from transformer_lens.model_bridge import TransformerBridge

    path = tmp_path_factory.mktemp("tiny_neox")
    _build_tiny_model(path)
    model = TransformerBridge.boot_transformers(str(path), device="cpu")
    model.eval()
    return model


@pytest.fixture(scope="module")
def tokens(bridge) -> torch.Tensor:
    """[3, 8] random tokens with BOS (id 0) first."""
    g = torch.Generator().manual_seed(1)
    t = torch.randint(1, bridge.cfg.d_vocab, (3, 8), generator=g)
    t[:, 0] = 0
    return t


def test_clean_ce_by_hand(bridge) -> None:
    """2-token input: CE = logsumexp(l) - l[t1] with l the logits at position 0, computed in Python floats."""
    toks = torch.tensor([[0, 42]])
    with torch.no_grad():
        logits = bridge(toks, return_type="logits")[0, 0].tolist()
    mx = max(logits)
    by_hand = mx + math.log(sum(math.exp(v - mx) for v in logits)) - logits[42]
    out = M.splice_losses(bridge, toks, "blocks.0.hook_resid_post", lambda a: a)
    assert out["ce_loss_without_sae"] == pytest.approx(by_hand, rel=1e-5)
    assert out["n_positions_ce"] == 1.0 and out["n_positions_kl"] == 2.0


@pytest.mark.parametrize("hook_name", ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"])
def test_identity_and_zero(bridge, tokens, hook_name: str) -> None:
    """Identity: spliced == clean, score 1, KL 0. Zero: spliced == zero-ablated, score 0. Error term: clean."""
    seen: list[tuple[int, ...]] = []

    def identity(a: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(a.shape))
        return a.clone()

    out = M.splice_losses(bridge, tokens, hook_name, identity)
    assert seen[0] == (3 * 8, 64)  # [batch*seq, d_model] or [batch*seq, heads*d_head]
    assert out["ce_loss_with_sae"] == pytest.approx(out["ce_loss_without_sae"], abs=1e-6)
    assert out["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert out["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    assert abs(out["ce_loss_with_ablation"] - out["ce_loss_without_sae"]) > 0.01  # zero-ablation matters (random model: either sign)

    zero = M.splice_losses(bridge, tokens, hook_name, torch.zeros_like)
    assert zero["ce_loss_with_sae"] == pytest.approx(zero["ce_loss_with_ablation"], abs=1e-7)
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-6) and zero["kl_div_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_div_with_sae"] == pytest.approx(zero["kl_div_with_ablation"], abs=1e-7) and zero["kl_div_with_ablation"] > 0
    # with the error term kept, even a terrible reconstruction gives back the clean model
    assert zero["ce_loss_with_error"] == pytest.approx(zero["ce_loss_without_sae"], abs=1e-5)
    assert zero["kl_div_with_error"] == pytest.approx(0.0, abs=1e-6)


def test_error_term_with_noisy_reconstruction(bridge, tokens) -> None:
    """A noisy reconstruction lands between clean and zero; reconstruct + error term is the clean loss."""
    g = torch.Generator().manual_seed(2)
    noisy = lambda a: a + 0.3 * a.std() * torch.randn(a.shape, generator=g)  # noqa: E731
    out = M.splice_losses(bridge, tokens, "blocks.0.hook_resid_post", noisy)
    assert out["ce_loss_with_error"] == pytest.approx(out["ce_loss_without_sae"], abs=1e-5)
    assert out["kl_div_with_sae"] > 0 and out["ce_loss_with_sae"] != out["ce_loss_without_sae"]
    assert out["ce_delta"] == pytest.approx(out["ce_loss_with_sae"] - out["ce_loss_without_sae"])
    score = (out["ce_loss_with_ablation"] - out["ce_loss_with_sae"]) / (out["ce_loss_with_ablation"] - out["ce_loss_without_sae"])
    assert out["ce_loss_score"] == pytest.approx(score)
    kl_score = (out["kl_div_with_ablation"] - out["kl_div_with_sae"]) / out["kl_div_with_ablation"]
    assert out["kl_div_score"] == pytest.approx(kl_score) and 0 < out["kl_div_score"] < 1


def test_hook_z_flattening_order(bridge, tokens) -> None:
    """Zeroing flat columns [0, d_head) of the reconstruct input == zeroing head 0 of hook_z [b, s, h, d_head]."""
    d_head = bridge.cfg.d_head

    def kill_head0_flat(a: torch.Tensor) -> torch.Tensor:
        a = a.clone()
        a[:, :d_head] = 0
        return a

    def kill_head0_4d(z: torch.Tensor, hook=None) -> torch.Tensor:
        z = z.clone()
        z[:, :, 0] = 0
        return z

    out = M.splice_losses(bridge, tokens, "blocks.1.attn.hook_z", kill_head0_flat)
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=[("blocks.1.attn.hook_z", kill_head0_4d)])
    assert out["ce_loss_with_sae"] == pytest.approx(M.next_token_ce(logits, tokens).double().mean().item(), rel=1e-6)
    assert out["ce_loss_with_sae"] != pytest.approx(out["ce_loss_without_sae"], abs=1e-4)


def test_exclude_positions(bridge, tokens) -> None:
    """Excluding BOS (position 0) averages CE over t = 1..6 and KL over t = 1..7 of the per-position values."""
    out = M.splice_losses(bridge, tokens, "blocks.0.hook_resid_post", torch.zeros_like, exclude_positions=(0,))
    with torch.no_grad():
        clean = bridge(tokens, return_type="logits")
        zeroed = bridge.run_with_hooks(
            tokens, return_type="logits", fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook=None: torch.zeros_like(a))]
        )
    ce = M.next_token_ce(clean, tokens)  # [3, 7]
    assert out["ce_loss_without_sae"] == pytest.approx(ce[:, 1:].double().mean().item(), rel=1e-6)
    assert out["kl_div_with_ablation"] == pytest.approx(M.kl_div(clean, zeroed)[:, 1:].double().mean().item(), rel=1e-5)
    assert out["n_positions_ce"] == 3 * 6 and out["n_positions_kl"] == 3 * 7
    # splice_excluded=False: BOS keeps its clean activation, the other positions are zeroed
    kept = M.splice_losses(
        bridge, tokens, "blocks.0.hook_resid_post", torch.zeros_like, exclude_positions=(0,), splice_excluded=False
    )

    def zero_after_bos(a: torch.Tensor, hook=None) -> torch.Tensor:
        a = a.clone()
        a[:, 1:] = 0
        return a

    with torch.no_grad():
        partial = bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=[("blocks.0.hook_resid_post", zero_after_bos)])
    assert kept["ce_loss_with_sae"] == pytest.approx(M.next_token_ce(partial, tokens)[:, 1:].double().mean().item(), rel=1e-6)
    assert kept["ce_loss_with_sae"] != pytest.approx(out["ce_loss_with_sae"], abs=1e-4)  # BOS matters through attention


def test_splice_streaming_matches_one_shot(bridge, tokens) -> None:
    """SpliceStats over two batches == splice_losses on their concatenation."""
    halve = lambda a: 0.5 * a  # noqa: E731
    stats = M.SpliceStats()
    stats.update(bridge, tokens[:1], "blocks.0.hook_resid_post", halve, exclude_positions=(0,))
    stats.update(bridge, tokens[1:], "blocks.0.hook_resid_post", halve, exclude_positions=(0,))
    got = stats.compute()
    want = M.splice_losses(bridge, tokens, "blocks.0.hook_resid_post", halve, exclude_positions=(0,))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
