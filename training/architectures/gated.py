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


def _transient_bytes(n_models: int, batch: int, d_in: int, d_hidden: int, k_max: int) -> int:
    """vmap(grad) of the loss: about ten [N, B, h] tensors (pre-activations, gate, magnitudes, codes, ReLU(gate) and
    their gradients), four [N, B, d] (reconstructions and their errors) and the decoder gradient [N, h, d] (fp32)."""
    return FP32 * n_models * (10 * batch * d_hidden + 4 * batch * d_in + d_hidden * d_in)


ARCHITECTURE = Architecture(
    name="gated", title="Gated", module=GatedAutoencoder, make_member=_make_member, member_key=None,
    param_names=("center", "encoder", "encoder_bias", "decoder", "mag_scale", "mag_bias"),
    sweep_param="l1", sweep_param_integer=False, scheduled=("l1",),
    member_state=lambda keys, like: {},
    loss=_loss, fused_grads=None,
    workspace=lambda batch, chunk_tokens, state: (batch, False),
    activate_=_activate_,
    dead_policy="resample", tieable=False, check_keys=lambda keys, d_hidden: None, default_init_norm=0.1,
    key_symbol="L1", key_column="L1 penalty", key_axis="L1 penalty (gate)",
    format_key=lambda key: f"L1 = {key:.3g}", short_key=lambda key: f"{key:.3g}",
    workspace_bytes=lambda n_models, batch, d_in, d_hidden, tied, compute: 0, transient_bytes=_transient_bytes,
    eval_block_rows=lambda batch: max(1, batch // 2),   # an encode holds two [N, rows, h] buffers
    code_biases=("encoder_bias", "mag_bias"), latent_vectors=("encoder_bias", "mag_scale", "mag_bias"),
)
GATED = ARCHITECTURE
