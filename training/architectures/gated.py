"""The Gated architecture (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders"):
a gate decides which latents fire, a magnitude path sharing the gate's directions sets how much; swept over the
penalty `l1` (warmed up by the sweep like L1's), dead latents revived by resampling (as in the paper). Never tied.

Maths (one member; `encoder` = W_gate, `encoder_bias` = b_gate, `mag_scale` = r_mag, `mag_bias` = b_mag):
    lin     = (x - center) @ encoder.T                       [n, h]
    pi_gate = lin + encoder_bias                             (the shared pre-activations of training/dictionary.py)
    codes   = 1[pi_gate > 0] * ReLU(exp(mag_scale) * lin + mag_bias)
    x_hat   = codes @ decoder + center
    loss    = MSE(x, x_hat) + l1 * mean_b sum_j ReLU(pi_gate)_j * ||decoder_j||
              + MSE(x, ReLU(pi_gate) @ sg(decoder) + sg(center))          (sg: no gradient, the "frozen" decoder)
MSE as in training/dictionary.py (squared error summed over d_in, mean over the batch). The Heaviside gate passes
no gradient: the gate path learns from the penalty and the auxiliary reconstruction only.
Initialisation and defaults follow SAELens' GatedTrainingSAE: decoder rows random, free, at `init_norm` (0.1), the
encoder their copy, mag_scale = 0 (magnitude rows = gate rows), all biases 0, the penalty weighted by decoder-row
norms (so that it cannot be gamed by rescaling; with --unit_decoder the rows stay at 1, the paper's recipe and
dictionary_learning's GatedSAE trainer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from training.architectures import Architecture
from training.dictionary import INIT_NORM, Dictionary, Params, decoder_norms, mse_loss
from training.dictionary import dictionary_from_params
from training.fused import accumulate_bmm, centred, per_member, relu_mask_, sum_tokens_, Workspace

FP32 = 4


def gated_codes(lin: Tensor, params: Params) -> tuple[Tensor, Tensor]:
    """(codes, pi_gate) from `lin = (x - center) @ encoder.T` ([..., h]; stacked params broadcast on [N, 1, h])."""
    gate_bias, mag_scale, mag_bias = params["encoder_bias"], params["mag_scale"], params["mag_bias"]
    if lin.dim() == 3:                                                           # stacked: [N, b, h]
        gate_bias, mag_scale, mag_bias = gate_bias.unsqueeze(1), mag_scale.unsqueeze(1), mag_bias.unsqueeze(1)
    pi_gate = lin + gate_bias
    mags = (lin * mag_scale.exp() + mag_bias).relu()
    return mags * (pi_gate > 0).to(mags.dtype), pi_gate


def gated_loss(params: Params, x: Tensor, l1: Tensor | float) -> tuple[Tensor, dict[str, Tensor]]:
    """(MSE + l1 * gate L1 + aux, {"mse", "l1", "aux", "codes", "x_hat"}) of one Gated dictionary.

    gate L1 = mean_b sum_j ReLU(pi_gate)_j * ||decoder_j||; aux = MSE of the reconstruction from ReLU(pi_gate) through
    the detached decoder and center.
    """
    lin = (x - params["center"]) @ params["encoder"].T                          # [B, h]
    codes, pi_gate = gated_codes(lin, params)
    x_hat = codes @ params["decoder"] + params["center"]
    gate_acts = pi_gate.relu()
    l1_term = (gate_acts * decoder_norms(params)).sum(-1).mean()
    x_gate = gate_acts @ params["decoder"].detach() + params["center"].detach()
    mse, aux = mse_loss(x, x_hat), mse_loss(x, x_gate)
    return mse + l1 * l1_term + aux, {"mse": mse, "l1": l1_term, "aux": aux, "codes": codes, "x_hat": x_hat}


class GatedAutoencoder(Dictionary):
    """Gated dictionary (Rajamanoharan et al. 2024): a Heaviside gate times a ReLU magnitude sharing its directions."""

    architecture = "gated"
    linear_scoring = False                                   # the gate and the magnitude: analysis calls `encode`

    def __init__(self, d_in: int, d_hidden: int, *, init_norm: float = INIT_NORM, device=None, dtype=None):
        super().__init__()
        self._init_params(d_in, d_hidden, False, init_norm, device, dtype)
        self.mag_scale = nn.Parameter(torch.zeros(d_hidden, device=device, dtype=dtype))   # r_mag
        self.mag_bias = nn.Parameter(torch.zeros(d_hidden, device=device, dtype=dtype))    # b_mag

    def encode(self, x: Tensor) -> Tensor:
        """codes: [n, d_hidden] = 1[pi_gate > 0] * ReLU(exp(mag_scale) * (x - center) @ encoder.T + mag_bias)."""
        return gated_codes((x - self.center) @ self.encoder.T, self.params())[0]

    def loss(self, x: Tensor, l1: float | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(MSE + l1 * gate L1 + aux, {"mse", "l1", "aux"}); see the module docstring."""
        total, parts = gated_loss(self.params(), x, l1)
        return total, {n: parts[n] for n in ("mse", "l1", "aux")}


def fused_gated_grads(params: Params, x: Tensor, l1: Tensor, ws: Workspace, grads: Params) -> dict[str, Tensor]:
    """Write d loss_i / d params_i of every Gated member into `grads` (in place); return per-member stats.

    The loss of `gated_loss`, by hand over the stacked params: seven batched matmuls per token chunk (3 forward:
    the shared encoder product, the decoding of the codes and of ReLU(pi_gate); 4 backward: the decoder gradient, the
    two code gradients through the decoder, the encoder gradient), weight gradients accumulated over chunks of
    `ws.chunk` tokens, no host sync. With lin = (x - center) @ encoder.T, s = exp(mag_scale), g = 2 (x_hat - x) / B,
    g_gate = 2 (x_gate - x) / B: d/d mag_pre = (g @ decoder.T) * 1[codes > 0]; d/d pi_gate = (g_gate @ decoder.T +
    l1 norms / B) * 1[pi_gate > 0]; d/d lin = d/d pi_gate + s * d/d mag_pre; d mag_scale = s * sum_b d/d mag_pre * lin.
    Under autocast the matmuls and the [N, C, h] buffers use its dtype; errors and gradients stay in the params'.
    """
    n, batch = params["decoder"].shape[0], x.shape[0]
    center, enc, dec = params["center"], params["encoder"], params["decoder"]
    h, d = dec.shape[1:]
    cd, acc = ws.compute, x.dtype
    low = cd != acc                                                                  # autocast to bf16/fp16
    enc_c = ws.buffer("enc", tuple(enc.shape), cd).copy_(enc) if low else enc
    dec_c = ws.buffer("dec", tuple(dec.shape), cd).copy_(dec) if low else dec
    scale = params["mag_scale"].exp()                                                # [N, h]
    s_c, bm_c = scale.unsqueeze(1).to(cd), params["mag_bias"].unsqueeze(1).to(cd)   # [N, 1, h]
    bg_c = params["encoder_bias"].unsqueeze(1).to(cd)
    norms = decoder_norms(params)                                                    # [N, h]
    l1_per_token = per_member(l1 / batch, norms)                                     # [N, 1]
    l1_grad = (l1_per_token * norms).unsqueeze(1).to(cd)                             # d (l1 L1) / d ReLU(pi): [N, 1, h]
    sq_err, sq_gate = x.new_empty(n, batch), x.new_empty(n, batch)                   # [N, B]
    code_sum, gate_sum, fired_count = x.new_empty(n, h), x.new_empty(n, h), x.new_empty(n, h)

    for start in range(0, batch, ws.chunk):
        xs = x[start:start + ws.chunk]
        m, first = xs.shape[0], start == 0
        xc = centred(ws, xs, center, low)                                            # [N, m, d]
        lin = torch.bmm(xc, enc_c.transpose(1, 2), out=ws.buffer("lin", (n, ws.chunk, h), cd)[:, :m])
        gate = torch.add(lin, bg_c, out=ws.big_a[:, :m]).relu_()                    # ReLU(pi_gate)
        codes = torch.addcmul(bm_c, lin, s_c, out=ws.buffer("codes", (n, ws.chunk, h), cd)[:, :m]).relu_()
        relu_mask_(codes, gate)                                      # the Heaviside gate: 0 where pi <= 0
        err = ws.small[:, :m].copy_(center.unsqueeze(1).expand(n, m, d))
        err_g = ws.buffer("err_gate", (n, ws.chunk, d), acc)[:, :m].copy_(center.unsqueeze(1).expand(n, m, d))
        if low:
            err.add_(torch.bmm(codes, dec_c, out=ws.buffer("x_hat", (n, ws.chunk, d), cd)[:, :m]))
            err_g.add_(torch.bmm(gate, dec_c, out=ws.buffer("x_hat", (n, ws.chunk, d), cd)[:, :m]))
        else:
            err.baddbmm_(codes, dec)
            err_g.baddbmm_(gate, dec)
        sq = ws.buffer("sq", (n, ws.chunk, d), acc)[:, :m]
        torch.sum(torch.mul(err.sub_(xs), err, out=sq), -1, out=sq_err[:, start:start + m])    # x_hat - x
        torch.sum(torch.mul(err_g.sub_(xs), err_g, out=sq), -1, out=sq_gate[:, start:start + m])
        g, g_gate = err.mul_(2.0 / batch), err_g.mul_(2.0 / batch)                   # d MSE / d x_hat, d aux / d x_gate
        sum_tokens_(grads["center"], g, first)
        if low:
            g = ws.buffer("g", (n, ws.chunk, d), cd)[:, :m].copy_(g)
            g_gate = ws.buffer("g_gate", (n, ws.chunk, d), cd)[:, :m].copy_(g_gate)

        accumulate_bmm(grads["decoder"], codes.transpose(1, 2), g, first, ws)      # [N, h, d]
        sum_tokens_(code_sum, codes, first, dtype=acc)
        sum_tokens_(gate_sum, gate, first, dtype=acc)
        g_mag = torch.bmm(g, dec_c.transpose(1, 2), out=ws.big_b[:, :m])
        relu_mask_(g_mag, codes)                                                     # d loss / d mag_pre
        sum_tokens_(fired_count, codes.sign_(), first)
        sum_tokens_(grads["mag_bias"], g_mag, first)
        sum_tokens_(grads["mag_scale"], lin.mul_(g_mag), first)                     # / s: scaled after the loop
        g_pi = torch.baddbmm(l1_grad, g_gate, dec_c.transpose(1, 2), out=ws.buffer("g_pi", (n, ws.chunk, h), cd)[:, :m])
        relu_mask_(g_pi, gate)                                                       # d loss / d pi_gate
        sum_tokens_(grads["encoder_bias"], g_pi, first)
        g_lin = g_pi.addcmul_(g_mag, s_c)                                            # d loss / d lin
        accumulate_bmm(grads["encoder"], g_lin.transpose(1, 2), xc, first, ws)
    grads["mag_scale"].mul_(scale)
    lin_sum = grads["encoder_bias"] + scale * grads["mag_bias"]                      # sum over tokens of d / d lin
    grads["center"].sub_(torch.bmm(lin_sum.unsqueeze(1), enc).squeeze(1))
    # the penalty's own decoder gradient: l1 / B * sum_b ReLU(pi)_bi * decoder_i / norms_i
    grads["decoder"].add_(dec * (l1_per_token * gate_sum / norms.clamp_min(1e-12)).unsqueeze(-1))

    mse, aux = sq_err.mean(-1), sq_gate.mean(-1)
    return {"loss": mse + l1 * (gate_sum * norms).sum(-1) / batch + aux, "mse": mse, "aux": aux,
            "l1_norm": (code_sum * norms).sum(-1) / batch, "sq_err_sum": sq_err.sum(-1),
            "l0": fired_count.sum(-1) / batch, "fired": fired_count > 0}


def _fused(params: Params, x: Tensor, coefficients: dict[str, Tensor], state: dict[str, Any], ws: Workspace,
           grads: Params) -> dict[str, Tensor]:
    """`fused_gated_grads` with the scheduled penalty."""
    return fused_gated_grads(params, x, coefficients["l1"], ws, grads)


def _loss(params: Params, x: Tensor, coefficients: dict[str, Tensor], state: dict[str, Any]
          ) -> tuple[Tensor, dict[str, Tensor]]:
    """One member's gated loss (the autograd backend's); the auxiliary reconstruction is the "aux" stat."""
    total, parts = gated_loss(params, x, coefficients["l1"])
    return total, {n: parts[n] for n in ("mse", "aux", "codes", "x_hat")}


def _activate_(pre: Tensor, params: Params, state: dict[str, Any]) -> Tensor:
    """Stacked codes [N, b, h] from the gate pre-activations `pre: [N, b, h]` (reused in place)."""
    lin = pre.sub_(params["encoder_bias"].unsqueeze(1))
    return gated_codes(lin, params)[0]


def _make_member(d_in: int, d_hidden: int, key: float | None, *, tied: bool = False, init_norm: float = INIT_NORM,
                 device=None, dtype=None) -> GatedAutoencoder:
    """A fresh member (the penalty is an ensemble hparam, not part of the module)."""
    assert not tied, "Gated members are never tied"
    return GatedAutoencoder(d_in, d_hidden, init_norm=init_norm, device=device, dtype=dtype)


def _workspace_bytes(n_models: int, batch: int, d_in: int, d_hidden: int, tied: bool, compute: int) -> int:
    """x - center [N, C, d] (compute) + the two errors and a squared error [N, C, d] x 3 (fp32) + lin, ReLU(pi),
    codes and their two gradients [N, C, h] x 5 (compute); bf16 adds copies of both matrices and of the weight
    gradient [N, h, d] x 3, and a reconstruction and two error gradients [N, C, d] x 3 (compute)."""
    nbd, nbh, nhd = n_models * batch * d_in, n_models * batch * d_hidden, n_models * d_hidden * d_in
    total = nbd * compute + 3 * nbd * FP32 + 5 * nbh * compute
    if compute != FP32:
        total += 3 * nhd * compute + 3 * nbd * compute
    return total


def _transient_bytes(n_models: int, batch: int, d_in: int, d_hidden: int, k_max: int) -> int:
    """The penalty's decoder gradient [N, h, d] (fp32)."""
    return FP32 * n_models * d_hidden * d_in


def _to_saelens(p: Params, member: dict[str, Any]) -> tuple[Params, dict[str, Any]]:
    """One member (unit rows) as SAELens' "gated" SAE."""
    return ({"W_enc": p["encoder"].T, "b_gate": p["encoder_bias"], "r_mag": p["mag_scale"], "b_mag": p["mag_bias"],
             "W_dec": p["decoder"], "b_dec": p["center"]}, {"architecture": "gated"})


def _from_saelens(t: Params, cfg: dict[str, Any]) -> GatedAutoencoder:
    """A SAELens "gated" SAE as this architecture's module."""
    return dictionary_from_params({"center": t["b_dec"], "encoder": t["W_enc"].T.contiguous(),
                                   "encoder_bias": t["b_gate"], "decoder": t["W_dec"], "mag_scale": t["r_mag"],
                                   "mag_bias": t["b_mag"]}, "gated")

ARCHITECTURE = Architecture(
    to_saelens=_to_saelens, from_saelens=_from_saelens, saelens_names=("gated",),
    name="gated", title="Gated", module=GatedAutoencoder, make_member=_make_member, member_key=None,
    param_names=("center", "encoder", "encoder_bias", "decoder", "mag_scale", "mag_bias"),
    sweep_param="l1", sweep_param_integer=False, scheduled=("l1",),
    member_state=lambda keys, like: {},
    loss=_loss, fused_grads=_fused,
    workspace=lambda batch, chunk_tokens, state: (chunk_tokens, True),
    activate_=_activate_,
    dead_policy="resample", tieable=False, check_keys=lambda keys, d_hidden: None, default_init_norm=0.1,
    key_symbol="L1", key_column="L1 penalty", key_axis="L1 penalty (gate)",
    format_key=lambda key: f"L1 = {key:.3g}", short_key=lambda key: f"{key:.3g}",
    workspace_bytes=_workspace_bytes, transient_bytes=_transient_bytes,
    eval_block_rows=lambda batch: max(1, batch),   # an encode holds two [N, rows, h] buffers where the step held five
    code_biases=("encoder_bias", "mag_bias"), scaled_params=("center", "encoder_bias", "mag_bias"), latent_vectors=("encoder_bias", "mag_scale", "mag_bias"),
)
GATED = ARCHITECTURE
