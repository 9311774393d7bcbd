"""SAE toolkit: dump language-model activations to disk, train sweeps of sparse autoencoders on them."""

__version__ = "0.1.0"


def load_sweep(path, device="cpu", verify=True):
    """The dictionaries of a sweep folder, {l1 penalty (float) or k (int): module}, checked against sweep.json
    (`verify=False` skips the checksum and norm checks); see training.sweep_files."""
    from training.sweep_files import load_sweep as _load
    return _load(path, device, verify)


def open_hook(path, hook=None):
    """One hook's activation chunks in a dataset folder; see training.chunks."""
    from training.chunks import open_hook as _open
    return _open(path, hook)
