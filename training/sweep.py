"""Stage 2: train an ensemble of sparse autoencoders (one per L1 penalty or k) on activation chunks.

Output folder:
    sweep.safetensors   stacked weights of every member: center [n, d_in], encoder [n, d_hidden, d_in],
                        encoder_bias [n, d_hidden], decoder [n, d_hidden, d_in]
    sweep.json          config, architecture, per-member hyperparameters and final metrics, source manifest, and
                        the SHA-256 of sweep.safetensors
    checkpoint.json + checkpoint-<generation>.safetensors   full training state (optimizer too) for --resume,
                        saved as one unit (see training/sweep_files.py)
    metrics.jsonl       one line per member every --log_every steps

Its flags live in training/sweep_config.py, its data loading in training/sweep_data.py, --precision in
training/precision.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence, TypeVar

import torch
from tqdm.auto import tqdm

import training
from training.chunks import MANIFEST, HookData, read_manifest
from training.cli import UserError, config_diff, config_from_dict, config_to_dict
from training.architectures import Architecture, get as get_architecture
from training.dead_latents import LOSS_POLICIES
from training.dictionary import unit_norm_params
from training.distributed import (Shard, batch_share, data_parallel_reduce, env_world, join_members, member_slices,
                                  session, slice_members)
from training.locks import folder_lock
from training.memory import (available_bytes, combined_estimate, estimate_sweep, eval_block_rows, format_bytes,
                             memory_report, param_bytes)
from training.models import resolve_device
from training.staging import staging_for
from training.precision import resolve_precision, restores_backend_flags, set_precision
from training.sweep_config import (RESUMABLE_CHANGES, SweepConfig, architecture, check_dictionary_size, dead_policy,
                                   l1_scale, lr_scale, member_keys, member_lrs, validate_config, validate_flags)
from training.sweep_data import (chunk_order, dataset_digest, heldout_rows, holdout_size, iter_chunks, load_chunk,
                                 open_dataset, total_steps, warn_if_unfinished)
from training.sweep_files import (CHECKPOINT_JSON, METRICS, SWEEP_JSON, SWEEP_WEIGHTS, checkpoint_files, clear_sweep,
                                  read_checkpoint, remove_temporaries, save_checkpoint, write_sweep_json,
                                  write_sweep_weights)

T = TypeVar("T")


# ------------------------------------------------------------------------------------- output

EVAL_ROWS = 65536
AUX_REFRESH_STEPS = 100
"""Dead policies that are a loss term (TopK's aux-K, L1's --ghost_grads): steps between refreshes of whether the term
is on (a host sync each), whatever --log_every is."""


@dataclass
class Progress:
    """Where training stands: the next chunk to read and the steps/tokens done."""

    repetition: int = 0
    chunk_position: int = 0
    step: int = 0
    tokens: int = 0
    input_scale: float = 1.0
    eval_rows: str = ""
    dataset_chunks: int = 0
    """Chunks of the dataset when the run started (0: recorded by an older version)."""
    dataset_digest: str = ""
    """`dataset_digest` of the dataset when the run started ("": recorded by an older version)."""


def check_same_dataset(progress: Progress, data: HookData) -> None:
    """A one-line UserError when a resumed run's dataset differs from the one it started on (older checkpoints,
    which did not record it, pass)."""
    if not progress.dataset_digest or progress.dataset_digest == dataset_digest(data):
        return
    now, then = len(data.chunks), progress.dataset_chunks
    change = f"{now} chunks now, {then} then" if now != then else f"same {now} chunks, other checksums"
    raise UserError(f"--resume: the dataset {data.root / data.hook} changed since this run started ({change}) and "
                    "the run's schedule was computed for the old one: restore it, or start over with --overwrite")


def prepare_output(cfg: SweepConfig, out: Path) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    """Checkpoint JSON and tensors to resume from (None, None for a fresh run); refuses to clobber."""
    ckpt = out / CHECKPOINT_JSON
    if cfg.resume:
        if not ckpt.exists():
            raise UserError(f"--resume: no {CHECKPOINT_JSON} in {out}: start the run without --resume")
        remove_temporaries(out)
        saved, state = read_checkpoint(out, {f.name for f in dataclasses.fields(Progress)})
        diff = config_diff(config_from_dict(SweepConfig, saved["config"]), cfg, ignore=RESUMABLE_CHANGES)
        if diff:
            detail = "; ".join(f"--{k}: run has {a!r}, asked {b!r}" for k, (a, b) in sorted(diff.items()))
            raise UserError(f"--resume with different flags ({detail}): resume with the run's flags")
        return saved, state
    if (ckpt.exists() or (out / SWEEP_JSON).exists()) and not cfg.overwrite:
        raise UserError(f"{out} already holds a sweep: pass --resume to continue it, --overwrite to replace it, "
                        "or another --output_dir")
    clear_sweep(out, derived=cfg.overwrite)
    return None, None


def sweep_metadata(cfg: SweepConfig, ens: Any, data: HookData, progress: Progress,
                   metrics: list[dict[str, float]] | None, finished: bool, weights_sha256: str,
                   slices: list[list[int]] | None = None) -> dict[str, Any]:
    """The contents of sweep.json (`weights_sha256`: that of sweep.safetensors; `slices`: the global members each
    rank trained, recorded with the world size; default one process)."""
    keys = member_keys(cfg)
    name = architecture(cfg).sweep_param
    lrs = member_lrs(cfg)
    members = [{name: key, "lr": lrs[i], "frozen": bool(ens.frozen[i]),
                **({} if metrics is None else metrics[i])} for i, key in enumerate(keys)]
    return {
        "toolkit_version": training.__version__,
        "architecture": cfg.architecture,
        "tied": cfg.tied,
        "d_in": ens.d_in,
        "d_hidden": ens.d_hidden,
        "hook": data.hook,
        "dataset_dir": str(data.root.resolve() / data.hook),
        "keys": keys,
        "members": members,
        "progress": vars(progress),
        "finished": finished,
        "config": config_to_dict(cfg),
        "source_manifest": data.manifest,
        "weights_sha256": weights_sha256,
        "world_size": len(slices) if slices else 1,
        "rank_members": slices if slices else [list(range(len(keys)))],
    }


def save_sweep(out: Path, cfg: SweepConfig, ens: Any, data: HookData, progress: Progress,
               metrics: list[dict[str, float]] | None = None, finished: bool = False,
               slices: list[list[int]] | None = None) -> str:
    """Write the full training state (one checkpoint unit), then the dictionaries (sweep.*); return the SHA-256
    of sweep.safetensors.

    Every tensor is copied straight to the host, one at a time (no device-side copy). Nothing random is
    stored: every random stream derives from (seed, step, member), so a checkpoint resumes on any device.
    """
    save_checkpoint(out, config_to_dict(cfg), dict(vars(progress)), ens.state_dict(device="cpu"))
    weights = raw_space_params(ens.params, progress.input_scale, ens.arch)
    digest = write_sweep_weights(out, weights)
    del weights
    write_sweep_json(out, sweep_metadata(cfg, ens, data, progress, metrics, finished, digest, slices))
    return digest


SAVE_SLACK_BYTES = 1 << 20
"""Room allowed per save beyond the weights: JSON files, safetensors headers."""


def save_bytes(cfg: SweepConfig, n_models: int, d_in: int) -> int:
    """Bytes one save writes: sweep.safetensors (untied-size parameters, an upper bound) and checkpoint.safetensors
    (parameters, two Adam moments, int64 dead-latent counters [N, h]), plus SAVE_SLACK_BYTES."""
    d_hidden = max(1, round(cfg.ratio * d_in))
    return (param_bytes(n_models, d_in, d_hidden) + 3 * param_bytes(n_models, d_in, d_hidden, cfg.tied)
            + 8 * n_models * d_hidden + SAVE_SLACK_BYTES)


def existing_folder(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    return next(p for p in (path, *path.parents) if p.exists())


def writable(folder: Path) -> bool:
    """Whether files can be created in `folder`: not on a read-only mount, and write permission for this user."""
    return not os.statvfs(folder).f_flag & os.ST_RDONLY and os.access(folder, os.W_OK | os.X_OK)


def check_output_space(cfg: SweepConfig, n_models: int, d_in: int) -> None:
    """One-line UserErrors, before anything is written, when --output_dir (or the folder it would be made in) is
    read-only or its disk lacks room for two saves side by side (a save writes the new checkpoint beside the old
    one); the sweep's files already there count as room, since they are replaced."""
    out = Path(cfg.output_dir)
    where = existing_folder(out)
    if not writable(where):
        raise UserError(f"--output_dir {out}: {where} is read-only: make it writable or choose another --output_dir")
    held = sum(f.stat().st_size for f in [out / SWEEP_WEIGHTS, *checkpoint_files(out).values()] if f.is_file())
    need, free = 2 * save_bytes(cfg, n_models, d_in) - held, shutil.disk_usage(where).free
    if free < need:
        raise UserError(f"--output_dir {out}: the sweep needs {format_bytes(need).strip()} free on the disk of {where} "
                        f"(a save writes the new checkpoint beside the old one) but {format_bytes(free).strip()} is "
                        "free: free space or choose another --output_dir")


DISK_ERRNOS = {errno.ENOSPC: "no space left on its disk", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}
"""OSErrors while writing the output that are the disk's or the folder's fault, not the program's."""


def in_folder(path: Path, folder: Path) -> bool:
    """Whether `path` lies in `folder` (or is it)."""
    return path.resolve().is_relative_to(folder.resolve())


def _reports_disk_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap `run_sweep` (of one config or a list, one per hook) so that a disk-full or read-only error while it
    writes into an --output_dir is one line (its stale .tmp files removed), not a traceback; other OSErrors (e.g.
    reading a chunk) pass through."""
    @functools.wraps(fn)
    def wrapper(cfg: SweepConfig | list[SweepConfig], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(cfg, *args, **kwargs)
        except OSError as e:
            outs = [Path(c.output_dir) for c in (cfg if isinstance(cfg, list) else [cfg])]
            hit = [o for o in outs if e.filename is None or in_folder(Path(e.filename), o)]
            if e.errno not in DISK_ERRNOS or not hit:
                raise
            out = hit[0]
            for tmp in out.glob("*.tmp") if out.is_dir() else ():
                tmp.unlink(missing_ok=True)
            raise UserError(f"writing {e.filename or out}: {DISK_ERRNOS[e.errno]}: free space (or fix the folder) and "
                            "rerun with --resume to continue from the last checkpoint (without it if none was saved)"
                            ) from None
    return wrapper


def input_scale(acts: torch.Tensor, target: float) -> float:
    """The factor s with E||s x||^2 = target over `acts` [n, d_in] (1 when target is 0: no normalisation)."""
    if target < 0:
        raise UserError(f"--activation_norm must be positive, or 0 for raw activations (got {target})")
    if target == 0:
        return 1.0
    mean_sq = acts.float().square().sum(1).mean().item()
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise UserError("the activations are all zero or not finite: regenerate the dataset")
    return math.sqrt(target / mean_sq)


def raw_space_params(params: dict[str, torch.Tensor], scale: float, arch: Architecture | None = None
                     ) -> dict[str, torch.Tensor]:
    """Weights with unit decoder rows that act on raw activations x, for a dictionary of architecture `arch` (default
    L1's parameter set) trained on s * x.

    First the decoder norms are folded into encoder and the code biases (`unit_norm_params`, exact); then with the
    params in activation units (`Architecture.scaled_params`: center, encoder bias, ...) divided by s the codes come
    out as codes(s x) / s and the reconstruction as x_hat(s x) / s, while encoder and decoder rows are unchanged;
    TopK picks the same features.
    """
    scaled = arch.scaled_params if arch else ("center", "encoder_bias")
    code_biases = arch.code_biases if arch else ("encoder_bias",)
    host = {n: t.detach().cpu() for n, t in params.items()}
    out = unit_norm_params(host, code_biases)
    for name in scaled:                             # params in activation units (the architecture's scaled_params)
        out[name] /= scale
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after `step` (they belong to the part of a killed run that is redone), and a line
    that a kill cut short."""
    if path.exists():
        whole = path.read_text(errors="replace").split("\n")[:-1]      # the text after the last newline is cut short
        lines = [ln for ln in whole if (s := _metric_step(ln)) is not None and s <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        tmp.replace(path)


# ------------------------------------------------------------------------------------- training

@dataclass
class SweepResult:
    """What a sweep run produced."""

    output_dir: Path
    keys: list[float] | list[int]
    metrics: list[dict[str, float]]
    progress: Progress
    seconds: float
    architecture: str
    tokens_this_run: int

    def table(self) -> str:
        """The end-of-run summary: one row per member."""
        name = get_architecture(self.architecture).sweep_param
        rows = [f"{name:>10} {'L0':>8} {'expl. var':>10} {'MSE':>10} {'dead %':>7} {'status':>8}"]
        for key, m in zip(self.keys, self.metrics):
            status = "frozen" if m["frozen"] else "diverged" if m.get("diverged") else ""
            rows.append(f"{key:>10.3g} {m['l0']:>8.1f} {m['explained_variance']:>10.4f} {m['mse']:>10.4g} "
                        f"{100 * m['dead_fraction']:>7.1f} {status:>8}")
        return "\n".join(rows)

    def __str__(self) -> str:
        rate = self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0
        n = len(self.keys)
        return (f"trained {n} dictionaries for {self.progress.step:,} steps ({self.progress.tokens:,} tokens each; "
                f"{rate:,.0f} tokens/s per member, {n * rate:,.0f} tokens/s in all) into {self.output_dir}\n"
                f"scored on {self.progress.eval_rows}:\n{self.table()}{diverged_note(self.keys, self.metrics)}")


DIVERGED_EXPLAINED_VARIANCE = -1.0
"""A member that did not freeze but ends below this explained variance has diverged (see `flag_diverged`)."""


def flag_diverged(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark each member's metrics with "diverged": not frozen, yet its final explained variance is not finite or
    below DIVERGED_EXPLAINED_VARIANCE (-1: its reconstruction error exceeds twice the inputs' variance, far worse
    than reconstructing every row as the mean, which any trained dictionary beats; a loss that exploded while
    staying finite, e.g. from too high an --adam_lr, ends there)."""
    for m in metrics:
        ev = m["explained_variance"]
        m["diverged"] = not m["frozen"] and not (math.isfinite(ev) and ev >= DIVERGED_EXPLAINED_VARIANCE)
    return metrics


def diverged_note(keys: list, metrics: list[dict[str, Any]]) -> str:
    """The summary's warning line about diverged members ('' if none)."""
    bad = [k for k, m in zip(keys, metrics) if m.get("diverged")]
    return (f"\nwarning: members {bad} diverged (explained variance below {DIVERGED_EXPLAINED_VARIANCE:g}: the loss "
            "exploded while staying finite): lower --adam_lr" if bad else "")


def training_device(name: str | None) -> torch.device:
    """The device to train on (see `resolve_device`); MPS is refused with a one-line error (no float64 there)."""
    try:
        kind = None if name is None else torch.device(name).type
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if kind == "mps":
        raise UserError(f"--device {name}: the sweep cannot train on MPS (it has no float64, which the ensemble's "
                        "Adam bookkeeping uses): use --device cpu or a CUDA GPU")
    return resolve_device(name)


def build_ensemble(cfg: SweepConfig, d_in: int, device: torch.device, first_chunk: torch.Tensor,
                   member_ids: Sequence[int] | None = None) -> Any:
    """A fresh ensemble, one member per L1 value or k (only the global members `member_ids` when given: a rank's
    share, each initialised as in the whole sweep), centers initialised from `first_chunk` [n, d_in]."""
    from training.ensemble import Ensemble, make_members
    validate_flags(cfg)
    check_dictionary_size(cfg, d_in)
    keys = member_keys(cfg)
    d_hidden = max(1, round(cfg.ratio * d_in))
    arch = architecture(cfg)
    init_norm = arch.default_init_norm if cfg.decoder_init_norm is None else cfg.decoder_init_norm
    init_norm = 1.0 if cfg.unit_decoder else init_norm
    lrs = member_lrs(cfg)
    if member_ids is None:
        members = make_members(arch.name, len(keys), d_in, d_hidden, keys=keys,
                               tied=cfg.tied, seed=cfg.seed, init_norm=init_norm, device=device)
    else:                                    # member i is drawn from seed + i whichever rank trains it
        keys, lrs = [keys[i] for i in member_ids], [lrs[i] for i in member_ids]
        members = [make_members(arch.name, 1, d_in, d_hidden, keys=[keys[j]], tied=cfg.tied, seed=cfg.seed + i,
                                init_norm=init_norm, device=device)[0] for j, i in enumerate(member_ids)]
    lr = torch.tensor(lrs, dtype=torch.float64)
    hparams = {"lr": lr, arch.sweep_param: torch.tensor(keys, dtype=torch.long if arch.sweep_param_integer
                                                         else torch.float64)}
    ens = Ensemble(members, hparams, dead_window=cfg.dead_window_tokens, backend="fused",
                   unit_decoder=cfg.unit_decoder, grad_clip=cfg.grad_clip, dead_policy=dead_policy(cfg),
                   arch_options={n: getattr(cfg, n) for n in arch.options})
    if cfg.center_init != "zero":
        ens.init_center(first_chunk.to(device, torch.float32), cfg.center_init)
    return ens


@torch.no_grad()
def eval_sums(ens: Any, acts: torch.Tensor, device: torch.device, scale: float = 1.0,
              block: int = 4096) -> dict[str, torch.Tensor]:
    """Float64 device sums over `acts` [n, d_in] (raw; the ensemble sees scale * acts), `block` rows at a time,
    no host sync: "sse" [N] squared errors, "code_sum" [N] code sums, "fired" [N, d_hidden] tokens each latent fired
    on, "x" [d_in] and "x_sq" [] sums of the inputs less "shift" [d_in] (the first block's mean) and of their
    squares (shifted so that the variance does not cancel)."""
    f64 = dict(device=device, dtype=torch.float64)
    sums = {"sse": torch.zeros(ens.n_models, **f64), "code_sum": torch.zeros(ens.n_models, **f64),
            "fired": torch.zeros(ens.n_models, ens.d_hidden, **f64), "x": torch.zeros(ens.d_in, **f64),
            "x_sq": torch.zeros((), **f64)}
    for rows in acts.split(block):
        x = rows.to(device, torch.float32) * scale                                    # [b, d_in]
        codes = ens.encode(x)                                                           # [N, b, d_hidden]
        sums["code_sum"] += codes.sum((1, 2), dtype=torch.float64)
        x_hat = ens.decode(codes)                                                       # [N, b, d_in]
        sums["fired"] += codes.sign_().sum(1, dtype=torch.float64)                     # codes >= 0
        del codes
        sums["sse"] += x_hat.sub_(x).square_().sum((1, 2), dtype=torch.float64)
        del x_hat
        if "shift" not in sums:
            sums["shift"] = x.mean(0, dtype=torch.float64)
        centred = x.double().sub_(sums["shift"])                                       # [b, d_in]
        sums["x"] += centred.sum(0)
        sums["x_sq"] += centred.square_().sum()
    return sums


@torch.no_grad()
def evaluate(ens: Any, acts: torch.Tensor, device: torch.device, scale: float = 1.0,
             block: int = 4096) -> list[dict[str, float]]:
    """Per-member final metrics on raw activations `acts` [n, d_in] and the dead fraction from training; the
    ensemble works on `scale` * acts, so MSE and L1 are converted back to raw units.

    Frees the step workspace first and encodes `block` rows at a time (each block once); one host transfer.
    l0: mean active latents per token; explained_variance: 1 - SSE / total variance; mse: per token; l1_norm:
    mean sum of codes per token; dead_on_eval: fraction of latents that fired on no row.
    """
    ens.release_workspace()
    n = len(acts)
    sums = eval_sums(ens, acts, device, scale, block)
    sums["dead_fraction"] = ens.dead_mask().double().mean(-1)
    host = {k: v.cpu() for k, v in sums.items()}
    m2 = float(host["x_sq"]) - float(host["x"].square().sum()) / n
    out = []
    for i in range(ens.n_models):
        fired, sse = host["fired"][i], float(host["sse"][i])
        out.append({"l0": float(fired.sum()) / n, "explained_variance": 1 - sse / m2 if m2 > 0 else float("nan"),
                    "mse": sse / n / scale ** 2, "l1_norm": float(host["code_sum"][i]) / n / scale,
                    "dead_fraction": float(host["dead_fraction"][i]),
                    "dead_on_eval": float((fired == 0).double().mean()), "frozen": bool(ens.frozen[i])})
    return out


def _metric_step(line: str) -> int | None:
    """The step of a metrics.jsonl line (None if the line is not one)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def log_metrics(path: Path, keys: list, key_name: str, progress: Progress, stats: dict[str, torch.Tensor],
                d_hidden: int, wandb_run: Any, wandb_prefix: str = "") -> None:
    """Append one line per member to metrics.jsonl (one host sync), and log to wandb when asked (`wandb_prefix`: a
    hook of a multi-hook run, whose metrics go against its own step metric "<hook>/step")."""
    names = {"loss": "loss", "mse": "mse", "l1_norm": "l1_norm", "l0": "l0", "explained_variance": "explained_variance",
             "aux": "aux"}
    host = {names[k]: v.double().tolist() for k, v in stats.items() if k in names}
    n_dead, frozen = stats["n_dead"].tolist(), stats["frozen"].tolist()
    lines = []
    for i, key in enumerate(keys):
        row = {"step": progress.step, "tokens": progress.tokens, key_name: key, **{k: v[i] for k, v in host.items()},
               "dead_fraction": n_dead[i] / d_hidden, "frozen": bool(frozen[i])}
        lines.append(json.dumps(row))
    with open(path, "a") as f:
        f.write("".join(ln + "\n" for ln in lines))
    if wandb_run is not None:
        logged = {f"{wandb_prefix}{key_name}={key}/{k}": v[i] for i, key in enumerate(keys) for k, v in host.items()}
        if wandb_prefix:            # the hooks take turns over each chunk: each has its own step axis
            wandb_run.log({**logged, f"{wandb_prefix}step": progress.step})
        else:
            wandb_run.log(logged, step=progress.step)


def start_wandb(cfgs: list[SweepConfig]) -> Any:
    """A wandb run when --wandb_project is given (wandb must be installed), else None: one run for the sweeps `cfgs`
    (several: one per hook, each hook's metrics under "<hook>/" against its own step metric "<hook>/step")."""
    cfg = cfgs[0]
    if not cfg.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_project needs wandb: pip install wandb (or drop the flag)") from None
    if len(cfgs) == 1:
        return wandb.init(project=cfg.wandb_project, config=config_to_dict(cfg), resume="allow")
    hooks = [Path(c.dataset_dir).name for c in cfgs]
    job = dataclasses.replace(cfg, dataset_dir=str(Path(cfg.dataset_dir).parent),
                              output_dir=str(Path(cfg.output_dir).parent), hooks=hooks)
    run = wandb.init(project=cfg.wandb_project, config=config_to_dict(job), resume="allow")
    for hook in hooks:
        run.define_metric(f"{hook}/step")
        run.define_metric(f"{hook}/*", step_metric=f"{hook}/step")
    return run


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Train (or resume) the sweep of one hook described by `cfg`, holding the lock on `cfg.output_dir` (one writer
    per folder); under torchrun, this rank's share of the members (training/distributed.py), the same sweep as one
    process."""
    if cfg.hooks:
        raise UserError("--hooks trains one sweep per hook: use run_sweeps")
    with session() as shard:
        return _run_hooks([cfg], shard)[0]


def run_sweeps(cfg: SweepConfig) -> list[SweepResult]:
    """`run_sweep`, or with several hooks (`sweep_hooks`) one sweep per hook trained in one run on the same rows,
    into --output_dir/<hook>; under torchrun the (hook, member) pairs are shared out evenly over the ranks."""
    hooks = sweep_hooks(cfg)
    if hooks is None:
        return [run_sweep(cfg)]
    with session() as shard:
        return _run_hooks(hook_configs(cfg, hooks), shard)


def sweep_hooks(cfg: SweepConfig) -> list[str] | None:
    """The hooks of a multi-hook run: --hooks, or every hook of a --dataset_dir dataset folder that holds several;
    None for a sweep of one hook folder."""
    root = Path(cfg.dataset_dir)
    if not (root / MANIFEST).is_file():
        if cfg.hooks:
            raise UserError(f"--hooks needs --dataset_dir to be a dataset folder (holding {MANIFEST}), not "
                            f"{cfg.dataset_dir}")
        return None
    found = list(read_manifest(root).get("hooks", {}))
    unknown = [h for h in cfg.hooks or [] if h not in found]
    if unknown:
        raise UserError(f"--hooks {' '.join(unknown)}: not in {root}; it has: {', '.join(found)}")
    if cfg.hooks:
        return list(dict.fromkeys(cfg.hooks))
    return found if len(found) > 1 else None


def hook_configs(cfg: SweepConfig, hooks: list[str]) -> list[SweepConfig]:
    """One sweep's flags per hook: its hook folder as --dataset_dir and --output_dir/<hook> as its folder (so each
    folder is the sweep one would train on that hook alone)."""
    return [dataclasses.replace(cfg, dataset_dir=str(Path(cfg.dataset_dir) / h),
                                output_dir=str(Path(cfg.output_dir) / h), hooks=None) for h in hooks]


@_reports_disk_errors
@restores_backend_flags
def _run_hooks(cfgs: list[SweepConfig], shard: Shard) -> list[SweepResult]:
    """`run_sweeps` of the sweeps `cfgs` (one per hook) on this process, the `shard` of the job."""
    datas = []
    for cfg in cfgs:
        validate_config(cfg)                    # flags, data and disk first: a bad input creates nothing
        data = open_dataset(cfg)
        if shard.is_main:
            warn_if_unfinished(data)
        total_steps(cfg, data, holdout_size(data, cfg.holdout_rows))
        check_dictionary_size(cfg, data.d)
        check_output_space(cfg, len(member_keys(cfg)), data.d)
        datas.append(data)
    check_same_rows(datas)
    check_world_size(len(member_keys(cfgs[0])), len(cfgs), shard)
    with contextlib.ExitStack() as locks:
        for cfg in cfgs:                        # rank 0 holds the locks for the whole job
            locks.enter_context(shard.main_context(functools.partial(folder_lock, cfg.output_dir)))
        return _train_hooks(cfgs, datas, shard)


def check_same_rows(datas: list[HookData]) -> None:
    """A one-line UserError unless every hook has the same chunks (same rows), as one Stage 1 run writes them."""
    rows = [[c.rows for c in d.chunks] for d in datas]
    for d, r in zip(datas[1:], rows[1:]):
        if r != rows[0]:
            raise UserError(f"{d.root / d.hook} has chunks of {r} rows but {datas[0].root / datas[0].hook} has "
                            f"{rows[0]}: hooks trained together need the chunks of one generate_test_data.py run")


def check_world_size(n_members: int, n_hooks: int, shard: Shard) -> None:
    """A one-line UserError when there are more ranks than (hook, member) pairs of several hooks (one hook's sweep
    then trains data parallel, see `data_parallel`)."""
    if shard.world_size > n_members * n_hooks and n_hooks > 1:
        raise UserError(f"{shard.world_size} ranks for {n_members * n_hooks} members of {n_hooks} hooks: launch at "
                        f"most {n_members * n_hooks} processes, or train one hook at a time (data parallel)")


def data_parallel(n_members: int, n_hooks: int, shard: Shard) -> bool:
    """Whether the ranks split each batch (all-reducing the gradients) instead of the members: when one hook's
    sweep has fewer members than there are ranks (e.g. one wide dictionary)."""
    return n_hooks == 1 and n_members < shard.world_size


def prepare_shard(cfg: SweepConfig, out: Path, shard: Shard, slices: list[list[int]]
                  ) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    """`prepare_output` on rank 0 (which alone reads or clears the folder); every rank gets the checkpoint's JSON
    and the state of its own members `slices[rank]` (the checkpoint may come from any world size)."""
    if shard.world_size == 1:
        return prepare_output(cfg, out)
    full: dict[str, dict[str, torch.Tensor] | None] = {"state": None}

    def prepare() -> dict[str, Any] | None:
        saved, full["state"] = prepare_output(cfg, out)
        return saved
    saved = shard.on_main(prepare)
    if saved is None:
        return None, None
    state = full["state"]
    n = sum(map(len, slices))
    pieces = ([slice_members(state, s, n) if s else None for s in slices] if shard.is_main and state is not None
              else None)
    del state
    full.clear()
    return saved, shard.scatter(pieces)


@dataclass
class GatheredEnsemble:
    """A whole ensemble's state, gathered on rank 0 from the ranks' members: what saving reads of an Ensemble."""

    state: dict[str, torch.Tensor]

    def state_dict(self, device: Any = None) -> dict[str, torch.Tensor]:
        """The gathered state (on the host)."""
        return self.state

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """{name: stacked [N, ...] parameter}."""
        return {n[len("param."):]: t for n, t in self.state.items() if n.startswith("param.")}

    @property
    def arch(self) -> Architecture:
        """The members' architecture (its declaration), named in the state."""
        from training.ensemble_state import architecture_name
        return get_architecture(architecture_name(self.state["option.architecture"]))

    @property
    def n_models(self) -> int:
        """Members."""
        return int(self.state["param.decoder"].shape[0])

    @property
    def frozen(self) -> torch.Tensor:
        """BoolTensor[N]: members frozen by a NaN/inf gradient (as a NaN/inf loss gives)."""
        return self.state["frozen"]

    @property
    def d_in(self) -> int:
        """Activation width."""
        return int(self.state["param.decoder"].shape[2])

    @property
    def d_hidden(self) -> int:
        """Dictionary size."""
        return int(self.state["param.decoder"].shape[1])


def use_sweep_member_state(ens: Any, keys: list, member_ids: Sequence[int]) -> None:
    """Give a rank's ensemble (global members `member_ids` of a sweep keyed by `keys`) the member state the whole
    sweep's ensemble has: its members' rows of the per-member tensors, and the sweep-wide values (e.g. TopK's largest
    k, which decides the ranking kernel), so that every member computes exactly as in one process. Entries that
    training changes (`saved_state`) are kept."""
    like = ens.params["decoder"]
    host_keys = torch.tensor(keys, dtype=torch.long if ens.arch.sweep_param_integer else torch.float64)
    whole = ens.arch.member_state(host_keys, like, **ens.arch_options)
    idx = torch.tensor(list(member_ids), dtype=torch.long, device=like.device)
    for name, value in whole.items():
        if name in ens.arch.saved_state:
            continue
        per_member = isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == len(keys)
        ens.member_state[name] = value.index_select(0, idx.to(value.device)) if per_member else value


def gather_ensemble(ens: Any, shard: Shard, data_parallel: bool = False) -> Any:
    """The whole ensemble on rank 0 (`ens` itself on one process or data parallel; a `GatheredEnsemble` of every
    rank's members with several; None on the other ranks)."""
    if shard.world_size == 1 or data_parallel:
        return ens if shard.is_main else None
    states = shard.gather(None if ens is None else ens.state_dict(device="cpu"))
    return None if states is None else GatheredEnsemble(join_members([s for s in states if s is not None]))


def save_shard(out: Path, cfg: SweepConfig, ens: Any, data: HookData, progress: Progress, shard: Shard,
               slices: list[list[int]]) -> tuple[str, Any]:
    """`save_sweep` of the whole ensemble by rank 0 from every rank's members (data parallel, every rank listing
    every member: rank 0's); returns (the SHA-256 of sweep.safetensors, the whole ensemble on rank 0 / None
    elsewhere) on every rank."""
    whole = gather_ensemble(ens, shard, len(slices) > 1 and len(set(map(tuple, slices))) == 1)
    digest = shard.on_main(lambda: save_sweep(out, cfg, whole, data, progress, slices=slices))
    return digest, whole


def gather_stats(stats: dict[str, torch.Tensor] | None, shard: Shard, data_parallel: bool = False
                 ) -> dict[str, torch.Tensor] | None:
    """Per-member step stats [n_rank, ...] of every rank (None: a rank with no member) joined into [N, ...] on
    rank 0 (None elsewhere; data parallel: rank 0's, already those of every member on the whole batch)."""
    if shard.world_size == 1 or data_parallel:
        return stats if shard.is_main else None
    mine = None if stats is None else {k: v.detach().cpu() for k, v in stats.items() if k in LOGGED_STATS}
    parts = shard.gather(mine)                              # None from a rank that trains none of the members
    if parts is None:
        return None
    parts = [p for p in parts if p is not None]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


LOGGED_STATS = ("loss", "mse", "l1_norm", "l0", "explained_variance", "aux", "n_dead", "frozen")
"""The step stats that metrics.jsonl records (see `log_metrics`)."""


def _train_sweep(cfg: SweepConfig, data: HookData, shard: Shard = Shard()) -> SweepResult:
    """Train (or resume) the checked sweep `cfg` on `data` (this rank's members) and write it to `cfg.output_dir`."""
    return _train_hooks([cfg], [data], shard)[0]


@dataclass
class HookRun:
    """One hook's sweep in a run: its flags (its own --dataset_dir and --output_dir), data, the members each rank
    trains, its progress and this rank's ensemble of its members (None where this rank trains none of them)."""

    cfg: SweepConfig
    data: HookData
    slices: list[list[int]]
    held: int
    total: int
    progress: Progress
    ens: Any
    tokens0: int = 0
    wandb_run: Any = None
    wandb_prefix: str = ""
    """Prefix of this hook's wandb metrics ("<hook>/" when one wandb run logs several hooks)."""
    data_parallel: bool = False
    """Every rank holds every member and trains on its share of each batch (gradients all-reduced)."""

    @property
    def out(self) -> Path:
        """The sweep folder."""
        return Path(self.cfg.output_dir)


def pair_slices(n_hooks: int, n_members: int, world_size: int) -> list[list[list[int]]]:
    """[hook][rank] -> the members of that hook the rank trains: the (hook, member) pairs, hook-major, spread evenly
    over the ranks in contiguous runs (one hook: `member_slices`)."""
    pairs = [(h, m) for h in range(n_hooks) for m in range(n_members)]
    out: list[list[list[int]]] = [[[] for _ in range(world_size)] for _ in range(n_hooks)]
    for rank, share in enumerate(member_slices(len(pairs), world_size)):
        for i in share:
            out[pairs[i][0]][rank].append(pairs[i][1])
    return out


def start_hook_run(cfg: SweepConfig, data: HookData, slices: list[list[int]], shard: Shard,
                   device: torch.device) -> HookRun:
    """Prepare the folder of one hook's sweep (on rank 0) and this rank's ensemble of its members, new or resumed."""
    keys = member_keys(cfg)
    mine = slices[shard.rank]
    held = holdout_size(data, cfg.holdout_rows)
    total = total_steps(cfg, data, held)
    out = Path(cfg.output_dir)
    if not cfg.resume and shard.is_main:               # a --resume without a run creates nothing
        out.mkdir(parents=True, exist_ok=True)
    saved, state = prepare_shard(cfg, out, shard, slices)
    ens = None
    if saved is not None:
        progress = Progress(**saved["progress"])
        check_same_dataset(progress, data)
        if shard.is_main:
            truncate_metrics(out / METRICS, progress.step)
        if state is not None:
            from training.ensemble import Ensemble
            state.pop("rng.resample", None)       # stored by older versions; every stream now derives from the seed
            ens = Ensemble.from_state_dict(state, backend="fused", device=device)
            del state
    else:
        first = load_chunk(data, chunk_order(len(data.chunks), cfg.seed, 0)[0], cfg.seed, 0, held)
        progress = Progress(input_scale=input_scale(first[:EVAL_ROWS], cfg.activation_norm),
                            dataset_chunks=len(data.chunks), dataset_digest=dataset_digest(data))
        if mine:
            ens = build_ensemble(cfg, data.d, device, first[:16384].float() * progress.input_scale,
                                 None if shard.world_size == 1 else mine)
        del first
    if ens is not None and shard.world_size > 1:
        use_sweep_member_state(ens, keys, mine)
    return HookRun(cfg, data, slices, held, total, progress, ens, progress.tokens)


def chunk_rows(data: HookData, index: int, held: int) -> int:
    """Training rows of chunk `index` (the held-out tail left out of the last chunk)."""
    return data.chunks[index].rows - (held if index == len(data.chunks) - 1 else 0)


def train_chunk(run: HookRun, chunk: torch.Tensor | None, n_batches: int, shard: Shard, device: torch.device,
                autocast: Callable[[], ContextManager[Any]], bar: Any) -> None:
    """Train this rank's members of `run` on the batches of one chunk (`chunk` None where the rank has none of
    them: it only follows the progress and joins the collectives)."""
    cfg, ens, progress, total = run.cfg, run.ens, run.progress, run.total
    arch, policy = architecture(cfg), dead_policy(cfg)
    decay_start = total - round(cfg.lr_decay_fraction * total)
    mine = run.slices[shard.rank]
    share = batch_share(cfg.batch_size, shard) if run.data_parallel else slice(0, cfg.batch_size)
    reduce = data_parallel_reduce(shard, cfg.batch_size) if run.data_parallel else None
    for b in range(n_batches):
        if progress.step >= total:
            break
        stats = None
        logs = (progress.step + 1) % cfg.log_every == 0 or progress.step + 1 == total
        if ens is not None:
            rows = chunk[b * cfg.batch_size:(b + 1) * cfg.batch_size][share]     # data parallel: this rank's share
            x = rows.to(device, torch.float32, non_blocking=True)
            x.mul_(progress.input_scale)
            with autocast():
                stats = ens.step(x, lr_scale=lr_scale(progress.step, total, cfg),
                                 coefficient_scales=dict.fromkeys(arch.scheduled, l1_scale(progress.step, total, cfg)),
                                 reduce=reduce, stats=logs)      # the logging reductions only when logged
        progress.step += 1
        progress.tokens += cfg.batch_size
        if (ens is not None and policy == "resample" and cfg.resample_every
                and progress.step % cfg.resample_every == 0 and progress.step < decay_start):
            ens.resample_dead(chunk[:EVAL_ROWS].to(device, torch.float32) * progress.input_scale,
                              seed=cfg.seed, step=progress.step, member_ids=mine)
        if policy in LOSS_POLICIES and progress.step % AUX_REFRESH_STEPS == 0:
            if ens is not None:
                ens.resample_dead(x)  # refreshes whether the dead-latent loss is needed (one host sync)
            if shard.world_size > 1:  # on while any member of the sweep has dead latents
                aux_on = shard.any(ens is not None and ens._aux_on)
                if ens is not None:
                    ens._aux_on = aux_on
        if logs:
            whole = gather_stats(stats, shard, run.data_parallel)
            if whole is not None:
                d_hidden = max(1, round(cfg.ratio * run.data.d))
                log_metrics(run.out / METRICS, member_keys(cfg), arch.sweep_param, progress, whole, d_hidden,
                            run.wandb_run, run.wandb_prefix)
                bar.set_postfix(frozen=int(whole["frozen"].sum()))
        bar.update(cfg.batch_size)


def train_runs(runs: list[HookRun], shard: Shard, device: torch.device,
               autocast: Callable[[], ContextManager[Any]], bar: Any) -> None:
    """Train every hook's sweep, chunk position by chunk position (chunk i of every hook holds the same rows), each
    from its own progress; saves as the flags ask."""
    cfg = runs[0].cfg
    while live := [r for r in runs if r.progress.repetition < cfg.n_repetitions and r.progress.step < r.total]:
        rep = min(r.progress.repetition for r in live)
        here = [r for r in live if r.progress.repetition == rep]
        readers = {id(r): iter_chunks(r.data, cfg.seed, rep, r.progress.chunk_position, r.held,
                                      staging_for(device)) for r in here if r.ens is not None}
        order = chunk_order(len(here[0].data.chunks), cfg.seed, rep)
        try:
            for pos in range(min(r.progress.chunk_position for r in here), len(order)):
                for r in here:
                    if r.progress.chunk_position > pos or r.progress.step >= r.total:
                        continue
                    chunk = next(readers[id(r)])[1] if r.ens is not None else None
                    n_batches = (len(chunk) if chunk is not None else chunk_rows(r.data, order[pos], r.held))
                    train_chunk(r, chunk, n_batches // cfg.batch_size, shard, device, autocast, bar)
                    del chunk
                    if len(here) > 1 and r.ens is not None:
                        r.ens.release_workspace()   # one hook's step buffers at a time (the allocator reuses them)
                    r.progress.chunk_position = pos + 1
                    if cfg.save_after_every and r.progress.step < r.total:
                        save_shard(r.out, r.cfg, r.ens, r.data, r.progress, shard, r.slices)
        finally:
            for reader in readers.values():
                reader.close()
        for r in here:
            if r.progress.step < r.total:
                r.progress.repetition, r.progress.chunk_position = r.progress.repetition + 1, 0
                save_shard(r.out, r.cfg, r.ens, r.data, r.progress, shard, r.slices)


def finish_run(run: HookRun, shard: Shard, device: torch.device, seconds: float) -> SweepResult:
    """Save one hook's trained sweep, score it on its evaluation rows and write its sweep.json."""
    cfg, data, progress, held, out = run.cfg, run.data, run.progress, run.held, run.out
    keys = member_keys(cfg)
    if held:
        eval_rows, progress.eval_rows = heldout_rows(data, held), f"{held:,} held-out rows (tail of the last chunk)"
    else:
        eval_rows = load_chunk(data, chunk_order(len(data.chunks), cfg.seed, 0)[0], cfg.seed, 0)[:EVAL_ROWS]
        progress.eval_rows = f"{len(eval_rows):,} training rows (--holdout_rows 0)"
    # saved before the evaluation: a crash there loses nothing
    digest, whole = save_shard(out, cfg, run.ens, data, progress, shard, run.slices)
    mine = [] if run.ens is None else evaluate(run.ens, eval_rows, device, progress.input_scale,
                                                eval_block_rows(cfg.architecture, cfg.batch_size))
    metrics = flag_diverged(mine if run.data_parallel else [m for part in shard.all_gather(mine) for m in part])
    usable = not all(m["frozen"] for m in metrics)
    shard.on_main(lambda: write_sweep_json(out, sweep_metadata(cfg, whole, data, progress, metrics, usable, digest,
                                                               run.slices)))
    if not usable:
        raise UserError(f"every member hit a NaN/inf loss or gradient and was frozen, so the sweep in {out} is not "
                        f"finished: check the activations for non-finite values, or lower --adam_lr (now {cfg.adam_lr:g})")
    frozen = [k for k, m in zip(keys, metrics) if m["frozen"]]
    if frozen and shard.is_main:
        print(f"warning: members {frozen} hit a NaN/inf loss or gradient and were frozen at that step")
    return SweepResult(out, keys, metrics, progress, seconds, cfg.architecture, progress.tokens - run.tokens0)


def _train_hooks(cfgs: list[SweepConfig], datas: list[HookData], shard: Shard) -> list[SweepResult]:
    """Train (or resume) the checked sweeps `cfgs` (one per hook, same flags but their folders) on `datas`, this
    rank's share of the (hook, member) pairs, and write each to its --output_dir."""
    device = training_device(shard.device(cfgs[0].device))
    cfgs = [dataclasses.replace(c, precision=resolve_precision(c.precision, device)) for c in cfgs]
    autocast = set_precision(cfgs[0], device)
    n = len(member_keys(cfgs[0]))
    parallel = data_parallel(n, len(cfgs), shard)
    slices = [[list(range(n))] * shard.world_size] if parallel else pair_slices(len(cfgs), n, shard.world_size)
    runs = [start_hook_run(c, d, s, shard, device) for c, d, s in zip(cfgs, datas, slices)]
    for r in runs:
        r.data_parallel = parallel
    wandb_run = start_wandb(cfgs) if shard.is_main else None
    for r in runs:
        r.wandb_run, r.wandb_prefix = wandb_run, f"{r.out.name}/" if len(runs) > 1 else ""
    t0 = time.perf_counter()
    n_members = len(member_keys(cfgs[0])) * len(runs)
    bar = tqdm(total=sum(r.total for r in runs) * cfgs[0].batch_size,
               initial=sum(r.progress.tokens for r in runs), unit="tok/member", unit_scale=True,
               desc=f"training {n_members} members" + (f" of {len(runs)} hooks" if len(runs) > 1 else ""),
               dynamic_ncols=True, disable=not shard.is_main)
    try:
        train_runs(runs, shard, device, autocast, bar)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    try:
        return [finish_run(r, shard, device, seconds) for r in runs]
    finally:
        if wandb_run is not None:
            wandb_run.finish()


def sweep_memory_report(cfg: SweepConfig) -> str:
    """The --dry_run printout: the device-memory estimate of the sweep(s) `cfg` describes, and whether it fits (one
    process; several hooks: every hook's parameters and optimizer at once, one hook's step buffers at a time)."""
    hooks = sweep_hooks(cfg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    compute = 2 if precision == "bf16" else 4
    ests, shapes = [], []
    for c in [cfg] if hooks is None else hook_configs(cfg, hooks):
        validate_config(c)
        keys, data = member_keys(c), open_dataset(c)
        d_hidden = max(1, round(c.ratio * data.d))
        ests.append(estimate_sweep(c.architecture, len(keys), c.batch_size, data.d, d_hidden, c.tied, compute,
                                   max(keys)))
        shapes.append(f"{len(keys)} {c.architecture} members x d_in {data.d} x d_hidden {d_hidden}")
    available, source = available_bytes(device)
    if hooks is None:
        headline = f"dry run: {shapes[0]}, batch {cfg.batch_size}, {precision} on {device} (nothing trained)"
    else:
        headline = (f"dry run: {len(hooks)} hooks, batch {cfg.batch_size}, {precision} on {device} (nothing trained; "
                    f"one process: under torchrun each rank holds its share)\n"
                    + "\n".join(f"  {h}: {shape}" for h, shape in zip(hooks, shapes)))
    return memory_report(combined_estimate(ests), available, source, headline)


def main_sweep(cfg: SweepConfig) -> str:
    """What basic_l1_sweep.py prints: the memory estimate with --dry_run, else the summary of the trained sweep
    (under torchrun, on rank 0 only: "" on the others)."""
    if cfg.dry_run:
        return sweep_memory_report(cfg)
    results = run_sweeps(cfg)
    return "\n\n".join(map(str, results)) if env_world()[0] == 0 else ""
