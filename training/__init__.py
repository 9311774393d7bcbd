"""SAE toolkit: dump language-model activations to disk, train sweeps of sparse autoencoders on them."""

__version__ = "0.1.0"
