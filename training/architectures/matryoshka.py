"""The Matryoshka BatchTopK architecture (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders"; Nabeshima 2024): BatchTopK codes whose nested prefixes of the dictionary each reconstruct the input.

loss = sum over prefix ends m of MSE(x, codes[:, :m] @ decoder[:m] + center) + aux_coef * aux: the plain sum over
prefixes, as SAELens' MatryoshkaBatchTopKTrainingSAE (dictionary_learning averages them instead, with weights);
the aux-K term on the whole dictionary's residual (SAELens' default). Prefixes: --matryoshka_prefixes, fractions of
the dictionary, by default dictionary_learning's group fractions 1/32, 1/16, 1/8, 1/4, 1/2 + 1/32 accumulated.
Inference, threshold and everything else as BatchTopK (training/architectures/batchtopk.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from training.architectures.batchtopk import BATCHTOPK, BatchTopKAutoencoder, member_state, prefix_ends, transient_bytes
from training.dictionary import INIT_NORM

DEFAULT_PREFIXES = (1 / 32, 3 / 32, 7 / 32, 15 / 32, 1.0)
"""Cumulative fractions of the dictionary (dictionary_learning's MatryoshkaBatchTopKTrainerConfig group_fractions)."""


class MatryoshkaAutoencoder(BatchTopKAutoencoder):
    """Matryoshka BatchTopK dictionary: BatchTopK whose nested prefixes (`prefixes`, fractions of the dictionary)
    each reconstruct; encodes like BatchTopK (one learned threshold)."""

    architecture = "matryoshka"

    def __init__(self, d_in: int, d_hidden: int, k: int, *, prefixes: tuple[float, ...] = DEFAULT_PREFIXES,
                 init_norm: float = INIT_NORM, device=None, dtype=None):
        super().__init__(d_in, d_hidden, k, init_norm=init_norm, device=device, dtype=dtype)
        self.prefixes = tuple(float(p) for p in prefixes)
        prefix_ends(d_hidden, self.prefixes)                                        # checked now

    def prefix_ends(self) -> list[int]:
        """Sizes of the nested dictionaries the loss sums over."""
        return prefix_ends(self.d_hidden, self.prefixes)


def _member_state(keys: Tensor, like: Tensor, matryoshka_prefixes: tuple[float, ...] = DEFAULT_PREFIXES
                  ) -> dict[str, Any]:
    """BatchTopK's member state with the prefix ends of `matryoshka_prefixes` (fractions of the dictionary)."""
    return member_state(keys, like, prefix_ends(like.shape[1], tuple(matryoshka_prefixes)))


def _make_member(d_in: int, d_hidden: int, key: int | None, *, tied: bool = False, init_norm: float = INIT_NORM,
                 device=None, dtype=None) -> MatryoshkaAutoencoder:
    """A fresh member with k = `key` (default prefixes; the ensemble's come from its options)."""
    assert key is not None and not tied, "Matryoshka members need k and are never tied"
    return MatryoshkaAutoencoder(d_in, d_hidden, int(key), init_norm=init_norm, device=device, dtype=dtype)


ARCHITECTURE = dataclasses.replace(
    BATCHTOPK, name="matryoshka", title="Matryoshka", module=MatryoshkaAutoencoder, make_member=_make_member,
    member_state=_member_state, options=("matryoshka_prefixes",),
    transient_bytes=lambda n, batch, d_in, d_hidden, k_max: transient_bytes(n, batch, d_in, d_hidden, k_max,
                                                                            len(DEFAULT_PREFIXES)),
)
MATRYOSHKA = ARCHITECTURE
