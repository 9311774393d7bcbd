"""Dictionaries at hooks: capture activations, splice dictionaries in, edit (ablate) their features, add vectors.

Every forward hook the toolkit puts on a model is built here, and `capture` is the one `run_with_cache` call.
A dictionary is any module with `encode(x: [n, d_in]) -> codes: [n, d_hidden]` and `decode(codes) -> [n, d_in]`;
activations are [batch, seq, *rest] with prod(rest) = d_in (attn.hook_z: heads concatenated).

Splice modes, per hook, with f = encode(x) and x_hat = decode(f):
    sae    x -> x_hat                                  (the dictionary replaces the activation)
    error  x -> x_hat + stopgrad(x - x_hat)            (same value as x; gradients flow through the dictionary)
    zero   x -> 0
    read   x -> x                                      (the codes are only recorded)
An edit g of the codes (ablation: f_i = 0) keeps the error term: x -> x + decode(g(f)) - decode(f), which is x
exactly when g changes nothing. Attribution splicing (Marks et al. 2024) makes f and the error e = x - x_hat leaves
of the autograd graph, x -> decode(f_leaf) + e_leaf, so one backward pass gives d(target)/d(every feature, error).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from training.cli import UserError

MODES = ("sae", "error", "zero", "read")
"""What a spliced hook does to its activation (see the module docstring)."""

Edit = Callable[[Tensor], Tensor]
"""codes [batch, seq, d_hidden] -> edited codes of the same shape (a new tensor)."""


# ------------------------------------------------------------------------------------- capture

def capture(model: Any, tokens: Tensor, hooks: Sequence[str], stop_at_layer: int | None = None,
            logits: bool = False) -> tuple[Tensor | None, dict[str, Tensor]]:
    """(logits [batch, seq, vocab] when `logits` else None, {hook: activation [batch, seq, *rest]}) of the
    unmodified model on tokens [batch, seq]; `stop_at_layer` ends the pass before that block (no logits then)."""
    kw: dict[str, Any] = {} if logits else {"return_type": None}
    if stop_at_layer is not None:
        kw["stop_at_layer"] = stop_at_layer
    out, cache = model.run_with_cache(tokens, names_filter=list(hooks), **kw)
    return (out if logits else None), {h: cache[h] for h in hooks}


# ------------------------------------------------------------------------------------- hook factories

def splice_hook(
    reconstruct: Callable[[Tensor], Tensor], mode: str, keep: Tensor | None
) -> Callable[[Tensor, Any], Tensor]:
    """Hook replacing an activation [batch, seq, *rest] by reconstruct (mode 'sae'), zeros ('zero') or reconstruct + error ('error')."""

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        """Replace the activation; positions where `keep` is True keep their clean value."""
        b, s = act.shape[:2]
        if mode == "zero":
            new = torch.zeros_like(act)
        else:
            flat = act.reshape(b * s, -1)  # [batch*seq, prod(rest)], e.g. hook_z: heads*d_head
            rec = reconstruct(flat)
            if rec.shape != flat.shape:
                raise ValueError(f"reconstruct returned shape {tuple(rec.shape)}, expected {tuple(flat.shape)}")
            rec = rec.to(act.dtype)
            if mode == "error":
                rec = rec + (flat - rec).detach()  # SAE output + error term = the exact activation
            new = rec.reshape(act.shape)
        if keep is not None:
            k = keep.to(act.device).reshape(b, s, *([1] * (act.ndim - 2)))
            new = torch.where(k, act, new)
        return new

    return hook


def add_vector_hook(vector: Tensor) -> Callable[[Tensor, Any], Tensor]:
    """A forward hook adding `vector: [d_in]` at every position of a [batch, seq, *rest] activation
    (rest = [d] or [heads, d_head] for attn.hook_z, with prod(rest) = d_in); returns a new tensor."""
    def hook(act: Tensor, hook: Any = None) -> Tensor:
        rest = act.shape[2:]
        if math.prod(rest) != vector.numel():
            raise UserError(f"the steering vector has {vector.numel()} values but the activation at "
                            f"{getattr(hook, 'name', 'the hook')} is {list(act.shape)}: use the model the sweep was trained on")
        return act + vector.to(device=act.device, dtype=act.dtype).reshape(rest)
    return hook


@dataclass
class Spliced:
    """What the spliced hooks saw in the latest forward pass, by hook name."""

    codes: dict[str, Tensor] = field(default_factory=dict)
    """codes [batch, seq, d_hidden] encoded from the hook's input (part of the autograd graph when grad is on)."""
    leaves: dict[str, Tensor] = field(default_factory=dict)
    """Attribution splicing: the codes leaf [batch, seq, d_hidden] the hook's output was decoded from."""
    errors: dict[str, Tensor] = field(default_factory=dict)
    """Attribution splicing: the error leaf [batch, seq, d_in] = x - decode(codes) added back."""


def _check_width(sae: Any, flat: Tensor, name: str) -> None:
    """UserError when the dictionary's input width differs from the activation's."""
    d_in = getattr(sae, "d_in", None) or (sae.decoder.shape[1] if hasattr(sae, "decoder") else None)
    if d_in is not None and d_in != flat.shape[1]:
        raise UserError(f"the dictionary at {name} reads {d_in} values but the model's activation there has "
                        f"{flat.shape[1]}: use the model and hook the dictionary was trained on")


def dictionary_hook(name: str, sae: Any, mode: str = "sae", *, keep: Tensor | None = None,
                    edit: Edit | None = None, attribution: bool = False,
                    record: Spliced | None = None) -> Callable[[Tensor, Any], Tensor]:
    """A forward hook at `name` applying dictionary `sae` as `mode` (or `edit`, or attribution splicing; see the
    module docstring), recording codes (and leaves) into `record`; positions where `keep` is True stay clean."""
    if mode not in MODES:
        raise ValueError(f"unknown splice mode {mode!r}: choose from {', '.join(MODES)}")

    def encode(flat: Tensor) -> Tensor:
        """codes [b*s, d_hidden] of flat [b*s, d_in] (in float32 at least), recorded."""
        _check_width(sae, flat, name)
        codes = sae.encode(flat.float()).reshape(*b_s, -1)                    # [b, s, d_hidden]
        if record is not None:
            record.codes[name] = codes
        return codes.reshape(flat.shape[0], -1)  # the graph runs through the recorded tensor: d/d codes works

    b_s: list[int] = []

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        b_s[:] = act.shape[:2]
        b, s = b_s
        flat = act.reshape(b * s, -1)                                          # [b*s, d_in]
        if attribution:
            codes = encode(flat)
            leaf = codes.detach().reshape(b, s, -1).requires_grad_(True)          # [b, s, d_hidden]
            x_hat = sae.decode(leaf.reshape(b * s, -1))
            err = (flat.float() - x_hat).detach().reshape(b, s, -1).requires_grad_(True)  # [b, s, d_in]
            if record is not None:
                record.leaves[name], record.errors[name] = leaf, err
            new = (x_hat + err.reshape(b * s, -1)).to(act.dtype).reshape(act.shape)
        elif edit is not None:
            codes = encode(flat)
            edited = edit(codes.reshape(b, s, -1)).reshape(b * s, -1)
            delta = sae.decode(edited) - sae.decode(codes)                     # [b*s, d_in], 0 where unchanged
            new = act + delta.to(act.dtype).reshape(act.shape)
        elif mode == "read":
            encode(flat)
            return act
        else:
            return splice_hook(lambda f: sae.decode(encode(f)), mode, keep)(act, hook)
        if keep is not None:
            k = keep.to(act.device).reshape(b, s, *([1] * (act.ndim - 2)))
            new = torch.where(k, act, new)
        return new

    return hook


# ------------------------------------------------------------------------------------- public API

@contextlib.contextmanager
def splice(model: Any, saes: Mapping[str, Any], mode: str | Mapping[str, str] = "sae", *,
           keep: Tensor | None = None, edits: Mapping[str, Edit] | None = None,
           attribution: bool = False) -> Iterator[Spliced]:
    """Within the block, every forward pass of `model` runs with dictionary `saes[hook]` spliced in at each hook
    (`mode`: one for all or {hook: mode}; `edits`: {hook: codes edit}, error-preserving; `attribution`: codes and
    errors as gradient leaves). Yields a `Spliced` holding what the hooks saw in the latest pass.

        with splice(model, {"blocks.1.hook_resid_post": sae}, mode="sae") as s:
            logits = model(tokens)          # s.codes["blocks.1.hook_resid_post"]: [batch, seq, d_hidden]
    """
    missing = [h for h in saes if h not in model.hook_dict]
    if missing:
        from training.hooks import describe_valid_hooks
        raise UserError(f"the model has no hook {missing[0]!r}; valid hooks: "
                        f"{describe_valid_hooks(list(model.hook_dict))}")
    record = Spliced()
    hooks = []
    for name, sae in saes.items():
        m = mode if isinstance(mode, str) else mode.get(name, "sae")
        if sae is None and (m != "zero" or attribution or (edits and name in edits)):
            raise ValueError(f"hook {name}: mode {m!r} needs a dictionary")
        hooks.append((name, dictionary_hook(name, sae, m, keep=keep, edit=(edits or {}).get(name),
                                            attribution=attribution, record=record)))
    with model.hooks(fwd_hooks=hooks):
        yield record


def run_with_saes(model: Any, tokens: Tensor, saes: Mapping[str, Any], mode: str | Mapping[str, str] = "sae",
                  **kw: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """(logits [batch, seq, vocab], {hook: codes [batch, seq, d_hidden]}) of `model` on tokens [batch, seq] with
    `saes` spliced in (see `splice`; keyword arguments go to it). Differentiable when grad is enabled."""
    with splice(model, saes, mode, **kw) as record:
        logits = model(tokens, return_type="logits")
    return logits, record.codes


def ablate_features(features: Sequence[int] | Tensor) -> Edit:
    """Edit setting the codes of `features` to 0 at every position of every sequence."""
    def edit(codes: Tensor) -> Tensor:
        out = codes.clone()
        out[..., torch.as_tensor(features, dtype=torch.long, device=codes.device)] = 0
        return out
    return edit


def ablate_each(features: Sequence[int] | Tensor) -> Edit:
    """Edit for a batch of copies of one text: sequence i has feature features[i] set to 0 at every position
    (a negative id: nothing changed in that sequence)."""
    def edit(codes: Tensor) -> Tensor:
        ids = torch.as_tensor(features, dtype=torch.long, device=codes.device)        # [batch]
        if len(ids) != codes.shape[0]:
            raise ValueError(f"{len(ids)} features for a batch of {codes.shape[0]}")
        rows = torch.nonzero(ids >= 0).flatten()
        out = codes.clone()
        out[rows, :, ids[rows]] = 0
        return out
    return edit
