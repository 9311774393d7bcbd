"""Train n_models sparse autoencoders of one shape at once, on the same batches.

Parameters, Adam state and per-member hyperparameters are stacked on a leading `[n_models]` axis
(`torch.func.stack_module_state`). Two interchangeable gradient backends compute every member's
gradient of its own loss in one pass:
  - "autograd": `vmap(grad(loss))` over the stacked params (the torch.func ensembling recipe);
  - "fused" (default): the same gradients written out analytically with batched matmuls into
    preallocated buffers (no recomputation, no per-step allocation of [n_models, batch, d_hidden]
    tensors, no host sync). Tests check it against the autograd backend.
Everything after the gradient (decoder-norm projection, Adam, renormalisation, NaN freezing,
dead-latent tracking) is shared and works in place on the stacked tensors. Both backends follow
autocast: under `torch.autocast(device, dtype=torch.bfloat16)` the matmuls run in bf16 (on CPUs
with AVX512-BF16 about 4x the fp32 matmul rate), params, Adam state and gradients stay fp32.

Shapes: `x: [batch, d_in]`; stacked params `center: [N, d_in]`, `encoder, decoder: [N, d_hidden, d_in]`,
`encoder_bias: [N, d_hidden]`; N = n_models.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from training.dictionary import (
    Dictionary,
    Params,
    INIT_NORM,
    SparseLinearAutoencoder,
    TopKAutoencoder,
    decode_codes,
    decoder_norms,
    encoder_weight,
    init_center_value,
    l1_loss,
    l1_penalty,
    pre_activations,
    project_decoder_grad_,
    topk_loss,
    topk_mask_codes,
    unstack_dictionaries,
)

Architecture = Literal["l1", "topk"]
Backend = Literal["fused", "autograd"]
TopKDecoder = Literal["sparse", "dense"]


# ----------------------------------------------------------------------------- small helpers

def _per_member(values: Tensor, like: Tensor) -> Tensor:
    """View `values: [N]` as [N, 1, ...] to broadcast against `like: [N, ...]`."""
    return values.view(values.shape[0], *([1] * (like.dim() - 1)))


def _mean_live_norm(rows: Tensor, dead: Tensor, fallback: float) -> Tensor:
    """[N]: the mean L2 norm of each member's rows (`rows: [N, h, d]`) that are not `dead: [N, h]`
    (`fallback` for a member with no live row)."""
    alive = (~dead).to(rows.dtype)
    n_alive = alive.sum(-1)
    mean = (rows.norm(dim=-1) * alive).sum(-1) / n_alive.clamp_min(1)
    return torch.where(n_alive > 0, mean, torch.full_like(mean, fallback))


_ORDER = {name: i for i, name in enumerate(("center", "encoder", "encoder_bias", "decoder", "lr", "l1", "k"))}
"""Canonical order of params (as the modules register them) and hparams in the ensemble's dicts."""


def _rank_mask(ks: list[int], dtype: torch.dtype) -> Tensor:
    """[N, max(ks)] on the CPU: 1 where rank < k_i (member i keeps its first k_i ranks)."""
    return (torch.arange(max(ks)) < torch.tensor(ks)[:, None]).to(dtype)


def member_generator(seed: int, step: int, member: int, stream: str = "resample") -> torch.Generator:
    """A CPU generator for one random stream of one member at one step, seeded from a hash of
    (stream, seed, step, member): derivable again on any machine, so no generator state is ever stored."""
    digest = hashlib.blake2b(f"{stream}/{seed}/{step}/{member}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


def _encoder_name(params: Params) -> str:
    """Name of the stacked encoder matrix ("decoder" when tied)."""
    return "encoder" if "encoder" in params else "decoder"


@dataclass
class _Workspace:
    """Preallocated per-step buffers for one batch size (allocating them each step costs page faults).

    Matmul operands and the [N, C, d_hidden] buffers are in the compute dtype (the autocast dtype, or
    the params' dtype); reconstruction errors, reductions and gradients stay in the params' dtype.
    """
    batch: int
    chunk: int          # tokens processed per pass (C); C = B for TopK
    compute: torch.dtype
    xc: Tensor          # [N, C, d_in]      x - center                                 (compute dtype)
    small: Tensor       # [N, C, d_in]      x_hat -> err -> d loss / d x_hat           (params dtype)
    big_a: Tensor       # [N, C, d_hidden]  pre -> codes -> fired indicator   (dense paths)
    big_b: Tensor       # [N, C, d_hidden]  d loss / d codes -> d loss / d pre (dense paths)
    extra: dict[str, Tensor] = field(default_factory=dict)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A named buffer, allocated on first use."""
        t = self.extra.get(name)
        if t is None or t.shape != shape or t.dtype != dtype:
            t = self.extra[name] = torch.empty(shape, dtype=dtype, device=self.xc.device)
        return t


def _workspace(n_models: int, batch: int, chunk: int, d_in: int, d_hidden: int, dense: bool, like: Tensor,
               compute: torch.dtype) -> _Workspace:
    """Allocate the buffers of `_Workspace` (the [N, C, d_hidden] ones only when `dense`)."""
    chunk = min(chunk, batch)
    big = (n_models, chunk, d_hidden) if dense else (0,)
    return _Workspace(batch, chunk, compute, like.new_empty(n_models, chunk, d_in, dtype=compute),
                      like.new_empty(n_models, chunk, d_in), like.new_empty(big, dtype=compute),
                      like.new_empty(big, dtype=compute))


def _relu_mask_(grad: Tensor, output: Tensor) -> Tensor:
    """grad *= (output > 0), in place, one fused pass (ReLU's backward)."""
    return torch.ops.aten.threshold_backward.grad_input(grad, output, 0, grad_input=grad)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on `device` (nothing to switch on the meta device, which has no autocast)."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on `device` (one asynchronous copy; itself on the CPU)."""
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives matmuls on `device` right now, or None when autocast is off."""
    if device.type != "meta" and torch.amp.is_autocast_available(device.type) \
            and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


# ----------------------------------------------------------------------------- fused L1 gradient

def l1_fused_grads(params: Params, x: Tensor, l1: Tensor, ws: _Workspace, grads: Params
                   ) -> dict[str, Tensor]:
    """Write d loss_i / d params_i of every member into `grads` (in place); return per-member stats.

    loss_i = MSE_i + l1_i * L1_i (L1 weighted by decoder-row norms). Five batched matmuls per token
    chunk (2 forward, 3 backward; weight gradients accumulate over chunks of `ws.chunk` tokens), the
    centre's encoder-side gradient as a vector-matrix product; no host sync. Under autocast the matmuls and the [N, C, h]
    buffers use its dtype, as autograd under autocast would; gradients are accumulated in fp32, but
    the batch sums over [N, C, h] (bias gradient, L1 and L0 stats) come out in that dtype (bf16: ~3
    significant digits), like autocast's.
    """
    n, batch = params["decoder"].shape[0], x.shape[0]
    center, bias, dec = params["center"], params["encoder_bias"], params["decoder"]
    enc = params[_encoder_name(params)]
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
    code_sum, fired_count = x.new_empty(n, h), x.new_empty(n, h)                     # written by the first chunk
    norms = decoder_norms(params)                                                    # [N, h]
    l1_per_token = _per_member(l1 / batch, norms)                                    # [N, 1]
    l1_grad = (l1_per_token * norms).unsqueeze(1).to(cd)                             # d (l1 L1) / d codes: [N, 1, h]

    for start in range(0, batch, ws.chunk):
        xs = x[start:start + ws.chunk]
        m, first = xs.shape[0], start == 0
        if low:                                                                      # via the fp32 buffer
            xc = ws.xc[:, :m].copy_(torch.sub(xs.unsqueeze(0), center.unsqueeze(1), out=ws.small[:, :m]))
        else:
            xc = torch.sub(xs.unsqueeze(0), center.unsqueeze(1), out=ws.xc[:, :m])   # [N, m, d]
        codes = ws.big_a[:, :m]                                                      # [N, m, h]
        torch.baddbmm(bias_c.unsqueeze(1), xc, enc_c.transpose(1, 2), out=codes).relu_()
        err = ws.small[:, :m].copy_(center.unsqueeze(1).expand(n, m, d))
        if low:
            err.add_(torch.bmm(codes, dec_c, out=ws.buffer("x_hat", (n, ws.chunk, d), cd)[:, :m]))
        else:
            err.baddbmm_(codes, dec)
        err.sub_(xs)                                                                 # x_hat - x
        torch.sum(torch.mul(err, err, out=ws.buffer("sq", (n, ws.chunk, d), acc)[:, :m]), -1,
                  out=sq_err[:, start:start + m])
        g = err.mul_(2.0 / batch)                                                    # d MSE / d x_hat
        _sum_tokens_(grads["center"], g, first)
        g_c = ws.buffer("g", (n, ws.chunk, d), cd)[:, :m].copy_(g) if low else g

        _accumulate_bmm(grads["decoder"], codes.transpose(1, 2), g_c, first, ws)     # [N, h, d]
        _sum_tokens_(code_sum, codes, first, dtype=acc)
        gpre = ws.big_b[:, :m]
        torch.baddbmm(l1_grad, g_c, dec_c.transpose(1, 2), out=gpre)
        _relu_mask_(gpre, codes)                                                     # d loss / d pre
        _sum_tokens_(fired_count, codes.sign_(), first)
        _accumulate_bmm(grads["decoder" if tied else "encoder"], gpre.transpose(1, 2), xc, first and not tied, ws)
        _sum_tokens_(grads["encoder_bias"], gpre, first)
    grads["center"].sub_(torch.bmm(grads["encoder_bias"].unsqueeze(1), enc).squeeze(1))
    # the penalty's own decoder gradient: l1 / B * sum_b codes_bi * decoder_i / norms_i
    grads["decoder"].add_(dec * (l1_per_token * code_sum / norms.clamp_min(1e-12)).unsqueeze(-1))

    mse = sq_err.mean(-1)
    l1_term = (code_sum * norms).sum(-1) / batch
    return {"loss": mse + l1 * l1_term, "mse": mse, "l1": l1_term, "sq_err_sum": sq_err.sum(-1),
            "l0": fired_count.sum(-1) / batch, "fired": fired_count > 0}


def _project_rows_(decoder: Tensor, grad: Tensor, low_memory: bool) -> Tensor:
    """`project_decoder_grad_` ([N, h, d], in place); `low_memory`: the row dot products as a batched matmul, without
    its [N, h, d] temporary (the off-CPU path; the same values up to summation order)."""
    if not low_memory:
        return project_decoder_grad_(decoder, grad)
    dots = torch.matmul(grad.unsqueeze(-2), decoder.unsqueeze(-1)).squeeze(-1)         # [N, h, 1]
    return grad.addcmul_(dots, decoder, value=-1)


def _sum_tokens_(out: Tensor, t: Tensor, first: bool, dtype: torch.dtype | None = None) -> None:
    """out = (first chunk) or += (later chunks) the sum of `t: [N, m, ...]` over its token axis, in place."""
    if first and (dtype or t.dtype) == out.dtype:
        torch.sum(t, 1, dtype=dtype, out=out)
    elif first:
        out.copy_(t.sum(1, dtype=dtype))
    else:
        out.add_(t.sum(1, dtype=dtype))


def _accumulate_bmm(out: Tensor, a: Tensor, b: Tensor, overwrite: bool, ws: _Workspace) -> None:
    """out = a @ b (overwrite) or out += a @ b, batched, in place (via a compute-dtype buffer if needed)."""
    if a.dtype != out.dtype:
        tmp = torch.bmm(a, b, out=ws.buffer("weight_grad", out.shape, a.dtype))
        out.copy_(tmp) if overwrite else out.add_(tmp)
    elif overwrite:
        torch.bmm(a, b, out=out)
    else:
        out.baddbmm_(a, b)


# ----------------------------------------------------------------------------- fused TopK gradient

@dataclass
class _SparseCodes:
    """k active latents per token of every member, flattened for embedding_bag over [N*h, d] tables."""
    flat_idx: Tensor    # [N*B, k] member-offset latent ids
    offsets: Tensor     # [N*B] bag starts
    offset2bag: Tensor  # [N*B*k] token of each entry
    n_rows: int         # N*h
    _by_row: tuple[Tensor, Tensor, Tensor] | None = None   # CSR of the transpose: (crow, token, entry order)

    @staticmethod
    def build(idx: Tensor, d_hidden: int) -> "_SparseCodes":
        """From per-member indices `idx: [N, B, k]`."""
        n, batch, k = idx.shape
        member_offset = torch.arange(n, device=idx.device).mul_(d_hidden).view(n, 1, 1)
        flat = (idx + member_offset).view(n * batch, k)
        offsets = torch.arange(0, n * batch * k, k, device=idx.device)
        o2b = torch.arange(n * batch, device=idx.device).repeat_interleave(k)
        return _SparseCodes(flat, offsets, o2b, n * d_hidden)

    def gather_sum(self, table: Tensor, weights: Tensor) -> Tensor:
        """[N*B, d]: sum_j weights[t, j] * table[flat_idx[t, j]] (the sparse decode)."""
        return F.embedding_bag(self.flat_idx, table, per_sample_weights=weights.reshape(self.flat_idx.shape),
                               mode="sum")

    def weight_grad(self, grad_out: Tensor, table: Tensor) -> Tensor:
        """[N*B*k]: d/d weights of gather_sum given `grad_out: [N*B, d]` (row dot products)."""
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad_out, table, self.flat_idx.view(-1), self.offsets, self.offset2bag, 0, -1)

    def scatter_rows(self, rows: Tensor, weights: Tensor, out: Tensor, accumulate: bool = False) -> Tensor:
        """out[N*h, d] (+)= sum over entries e of weights[e] * rows[token(e)] into row flat_idx[e].

        A CSR (latent x token) matrix times `rows: [N*B, d]`, written into `out` (no allocation); the
        CSR pattern (one sort) is shared by every call on the same codes.
        """
        if self._by_row is None:
            flat = self.flat_idx.view(-1)
            small = flat.numel() < 2 ** 31 and self.n_rows < 2 ** 31
            keys = flat.int() if small else flat
            sorted_rows, order = torch.sort(keys, stable=True)
            starts = torch.arange(self.n_rows + 1, dtype=keys.dtype, device=flat.device)
            crow = torch.searchsorted(sorted_rows, starts, out_int32=small)            # no host sync
            token = order.div(self.flat_idx.shape[1], rounding_mode="floor").to(keys.dtype)
            self._by_row = (crow, token, order)
        crow, token, order = self._by_row
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            matrix = torch.sparse_csr_tensor(crow, token, weights.reshape(-1)[order], (self.n_rows, rows.shape[0]),
                                             check_invariants=False)
        with _no_autocast(rows.device):                                                 # sparse kernels: fp32
            return torch.addmm(out, matrix, rows, beta=1 if accumulate else 0, out=out)


def topk_fused_grads(params: Params, x: Tensor, rank_mask: Tensor | None, k_max: int, dead: Tensor | None,
                     k_aux: int, aux_coef: float, ws: _Workspace, grads: Params,
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
    center, bias, enc, dec = params["center"], params["encoder_bias"], params["encoder"], params["decoder"]

    cd, acc = ws.compute, x.dtype
    low = cd != acc                                                                  # autocast: encoder matmul in cd
    xc = torch.sub(x.unsqueeze(0), center.unsqueeze(1), out=ws.buffer("xc", (n, batch, d), acc))
    pre = ws.buffer("pre", (n, batch, h), cd)
    pre.copy_(bias.unsqueeze(1).expand_as(pre))
    enc_c = ws.buffer("enc", tuple(enc.shape), cd).copy_(enc) if low else enc
    pre.baddbmm_(ws.xc.copy_(xc) if low else xc, enc_c.transpose(1, 2))
    norms = decoder_norms(params)                                                    # [N, h]
    pre.mul_(norms.unsqueeze(1).to(cd))                                              # ranking scores
    scores, idx = pre.topk(k_max, dim=-1, sorted=rank_mask is not None)              # [N, B, k]
    picked_norms = norms.gather(1, idx.view(n, -1)).view_as(scores)
    vals = scores.to(acc).relu_().div_(picked_norms.clamp_min(1e-12))
    if rank_mask is not None:
        vals.mul_(rank_mask.unsqueeze(1))
    sp = _SparseCodes.build(idx, h)
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
        _accumulate_bmm(grads["decoder"], codes.transpose(1, 2), g_c, True, ws)
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
        aux = _aux_k_grads(pre, norms, dead, k_aux, aux_coef, resid, xc, params, grads)
    grads["center"].sub_(torch.bmm(gbias.unsqueeze(1), enc).squeeze(1))

    active = (vals > 0).to(x.dtype)                                                 # [N, B, k]
    fired_count = torch.zeros(n * h, device=x.device, dtype=x.dtype)
    fired_count.index_add_(0, sp.flat_idx.view(-1), active.view(-1))
    return {"loss": mse + aux_coef * aux, "mse": mse, "aux": aux, "l1": (vals * picked_norms).sum((1, 2)) / batch,
            "sq_err_sum": sq_err.sum(-1), "l0": active.sum((1, 2)) / batch,
            "fired": fired_count.view(n, h) > 0}


def _aux_k_grads(scores: Tensor, norms: Tensor, dead: Tensor, k_aux: int, aux_coef: float, resid: Tensor,
                 xc: Tensor, params: Params, grads: Params) -> Tensor:
    """Add aux_coef * d aux / d params to `grads`; return aux: [N].

    `scores: [N, B, h]` = pre * norms (overwritten), `norms: [N, h]`, `resid: [N, B, d]` = x - x_hat (no
    gradient through it), `dead: [N, h]`.
    """
    n, batch, h = scores.shape
    d = xc.shape[-1]
    masked = scores.masked_fill_(~dead.unsqueeze(1), -math.inf)                      # not needed after
    vals, idx = masked.topk(min(k_aux, h), dim=-1, sorted=False)
    vals = vals.to(xc.dtype).relu_().div_(norms.gather(1, idx.view(n, -1)).view_as(vals).clamp_min(1e-12))
    sp = _SparseCodes.build(idx, h)
    dec_flat = params["decoder"].view(n * h, d)
    e_hat = sp.gather_sum(dec_flat, vals.view(n * batch, -1)).view(n, batch, d)
    diff = e_hat.sub_(resid)                                                         # e_hat - e
    any_dead = dead.any(-1).to(xc.dtype)                                             # [N]
    aux = diff.square().sum(-1).mean(-1) * any_dead
    g = diff.mul_(_per_member(any_dead * (2.0 * aux_coef / batch), diff))             # d (c*aux) / d e_hat
    sp.scatter_rows(g.view(n * batch, d), vals, grads["decoder"].view(n * h, d), accumulate=True)
    gvals = sp.weight_grad(g.view(n * batch, d), dec_flat).view(n, batch, -1).masked_fill_(vals <= 0, 0)
    sp.scatter_rows(xc.view(n * batch, d), gvals, grads["encoder"].view(n * h, d), accumulate=True)
    ones = xc.new_ones(n * batch, 1)                                                 # [N*B, 1]
    sp.scatter_rows(ones, gvals, grads["encoder_bias"].view(n * h, 1), accumulate=True)
    return aux


# ----------------------------------------------------------------------------- the ensemble

class Ensemble:
    """n_models dictionaries of one architecture and shape, trained together on the same batches.

    hparams: {"lr": [N], "l1": [N]} for L1 dictionaries, {"lr": [N], "k": [N] (optional, must match
    the members)} for TopK, as tensors or lists (stored as float64, k as int64);
    `step(x, lr_scale=, l1_scale=)` multiplies them by schedule factors.
    Options: Adam betas/eps (torch.optim.Adam semantics, no weight decay); `dead_window`: a latent is
    dead once it has not fired for this many tokens; `k_aux` (default d_in // 2) and `aux_coef` (1/32)
    of the TopK aux-K loss; `backend`; `topk_decoder` ("sparse": decode only the k active rows);
    `chunk_tokens`: the fused L1 step processes the batch in chunks of this many tokens (weight
    gradients accumulate), bounding its [N, chunk, d_hidden] buffers; `unit_decoder`: keep decoder rows
    at unit norm (Bricken et al. 2023; always so for tied members) instead of leaving them free (the
    default, see training.dictionary); `grad_clip`: scale each member's gradient to global norm at most this
    before Adam (torch.nn.utils.clip_grad_norm_ per member; 0: off). The attribute `whole_stack_update` (default:
    True off the CPU) updates every member at once, in a number of kernels that does not grow with n_models.
    """

    def __init__(self, members: list[Dictionary], hparams: dict[str, Tensor | list[float]], *,
                 adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 dead_window: int = 10_000_000, k_aux: int | None = None, aux_coef: float = 1 / 32,
                 backend: Backend = "fused", topk_decoder: TopKDecoder = "sparse",
                 chunk_tokens: int = 1 << 30, unit_decoder: bool = False, grad_clip: float = 0.0):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        first = members[0]
        for m in members:
            if type(m) is not type(first) or m.decoder.shape != first.decoder.shape or m.tied != first.tied:
                raise ValueError("ensemble members must share architecture, shapes and tying")
        stacked, _ = torch.func.stack_module_state(members)
        params = {n: t.detach().clone().contiguous() for n, t in stacked.items()}
        del stacked
        self._init_from(params, hparams, first.architecture, [m.k for m in members] if first.architecture == "topk"
                        else None, adam_betas=adam_betas, adam_eps=adam_eps, dead_window=dead_window, k_aux=k_aux,
                        aux_coef=aux_coef, backend=backend, topk_decoder=topk_decoder, chunk_tokens=chunk_tokens,
                        unit_decoder=unit_decoder, grad_clip=grad_clip)

    def _init_from(self, params: Params, hparams: dict[str, Tensor | list[float]], architecture: Architecture,
                   ks: list[int] | None, *, adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                   dead_window: int = 10_000_000, k_aux: int | None = None, aux_coef: float = 1 / 32,
                   backend: Backend = "fused", topk_decoder: TopKDecoder = "sparse", chunk_tokens: int = 1 << 30,
                   unit_decoder: bool = False, grad_clip: float = 0.0, moments: tuple[Params, Params] | None = None
                   ) -> None:
        """Set every field around stacked `params` {name: [N, ...]} (adopted, not copied) and Adam `moments`
        (exp_avg, exp_avg_sq; default zeros); `ks`: each TopK member's k."""
        if backend not in ("fused", "autograd") or topk_decoder not in ("sparse", "dense"):
            raise ValueError(f"unknown backend {backend!r} or topk_decoder {topk_decoder!r}")
        self.architecture: Architecture = architecture
        self.n_models, self.d_hidden, self.d_in = params["decoder"].shape
        self.tied = "encoder" not in params
        self.adam_betas, self.adam_eps = (float(adam_betas[0]), float(adam_betas[1])), float(adam_eps)
        self.dead_window, self.aux_coef = int(dead_window), float(aux_coef)
        self.k_aux = min(self.d_hidden, self.d_in // 2 if k_aux is None else int(k_aux))
        self.backend, self.topk_decoder, self.chunk_tokens = backend, topk_decoder, int(chunk_tokens)
        self.unit_decoder = bool(unit_decoder) or self.tied
        self.grad_clip = float(grad_clip)

        self.params: Params = params
        like = self.params["decoder"]
        self.hparams: dict[str, Tensor] = self._checked_hparams(hparams, ks)
        self.exp_avg, self.exp_avg_sq = moments if moments is not None else (
            {n: torch.zeros_like(p) for n, p in self.params.items()},
            {n: torch.zeros_like(p) for n, p in self.params.items()})
        self.adam_step = torch.zeros(self.n_models, dtype=torch.float64, device=like.device)
        self.frozen = torch.zeros(self.n_models, dtype=torch.bool, device=like.device)
        self.tokens_since_fired = torch.zeros(self.n_models, self.d_hidden, dtype=torch.long, device=like.device)
        self._grads: Params = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self._scratch: Params = {n: torch.empty_like(p) for n, p in self.params.items()}
        self._ws: _Workspace | None = None
        self._aux_on = False   # host-side: does any member have dead latents (refreshed by resample_dead; saved)
        self.whole_stack_update = like.device.type != "cpu"   # see _update_
        self._host_hparams = {n: (v if isinstance(v, Tensor) else torch.tensor(v, dtype=torch.float64))
                              .to("cpu", torch.float64, copy=True) for n, v in hparams.items() if n in ("lr", "l1")}
        self._host_step = torch.zeros(self.n_models, dtype=torch.float64)

    # ------------------------------------------------------------------ construction helpers

    def _checked_hparams(self, hparams: dict[str, Tensor | list[float]], ks: list[int] | None
                         ) -> dict[str, Tensor]:
        """Validate and store hparams: lr/l1 as float64 [N], k as int64 [N]."""
        dev = self.params["decoder"].device
        want = {"lr", "l1"} if self.architecture == "l1" else {"lr", "k"}
        given = set(hparams)
        if self.architecture == "topk":
            given |= {"k"}
        if given != want:
            raise ValueError(f"{self.architecture} ensemble hparams must be {sorted(want)}, got {sorted(hparams)}")
        out: dict[str, Tensor] = {}
        for name, value in hparams.items():
            t = value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float64)
            t = t.to(dev)
            if t.shape != (self.n_models,):
                raise ValueError(f"hparam {name!r} must have shape [{self.n_models}], got {tuple(t.shape)}")
            out[name] = t.to(torch.long if name == "k" else torch.float64).clone()
        if self.architecture == "topk":
            assert ks is not None, "TopK members need k"
            k_list = [int(k) for k in ks]
            ks = torch.tensor(k_list, device=dev)
            if "k" in out and not torch.equal(out["k"], ks):
                raise ValueError(f"hparams['k'] {out['k'].tolist()} != members' k {k_list}")
            out["k"] = ks
            self.k_max, self._uniform_k = max(k_list), len(set(k_list)) == 1
            self.rank_mask = _rank_mask(k_list, self.params["decoder"].dtype).to(dev)   # [N, k_max]
        return out

    # ------------------------------------------------------------------ training

    def step(self, x: Tensor, *, lr_scale: float = 1.0, l1_scale: float = 1.0) -> dict[str, Tensor]:
        """One Adam step of every member on `x: [batch, d_in]`; per-member stats, no host sync.

        Returns {"loss", "mse", "l1", "l0", "explained_variance", ("aux" for TopK): [N],
        "fired": BoolTensor[N, d_hidden] (fired in this batch), "n_dead": [N], "frozen": BoolTensor[N]}.
        A member whose loss is NaN/inf is frozen from this step on.
        """
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected x: [batch, {self.d_in}], got {tuple(x.shape)}")
        x = x.to(self.params["decoder"].dtype)
        with torch.no_grad():
            stats = self._gradients(x, l1_scale)
            loss = stats["loss"]
            self.frozen |= torch.ne(loss - loss, 0)          # not finite (inf - inf is NaN): 2 kernels, isfinite 4
            active = ~self.frozen
            self._update_(active, lr_scale)
            self._track_dead(stats["fired"], active, x.shape[0])
            variance = (x - x.mean(0)).square().sum()
            stats["explained_variance"] = 1 - stats.pop("sq_err_sum") / variance
            stats["n_dead"] = self.dead_mask().sum(-1)
            stats["frozen"] = self.frozen.clone()
        return stats

    def _gradients(self, x: Tensor, l1_scale: float) -> dict[str, Tensor]:
        """Fill self._grads with every member's gradient; return the stats of `step`."""
        dead = self.dead_mask() if (self.architecture == "topk" and self._aux_on and self.k_aux > 0) else None
        if self.backend == "autograd":
            return self._autograd_gradients(x, l1_scale, dead)
        ws = self._workspace(x)
        if self.architecture == "l1":
            l1 = _to_device((self._host_hparams["l1"] * l1_scale).to(x.dtype), x.device)   # computed on the host
            return l1_fused_grads(self.params, x, l1, ws, self._grads)
        rank_mask = None if self._uniform_k else self.rank_mask
        return topk_fused_grads(self.params, x, rank_mask, self.k_max, dead, self.k_aux, self.aux_coef,
                                ws, self._grads, self.topk_decoder)

    def _workspace(self, x: Tensor) -> _Workspace:
        """The step buffers for this batch size and compute dtype (reallocated when either changes)."""
        compute = autocast_dtype(x.device) or x.dtype
        if self._ws is None or self._ws.batch != x.shape[0] or self._ws.compute != compute:
            self._ws = None
            dense = self.architecture == "l1" or self.topk_decoder == "dense"
            chunk = self.chunk_tokens if self.architecture == "l1" else x.shape[0]
            self._ws = _workspace(self.n_models, x.shape[0], chunk, self.d_in, self.d_hidden, dense,
                                  self.params["decoder"], compute)
        return self._ws

    def _autograd_gradients(self, x: Tensor, l1_scale: float, dead: Tensor | None) -> dict[str, Tensor]:
        """vmap(grad(loss)) over the stacked params: the reference the fused kernels are tested against."""
        def stats_of(parts: dict[str, Tensor], p: Params) -> dict[str, Tensor]:
            codes = parts["codes"]
            return {"mse": parts["mse"], "l1": l1_penalty(codes, decoder_norms(p)),
                    "l0": (codes > 0).sum(-1).to(codes.dtype).mean(), "fired": (codes > 0).any(0),
                    "sq_err_sum": (parts["x_hat"] - x).square().sum(), "aux": parts.get("aux", parts["mse"])}

        if self.architecture == "l1":
            def loss_fn(p: Params, l1: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
                total, parts = l1_loss(p, x, l1)
                return total, {**stats_of(parts, p), "loss": total}
            args: tuple = ((self.hparams["l1"] * l1_scale).to(x.dtype),)
        else:
            k_max, k_aux, coef = self.k_max, self.k_aux, self.aux_coef

            def loss_fn(p: Params, rank_mask: Tensor, dead_i: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
                total, parts = topk_loss(p, x, k_max, rank_mask=rank_mask, dead=dead_i, k_aux=k_aux, aux_coef=coef)
                return total, {**stats_of(parts, p), "loss": total}
            args = (self.rank_mask, dead)
        in_dims = (0,) + tuple(None if a is None else 0 for a in args)
        grads, stats = torch.func.vmap(torch.func.grad(loss_fn, has_aux=True), in_dims=in_dims)(self.params, *args)
        for name, g in grads.items():
            self._grads[name].copy_(g)
        if self.architecture == "l1":
            stats.pop("aux")
        return stats

    def _update_(self, active: Tensor, lr_scale: float) -> None:
        """Gradient clipping, then Adam (with `unit_decoder`: decoder-gradient projection, Adam, decoder
        renormalisation) in place, frozen members untouched. Off the CPU every member at once on the whole stacked
        tensors (foreach ops, no [N, h, d] temporary: a constant number of kernels per step); on the CPU one
        parameter at a time and, with `unit_decoder`, groups of members of about 4 MiB per tensor (cache)."""
        coefs = self._adam_coefficients(active, lr_scale)
        if self.grad_clip > 0:
            self._clip_grads_()
        adam_ = self._adam_stacked_ if self.whole_stack_update else self._adam_members_
        for members in self._member_groups():
            dec, g_dec = self.params["decoder"][members], self._grads["decoder"][members]
            if self.unit_decoder:
                _project_rows_(dec, g_dec, low_memory=self.whole_stack_update)
            adam_(members, coefs)
            if self.unit_decoder:
                dec.div_(dec.norm(dim=-1, keepdim=True).masked_fill_(_per_member(coefs["frozen"][members], dec), 1))

    def _member_groups(self) -> list[slice]:
        """Members updated together: all of them, except on the CPU with `unit_decoder`: groups of about 4 MiB per
        tensor, which stay in cache from the projection through Adam to the renormalisation."""
        if self.whole_stack_update or not self.unit_decoder:
            return [slice(None)]
        dec = self.params["decoder"]
        per_group = max(1, (4 << 20) // (dec[0].numel() * dec.element_size()))
        return [slice(start, start + per_group) for start in range(0, self.n_models, per_group)]

    def _clip_grads_(self) -> None:
        """Scale each member's gradients by min(1, grad_clip / (norm + 1e-6)), norm over all its parameters."""
        grads = list(self._grads.values())
        blocks = [g[i] for g in grads for i in range(self.n_models)]                     # one per parameter and member
        sq = torch.stack(torch._foreach_norm(blocks)).view(len(grads), self.n_models).square().sum(0)   # [N]
        scale = (self.grad_clip / (sq.sqrt() + 1e-6)).clamp_max(1)
        torch._foreach_mul_(grads, [_per_member(scale, g) for g in grads])

    def _adam_(self, active: Tensor, lr_scale: float) -> None:
        """One in-place Adam step of every member with the gradients in self._grads (no constraint)."""
        adam_ = self._adam_stacked_ if self.whole_stack_update else self._adam_members_
        adam_(slice(None), self._adam_coefficients(active, lr_scale))

    def _adam_coefficients(self, active: Tensor, lr_scale: float) -> dict[str, Tensor]:
        """Advance the step counts of active members; their per-member Adam factors ([N], params dtype).

        The factors of every member as if active are computed on the host in float64 from host copies of the
        learning rates and step counts (made at construction and loading; the counts of active members advance
        together) and sent in one copy; one `where` on the device gives frozen members factors that leave them as
        they are (their host count runs on, unused).
        """
        beta1, beta2 = self.adam_betas
        self.adam_step += active
        self._host_step += 1
        step = self._host_step.clamp_min(1)
        zero, one = torch.zeros_like(step), torch.ones_like(step)                          # float64 [N], host
        bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
        on = torch.stack([one * (1 - beta1), one * beta2, bias_correction2_sqrt,
                          -(self._host_hparams["lr"] * lr_scale) / (1 - beta1 ** step)])
        off = torch.stack([zero, one, bias_correction2_sqrt, zero])                        # 0: m unchanged, 1: v unchanged
        both = _to_device(torch.stack([on, off]).to(self.params["decoder"].dtype), active.device)   # [2, 4, N]
        weight1, beta2_, bc2, neg_step = torch.where(active, both[0], both[1]).unbind()    # [N] each
        return {"frozen": ~active, "weight1": weight1, "beta2": beta2_, "bias_correction2_sqrt": bc2,
                "neg_step_size": neg_step}

    def _adam_members_(self, members: slice, c: dict[str, Tensor]) -> None:
        """Adam on the given members: torch.optim.Adam's single-tensor arithmetic, vectorised over
        members with per-member factors, in place (frozen members: zero gradient, zero step), one parameter at a
        time (the CPU path: each stays in cache)."""
        beta2 = self.adam_betas[1]
        for name, p_all in self.params.items():
            p, g = p_all[members], self._grads[name][members]
            m, v, tmp = self.exp_avg[name][members], self.exp_avg_sq[name][members], self._scratch[name][members]
            g.masked_fill_(_per_member(c["frozen"][members], g), 0)
            m.lerp_(g, _per_member(c["weight1"][members], m))
            v.mul_(_per_member(c["beta2"][members], v)).addcmul_(g, g, value=1 - beta2)
            denom = torch.sqrt(v, out=g).div_(_per_member(c["bias_correction2_sqrt"][members], v)).add_(self.adam_eps)
            p.add_(torch.mul(m, _per_member(c["neg_step_size"][members], m), out=tmp).div_(denom))

    def _adam_stacked_(self, members: slice, c: dict[str, Tensor]) -> None:
        """`_adam_members_`'s arithmetic (the same bits) on every parameter at once with foreach ops, the denominator
        in the gradient's memory and the step in the scratch buffers (no allocation): the off-CPU path."""
        names = list(self.params)
        ps, gs = [self.params[n][members] for n in names], [self._grads[n][members] for n in names]
        ms, vs = [self.exp_avg[n][members] for n in names], [self.exp_avg_sq[n][members] for n in names]
        tmps = [self._scratch[n][members] for n in names]

        def factor(key: str) -> list[Tensor]:
            return [_per_member(c[key][members], t) for t in ps]
        for g in gs:
            g.masked_fill_(_per_member(c["frozen"][members], g), 0)
        torch._foreach_lerp_(ms, gs, factor("weight1"))
        torch._foreach_mul_(vs, factor("beta2"))
        torch._foreach_addcmul_(vs, gs, gs, value=1 - self.adam_betas[1])
        torch._foreach_copy_(gs, vs)
        torch._foreach_sqrt_(gs)
        torch._foreach_div_(gs, factor("bias_correction2_sqrt"))
        torch._foreach_add_(gs, self.adam_eps)                                             # denom
        torch._foreach_copy_(tmps, ms)
        torch._foreach_mul_(tmps, factor("neg_step_size"))
        torch._foreach_div_(tmps, gs)
        torch._foreach_add_(ps, tmps)

    def _track_dead(self, fired: Tensor, active: Tensor, n_tokens: int) -> None:
        """Advance tokens-since-fired by the batch, reset it where a latent fired (active members only)."""
        since = self.tokens_since_fired
        since.add_(active.unsqueeze(1), alpha=n_tokens)
        since.masked_fill_(fired & active.unsqueeze(1), 0)

    def dead_mask(self) -> Tensor:
        """BoolTensor[N, d_hidden]: latents that have not fired for `dead_window` tokens."""
        return self.tokens_since_fired >= self.dead_window

    # ------------------------------------------------------------------ dead-latent revival

    @torch.no_grad()
    def resample_dead(self, x: Tensor, *, seed: int = 0, step: int = 0,
                      member_ids: Sequence[int] | None = None) -> Tensor:
        """Revive dead latents; returns how many each member has ([N]). Call every few thousand steps.

        L1: Anthropic's resampling ("Towards Monosemanticity"): each dead latent gets a decoder row
        = a centred input x - center, at the mean norm of the live decoder rows (1 with `unit_decoder`),
        drawn with probability proportional to the square of that input's squared reconstruction error; its encoder
        row = the same direction scaled to 0.2 x the mean norm of the live encoder rows; its bias = 0; its
        Adam moments = 0. `x` should be many tokens ([n, d_in], tens of thousands or more). The draws of member i
        come from `member_generator(seed, step, member_ids[i])` on the CPU (global member indices, default
        0..N-1), so they depend on no device and no stored generator state. Frees the step workspace (the
        error pass reuses its memory); two host syncs.
        TopK: latents are revived by the aux-K loss instead; this only refreshes whether any member has dead
        latents (the aux-K term is computed only while some have).
        """
        dead = self.dead_mask() & ~self.frozen.unsqueeze(1)                            # [N, h]
        n_dead = dead.sum(-1)
        if self.architecture == "topk":
            self._aux_on = bool(n_dead.any())
            return n_dead
        dead_host = dead.cpu()                                                         # [N, h], one sync
        counts = dead_host.sum(-1).tolist()
        if not any(counts):
            return n_dead
        ids = list(range(self.n_models)) if member_ids is None else [int(i) for i in member_ids]
        if len(ids) != self.n_models:
            raise ValueError(f"member_ids has {len(ids)} entries for {self.n_models} members")
        self.release_workspace()
        weights = self.per_token_sq_err(x).square_().nan_to_num_(0, 0, 0)              # [N, n]
        weights += weights.amax(-1, keepdim=True).clamp_min(1e-30) * 1e-12           # no all-zero rows
        weights_host = weights.cpu().double()                                          # [N, n], one sync
        del weights
        enc_norm = _mean_live_norm(self.params["encoder"], dead, 1.0) if "encoder" in self.params else None
        dec_norm = None if self.unit_decoder else _mean_live_norm(self.params["decoder"], dead, INIT_NORM)
        for i, count in enumerate(counts):
            if count == 0:
                continue
            picks = torch.multinomial(weights_host[i], count, replacement=True,
                                      generator=member_generator(seed, step, ids[i]))     # [count], CPU
            latents = dead_host[i].nonzero().squeeze(1).to(x.device)                      # [count]
            centred = x[picks.to(x.device)] - self.params["center"][i]                    # [count, d_in]
            directions = centred.div_(centred.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            self._revive_(i, latents, directions, enc_norm, dec_norm)
        self.tokens_since_fired.masked_fill_(dead, 0)
        return n_dead

    def _revive_(self, i: int, latents: Tensor, directions: Tensor, enc_norm: Tensor | None,
                 dec_norm: Tensor | None) -> None:
        """Set member i's `latents: [m]` to unit `directions: [m, d_in]` (see resample_dead), in place."""
        if enc_norm is not None:
            self.params["encoder"][i, latents] = directions * (0.2 * enc_norm[i])
        dec = self.params["decoder"]
        dec[i, latents] = directions if dec_norm is None else directions * dec_norm[i]
        self.params["encoder_bias"][i, latents] = 0
        for state in (self.exp_avg, self.exp_avg_sq):
            for name in ("encoder", "decoder", "encoder_bias"):
                if name in state:
                    state[name][i, latents] = 0

    def release_workspace(self) -> None:
        """Free the fused step's per-batch buffers (the next step reallocates them): call before evaluation."""
        self._ws = None

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """codes: [N, batch, d_hidden] of every member (one [N, batch, d_hidden] buffer for L1, two for TopK)."""
        xc = x.to(self.params["center"].dtype).unsqueeze(0) - self.params["center"].unsqueeze(1)   # [N, b, d]
        enc = encoder_weight(self.params)
        pre = torch.baddbmm(self.params["encoder_bias"].unsqueeze(1), xc, enc.transpose(1, 2))  # [N, b, h]
        del xc
        if self.architecture == "l1":
            return pre.relu_()
        scores = pre * decoder_norms(self.params).unsqueeze(1)                          # [N, b, h]
        idx = scores.topk(self.k_max, dim=-1).indices                                  # [N, b, k_max]
        vals = pre.gather(-1, idx).relu_().mul_(self.rank_mask.unsqueeze(1))
        del pre
        return scores.zero_().scatter_(-1, idx, vals)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """x_hat: [N, batch, d_in] = codes @ decoder + center of every member, from `codes: [N, batch, d_hidden]`."""
        return torch.baddbmm(self.params["center"].unsqueeze(1), codes, self.params["decoder"])

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """x_hat: [N, batch, d_in] of every member."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def per_token_sq_err(self, x: Tensor, chunk: int = 4096) -> Tensor:
        """[N, n]: ||x - x_hat||^2 of every member on every row of `x: [n, d_in]` (chunked)."""
        return torch.cat([(self.predict(c) - c).square_().sum(-1) for c in x.split(chunk)], dim=1)

    @torch.no_grad()
    def init_center(self, acts: Tensor, method: Literal["mean", "geometric_median"] = "mean") -> None:
        """Set every member's center to the mean or geometric median of `acts: [n, d_in]`."""
        self.params["center"].copy_(init_center_value(acts.to(self.params["center"]), method))

    def unstack(self) -> list[Dictionary]:
        """Ordinary SparseLinearAutoencoder / TopKAutoencoder modules holding copies of each member."""
        return unstack_dictionaries(self.params, self.architecture, self.hparams.get("k"))

    # ------------------------------------------------------------------ checkpoints

    def _state_refs(self) -> dict[str, Tensor]:
        """The tensors `state_dict` copies, uncopied (options as small new CPU tensors)."""
        out: dict[str, Tensor] = {}
        for prefix, group in (("param.", self.params), ("adam.exp_avg.", self.exp_avg),
                              ("adam.exp_avg_sq.", self.exp_avg_sq), ("hparam.", self.hparams)):
            out.update({prefix + n: t for n, t in group.items()})
        out["adam.step"] = self.adam_step
        out["dead.tokens_since_fired"] = self.tokens_since_fired
        out["frozen"] = self.frozen
        out["dead.aux_on"] = torch.tensor(self._aux_on)
        out["option.adam_betas"] = torch.tensor(self.adam_betas, dtype=torch.float64)
        out["option.adam_eps"] = torch.tensor(self.adam_eps, dtype=torch.float64)
        out["option.dead_window"] = torch.tensor(self.dead_window, dtype=torch.long)
        out["option.k_aux"] = torch.tensor(self.k_aux, dtype=torch.long)
        out["option.aux_coef"] = torch.tensor(self.aux_coef, dtype=torch.float64)
        out["option.unit_decoder"] = torch.tensor(self.unit_decoder)
        out["option.grad_clip"] = torch.tensor(self.grad_clip, dtype=torch.float64)
        return out

    def state_dict(self, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Flat {name: tensor} (copies; safetensors-ready): params, Adam state, hparams, dead counters,
        frozen flags and options. `Ensemble.from_state_dict` rebuilds the ensemble from it alone.

        `device` (e.g. "cpu" to save): each tensor is copied straight there, one at a time, so the ensemble's
        device needs no extra memory; None: clones where the tensors are.
        """
        refs = self._state_refs()
        if device is None:
            return {n: t.detach().clone().contiguous() for n, t in refs.items()}
        return {n: t.detach().to(device, copy=True).contiguous() for n, t in refs.items()}

    def _check_state(self, shapes: dict[str, torch.Size]) -> None:
        """ValueError unless `shapes` {name: shape} are this ensemble's state_dict names and shapes (no copies)."""
        mine = self._state_refs()
        if set(shapes) != set(mine):
            raise ValueError(f"state_dict keys differ: missing {sorted(set(mine) - set(shapes))}, "
                             f"unexpected {sorted(set(shapes) - set(mine))}")
        for name, shape in shapes.items():
            if shape != mine[name].shape:
                raise ValueError(f"{name}: shape {tuple(shape)} != {tuple(mine[name].shape)}")

    def _load_options(self, state: dict[str, Tensor]) -> None:
        """The host-side options, aux-K switch and step counts of a state_dict."""
        self.adam_betas = tuple(state["option.adam_betas"].tolist())  # type: ignore[assignment]
        self.adam_eps = float(state["option.adam_eps"])
        self.dead_window = int(state["option.dead_window"])
        self.k_aux = int(state["option.k_aux"])
        self.aux_coef = float(state["option.aux_coef"])
        self.unit_decoder = bool(state["option.unit_decoder"])
        self.grad_clip = float(state["option.grad_clip"])
        self._aux_on = bool(state["dead.aux_on"])
        self._host_step = state["adam.step"].to("cpu", torch.float64, copy=True)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Overwrite this ensemble's state with `state` (from `state_dict` of an ensemble of the same shape)."""
        state = _with_aux_flag(state)
        self._check_state({n: t.shape for n, t in state.items()})
        for prefix, group in (("param.", self.params), ("adam.exp_avg.", self.exp_avg),
                              ("adam.exp_avg_sq.", self.exp_avg_sq), ("hparam.", self.hparams)):
            for n, t in group.items():
                t.copy_(state[prefix + n])
        self.adam_step.copy_(state["adam.step"])
        self.tokens_since_fired.copy_(state["dead.tokens_since_fired"])
        self.frozen.copy_(state["frozen"])
        self._load_options(state)
        self._host_hparams = {n: state[f"hparam.{n}"].to("cpu", torch.float64, copy=True) for n in self._host_hparams}

    @classmethod
    @torch.no_grad()
    def from_state_dict(cls, state: dict[str, Tensor], *, backend: Backend = "fused",
                        topk_decoder: TopKDecoder = "sparse", device: torch.device | str | None = None) -> "Ensemble":
        """Rebuild an ensemble (architecture, tying, shapes, options) from `state_dict()` output, on `device`
        (default: where the state's tensors are).

        No random initialisation and no second copy: each state tensor is copied to `device` once and adopted
        (the entries of a copy of `state` are consumed, so the caller's dropping `state` frees each host tensor
        as soon as it is on the device); only the gradient and scratch buffers are new.
        """
        state = _with_aux_flag(dict(state))
        shapes = {n: t.shape for n, t in state.items()}
        device = torch.device(device) if device is not None else state["param.decoder"].device

        def take(prefix: str) -> dict[str, Tensor]:
            """The `prefix` entries on `device`, params in the modules' order (sums over them follow it)."""
            names = sorted((n for n in state if n.startswith(prefix)), key=lambda n: _ORDER.get(n[len(prefix):], 9))
            return {n[len(prefix):]: torch.empty_like(state[n], device=device).copy_(state.pop(n)) for n in names}
        if "param.decoder" not in state or "hparam.lr" not in state:
            raise ValueError("not an Ensemble state_dict: no param.decoder or hparam.lr")
        architecture: Architecture = "topk" if "hparam.k" in state else "l1"
        ks = state["hparam.k"].tolist() if architecture == "topk" else None
        params, hparams = take("param."), take("hparam.")
        hparams.pop("k", None)                                    # the members' k (ks) is the k
        moments = take("adam.exp_avg."), take("adam.exp_avg_sq.")
        ens = cls.__new__(cls)
        ens._init_from(params, hparams, architecture, ks, backend=backend, topk_decoder=topk_decoder,
                       moments=moments)
        ens._check_state(shapes)
        ens._load_options(state)
        ens.adam_step.copy_(state["adam.step"])
        ens.tokens_since_fired.copy_(state["dead.tokens_since_fired"])
        ens.frozen.copy_(state["frozen"])
        return ens


def _with_aux_flag(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state`, with the aux-K switch derived from its dead counters if it predates the switch being saved."""
    if "dead.aux_on" in state or not {"dead.tokens_since_fired", "option.dead_window"} <= set(state):
        return state
    return {**state, "dead.aux_on": (state["dead.tokens_since_fired"] >= state["option.dead_window"]).any()}


def make_members(architecture: Architecture, n_models: int, d_in: int, d_hidden: int, *,
                 k: list[int] | None = None, tied: bool = False, seed: int = 0, init_norm: float = INIT_NORM,
                 device=None, dtype=None) -> list[Dictionary]:
    """n_models freshly initialised dictionaries (decoder rows of norm `init_norm`, 1 when tied); member i is
    drawn after torch.manual_seed(seed + i)."""
    members: list[Dictionary] = []
    for i in range(n_models):
        torch.manual_seed(seed + i)
        if architecture == "l1":
            members.append(SparseLinearAutoencoder(d_in, d_hidden, tied, init_norm=init_norm, device=device,
                                                   dtype=dtype))
        else:
            assert k is not None, "TopK members need k"
            members.append(TopKAutoencoder(d_in, d_hidden, k[i], init_norm=init_norm, device=device, dtype=dtype))
    return members
