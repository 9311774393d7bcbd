"""The JumpReLU architecture (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope, Lieberum et al. 2024):
per-latent learned thresholds theta (a parameter, kept >= 0), codes = pre * H(pre - theta), trained on
MSE + l0_coefficient * L0 with straight-through estimators; swept over `l0_coefficient` (warmed up by the sweep).

Maths (one member; `pre: [B, h]` as in training/dictionary.py, H the Heaviside step, K the rectangle kernel
K(u) = 1 on (-1/2, 1/2), 0 elsewhere, eps the bandwidth):
    codes = JumpReLU(pre) = pre * H(pre - theta)
    L0    = mean over the batch of sum_j H(pre_j - theta_j)
    loss  = MSE + l0_coefficient * L0
Pseudo-derivatives (the paper's eqs. 11-12; the true ones are 0 almost everywhere with respect to theta):
    d codes_j / d pre_j   = H(pre_j - theta_j)
    d codes_j / d theta_j = -(theta_j / eps) * K((pre_j - theta_j) / eps)
    d H(pre_j - theta_j) / d theta_j = -(1 / eps) * K((pre_j - theta_j) / eps),   d / d pre_j = 0
The L0 term is on the pre-activations, as in the paper's
equations and SAELens (the paper's pseudo-code applies the step to the codes, which drops the kernel's lower half
when theta < eps / 2).

Defaults from SAELens (JumpReLUTrainingSAE; dictionary_learning's JumpReluTrainer likewise learns theta itself):
threshold init 0.01 and bandwidth eps = 0.05 (the paper's and Gemma Scope's 0.001 and 0.001 are meant for ~10^5
steps), for inputs normalised to E||x||^2 = 1 (the sweep's --activation_norm 1). theta is the parameter itself, not
its log as in the paper (SAELens issue #494): Adam moves a parameter by about lr per step, so a log-threshold moves
theta by a factor of at most exp(lr) per step and a small init barely moves in a few thousand steps (measured: L0
independent of lambda). theta is kept >= 0 by projection after every Adam step (`constrain_`, as SAELens clamps the
parameter's data, not the graph, which would zero its gradient at 0). Decoder rows of unit norm, kept so during
training (gradient projected, rows renormalised: `unit_decoder`), so that pre-activations are the codes'
contributions in input units and eps means the same for every latent; encoder = decoder transpose; encoder bias 0;
center (b_dec) 0 (the sweep's --center_init sets it). The L0 counts latents, so it is not decoder-norm weighted. No
dead-latent revival (dead policy "none"). The bandwidth is the architecture's option `jumprelu_bandwidth`
(--jumprelu_bandwidth).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from training.architectures import Architecture
from training.dictionary import Dictionary, Params, decode_codes, decoder_norms, mse_loss, pre_activations
from training.dictionary import dictionary_from_params, unit_norm_params
from training.fused import accumulate_bmm, centred, per_member, reconstruction_grad, relu_mask_, sum_tokens_, Workspace

FP32 = 4
BANDWIDTH = 0.05
"""eps, the rectangle kernel's width (in pre-activation units, at E||x||^2 = 1; SAELens' jumprelu_bandwidth)."""
INIT_THRESHOLD = 0.01
"""theta of every latent at initialisation (SAELens' jumprelu_init_threshold)."""


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 where -1/2 < u < 1/2, else 0 (same dtype as u)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """`t` summed over its leading dims down to `shape` (the threshold's; broadcast over the batch)."""
    return t.sum(tuple(range(t.dim() - len(shape)))) if t.dim() > len(shape) else t



def _save_pre_theta(ctx: Any, inputs: tuple[Tensor, Tensor, float], output: Tensor) -> None:
    """The straight-through functions' context: pre and theta saved for backward, the bandwidth kept."""
    pre, theta, bandwidth = inputs
    ctx.save_for_backward(pre, theta)
    ctx.bandwidth = bandwidth

class JumpReLUFunction(torch.autograd.Function):
    """pre * H(pre - theta), with the straight-through pseudo-derivative -(theta / eps) K((pre - theta) / eps) for
    theta (vmap-able: functorch-style `setup_context`, generated vmap rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        return pre * (pre > theta).to(pre.dtype)

    setup_context = staticmethod(_save_pre_theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        pre_grad = (pre > theta).to(grad.dtype) * grad
        theta_grad = -(theta / eps) * rectangle((pre - theta) / eps) * grad
        return pre_grad, _sum_to(theta_grad, theta.shape), None


class StepFunction(torch.autograd.Function):
    """H(pre - theta), with the pseudo-derivative -(1 / eps) K((pre - theta) / eps) for theta and none for pre."""

    generate_vmap_rule = True

    @staticmethod
    def forward(pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        return (pre > theta).to(pre.dtype)

    setup_context = staticmethod(_save_pre_theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        theta_grad = -(1.0 / eps) * rectangle((pre - theta) / eps) * grad
        return None, _sum_to(theta_grad, theta.shape), None


def jumprelu_loss(params: Params, x: Tensor, l0_coefficient: Tensor | float, bandwidth: float = BANDWIDTH
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """(MSE + l0_coefficient * L0, {"mse", "l0", "codes", "x_hat"}) of a JumpReLU dictionary, with the paper's
    straight-through pseudo-derivatives for the thresholds (module docstring)."""
    pre = pre_activations(params, x)                                              # [B, h]
    theta = params["threshold"]                                                   # [h]
    codes = JumpReLUFunction.apply(pre, theta, bandwidth)
    x_hat = decode_codes(params, codes)
    mse = mse_loss(x, x_hat)
    l0 = StepFunction.apply(pre, theta, bandwidth).sum(-1).mean()
    return mse + l0_coefficient * l0, {"mse": mse, "l0": l0, "codes": codes, "x_hat": x_hat}


class JumpReLUAutoencoder(Dictionary):
    """JumpReLU dictionary (Rajamanoharan et al. 2024): codes = pre * (pre > threshold), per-latent thresholds
    `threshold` (a parameter, saved with the weights). Never tied."""

    architecture = "jumprelu"

    def __init__(self, d_in: int, d_hidden: int, *, init_norm: float = 1.0, threshold: float = INIT_THRESHOLD,
                 device=None, dtype=None):
        super().__init__()
        self._init_params(d_in, d_hidden, False, init_norm, device, dtype)
        self.threshold = nn.Parameter(torch.full((d_hidden,), float(threshold), device=device, dtype=dtype))

    def encode(self, x: Tensor) -> Tensor:
        """codes: [n, d_hidden] = pre * (pre > threshold), pre = (x - center) @ encoder.T + encoder_bias."""
        pre = pre_activations(self.params(), x)
        return pre * (pre > self.threshold).to(pre.dtype)

    def loss(self, x: Tensor, l0_coefficient: float | Tensor, bandwidth: float = BANDWIDTH
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """(MSE + l0_coefficient * L0, {"mse", "l0"}) with the straight-through threshold gradients."""
        total, parts = jumprelu_loss(self.params(), x, l0_coefficient, bandwidth)
        return total, {"mse": parts["mse"], "l0": parts["l0"]}


def fused_jumprelu_grads(params: Params, x: Tensor, l0_coefficient: Tensor, bandwidth: float, ws: Workspace,
                         grads: Params) -> dict[str, Tensor]:
    """Write d loss_i / d params_i of every member into `grads` (in place), the same pseudo-gradients as
    `jumprelu_loss` under autograd; return per-member stats.

    As `fused_l1_grads` (training/architectures/l1.py): five batched matmuls per chunk of `ws.chunk` tokens, no
    per-step allocation of [N, C, h] tensors, no host sync. Per latent j, with W = K((pre - theta) / eps) the
    kernel window and g_codes = d MSE / d codes:
        d loss / d theta_j = -(theta_j / eps) sum_b W_bj g_codes_bj - l0_coefficient / (B eps) sum_b W_bj
    """
    n, batch = params["decoder"].shape[0], x.shape[0]
    center, bias, enc, dec = params["center"], params["encoder_bias"], params["encoder"], params["decoder"]
    h, d = dec.shape[1:]
    cd, acc = ws.compute, x.dtype
    low = cd != acc                                                                  # autocast to bf16/fp16
    enc_c, dec_c, bias_c = enc, dec, bias
    if low:
        enc_c = ws.buffer("enc", tuple(enc.shape), cd).copy_(enc)
        dec_c = ws.buffer("dec", tuple(dec.shape), cd).copy_(dec)
        bias_c = bias.to(cd)
    theta = params["threshold"]                                                      # [N, h]
    theta_c = theta.to(cd).unsqueeze(1)                                              # [N, 1, h]
    sq_err = x.new_empty(n, batch)                                                   # [N, B]
    code_sum, fired_count = x.new_empty(n, h), x.new_empty(n, h)
    window_count, window_grad = x.new_empty(n, h), x.new_empty(n, h)                 # sum_b W, sum_b W g_codes

    for start in range(0, batch, ws.chunk):
        xs = x[start:start + ws.chunk]
        m, first = xs.shape[0], start == 0
        xc = centred(ws, xs, center, low)                                            # [N, m, d]
        pre = ws.big_a[:, :m]                                                        # [N, m, h]
        torch.baddbmm(bias_c.unsqueeze(1), xc, enc_c.transpose(1, 2), out=pre)
        above = torch.sub(pre, theta_c, out=ws.big_b[:, :m])                          # pre - theta (> 0 iff pre > theta)
        codes = relu_mask_(pre, above)                                               # JumpReLU, in place
        window = ws.buffer("window", (n, ws.chunk, h), cd)[:, :m]
        torch.lt(above.div_(bandwidth).abs_(), 0.5, out=window)                      # K((pre - theta) / eps) as 0/1
        sum_tokens_(window_count, window, first, dtype=acc)
        g, g_c = reconstruction_grad(ws, codes, dec, dec_c, center, xs, sq_err[:, start:start + m], batch, low)
        sum_tokens_(grads["center"], g, first)

        accumulate_bmm(grads["decoder"], codes.transpose(1, 2), g_c, first, ws)     # [N, h, d]
        sum_tokens_(code_sum, codes, first, dtype=acc)
        gcodes = torch.bmm(g_c, dec_c.transpose(1, 2), out=ws.big_b[:, :m])          # d MSE / d codes
        sum_tokens_(window_grad, window.mul_(gcodes), first, dtype=acc)
        gpre = relu_mask_(gcodes, codes)                                             # codes > 0 iff pre > theta
        sum_tokens_(fired_count, codes.sign_(), first)
        accumulate_bmm(grads["encoder"], gpre.transpose(1, 2), xc, first, ws)
        sum_tokens_(grads["encoder_bias"], gpre, first)
    grads["center"].sub_(torch.bmm(grads["encoder_bias"].unsqueeze(1), enc).squeeze(1))
    l0_per_token = per_member(l0_coefficient / batch, window_count)                  # [N, 1]
    torch.mul(theta, window_grad, out=grads["threshold"]).add_(l0_per_token * window_count).div_(-bandwidth)

    mse = sq_err.mean(-1)
    l0 = fired_count.sum(-1) / batch
    return {"loss": mse + l0_coefficient * l0, "mse": mse, "l1_norm": (code_sum * decoder_norms(params)).sum(-1) / batch,
            "sq_err_sum": sq_err.sum(-1), "l0": l0, "fired": fired_count > 0}


def _fused(params: Params, x: Tensor, coefficients: dict[str, Tensor], state: dict[str, Any], ws: Workspace,
           grads: Params) -> dict[str, Tensor]:
    """`fused_jumprelu_grads` with the scheduled L0 coefficient."""
    return fused_jumprelu_grads(params, x, coefficients["l0_coefficient"], state["bandwidth"], ws, grads)


def _workspace_bytes(n_models: int, batch: int, d_in: int, d_hidden: int, tied: bool, compute: int) -> int:
    """As the L1 architecture's (training/architectures/l1.py), plus the kernel window [N, C, h] (compute)."""
    nbd, nbh, nhd = n_models * batch * d_in, n_models * batch * d_hidden, n_models * d_hidden * d_in
    total = nbd * compute + 2 * nbd * FP32 + 3 * nbh * compute
    if compute != FP32:
        total += 3 * nhd * compute + 2 * nbd * compute
    return total


def _loss(params: Params, x: Tensor, coefficients: dict[str, Tensor], state: dict[str, Any]
          ) -> tuple[Tensor, dict[str, Tensor]]:
    """One member's MSE + l0_coefficient * L0 (the autograd backend's loss; its L0 is the ensemble's "l0" stat)."""
    total, parts = jumprelu_loss(params, x, coefficients["l0_coefficient"], state["bandwidth"])
    return total, {n: parts[n] for n in ("mse", "codes", "x_hat")}


def _member_state(keys: Tensor, like: Tensor, jumprelu_bandwidth: float = BANDWIDTH) -> dict[str, Any]:
    """{"bandwidth": eps} (shared by every member; --jumprelu_bandwidth); a ValueError for one that is not positive."""
    if not (math.isfinite(jumprelu_bandwidth) and jumprelu_bandwidth > 0):
        raise ValueError(f"the bandwidth must be positive (got {jumprelu_bandwidth})")
    return {"bandwidth": float(jumprelu_bandwidth)}


def _activate_(pre: Tensor, params: Params, state: dict[str, Any]) -> Tensor:
    """Stacked codes [N, b, h] from `pre: [N, b, h]`, in place: zero where pre <= threshold."""
    return pre.masked_fill_(pre <= params["threshold"].unsqueeze(1), 0)


def _make_member(d_in: int, d_hidden: int, key: float | None, *, tied: bool = False, init_norm: float = 1.0,
                 device=None, dtype=None) -> JumpReLUAutoencoder:
    """A fresh member with unit decoder rows, whatever `init_norm` (they are kept at unit norm: `unit_decoder`); the
    L0 coefficient is an ensemble hparam, not part of the module."""
    assert not tied, "JumpReLU dictionaries are never tied"
    return JumpReLUAutoencoder(d_in, d_hidden, device=device, dtype=dtype)


@torch.no_grad()
def _constrain_(params: Params) -> None:
    """Project the thresholds onto theta >= 0 in place (below 0 the gate would pass negative pre-activations)."""
    params["threshold"].clamp_(min=0)


def _check_keys(keys: list, d_hidden: int) -> str | None:
    """A complaint about a negative or non-finite L0 coefficient."""
    bad = [k for k in keys if not (math.isfinite(k) and k >= 0)]
    return f"--l0_coefficient_values must be finite and not negative (got {bad[0]})" if bad else None


def _transient_bytes(n_models: int, batch: int, d_in: int, d_hidden: int, k_max: int) -> int:
    """The small [N, h] sums and thresholds."""
    return 8 * FP32 * n_models * d_hidden


def _to_saelens(p: Params, member: dict[str, Any]) -> tuple[Params, dict[str, Any]]:
    """One member (unit rows) as SAELens' "jumprelu" SAE (the same threshold)."""
    from training.saelens import plain_to_saelens
    return {**plain_to_saelens(p), "threshold": p["threshold"]}, {"architecture": "jumprelu"}


def _from_saelens(t: Params, cfg: dict[str, Any]) -> JumpReLUAutoencoder:
    """A SAELens "jumprelu" SAE, or a "batchtopk" one at inference (one threshold on pre * norm, folded here:
    SAELens saves BatchTopK for inference as JumpReLU); a threshold below 0 acts as 0 (codes are ReLU'd first)."""
    from training.saelens import saelens_params
    p = saelens_params(t)
    if cfg["architecture"] == "batchtopk":
        if cfg.get("rescale_acts_by_decoder_norm", True):
            p = unit_norm_params(p)
        threshold = t["threshold"] if "threshold" in t else torch.full_like(p["encoder_bias"],
                                                                          float(t["topk_threshold"]))
    else:
        threshold = t["threshold"]
    p["threshold"] = threshold.clamp_min(0)
    return dictionary_from_params(p, "jumprelu")

ARCHITECTURE = Architecture(
    to_saelens=_to_saelens, from_saelens=_from_saelens, saelens_names=("jumprelu", "batchtopk"),
    name="jumprelu", title="JumpReLU", module=JumpReLUAutoencoder, make_member=_make_member, member_key=None,
    param_names=("center", "encoder", "encoder_bias", "decoder", "threshold"),
    sweep_param="l0_coefficient", sweep_param_integer=False, scheduled=("l0_coefficient",),
    member_state=_member_state, options=("jumprelu_bandwidth",),
    loss=_loss, fused_grads=_fused,
    workspace=lambda batch, chunk_tokens, state: (chunk_tokens, True),
    activate_=_activate_,
    dead_policy="none", tieable=False, check_keys=_check_keys, default_init_norm=1.0,
    key_symbol="L0 coefficient", key_column="L0 coefficient", key_axis="L0 coefficient (lambda)",
    format_key=lambda key: f"lambda = {key:.3g}", short_key=lambda key: f"{key:.3g}",
    workspace_bytes=_workspace_bytes, transient_bytes=_transient_bytes,
    eval_block_rows=lambda batch: max(1, batch),   # an encode holds one [N, rows, h] buffer, the step several
    unit_decoder=True, constrain_=_constrain_,
    code_biases=("encoder_bias", "threshold"), scaled_params=("center", "encoder_bias", "threshold"),
)
JUMPRELU = ARCHITECTURE
