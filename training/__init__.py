"""SAE toolkit: dump language-model activations to disk, train sweeps of sparse autoencoders on them."""

__version__ = "0.1.0"


def load_sweep(path, device="cpu", verify=True, trainable=False):
    """The dictionaries of a sweep folder, {l1 penalty (float) or k (int): module} in eval mode without gradients
    (`trainable=True` for trainable ones), checked against sweep.json (`verify=False` skips the checksum and norm
    checks); `.member(0.46)` picks the nearest key. See training.sweep_files."""
    from training.sweep_files import load_sweep as _load
    return _load(path, device, verify, trainable)


def load_dictionary(path, device="cpu", trainable=False):
    """A dictionary saved by SAELens, sparsify or dictionary_learning (folder or hf:OWNER/REPO/PATH) as this
    toolkit's module, with the hook and model it was trained for; see training.pretrained."""
    from training.pretrained import load_dictionary as _load
    return _load(path, device, trainable)


def open_hook(path, hook=None):
    """One hook's activation chunks in a dataset folder; see training.chunks."""
    from training.chunks import open_hook as _open
    return _open(path, hook)
