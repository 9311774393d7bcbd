"""The TopK architecture (Gao et al. 2024): keep the k latents with the largest pre * decoder-row norm, ReLU,
decode; swept over k, dead latents revived by the aux-K loss. Never tied.

loss = MSE + aux_coef * aux (aux: training/dictionary.py `aux_k_loss`, only while a member has dead latents).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from training.architectures import Architecture
from training.dictionary import (
    aux_k_loss,
    decode_codes,
    decoder_norms,
    Dictionary,
    dictionary_from_params,
    INIT_NORM,
    mse_loss,
    Params,
    pre_activations,
    topk_indices,
    topk_mask_codes,
    unit_norm_params,
)
from training.fused import SparseCodes, Workspace, accumulate_bmm, aux_k_grads

FP32 = 4
TopKDecoder = Literal["sparse", "dense"]


def topk_loss(params: Params, x: Tensor, k: int, *, rank_mask: Tensor | None = None,
              dead: Tensor | None = None, k_aux: int = 0, aux_coef: float = 1 / 32
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """(MSE + aux_coef * aux, {"mse", "aux", "codes", "x_hat"}) of a TopK dictionary."""
    pre = pre_activations(params, x)
    codes = topk_mask_codes(pre, k, rank_mask, decoder_norms(params))
    x_hat = decode_codes(params, codes)
    mse = mse_loss(x, x_hat)
    aux = (aux_k_loss(params, x, x_hat, pre, dead, k_aux) if (dead is not None and k_aux > 0)
           else torch.zeros_like(mse))
    return mse + aux_coef * aux, {"mse": mse, "aux": aux, "codes": codes, "x_hat": x_hat}


def checked_k(k: int, d_hidden: int) -> int:
    """`k` as an int, or a ValueError unless 1 <= k <= d_hidden."""
    if not 0 < k <= d_hidden:
        raise ValueError(f"k={k} must be in [1, d_hidden={d_hidden}]")
    return int(k)


class TopKAutoencoder(Dictionary):
    """TopK dictionary (Gao et al. 2024): keep the k largest pre-activations, ReLU, decode."""

    architecture = "topk"

    def __init__(self, d_in: int, d_hidden: int, k: int, *, init_norm: float = INIT_NORM, device=None, dtype=None):
        super().__init__()
        self.k = checked_k(k, d_hidden)
        self._init_params(d_in, d_hidden, False, init_norm, device, dtype)

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes: [n, d_hidden] with at most k non-zeros per row."""
        return topk_mask_codes(pre_activations(self.params(), x), self.k, norms=decoder_norms(self.params()))

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values: [n, k] after ReLU, indices: [n, k]) of the active latents."""
        pre = pre_activations(self.params(), x)
        idx = topk_indices(pre, self.k, decoder_norms(self.params()))
        return pre.gather(-1, idx).relu(), idx

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """x_hat: [n, d_in] from the k active rows only (embedding_bag gather, no dense matmul)."""
        return F.embedding_bag(indices, self.decoder, per_sample_weights=values, mode="sum") + self.center

    def loss(self, x: Tensor, dead: Tensor | None = None, *, k_aux: int | None = None,
             aux_coef: float = 1 / 32) -> tuple[Tensor, dict[str, Tensor]]:
        """(MSE + aux_coef * aux, {"mse", "aux"}); aux only with a `dead: BoolTensor[d_hidden]` mask.

        k_aux defaults to d_in // 2 (Gao et al.).
        """
        k_aux = self.d_in // 2 if k_aux is None else k_aux
        total, parts = topk_loss(self.params(), x, self.k, dead=dead, k_aux=k_aux, aux_coef=aux_coef)
        return total, {"mse": parts["mse"], "aux": parts["aux"]}


def ranking_scores(params: Params, x: Tensor, ws: Workspace) -> tuple[Tensor, Tensor, Tensor]:
    """(xc: [N, B, d] = x - center (x's dtype), pre: [N, B, h] = (xc @ encoder^T + encoder_bias) * decoder-row norm, the
    scores TopK and BatchTopK rank by (the compute dtype, in the workspace's "pre" buffer), norms: [N, h])."""
    n, batch = params["decoder"].shape[0], x.shape[0]
    h, d = params["decoder"].shape[1:]
    center, bias, enc = params["center"], params["encoder_bias"], params["encoder"]
    cd, acc = ws.compute, x.dtype
    xc = torch.sub(x.unsqueeze(0), center.unsqueeze(1), out=ws.buffer("xc", (n, batch, d), acc))
    pre = ws.buffer("pre", (n, batch, h), cd)
    pre.copy_(bias.unsqueeze(1).expand_as(pre))
    low = cd != acc                                                                  # autocast: encoder matmul in cd
    enc_c = ws.buffer("enc", tuple(enc.shape), cd).copy_(enc) if low else enc
    pre.baddbmm_(ws.xc.copy_(xc) if low else xc, enc_c.transpose(1, 2))
    norms = decoder_norms(params)                                                    # [N, h]
    return xc, pre.mul_(norms.unsqueeze(1).to(cd)), norms


def topk_fused_grads(params: Params, x: Tensor, rank_mask: Tensor | None, k_max: int, dead: Tensor | None,
                     k_aux: int, aux_coef: float, ws: Workspace, grads: Params,
                     decoder_impl: TopKDecoder = "sparse") -> dict[str, Tensor]:
    """Write d loss_i / d params_i for TopK members into `grads`; return per-member stats.

    `rank_mask: [N, k_max]` (1 for ranks < k_i) lets members differ in k (None: all k equal).
    `dead: [N, h]` enables the aux-K term (None skips it). Latents are ranked by pre * decoder-row
    norm (the pre-activation buffer is scaled in place and the kept values divided back). The decoder
    is applied to the k active rows only (embedding_bag forward, CSR products backward), unless
    `decoder_impl == "dense"` (dense codes and decoder matmuls, kept for the benchmark's comparison).
    """
    n, batch = params["decoder"].shape[0], x.shape[0]
    h, d = params["decoder"].shape[1:]
    center, enc, dec = params["center"], params["encoder"], params["decoder"]
    cd, acc = ws.compute, x.dtype
    low = cd != acc                                                                  # autocast: matmuls in cd
    xc, pre, norms = ranking_scores(params, x, ws)
    scores, idx = pre.topk(k_max, dim=-1, sorted=rank_mask is not None)              # [N, B, k]
    picked_norms = norms.gather(1, idx.view(n, -1)).view_as(scores)
    vals = scores.to(acc).relu_().div_(picked_norms.clamp_min(1e-12))
    if rank_mask is not None:
        vals.mul_(rank_mask.unsqueeze(1))
    sp = SparseCodes.build(idx, h)
    dec_flat = dec.view(n * h, d)

    err = ws.small.copy_(center.unsqueeze(1).expand_as(ws.small))
    if decoder_impl == "dense":
        dec_c = ws.buffer("dec", tuple(dec.shape), cd).copy_(dec) if low else dec
        codes = ws.big_a.zero_().scatter_(-1, idx, vals.to(cd))
        err.add_(torch.bmm(codes, dec_c, out=ws.buffer("x_hat", (n, batch, d), cd)))
    else:
        err.add_(sp.gather_sum(dec_flat, vals).view(n, batch, d))
    err.sub_(x)
    sq_err = err.square().sum(-1)
    resid = err.neg() if (dead is not None and k_aux > 0) else None                 # x - x_hat
    g = err.mul_(2.0 / batch)                                                        # d MSE / d x_hat

    if decoder_impl == "dense":
        g_c = ws.buffer("g", (n, batch, d), cd).copy_(g) if low else g
        accumulate_bmm(grads["decoder"], codes.transpose(1, 2), g_c, True, ws)
        gcodes = torch.bmm(g_c, dec_c.transpose(1, 2), out=ws.big_b)
        gvals = gcodes.gather(-1, idx).to(acc)
    else:
        sp.scatter_rows(g.view(n * batch, d), vals, grads["decoder"].view(n * h, d))
        gvals = sp.weight_grad(g.view(n * batch, d), dec_flat).view(n, batch, k_max)
    gvals = gvals.masked_fill_(vals <= 0, 0)                                         # d loss / d pre at idx
    sp.scatter_rows(xc.view(n * batch, d), gvals, grads["encoder"].view(n * h, d))
    gbias = grads["encoder_bias"]
    ones = x.new_ones(n * batch, 1)                                                  # [N*B, 1]
    sp.scatter_rows(ones, gvals, gbias.view(n * h, 1))                              # row sums: no atomics
    grads["center"].copy_(g.sum(1))

    mse = sq_err.mean(-1)
    aux = torch.zeros_like(mse)
    if dead is not None and k_aux > 0:
        aux = aux_k_grads(pre, norms, dead, k_aux, aux_coef, resid, xc, params, grads)
    grads["center"].sub_(torch.bmm(gbias.unsqueeze(1), enc).squeeze(1))

    active = (vals > 0).to(x.dtype)                                                 # [N, B, k]
    fired_count = torch.zeros(n * h, device=x.device, dtype=x.dtype)
    fired_count.index_add_(0, sp.flat_idx.view(-1), active.view(-1))
    return {"loss": mse + aux_coef * aux, "mse": mse, "aux": aux, "l1_norm": (vals * picked_norms).sum((1, 2)) / batch,
            "sq_err_sum": sq_err.sum(-1), "l0": active.sum((1, 2)) / batch,
            "fired": fired_count.view(n, h) > 0}


def _rank_mask(ks: list[int], dtype: torch.dtype) -> Tensor:
    """[N, max(ks)] on the CPU: 1 where rank < k_i (member i keeps its first k_i ranks)."""
    return (torch.arange(max(ks)) < torch.tensor(ks)[:, None]).to(dtype)


def _member_state(keys: Tensor, like: Tensor) -> dict[str, Any]:
    """{"rank_mask": [N, k_max] (vmapped), "k_max", "uniform_k"} from the members' `keys` (their k)."""
    ks = [int(k) for k in keys.tolist()]
    return {"rank_mask": _rank_mask(ks, like.dtype).to(like.device), "k_max": max(ks),
            "uniform_k": len(set(ks)) == 1}


def _loss(params: Params, x: Tensor, coefficients: dict[str, Tensor], state: dict[str, Any]
          ) -> tuple[Tensor, dict[str, Tensor]]:
    """One member's MSE + aux_coef * aux (the autograd backend's loss; k from the member's rank mask)."""
    return topk_loss(params, x, state["k_max"], rank_mask=state["rank_mask"], dead=state.get("dead"),
                     k_aux=state["k_aux"], aux_coef=state["aux_coef"])


def _fused(params: Params, x: Tensor, coefficients: dict[str, Tensor], state: dict[str, Any], ws: Workspace,
           grads: Params) -> dict[str, Tensor]:
    """`topk_fused_grads` (no rank mask when every member has the same k)."""
    rank_mask = None if state["uniform_k"] else state["rank_mask"]
    return topk_fused_grads(params, x, rank_mask, state["k_max"], state.get("dead"), state["k_aux"],
                            state["aux_coef"], ws, grads, state["decoder_impl"])


def _activate_(pre: Tensor, params: Params, state: dict[str, Any]) -> Tensor:
    """Stacked codes [N, b, h] from `pre: [N, b, h]` (two [N, b, h] buffers)."""
    scores = pre * decoder_norms(params).unsqueeze(1)                               # [N, b, h]
    idx = scores.topk(state["k_max"], dim=-1).indices                              # [N, b, k_max]
    vals = pre.gather(-1, idx).relu_().mul_(state["rank_mask"].unsqueeze(1))
    del pre
    return scores.zero_().scatter_(-1, idx, vals)


def _make_member(d_in: int, d_hidden: int, key: int | None, *, tied: bool = False, init_norm: float = INIT_NORM,
                 device=None, dtype=None) -> TopKAutoencoder:
    """A fresh member with k = `key`."""
    assert key is not None and not tied, "TopK members need k and are never tied"
    return TopKAutoencoder(d_in, d_hidden, int(key), init_norm=init_norm, device=device, dtype=dtype)


def _workspace_bytes(n_models: int, batch: int, d_in: int, d_hidden: int, tied: bool, compute: int) -> int:
    """x - center [N, B, d] (fp32 and compute) + error [N, B, d] (fp32) + scores [N, B, h] (compute);
    bf16 adds the encoder copy [N, h, d]."""
    nbd, nbh, nhd = n_models * batch * d_in, n_models * batch * d_hidden, n_models * d_hidden * d_in
    total = nbd * (FP32 + compute) + nbd * FP32 + nbh * compute
    return total + (nhd * compute if compute != FP32 else 0)


def _transient_bytes(n_models: int, batch: int, d_in: int, d_hidden: int, k_max: int) -> int:
    """The error terms [N, B, d] x 3 and the sparse-code indices, values and their gradients, [N, B, k_max] x about
    8 eight-byte entries (aux-K: k_aux = d // 2 more)."""
    k = int(k_max) + min(d_hidden, d_in // 2)
    return 3 * FP32 * n_models * batch * d_in + 8 * 8 * n_models * batch * k


def _check_keys(keys: list, d_hidden: int) -> str | None:
    """A complaint when a member's k exceeds the dictionary size."""
    return f"--k_values {max(keys)} exceeds the dictionary size {d_hidden}" if max(keys) > d_hidden else None


def _to_saelens(p: Params, member: dict[str, Any]) -> tuple[Params, dict[str, Any]]:
    """One member (unit rows: ranking by pre * norm is ranking by pre) as SAELens' "topk" SAE."""
    from training.saelens import plain_to_saelens
    return plain_to_saelens(p), {"architecture": "topk", "k": int(member["k"]), "rescale_acts_by_decoder_norm": False}


def _from_saelens(t: Params, cfg: dict[str, Any]) -> TopKAutoencoder:
    """A SAELens "topk" SAE: exact when it ranks by pre * norm (folded here) or its decoder rows are unit."""
    from training.saelens import check_unit_rows, saelens_params
    p = saelens_params(t)
    if not cfg.get("rescale_acts_by_decoder_norm", False):
        check_unit_rows(p["decoder"], "its TopK ranks latents by pre-activation alone")
    return dictionary_from_params(unit_norm_params(p), "topk", int(cfg["k"]))

ARCHITECTURE = Architecture(
    to_saelens=_to_saelens, from_saelens=_from_saelens, saelens_names=("topk",),
    name="topk", title="TopK", module=TopKAutoencoder, make_member=_make_member, member_key=lambda m: m.k,
    param_names=("center", "encoder", "encoder_bias", "decoder"),
    sweep_param="k", sweep_param_integer=True, scheduled=(),
    member_state=_member_state, loss=_loss, fused_grads=_fused,
    workspace=lambda batch, chunk_tokens, state: (batch, state["decoder_impl"] == "dense"),
    activate_=_activate_,
    dead_policy="aux_k", tieable=False, check_keys=_check_keys, default_init_norm=0.5,
    key_symbol="k", key_column="k", key_axis="k (active features per token)",
    format_key=lambda key: f"k = {int(key)}", short_key=lambda key: f"k={int(key)}",
    workspace_bytes=_workspace_bytes, transient_bytes=_transient_bytes,
    eval_block_rows=lambda batch: max(1, batch // 2),   # an encode holds two [N, rows, h] buffers, the step one
)
TOPK = ARCHITECTURE
