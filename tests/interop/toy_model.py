"""A tiny next-token model with one TransformerLens-style hook point: the same code runs in the project's venv and in
SAELens' side venv (it needs torch only), so both libraries' evaluation metrics are computed on the same tensors.

It offers what either library calls on a model: `hook_dict`, `hooks(fwd_hooks=...)`, `model(tokens, return_type=...,
loss_per_token=...)`, `run_with_hooks` and `run_with_cache` (prepend_bos, stop_at_layer and the like are ignored).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

Hook = tuple[str, Callable[[Tensor, Any], Tensor]]


def toy_weights(vocab: int, d: int, seed: int) -> dict[str, Tensor]:
    """Random weights: embed [vocab, d], mix [d, d], unembed [d, vocab]."""
    g = torch.Generator().manual_seed(seed)
    return {"embed": torch.randn(vocab, d, generator=g), "mix": torch.randn(d, d, generator=g) / d ** 0.5,
            "unembed": torch.randn(d, vocab, generator=g) / d ** 0.5}


class ToyLM:
    """h = e + tanh(e @ mix) at `hook_name` (e = embed[tokens]), then logits = (causal running mean of h) @ unembed,
    so a change at one position reaches every later prediction."""

    def __init__(self, weights: dict[str, Tensor], hook_name: str):
        self.weights, self.hook_name = weights, hook_name
        self.hook_dict = {hook_name: None}
        self._hooks: list[Hook] = []

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[Hook] = ()) -> Iterator["ToyLM"]:
        """Every forward pass inside the block runs `fwd_hooks`."""
        saved = self._hooks
        self._hooks = saved + list(fwd_hooks)
        try:
            yield self
        finally:
            self._hooks = saved

    def _forward(self, tokens: Tensor, fwd_hooks: Sequence[Hook] = (), cache: dict | None = None) -> Tensor:
        """logits [b, s, vocab]."""
        e = self.weights["embed"][tokens]                                           # [b, s, d]
        h = e + torch.tanh(e @ self.weights["mix"])
        for name, fn in [*self._hooks, *fwd_hooks]:
            if name == self.hook_name:
                h = fn(h, SimpleNamespace(name=name))
        if cache is not None:
            cache[self.hook_name] = h
        positions = torch.arange(1, tokens.shape[1] + 1, dtype=h.dtype)[:, None]   # [s, 1]
        return (h.cumsum(1) / positions) @ self.weights["unembed"]

    def run_with_hooks(self, tokens: Tensor, return_type: str | None = "logits", fwd_hooks: Sequence[Hook] = (),
                       loss_per_token: bool = False, **_: Any) -> Any:
        """TransformerLens' call: logits, the next-token CE ("loss": [b, s-1] per token or its mean) or both."""
        logits = self._forward(tokens, fwd_hooks)
        if return_type == "logits":
            return logits
        logp = logits[:, :-1].log_softmax(-1)
        loss = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        loss = loss if loss_per_token else loss.mean()
        return loss if return_type == "loss" else (logits, loss)

    __call__ = run_with_hooks

    def run_with_cache(self, tokens: Tensor, names_filter: Sequence[str] | None = None,
                       return_type: str | None = "logits", **_: Any) -> tuple[Tensor | None, dict[str, Tensor]]:
        """(logits or None, {hook_name: activation [b, s, d]})."""
        cache: dict[str, Tensor] = {}
        logits = self._forward(tokens, (), cache)
        return (logits if return_type == "logits" else None), cache
