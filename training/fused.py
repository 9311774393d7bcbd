"""Shared pieces of the fused (hand-written) gradient kernels: the per-step workspace and in-place batched helpers.

Each architecture's fused gradient (training/architectures/<name>.py) writes every member's gradient into
preallocated buffers with these; shapes as in training/ensemble.py (`[N, ...]` stacked over members).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from training.dictionary import Params


def per_member(values: Tensor, like: Tensor) -> Tensor:
    """View `values: [N]` as [N, 1, ...] to broadcast against `like: [N, ...]`."""
    return values.view(values.shape[0], *([1] * (like.dim() - 1)))



def encoder_name(params: Params) -> str:
    """Name of the stacked encoder matrix ("decoder" when tied)."""
    return "encoder" if "encoder" in params else "decoder"


@dataclass
class Workspace:
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


def make_workspace(n_models: int, batch: int, chunk: int, d_in: int, d_hidden: int, dense: bool, like: Tensor,
               compute: torch.dtype) -> Workspace:
    """Allocate the buffers of `Workspace` (the [N, C, d_hidden] ones only when `dense`)."""
    chunk = min(chunk, batch)
    big = (n_models, chunk, d_hidden) if dense else (0,)
    return Workspace(batch, chunk, compute, like.new_empty(n_models, chunk, d_in, dtype=compute),
                      like.new_empty(n_models, chunk, d_in), like.new_empty(big, dtype=compute),
                      like.new_empty(big, dtype=compute))


def relu_mask_(grad: Tensor, output: Tensor) -> Tensor:
    """grad *= (output > 0), in place, one fused pass (ReLU's backward)."""
    return torch.ops.aten.threshold_backward.grad_input(grad, output, 0, grad_input=grad)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on `device` (nothing to switch on the meta device, which has no autocast)."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on `device` (one asynchronous copy; itself on the CPU)."""
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives matmuls on `device` right now, or None when autocast is off."""
    if device.type != "meta" and torch.amp.is_autocast_available(device.type) \
            and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def sum_tokens_(out: Tensor, t: Tensor, first: bool, dtype: torch.dtype | None = None) -> None:
    """out = (first chunk) or += (later chunks) the sum of `t: [N, m, ...]` over its token axis, in place."""
    if first and (dtype or t.dtype) == out.dtype:
        torch.sum(t, 1, dtype=dtype, out=out)
    elif first:
        out.copy_(t.sum(1, dtype=dtype))
    else:
        out.add_(t.sum(1, dtype=dtype))


def centred(ws: Workspace, xs: Tensor, center: Tensor, low: bool) -> Tensor:
    """x - center for a chunk `xs: [m, d]` of every member, [N, m, d], in the workspace (computed in the
    accumulation dtype, then copied to the compute dtype when `low`, i.e. under autocast)."""
    m = xs.shape[0]
    if low:
        return ws.xc[:, :m].copy_(torch.sub(xs.unsqueeze(0), center.unsqueeze(1), out=ws.small[:, :m]))
    return torch.sub(xs.unsqueeze(0), center.unsqueeze(1), out=ws.xc[:, :m])


def reconstruction_grad(ws: Workspace, codes: Tensor, dec: Tensor, dec_c: Tensor, center: Tensor, xs: Tensor,
                        sq_err: Tensor, batch: int, low: bool) -> tuple[Tensor, Tensor]:
    """(g, g_c): d MSE / d x_hat = 2 (x_hat - x) / batch for `codes: [N, m, h]` decoded, [N, m, d] in the accumulation
    dtype and (when `low`) in the compute dtype; writes each token's squared error ||x_hat - x||^2 into
    `sq_err: [N, m]`."""
    n, m, d = codes.shape[0], xs.shape[0], xs.shape[1]
    cd, acc = ws.compute, xs.dtype
    err = ws.small[:, :m].copy_(center.unsqueeze(1).expand(n, m, d))
    if low:
        err.add_(torch.bmm(codes, dec_c, out=ws.buffer("x_hat", (n, ws.chunk, d), cd)[:, :m]))
    else:
        err.baddbmm_(codes, dec)
    err.sub_(xs)                                                                     # x_hat - x
    torch.sum(torch.mul(err, err, out=ws.buffer("sq", (n, ws.chunk, d), acc)[:, :m]), -1, out=sq_err)
    g = err.mul_(2.0 / batch)                                                        # d MSE / d x_hat
    return g, (ws.buffer("g", (n, ws.chunk, d), cd)[:, :m].copy_(g) if low else g)


def accumulate_bmm(out: Tensor, a: Tensor, b: Tensor, overwrite: bool, ws: Workspace) -> None:
    """out = a @ b (overwrite) or out += a @ b, batched, in place (via a compute-dtype buffer if needed)."""
    if a.dtype != out.dtype:
        tmp = torch.bmm(a, b, out=ws.buffer("weight_grad", out.shape, a.dtype))
        out.copy_(tmp) if overwrite else out.add_(tmp)
    elif overwrite:
        torch.bmm(a, b, out=out)
    else:
        out.baddbmm_(a, b)


@dataclass
class SparseCodes:
    """Active latents of every member, flattened for embedding_bag over [N*h, d] tables: k per token (`build`), or
    any number per bag (`from_bags`: entries sorted by bag, e.g. a batch top-k's)."""
    flat_idx: Tensor    # [N*B, k] member-offset latent ids ([E] from `from_bags`)
    offsets: Tensor     # [N*B] bag starts ([n_bags])
    offset2bag: Tensor  # [N*B*k] bag (token) of each entry ([E])
    n_rows: int         # N*h
    _by_row: tuple[Tensor, Tensor, Tensor] | None = None   # CSR of the transpose: (crow, token, entry order)

    @staticmethod
    def build(idx: Tensor, d_hidden: int) -> "SparseCodes":
        """From per-member indices `idx: [N, B, k]`."""
        n, batch, k = idx.shape
        member_offset = torch.arange(n, device=idx.device).mul_(d_hidden).view(n, 1, 1)
        flat = (idx + member_offset).view(n * batch, k)
        offsets = torch.arange(0, n * batch * k, k, device=idx.device)
        o2b = torch.arange(n * batch, device=idx.device).repeat_interleave(k)
        return SparseCodes(flat, offsets, o2b, n * d_hidden)

    @staticmethod
    def from_bags(flat_idx: Tensor, bag: Tensor, n_bags: int, n_rows: int) -> "SparseCodes":
        """From entries `flat_idx: [E]` (member-offset latent ids) in bags `bag: [E]` (ascending, in [0, n_bags))."""
        offsets = torch.searchsorted(bag, torch.arange(n_bags, device=bag.device, dtype=bag.dtype))
        return SparseCodes(flat_idx, offsets, bag, n_rows)

    def gather_sum(self, table: Tensor, weights: Tensor) -> Tensor:
        """[n_bags, d]: sum over a bag's entries e of weights[e] * table[flat_idx[e]] (the sparse decode)."""
        if self.flat_idx.dim() == 1:
            return F.embedding_bag(self.flat_idx, table, self.offsets, per_sample_weights=weights.reshape(-1),
                                   mode="sum")
        return F.embedding_bag(self.flat_idx, table, per_sample_weights=weights.reshape(self.flat_idx.shape),
                               mode="sum")

    def weight_grad(self, grad_out: Tensor, table: Tensor) -> Tensor:
        """[E]: d/d weights of gather_sum given `grad_out: [n_bags, d]` (row dot products)."""
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad_out, table, self.flat_idx.view(-1), self.offsets, self.offset2bag, 0, -1)

    def scatter_rows(self, rows: Tensor, weights: Tensor, out: Tensor, accumulate: bool = False) -> Tensor:
        """out[N*h, d] (+)= sum over entries e of weights[e] * rows[bag(e)] into row flat_idx[e].

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
            token = (self.offset2bag[order] if self.flat_idx.dim() == 1
                     else order.div(self.flat_idx.shape[1], rounding_mode="floor")).to(keys.dtype)
            self._by_row = (crow, token, order)
        crow, token, order = self._by_row
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            matrix = torch.sparse_csr_tensor(crow, token, weights.reshape(-1)[order], (self.n_rows, rows.shape[0]),
                                             check_invariants=False)
        with no_autocast(rows.device):                                                 # sparse kernels: fp32
            return torch.addmm(out, matrix, rows, beta=1 if accumulate else 0, out=out)


def aux_k_grads(scores: Tensor, norms: Tensor, dead: Tensor, k_aux: int, aux_coef: float, resid: Tensor,
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
    sp = SparseCodes.build(idx, h)
    dec_flat = params["decoder"].view(n * h, d)
    e_hat = sp.gather_sum(dec_flat, vals.view(n * batch, -1)).view(n, batch, d)
    diff = e_hat.sub_(resid)                                                         # e_hat - e
    any_dead = dead.any(-1).to(xc.dtype)                                             # [N]
    aux = diff.square().sum(-1).mean(-1) * any_dead
    g = diff.mul_(per_member(any_dead * (2.0 * aux_coef / batch), diff))             # d (c*aux) / d e_hat
    sp.scatter_rows(g.view(n * batch, d), vals, grads["decoder"].view(n * h, d), accumulate=True)
    gvals = sp.weight_grad(g.view(n * batch, d), dec_flat).view(n, batch, -1).masked_fill_(vals <= 0, 0)
    sp.scatter_rows(xc.view(n * batch, d), gvals, grads["encoder"].view(n * h, d), accumulate=True)
    ones = xc.new_ones(n * batch, 1)                                                 # [N*B, 1]
    sp.scatter_rows(ones, gvals, grads["encoder_bias"].view(n * h, 1), accumulate=True)
    return aux
