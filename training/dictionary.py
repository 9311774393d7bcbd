"""Sparse autoencoder maths shared by every architecture, and the base dictionary module.

Each architecture (its module class, loss and fused gradient) lives in training/architectures/<name>.py;
the ReLU-L1 SAE and the TopK SAE below are described here because they share these functions.

Shapes: `x, acts: [n, d_in]`, `codes, pre: [n, d_hidden]`, `encoder, decoder: [d_hidden, d_in]`,
`norms: [d_hidden]` = the L2 norms of the decoder rows.

Maths shared by every code path (modules, the vmap ensemble, its fused kernels):
    pre    = (x - center) @ encoder.T + encoder_bias       (tied L1 SAE: encoder is decoder)
    codes  = ReLU(pre)                                     (L1 SAE)
           = ReLU(pre) on the k entries with the largest pre * norms, 0 elsewhere   (TopK SAE)
    x_hat  = codes @ decoder + center

Normalisations (one convention everywhere):
    MSE = mean over the batch of ||x - x_hat||_2^2 (squared error summed over d_in, not averaged),
          as in Anthropic's "Towards Monosemanticity" and SAELens.
    L1  = mean over the batch of sum_j |codes_j| * ||decoder_j||  (each code weighted by its decoder row's
          norm, Anthropic's April 2024 update and SAELens' standard SAE). total = MSE + l1 * L1.
    aux (TopK only, Gao et al. 2024) = mean over the batch of ||e - e_hat||_2^2 where
          e = x - x_hat (no gradient) and e_hat = (top-k_aux dead pre-activations, ReLU) @ decoder;
          total = MSE + aux_coef * aux, aux_coef = 1/32, and aux is 0 for a model with no dead latent.
Why the L1 cannot be gamed by shrinking codes and growing the decoder: the penalty is on codes times
decoder norms, which is invariant to that rescaling. Decoder rows are therefore free during training
(initialised small, at `init_norm` = 0.1, with the encoder its transpose: relative Adam steps on small
rows are large, so the dictionary learns in few steps). TopK ranks latents by pre * norms, the size of
their contribution, which makes the same rescaling invariance hold for it. `unit_norm_params` folds
the norms into encoder and bias, exactly, so saved dictionaries have unit decoder rows and the codes
are the contributions' sizes. The older recipe (Bricken et al. 2023) instead keeps rows at unit norm:
the gradient component parallel to each row is removed before the step (`project_decoder_grad_`) and
the rows renormalised after it (`normalize_decoder_`); with unit rows both formulations coincide.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]
INIT_NORM = 0.1
"""Initial norm of the decoder rows (and encoder rows, their copy) of a free-norm dictionary."""
PARAM_NAMES = ("center", "encoder", "encoder_bias", "decoder")


# ----------------------------------------------------------------------------- functional maths

def encoder_weight(params: Params) -> Tensor:
    """The [d_hidden, d_in] encoder matrix: the decoder itself for a tied dictionary."""
    return params["encoder"] if "encoder" in params else params["decoder"]


def pre_activations(params: Params, x: Tensor) -> Tensor:
    """pre: [n, d_hidden] = (x - center) @ encoder.T + encoder_bias."""
    return (x - params["center"]) @ encoder_weight(params).T + params["encoder_bias"]


def topk_indices(pre: Tensor, k: int, norms: Tensor | None = None, sorted: bool = True) -> Tensor:
    """idx: [n, k], the latents with the largest pre * norms per row (largest pre when `norms` is None)."""
    score = pre if norms is None else pre * norms
    return score.detach().topk(k, dim=-1, sorted=sorted).indices


def topk_mask_codes(pre: Tensor, k: int, rank_mask: Tensor | None = None, norms: Tensor | None = None) -> Tensor:
    """Dense codes [n, d_hidden]: ReLU(pre) on the k latents with the largest pre * norms, zeros elsewhere.

    `rank_mask: [k]` (0/1) keeps only the first ranks (lets one traced function serve several k).
    """
    idx = topk_indices(pre, k, norms)
    vals = pre.gather(-1, idx).relu()
    if rank_mask is not None:
        vals = vals * rank_mask
    return torch.zeros_like(pre).scatter(-1, idx, vals)


def decode_codes(params: Params, codes: Tensor) -> Tensor:
    """x_hat: [n, d_in] = codes @ decoder + center."""
    return codes @ params["decoder"] + params["center"]


def mse_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over the batch of the squared error summed over d_in."""
    return (x_hat - x).square().sum(-1).mean()


def l1_penalty(codes: Tensor, norms: Tensor | None = None) -> Tensor:
    """Mean over the batch of sum_j |codes_j| * norms_j (norms = 1 when None)."""
    weighted = codes.abs() if norms is None else codes.abs() * norms
    return weighted.sum(-1).mean()


def decoder_norms(params: Params) -> Tensor:
    """norms: [..., d_hidden], the L2 norm of each decoder row (single or stacked params)."""
    return params["decoder"].norm(dim=-1)


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2."""
    return 1 - (x - x_hat).square().sum() / (x - x.mean(0)).square().sum()


def aux_k_loss(params: Params, x: Tensor, x_hat: Tensor, pre: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """Gao et al. aux-K: MSE of the detached residual x - x_hat against its reconstruction from the
    top-k_aux dead latents by pre * norms (decoder only, no center); 0 when `dead: [d_hidden]` is all False."""
    e = (x - x_hat).detach()
    masked = (pre * decoder_norms(params)).masked_fill(~dead, -math.inf)
    idx = masked.detach().topk(min(k_aux, pre.shape[-1]), dim=-1).indices
    vals = pre.gather(-1, idx).relu() * dead[idx].to(pre.dtype)
    z = torch.zeros_like(pre).scatter(-1, idx, vals)
    e_hat = z @ params["decoder"]
    return mse_loss(e, e_hat) * dead.any().to(pre.dtype)


def project_decoder_grad_(decoder: Tensor, grad: Tensor) -> Tensor:
    """Remove from `grad` (in place) its component parallel to each decoder row ([..., d_hidden, d_in])."""
    return grad.addcmul_((grad * decoder).sum(-1, keepdim=True), decoder, value=-1)


def normalize_decoder_(decoder: Tensor) -> Tensor:
    """Rescale each decoder row ([..., d_hidden, d_in]) to unit L2 norm, in place."""
    return decoder.div_(decoder.norm(dim=-1, keepdim=True))


@torch.no_grad()
def unit_norm_params(params: Params, code_biases: tuple[str, ...] = ("encoder_bias",)) -> Params:
    """Equivalent params with unit decoder rows: decoder / norms, encoder and the `code_biases` (the architecture's
    per-latent params in code units, `Architecture.code_biases`) * norms (copies).

    Exact for every architecture: pre and codes scale by the norms (ReLU, a gate's sign and the TopK ranking by
    pre * norms are unchanged), and codes @ decoder is unchanged. A tied dictionary is returned as is
    (it is trained with unit rows). Works on single ([h, d]) and stacked ([N, h, d]) params.
    """
    out = {n: t.detach().clone() for n, t in params.items()}
    if "encoder" not in params:
        return out
    norms = decoder_norms(params).clamp_min(1e-12)                             # [..., h]
    out["decoder"] = params["decoder"] / norms.unsqueeze(-1)
    out["encoder"] = params["encoder"] * norms.unsqueeze(-1)
    for name in code_biases:
        out[name] = params[name] * norms
    return out


def random_unit_rows(n_rows: int, dim: int, *, device=None, dtype=None) -> Tensor:
    """[n_rows, dim] rows drawn uniformly on the unit sphere (global torch RNG)."""
    w = torch.randn(n_rows, dim, device=device, dtype=dtype)
    return w / w.norm(dim=-1, keepdim=True)


def geometric_median(points: Tensor, *, n_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to `points: [n, d]`."""
    p = points.double()
    y = p.mean(0)
    for _ in range(n_iter):
        w = 1 / (p - y).norm(dim=-1).clamp_min(1e-12)
        y_new = (w[:, None] * p).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * max(1.0, y.norm().item())
        y = y_new
        if done:
            break
    return y.to(points.dtype)


def init_center_value(acts: Tensor, method: Literal["mean", "geometric_median"] = "mean") -> Tensor:
    """The data-derived initial `center: [d_in]` from `acts: [n, d_in]`."""
    if method == "mean":
        return acts.double().mean(0).to(acts.dtype)
    if method == "geometric_median":
        return geometric_median(acts)
    raise ValueError(f"unknown center init method {method!r} (want 'mean' or 'geometric_median')")


# ----------------------------------------------------------------------------- modules

class Dictionary(nn.Module):
    """Parameters and methods shared by every architecture's dictionary module (training/architectures/)."""

    linear_scoring = True
    """Whether the codes are ReLU(encoder (x - center) + encoder_bias), optionally kept only on the `k` largest
    pre-activations or above `threshold` (per feature or one for all): then analysis tools may score features with
    their own fast kernels on these parameters; an architecture whose encoder has another form sets it False (they
    then call its `encode`)."""

    def _init_params(self, d_in: int, d_hidden: int, tied: bool, init_norm: float, device, dtype) -> None:
        """Random decoder rows of norm `init_norm`, encoder = decoder copy (its transpose in x @ W convention)."""
        self.d_in, self.d_hidden, self.tied = d_in, d_hidden, tied
        decoder = random_unit_rows(d_hidden, d_in, device=device, dtype=dtype) * init_norm
        self.center = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        if not tied:
            self.encoder = nn.Parameter(decoder.clone())
        self.encoder_bias = nn.Parameter(torch.zeros(d_hidden, device=device, dtype=dtype))
        self.decoder = nn.Parameter(decoder)

    def params(self) -> Params:
        """{name: parameter} (no `encoder` entry when tied)."""
        return dict(self.named_parameters())

    def encoder_weight(self) -> Tensor:
        """[d_hidden, d_in] encoder matrix (the decoder when tied)."""
        return encoder_weight(self.params())

    def decode(self, codes: Tensor) -> Tensor:
        """x_hat: [n, d_in] = codes @ decoder + center."""
        return decode_codes(self.params(), codes)

    def predict(self, x: Tensor) -> Tensor:
        """x_hat = decode(encode(x))."""
        return self.decode(self.encode(x))

    def forward(self, x: Tensor) -> Tensor:
        """Same as `predict`."""
        return self.predict(x)

    @torch.no_grad()
    def init_center(self, acts: Tensor, method: Literal["mean", "geometric_median"] = "mean") -> None:
        """Set `center` to the mean or geometric median (Weiszfeld) of `acts: [n, d_in]`."""
        self.center.copy_(init_center_value(acts.to(self.center), method))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (call after each optimiser step)."""
        normalize_decoder_(self.decoder)

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove the gradient component parallel to each decoder row (call before each step)."""
        if self.decoder.grad is not None:
            project_decoder_grad_(self.decoder, self.decoder.grad)


def dictionary_from_params(params: Params, architecture: str, key: float | int | None = None) -> Dictionary:
    """An ordinary module holding (copies of) one member's `params` ({name: tensor}, unstacked); `key`: the member's
    sweep key where its module holds it (TopK's k)."""
    from training.architectures import get
    arch = get(architecture)
    d_hidden, d_in = params["decoder"].shape
    like = params["decoder"]
    if arch.member_key is not None and key is None:
        raise ValueError(f"a {arch.title} dictionary needs its {arch.sweep_param}")
    module = arch.make_member(d_in, d_hidden, key, tied="encoder" not in params, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(params[name])
    return module


def unstack_dictionaries(stacked: Params, architecture: str, keys: Tensor | list | None = None) -> list[Dictionary]:
    """Ordinary modules from stacked params {name: [n_models, ...]} (per-member `keys: [n_models]` where the module
    holds its key, e.g. TopK's k)."""
    n_models = stacked["decoder"].shape[0]
    ks = [None] * n_models if keys is None else (keys.tolist() if isinstance(keys, Tensor) else list(keys))
    return [dictionary_from_params({n: t[i] for n, t in stacked.items()}, architecture, ks[i])
            for i in range(n_models)]


_MOVED = {"SparseLinearAutoencoder": "training.architectures.l1", "l1_loss": "training.architectures.l1",
          "TopKAutoencoder": "training.architectures.topk", "topk_loss": "training.architectures.topk"}
"""Names that moved to their architecture's module, still importable from here."""


def __getattr__(name: str):
    """The moved names of `_MOVED`, imported on first use (the architecture modules import this one)."""
    if name in _MOVED:
        import importlib
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
