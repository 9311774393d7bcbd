"""dictionary_learning peer: StandardTrainer + AutoEncoder, trained by dictionary_learning's own trainSAE loop.

Runs in the side venv .bench_envs/dictionary_learning. `trainSAE(data, trainer_configs, steps, ...)` takes any
iterable of activation batches as `data`, so we hand it our .npy batches in file order (no ActivationBuffer,
no nnsight model). Everything else is the library's: AutoEncoder init (W random columns at norm 0.1,
encoder = W.T, zero biases), StandardTrainer.loss (sum-over-d squared error mean over batch + l1_penalty *
sparsity_scale * mean L1 of f), ConstrainedAdam (unit-norm decoder columns, gradient projection), the LambdaLR
warm-up schedule, trainSAE's normalize_activations=False default (raw space: nothing to fold).

Settings we had to choose: StandardTrainer's defaults warmup_steps=1000 and sparsity_warmup_steps=2000 must
be < steps (the library asserts it); we keep them when they fit and otherwise cap them at 5% and 10% of
the run's steps (keeping the default 1:2 ratio). Override with --options '{"warmup_steps": ..}'.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

OPTIONS = ("normalize_activations", "warmup_steps", "sparsity_warmup_steps", "decay_start", "resample_steps")
"""normalize_activations: trainSAE's flag (default False). True: trainSAE divides inputs by its norm factor
(sqrt of mean ||x||^2 over the first 101 batches, read by a separate pass: our batch iterable restarts at row 0)
and scales the biases back at the end (scale_biases), which makes the saved AutoEncoder take raw inputs
(codes come out multiplied by the factor)."""

DEFAULT_WARMUP, DEFAULT_SPARSITY_WARMUP = 1000, 2000  # StandardTrainer.__init__ defaults (v0.1.0)


def main() -> None:
    a = C.parse_args()
    C.quiet_env()
    import importlib.metadata as md

    from dictionary_learning.dictionary import AutoEncoder
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.training import trainSAE

    bad = set(a.options) - set(OPTIONS)
    if bad:
        raise SystemExit(f"run_dictionary_learning: unknown options {sorted(bad)}; accepted: {OPTIONS}")
    normalize = bool(a.options.get("normalize_activations", False))
    rows = C.open_rows(a.train_file, a.tokens)
    d_in = rows.shape[1]
    steps = C.n_steps(a.tokens, a.batch_size)
    warmup = a.options.get("warmup_steps", C.capped_warmup(DEFAULT_WARMUP, steps, 0.05))
    sparsity_warmup = a.options.get("sparsity_warmup_steps", C.capped_warmup(DEFAULT_SPARSITY_WARMUP, steps, 0.10))
    cfg = {"trainer": StandardTrainer, "dict_class": AutoEncoder, "steps": steps, "activation_dim": d_in,
           "dict_size": a.d_hidden, "layer": 0, "lm_name": "bench-npy", "lr": a.lr, "warmup_steps": warmup,
           "sparsity_warmup_steps": sparsity_warmup, "seed": a.seed, "device": "cpu", "wandb_name": "bench"}
    for key in ("decay_start", "resample_steps"):
        if key in a.options:
            cfg[key] = a.options[key]
    if a.l1 is not None:
        cfg["l1_penalty"] = a.l1
    torch.manual_seed(a.seed)
    with tempfile.TemporaryDirectory(dir=a.out.parent if a.out.parent.exists() else None) as tmp:
        with C.Timer() as tm:
            trainSAE(data=C.Batches(rows, a.batch_size), trainer_configs=[dict(cfg)], steps=steps, use_wandb=False,
                     save_dir=tmp, normalize_activations=normalize, device="cpu", verbose=False)
        state = torch.load(Path(tmp) / "trainer_0" / "ae.pt", map_location="cpu")
        import json
        lib_cfg = json.loads((Path(tmp) / "trainer_0" / "config.json").read_text())["trainer"]
    ae = AutoEncoder(d_in, a.d_hidden)
    ae.load_state_dict(state)
    ae.eval()
    norm_factor = None
    if normalize:  # what trainSAE computed (it does not record it): the same function on the same batches
        from dictionary_learning.training import get_norm_factor
        norm_factor = get_norm_factor(C.Batches(rows, a.batch_size), steps=100)
    weights = {"W_enc": ae.encoder.weight.detach().T.clone(), "b_enc": ae.encoder.bias.detach().clone(),
               "W_dec": ae.decoder.weight.detach().T.clone(), "b_dec": ae.bias.detach().clone()}
    settings = {
        "trainer": "dictionary_learning.trainers.standard.StandardTrainer via dictionary_learning.training.trainSAE",
        "dict_class": "AutoEncoder",
        "data": "our .npy batches in file order as trainSAE's data iterable (no ActivationBuffer, no LLM)",
        "l1_penalty": lib_cfg["l1_penalty"], "l1_default_used": a.l1 is None,
        "sparsity_loss": "l1_penalty * sparsity_scale * mean_b sum_h |f_h| (decoder columns unit norm)",
        "warmup_steps": lib_cfg["warmup_steps"], "sparsity_warmup_steps": lib_cfg["sparsity_warmup_steps"],
        "warmup_choice": (f"library defaults {DEFAULT_WARMUP}/{DEFAULT_SPARSITY_WARMUP} capped at 5%/10% of "
                          f"{steps} steps" if not ({"warmup_steps", "sparsity_warmup_steps"} & set(a.options))
                          else "from --options"),
        "decay_start": lib_cfg["decay_start"], "resample_steps": lib_cfg["resample_steps"],
        "optimizer": "ConstrainedAdam(lr, betas=(0.9, 0.999)) + LambdaLR(get_lr_schedule)",
        "normalize_activations": normalize,
        "input_scaling": ("none (trainSAE default; raw space, nothing to fold)" if not normalize else
                          "x / norm_factor during training; biases scaled back by trainSAE (raw-space weights)"),
        "norm_factor": norm_factor,
        "library_config": {k: v for k, v in lib_cfg.items() if isinstance(v, (int, float, str, bool, type(None)))},
        "options": a.options,
    }
    spec = C.base_spec(a, "dictionary_learning", md.version("dictionary-learning"), "relu", None, True,
                       tm.seconds, settings)
    with torch.no_grad():
        xc = C.check_rows(rows)
        x_hat, f = ae(xc, output_features=True)
        spec["settings"]["rule_check"] = C.check_rule(weights, spec, xc, f, x_hat)
    C.write(a.out, weights, spec)


if __name__ == "__main__":
    main()
