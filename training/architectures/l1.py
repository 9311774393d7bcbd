"""The L1 architecture: a ReLU dictionary trained with MSE + l1 * L1 (Cunningham et al. 2023; Bricken et al. 2023),
swept over the penalty `l1` (warmed up by the sweep), dead latents revived by resampling or, as an option
(`Ensemble(dead_policy="ghost_grads")`, --ghost_grads), by ghost grads. Optionally tied.

Maths and normalisations: training/dictionary.py. loss = MSE + l1 * L1, L1 = mean over the batch of
sum_j codes_j * ||decoder_j||; with ghost grads + ghost (`ghost_grads_loss`) while the member has a dead latent.
"""

from __future__ import annotations

from typing import Any

import math

import torch
from torch import Tensor

from training.architectures import Architecture
from training.dictionary import (
    decode_codes,
    decoder_norms,
    Dictionary,
    dictionary_from_params,
    INIT_NORM,
    l1_penalty,
    mse_loss,
    Params,
    pre_activations,
)
from training.fused import (accumulate_bmm, centred, encoder_name, per_member, reconstruction_grad,
                            relu_mask_, sum_tokens_, Workspace)

FP32 = 4


def ghost_grads_loss(params: Params, x: Tensor, x_hat: Tensor, pre: Tensor, dead: Tensor) -> Tensor:
    """The ghost-grads term (Jermyn & Templeton 2024; Joseph Bloom's mats_sae_training / SAELens <= 3 recipe) of one
    member, 0 when `dead: BoolTensor[h]` is all False.

    r = x - x_hat (no gradient); ghost = exp(pre) on the dead latents only, decoded without center, rescaled (no
    gradient through the factor) to half the norm of r per token; per element e_bd = (ghost - r)_bd^2 / ||r_b -
    mean_b r|| (clamped at 1e-12); term = mean_b sum_d e_bd * sg((x_hat - x)_bd^2 / (e_bd + 1e-6)), i.e. each element
    rescaled so that the term's value is the MSE's (the recipe's MSE is normalised by ||x - mean x|| and averaged over
    d_in; here it is this toolkit's MSE, summed over d_in), its gradient that of log e through the dead latents.
    """
    resid = (x - x_hat).detach()                                                     # [B, d]
    ghost = pre.masked_fill(~dead, -math.inf).exp() @ params["decoder"]             # [B, d]
    factor = resid.norm(dim=-1) / (1e-6 + 2 * ghost.norm(dim=-1))
    ghost = ghost * factor.detach().unsqueeze(-1)
    spread = (resid - resid.mean(0)).norm(dim=-1, keepdim=True).clamp_min(1e-12)    # [B, 1]
    ghost_sq = (ghost - resid).square() / spread
    rescale = ((x_hat - x).square() / (ghost_sq + 1e-6)).detach()
    return (rescale * ghost_sq).sum(-1).mean() * dead.any().to(pre.dtype)


def l1_loss(params: Params, x: Tensor, l1: Tensor | float, dead: Tensor | None = None
            ) -> tuple[Tensor, dict[str, Tensor]]:
    """(MSE + l1 * L1 [+ ghost], {"mse", "l1", "codes", "x_hat"[, "aux"]}) of an L1 dictionary (L1 weighted by
    decoder norms); the ghost-grads term ("aux") only with a `dead: BoolTensor[d_hidden]` mask."""
    pre = pre_activations(params, x)
    codes = pre.relu()
    x_hat = decode_codes(params, codes)
    mse, l1_term = mse_loss(x, x_hat), l1_penalty(codes, decoder_norms(params))
    parts = {"mse": mse, "l1": l1_term, "codes": codes, "x_hat": x_hat}
    if dead is None:
        return mse + l1 * l1_term, parts
    parts["aux"] = ghost_grads_loss(params, x, x_hat, pre, dead)
    return mse + l1 * l1_term + parts["aux"], parts


class SparseLinearAutoencoder(Dictionary):
    """ReLU dictionary trained with MSE + l1 * L1 (Cunningham et al. 2023; Bricken et al. 2023).

    Tied: one matrix serves as encoder and decoder (the original Sharkey et al. variant).
    """

    architecture = "l1"

    def __init__(self, d_in: int, d_hidden: int, tied: bool = False, *, init_norm: float = INIT_NORM,
                 device=None, dtype=None):
        super().__init__()
        self._init_params(d_in, d_hidden, tied, 1.0 if tied else init_norm, device, dtype)

    def encode(self, x: Tensor) -> Tensor:
        """codes: [n, d_hidden] = ReLU((x - center) @ encoder.T + encoder_bias)."""
        return pre_activations(self.params(), x).relu()

    def loss(self, x: Tensor, l1: float | Tensor, dead: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(MSE + l1 * L1, {"mse", "l1"}); see training/dictionary.py for the normalisations. With a
        `dead: BoolTensor[d_hidden]` mask, + the ghost-grads term ("aux", `ghost_grads_loss`)."""
        total, parts = l1_loss(self.params(), x, l1, dead)
        return total, {n: parts[n] for n in ("mse", "l1", "aux") if n in parts}


def fused_l1_grads(params: Params, x: Tensor, l1: Tensor, ws: Workspace, grads: Params, stats: bool = True
                   ) -> dict[str, Tensor]:
    """Write d loss_i / d params_i of every member into `grads` (in place); return per-member stats: "fired";
    with `stats` also "loss", "mse", "l1_norm", "l0" and "sq_err_sum", which only logging reads.

    loss_i = MSE_i + l1_i * L1_i (L1 weighted by decoder-row norms). Five batched matmuls per token
    chunk (2 forward, 3 backward; weight gradients accumulate over chunks of `ws.chunk` tokens), the
    centre's encoder-side gradient as a vector-matrix product; no host sync. Under autocast the matmuls and the [N, C, h]
    buffers use its dtype, as autograd under autocast would; gradients are accumulated in fp32, but
    the batch sums over [N, C, h] (bias gradient, L1 and L0 stats) come out in that dtype (bf16: ~3
    significant digits), like autocast's.
    """
    n, batch = params["decoder"].shape[0], x.shape[0]
    center, bias, dec = params["center"], params["encoder_bias"], params["decoder"]
    enc = params[encoder_name(params)]
    tied = "encoder" not in params
    h, d = dec.shape[1:]
    cd, acc = ws.compute, x.dtype
    low = cd != acc                                                                  # autocast to bf16/fp16
    enc_c, dec_c, bias_c = enc, dec, bias
    if low:                                   # persistent low-precision copies: no per-step allocation
        enc_c = ws.buffer("enc", tuple(enc.shape), cd).copy_(enc)
        dec_c = enc_c if tied else ws.buffer("dec", tuple(dec.shape), cd).copy_(dec)
        bias_c = bias.to(cd)
    sq_err = x.new_empty(n, batch)                                                   # [N, B]
    code_sum = x.new_empty(n, h)                                                     # written by the first chunk
    fired_count = x.new_empty(n, h) if stats else None
    norms = decoder_norms(params)                                                    # [N, h]
    l1_per_token = per_member(l1 / batch, norms)                                    # [N, 1]
    l1_grad = (l1_per_token * norms).unsqueeze(1).to(cd)                             # d (l1 L1) / d codes: [N, 1, h]

    for start in range(0, batch, ws.chunk):
        xs = x[start:start + ws.chunk]
        m, first = xs.shape[0], start == 0
        xc = centred(ws, xs, center, low)                                            # [N, m, d]
        codes = ws.big_a[:, :m]                                                      # [N, m, h]
        torch.baddbmm(bias_c.unsqueeze(1), xc, enc_c.transpose(1, 2), out=codes).relu_()
        g, g_c = reconstruction_grad(ws, codes, dec, dec_c, center, xs, sq_err[:, start:start + m], batch, low)
        sum_tokens_(grads["center"], g, first)

        accumulate_bmm(grads["decoder"], codes.transpose(1, 2), g_c, first, ws)     # [N, h, d]
        sum_tokens_(code_sum, codes, first, dtype=acc)
        gpre = ws.big_b[:, :m]
        torch.baddbmm(l1_grad, g_c, dec_c.transpose(1, 2), out=gpre)
        relu_mask_(gpre, codes)                                                     # d loss / d pre
        if fired_count is not None:
            sum_tokens_(fired_count, codes.sign_(), first)
        accumulate_bmm(grads["decoder" if tied else "encoder"], gpre.transpose(1, 2), xc, first and not tied, ws)
        sum_tokens_(grads["encoder_bias"], gpre, first)
    grads["center"].sub_(torch.bmm(grads["encoder_bias"].unsqueeze(1), enc).squeeze(1))
    # the penalty's own decoder gradient: l1 / B * sum_b codes_bi * decoder_i / norms_i
    grads["decoder"].add_(dec * (l1_per_token * code_sum / norms.clamp_min(1e-12)).unsqueeze(-1))

    out = {"fired": code_sum > 0}                      # codes >= 0: a positive sum iff one fired (NaN: frozen anyway)
    if fired_count is not None:
        mse = sq_err.mean(-1)
        l1_term = (code_sum * norms).sum(-1) / batch
        out.update(loss=mse + l1 * l1_term, mse=mse, l1_norm=l1_term, sq_err_sum=sq_err.sum(-1),
                   l0=fired_count.sum(-1) / batch)
    return out



def _loss(params: Params, x: Tensor, coefficients: dict[str, Tensor], state: dict[str, Any]
          ) -> tuple[Tensor, dict[str, Tensor]]:
    """One member's MSE + l1 * L1 (the autograd backend's loss; its L1 term is the ensemble's "l1_norm" stat), + the
    ghost-grads term ("aux") while the ensemble hands it `dead` (dead policy "ghost_grads")."""
    total, parts = l1_loss(params, x, coefficients["l1"], state.get("dead"))
    return total, {n: parts[n] for n in ("mse", "codes", "x_hat", "aux") if n in parts}


def _ghost_term(params: Params, x: Tensor, dead: Tensor) -> tuple[Tensor, Tensor]:
    """(ghost, ghost) of one member: the ghost-grads term alone (its gradient adds to the fused one's)."""
    pre = pre_activations(params, x)
    term = ghost_grads_loss(params, x, decode_codes(params, pre.relu()), pre, dead)
    return term, term.detach()


def ghost_grads_(params: Params, x: Tensor, dead: Tensor, grads: Params) -> Tensor:
    """Add every member's gradient of its ghost-grads term to `grads` (vmap(grad), stacked `dead: [N, h]`); return
    the terms [N]."""
    g, term = torch.func.vmap(torch.func.grad(_ghost_term, has_aux=True), in_dims=(0, None, 0))(params, x, dead)
    for name, t in g.items():
        grads[name].add_(t)
    return term


def _fused(params: Params, x: Tensor, coefficients: dict[str, Tensor], state: dict[str, Any], ws: Workspace,
           grads: Params) -> dict[str, Tensor]:
    """`fused_l1_grads` with the scheduled penalty, + the ghost-grads term's gradient (by autograd: the term is
    off while no member has a dead latent) while the ensemble hands it `dead`."""
    stats = fused_l1_grads(params, x, coefficients["l1"], ws, grads, state.get("stats", True))
    if state.get("dead") is not None:
        stats["aux"] = ghost_grads_(params, x, state["dead"], grads)
        if "loss" in stats:
            stats["loss"] = stats["loss"] + stats["aux"]
    return stats


def _make_member(d_in: int, d_hidden: int, key: float | None, *, tied: bool = False, init_norm: float = INIT_NORM,
                 device=None, dtype=None) -> SparseLinearAutoencoder:
    """A fresh member (the penalty is an ensemble hparam, not part of the module)."""
    return SparseLinearAutoencoder(d_in, d_hidden, tied, init_norm=init_norm, device=device, dtype=dtype)


def _workspace_bytes(n_models: int, batch: int, d_in: int, d_hidden: int, tied: bool, compute: int) -> int:
    """x - center [N, C, d] (compute) + error and squared error [N, C, d] x 2 (fp32) + codes and their
    gradient [N, C, h] x 2 (compute); bf16 adds low-precision copies of the matrices [N, h, d] (x 2 untied)
    and of the weight gradient, and x_hat, gradient [N, C, d] (compute)."""
    nbd, nbh, nhd = n_models * batch * d_in, n_models * batch * d_hidden, n_models * d_hidden * d_in
    total = nbd * compute + 2 * nbd * FP32 + 2 * nbh * compute
    if compute != FP32:
        total += (1 if tied else 2) * nhd * compute + nhd * compute + 2 * nbd * compute
    return total


def _transient_bytes(n_models: int, batch: int, d_in: int, d_hidden: int, k_max: int) -> int:
    """The penalty's decoder gradient [N, h, d] (fp32)."""
    return FP32 * n_models * d_hidden * d_in


def _to_saelens(p: Params, member: dict[str, Any]) -> tuple[Params, dict[str, Any]]:
    """One member as SAELens' "standard" (ReLU) SAE."""
    from training.saelens import plain_to_saelens
    return plain_to_saelens(p), {"architecture": "standard"}


def _from_saelens(t: Params, cfg: dict[str, Any]) -> SparseLinearAutoencoder:
    """A SAELens "standard" SAE as this architecture's module."""
    from training.saelens import saelens_params
    return dictionary_from_params(saelens_params(t), "l1")

ARCHITECTURE = Architecture(
    to_saelens=_to_saelens, from_saelens=_from_saelens, saelens_names=("standard",),
    name="l1", title="L1", module=SparseLinearAutoencoder, make_member=_make_member, member_key=None,
    param_names=("center", "encoder", "encoder_bias", "decoder"),
    sweep_param="l1", sweep_param_integer=False, scheduled=("l1",),
    member_state=lambda keys, like: {},
    loss=_loss, fused_grads=_fused,
    workspace=lambda batch, chunk_tokens, state: (chunk_tokens, True),
    activate_=lambda pre, params, state: pre.relu_(),
    dead_policy="resample", dead_policies=("ghost_grads",), tieable=True, check_keys=lambda keys, d_hidden: None,
    default_init_norm=0.1,
    key_symbol="L1", key_column="L1 penalty", key_axis="L1 penalty",
    format_key=lambda key: f"L1 = {key:.3g}", short_key=lambda key: f"{key:.3g}",
    workspace_bytes=_workspace_bytes, transient_bytes=_transient_bytes,
    eval_block_rows=lambda batch: max(1, batch),   # an encode holds one [N, rows, h] buffer where the step held two
)
L1 = ARCHITECTURE
