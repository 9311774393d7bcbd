"""SAE toolkit: dump language-model activations to disk, train sweeps of sparse autoencoders on them."""

__version__ = "0.1.0"


def load_sweep(path, device="cpu"):
    """The dictionaries of a sweep folder, {l1 penalty (float) or k (int): module}; see training.sweep."""
    from training.sweep import load_sweep as _load
    return _load(path, device)


def open_hook(path, hook=None):
    """One hook's activation chunks in a dataset folder; see training.chunks."""
    from training.chunks import open_hook as _open
    return _open(path, hook)
