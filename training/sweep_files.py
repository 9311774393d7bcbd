"""The on-disk format of a sweep folder: the dictionaries (sweep.*) and the checkpoint, written and read checked.

    sweep.safetensors            stacked weights of every member (see training/sweep.py)
    sweep.json                   what the sweep is; "weights_sha256" is the SHA-256 of sweep.safetensors
    checkpoint-<g>.safetensors   the full training state of generation g, with its config and progress in the
                                 file's own metadata
    checkpoint.json              the commit point of a checkpoint: config, progress, and which generation's file
                                 (name and SHA-256) they belong to

A checkpoint is saved as one unit: the new generation's weights go to a new file, then one atomic rename of
checkpoint.json switches to it, then older generations are removed. A kill at any instant leaves checkpoint.json
naming a complete file of the same save. Older folders (checkpoint.safetensors beside a checkpoint.json without
"weights") resume when their Adam step count agrees with the progress.

Every tool reads a sweep through this module: `load_sweep` (all members, frozen, `.member(0.46)`), `load_member` (one
member read alone), `select_member` (--l1 / --k / --key: `choose_key`, the nearest key within KEY_TOLERANCE, said on
stderr when not exact), `read_sweep` (a finished sweep's sweep.json), key names and labels (`key_name`, `format_key`,
`key_label`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from training.chunks import atomic_write_json, file_sha256, read_json, save_tensors
from training.cli import UserError
from training.architectures import get as get_architecture, names as architecture_names
from training.dictionary import dictionary_from_params, unstack_dictionaries

SWEEP_JSON, SWEEP_WEIGHTS = "sweep.json", "sweep.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
LEGACY_CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINT_FORMAT = 2
UNIT_NORM_TOLERANCE = 1e-3
"""How far a decoder row's norm may be from 1 in a loaded sweep (they are saved normalised, in float32)."""
KEY_TOLERANCE = 0.05
"""How far (relative) a requested L1 penalty may be from a member's key and still choose it: keys are printed with
3 significant digits (0.464 for 0.4641589), so a printed key is always within 0.2% of the real one."""
_GENERATION = re.compile(r"checkpoint-(\d+)\.safetensors$")


def crash_point(path: Path) -> None:
    """Test-only hook, called before each file a save writes, replaces or removes (tests make it raise)."""


def load_tensors(path: Path, advice: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of safetensors file `path`; a missing file or a bad header is a one-line UserError."""
    if not path.exists():
        raise UserError(f"{path} is missing: {advice}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}): {advice}") from None


def check_sha256(path: Path, expected: str, advice: str) -> None:
    """A one-line UserError unless the file's SHA-256 is `expected`."""
    if not path.exists():
        raise UserError(f"{path} is missing: {advice}")
    if file_sha256(path) != expected:
        raise UserError(f"{path} does not match the checksum recorded for it (corrupt or modified): {advice}")


def remove(path: Path) -> None:
    """Delete a file of the sweep folder if it exists (a crash point)."""
    if path.exists():
        crash_point(path)
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- checkpoint

def checkpoint_files(out: Path) -> dict[int, Path]:
    """{generation: path} of the checkpoint weight files in `out`."""
    found = {}
    for p in out.glob("checkpoint-*.safetensors"):
        m = _GENERATION.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return found


def save_checkpoint(out: Path, config: dict[str, Any], progress: dict[str, Any],
                    state: dict[str, torch.Tensor]) -> None:
    """Save the training state as a new generation, switch checkpoint.json to it, then drop older generations."""
    generation = max(checkpoint_files(out), default=0) + 1
    weights = out / f"checkpoint-{generation}.safetensors"
    info = {"config": config, "progress": progress, "generation": generation}
    crash_point(weights)
    digest = save_tensors(weights, state, info=info)
    crash_point(out / CHECKPOINT_JSON)
    atomic_write_json(out / CHECKPOINT_JSON, {"format": CHECKPOINT_FORMAT, **info, "weights": weights.name,
                                              "weights_sha256": digest})
    for stale in [p for g, p in sorted(checkpoint_files(out).items()) if g != generation]:
        remove(stale)
    remove(out / LEGACY_CHECKPOINT_WEIGHTS)


def checkpoint_weights(out: Path) -> Path:
    """The weights file that checkpoint.json names (checkpoint.safetensors for a folder of an older version)."""
    saved = read_json(out / CHECKPOINT_JSON, "the checkpoint is damaged: start the sweep again with --overwrite")
    return out / saved["weights"] if isinstance(saved, dict) and "weights" in saved else out / LEGACY_CHECKPOINT_WEIGHTS


def read_checkpoint(out: Path, progress_fields: set[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """checkpoint.json and the training state it names, checked against each other and its progress against the
    fields this version knows (a one-line UserError if not)."""
    advice = "the checkpoint is damaged: start the sweep again with --overwrite"
    saved = read_json(out / CHECKPOINT_JSON, advice)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) \
            or not isinstance(saved.get("progress"), dict) or not isinstance(saved["progress"].get("step"), int):
        raise UserError(f"{out / CHECKPOINT_JSON} lacks the config or progress of a sweep: {advice}")
    unknown = set(saved["progress"]) - progress_fields
    if unknown:
        raise UserError(f"{out / CHECKPOINT_JSON} holds progress fields {sorted(unknown)} this version does not know: "
                        "resume with the toolkit version that wrote it, or start again with --overwrite")
    if "weights" in saved:
        name = saved["weights"]
        if not isinstance(name, str) or Path(name).name != name or not _GENERATION.match(name):
            raise UserError(f"{out / CHECKPOINT_JSON} names no checkpoint weights file of the folder: {advice}")
        weights = out / name
        check_sha256(weights, str(saved.get("weights_sha256")), advice)
    else:
        weights = out / LEGACY_CHECKPOINT_WEIGHTS
    state = load_tensors(weights, advice)
    stored = _stored_progress(weights)
    if stored is not None and stored != saved["progress"]:
        raise UserError(f"{weights} holds progress {stored} but {out / CHECKPOINT_JSON} says {saved['progress']}: "
                        f"{advice}")
    check_adam_steps(state, saved["progress"]["step"], weights)
    return saved, state


def _stored_progress(path: Path) -> dict[str, Any] | None:
    """The progress a checkpoint weights file records in its own metadata (None for older files)."""
    with safe_open(str(path), "pt") as f:
        info = (f.metadata() or {}).get("info")
    return json.loads(info).get("progress") if info else None


def check_adam_steps(state: dict[str, torch.Tensor], step: int, path: Path) -> None:
    """UserError unless every member's Adam step count is `step` (frozen members: at most `step`)."""
    counts, frozen = state.get("adam.step"), state.get("frozen")
    if counts is None or frozen is None or counts.shape != frozen.shape:
        raise UserError(f"{path} holds no Adam step counts of a sweep: start the sweep again with --overwrite")
    active = counts[~frozen.bool()]
    if bool((active != step).any()) or bool((counts > step).any()):
        found = int(counts.max()) if counts.numel() else 0
        raise UserError(f"{path} holds the optimizer state of step {found} but its progress says step {step} "
                        "(a save was cut short by an older version): start the sweep again with --overwrite")


# ------------------------------------------------------------------------------------- sweep

def write_sweep_weights(out: Path, weights: dict[str, torch.Tensor]) -> str:
    """Write sweep.safetensors atomically; return its SHA-256 (recorded in sweep.json)."""
    crash_point(out / SWEEP_WEIGHTS)
    return save_tensors(out / SWEEP_WEIGHTS, weights)


def write_sweep_json(out: Path, meta: dict[str, Any]) -> None:
    """Write sweep.json atomically."""
    crash_point(out / SWEEP_JSON)
    atomic_write_json(out / SWEEP_JSON, meta)


def sweep_advice(path: Path) -> str:
    """What to do about a damaged sweep in folder `path`."""
    return (f"rerun basic_l1_sweep.py --output_dir {path} (with --resume if it was killed while saving, "
            "else --overwrite)")


def read_sweep_json(path: str | Path) -> dict[str, Any]:
    """sweep.json of sweep folder `path`, checked to describe a sweep (a one-line UserError if not)."""
    path = Path(path)
    if not (path / SWEEP_JSON).exists():
        raise UserError(f"no sweep in {path}: expected {SWEEP_JSON} and {SWEEP_WEIGHTS} written by basic_l1_sweep.py")
    meta = read_json(path / SWEEP_JSON, sweep_advice(path))
    problem = _sweep_json_problem(meta)
    if problem:
        raise UserError(f"{path / SWEEP_JSON} is not a valid sweep description ({problem}): {sweep_advice(path)}")
    return meta


def _sweep_json_problem(meta: Any) -> str:
    """What is wrong with a parsed sweep.json ('' if nothing)."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    for name, kind in (("architecture", str), ("keys", list), ("members", list), ("d_in", int), ("d_hidden", int)):
        if not isinstance(meta.get(name), kind):
            return f"no {name!r} of type {kind.__name__}"
    if meta["architecture"] not in architecture_names():
        return f"unknown architecture {meta['architecture']!r}"
    if not all(isinstance(k, (int, float)) and not isinstance(k, bool) for k in meta["keys"]):
        return "'keys' are not all numbers"
    if len(meta["members"]) != len(meta["keys"]):
        return f"{len(meta['keys'])} keys but {len(meta['members'])} members"
    return ""


def sweep_shapes(meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensor shapes sweep.safetensors must hold for the sweep sweep.json describes."""
    n, d_in, d_hidden = len(meta["keys"]), meta["d_in"], meta["d_hidden"]
    arch = get_architecture(meta["architecture"])
    key = meta["keys"][0] if meta["keys"] else None
    if arch.member_key is not None and key is not None:
        key = min(key, d_hidden)                             # a shape template only (load checks the keys)
    member = arch.make_member(d_in, d_hidden, key, tied=bool(meta.get("tied", False)), device="meta")
    return {name: (n, *p.shape) for name, p in member.named_parameters()}


def load_sweep_params(path: str | Path, device: str | torch.device = "cpu", verify: bool = True
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(sweep.json, stacked weights) of a sweep folder, cross-checked: names, member counts and shapes always;
    the recorded SHA-256 and unit-norm decoder rows when `verify`."""
    path = Path(path)
    meta = read_sweep_json(path)
    weights, advice = path / SWEEP_WEIGHTS, sweep_advice(path)
    if verify and meta.get("weights_sha256"):
        check_sha256(weights, meta["weights_sha256"], advice)
    params = load_tensors(weights, advice, str(device))
    found = {n: tuple(t.shape) for n, t in params.items()}
    if found != sweep_shapes(meta):
        raise UserError(f"{weights} holds tensors {found} but {path / SWEEP_JSON} describes "
                        f"{sweep_shapes(meta)}: {advice}")
    if verify:
        frozen = [bool(isinstance(m, dict) and m.get("frozen")) for m in meta["members"]]
        check_unit_rows(params["decoder"], frozen, weights, advice)
    return meta, params


def check_unit_rows(decoder: torch.Tensor, frozen: list[bool], path: Path, advice: str) -> None:
    """A one-line UserError unless every decoder row [n, h, d] of a member not frozen has norm 1 (or 0: unused)."""
    norms = decoder.detach().float().norm(dim=-1)
    bad = ~(((norms - 1).abs() <= UNIT_NORM_TOLERANCE) | (norms == 0))
    bad[torch.tensor(frozen, dtype=torch.bool, device=bad.device)] = False
    if bool(bad.any()):
        member, row = (int(i) for i in bad.nonzero()[0])
        raise UserError(f"{path}: decoder row {row} of member {member} has norm {float(norms[member, row]):.4g}, "
                        f"not 1 (corrupt or modified): {advice}")


def load_sweep(path: str | Path, device: str | torch.device = "cpu", verify: bool = True, trainable: bool = False
               ) -> "Sweep":
    """The dictionaries of a sweep folder, {member key (its sweep parameter: l1 penalty, k, ...): the architecture's
    module},
    in eval mode without gradients (`trainable=True`: parameters require grad), checked as `load_sweep_params` does
    (`verify=False` skips the checksum and the norms, for speed); `.member(value)` picks the nearest key."""
    meta, params = load_sweep_params(path, device, verify)
    modules = unstack_dictionaries(params, meta["architecture"], meta["keys"])
    return Sweep(zip(meta["keys"], (_ready(m, trainable) for m in modules)), meta=meta, path=Path(path))


def _ready(module: torch.nn.Module, trainable: bool) -> torch.nn.Module:
    """`module` in eval mode, its parameters requiring grad only when `trainable`."""
    return module.eval().requires_grad_(trainable)


class Sweep(dict):
    """{key: dictionary} of a sweep folder, with its sweep.json (`meta`); `member(value)` finds the nearest key."""

    def __init__(self, items: Any = (), *, meta: dict[str, Any], path: Path):
        super().__init__(items)
        self.meta, self.path = meta, path

    def member(self, value: float | int, tolerance: float = KEY_TOLERANCE) -> torch.nn.Module:
        """The dictionary whose key is nearest `value` (within `tolerance`, relative; says which when not exact)."""
        return self[choose_key(list(self), value, self.meta["architecture"], tolerance, str(self.path))]

    def __missing__(self, key: Any) -> torch.nn.Module:
        listing = ", ".join(f"{k:g}" for k in self)
        raise KeyError(f"no member {key!r} in the sweep {self.path} (keys: {listing}); saes.member({key!r}) picks "
                       f"the nearest key within {KEY_TOLERANCE:.0%}")


# ------------------------------------------------------------------------------------- members

PRETRAINED = "pretrained"
"""The `architecture` of a description made for pretrained dictionaries (keyed by name, not by a sweep parameter)."""


def key_name(architecture: str) -> str:
    """What members are keyed by: the architecture's sweep parameter ("l1", "k", ...), or "name" (pretrained
    dictionaries, by folder name)."""
    return "name" if architecture == PRETRAINED else get_architecture(architecture).sweep_param


def format_key(architecture: str, key: float | int | str) -> str:
    """A member's key for people: "L1 = 0.001", "k = 32", ..., or a pretrained dictionary's name."""
    return key if isinstance(key, str) else get_architecture(architecture).format_key(key)


def key_label(name: str, key: float | int) -> str:
    """Folder-safe name of a sweep member from its key name: l1_0.001 or k_32 (integer keys without a point)."""
    return f"{name}_{key:g}" if isinstance(key, float) else f"{name}_{int(key)}"


def choose_key(keys: list[float | int], value: float | int, architecture: str,
               tolerance: float = KEY_TOLERANCE, where: str = "the sweep") -> float | int:
    """The key of `keys` nearest `value`: a real-valued key (an L1 penalty, ...) within `tolerance` (relative to the
    key; printed to stderr when not exact), an integer key (k) exactly; otherwise a one-line UserError listing them."""
    import sys
    listing = ", ".join(f"{k:g}" for k in keys)
    name = key_name(architecture)
    arch = get_architecture(architecture)
    if arch.sweep_param_integer:
        if float(value) != int(value) or int(value) not in keys:
            raise UserError(f"--{name} {value:g} is not in {where}: its {arch.key_symbol} values are {listing}")
        return int(value)
    distance = [abs(float(k) - float(value)) / abs(float(k)) if k else abs(float(value)) for k in keys]
    best = min(range(len(keys)), key=lambda i: distance[i]) if keys else None
    if best is None or distance[best] > tolerance:
        raise UserError(f"--{name} {value:g} is not in {where} (none within {tolerance:.0%}): its "
                        f"{arch.key_symbol} values are {listing}")
    if keys[best] != value:
        print(f"--{name} {value:g}: using the nearest member, {name} = {keys[best]!r} "
              f"({100 * distance[best]:.2g}% away)", file=sys.stderr)
    return keys[best]


def load_member(path: str | Path, key: float | int, device: str | torch.device = "cpu", verify: bool = True,
                trainable: bool = False) -> torch.nn.Module:
    """The dictionary of one member (exact `key`, see `choose_key`) of a sweep folder, read alone from the file,
    checked as `load_sweep` checks it."""
    path = Path(path)
    meta = read_sweep_json(path)
    if key not in meta["keys"]:
        raise UserError(f"no member {key!r} in the sweep {path}: its keys are {meta['keys']}")
    i = meta["keys"].index(key)
    weights, advice = path / SWEEP_WEIGHTS, sweep_advice(path)
    if verify and meta.get("weights_sha256"):
        check_sha256(weights, meta["weights_sha256"], advice)
    expected = sweep_shapes(meta)
    try:
        with safe_open(str(weights), "pt", device=str(device)) as f:
            found = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
            if found != expected:
                raise UserError(f"{weights} holds tensors {found} but {path / SWEEP_JSON} describes {expected}: "
                                f"{advice}")
            params = {n: f.get_slice(n)[i] for n in found}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights} is not a readable safetensors file ({str(e).splitlines()[0]}): {advice}") from None
    if verify:
        frozen = bool(isinstance(meta["members"][i], dict) and meta["members"][i].get("frozen"))
        check_unit_rows(params["decoder"][None], [frozen], weights, advice)
    return _ready(dictionary_from_params(params, meta["architecture"], key), trainable)


def select_member(sweep: str | Path, l1: float | None = None, k: int | None = None, key: str | float | None = None,
                  device: str | torch.device = "cpu", load: bool = True
                  ) -> tuple[float | int, torch.nn.Module | None, dict[str, Any]]:
    """(key, dictionary, sweep.json) of the member chosen by --l1 / --k / --key (nearest key, see `choose_key`), or
    the only one; only that member is read (`load=False`: none, the dictionary is None)."""
    path = Path(sweep)
    if not path.exists():
        raise UserError(f"sweep {path} does not exist: pass the --output_dir of basic_l1_sweep.py")
    meta = read_sweep_json(path)
    arch, keys = meta["architecture"], list(meta["keys"])
    name = key_name(arch)
    own = f"--{name}" if name in ("l1", "k") else "--key"            # the flag that picks its members here
    listing = ", ".join(f"{v:g}" for v in keys)
    given = [(flag, v) for flag, v in (("--l1", l1), ("--k", k), ("--key", key)) if v is not None]
    if len(given) > 1:
        raise UserError(f"give one of {', '.join(f for f, _ in given)}, not several")
    if not given:
        if len(keys) != 1:
            raise UserError(f"{path} holds {len(keys)} dictionaries: choose one with {own} (one of {listing})")
        chosen = keys[0]
    else:
        flag, value = given[0]
        if flag != "--key" and flag != own:
            title = get_architecture(arch).title
            article = "an" if title[0] in "AEFHILMNORSX" else "a"                     # "an L1", "a TopK"
            raise UserError(f"{path} is {article} {title} sweep: choose its dictionary with {own} (one of {listing})")
        try:
            wanted = float(value)
        except ValueError:
            raise UserError(f"--key {value!r} is not a number: use one of {listing}") from None
        chosen = choose_key(keys, wanted, arch, where=f"the sweep {path}")
    return chosen, load_member(path, chosen, device) if load else None, meta


def read_sweep(path: str | Path, allow_unfinished: bool = False) -> dict[str, Any]:
    """sweep.json of a sweep folder with finished weights; a missing or unfinished sweep is a UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"sweep folder {path} does not exist: give a folder written by basic_l1_sweep.py")
    meta = read_sweep_json(path)
    if not (path / SWEEP_WEIGHTS).exists():
        raise UserError(f"{path} has {SWEEP_JSON} but no {SWEEP_WEIGHTS}: the sweep saved no weights yet")
    if not meta.get("finished", False) and not allow_unfinished:
        step = meta.get("progress", {}).get("step", "?")
        raise UserError(f"the sweep in {path} has not finished training (saved at step {step}): finish it with "
                        "basic_l1_sweep.py --resume, or pass --allow_unfinished to use its last saved weights")
    return meta


# ------------------------------------------------------------------------------------- derived outputs

DERIVED_FOLDERS = ("features",)
"""Folders of a sweep folder made from its weights by other tools (gather_high_activations.py, its dashboards)."""


def check_made_from(path: Path, recorded: str | None, sweep: str | Path, meta: dict[str, Any], tool: str) -> None:
    """A one-line UserError when `path`, derived from a sweep's weights with checksum `recorded`, was made from
    other weights than the sweep (its sweep.json `meta`) now holds; files of older versions record none."""
    current = meta.get("weights_sha256")
    if recorded and current and recorded != current:
        raise UserError(f"{path} was made from other weights than the sweep in {sweep} now holds (it was retrained "
                        f"or overwritten since): rerun {tool}")


def clear_derived(out: Path) -> None:
    """Delete what other tools derived from the sweep in `out` (features, dashboards, the evaluation report)."""
    import shutil
    from training.evaluate import PLOTS, REPORT_JSON, REPORT_MD
    for name in DERIVED_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (REPORT_JSON, REPORT_MD, *PLOTS.values()):
        (out / name).unlink(missing_ok=True)


def clear_sweep(out: Path, derived: bool = False) -> None:
    """Delete the sweep and checkpoint files of `out` (for a fresh run), left-over temporary files too, and with
    `derived` first what other tools made from the sweep."""
    if derived:
        clear_derived(out)
    names = [CHECKPOINT_JSON, LEGACY_CHECKPOINT_WEIGHTS, SWEEP_JSON, SWEEP_WEIGHTS, METRICS]
    for path in [out / n for n in names] + list(checkpoint_files(out).values()):
        path.unlink(missing_ok=True)
    remove_temporaries(out)


def remove_temporaries(out: Path) -> None:
    """Delete the temporary files a killed save left in `out`."""
    for path in out.glob("*.tmp"):
        if path.name.startswith(("checkpoint", "sweep.", "metrics.")):
            path.unlink(missing_ok=True)
