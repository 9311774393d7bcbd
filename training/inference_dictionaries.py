"""Inference-only dictionaries of architectures this toolkit loads but does not train: JumpReLU (also BatchTopK at
inference, one threshold for every latent) and Gated. Same parameter names and shapes as training/dictionary.py.

Maths (x: [n, d_in]; encoder, decoder: [d_hidden, d_in]; center: [d_in]):
    JumpReLU  pre   = (x - center) @ encoder.T + encoder_bias
              codes = ReLU(pre) * (pre > threshold)                                   (SAELens JumpReLUSAE.encode)
    Gated     x_enc = (x - center) @ encoder.T
              codes = (x_enc + gate_bias > 0) * ReLU(x_enc * exp(r_mag) + mag_bias)   (SAELens GatedSAE.encode)
    both      x_hat = codes @ decoder + center
"""

from __future__ import annotations

from torch import Tensor, nn


class _Inference(nn.Module):
    """Parameters held as given, decode and forward shared by the inference-only dictionaries."""

    def _set(self, **tensors: Tensor) -> None:
        """Register each tensor as a frozen parameter (a copy)."""
        for name, t in tensors.items():
            setattr(self, name, nn.Parameter(t.detach().clone(), requires_grad=False))
        self.d_hidden, self.d_in = self.decoder.shape
        self.tied = False

    def params(self) -> dict[str, Tensor]:
        """{name: parameter}."""
        return dict(self.named_parameters())

    def decode(self, codes: Tensor) -> Tensor:
        """x_hat: [n, d_in] = codes @ decoder + center."""
        return codes @ self.decoder + self.center

    def predict(self, x: Tensor) -> Tensor:
        """x_hat = decode(encode(x))."""
        return self.decode(self.encode(x))

    def forward(self, x: Tensor) -> Tensor:
        """Same as `predict`."""
        return self.predict(x)


class JumpReLUDictionary(_Inference):
    """JumpReLU dictionary (Rajamanoharan et al. 2024), inference only; a BatchTopK one with one shared threshold."""

    architecture = "jumprelu"

    def __init__(self, center: Tensor, encoder: Tensor, encoder_bias: Tensor, decoder: Tensor, threshold: Tensor):
        super().__init__()
        self._set(center=center, encoder=encoder, encoder_bias=encoder_bias, decoder=decoder, threshold=threshold)

    def encode(self, x: Tensor) -> Tensor:
        """codes: [n, d_hidden] = ReLU(pre) * (pre > threshold)."""
        pre = (x - self.center) @ self.encoder.T + self.encoder_bias
        return pre.relu() * (pre > self.threshold).to(pre.dtype)


class GatedDictionary(_Inference):
    """Gated dictionary (Rajamanoharan et al. 2024), inference only: a gate path and a magnitude path sharing one
    encoder matrix."""

    architecture = "gated"

    def __init__(self, center: Tensor, encoder: Tensor, gate_bias: Tensor, mag_bias: Tensor, r_mag: Tensor,
                 decoder: Tensor):
        super().__init__()
        self._set(center=center, encoder=encoder, gate_bias=gate_bias, mag_bias=mag_bias, r_mag=r_mag,
                  decoder=decoder)

    def encode(self, x: Tensor) -> Tensor:
        """codes: [n, d_hidden] = (x_enc + gate_bias > 0) * ReLU(x_enc * exp(r_mag) + mag_bias)."""
        x_enc = (x - self.center) @ self.encoder.T
        gate = (x_enc + self.gate_bias > 0).to(x_enc.dtype)
        return gate * (x_enc * self.r_mag.exp() + self.mag_bias).relu()
