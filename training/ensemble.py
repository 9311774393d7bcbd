"""Train n_models sparse autoencoders of one shape at once, on the same batches.

Parameters, Adam state and per-member hyperparameters are stacked on a leading `[n_models]` axis
(`torch.func.stack_module_state`). Two interchangeable gradient backends compute every member's
gradient of its own loss in one pass:
  - "autograd": `vmap(grad(loss))` over the stacked params (the torch.func ensembling recipe);
  - "fused" (default): the same gradients written out analytically with batched matmuls into
    preallocated buffers (no recomputation, no per-step allocation of [n_models, batch, d_hidden]
    tensors, no host sync). Tests check it against the autograd backend.
Everything after the gradient (decoder-norm projection, Adam, renormalisation: training/adam.py; NaN freezing;
dead-latent tracking and revival: training/dead_latents.py) is shared and works in place on the stacked tensors;
the checkpoint format is training/ensemble_state.py. Both backends follow
autocast: under `torch.autocast(device, dtype=torch.bfloat16)` the matmuls run in bf16 (on CPUs
with AVX512-BF16 about 4x the fp32 matmul rate), params, Adam state and gradients stay fp32.

What each architecture contributes (its loss, its optional fused gradient, its per-member hyperparameter and
state, its dead-latent policy) is read from its declaration (training/architectures/): the backend "fused" uses
the architecture's fused gradient where it has one and `vmap(grad)` of its loss otherwise.

Shapes: `x: [batch, d_in]`; stacked params `center: [N, d_in]`, `encoder, decoder: [N, d_hidden, d_in]`,
`encoder_bias: [N, d_hidden]`; N = n_models.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from training.adam import (adam_factors, adam_host_factors, adam_members_, adam_stacked_, clip_grads_, grad_sq_norms,
                           gradient_buffers, member_groups, project_rows_, select_adam_factors)
from training.ensemble_state import (arch_options, architecture_name, check_state, load_options, state_refs,
                                     with_legacy_entries)
from training.dead_latents import DEAD_POLICIES, LOSS_POLICIES, track_dead_
from training.architectures import Architecture, get as get_architecture
from training.dictionary import (
    Dictionary,
    Params,
    INIT_NORM,
    decoder_norms,
    encoder_weight,
    init_center_value,
    l1_penalty,
    unstack_dictionaries,
)
from training.fused import Workspace, autocast_dtype, make_workspace, per_member as _per_member, to_device

Backend = Literal["fused", "autograd"]
TopKDecoder = Literal["sparse", "dense"]
"""How a sparse-code architecture decodes in the fused step: the k active rows only, or dense matmuls (benchmarks)."""


def _order(arch: Architecture) -> dict[str, int]:
    """Canonical order of params (as the modules register them) and hparams in the ensemble's dicts."""
    return {name: i for i, name in enumerate((*arch.param_names, "lr", arch.sweep_param))}


# ----------------------------------------------------------------------------- the ensemble

class Ensemble:
    """n_models dictionaries of one architecture and shape, trained together on the same batches.

    hparams: {"lr": [N], <the architecture's sweep_param>: [N]} (the sweep param may be omitted where the member
    modules hold it, e.g. TopK's k, and must then match them), as tensors or lists (float64; int64 for an integer
    sweep param); `step(x, lr_scale=, coefficient_scales=)` multiplies the learning rates and the architecture's
    scheduled coefficients by schedule factors.
    Options: Adam betas/eps (torch.optim.Adam semantics, no weight decay); `dead_window`: a latent is
    dead once it has not fired for this many tokens; `k_aux` (default d_in // 2) and `aux_coef` (1/32)
    of the aux-K dead-latent loss (architectures whose dead policy is "aux_k"); `backend` ("fused": the
    architecture's fused gradient where it has one, else autograd; "autograd": always `vmap(grad(loss))`);
    `topk_decoder` ("sparse": decode only the active rows, for architectures with sparse fused decoding);
    `chunk_tokens`: a chunked fused step processes the batch in chunks of this many tokens (weight
    gradients accumulate), bounding its [N, chunk, d_hidden] buffers; `unit_decoder`: keep decoder rows
    at unit norm (Bricken et al. 2023; always so for tied members and architectures declaring `unit_decoder`) instead of leaving them free (the
    default, see training.dictionary); `grad_clip`: scale each member's gradient to global norm at most this
    before Adam (torch.nn.utils.clip_grad_norm_ per member; 0: off). The attribute `whole_stack_update` (default:
    True off the CPU) updates every member at once, in a number of kernels that does not grow with n_models.
    `dead_policy` (default: the architecture's): one of the dead policies the architecture supports
    (`Architecture.dead_policy`, `Architecture.dead_policies`), e.g. "ghost_grads" for L1.
    """

    def __init__(self, members: list[Dictionary], hparams: dict[str, Tensor | list[float]], *,
                 adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 dead_window: int = 10_000_000, k_aux: int | None = None, aux_coef: float = 1 / 32,
                 backend: Backend = "fused", topk_decoder: TopKDecoder = "sparse",
                 chunk_tokens: int = 1 << 30, unit_decoder: bool = False, grad_clip: float = 0.0,
                 arch_options: dict[str, Any] | None = None, dead_policy: str | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        first = members[0]
        for m in members:
            if type(m) is not type(first) or m.decoder.shape != first.decoder.shape or m.tied != first.tied:
                raise ValueError("ensemble members must share architecture, shapes and tying")
        arch = get_architecture(first.architecture)
        stacked, _ = torch.func.stack_module_state(members)
        params = {n: t.detach().clone().contiguous() for n, t in stacked.items()}
        del stacked
        keys = [arch.member_key(m) for m in members] if arch.member_key is not None else None
        self._init_from(params, hparams, arch.name, keys, adam_betas=adam_betas, adam_eps=adam_eps,
                        dead_window=dead_window, k_aux=k_aux, aux_coef=aux_coef, backend=backend,
                        topk_decoder=topk_decoder, chunk_tokens=chunk_tokens, unit_decoder=unit_decoder,
                        grad_clip=grad_clip, arch_options=arch_options, dead_policy=dead_policy)

    def _init_from(self, params: Params, hparams: dict[str, Tensor | list[float]], architecture: str,
                   member_keys: list | None, *, adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                   dead_window: int = 10_000_000, k_aux: int | None = None, aux_coef: float = 1 / 32,
                   backend: Backend = "fused", topk_decoder: TopKDecoder = "sparse", chunk_tokens: int = 1 << 30,
                   unit_decoder: bool = False, grad_clip: float = 0.0, moments: tuple[Params, Params] | None = None,
                   arch_options: dict[str, Any] | None = None, dead_policy: str | None = None) -> None:
        """Set every field around stacked `params` {name: [N, ...]} (adopted, not copied) and Adam `moments`
        (exp_avg, exp_avg_sq; default zeros); `member_keys`: each member's sweep key where its module holds it;
        `arch_options`: the architecture's `options` by name (missing ones: its member_state's defaults)."""
        if backend not in ("fused", "autograd") or topk_decoder not in ("sparse", "dense"):
            raise ValueError(f"unknown backend {backend!r} or topk_decoder {topk_decoder!r}")
        self.arch: Architecture = get_architecture(architecture)
        self.architecture: str = self.arch.name
        self.n_models, self.d_hidden, self.d_in = params["decoder"].shape
        self.tied = "encoder" not in params
        self.adam_betas, self.adam_eps = (float(adam_betas[0]), float(adam_betas[1])), float(adam_eps)
        self.dead_window, self.aux_coef = int(dead_window), float(aux_coef)
        self.k_aux = min(self.d_hidden, self.d_in // 2 if k_aux is None else int(k_aux))
        self.backend, self.topk_decoder, self.chunk_tokens = backend, topk_decoder, int(chunk_tokens)
        self.unit_decoder = bool(unit_decoder) or self.tied or self.arch.unit_decoder
        self.grad_clip = float(grad_clip)
        self.dead_policy: str = dead_policy or self.arch.dead_policy
        if self.dead_policy not in (self.arch.dead_policy, *self.arch.dead_policies):
            raise ValueError(f"{self.architecture} supports the dead policies "
                             f"{[self.arch.dead_policy, *self.arch.dead_policies]}, not {self.dead_policy!r}")

        self.params: Params = params
        like = self.params["decoder"]
        self.hparams: dict[str, Tensor] = self._checked_hparams(hparams, member_keys)
        host_keys = (torch.tensor(member_keys) if member_keys is not None      # no device read (meta-safe)
                     else torch.as_tensor(hparams[self.arch.sweep_param]).to("cpu", copy=True))
        unknown = set(arch_options or {}) - set(self.arch.options)
        if unknown:
            raise ValueError(f"{self.architecture} has no options {sorted(unknown)} (it has {list(self.arch.options)})")
        self.arch_options: dict[str, Any] = dict(arch_options or {})
        self.member_state: dict[str, Any] = self.arch.member_state(host_keys, like, **self.arch_options)
        self.member_state.update({n: self.params[n] for n in self.arch.state_params})   # aliases of the params
        self.exp_avg, self.exp_avg_sq = moments if moments is not None else (
            {n: torch.zeros_like(p) for n, p in self.params.items()},
            {n: torch.zeros_like(p) for n, p in self.params.items()})
        self.adam_step = torch.zeros(self.n_models, dtype=torch.float64, device=like.device)
        self.frozen = torch.zeros(self.n_models, dtype=torch.bool, device=like.device)
        self.tokens_since_fired = torch.zeros(self.n_models, self.d_hidden, dtype=torch.long, device=like.device)
        self._grads, *rows = gradient_buffers(self.params)             # views of one buffer (see adam_stacked_)
        self._grad_rows: tuple[Tensor, Tensor] | None = None if rows[0] is None else (rows[0], rows[1])
        self._scratch: Params = {n: torch.empty_like(p) for n, p in self.params.items()}
        self._ws: Workspace | None = None
        self._aux_on = False   # host-side: does any member have dead latents (refreshed by resample_dead; saved)
        self.whole_stack_update = like.device.type != "cpu"   # see _update_
        self._host_hparams = {n: (v if isinstance(v, Tensor) else torch.tensor(v, dtype=torch.float64))
                              .to("cpu", torch.float64, copy=True) for n, v in hparams.items()
                              if n in ("lr", *self.arch.scheduled)}
        self._host_step = torch.zeros(self.n_models, dtype=torch.float64)

    # ------------------------------------------------------------------ construction helpers

    def _checked_hparams(self, hparams: dict[str, Tensor | list[float]], member_keys: list | None
                         ) -> dict[str, Tensor]:
        """Validate and store hparams: lr and float sweep params as float64 [N], integer ones as int64 [N]."""
        dev = self.params["decoder"].device
        key = self.arch.sweep_param
        want = {"lr", key}
        given = set(hparams) | ({key} if self.arch.member_key is not None else set())
        if given != want:
            raise ValueError(f"{self.architecture} ensemble hparams must be {sorted(want)}, got {sorted(hparams)}")
        key_dtype = torch.long if self.arch.sweep_param_integer else torch.float64
        out: dict[str, Tensor] = {}
        for name, value in hparams.items():
            t = value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float64)
            t = t.to(dev)
            if t.shape != (self.n_models,):
                raise ValueError(f"hparam {name!r} must have shape [{self.n_models}], got {tuple(t.shape)}")
            out[name] = t.to(key_dtype if name == key else torch.float64).clone()
        if self.arch.member_key is not None:
            assert member_keys is not None, f"{self.arch.title} members carry their {key}"
            keys = torch.tensor(member_keys, device=dev, dtype=key_dtype)
            if key in out and not torch.equal(out[key], keys):
                raise ValueError(f"hparams[{key!r}] {out[key].tolist()} != members' {key} {keys.tolist()}")
            out[key] = keys
        return out

    # ------------------------------------------------------------------ training

    def step(self, x: Tensor, *, lr_scale: float = 1.0, coefficient_scales: dict[str, float] | None = None,
             reduce: Any = None, stats: bool = True) -> dict[str, Tensor]:
        """One Adam step of every member on `x: [batch, d_in]`; per-member stats, no host sync.

        `coefficient_scales`: {name: factor} for the architecture's scheduled coefficients (`arch.scheduled`,
        e.g. the l1 warm-up; missing ones: 1; a name the architecture does not schedule is an error).
        Returns {"loss", "mse", "l1_norm" (the decoder-norm-weighted L1 of the codes), "l0", "explained_variance",
        (the loss's extra terms, e.g. "aux"): [N],
        "fired": BoolTensor[N, d_hidden] (fired in this batch), "n_dead": [N], "frozen": BoolTensor[N]}.
        `stats=False` (steps whose stats nobody reads): only what the step computes anyway ("fired", and what the
        architecture's loss yields on the way), without the reductions kept for logging; the same update.
        A member whose squared gradient norm is NaN/inf (a NaN/inf gradient, as a NaN/inf loss gives, or a norm past
        ~1.8e19 in float32) is frozen from this step on, before the update: no NaN reaches its parameters.
        `reduce` (data parallel, `x` being this process's share of the batch): called as reduce(grads, stats, x) on
        the gradients and stats of the share, it turns them into those of the whole batch in place and returns (the
        batch's rows, the batch's summed squared deviation from its mean).
        """
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected x: [batch, {self.d_in}], got {tuple(x.shape)}")
        scales = dict(coefficient_scales or {})
        if not set(scales) <= set(self.arch.scheduled):
            raise ValueError(f"{self.architecture} schedules {list(self.arch.scheduled)}, not {sorted(scales)}")
        x = x.to(self.params["decoder"].dtype)
        with torch.no_grad():
            stats = stats or reduce is not None              # data parallel: the reduction sums every stat
            coefficients, factors = self._step_factors(x, scales, lr_scale)
            out = self._gradients(x, scales, stats=stats, coefficients=coefficients)
            n_tokens, variance = (x.shape[0], None) if reduce is None else reduce(self._grads, out, x)
            sq_norms = grad_sq_norms(self._grads, self.n_models)                         # [N]
            self.frozen |= torch.ne(sq_norms - sq_norms, 0)   # not finite (inf - inf is NaN): 2 kernels, isfinite 4
            active = ~self.frozen
            self._update_(active, lr_scale, frozen=self.frozen, factors=factors, sq_norms=sq_norms)
            if self.arch.constrain_ is not None:
                self.arch.constrain_(self.params)
            track_dead_(self.tokens_since_fired, out["fired"], active, n_tokens)
            if self.arch.update_state_ is not None:
                self.arch.update_state_(self.member_state, out, active)
            sq_err_sum = out.pop("sq_err_sum", None)
            if stats:
                if variance is None:
                    variance = (x - x.mean(0)).square().sum()
                out["explained_variance"] = 1 - sq_err_sum / variance
                out["n_dead"] = self.dead_mask().sum(-1)
                out["frozen"] = self.frozen.clone()
        return out

    def _step_state(self) -> dict[str, Any]:
        """The architecture's member state plus this ensemble's options and, under a dead policy that is a loss term
        (aux-K, ghost grads) while any member has dead latents, `dead: [N, d_hidden]`."""
        state = {**self.member_state, "k_aux": self.k_aux, "aux_coef": self.aux_coef,
                 "decoder_impl": self.topk_decoder, "dead": None}
        if self.dead_policy in LOSS_POLICIES and self._aux_on:
            state["dead"] = self.dead_mask()
        return state

    def _step_factors(self, x: Tensor, scales: dict[str, float], lr_scale: float) -> tuple[dict[str, Tensor], Tensor]:
        """This step's scheduled coefficients ({name: [N]}) and Adam factors (`adam_host_factors` at the host step
        counts + 1, [2, 4, N]), computed on the host and sent to x's device in x's dtype in one copy."""
        host = [adam_host_factors(self.adam_betas, self._host_step + 1, self._host_hparams["lr"], lr_scale)
                .to(x.dtype).view(8, self.n_models)]
        host += [(self._host_hparams[n] * scales.get(n, 1.0)).to(x.dtype).unsqueeze(0) for n in self.arch.scheduled]
        rows = to_device(torch.cat(host), x.device)                                     # [8 + n_scheduled, N]
        return {n: rows[8 + i] for i, n in enumerate(self.arch.scheduled)}, rows[:8].view(2, 4, self.n_models)

    def _gradients(self, x: Tensor, scales: dict[str, float], stats: bool = True,
                   coefficients: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Fill self._grads with every member's gradient; return the stats of `step` (`stats=False`: may leave out
        those only logging reads, see `step`). `coefficients`: the scheduled ones on x's device, where the caller
        has them (else computed from `scales`)."""
        if coefficients is None:
            coefficients = {n: to_device((self._host_hparams[n] * scales.get(n, 1.0)).to(x.dtype), x.device)
                            for n in self.arch.scheduled}                       # [N] each, computed on the host
        state = {**self._step_state(), "stats": stats}
        if self.backend == "autograd" or self.arch.fused_grads is None:
            return self._autograd_gradients(x, coefficients, state)
        return self.arch.fused_grads(self.params, x, coefficients, state, self._workspace(x, state), self._grads)

    def _workspace(self, x: Tensor, state: dict[str, Any]) -> Workspace:
        """The step buffers for this batch size and compute dtype (reallocated when either changes)."""
        compute = autocast_dtype(x.device) or x.dtype
        if self._ws is None or self._ws.batch != x.shape[0] or self._ws.compute != compute:
            self._ws = None
            chunk, dense = self.arch.workspace(x.shape[0], self.chunk_tokens, state)
            self._ws = make_workspace(self.n_models, x.shape[0], chunk, self.d_in, self.d_hidden, dense,
                                      self.params["decoder"], compute)
        return self._ws

    def _autograd_gradients(self, x: Tensor, coefficients: dict[str, Tensor], state: dict[str, Any]
                            ) -> dict[str, Tensor]:
        """vmap(grad(arch.loss)) over the stacked params: the reference the fused kernels are tested against.

        Tensors of `state` with a leading [N] axis are vmapped; everything else (options, None) is shared."""
        per_member = {n: v for n, v in state.items() if isinstance(v, Tensor) and v.shape[:1] == (self.n_models,)}
        shared = {n: v for n, v in state.items() if n not in per_member}
        loss = self.arch.loss

        def loss_fn(p: Params, coefs: dict[str, Tensor], member: dict[str, Tensor]
                    ) -> tuple[Tensor, dict[str, Tensor]]:
            total, parts = loss(p, x, coefs, {**shared, **member})
            codes = parts["codes"]
            extras = {n: v for n, v in parts.items() if n not in ("mse", "codes", "x_hat")}
            return total, {"mse": parts["mse"], "l1_norm": l1_penalty(codes, decoder_norms(p)),
                           "l0": (codes > 0).sum(-1).to(codes.dtype).mean(), "fired": (codes > 0).any(0),
                           "sq_err_sum": (parts["x_hat"] - x).square().sum(), **extras, "loss": total}
        grads, stats = torch.func.vmap(torch.func.grad(loss_fn, has_aux=True))(self.params, coefficients, per_member)
        for name, g in grads.items():
            self._grads[name].copy_(g)
        return stats

    def _update_(self, active: Tensor, lr_scale: float, frozen: Tensor | None = None,
                 factors: Tensor | None = None, sq_norms: Tensor | None = None) -> None:
        """Gradient clipping, then Adam (with `unit_decoder`: decoder-gradient projection, Adam, decoder
        renormalisation) in place, frozen members untouched (training/adam.py). Off the CPU every member at once on
        the whole stacked tensors (foreach ops, no [N, h, d] temporary: a constant number of kernels per step); on the
        CPU one parameter at a time and, with `unit_decoder`, groups of members of about 4 MiB per tensor (cache).
        `frozen`: ~active, `factors`: this step's `_step_factors`, `sq_norms`: `grad_sq_norms`, where the caller
        has them."""
        coefs = self._adam_coefficients(active, lr_scale, frozen, factors)
        if self.grad_clip > 0:
            if sq_norms is None:
                sq_norms = grad_sq_norms(self._grads, self.n_models)
            clip_grads_(self._grads, sq_norms, self.grad_clip)
        for members in member_groups(self.params["decoder"], self.whole_stack_update, self.unit_decoder):
            dec, g_dec = self.params["decoder"][members], self._grads["decoder"][members]
            if self.unit_decoder:
                project_rows_(dec, g_dec, low_memory=self.whole_stack_update)
            self._adam_members(members, coefs)
            if self.unit_decoder:
                dec.div_(dec.norm(dim=-1, keepdim=True).masked_fill_(_per_member(coefs["frozen"][members], dec), 1))

    def _adam_(self, active: Tensor, lr_scale: float) -> None:
        """One in-place Adam step of every member with the gradients in self._grads (no constraint)."""
        self._adam_members(slice(None), self._adam_coefficients(active, lr_scale))

    def _adam_members(self, members: slice, coefs: dict[str, Tensor]) -> None:
        """Adam on `members` with factors `coefs`: all parameters at once off the CPU, one at a time on it."""
        args = (self.params, self._grads, self.exp_avg, self.exp_avg_sq, self._scratch, members, coefs,
                self.adam_betas[1], self.adam_eps)
        if not self.whole_stack_update:
            adam_members_(*args)
        else:
            adam_stacked_(*args, grad_rows=self._grad_rows if members == slice(None) else None)

    def _adam_coefficients(self, active: Tensor, lr_scale: float, frozen: Tensor | None = None,
                           factors: Tensor | None = None) -> dict[str, Tensor]:
        """Advance the step counts of active members (the host counts of every member: a frozen member's runs on,
        unused); their per-member Adam factors ([N], params dtype): from `factors`, this step's [2, 4, N] from
        `_step_factors`, where given."""
        self.adam_step += active
        self._host_step += 1
        if factors is not None:
            return select_adam_factors(factors, active, frozen)
        return adam_factors(self.adam_betas, self._host_step, self._host_hparams["lr"], lr_scale, active,
                            self.params["decoder"].dtype, frozen)

    def dead_mask(self) -> Tensor:
        """BoolTensor[N, d_hidden]: latents that have not fired for `dead_window` tokens."""
        return self.tokens_since_fired >= self.dead_window

    # ------------------------------------------------------------------ dead-latent revival

    @torch.no_grad()
    def resample_dead(self, x: Tensor, *, seed: int = 0, step: int = 0,
                      member_ids: Sequence[int] | None = None) -> Tensor:
        """Run the architecture's dead policy (training/dead_latents.py); returns how many dead latents each member
        has ([N]). "resample" (L1): revive them from `x: [n, d_in]` (many tokens), draws seeded by (seed, step,
        member_ids[i]); call every few thousand steps. "aux_k" (TopK): refresh whether the aux-K term is needed."""
        dead = self.dead_mask() & ~self.frozen.unsqueeze(1)                            # [N, h]
        n_dead = dead.sum(-1)
        DEAD_POLICIES[self.dead_policy](self, x, dead, seed=seed, step=step, member_ids=member_ids)
        return n_dead

    def release_workspace(self) -> None:
        """Free the fused step's per-batch buffers (the next step reallocates them): call before evaluation."""
        self._ws = None

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """codes: [N, batch, d_hidden] of every member (the architecture's activation of the pre-activations)."""
        xc = x.to(self.params["center"].dtype).unsqueeze(0) - self.params["center"].unsqueeze(1)   # [N, b, d]
        enc = encoder_weight(self.params)
        pre = torch.baddbmm(self.params["encoder_bias"].unsqueeze(1), xc, enc.transpose(1, 2))  # [N, b, h]
        del xc
        return self.arch.activate_(pre, self.params, self.member_state)

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
        """Ordinary modules of the architecture (e.g. SparseLinearAutoencoder) holding copies of each member."""
        keys = self.hparams[self.arch.sweep_param] if self.arch.member_key is not None else None
        return unstack_dictionaries(self.params, self.architecture, keys)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Flat {name: tensor} (copies; safetensors-ready): params, Adam state, hparams, dead counters,
        frozen flags and options. `Ensemble.from_state_dict` rebuilds the ensemble from it alone.

        `device` (e.g. "cpu" to save): each tensor is copied straight there, one at a time, so the ensemble's
        device needs no extra memory; None: clones where the tensors are.
        """
        refs = state_refs(self)
        if device is None:
            return {n: t.detach().clone().contiguous() for n, t in refs.items()}
        return {n: t.detach().to(device, copy=True).contiguous() for n, t in refs.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Overwrite this ensemble's state with `state` (from `state_dict` of an ensemble of the same shape)."""
        state = with_legacy_entries(state)
        check_state(self, {n: t.shape for n, t in state.items()})
        for prefix, group in (("param.", self.params), ("adam.exp_avg.", self.exp_avg),
                              ("adam.exp_avg_sq.", self.exp_avg_sq), ("hparam.", self.hparams)):
            for n, t in group.items():
                t.copy_(state[prefix + n])
        self.adam_step.copy_(state["adam.step"])
        self.tokens_since_fired.copy_(state["dead.tokens_since_fired"])
        self.frozen.copy_(state["frozen"])
        for n in self.arch.saved_state:
            self.member_state[n].copy_(state[f"state.{n}"])
        load_options(self, state)
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
        state = with_legacy_entries(dict(state))
        shapes = {n: t.shape for n, t in state.items()}
        device = torch.device(device) if device is not None else state["param.decoder"].device

        if "param.decoder" not in state or "hparam.lr" not in state:
            raise ValueError("not an Ensemble state_dict: no param.decoder or hparam.lr")
        arch = get_architecture(architecture_name(state["option.architecture"]))
        order = _order(arch)

        def take(prefix: str) -> dict[str, Tensor]:
            """The `prefix` entries on `device`, params in the modules' order (sums over them follow it)."""
            names = sorted((n for n in state if n.startswith(prefix)), key=lambda n: order.get(n[len(prefix):], 99))
            return {n[len(prefix):]: torch.empty_like(state[n], device=device).copy_(state.pop(n)) for n in names}
        keys = state[f"hparam.{arch.sweep_param}"].tolist() if arch.member_key is not None else None
        params, hparams = take("param."), take("hparam.")
        if arch.member_key is not None:
            hparams.pop(arch.sweep_param)                         # the members' own keys are the keys
        moments = take("adam.exp_avg."), take("adam.exp_avg_sq.")
        ens = cls.__new__(cls)
        ens._init_from(params, hparams, arch.name, keys, backend=backend, topk_decoder=topk_decoder,
                       moments=moments, arch_options=arch_options(state))
        check_state(ens, shapes)
        load_options(ens, state)
        ens.adam_step.copy_(state["adam.step"])
        ens.tokens_since_fired.copy_(state["dead.tokens_since_fired"])
        ens.frozen.copy_(state["frozen"])
        for n in arch.saved_state:
            ens.member_state[n].copy_(state[f"state.{n}"])
        return ens


def make_members(architecture: str, n_models: int, d_in: int, d_hidden: int, *,
                 keys: list | None = None, k: list[int] | None = None, tied: bool = False, seed: int = 0,
                 init_norm: float = INIT_NORM, device=None, dtype=None) -> list[Dictionary]:
    """n_models freshly initialised dictionaries of `architecture` (decoder rows of norm `init_norm`, 1 when tied);
    member i is drawn after torch.manual_seed(seed + i). `keys`: each member's sweep key, needed where the module
    holds it (TopK's k; `k` is the same argument under its old name)."""
    arch = get_architecture(architecture)
    keys = keys if keys is not None else k
    if arch.member_key is not None and keys is None:
        raise ValueError(f"{arch.title} members need their {arch.sweep_param}")
    if tied and not arch.tieable:
        raise ValueError(f"{arch.title} dictionaries cannot be tied")
    members: list[Dictionary] = []
    for i in range(n_models):
        torch.manual_seed(seed + i)
        members.append(arch.make_member(d_in, d_hidden, None if keys is None else keys[i], tied=tied,
                                        init_norm=init_norm, device=device, dtype=dtype))
    return members
