"""The architecture registry: every SAE architecture the ensembler trains is declared once, in its own module.

An architecture module (training/architectures/<name>.py) defines one `Architecture` named ARCHITECTURE and this
file lists the module in `MODULES` (one line). Nothing outside those modules names an architecture: the ensemble,
the sweep, the file format and the analysis tools read what they need from the declaration (`get(name)`).

What a declaration provides (shapes: one member's params {name: tensor} unstacked, `x: [B, d_in]`; the fused
gradient sees the stacked `[N, ...]` params):
  - `module`: the single-dictionary nn.Module class (encode/decode/forward on raw activations, `loss`);
    `make_member(d_in, d_hidden, key, *, tied, init_norm, device, dtype)` builds one freshly initialised member
    (this is the parameter set and its initialisation: the module's parameters, `param_names` their order);
    `member_key(module)` reads the member's own sweep key when the module holds it (TopK's k), else None.
  - `sweep_param`: the per-member hyperparameter the sweep varies ("l1", "k", ...), stored as the ensemble
    hparam of that name (int64 when `sweep_param_integer`, else float64) and in sweep.json as the members' keys.
  - `scheduled`: the coefficients (per-member float hparams) that `Ensemble.step(coefficient_scales=)` scales,
    e.g. the l1 warm-up; they reach the losses, already scaled, in `coefficients`.
  - `member_state(keys: [N] on the CPU, like, **options) -> dict`: per-member state derived from the keys (tensors,
    leading [N] axis, vmapped by the autograd backend) and static values (ints, floats, bools: shared by all).
    Each step the ensemble adds its options (`k_aux`, `aux_coef`, `decoder_impl`) and, under the "aux_k" dead
    policy while any member has dead latents, `dead: [N, d_hidden]`.
  - `loss(params, x, coefficients, state) -> (loss, parts)`: one member's differentiable loss, used by the
    `vmap(grad)` backend; `parts` has "mse", "codes" [B, h], "x_hat" [B, d_in] and any extra scalar terms
    (e.g. "aux"), which become step stats.
  - `fused_grads(params, x, coefficients, state, ws, grads) -> stats` or None: the hand-written gradient of the
    same loss over the stacked params, written into `grads` in place; stats {"loss", "mse", "l1_norm", "l0",
    "sq_err_sum": [N], "fired": [N, h], extras}. None: the sweep trains it with autograd.
  - `workspace(batch, chunk_tokens, state) -> (chunk, dense)`: the fused step's buffer layout (tokens per pass,
    whether the [N, C, h] buffers are needed).
  - `activate_(pre: [N, b, h], params, state) -> codes: [N, b, h]`: stacked encoding for evaluation (may reuse pre).
  - `dead_policy`: "resample" (Anthropic resampling, called by the sweep every --resample_every steps), "ghost_grads"
    (Jermyn & Templeton's ghost grads, the mats_sae_training recipe: a loss term on dead latents), "aux_k"
    (Gao et al.'s auxiliary loss on dead latents; the sweep refreshes whether any member has dead latents) or "none"
    (dead latents are only counted).
  - `check_keys(keys, d_hidden) -> problem | None`: a one-line complaint about member keys that cannot work at
    this dictionary size (TopK: a k above d_hidden), else None.
  - `key_symbol` ("L1", "k": "its L1 values are ..."), `key_column` (the key's table header: "L1 penalty", "k"),
    `key_axis` (its plot axis label),
  - `tieable`, `default_init_norm`, `title` ("L1", "TopK"), `format_key(key) -> str` ("L1 = 0.1", "k = 32"),
    `short_key(key) -> str` (plot labels), and the memory model `workspace_bytes`, `transient_bytes`,
    `eval_block_rows` (training/memory.py).
  - `saved_state` (default none): names of `member_state` tensors that change during training (e.g. a running
    threshold estimate), saved in the ensemble's state_dict as `state.<name>` and loaded back;
    `update_state_(state, stats, active: [N] bool)` (default None): called after each step, without gradients, to
    update them in place from the step's stats (only where `active`, for frozen members stay as they are).
  - `state_params` (default none): params that no gradient trains (their gradient is 0, so Adam leaves them as they
    are) but `update_state_` keeps, e.g. BatchTopK's inference threshold: the ensemble puts the stacked param
    tensors themselves into `member_state` under their names, so an update there is the param's (saved with the
    params: sweep.safetensors, the module, the checkpoint). The fused gradient must zero their gradients.
  - `scaled_params` (default center, encoder_bias): params in activation units, divided by the input scale when the
    sweep saves dictionaries that take raw activations (e.g. a threshold on pre-activations).
  - `options` (default none): SweepConfig field names passed as keywords to `member_state` (architecture-specific
    settings, e.g. matryoshka_prefixes), saved in the ensemble's state_dict as `option.arch.<name>` (float64).
  - `dead_policies` (default none): other dead policies the architecture's loss supports, which an ensemble may be
    given instead of `dead_policy` (`Ensemble(dead_policy=)`, e.g. L1's "ghost_grads"); a policy that is a loss
    term (`dead_latents.LOSS_POLICIES`) reaches the loss as `state["dead"]` while any member has dead latents;
  - `code_biases` (default ("encoder_bias",)): the per-latent params [h] in the units of the codes, which folding
    the decoder norms multiplies by them and the input scale divides (sweep.safetensors acts on raw activations);
  - `latent_vectors` (default ("encoder_bias",)): every per-latent param [h], set to 0 (with its Adam moments) for a
    latent the "resample" policy revives.
  - `unit_decoder` (default False): members always keep unit decoder rows (as `Ensemble(unit_decoder=True)`), e.g.
    where a loss constant such as a bandwidth is in pre-activation units.
  - `constrain_(params)` (default None): called after every Adam step, without gradients, to project the stacked
    params onto their constraints in place (e.g. JumpReLU's thresholds >= 0); a no-op on members it already satisfies.
  - `to_saelens(params, member) -> (tensors, cfg fields)` (default None: not exportable): one member's unit-norm
    params and sweep fields as a SAELens folder's tensors and cfg (training/saelens.py has the format);
    `from_saelens(tensors, cfg) -> module` for the SAELens architecture names in `saelens_names` (which folders
    `training.load_dictionary` reads as this architecture).
Saving and loading: stacked params and hparams go to sweep.safetensors / the ensemble's state_dict under their names
(`param.<name>`, `hparam.<sweep_param>`) and the name as `option.architecture`; states saved before it are told
apart by their sweep hparam.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Literal

from torch import Tensor

from training.dictionary import Params

DeadPolicy = Literal["resample", "aux_k", "ghost_grads", "none"]
LossFn = Callable[[Params, Tensor, dict[str, Tensor], dict[str, Any]], tuple[Tensor, dict[str, Tensor]]]
FusedGradsFn = Callable[..., dict[str, Tensor]]


@dataclass(frozen=True)
class Architecture:
    """One SAE architecture, declared once (see the module docstring for every field's contract)."""

    name: str
    title: str
    module: type
    make_member: Callable[..., Any]
    member_key: Callable[[Any], float | int] | None
    param_names: tuple[str, ...]
    sweep_param: str
    sweep_param_integer: bool
    scheduled: tuple[str, ...]
    member_state: Callable[..., dict[str, Any]]
    loss: LossFn
    fused_grads: FusedGradsFn | None
    workspace: Callable[[int, int, dict[str, Any]], tuple[int, bool]]
    activate_: Callable[[Tensor, Params, dict[str, Any]], Tensor]
    dead_policy: DeadPolicy
    tieable: bool
    check_keys: Callable[[list, int], str | None]
    default_init_norm: float
    key_symbol: str
    key_column: str
    key_axis: str
    format_key: Callable[[float | int], str]
    short_key: Callable[[float | int], str]
    workspace_bytes: Callable[..., int]
    transient_bytes: Callable[..., int]
    eval_block_rows: Callable[[int], int]
    saved_state: tuple[str, ...] = ()
    update_state_: Callable[[dict[str, Any], dict[str, Tensor], Tensor], None] | None = None
    state_params: tuple[str, ...] = ()
    scaled_params: tuple[str, ...] = ("center", "encoder_bias")
    options: tuple[str, ...] = ()
    dead_policies: tuple[DeadPolicy, ...] = ()
    code_biases: tuple[str, ...] = ("encoder_bias",)
    latent_vectors: tuple[str, ...] = ("encoder_bias",)
    unit_decoder: bool = False
    constrain_: Callable[[Params], None] | None = None
    to_saelens: Callable[[Params, dict[str, Any]], tuple[Params, dict[str, Any]]] | None = None
    from_saelens: Callable[[Params, dict[str, Any]], Any] | None = None
    saelens_names: tuple[str, ...] = ()


MODULES = ("l1", "topk", "batchtopk", "matryoshka", "gated", "jumprelu")
"""The registry: one entry per architecture module training/architectures/<name>.py (each defines ARCHITECTURE)."""
REGISTRY: dict[str, Architecture] = {}


def registry() -> dict[str, Architecture]:
    """{name: declaration} of every registered architecture (modules imported on first use)."""
    if not REGISTRY:
        for module in MODULES:
            arch = importlib.import_module(f"training.architectures.{module}").ARCHITECTURE
            REGISTRY[arch.name] = arch
    return REGISTRY


def get(name: str) -> Architecture:
    """The declaration of architecture `name` (ValueError naming the known ones if there is none)."""
    known = registry()
    if name not in known:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(known)})")
    return known[name]


def names() -> tuple[str, ...]:
    """Every registered architecture's name, in registry order."""
    return tuple(registry())


def by_sweep_param(hparam_names: set[str] | list[str]) -> Architecture:
    """The first registered architecture whose sweep hyperparameter is among `hparam_names` (how a state_dict saved
    before the architecture's name was names its own: those hold l1 or topk, registered first)."""
    found = [a for a in registry().values() if a.sweep_param in hparam_names]
    if not found or len({a.sweep_param for a in found}) != 1:
        raise ValueError(f"cannot tell the architecture from hparams {sorted(hparam_names)}")
    return found[0]


def by_saelens_name(name: str) -> Architecture | None:
    """The architecture that reads SAELens folders of architecture `name`, None if none does."""
    return next((a for a in registry().values() if name in a.saelens_names and a.from_saelens is not None), None)


def saelens_names() -> list[str]:
    """Every SAELens architecture name some registered architecture reads."""
    return [n for a in registry().values() for n in a.saelens_names]
