"""Dead latents of a stacked ensemble: tracking (tokens since each latent last fired) and the dead policies that
revive them. An architecture names its policy (`Architecture.dead_policy`); `DEAD_POLICIES` maps it to what
`Ensemble.resample_dead` runs:
  - "resample": Anthropic's resampling ("Towards Monosemanticity"), `resample_`;
  - "aux_k": Gao et al.'s aux-K loss revives them during training; `refresh_aux_k` only records whether any member
    has dead latents (the aux-K term is computed only while some have);
  - "ghost_grads" (an option of L1): the ghost-grads loss term revives them during training, switched like aux-K;
  - "none": nothing (dead latents are only counted), `no_revival`.
Shapes: `since, dead: [N, d_hidden]`, `x: [n, d_in]`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from training.dictionary import INIT_NORM


def member_generator(seed: int, step: int, member: int, stream: str = "resample") -> torch.Generator:
    """A CPU generator for one random stream of one member at one step, seeded from a hash of
    (stream, seed, step, member): derivable again on any machine, so no generator state is ever stored."""
    digest = hashlib.blake2b(f"{stream}/{seed}/{step}/{member}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


def track_dead_(since: Tensor, fired: Tensor, active: Tensor, n_tokens: int) -> None:
    """Advance tokens-since-fired `since` by the batch, reset it where a latent `fired` (`active: [N]` members only)."""
    since.add_(active.unsqueeze(1), alpha=n_tokens)
    since.masked_fill_(fired & active.unsqueeze(1), 0)


def mean_live_norm(rows: Tensor, dead: Tensor, fallback: float) -> Tensor:
    """[N]: the mean L2 norm of each member's rows (`rows: [N, h, d]`) that are not `dead: [N, h]`
    (`fallback` for a member with no live row)."""
    alive = (~dead).to(rows.dtype)
    n_alive = alive.sum(-1)
    mean = (rows.norm(dim=-1) * alive).sum(-1) / n_alive.clamp_min(1)
    return torch.where(n_alive > 0, mean, torch.full_like(mean, fallback))


def refresh_aux_k(ens: Any, x: Tensor, dead: Tensor, *, seed: int = 0, step: int = 0,
                  member_ids: Sequence[int] | None = None) -> None:
    """The "aux_k" policy: switch the ensemble's aux-K term on while any member has a dead latent (one host sync)."""
    ens._aux_on = bool(dead.any())


@torch.no_grad()
def resample_(ens: Any, x: Tensor, dead: Tensor, *, seed: int = 0, step: int = 0,
              member_ids: Sequence[int] | None = None) -> None:
    """The "resample" policy (Anthropic, "Towards Monosemanticity"), in place on the ensemble's params and moments.

    Each dead latent gets a decoder row = a centred input x - center, at the mean norm of the live decoder rows (1
    with `unit_decoder`), drawn with probability proportional to the square of that input's squared reconstruction
    error; its encoder row = the same direction scaled to 0.2 x the mean norm of the live encoder rows; its bias (every
    per-latent param of `Architecture.latent_vectors`) = 0;
    its Adam moments = 0. `x` should be many tokens (tens of thousands or more). The draws of member i come from
    `member_generator(seed, step, member_ids[i])` on the CPU (global member indices, default 0..N-1), so they depend
    on no device and no stored generator state. Frees the step workspace (the error pass reuses its memory); two
    host syncs.
    """
    params = ens.params
    dead_host = dead.cpu()                                                         # [N, h], one sync
    counts = dead_host.sum(-1).tolist()
    if not any(counts):
        return
    ids = list(range(ens.n_models)) if member_ids is None else [int(i) for i in member_ids]
    if len(ids) != ens.n_models:
        raise ValueError(f"member_ids has {len(ids)} entries for {ens.n_models} members")
    ens.release_workspace()
    weights = ens.per_token_sq_err(x).square_().nan_to_num_(0, 0, 0)               # [N, n]
    weights += weights.amax(-1, keepdim=True).clamp_min(1e-30) * 1e-12           # no all-zero rows
    weights_host = weights.cpu().double()                                          # [N, n], one sync
    del weights
    enc_norm = mean_live_norm(params["encoder"], dead, 1.0) if "encoder" in params else None
    dec_norm = None if ens.unit_decoder else mean_live_norm(params["decoder"], dead, INIT_NORM)
    for i, count in enumerate(counts):
        if count == 0:
            continue
        picks = torch.multinomial(weights_host[i], count, replacement=True,
                                  generator=member_generator(seed, step, ids[i]))     # [count], CPU
        latents = dead_host[i].nonzero().squeeze(1).to(x.device)                      # [count]
        centred = x[picks.to(x.device)] - params["center"][i]                         # [count, d_in]
        directions = centred.div_(centred.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        _revive_(ens, i, latents, directions, enc_norm, dec_norm)
    ens.tokens_since_fired.masked_fill_(dead, 0)


def _revive_(ens: Any, i: int, latents: Tensor, directions: Tensor, enc_norm: Tensor | None,
             dec_norm: Tensor | None) -> None:
    """Set member i's `latents: [m]` to unit `directions: [m, d_in]` (see resample_), in place."""
    params = ens.params
    if enc_norm is not None:
        params["encoder"][i, latents] = directions * (0.2 * enc_norm[i])
    dec = params["decoder"]
    dec[i, latents] = directions if dec_norm is None else directions * dec_norm[i]
    for name in ens.arch.latent_vectors:                                           # encoder_bias and the like
        params[name][i, latents] = 0
    for state in (ens.exp_avg, ens.exp_avg_sq):
        for name in ("encoder", "decoder", *ens.arch.latent_vectors):
            if name in state:
                state[name][i, latents] = 0


def no_revival(ens: Any, x: Tensor, dead: Tensor, *, seed: int = 0, step: int = 0,
               member_ids: Sequence[int] | None = None) -> None:
    """The "none" policy: dead latents stay as they are."""


DEAD_POLICIES: dict[str, Callable[..., None]] = {"resample": resample_, "aux_k": refresh_aux_k,
                                                  "ghost_grads": refresh_aux_k, "none": no_revival}
"""What `Ensemble.resample_dead` runs for each dead policy (`Architecture.dead_policy` or `Ensemble(dead_policy=)`)."""
LOSS_POLICIES = ("aux_k", "ghost_grads")
"""The dead policies that are a loss term: the ensemble hands the loss `state["dead"]` while any member has a dead
latent, and the sweep refreshes that switch every AUX_REFRESH_STEPS steps."""
