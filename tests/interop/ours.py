"""The toolkit's side of the SAELens interop check (run with the project's venv; see `make interop`).

    python tests/interop/ours.py export DIR        a sweep of every architecture we train, exported to DIR/export,
                                                   with activations and our codes / reconstructions (DIR/ours.safetensors),
                                                   and our evaluation metrics of each on a toy model (DIR/ours_metrics.json)
    python tests/interop/ours.py check-native DIR  load DIR/native/* (written by SAELens) with training.load_dictionary
                                                   and compare with SAELens' outputs (DIR/native.safetensors)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))   # toy_model

from training.chunks import save_tensors  # noqa: E402
from training.sweep_files import SWEEP_WEIGHTS, load_sweep, write_sweep_json, write_sweep_weights  # noqa: E402

TOLERANCE = 1e-5
HOOK, MODEL = "blocks.1.hook_resid_post", "tiny-model"
SWEEP_KEYS = {"l1": [1e-3, 0.0464159], "k": [4, 8], "l0_coefficient": [1e-3, 1e-2]}
"""Member keys of the exported sweeps, by sweep parameter."""


def sweeps() -> dict[str, tuple[str, list, bool]]:
    """{sweep name: (architecture, keys, tied)}: every registered architecture (and a tied L1 where one is tieable)."""
    from training.architectures import get, names
    out = {}
    for name in names():
        arch = get(name)
        out[name] = (name, SWEEP_KEYS[arch.sweep_param], False)
        if arch.tieable:
            out[f"{name}_tied"] = (name, SWEEP_KEYS[arch.sweep_param][-1:], True)
    return out


def fake_sweep(folder: Path, architecture: str, keys: list, d_in: int = 16, d_hidden: int = 48, tied: bool = False,
               seed: int = 0) -> Path:
    """A finished sweep folder with random dictionaries of `architecture` (unit decoder rows, biases that leave some
    codes active, positive thresholds)."""
    from training.architectures import get
    from training.ensemble import make_members
    g = torch.Generator().manual_seed(seed)
    members = make_members(architecture, len(keys), d_in, d_hidden, keys=keys, tied=tied, seed=seed)
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in members])
              for n, _ in members[0].named_parameters()}
    n = len(keys)
    decoder = torch.randn(n, d_hidden, d_in, generator=g)
    params["decoder"] = decoder / decoder.norm(dim=-1, keepdim=True)
    params["center"] = 0.3 * torch.randn(n, d_in, generator=g)
    params["encoder_bias"] = -0.2 + 0.1 * torch.randn(n, d_hidden, generator=g)
    if not tied:
        params["encoder"] = params["decoder"] + 0.3 * torch.randn(n, d_hidden, d_in, generator=g)
    for name, t in params.items():      # the architecture's other params (thresholds, gate scales): small, positive
        if name not in ("center", "encoder", "encoder_bias", "decoder"):
            params[name] = (0.05 + 0.2 * torch.rand(t.shape, generator=g)).log() if name.startswith("log_") else \
                0.05 + 0.2 * torch.rand(t.shape, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    digest = write_sweep_weights(folder, params)
    name = get(architecture).sweep_param
    write_sweep_json(folder, {
        "toolkit_version": "test", "architecture": architecture, "tied": tied, "d_in": d_in, "d_hidden": d_hidden,
        "hook": HOOK, "dataset_dir": str(folder / "data" / HOOK), "keys": keys,
        "members": [{name: k, "frozen": False} for k in keys], "progress": {"step": 1}, "finished": True,
        "config": {}, "weights_sha256": digest,
        "source_manifest": {"config": {"model": MODEL, "dataset": "some/text", "context_length": 32,
                                       "skip_special_tokens": True}, "special_token_ids": [0]}})
    assert (folder / SWEEP_WEIGHTS).exists()
    return folder


def our_metrics(module: torch.nn.Module, architecture: str, key: float | int, toy: dict[str, torch.Tensor]
                ) -> dict:
    """Our evaluation of `module` on the toy model's tokens (training.evaluate's batch step and report, every position
    evaluated, one batch), with each feature's density."""
    from training.evaluate import MemberStats, evaluate_batch, member_report
    from training.metrics import EvalStats
    from toy_model import ToyLM
    stats = MemberStats(EvalStats())
    tokens = toy["tokens"]
    evaluate_batch(ToyLM(toy, HOOK), HOOK, tokens, torch.ones_like(tokens, dtype=torch.bool), [module], [stats],
                   with_error=False)
    report = member_report(architecture, key, stats, bins=10)
    return {**{n: report[n] for n in METRICS}, "feature_density": stats.recon.sparsity.feature_density().tolist()}


METRICS = ("l0", "l1", "mse", "explained_variance", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio",
           "relative_reconstruction_bias", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
           "ce_loss_score", "kl_div_with_sae", "kl_div_with_ablation", "kl_div_score")
"""The report.json metrics compared with SAELens' evals (`check_saelens.py check-metrics`)."""


def export(out: Path) -> None:
    """Export every architecture's sweep and record our outputs on shared activations, and our evaluation metrics of
    each on a toy model (DIR/toy.safetensors) in DIR/ours_metrics.json."""
    from training.saelens import ExportConfig, export_sweep
    from toy_model import toy_weights
    x = 2 * torch.randn(512, 16, generator=torch.Generator().manual_seed(1))
    record = {"x": x}
    toy = toy_weights(vocab=50, d=16, seed=2)
    toy["tokens"] = torch.randint(0, 50, (8, 32), generator=torch.Generator().manual_seed(3))
    metrics = {}
    for name, (arch, keys, tied) in sweeps().items():
        sweep = fake_sweep(out / "sweeps" / name, arch, keys, tied=tied)
        for folder, (key, module) in zip(export_sweep(ExportConfig(sweep=str(sweep), all=True,
                                                                   out=str(out / "export" / name))),
                                         load_sweep(sweep).items()):
            with torch.no_grad():
                codes = module.encode(x)
                record[f"{name}/{folder.name}/codes"] = codes
                record[f"{name}/{folder.name}/x_hat"] = module.decode(codes)
            metrics[f"{name}/{folder.name}"] = our_metrics(module, arch, key, toy)
    save_tensors(out / "ours.safetensors", {k: v.contiguous() for k, v in record.items()})
    save_tensors(out / "toy.safetensors", toy)
    (out / "ours_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"exported {sum(len(k) for _, k, _ in sweeps().values())} dictionaries of {len(sweeps())} sweeps to "
          f"{out / 'export'}")


def check_native(out: Path) -> float:
    """Max abs difference between our load of each SAELens-written folder and SAELens' own outputs."""
    from safetensors.torch import load_file
    from training import load_dictionary
    ref = load_file(str(out / "native.safetensors"))
    worst = 0.0
    for folder in sorted((out / "native").iterdir()):
        sae = load_dictionary(folder).module
        with torch.no_grad():
            codes = sae.encode(ref["x"])
            x_hat = sae.decode(ref[f"{folder.name}/codes"])
        d_codes = float((codes - ref[f"{folder.name}/codes"]).abs().max())
        d_dec = float((x_hat - ref[f"{folder.name}/x_hat"]).abs().max())
        worst = max(worst, d_codes, d_dec)
        print(f"SAELens {folder.name:>28} -> ours ({type(sae).__name__}): max |encode diff| {d_codes:.2e}, "
              f"max |decode diff| {d_dec:.2e}")
    return worst


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    if mode == "export":
        export(folder)
    elif mode == "check-native":
        worst = check_native(folder)
        print(json.dumps({"direction": "SAELens -> ours", "max_abs_diff": worst}))
        sys.exit(0 if worst <= TOLERANCE else 1)
    else:
        sys.exit(f"unknown mode {mode!r}")
