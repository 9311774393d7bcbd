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


def splice(model, saes, mode="sae", **kw):
    """Context manager: every forward pass of `model` inside it runs with dictionaries {hook: sae} spliced in
    (mode "sae", "error", "zero" or "read"); see training.sae_hooks."""
    from training.sae_hooks import splice as _splice
    return _splice(model, saes, mode, **kw)


def run_with_saes(model, tokens, saes, mode="sae", **kw):
    """(logits, {hook: codes}) of `model` on tokens with dictionaries {hook: sae} spliced in; see training.sae_hooks."""
    from training.sae_hooks import run_with_saes as _run
    return _run(model, tokens, saes, mode, **kw)
