"""SAELens peer: the standard (ReLU + L1) training SAE, trained by SAELens' own SAETrainer.

Runs in the side venv .bench_envs/saelens. We skip only SAELens' LLM/activation-store front end
(LanguageModelSAETrainingRunner): SAETrainer takes any iterator of raw activation batches as its
`data_provider`, so we hand it our .npy batches in file order. Everything else is SAELens' own:
StandardTrainingSAE (init: kaiming-uniform W_dec rows rescaled to norm 0.1, W_enc = W_dec.T, zero biases),
TrainingSAE.training_forward_pass (loss = sum-over-d MSE mean over batch + l1_coefficient * mean over batch of
sum |f_i| * ||W_dec_i||), SAETrainer._train_step (Adam, grad-norm clip 1.0, lr scheduler, coefficient
warm-up), and the config defaults of SAETrainerConfig / StandardTrainingSAEConfig unless noted in the spec.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

OPTIONS = ("normalize_activations", "l1_warm_up_steps", "lr_warm_up_steps", "lr_scheduler_name", "lr_decay_steps",
           "decoder_init_norm", "apply_b_dec_to_input", "adam_beta1", "adam_beta2")
"""Overrides accepted in --options (all default to SAELens' own defaults). normalize_activations:
"none" (default) or "expected_average_only_in" (scale inputs by sqrt(d_in) / mean ||x||, estimated with
SAELens' own ActivationScaler over the first min(n_batches_for_norm_estimate, steps) batches, read separately
so the training stream still starts at row 0; SAETrainer.fit folds the factor back into the weights)."""


def main() -> None:
    a = C.parse_args()
    C.quiet_env()
    import sae_lens
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.training.sae_trainer import SAETrainer

    bad = set(a.options) - set(OPTIONS)
    if bad:
        raise SystemExit(f"run_saelens: unknown options {sorted(bad)}; accepted: {OPTIONS}")
    torch.manual_seed(a.seed)
    rows = C.open_rows(a.train_file, a.tokens)
    d_in = rows.shape[1]

    norm = a.options.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in"):
        raise SystemExit(f"run_saelens: normalize_activations={norm!r} is not supported: only 'none' and "
                         f"'expected_average_only_in' fold back into raw-space weights of the common form")
    sae_kw = {"d_in": d_in, "d_sae": a.d_hidden, "dtype": "float32", "device": "cpu",
              "normalize_activations": norm}
    if a.l1 is not None:
        sae_kw["l1_coefficient"] = a.l1
    for key in ("l1_warm_up_steps", "decoder_init_norm", "apply_b_dec_to_input"):
        if key in a.options:
            sae_kw[key] = a.options[key]
    sae_cfg = StandardTrainingSAEConfig(**sae_kw)
    sae = StandardTrainingSAE(sae_cfg)

    tr_kw = {"total_training_samples": a.tokens, "train_batch_size_samples": a.batch_size, "lr": a.lr,
             "device": "cpu", "autocast": False, "n_checkpoints": 0, "checkpoint_path": None,
             "save_final_checkpoint": False}
    for key in ("lr_warm_up_steps", "lr_scheduler_name", "lr_decay_steps", "adam_beta1", "adam_beta2"):
        if key in a.options:
            tr_kw[key] = a.options[key]
    tr_cfg = SAETrainerConfig(**tr_kw)
    if tr_cfg.lr_end is None:  # LanguageModelSAERunnerConfig.__post_init__ sets this; SAETrainer asserts it
        tr_cfg.lr_end = tr_cfg.lr / 10

    trainer = SAETrainer(cfg=tr_cfg, sae=sae, data_provider=C.batches(rows, a.batch_size), evaluator=None)
    scaling_factor = None
    if norm == "expected_average_only_in":
        n_est = min(tr_cfg.n_batches_for_norm_estimate, C.n_steps(a.tokens, a.batch_size))
        with torch.no_grad():  # SAELens' own estimator, on a separate pass over the first n_est batches
            trainer.activation_scaler.estimate_scaling_factor(d_in, C.batches(rows, a.batch_size), n_est)
        scaling_factor = trainer.activation_scaler.scaling_factor
        print(f"activation scaling factor {scaling_factor:.6g} (from {n_est} batches)", flush=True)
    with C.Timer() as tm:
        sae = trainer.fit()
    print(f"trained {trainer.n_training_steps} steps on {trainer.n_training_samples} rows in {tm.seconds:.1f}s",
          flush=True)
    if trainer.n_training_samples != a.tokens:
        raise RuntimeError(f"SAETrainer consumed {trainer.n_training_samples} rows, expected {a.tokens}")

    sae.eval()
    if sae.cfg.normalize_activations != "none":
        raise RuntimeError(f"SAE still has normalize_activations={sae.cfg.normalize_activations!r} after fit")
    weights = {"W_enc": sae.W_enc.detach().clone(), "b_enc": sae.b_enc.detach().clone(),
               "W_dec": sae.W_dec.detach().clone(), "b_dec": sae.b_dec.detach().clone()}
    settings = {
        "architecture": "standard (StandardTrainingSAE)", "trainer": "sae_lens.training.sae_trainer.SAETrainer.fit",
        "data": "our .npy batches in file order as SAETrainer's data_provider (no ActivationsStore, no LLM)",
        "l1_coefficient": sae.cfg.l1_coefficient, "l1_default_used": a.l1 is None,
        "l1_warm_up_steps": sae.cfg.l1_warm_up_steps, "lp_norm": sae.cfg.lp_norm,
        "sparsity_loss": "l1_coefficient * mean_b sum_h |f_h| * ||W_dec_h|| (decoder norm not constrained)",
        "decoder_init_norm": sae.cfg.decoder_init_norm, "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        "normalize_activations": norm,
        "input_scaling": ("none (SAELens default; raw space, nothing to fold)" if scaling_factor is None else
                          f"x * {scaling_factor:.6g} during training; folded back by SAETrainer.fit "
                          "(fold_activation_norm_scaling_factor)"),
        "scaling_factor": scaling_factor,
        "b_dec_init": "zeros (SAELens v6 default)",
        "optimizer": f"torch.optim.Adam(lr, betas=({tr_cfg.adam_beta1}, {tr_cfg.adam_beta2}))",
        "lr_scheduler": tr_cfg.lr_scheduler_name, "lr_warm_up_steps": tr_cfg.lr_warm_up_steps,
        "lr_decay_steps": tr_cfg.lr_decay_steps, "grad_clip_norm": 1.0, "autocast": tr_cfg.autocast,
        "dead_feature_window": tr_cfg.dead_feature_window, "options": a.options,
        "steps_run": trainer.n_training_steps,
    }
    spec = C.base_spec(a, "saelens", sae_lens.__version__, "relu", None, sae.cfg.apply_b_dec_to_input,
                       tm.seconds, settings)
    with torch.no_grad():
        xc = C.check_rows(rows)
        codes = sae.encode(xc)
        x_hat = sae.decode(codes)
        assert torch.allclose(x_hat, sae(xc)), "SAE.forward disagrees with decode(encode(x))"
        # and the training forward pass the loss was computed on
        out = sae.training_forward_pass(TrainStepInput(sae_in=xc, dead_neuron_mask=None,
                                                      coefficients={"l1": sae.cfg.l1_coefficient},
                                                      n_training_steps=0, is_logging_step=False))
        assert torch.allclose(out.sae_out, x_hat) and torch.allclose(out.feature_acts, codes)
        spec["settings"]["rule_check"] = C.check_rule(weights, spec, xc, codes, x_hat)
    C.write(a.out, weights, spec)


if __name__ == "__main__":
    main()
