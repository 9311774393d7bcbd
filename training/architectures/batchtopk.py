"""The BatchTopK architecture (Bussmann, Leask, Nanda 2024): in training keep the k * B largest scores of the whole
batch (B tokens; score = pre * decoder-row norm, as TopK ranks), ReLU, decode; swept over k, dead latents revived by
the aux-K loss. At inference each token is encoded on its own by one learned threshold:
codes = ReLU(pre) * (pre * norms > threshold).

The threshold is a (never gradient-trained) parameter of each member, kept by `update_state_` as a running average
of the smallest positive kept score of each training batch (dictionary_learning's BatchTopKTrainer: EMA with
beta 0.999 after 1000 skipped steps; here, so that short runs have a usable one too, a mean of all batches so far
weighted 1, 2, ..., t until its newest weight falls to 1 - beta, then that EMA. Measured on the embedded model,
20 steps, k = 4: inference L0 20.1 and explained variance 0.08 with an unweighted running mean, 12.1 and 0.27 with
these weights). With unit decoder rows (the saved dictionaries) scores are the pre-activations, and the
threshold is SAELens' JumpReLU threshold (the same value for every latent).

loss = sum over prefix ends m of MSE(x, decode(codes[:, :m])) + aux_coef * aux; BatchTopK has the one prefix d_hidden
(plain MSE), the Matryoshka architecture (training/architectures/matryoshka.py) several. MSE and aux as in
training/dictionary.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from training.architectures import Architecture
from training.architectures.topk import FP32, _check_keys, checked_k, ranking_scores
from training.dictionary import (
    INIT_NORM,
    Dictionary,
    Params,
    aux_k_loss,
    decoder_norms,
    mse_loss,
    pre_activations,
)
from training.fused import SparseCodes, Workspace, aux_k_grads

THRESHOLD_BETA = 0.999
"""EMA decay of the inference threshold (dictionary_learning's threshold_beta)."""


# ----------------------------------------------------------------------------- maths (one member)

def batch_topk_codes(pre: Tensor, norms: Tensor, k: int | Tensor, k_max: int) -> tuple[Tensor, Tensor]:
    """(codes: [B, h] = ReLU(pre) on the k * B entries of the batch with the largest pre * norms, 0 elsewhere;
    min_kept: [] the smallest positive kept score pre * norms, inf when none). `k` (int or a 0-d tensor, <= k_max)
    is the member's own: the first k * B of the k_max * B ranks are kept."""
    batch, h = pre.shape
    scores = (pre * norms).flatten()                                                 # [B*h]
    top = scores.detach().topk(k_max * batch, sorted=True)
    keep = torch.arange(k_max * batch, device=pre.device) < k * batch               # rank < k * B
    vals = pre.flatten().gather(0, top.indices).relu() * keep.to(pre.dtype)
    codes = torch.zeros_like(scores).scatter(0, top.indices, vals).view(batch, h)
    min_kept = torch.where((vals > 0) & keep, top.values, torch.full_like(top.values, math.inf)).min()
    return codes, min_kept


def prefix_ends(d_hidden: int, fractions: tuple[float, ...] | list[float]) -> list[int]:
    """The prefix sizes of fractions of the dictionary (floor, the last the whole dictionary): ValueError unless
    they rise strictly from at least 1."""
    ends = [int(f * d_hidden) for f in fractions[:-1]] + [d_hidden]
    if not (fractions and all(0 < f <= 1 for f in fractions) and ends[0] >= 1
            and all(a < b for a, b in zip(ends, ends[1:])) and math.isclose(fractions[-1], 1.0)):
        raise ValueError(f"prefixes {list(fractions)} of a dictionary of {d_hidden} give sizes {ends}: they must rise "
                         "strictly from at least one latent and end at 1 (the whole dictionary)")
    return ends


def nested_mse(params: Params, x: Tensor, codes: Tensor, ends: list[int]) -> tuple[Tensor, Tensor]:
    """(sum over prefix ends m of MSE(x, codes[:, :m] @ decoder[:m] + center), x_hat of the whole dictionary)."""
    total = x.new_zeros(())
    x_hat = params["center"].expand_as(x)
    start = 0
    for end in ends:
        x_hat = x_hat + codes[:, start:end] @ params["decoder"][start:end]
        total = total + mse_loss(x, x_hat)
        start = end
    return total, x_hat


def batch_topk_loss(params: Params, x: Tensor, k: int | Tensor, k_max: int, ends: list[int], *,
                    dead: Tensor | None = None, k_aux: int = 0, aux_coef: float = 1 / 32
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """(sum of the prefixes' MSE + aux_coef * aux, {"mse" (whole dictionary), "aux", "min_kept", "codes", "x_hat"})
    of one BatchTopK / Matryoshka dictionary on the batch `x: [B, d_in]`."""
    pre = pre_activations(params, x)
    codes, min_kept = batch_topk_codes(pre, decoder_norms(params), k, k_max)
    nested, x_hat = nested_mse(params, x, codes, ends)
    mse = mse_loss(x, x_hat)
    aux = (aux_k_loss(params, x, x_hat, pre, dead, k_aux) if (dead is not None and k_aux > 0)
           else torch.zeros_like(mse))
    return nested + aux_coef * aux, {"mse": mse, "aux": aux, "min_kept": min_kept, "codes": codes, "x_hat": x_hat}


def threshold_codes(pre: Tensor, norms: Tensor, threshold: Tensor) -> Tensor:
    """Inference codes: ReLU(pre) where pre * norms > threshold, 0 elsewhere (each token on its own)."""
    return pre.relu() * (pre * norms > threshold)


# ----------------------------------------------------------------------------- module

class BatchTopKAutoencoder(Dictionary):
    """BatchTopK dictionary (Bussmann et al. 2024): the batch's k * B largest scores in training, one learned
    threshold at inference (`encode`)."""

    architecture = "batchtopk"

    def __init__(self, d_in: int, d_hidden: int, k: int, *, init_norm: float = INIT_NORM, device=None, dtype=None):
        super().__init__()
        self.k = checked_k(k, d_hidden)
        self._init_params(d_in, d_hidden, False, init_norm, device, dtype)
        self.threshold = nn.Parameter(torch.zeros((), device=device, dtype=dtype), requires_grad=False)
        """Inference threshold on pre * decoder-row norm (not trained by gradient: a running estimate)."""

    def prefix_ends(self) -> list[int]:
        """The nested prefixes whose reconstructions the loss sums (BatchTopK: the whole dictionary)."""
        return [self.d_hidden]

    def encode(self, x: Tensor) -> Tensor:
        """Codes [n, d_hidden] of each row on its own: ReLU(pre) where pre * norms > threshold."""
        return threshold_codes(pre_activations(self.params(), x), decoder_norms(self.params()), self.threshold)

    def encode_batch(self, x: Tensor) -> Tensor:
        """Training codes [n, d_hidden]: the k * n largest scores of the whole batch `x`."""
        return batch_topk_codes(pre_activations(self.params(), x), decoder_norms(self.params()), self.k, self.k)[0]

    def loss(self, x: Tensor, dead: Tensor | None = None, *, k_aux: int | None = None,
             aux_coef: float = 1 / 32) -> tuple[Tensor, dict[str, Tensor]]:
        """(sum of the prefixes' MSE + aux_coef * aux, {"mse", "aux"}) with batch top-k codes; aux only with a
        `dead: BoolTensor[d_hidden]` mask. k_aux defaults to d_in // 2 (Gao et al.)."""
        k_aux = self.d_in // 2 if k_aux is None else k_aux
        total, parts = batch_topk_loss(self.params(), x, self.k, self.k, self.prefix_ends(), dead=dead,
                                       k_aux=k_aux, aux_coef=aux_coef)
        return total, {"mse": parts["mse"], "aux": parts["aux"]}


# ----------------------------------------------------------------------------- fused gradient (stacked members)

def batch_topk_fused_grads(params: Params, x: Tensor, ks: Tensor, k_max: int, uniform_k: bool, ends: list[int],
                           dead: Tensor | None, k_aux: int, aux_coef: float, ws: Workspace, grads: Params
                           ) -> dict[str, Tensor]:
    """Write d loss_i / d params_i of BatchTopK / Matryoshka members into `grads`; return per-member stats.

    `ks: [N]` the members' k (ranks >= k_i * B are dropped when they differ). The kept entries, sorted by token and
    then latent, fall into bags (token, prefix group); the decoder reads only them (embedding_bag per bag, the
    prefixes' reconstructions a cumulative sum over groups), and its transposes are CSR products, as TopK's.
    """
    n, batch = params["decoder"].shape[0], x.shape[0]
    h, d = params["decoder"].shape[1:]
    n_groups = len(ends)
    center, enc, dec = params["center"], params["encoder"], params["decoder"]
    acc = x.dtype
    xc, pre, norms = ranking_scores(params, x, ws)
    n_keep = k_max * batch
    scores, flat = pre.view(n, batch * h).topk(n_keep, dim=-1, sorted=not uniform_k)  # [N, K]
    vals = scores.to(acc).relu_()
    if not uniform_k:
        vals.mul_(torch.arange(n_keep, device=x.device) < (ks * batch).unsqueeze(1))
    flat, order = flat.sort(-1)                                                      # by token, then latent
    scores, vals = scores.gather(-1, order), vals.gather(-1, order)
    token, latent = flat.div(h, rounding_mode="floor"), flat.remainder(h)            # [N, K]
    picked_norms = norms.gather(1, latent)
    vals.div_(picked_norms.clamp_min(1e-12))                                         # ReLU(pre)
    member = torch.arange(n, device=x.device).unsqueeze(1)
    rows = (latent + member * h).view(-1)                                            # [N*K] into [N*h, d]
    tok_bag = (token + member * batch).view(-1)                                      # [N*K] into [N*B]
    sp_tok = SparseCodes.from_bags(rows, tok_bag, n * batch, n * h)
    if n_groups == 1:
        sp = sp_tok
    else:
        group = torch.bucketize(latent, torch.tensor(ends[:-1], device=x.device), right=True)   # [N, K]
        sp = SparseCodes.from_bags(rows, tok_bag * n_groups + group.view(-1), n * batch * n_groups, n * h)
    dec_flat = dec.view(n * h, d)

    parts = sp.gather_sum(dec_flat, vals).view(n, batch, n_groups, d)               # each group's decode
    err = parts.cumsum_(2).add_(center.view(n, 1, 1, d)).sub_(x.view(1, batch, 1, d))   # x_hat_m - x
    sq_err = err.square().sum(-1)                                                    # [N, B, G]
    resid = err[:, :, -1].neg() if (dead is not None and k_aux > 0) else None        # x - x_hat
    g = err.mul_(2.0 / batch)                                                        # d MSE_m / d x_hat_m
    if n_groups > 1:
        g = g.flip(2).cumsum(2).flip(2)                      # d loss / d (group's decode): the prefixes holding it
    g_rows = g.view(n * batch * n_groups, d)
    sp.scatter_rows(g_rows, vals, grads["decoder"].view(n * h, d))
    gvals = sp.weight_grad(g_rows, dec_flat).view(n, n_keep).masked_fill_(vals <= 0, 0)   # d loss / d pre
    sp_tok.scatter_rows(xc.view(n * batch, d), gvals, grads["encoder"].view(n * h, d))
    gbias = grads["encoder_bias"]
    sp_tok.scatter_rows(x.new_ones(n * batch, 1), gvals, gbias.view(n * h, 1))
    grads["center"].copy_(g[:, :, 0].sum(1))                                         # group 0 sums every prefix
    grads["threshold"].zero_()                                                       # no gradient trains it

    mse_groups = sq_err.mean(1)                                                      # [N, G]
    mse = mse_groups[:, -1]
    aux = torch.zeros_like(mse)
    if dead is not None and k_aux > 0:
        aux = aux_k_grads(pre, norms, dead, k_aux, aux_coef, resid, xc, params, grads)
    grads["center"].sub_(torch.bmm(gbias.unsqueeze(1), enc).squeeze(1))

    active = vals > 0                                                                # [N, K]
    fired = torch.zeros(n * h, device=x.device, dtype=x.dtype)
    fired.index_add_(0, rows, active.view(-1).to(x.dtype))
    min_kept = torch.where(active, scores.to(acc), torch.full_like(vals, math.inf)).amin(-1)
    return {"loss": mse_groups.sum(-1) + aux_coef * aux, "mse": mse, "aux": aux,
            "l1_norm": (vals * picked_norms).sum(-1) / batch, "sq_err_sum": sq_err[:, :, -1].sum(-1),
            "l0": active.sum(-1).to(x.dtype) / batch, "fired": fired.view(n, h) > 0, "min_kept": min_kept}


# ----------------------------------------------------------------------------- declaration pieces

def member_state(keys: Tensor, like: Tensor, ends: list[int]) -> dict[str, Any]:
    """{"k": [N] (vmapped), "k_max", "uniform_k", "ends": prefix ends, "threshold_batches": [N] (saved)}."""
    ks = [int(k) for k in keys.tolist()]
    return {"k": torch.tensor(ks, device=like.device), "k_max": max(ks), "uniform_k": len(set(ks)) == 1,
            "ends": ends, "threshold_batches": torch.zeros(len(ks), dtype=torch.float64, device=like.device)}


def update_threshold_(state: dict[str, Any], stats: dict[str, Tensor], active: Tensor) -> None:
    """threshold += w * (min_kept - threshold) where a member is active and kept a positive score, w = 2 / (t + 1)
    for its t-th such batch until that falls to 1 - beta, then 1 - beta: the mean of the batches' values weighted
    1, 2, ..., t (recent batches count more while the codes still grow), becoming dictionary_learning's EMA."""
    seen = active & torch.isfinite(stats["min_kept"])
    t = state["threshold_batches"].add_(seen)                                        # [N] float64
    weight = torch.maximum(2 / (t + 1), torch.full_like(t, 1 - THRESHOLD_BETA)) * seen
    threshold = state["threshold"]
    target = torch.where(seen, stats["min_kept"].to(threshold.dtype), threshold)
    threshold.add_((target - threshold) * weight.to(threshold.dtype))


def loss(params: Params, x: Tensor, coefficients: dict[str, Tensor], state: dict[str, Any]
         ) -> tuple[Tensor, dict[str, Tensor]]:
    """One member's loss (the autograd backend's; k from the member's state)."""
    return batch_topk_loss(params, x, state["k"], state["k_max"], state["ends"], dead=state.get("dead"),
                           k_aux=state["k_aux"], aux_coef=state["aux_coef"])


def fused(params: Params, x: Tensor, coefficients: dict[str, Tensor], state: dict[str, Any], ws: Workspace,
          grads: Params) -> dict[str, Tensor]:
    """`batch_topk_fused_grads` with the members' state (the sparse decoder only)."""
    return batch_topk_fused_grads(params, x, state["k"], state["k_max"], state["uniform_k"], state["ends"],
                                  state.get("dead"), state["k_aux"], state["aux_coef"], ws, grads)


def activate_(pre: Tensor, params: Params, state: dict[str, Any]) -> Tensor:
    """Stacked inference codes [N, b, h] from `pre: [N, b, h]` (in place): the threshold rule, each token alone."""
    keep = pre * decoder_norms(params).unsqueeze(1) > state["threshold"].view(-1, 1, 1)
    return pre.relu_().mul_(keep)


def workspace_bytes(n_models: int, batch: int, d_in: int, d_hidden: int, tied: bool, compute: int) -> int:
    """x - center [N, B, d] (fp32 and compute) + scores [N, B, h] (compute); bf16 adds the encoder copy."""
    nbd, nbh, nhd = n_models * batch * d_in, n_models * batch * d_hidden, n_models * d_hidden * d_in
    return nbd * (FP32 + compute) + nbh * compute + (nhd * compute if compute != FP32 else 0)


def transient_bytes(n_models: int, batch: int, d_in: int, d_hidden: int, k_max: int, n_groups: int = 1) -> int:
    """The prefixes' decodes, errors and gradients [N, B, G, d] x 3 and the kept entries [N, k_max * B] x about
    12 eight-byte entries (indices, sort, bags, CSR), plus the aux-K term's [N, B, d_in // 2]."""
    k = int(k_max) * 12 + 8 * min(d_hidden, d_in // 2)
    return 3 * FP32 * n_models * batch * d_in * n_groups + 8 * n_models * batch * k


def make_member(d_in: int, d_hidden: int, key: int | None, *, tied: bool = False, init_norm: float = INIT_NORM,
                device=None, dtype=None) -> BatchTopKAutoencoder:
    """A fresh member with k = `key`."""
    assert key is not None and not tied, "BatchTopK members need k and are never tied"
    return BatchTopKAutoencoder(d_in, d_hidden, int(key), init_norm=init_norm, device=device, dtype=dtype)


def to_saelens(p: Params, member: dict[str, Any]) -> tuple[Params, dict[str, Any]]:
    """One member (unit rows: its scores are its pre-activations) at inference as SAELens' "jumprelu" SAE, one
    threshold for every latent (as SAELens saves BatchTopK and Matryoshka dictionaries)."""
    from training.saelens import plain_to_saelens
    threshold = p["threshold"].clamp_min(0)                  # below 0 it keeps every positive code, as 0 does
    return ({**plain_to_saelens(p), "threshold": threshold.expand(p["encoder_bias"].shape)},
            {"architecture": "jumprelu"})

ARCHITECTURE = Architecture(
    to_saelens=to_saelens,
    name="batchtopk", title="BatchTopK", module=BatchTopKAutoencoder, make_member=make_member,
    member_key=lambda m: m.k,
    param_names=("center", "encoder", "encoder_bias", "decoder", "threshold"),
    sweep_param="k", sweep_param_integer=True, scheduled=(),
    member_state=lambda keys, like: member_state(keys, like, [like.shape[1]]),
    loss=loss, fused_grads=fused,
    workspace=lambda batch, chunk_tokens, state: (batch, False),
    activate_=activate_,
    dead_policy="aux_k", tieable=False, check_keys=_check_keys, default_init_norm=0.5,
    key_symbol="k", key_column="k", key_axis="k (mean active features per token)",
    format_key=lambda key: f"k = {int(key)}", short_key=lambda key: f"k={int(key)}",
    workspace_bytes=workspace_bytes, transient_bytes=transient_bytes,
    eval_block_rows=lambda batch: max(1, batch // 2),   # an encode holds pre and its scores, [N, rows, h] each
    saved_state=("threshold_batches",), update_state_=update_threshold_,
    state_params=("threshold",), scaled_params=("center", "encoder_bias", "threshold"),
)
BATCHTOPK = ARCHITECTURE
