"""The ensemble's checkpoint format: one flat {name: tensor} dict (safetensors-ready) holding params
("param.<name>"), Adam moments ("adam.exp_avg.<name>", "adam.exp_avg_sq.<name>", "adam.step"), hparams
("hparam.lr", "hparam.<sweep param>"), the architecture's saved member state ("state.<name>"), dead counters
("dead.tokens_since_fired", "dead.aux_on"), "frozen" and the options ("option.*", among them the architecture's name
as UTF-8 bytes, its own options, "option.arch.<name>", and the dead policy as UTF-8 bytes). States written before an
entry existed are completed by `with_legacy_entries`, so old checkpoints load unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from training.architectures import by_sweep_param, get as get_architecture


def state_refs(ens: Any) -> dict[str, Tensor]:
    """The tensors `Ensemble.state_dict` copies, uncopied (options as small new CPU tensors)."""
    out: dict[str, Tensor] = {}
    for prefix, group in (("param.", ens.params), ("adam.exp_avg.", ens.exp_avg),
                          ("adam.exp_avg_sq.", ens.exp_avg_sq), ("hparam.", ens.hparams)):
        out.update({prefix + n: t for n, t in group.items()})
    out.update({f"state.{n}": ens.member_state[n] for n in ens.arch.saved_state})
    out["adam.step"] = ens.adam_step
    out["dead.tokens_since_fired"] = ens.tokens_since_fired
    out["frozen"] = ens.frozen
    out["dead.aux_on"] = torch.tensor(ens._aux_on)
    out["option.adam_betas"] = torch.tensor(ens.adam_betas, dtype=torch.float64)
    out["option.adam_eps"] = torch.tensor(ens.adam_eps, dtype=torch.float64)
    out["option.dead_window"] = torch.tensor(ens.dead_window, dtype=torch.long)
    out["option.k_aux"] = torch.tensor(ens.k_aux, dtype=torch.long)
    out["option.aux_coef"] = torch.tensor(ens.aux_coef, dtype=torch.float64)
    out["option.unit_decoder"] = torch.tensor(ens.unit_decoder)
    out["option.grad_clip"] = torch.tensor(ens.grad_clip, dtype=torch.float64)
    out["option.architecture"] = architecture_tensor(ens.architecture)
    out.update({f"option.arch.{n}": torch.tensor(v, dtype=torch.float64) for n, v in ens.arch_options.items()})
    out["option.dead_policy"] = architecture_tensor(ens.dead_policy)
    return out


def arch_options(state: dict[str, Tensor]) -> dict[str, Any]:
    """The architecture options a state_dict holds ("option.arch.<name>": a float, or a tuple of floats)."""
    prefix = "option.arch."
    return {n[len(prefix):]: (tuple(t.tolist()) if t.dim() else float(t)) for n, t in state.items()
            if n.startswith(prefix)}


TEXT_OPTIONS = ("option.architecture", "option.dead_policy")
"""Options saved as UTF-8 bytes: their lengths vary (a state may hold another dead policy than the ensemble)."""


def check_state(ens: Any, shapes: dict[str, torch.Size]) -> None:
    """ValueError unless `shapes` {name: shape} are `ens`'s state_dict names and shapes (no copies)."""
    mine = state_refs(ens)
    if set(shapes) != set(mine):
        raise ValueError(f"state_dict keys differ: missing {sorted(set(mine) - set(shapes))}, "
                         f"unexpected {sorted(set(shapes) - set(mine))}")
    for name, shape in shapes.items():
        if shape != mine[name].shape and name not in TEXT_OPTIONS:
            raise ValueError(f"{name}: shape {tuple(shape)} != {tuple(mine[name].shape)}")


def load_options(ens: Any, state: dict[str, Tensor]) -> None:
    """Set `ens`'s host-side options, aux-K switch and step counts from a state_dict."""
    ens.adam_betas = tuple(state["option.adam_betas"].tolist())  # type: ignore[assignment]
    ens.adam_eps = float(state["option.adam_eps"])
    ens.dead_window = int(state["option.dead_window"])
    ens.k_aux = int(state["option.k_aux"])
    ens.aux_coef = float(state["option.aux_coef"])
    ens.unit_decoder = bool(state["option.unit_decoder"])
    ens.grad_clip = float(state["option.grad_clip"])
    ens._aux_on = bool(state["dead.aux_on"])
    ens.dead_policy = architecture_name(state["option.dead_policy"])
    ens._host_step = state["adam.step"].to("cpu", torch.float64, copy=True)


def architecture_tensor(name: str) -> Tensor:
    """The architecture's name as a uint8 tensor of its UTF-8 bytes (how a state_dict records it)."""
    return torch.tensor(list(name.encode()), dtype=torch.uint8)


def architecture_name(t: Tensor) -> str:
    """The name `architecture_tensor` encoded."""
    return bytes(t.tolist()).decode()


def with_architecture(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state`, with the architecture's name added if it predates it being saved (told by its sweep hparam)."""
    if "option.architecture" in state or "hparam.lr" not in state:
        return state
    arch = by_sweep_param({n[len("hparam."):] for n in state if n.startswith("hparam.")})
    return {**state, "option.architecture": architecture_tensor(arch.name)}


def with_aux_flag(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state`, with the aux-K switch derived from its dead counters if it predates the switch being saved."""
    if "dead.aux_on" in state or not {"dead.tokens_since_fired", "option.dead_window"} <= set(state):
        return state
    return {**state, "dead.aux_on": (state["dead.tokens_since_fired"] >= state["option.dead_window"]).any()}


def with_dead_policy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state`, with its architecture's default dead policy added if it predates the policy being saved."""
    if "option.dead_policy" in state or "option.architecture" not in state:
        return state
    policy = get_architecture(architecture_name(state["option.architecture"])).dead_policy
    return {**state, "option.dead_policy": architecture_tensor(policy)}


def with_legacy_entries(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with the entries older versions did not save (aux-K switch, architecture name, dead policy) derived."""
    return with_dead_policy(with_architecture(with_aux_flag(state)))
