#!/usr/bin/env python
"""Benchmark: every registered SAE architecture on the embedded model at a matched token budget, compared.

On the Stage 1 folder the demo uses (generate_test_data.py's defaults: the embedded model models/tiny-stdlib on its
corpus, layer 0 residual stream; built into --dataset_dir when missing), one sweep per architecture
(--architectures, default every registered one) is trained with the same flags: --max_tokens per member (the
matched budget; enough passes over the data to reach it), --batch_size, --ratio, the sweep's defaults otherwise,
members at the sweep's default values of the architecture's sweep parameter (or --keys NAME=v1,v2,...). Then
`evaluate_sweep.py --sweep A B ...` (training.comparison.evaluate_and_compare) evaluates each on the corpus's held-out
split and compares them: explained variance and CE loss score on each sweep's Pareto frontier at L0 = 16, 32, 64
(linear in log L0 between the two frontier members bracketing it; "—" outside the measured range).

Outputs in --out: one sweep folder per architecture (reused when it finished with the same flags, unless
--retrain), comparison/ (comparison.md, comparison.json, the two frontier plots) and architectures.json (training
seconds, tokens, the comparison, the machine and the date).

    python bench/architectures.py [--architectures l1 topk ...] [--max_tokens 2097152] [--batch_size 1024]
                                  [--ratio 8] [--keys topk=16,32,64] [--n_tokens 200000] [--out outputs/architectures]
                                  [--dataset_dir activation_data] [--device cpu] [--threads N] [--retrain]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.architectures import get as get_architecture  # noqa: E402
from training.architectures import names as architecture_names  # noqa: E402
from training.chunks import atomic_write_json  # noqa: E402
from training.cli import UserError, config_to_dict  # noqa: E402
from training.comparison import CompareConfig, evaluate_and_compare  # noqa: E402
from training.generate import GenerateConfig, generate  # noqa: E402
from training.sweep import SweepConfig, holdout_size, member_keys, run_sweep  # noqa: E402

RESULTS_JSON = "architectures.json"


def parse_keys(items: list[str]) -> dict[str, list]:
    """{architecture: member keys} from NAME=v1,v2,... items (ints for an integer sweep parameter)."""
    out: dict[str, list] = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in architecture_names() or not values:
            raise UserError(f"--keys {item!r}: give NAME=v1,v2,... with NAME one of {', '.join(architecture_names())}")
        cast = int if get_architecture(name).sweep_param_integer else float
        try:
            out[name] = [cast(v) for v in values.split(",")]
        except ValueError:
            raise UserError(f"--keys {item!r}: the values must be {cast.__name__}s separated by commas") from None
    return out


def sweep_config(name: str, args: argparse.Namespace, keys: list | None, passes: int) -> SweepConfig:
    """The sweep of architecture `name` at the matched budget (its members: `keys`, else the sweep's defaults)."""
    arch = get_architecture(name)
    extra = {} if keys is None else {f"{arch.sweep_param}_values": keys}
    return SweepConfig(dataset_dir=args.dataset_dir, output_dir=str(Path(args.out) / name), architecture=name,
                       ratio=args.ratio, batch_size=args.batch_size, n_repetitions=passes, max_tokens=args.max_tokens,
                       device=args.device, log_every=1000, seed=args.seed, **extra, **parse_flags(args.flags))


def parse_flags(items: list[str]) -> dict[str, Any]:
    """{SweepConfig field: value} from FIELD=VALUE items (the value parsed as the field's default is typed)."""
    import dataclasses
    fields = {f.name: f for f in dataclasses.fields(SweepConfig)}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise UserError(f"--flags {item!r}: give FIELD=VALUE with FIELD a basic_l1_sweep.py flag name")
        default = getattr(SweepConfig(), name)
        try:
            out[name] = type(default)(value) if isinstance(default, (int, float)) and not isinstance(default, bool) \
                else value
        except ValueError:
            raise UserError(f"--flags {item!r}: {value!r} is not a {type(default).__name__}") from None
    return out


def finished_with(cfg: SweepConfig) -> bool:
    """Whether cfg.output_dir holds a finished sweep trained with these flags (the ones that decide the weights)."""
    path = Path(cfg.output_dir) / "sweep.json"
    if not path.exists():
        return False
    meta = json.loads(path.read_text())
    ignore = {"overwrite", "resume", "log_every", "device", "precision", "wandb_project", "dry_run"}
    saved = {k: v for k, v in meta.get("config", {}).items() if k not in ignore}
    wanted = {k: v for k, v in config_to_dict(cfg).items() if k not in ignore}
    return bool(meta.get("finished")) and all(saved.get(k) == v for k, v in wanted.items())


def training_rows(data: Path) -> int:
    """Activation rows a sweep trains on in one pass over the Stage 1 folder `data` (all but the held-out rows)."""
    from training import open_hook
    hook = open_hook(data)
    return hook.n_rows - holdout_size(hook, SweepConfig().holdout_rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train one sweep per architecture at the matched budget, compare them, print and write the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--architectures", nargs="+", default=list(architecture_names()))
    p.add_argument("--max_tokens", type=int, default=2_097_152, help="training tokens per member (matched budget)")
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--ratio", type=float, default=8.0)
    p.add_argument("--keys", nargs="*", default=[], help="NAME=v1,v2,...: an architecture's member keys")
    p.add_argument("--flags", nargs="*", default=[], help="FIELD=VALUE: a basic_l1_sweep.py flag for every sweep "
                   "(e.g. jumprelu_bandwidth=0.05, which only JumpReLU reads)")
    p.add_argument("--n_tokens", type=int, default=200_000, help="evaluation tokens")
    p.add_argument("--dataset_dir", default="activation_data",
                   help="Stage 1 folder (built with the defaults if missing)")
    p.add_argument("--out", default="outputs/architectures")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--retrain", action="store_true", help="train every sweep again even when a finished one matches")
    args = p.parse_args(argv)
    unknown = [n for n in args.architectures if n not in architecture_names()]
    if unknown:
        p.error(f"unknown architecture {unknown[0]!r}: choose among {', '.join(architecture_names())}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        keys = parse_keys(args.keys)
        return run(args, keys)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run(args: argparse.Namespace, keys: dict[str, list]) -> dict[str, Any]:
    """The benchmark proper (see the module docstring)."""
    t_start = time.perf_counter()
    data = Path(args.dataset_dir)
    if not (data / "manifest.json").exists():
        print(f"building the Stage 1 folder {data} with generate_test_data.py's defaults", flush=True)
        generate(GenerateConfig(dataset_folder=str(data), device=args.device), argv=["bench/architectures.py"])
    rows = training_rows(data)
    passes = max(1, math.ceil(args.max_tokens / rows))
    print(f"matched budget: {args.max_tokens:,} tokens per member ({passes} pass(es) over {rows:,} rows), batch "
          f"{args.batch_size}, ratio {args.ratio:g}, device {args.device}", flush=True)
    trained = []
    for name in args.architectures:
        cfg = sweep_config(name, args, keys.get(name), passes)
        member_keys(cfg)                                           # a bad --keys value fails before any training
        if not args.retrain and finished_with(cfg):
            print(f"{name}: reusing the finished sweep in {cfg.output_dir}", flush=True)
            seconds = None
        else:
            print(f"{name}: training {len(member_keys(cfg))} members ({get_architecture(name).sweep_param} = "
                  f"{', '.join(f'{k:g}' for k in member_keys(cfg))})", flush=True)
            t = time.perf_counter()
            run_sweep(dataclasses.replace(cfg, overwrite=True))
            seconds = time.perf_counter() - t
        trained.append({"architecture": name, "sweep": cfg.output_dir, "keys": member_keys(cfg),
                        "train_seconds": seconds})
    t_eval = time.perf_counter()
    result = evaluate_and_compare(CompareConfig(sweep=[t["sweep"] for t in trained], n_tokens=args.n_tokens,
                                                device=args.device, comparison_dir=str(Path(args.out) / "comparison")),
                                  show=lambda r: print(r, flush=True))
    eval_seconds = time.perf_counter() - t_eval
    if result is not None:
        print(result)
    else:                                                          # one architecture: its own report is the result
        print(f"one architecture: see {Path(trained[0]['sweep']) / 'report.md'}")
    print("\ntraining: " + "; ".join(f"{t['architecture']} {len(t['keys'])} members "
                                     + (f"{t['train_seconds']:.0f} s" if t["train_seconds"] else "reused")
                                     for t in trained)
          + f"; evaluation {eval_seconds:.0f} s; total {time.perf_counter() - t_start:.0f} s")
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads, device {args.device}",
           "flags": vars(args), "rows": rows, "passes": passes, "sweeps": trained, "eval_seconds": eval_seconds,
           "total_seconds": time.perf_counter() - t_start,
           "comparison": None if result is None else result.comparison}
    atomic_write_json(Path(args.out) / RESULTS_JSON, out)
    return out


if __name__ == "__main__":
    main()
