"""Adam, gradient clipping and the unit-decoder constraint, vectorised over the members of a stacked ensemble.

Every function works in place on {name: [N, ...]} dicts (params, gradients, Adam moments, scratch) with per-member
factors ([N] tensors); torch.optim.Adam's single-tensor arithmetic, bit for bit, no weight decay.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from training.dictionary import Params, project_decoder_grad_
from training.fused import per_member, to_device


def project_rows_(decoder: Tensor, grad: Tensor, low_memory: bool) -> Tensor:
    """`project_decoder_grad_` ([N, h, d], in place); `low_memory`: the row dot products as a batched matmul, without
    its [N, h, d] temporary (the off-CPU path; the same values up to summation order)."""
    if not low_memory:
        return project_decoder_grad_(decoder, grad)
    dots = torch.matmul(grad.unsqueeze(-2), decoder.unsqueeze(-1)).squeeze(-1)         # [N, h, 1]
    return grad.addcmul_(dots, decoder, value=-1)


MIN_ROW = 64
"""Shortest row of `gradient_buffers`' one-buffer layout (shorter: per-tensor zeroing, the owner index would be big)."""


def gradient_buffers(params: Params) -> tuple[Params, Tensor | None, Tensor | None]:
    """Zeroed gradient buffers like `params` ({name: [N, ...]}, each contiguous) as consecutive views of one buffer,
    and that buffer as `rows: [R, w]` (w: the gcd of the per-member sizes) with each row's member `owner: [R]` (int32),
    so that one masked_fill zeroes the frozen members' gradients of every parameter (`adam_stacked_`); rows and owner
    are None where w < MIN_ROW."""
    like = next(iter(params.values()))
    n, sizes = like.shape[0], [p[0].numel() for p in params.values()]
    flat = torch.zeros(n * sum(sizes), dtype=like.dtype, device=like.device)
    grads, start = {}, 0
    for (name, p), size in zip(params.items(), sizes):
        grads[name] = flat[start:start + n * size].view(p.shape)
        start += n * size
    width = math.gcd(*sizes)
    if width < MIN_ROW:
        return grads, None, None
    members = torch.arange(n, dtype=torch.int32, device=like.device)
    owner = torch.cat([members.repeat_interleave(size // width) for size in sizes])
    return grads, flat.view(-1, width), owner


def member_groups(decoder: Tensor, whole_stack: bool, unit_decoder: bool) -> list[slice]:
    """Members updated together: all of them, except on the CPU with `unit_decoder`: groups of about 4 MiB per
    decoder (`[N, h, d]`), which stay in cache from the projection through Adam to the renormalisation."""
    if whole_stack or not unit_decoder:
        return [slice(None)]
    per_group = max(1, (4 << 20) // (decoder[0].numel() * decoder.element_size()))
    return [slice(start, start + per_group) for start in range(0, decoder.shape[0], per_group)]


def grad_sq_norms(grads: Params, n_models: int) -> Tensor:
    """[N]: each member's squared gradient norm over all its parameters (NaN/inf where any gradient is)."""
    gs = list(grads.values())
    blocks = [g[i] for i in range(n_models) for g in gs]                               # one per member and parameter
    # summed along each member's own contiguous row, so that its norm does not depend on how many members there are
    return torch.stack(torch._foreach_norm(blocks)).view(n_models, len(gs)).square().sum(-1)


def clip_grads_(grads: Params, sq_norms: Tensor, max_norm: float) -> None:
    """Scale each member's gradients by min(1, max_norm / (norm + 1e-6)), norm = sqrt(`sq_norms`: [N],
    `grad_sq_norms`)."""
    gs = list(grads.values())
    scale = (max_norm / (sq_norms.sqrt() + 1e-6)).clamp_max(1)
    torch._foreach_mul_(gs, [per_member(scale, g) for g in gs])


def adam_host_factors(betas: tuple[float, float], host_step: Tensor, host_lr: Tensor, lr_scale: float
                      ) -> Tensor:
    """[2, 4, N] float64 on the host: each member's Adam factors (weight1, beta2, bias_correction2_sqrt,
    neg_step_size) at the (already advanced) host step counts if active ([0]) and if frozen ([1]: leave it as it is).

    Computed in float64 from `host_step` and `host_lr` ([N] float64 CPU copies)."""
    beta1, beta2 = betas
    step = host_step.clamp_min(1)
    zero, one = torch.zeros_like(step), torch.ones_like(step)                          # float64 [N], host
    bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
    on = torch.stack([one * (1 - beta1), one * beta2, bias_correction2_sqrt,
                      -(host_lr * lr_scale) / (1 - beta1 ** step)])
    off = torch.stack([zero, one, bias_correction2_sqrt, zero])                        # 0: m unchanged, 1: v unchanged
    return torch.stack([on, off])


def select_adam_factors(both: Tensor, active: Tensor, frozen: Tensor | None = None) -> dict[str, Tensor]:
    """Per-member Adam factors ([N] each) from `adam_host_factors` output `both: [2, 4, N]` already on `active`'s
    device, in its dtype: one `where`. `frozen`: ~active where the caller has it (saves a kernel)."""
    weight1, beta2_, bc2, neg_step = torch.where(active, both[0], both[1]).unbind()    # [N] each
    return {"frozen": ~active if frozen is None else frozen, "weight1": weight1, "beta2": beta2_,
            "bias_correction2_sqrt": bc2, "neg_step_size": neg_step}


def adam_factors(betas: tuple[float, float], host_step: Tensor, host_lr: Tensor, lr_scale: float, active: Tensor,
                 dtype: torch.dtype, frozen: Tensor | None = None) -> dict[str, Tensor]:
    """Per-member Adam factors ([N], `dtype`, on `active`'s device) at the (already advanced) host step counts.

    The factors of every member as if active are computed on the host (`adam_host_factors`) and sent in one copy;
    one `where` on the device gives frozen members factors that leave them as they are (`select_adam_factors`).
    """
    both = to_device(adam_host_factors(betas, host_step, host_lr, lr_scale).to(dtype), active.device)  # [2, 4, N]
    return select_adam_factors(both, active, frozen)


def adam_members_(params: Params, grads: Params, exp_avg: Params, exp_avg_sq: Params, scratch: Params,
                  members: slice, c: dict[str, Tensor], beta2: float, eps: float) -> None:
    """Adam on the given members: torch.optim.Adam's single-tensor arithmetic, vectorised over members with
    per-member factors `c` (`adam_factors`), in place (frozen members: zero gradient, zero step), one parameter at a
    time (the CPU path: each stays in cache)."""
    for name, p_all in params.items():
        p, g = p_all[members], grads[name][members]
        m, v, tmp = exp_avg[name][members], exp_avg_sq[name][members], scratch[name][members]
        g.masked_fill_(per_member(c["frozen"][members], g), 0)
        m.lerp_(g, per_member(c["weight1"][members], m))
        v.mul_(per_member(c["beta2"][members], v)).addcmul_(g, g, value=1 - beta2)
        denom = torch.sqrt(v, out=g).div_(per_member(c["bias_correction2_sqrt"][members], v)).add_(eps)
        p.add_(torch.mul(m, per_member(c["neg_step_size"][members], m), out=tmp).div_(denom))


def adam_stacked_(params: Params, grads: Params, exp_avg: Params, exp_avg_sq: Params, scratch: Params,
                  members: slice, c: dict[str, Tensor], beta2: float, eps: float,
                  grad_rows: tuple[Tensor, Tensor] | None = None) -> None:
    """`adam_members_`'s arithmetic (the same bits) on every parameter at once with foreach ops, the denominator
    in the gradient's memory and the step in the scratch buffers (no allocation): the off-CPU path. `grad_rows`:
    (rows, owner) of `gradient_buffers` when `grads` are its views and `members` all of them: frozen members'
    gradients are zeroed in one masked_fill (zeroing, not scaling by 0: they may be NaN)."""
    names = list(params)
    ps, gs = [params[n][members] for n in names], [grads[n][members] for n in names]
    ms, vs = [exp_avg[n][members] for n in names], [exp_avg_sq[n][members] for n in names]
    tmps = [scratch[n][members] for n in names]

    def factor(key: str) -> list[Tensor]:
        return [per_member(c[key][members], t) for t in ps]
    if grad_rows is not None:
        rows, owner = grad_rows
        rows.masked_fill_(c["frozen"][owner].unsqueeze(1), 0)
    else:
        for g in gs:
            g.masked_fill_(per_member(c["frozen"][members], g), 0)
    torch._foreach_lerp_(ms, gs, factor("weight1"))
    torch._foreach_mul_(vs, factor("beta2"))
    torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
    torch._foreach_copy_(gs, vs)
    torch._foreach_sqrt_(gs)
    torch._foreach_div_(gs, factor("bias_correction2_sqrt"))
    torch._foreach_add_(gs, eps)                                                       # denom
    torch._foreach_copy_(tmps, ms)
    torch._foreach_mul_(tmps, factor("neg_step_size"))
    torch._foreach_addcdiv_(ps, tmps, gs)                                              # p + 1 * (step / denom)
