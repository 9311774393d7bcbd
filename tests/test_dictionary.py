"""Hand-computed checks of the dictionaries' formulas, initialisation and helpers."""

from __future__ import annotations

import pytest
import torch

from training.dictionary import (
    SparseLinearAutoencoder,
    TopKAutoencoder,
    aux_k_loss,
    geometric_median,
    l1_penalty,
    normalize_decoder_,
    project_decoder_grad_,
    topk_mask_codes,
    unit_norm_params,
    unstack_dictionaries,
)


def _set(module: torch.nn.Module, **values: list) -> None:
    """Overwrite parameters of `module` with the given nested lists."""
    with torch.no_grad():
        for name, v in values.items():
            getattr(module, name).copy_(torch.tensor(v, dtype=torch.float64))


def _tiny_l1(tied: bool = False) -> SparseLinearAutoencoder:
    """d_in=2, d_hidden=3 dictionary with hand-picked parameters."""
    sae = SparseLinearAutoencoder(2, 3, tied=tied, dtype=torch.float64)
    _set(sae, center=[1.0, -1.0], encoder_bias=[0.5, -1.0, 0.0],
         decoder=[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    if not tied:
        _set(sae, encoder=[[1.0, 2.0], [0.0, 1.0], [-1.0, 1.0]])
    return sae


def test_l1_encode_decode_loss_by_hand():
    sae = _tiny_l1()
    x = torch.tensor([[2.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    # x - center = [[1, 2], [0, 0]]
    # pre = [[1+4+0.5, 2-1, -1+2+0], [0.5, -1, 0]] = [[5.5, 1, 1], [0.5, -1, 0]]
    codes = sae.encode(x)
    torch.testing.assert_close(codes, torch.tensor([[5.5, 1.0, 1.0], [0.5, 0.0, 0.0]], dtype=torch.float64))
    # x_hat = codes @ decoder + center: row0 = [5.5+0.6, 1+0.8] + [1, -1] = [7.1, 0.8]; row1 = [1.5, -1]
    x_hat = sae(x)
    torch.testing.assert_close(x_hat, torch.tensor([[7.1, 0.8], [1.5, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(sae.predict(x), x_hat)
    total, parts = sae.loss(x, l1=0.1)
    # MSE = mean over batch of summed squared error: ((5.1^2 + 0.2^2) + (0.5^2 + 0)) / 2
    mse = ((5.1 ** 2 + 0.2 ** 2) + 0.5 ** 2) / 2
    l1 = ((5.5 + 1 + 1) + 0.5) / 2  # mean over batch of sum |codes|
    torch.testing.assert_close(parts["mse"], torch.tensor(mse, dtype=torch.float64))
    torch.testing.assert_close(parts["l1"], torch.tensor(l1, dtype=torch.float64))
    torch.testing.assert_close(total, torch.tensor(mse + 0.1 * l1, dtype=torch.float64))


def test_tied_uses_decoder_as_encoder():
    sae = _tiny_l1(tied=True)
    assert "encoder" not in dict(sae.named_parameters())
    x = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    # x - center = [1, 2]; pre = decoder @ [1, 2] + bias = [1+0.5, 2-1, 0.6+1.6] = [1.5, 1, 2.2]
    torch.testing.assert_close(sae.encode(x), torch.tensor([[1.5, 1.0, 2.2]], dtype=torch.float64))
    assert sae.encoder_weight() is sae.decoder


def test_topk_encode_and_sparse_decode_by_hand():
    sae = TopKAutoencoder(2, 3, k=2, dtype=torch.float64)
    _set(sae, center=[0.0, 0.0], encoder_bias=[0.0, 0.0, -10.0], encoder=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
         decoder=[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    x = torch.tensor([[3.0, 1.0], [-1.0, -2.0]], dtype=torch.float64)
    # pre = [[3, 1, -6], [-1, -2, -13]] -> top-2 then ReLU: [[3, 1, 0], [0, 0, 0]]
    codes = sae.encode(x)
    torch.testing.assert_close(codes, torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    vals, idx = sae.encode_sparse(x)
    torch.testing.assert_close(sae.decode_sparse(vals, idx), sae.decode(codes))
    total, parts = sae.loss(x)
    mse = (0.0 + (1 + 4)) / 2  # row 0 reconstructed exactly, row 1 -> center = 0
    torch.testing.assert_close(total, torch.tensor(mse, dtype=torch.float64))
    torch.testing.assert_close(parts["aux"], torch.tensor(0.0, dtype=torch.float64))


def test_aux_k_loss_by_hand():
    sae = TopKAutoencoder(2, 3, k=1, dtype=torch.float64)
    _set(sae, center=[0.0, 0.0], encoder_bias=[0.0, 0.0, 0.0], encoder=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
         decoder=[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    x = torch.tensor([[3.0, 2.0]], dtype=torch.float64)
    params = sae.params()
    pre = x @ params["encoder"].T                       # [3, 2, 5]: top-1 is latent 2
    x_hat = sae(x)                                      # 5 * [0.6, 0.8] = [3, 4]
    dead = torch.tensor([True, True, False])
    # residual e = [0, -2]; dead latents 0, 1 with pre 3, 2: top-1 (k_aux=1) is latent 0 -> e_hat = [3, 0]
    aux = aux_k_loss(params, x, x_hat, pre, dead, k_aux=1)
    torch.testing.assert_close(aux, torch.tensor(3.0 ** 2 + 2.0 ** 2, dtype=torch.float64))
    # k_aux=2: e_hat = [3, 2] -> error [3, 4]
    torch.testing.assert_close(aux_k_loss(params, x, x_hat, pre, dead, k_aux=2),
                               torch.tensor(9.0 + 16.0, dtype=torch.float64))
    total, parts = sae.loss(x, dead, k_aux=1, aux_coef=0.5)
    torch.testing.assert_close(total, parts["mse"] + 0.5 * 13.0)
    assert aux_k_loss(params, x, x_hat, pre, torch.zeros(3, dtype=torch.bool), k_aux=2) == 0


def test_init_small_decoder_and_encoder_is_decoder_transpose():
    torch.manual_seed(0)
    for sae in (SparseLinearAutoencoder(16, 64), TopKAutoencoder(16, 64, k=4)):
        torch.testing.assert_close(sae.decoder.norm(dim=-1), torch.full((64,), 0.1))
        torch.testing.assert_close(sae.encoder, sae.decoder)      # stored [h, d]: W_enc = W_dec^T
        assert sae.center.abs().max() == 0 and sae.encoder_bias.abs().max() == 0
    tied = SparseLinearAutoencoder(16, 64, tied=True)                  # tied dictionaries keep unit rows
    torch.testing.assert_close(tied.decoder.norm(dim=-1), torch.ones(64))


def test_init_center_mean_and_geometric_median():
    acts = torch.zeros(5, 3)
    acts[:, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0, 1000.0])
    sae = SparseLinearAutoencoder(3, 4)
    sae.init_center(acts, "mean")
    torch.testing.assert_close(sae.center, torch.tensor([201.2, 0.0, 0.0]))
    sae.init_center(acts, "geometric_median")
    torch.testing.assert_close(sae.center, torch.tensor([2.0, 0.0, 0.0]), atol=1e-4, rtol=0)
    # off-line points: the median makes the unit vectors to all points sum to zero
    torch.manual_seed(0)
    pts = torch.randn(200, 3, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    m = geometric_median(pts)
    unit = (pts - m) / (pts - m).norm(dim=-1, keepdim=True)
    assert unit.sum(0).norm() < 1e-4
    with pytest.raises(ValueError):
        sae.init_center(acts, "median")  # type: ignore[arg-type]


def test_project_and_normalize_decoder():
    torch.manual_seed(0)
    dec = torch.randn(5, 7)
    normalize_decoder_(dec)
    torch.testing.assert_close(dec.norm(dim=-1), torch.ones(5))
    grad = torch.randn(5, 7)
    project_decoder_grad_(dec, grad)
    torch.testing.assert_close((grad * dec).sum(-1), torch.zeros(5), atol=1e-6, rtol=0)


def test_unstack_dictionaries():
    torch.manual_seed(0)
    members = [TopKAutoencoder(4, 8, k=k) for k in (1, 3)]
    stacked = {n: torch.stack([m.params()[n] for m in members]).detach() for n in members[0].params()}
    back = unstack_dictionaries(stacked, "topk", keys=[1, 3])
    x = torch.randn(6, 4)
    for a, b in zip(members, back):
        assert isinstance(b, TopKAutoencoder) and b.k == a.k
        torch.testing.assert_close(b(x), a(x))
    tied = SparseLinearAutoencoder(4, 8, tied=True)
    (back_tied,) = unstack_dictionaries({n: p.detach()[None] for n, p in tied.params().items()}, "l1")
    assert back_tied.tied and torch.equal(back_tied.decoder, tied.decoder)


def test_l1_penalty_weights_codes_by_decoder_norms_hand_computed():
    codes = torch.tensor([[1.0, 0.0, 2.0], [0.5, 3.0, 0.0]])
    norms = torch.tensor([0.5, 2.0, 1.0])
    # row 0: 1*0.5 + 2*1 = 2.5; row 1: 0.5*0.5 + 3*2 = 6.25; mean 4.375
    assert l1_penalty(codes, norms).item() == pytest.approx(4.375)
    assert l1_penalty(codes).item() == pytest.approx((3.0 + 3.5) / 2)


def test_loss_is_invariant_to_trading_code_scale_for_decoder_norm():
    """Scaling encoder row and bias by c and decoder row by 1/c leaves MSE and the weighted L1 unchanged."""
    torch.manual_seed(0)
    sae = SparseLinearAutoencoder(6, 10)
    x = torch.randn(20, 6)
    before, parts = sae.loss(x, 0.7)
    with torch.no_grad():
        c = torch.linspace(0.2, 5.0, 10)
        sae.encoder.mul_(c[:, None])
        sae.encoder_bias.mul_(c)
        sae.decoder.div_(c[:, None])
    after, parts_after = sae.loss(x, 0.7)
    assert after.item() == pytest.approx(before.item(), rel=1e-5)
    assert parts_after["l1"].item() == pytest.approx(parts["l1"].item(), rel=1e-5)


def test_topk_ranks_by_contribution_size():
    """pre = [3, 2, 1] with decoder norms [0.1, 1, 5]: contributions 0.3, 2, 5 -> k=2 keeps latents 2 and 1."""
    pre = torch.tensor([[3.0, 2.0, 1.0]])
    norms = torch.tensor([0.1, 1.0, 5.0])
    assert topk_mask_codes(pre, 2, norms=norms).tolist() == [[0.0, 2.0, 1.0]]
    assert topk_mask_codes(pre, 2).tolist() == [[3.0, 2.0, 0.0]]


@pytest.mark.parametrize("architecture", ["l1", "topk"])
def test_unit_norm_params_is_exact(architecture):
    torch.manual_seed(0)
    sae = SparseLinearAutoencoder(8, 16) if architecture == "l1" else TopKAutoencoder(8, 16, k=3)
    with torch.no_grad():
        sae.decoder.mul_(torch.linspace(0.05, 4.0, 16)[:, None])
        sae.encoder_bias.normal_()
    folded = unit_norm_params(sae.params())
    twin = SparseLinearAutoencoder(8, 16) if architecture == "l1" else TopKAutoencoder(8, 16, k=3)
    twin.load_state_dict(folded)
    x = torch.randn(32, 8)
    norms = sae.decoder.norm(dim=-1).detach()
    torch.testing.assert_close(twin(x), sae(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin.encode(x), sae.encode(x) * norms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin.decoder.norm(dim=-1), torch.ones(16))
    tied = SparseLinearAutoencoder(8, 16, tied=True)
    assert "encoder" not in unit_norm_params(tied.params())                       # tied rows are unit already
