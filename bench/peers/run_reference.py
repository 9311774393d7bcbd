"""Reference peer: a plain ReLU + L1 SAE in plain torch (runs in our own venv).

W_dec rows random at unit norm, W_enc = W_dec.T, zero b_enc, b_dec = mean of the first batch; encoder sees
x - b_dec; loss = mean over batch of sum-over-d squared error + l1 * mean over batch of sum |codes|; Adam at
lr (torch defaults otherwise); decoder rows renormalised to unit norm after every step. By default no input
scaling: it trains in raw activation space, so the saved weights are the trained ones. With
--options '{"normalize": true}' it trains on s * x with s = sqrt(d_in / mean ||x||^2) over the first
min(100, steps) batches (so that E||x||^2 = d_in, the scale DEFAULT_L1 is meant for) and folds s back:
W_enc <- s W_enc, b_dec <- b_dec / s, W_dec <- W_dec / s (codes unchanged).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEFAULT_L1 = 3.0
"""On data scaled to E||x||^2 = d_in this lands at a moderate L0. Measured on the smoke-test data (d_in 64,
512 unit directions, ~8 active per row, exponential coefficients), 1500 steps of 1024 rows at lr 1e-3:
l1 = 1 -> L0 ~100, FVU 0.17; l1 = 3 -> L0 ~35, FVU ~0.6; l1 = 5 -> L0 ~10, FVU ~0.93. On other scales pass --l1
explicitly (the penalty scales like the activations' norm)."""

OPTIONS = ("normalize",)


def main() -> None:
    a = C.parse_args()
    bad = set(a.options) - set(OPTIONS)
    if bad:
        raise SystemExit(f"run_reference: unknown options {sorted(bad)}; accepted: {OPTIONS}")
    torch.manual_seed(a.seed)
    rows = C.open_rows(a.train_file, a.tokens)
    d_in = rows.shape[1]
    s = 1.0
    if a.options.get("normalize", False):
        sq = [x.pow(2).sum(-1).mean().item() for _, x in zip(range(100), C.batches(rows, a.batch_size))]
        s = (d_in / (sum(sq) / len(sq))) ** 0.5
        print(f"input scale s = {s:.6g} (E||s x||^2 = d_in over the first {len(sq)} batches)", flush=True)
    l1 = DEFAULT_L1 if a.l1 is None else a.l1
    W_dec = torch.randn(a.d_hidden, d_in)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_dec = W_dec.requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc = torch.zeros(a.d_hidden, requires_grad=True)
    b_dec = torch.zeros(d_in, requires_grad=True)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=a.lr)
    with C.Timer() as tm:
        for step, x in enumerate(C.batches(rows, a.batch_size)):
            x = x * s
            if step == 0:
                with torch.no_grad():
                    b_dec.copy_(x.mean(0))
            codes = torch.relu((x - b_dec) @ W_enc + b_enc)
            x_hat = codes @ W_dec + b_dec
            loss = (x - x_hat).pow(2).sum(-1).mean() + l1 * codes.abs().sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                W_dec /= W_dec.norm(dim=1, keepdim=True)
            if step % 50 == 0:
                print(f"step {step} loss {loss.item():.4f} L0 {(codes > 0).float().sum(-1).mean().item():.1f}",
                      flush=True)
    with torch.no_grad():  # fold the input scale back: raw-space weights, same codes
        weights = {"W_enc": W_enc * s, "b_enc": b_enc.clone(), "W_dec": W_dec / s, "b_dec": b_dec / s}
    spec = C.base_spec(a, "reference", f"torch {torch.__version__}", "relu", None, True, tm.seconds, {
        "l1": l1, "l1_default_used": a.l1 is None,
        "loss": "mean_b sum_d (x - x_hat)^2 + l1 * mean_b sum_h |codes|",
        "init": "W_dec rows N(0,1) at unit norm; W_enc = W_dec.T; b_enc = 0; b_dec = mean of first batch",
        "optimizer": "torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-8)", "lr_schedule": "constant",
        "decoder_norm": "rows renormalised to 1 after each step",
        "input_scaling": "none (raw space)" if s == 1.0 else f"x * {s:.6g} in training, folded back",
        "scale": s, "options": a.options,
    })
    with torch.no_grad():
        xc = C.check_rows(rows)
        codes = torch.relu((xc * s - b_dec) @ W_enc + b_enc)  # the trained model, on its own (scaled) inputs
        spec["settings"]["rule_check"] = C.check_rule(weights, spec, xc, codes, (codes @ W_dec + b_dec) / s)
    C.write(a.out, weights, spec)


if __name__ == "__main__":
    main()
