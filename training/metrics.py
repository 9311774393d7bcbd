"""Evaluation metrics for sparse autoencoders: reconstruction, sparsity, dictionary comparison, splicing.

Conventions (n tokens, d activation dims, h dictionary features):
- `x [n, d]` the true activations, `x_hat [n, d]` the SAE reconstruction, `codes [n, h]` the feature
  activations; a feature is *active* on a token when its code is non-zero (`codes != 0`).
- Every scalar is returned as a Python float, accumulated in float64.
- Per-token means ("mean over tokens") weight every token equally; pooled ratios (explained variance)
  divide pooled sums, they are not means of per-token ratios.
- The streaming accumulators (`ReconstructionStats`, `SparsityStats`, `EvalStats`) give the same
  numbers as the one-shot functions on the concatenated data, up to float64 summation order (relative
  differences ~1e-15); counts (L0, densities, dead features) are exactly equal. `SpliceStats` sums
  the same per-position values, but the model's float32 logits may differ slightly with batch shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from training.sae_hooks import splice_hook  # the splice hook lives with the other hook operations

_EPS = 1e-12
"""Floor on norms in denominators (cosine similarity, norm ratio, dictionary cosines)."""


# ----------------------------------------------------------------------------- reconstruction


def _check_pair(x: Tensor, x_hat: Tensor) -> None:
    """Raise unless x and x_hat are both [n, d] with the same shape."""
    if x.ndim != 2 or x.shape != x_hat.shape:
        raise ValueError(f"expected x and x_hat of the same shape [n, d], got {tuple(x.shape)} and {tuple(x_hat.shape)}")


def mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of the squared L2 error: (1/n) sum_t ||x_t - x_hat_t||^2 (summed over d, not averaged).

    The one meaning of "mse" in this toolkit: SAELens' evals (>= 6.54) "mse", SAEBench core's and the SAE training
    loss term (sweep.json, metrics.jsonl). `mse_per_element` is this / d (torch's mse_loss).
    """
    _check_pair(x, x_hat)
    return ((x.double() - x_hat.double()) ** 2).sum(-1).mean().item()


def mse_per_element(x: Tensor, x_hat: Tensor) -> float:
    """Per-element mean squared error: sum_{t,j} (x_tj - x_hat_tj)^2 / (n * d) (= mse / d)."""
    _check_pair(x, x_hat)
    return ((x.double() - x_hat.double()) ** 2).mean().item()


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance explained: 1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean_t(x)||^2.

    Centred on the mean over tokens (not on zero); numerator and denominator are pooled over all
    tokens and dims. 1 is perfect, 0 is as good as predicting the mean, it can be negative.
    """
    _check_pair(x, x_hat)
    x64 = x.double()
    sse = ((x64 - x_hat.double()) ** 2).sum()
    total = ((x64 - x64.mean(0)) ** 2).sum()
    return (1.0 - sse / total).item()


def normalized_mse(x: Tensor, x_hat: Tensor) -> float:
    """Normalised MSE (Gao et al. 2024): sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean_t(x)||^2 = 1 - explained variance."""
    return 1.0 - explained_variance(x, x_hat)


def cosine_similarity(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of <x_t, x_hat_t> / (max(||x_t||, eps) * max(||x_hat_t||, eps))."""
    _check_pair(x, x_hat)
    return _per_token_cosine(x, x_hat).mean().item()


def norm_ratio(x: Tensor, x_hat: Tensor) -> float:
    """Shrinkage, SAELens' "l2_ratio": mean over tokens of ||x_hat_t|| / ||x_t||, with ||x_t|| < 1e-4 replaced by 1
    (below 1: the SAE shrinks norms)."""
    _check_pair(x, x_hat)
    return _per_token_norm_ratio(x, x_hat).mean().item()


def relative_reconstruction_bias(x: Tensor, x_hat: Tensor) -> float:
    """Relative reconstruction bias (Rajamanoharan et al. 2024, eq. 10; SAELens, SAEBench):
    mean_t ||x_hat_t||^2 / mean_t <x_t, x_hat_t> (1: unbiased; below 1: shrinkage), pooled over tokens."""
    _check_pair(x, x_hat)
    x64, y64 = x.double(), x_hat.double()
    return ((y64 ** 2).sum(-1).mean() / (x64 * y64).sum(-1).mean()).item()


def _per_token_cosine(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-token cosine similarity [n], float64."""
    x64, y64 = x.double(), x_hat.double()
    denom = x64.norm(dim=-1).clamp_min(_EPS) * y64.norm(dim=-1).clamp_min(_EPS)
    return (x64 * y64).sum(-1) / denom


_SMALL_NORM = 1e-4
"""Input norms below this count as 1 in the norm ratio (SAELens' l2_ratio)."""


def _per_token_norm_ratio(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-token ||x_hat_t|| / ||x_t|| [n], float64 (||x_t|| < 1e-4 taken as 1, as SAELens does)."""
    norm_in = x.double().norm(dim=-1)
    return x_hat.double().norm(dim=-1) / torch.where(norm_in.abs() < _SMALL_NORM, torch.ones_like(norm_in), norm_in)


# ----------------------------------------------------------------------------- sparsity


def l0(codes: Tensor) -> float:
    """Mean over tokens of the number of active features: (1/n) sum_t #{i : codes_ti != 0}."""
    return (codes != 0).sum(-1).double().mean().item()


def l1(codes: Tensor) -> float:
    """Mean over tokens of the L1 norm of the codes: (1/n) sum_t sum_i |codes_ti| (no decoder-norm weighting)."""
    return codes.double().abs().sum(-1).mean().item()


def feature_density(codes: Tensor) -> Tensor:
    """Density [h] float64: fraction of the n tokens on which each feature is active, #{t : codes_ti != 0} / n."""
    return (codes != 0).sum(0).double() / codes.shape[0]


def dead_features(density: Tensor) -> Tensor:
    """Bool mask [h] of features that never fired over the evaluated tokens (density == 0)."""
    return density == 0


def dense_features(density: Tensor, threshold: float = 0.1) -> Tensor:
    """Bool mask [h] of features active on more than `threshold` of the tokens (density > threshold)."""
    return density > threshold


class DensityHistogram(NamedTuple):
    """Histogram of log10 feature density; dead features (log10 0 = -inf) are counted apart in n_dead."""

    counts: Tensor
    """[bins] int64: number of live features per bin."""
    edges: Tensor
    """[bins + 1] float64: bin edges in log10 density."""
    n_dead: int
    """Number of features with density 0, not in `counts`."""


def log_density_histogram(
    density: Tensor, bins: int | Tensor = 50, log10_range: tuple[float, float] = (-8.0, 0.0)
) -> DensityHistogram:
    """Histogram of log10(density) of the live features; dead ones go to n_dead.

    `bins` is a number of equal bins over `log10_range` or a tensor of increasing edges. Bins are
    [e_k, e_{k+1}) except the last, which includes its right edge; live values outside the edges
    are clamped into the first / last bin, so sum(counts) + n_dead == h.
    """
    dead = dead_features(density)
    if isinstance(bins, int):
        edges = torch.linspace(log10_range[0], log10_range[1], bins + 1, dtype=torch.float64)
    else:
        edges = bins.detach().to("cpu", torch.float64)
    logd = density[~dead].detach().to("cpu", torch.float64).log10()
    idx = torch.bucketize(logd, edges, right=True) - 1  # e_k <= v < e_{k+1} -> k
    idx = idx.clamp(0, len(edges) - 2)
    counts = torch.bincount(idx, minlength=len(edges) - 1)
    return DensityHistogram(counts=counts, edges=edges, n_dead=int(dead.sum()))


# ----------------------------------------------------------------------------- streaming accumulators


@dataclass
class ReconstructionStats:
    """Streaming reconstruction metrics over batches, in float64 with bounded memory (O(d)).

    Explained variance needs the total variance around the global mean; the running (count, mean,
    sum of squared deviations) are merged per batch with Chan et al.'s parallel formula
    M2 = M2_a + M2_b + ||mean_b - mean_a||^2 * n_a n_b / (n_a + n_b), which is numerically stable
    (unlike sum(x^2) - n mean^2), plus running sums of the squared error, cosines and norm ratios.
    """

    n: int = 0
    """Number of tokens seen."""
    d: int = 0
    """Activation dimension (set by the first update)."""
    mean: Tensor | None = None
    """[d] float64 running mean of x."""
    m2: float = 0.0
    """Running sum_t ||x_t - mean||^2."""
    sse: float = 0.0
    """Running sum_t ||x_t - x_hat_t||^2."""
    sum_cos: float = 0.0
    """Running sum of per-token cosine similarities."""
    sum_norm_ratio: float = 0.0
    """Running sum of per-token norm ratios ||x_hat_t|| / ||x_t||."""
    sum_norm_in: float = 0.0
    """Running sum of ||x_t||."""
    sum_norm_out: float = 0.0
    """Running sum of ||x_hat_t||."""
    sum_out_sq: float = 0.0
    """Running sum of ||x_hat_t||^2."""
    sum_dot: float = 0.0
    """Running sum of <x_t, x_hat_t>."""

    def update(self, x: Tensor, x_hat: Tensor) -> "ReconstructionStats":
        """Add a batch x, x_hat [n_b, d]; returns self."""
        _check_pair(x, x_hat)
        n_b = x.shape[0]
        if n_b == 0:
            return self
        x64 = x.detach().double()
        mean_b = x64.mean(0)
        m2_b = ((x64 - mean_b) ** 2).sum().item()
        if self.mean is None:
            self.d, self.mean, self.m2 = x.shape[1], mean_b, m2_b
        else:
            if x.shape[1] != self.d:
                raise ValueError(f"dimension changed from {self.d} to {x.shape[1]}")
            delta = mean_b - self.mean
            tot = self.n + n_b
            self.m2 += m2_b + (delta**2).sum().item() * self.n * n_b / tot
            self.mean = self.mean + delta * (n_b / tot)
        self.n += n_b
        self.sse += ((x64 - x_hat.detach().double()) ** 2).sum().item()
        self.sum_cos += _per_token_cosine(x.detach(), x_hat.detach()).sum().item()
        self.sum_norm_ratio += _per_token_norm_ratio(x.detach(), x_hat.detach()).sum().item()
        y64 = x_hat.detach().double()
        self.sum_norm_in += x64.norm(dim=-1).sum().item()
        self.sum_norm_out += y64.norm(dim=-1).sum().item()
        self.sum_out_sq += (y64 ** 2).sum().item()
        self.sum_dot += (x64 * y64).sum().item()
        return self

    def compute(self) -> dict[str, float]:
        """Return, in SAELens / SAEBench names: mse (per token), mse_per_element, explained_variance,
        normalized_mse, cossim (mean cosine similarity), l2_ratio (mean norm ratio), l2_norm_in, l2_norm_out (mean
        norms), relative_reconstruction_bias, n_tokens."""
        if self.n == 0:
            raise ValueError("no tokens seen")
        ev = 1.0 - self.sse / self.m2 if self.m2 > 0 else float("nan")
        return {
            "mse": self.sse / self.n,
            "mse_per_element": self.sse / (self.n * self.d),
            "explained_variance": ev,
            "normalized_mse": 1.0 - ev,
            "cossim": self.sum_cos / self.n,
            "l2_ratio": self.sum_norm_ratio / self.n,
            "l2_norm_in": self.sum_norm_in / self.n,
            "l2_norm_out": self.sum_norm_out / self.n,
            "relative_reconstruction_bias": self.sum_out_sq / self.sum_dot if self.sum_dot else float("nan"),
            "n_tokens": float(self.n),
        }


@dataclass
class SparsityStats:
    """Streaming sparsity metrics over batches: O(h) memory (per-feature firing counts, int64)."""

    dense_threshold: float = 0.1
    """Density above which a feature counts as dense."""
    n: int = 0
    """Number of tokens seen."""
    active_total: int = 0
    """Total number of (token, feature) activations, for L0."""
    l1_total: float = 0.0
    """Running sum over tokens of sum_i |codes_ti|."""
    fire_counts: Tensor | None = None
    """[h] int64: tokens on which each feature was active."""

    def update(self, codes: Tensor) -> "SparsityStats":
        """Add a batch of codes [n_b, h]; returns self."""
        codes = codes.detach()
        active = codes != 0
        counts = active.sum(0).to("cpu", torch.int64)
        if self.fire_counts is None:
            self.fire_counts = counts
        else:
            if counts.shape != self.fire_counts.shape:
                raise ValueError(f"number of features changed from {self.fire_counts.shape[0]} to {counts.shape[0]}")
            self.fire_counts += counts
        self.n += codes.shape[0]
        self.active_total += int(counts.sum())
        self.l1_total += codes.double().abs().sum().item()
        return self

    def feature_density(self) -> Tensor:
        """Density [h] float64 over all tokens seen (as `feature_density` on the concatenated codes)."""
        if self.fire_counts is None or self.n == 0:
            raise ValueError("no tokens seen")
        return self.fire_counts.double() / self.n

    def compute(self) -> dict[str, float]:
        """Return l0, l1 (mean sum of codes per token, SAEBench core's name), n_dead, frac_dead, n_dense, frac_dense,
        n_features, n_tokens."""
        density = self.feature_density()
        h = density.shape[0]
        n_dead = int(dead_features(density).sum())
        n_dense = int(dense_features(density, self.dense_threshold).sum())
        return {
            "l0": self.active_total / self.n,
            "l1": self.l1_total / self.n,
            "n_dead": float(n_dead),
            "frac_dead": n_dead / h,
            "n_dense": float(n_dense),
            "frac_dense": n_dense / h,
            "n_features": float(h),
            "n_tokens": float(self.n),
        }


@dataclass
class EvalStats:
    """Reconstruction and sparsity accumulators updated together."""

    reconstruction: ReconstructionStats = field(default_factory=ReconstructionStats)
    """Reconstruction accumulator."""
    sparsity: SparsityStats = field(default_factory=SparsityStats)
    """Sparsity accumulator."""

    def update(self, x: Tensor, x_hat: Tensor, codes: Tensor) -> "EvalStats":
        """Add a batch x, x_hat [n_b, d] and codes [n_b, h]; returns self."""
        if codes.shape[0] != x.shape[0]:
            raise ValueError(f"codes has {codes.shape[0]} rows, x has {x.shape[0]}")
        self.reconstruction.update(x, x_hat)
        self.sparsity.update(codes)
        return self

    def compute(self) -> dict[str, float]:
        """Return the union of both accumulators' metrics."""
        return {**self.reconstruction.compute(), **self.sparsity.compute()}


# ----------------------------------------------------------------------------- between dictionaries


def _unit_rows(a: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (norms floored at eps), float64."""
    a64 = a.detach().double()
    return a64 / a64.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise cosine similarities [n_a, n_b] between rows of a [n_a, d] and b [n_b, d], float64."""
    return _unit_rows(a) @ _unit_rows(b).T


def mmcs(a: Tensor, b: Tensor, chunk_size: int = 4096) -> float:
    """Mean max cosine similarity from a to b: (1/n_a) sum_i max_j cos(a_i, b_j).

    Directional: how well each row of a is covered by some row of b (mmcs(a, b) != mmcs(b, a)).
    Signed cosine (features are directions, not lines). Computed in row chunks of a.
    """
    bu = _unit_rows(b).to(a.device)
    au = _unit_rows(a)
    maxes = [(au[i : i + chunk_size] @ bu.T).max(dim=1).values for i in range(0, au.shape[0], chunk_size)]
    return torch.cat(maxes).mean().item()


def mmcs_both(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Both directions: (mmcs(a, b), mmcs(b, a))."""
    return mmcs(a, b), mmcs(b, a)


class Matching(NamedTuple):
    """Result of a one-to-one matching of rows of a to rows of b."""

    pairs: Tensor
    """[k, 2] int64 (row of a, row of b), k = min(n_a, n_b), sorted by row of a."""
    cosines: Tensor
    """[k] float64 cosine similarity of each matched pair."""
    frac_matched: float
    """Fraction of a's n_a rows matched with cosine >= threshold."""


def hungarian_match(a: Tensor, b: Tensor, threshold: float = 0.9) -> Matching:
    """One-to-one matching maximising the total cosine similarity (scipy linear_sum_assignment).

    Solves max over injective maps pi of sum_i cos(a_i, b_pi(i)) on the [n_a, n_b] cosine matrix;
    frac_matched = #{matched pairs with cos >= threshold} / n_a (rows of a left unmatched when
    n_a > n_b count as unmatched). O(n^3): fine up to a few thousand rows.
    """
    from scipy.optimize import linear_sum_assignment

    cos = cosine_matrix(a.cpu(), b.cpu()).numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    pairs = torch.stack([torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)], dim=1)
    cosines = torch.as_tensor(cos[rows, cols], dtype=torch.float64)
    frac = float((cosines >= threshold).sum()) / a.shape[0] if a.shape[0] else float("nan")
    return Matching(pairs=pairs, cosines=cosines, frac_matched=frac)


# ----------------------------------------------------------------------------- downstream: splicing


def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-position next-token cross-entropy [batch, seq-1]: -log softmax(logits[:, t])[tokens[:, t+1]]."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1)


def kl_div(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Per-position KL(p || q) [batch, seq] = sum_v p_v (log p_v - log q_v), p = softmax(logits_p), q = softmax(logits_q)."""
    logp = logits_p.float().log_softmax(-1)
    logq = logits_q.float().log_softmax(-1)
    return torch.nn.functional.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)


def _position_mask(batch: int, seq: int, exclude_positions: Sequence[int], device: torch.device) -> Tensor:
    """Bool mask [batch, seq], False at the excluded positions (negative indices count from the end)."""
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    for p in exclude_positions:
        mask[:, p] = False
    return mask


SPLICE_NAMES = {"ce_clean": "ce_loss_without_sae", "ce_spliced": "ce_loss_with_sae", "ce_zero": "ce_loss_with_ablation",
                "ce_with_error": "ce_loss_with_error", "kl_spliced": "kl_div_with_sae", "kl_zero": "kl_div_with_ablation",
                "kl_with_error": "kl_div_with_error"}
"""The names SpliceStats sums under -> the names it reports (SAEBench core's, where it has one)."""


@dataclass
class SpliceStats:
    """Streaming splice metrics: sums of per-position CE and KL over batches (see `splice_losses`)."""

    n_ce: int = 0
    """Number of positions entering the CE averages."""
    n_kl: int = 0
    """Number of positions entering the KL averages."""
    sums: dict[str, float] = field(default_factory=dict)
    """Running float64 sums: ce_clean, ce_spliced, ce_zero, ce_with_error, kl_spliced, kl_zero, kl_with_error."""

    @torch.no_grad()
    def update(
        self,
        model: Any,
        tokens: Tensor,
        hook_name: str,
        reconstruct: Callable[[Tensor], Tensor],
        exclude_positions: Sequence[int] = (),
        splice_excluded: bool = True,
    ) -> "SpliceStats":
        """Run the clean, spliced, zero-ablated and spliced-with-error passes on tokens [batch, seq]; returns self."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got {tuple(tokens.shape)}")
        b, s = tokens.shape
        mask = _position_mask(b, s, exclude_positions, tokens.device)  # [batch, seq]
        keep = None if splice_excluded else ~mask
        ce_mask, kl_mask = mask[:, :-1], mask

        def run(mode: str | None) -> Tensor:
            """Logits [batch, seq, vocab] of one pass; mode None is the clean run."""
            hooks = [] if mode is None else [(hook_name, splice_hook(reconstruct, mode, keep))]
            return model.run_with_hooks(tokens, return_type="logits", fwd_hooks=hooks)

        clean = run(None)
        self._add("ce_clean", next_token_ce(clean, tokens), ce_mask)
        for mode, name in (("sae", "spliced"), ("zero", "zero"), ("error", "with_error")):
            logits = run(mode)
            self._add(f"ce_{name}", next_token_ce(logits, tokens), ce_mask)
            self._add(f"kl_{name}", kl_div(clean, logits), kl_mask)
        self.n_ce += int(ce_mask.sum())
        self.n_kl += int(kl_mask.sum())
        return self

    def _add(self, key: str, values: Tensor, mask: Tensor) -> None:
        """Add the masked float64 sum of values to sums[key]."""
        self.sums[key] = self.sums.get(key, 0.0) + values.double()[mask.to(values.device)].sum().item()

    def compute(self) -> dict[str, float]:
        """Return the averages in SAEBench core's names (`SPLICE_NAMES`) and ce_loss_score, kl_div_score, ce_delta
        (see `splice_losses`)."""
        if self.n_ce == 0 or self.n_kl == 0:
            raise ValueError("no positions to average over")
        out = {SPLICE_NAMES.get(k, k): v / (self.n_ce if k.startswith("ce_") else self.n_kl)
               for k, v in self.sums.items()}
        clean, zero, spliced = out["ce_loss_without_sae"], out["ce_loss_with_ablation"], out["ce_loss_with_sae"]
        out["ce_loss_score"] = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
        if "kl_div_with_ablation" in out:
            kl_zero = out["kl_div_with_ablation"]
            out["kl_div_score"] = (kl_zero - out["kl_div_with_sae"]) / kl_zero if kl_zero != 0 else float("nan")
        out["ce_delta"] = spliced - clean
        out["n_positions_ce"] = float(self.n_ce)
        out["n_positions_kl"] = float(self.n_kl)
        return out


def splice_losses(
    model: Any,
    tokens: Tensor,
    hook_name: str,
    reconstruct: Callable[[Tensor], Tensor],
    exclude_positions: Sequence[int] = (),
    splice_excluded: bool = True,
) -> dict[str, float]:
    """Downstream loss of splicing an SAE into a TransformerLens model at hook_name.

    model: a `TransformerBridge` (or HookedTransformer), in eval mode; tokens [batch, seq].
    The activation at hook_name, [batch, seq, *rest] (e.g. resid [b, s, d] or attn.hook_z
    [b, s, heads, d_head]), is flattened to [batch*seq, prod(rest)] for `reconstruct` and reshaped back.
    Four forward passes, activation replaced by: nothing (clean), reconstruct(a) (spliced), zeros
    (zero), reconstruct(a) + (a - reconstruct(a)).detach() (with_error: the exact activation back).
    Returns (means over positions, float64; SAEBench core's names):
    - ce_loss_without_sae (clean), ce_loss_with_sae (spliced), ce_loss_with_ablation (zero), ce_loss_with_error:
      next-token cross-entropy, CE = mean over (b, t) of -log softmax(logits[b, t])[tokens[b, t+1]], t = 0..seq-2;
    - ce_loss_score = (CE_zero - CE_spliced) / (CE_zero - CE_clean) (1 perfect, 0 as bad as zero-ablation;
      nan if CE_zero == CE_clean); ce_delta = CE_spliced - CE_clean;
    - kl_div_with_sae, kl_div_with_ablation, kl_div_with_error: KL(clean || run) of the next-token distributions,
      mean over positions t = 0..seq-1; kl_div_score = (KL_zero - KL_spliced) / KL_zero (SAELens; 1 perfect);
    - n_positions_ce, n_positions_kl.
    exclude_positions (e.g. (0,) for BOS) drops those positions t from both averages (a CE term at t
    is the prediction made at t); with splice_excluded=False they also keep their clean activation
    in the patched runs. `reconstruct` runs under torch.no_grad; its output is cast to the activation dtype.
    """
    return SpliceStats().update(model, tokens, hook_name, reconstruct, exclude_positions, splice_excluded).compute()
