"""sparsify peer: a TopK SparseCoder trained by sparsify's own Trainer.fit.

Runs in the side venv .bench_envs/sparsify. sparsify's Trainer collects activations with forward hooks on a
language model's modules while iterating a token dataset. We keep that loop as is and give it a stand-in
"model" whose only hooked module (`acts`, an nn.Identity) outputs our .npy rows: the dataset's `input_ids` are
row numbers [n, 1] (sequence length 1), so one Trainer batch of `batch_size` "sequences" is exactly
`batch_size` consecutive rows, in file order. Everything else is sparsify's: SparseCoder init (encoder
nn.Linear default init, zero encoder bias, W_dec = encoder weight at unit row norm), b_dec set to the first
batch's mean, fused TopK encoder, loss = FVU (sum squared error / total variance of the batch), decoder rows
kept at unit norm with the gradient's parallel component removed, the optimizer and LR schedule of its
`adam` option (torch Adam without bitsandbytes; linear warm-up then linear decay to 0).

Settings we had to choose: optimizer="adam" at our lr (sparsify's default optimizer is "signum"; the
benchmark's common budget is Adam at lr); k from the call (sparsify's default 32); lr_warmup_steps is
sparsify's 1000, capped at 5% of the run's steps; log_to_wandb=False; checkpoints to a temporary folder.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

OPTIONS = ("lr_warmup_steps", "auxk_alpha", "multi_topk", "k_decay_steps", "optimizer", "dead_feature_threshold")
DEFAULT_LR_WARMUP = 1000  # TrainConfig.lr_warmup_steps default (eai-sparsify 1.3.x)


class RowsDataset(torch.utils.data.Dataset):
    """Row numbers as 'token ids' of length-1 sequences."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": torch.tensor([i], dtype=torch.long)}


class NpyActs(nn.Module):
    """Stand-in for a language model: forward(input_ids [b, 1] of row numbers) -> the rows [b, 1, d_in]."""

    def __init__(self, rows: np.ndarray):
        super().__init__()
        self.rows = rows
        self.acts = nn.Identity()
        self.n_rows_served = 0
        self.served = []  # (first, last) row of each batch, to check the order

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dummy_inputs(self) -> dict:
        return {"input_ids": torch.full((1, 1), -1, dtype=torch.long)}  # sparsify's width probe: not data

    def forward(self, input_ids: torch.Tensor, **_):
        idx = input_ids[:, 0]
        if int(idx[0]) < 0:
            return self.acts(torch.zeros(idx.numel(), 1, self.rows.shape[1]))
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if hi - lo == idx.numel() and bool((idx == torch.arange(lo, hi)).all()):
            x = np.array(self.rows[lo:hi], dtype=np.float32, copy=True)
        else:
            x = np.array(self.rows[idx.numpy()], dtype=np.float32)
        self.n_rows_served += idx.numel()
        self.served.append((lo, hi))
        return self.acts(torch.from_numpy(x)[:, None, :])


def main() -> None:
    a = C.parse_args()
    C.quiet_env()
    import importlib.metadata as md

    from sparsify import SparseCoderConfig, TrainConfig, Trainer

    bad = set(a.options) - set(OPTIONS)
    if bad:
        raise SystemExit(f"run_sparsify: unknown options {sorted(bad)}; accepted: {OPTIONS}")
    rows = C.open_rows(a.train_file, a.tokens)
    steps = C.n_steps(a.tokens, a.batch_size)
    if a.tokens % a.batch_size:
        print(f"note: tokens={a.tokens} is not a multiple of batch_size={a.batch_size}: sparsify's LR schedule "
              f"spans {a.tokens // a.batch_size} full batches; the last partial batch runs at the final LR",
              flush=True)
    sae_kw = {"num_latents": a.d_hidden}
    if a.k is not None:
        sae_kw["k"] = a.k
    if "multi_topk" in a.options:
        sae_kw["multi_topk"] = a.options["multi_topk"]
    sae_cfg = SparseCoderConfig(**sae_kw)
    model = NpyActs(rows)
    with tempfile.TemporaryDirectory(dir=a.out.parent if a.out.parent.exists() else None) as tmp:
        tr_kw = {"sae": sae_cfg, "batch_size": a.batch_size, "optimizer": a.options.get("optimizer", "adam"),
                 "lr": a.lr, "lr_warmup_steps": a.options.get("lr_warmup_steps",
                                                             C.capped_warmup(DEFAULT_LR_WARMUP, steps, 0.05)),
                 "hookpoints": ["acts"], "init_seeds": [a.seed], "log_to_wandb": False, "save_dir": tmp,
                 "run_name": "bench", "save_every": 10 ** 12}
        for key in ("auxk_alpha", "k_decay_steps", "dead_feature_threshold"):
            if key in a.options:
                tr_kw[key] = a.options[key]
        cfg = TrainConfig(**tr_kw)
        trainer = Trainer(cfg, RowsDataset(a.tokens), model)
        with C.Timer() as tm:
            trainer.fit()
    if model.n_rows_served != a.tokens or model.served[0][0] != 0 or any(
            b[0] != p[1] for p, b in zip(model.served, model.served[1:])):
        raise RuntimeError(f"the Trainer did not read rows 0..{a.tokens} once each in order: {model.served[:5]}...")
    sae = trainer.saes["acts"]
    sae.eval()
    weights = {"W_enc": sae.encoder.weight.detach().T.clone(), "b_enc": sae.encoder.bias.detach().clone(),
               "W_dec": sae.W_dec.detach().clone(), "b_dec": sae.b_dec.detach().clone()}
    if sae.W_skip is not None or sae.cfg.transcode or sae.cfg.activation != "topk":
        raise RuntimeError("only a plain TopK autoencoder (no skip connection, no transcoder) fits the common rule")
    settings = {
        "trainer": "sparsify.Trainer.fit (hooked stand-in model serving our rows; loss_fn='fvu')",
        "data": "our .npy rows in file order, as length-1 'sequences', batch_size of them per step",
        "k": sae.cfg.k, "k_default_used": a.k is None, "num_latents": sae.num_latents,
        "activation": sae.cfg.activation, "normalize_decoder": sae.cfg.normalize_decoder,
        "multi_topk": sae.cfg.multi_topk, "optimizer": cfg.optimizer,
        "optimizer_choice": "Adam at lr for the common budget (sparsify's own default is 'signum')",
        "optimizer_impl": "torch.optim.Adam (bitsandbytes not installed)",
        "lr_schedule": "transformers.get_linear_schedule_with_warmup(warmup, len(dataset) // batch_size)",
        "lr_warmup_steps": cfg.lr_warmup_steps,
        "warmup_choice": (f"sparsify default {DEFAULT_LR_WARMUP} capped at 5% of {steps} steps"
                          if "lr_warmup_steps" not in a.options else "from --options"),
        "auxk_alpha": cfg.auxk_alpha, "k_decay_steps": cfg.k_decay_steps, "loss_fn": cfg.loss_fn,
        "b_dec_init": "mean of the first batch (sparsify's Trainer)", "input_scaling": "none (raw space)",
        "options": a.options,
    }
    spec = C.base_spec(a, "sparsify", md.version("eai-sparsify"), "topk", sae.cfg.k, True, tm.seconds, settings)
    with torch.no_grad():
        xc = C.check_rows(rows)
        out = sae(xc)
        codes = torch.zeros(xc.shape[0], sae.num_latents).scatter_(-1, out.latent_indices, out.latent_acts)
        spec["settings"]["rule_check"] = C.check_rule(weights, spec, xc, codes, out.sae_out)
    C.write(a.out, weights, spec)


if __name__ == "__main__":
    main()
