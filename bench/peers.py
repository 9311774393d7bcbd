"""Peer SAE trainers for the quality benchmark: SAELens, dictionary_learning, sparsify, and a plain reference.

Each peer trains ONE sparse autoencoder on the first `tokens` rows of a float32 `.npy` of activations
[n, d_in], read in order, `batch_size` rows per step, with Adam at `lr`; everything else is that library's
own default for its standard trainer. The peer libraries live in side venvs under `.bench_envs/<name>`
(created on first use by `ensure_env`), and their training runs as a subprocess there
(`bench/peers/run_<name>.py`); the "reference" peer is ~40 lines of torch run in our own venv.

Every runner writes to its output folder:
  weights.safetensors   float32 W_enc [d_in, d_hidden], b_enc [d_hidden], W_dec [d_hidden, d_in], b_dec [d_in],
                        in RAW activation space (any input scaling the library applied folded back in)
  spec.json             {"peer", "library_version", "activation": "relu" | "topk", "k", "subtract_b_dec",
                         "tokens", "batch_size", "lr", "seconds", "settings": {...}}

The common encode rule (the one `encode_peer` implements, and each runner checks against the library's own
forward pass before saving):
    pre   = (x - b_dec if subtract_b_dec else x) @ W_enc + b_enc
    codes = relu(pre)                       # topk: keep the k largest pre per row, then relu
    x_hat = codes @ W_dec + b_dec

    from bench.peers import train_peer, load_peer, encode_peer, decode_peer
    spec = train_peer("saelens", Path("acts.npy"), Path("out/saelens"), tokens=1_000_000, d_hidden=4096, l1=5.0)
    weights, spec = load_peer(Path("out/saelens"))
    codes = encode_peer(weights, spec, x); x_hat = decode_peer(weights, codes)

Settings and scales (full detail in each runner's docstring and in spec["settings"]):
  saelens              StandardTrainingSAE + SAETrainer.fit; no warm-ups, constant lr, grad clip 1.0, decoder
                       unconstrained (L1 weighted by ||W_dec row||), l1 default 1.0, inputs raw by default
  dictionary_learning  StandardTrainer via trainSAE; lr/sparsity warm-ups 1000/2000 capped at 5%/10% of the
                       steps, unit-norm decoder (ConstrainedAdam), l1 default 0.1, inputs raw by default
  sparsify             TopK SparseCoder via Trainer.fit; optimizer "adam" (its default is "signum"), warm-up
                       1000 capped at 5% of the steps then linear decay to 0, FVU loss, k default 32
  reference            ReLU + L1 in plain torch, constant lr, unit-norm decoder rows, l1 default 3.0
The three L1 peers minimise the same form, sum-over-d squared error + l1 * L1 of the codes (SAELens weights each
code by its decoder norm), so one l1 means the same on the same data; but it is in units of the activations
they train on: raw by default. To train on normalised inputs pass the library's own option (see train_peer).

Smoke test (by hand; installs the side venvs, needs PyPI):  python bench/peers.py --smoke /tmp/peers_smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
RUNNERS = Path(__file__).resolve().parent / "peers"

PEERS = ("saelens", "dictionary_learning", "sparsify", "reference")

TORCH_PIN = "torch==2.13.0"
"""Every side venv gets exactly this torch (a CPU wheel lies on local disk; anything else pulls GBs of CUDA)."""

PACKAGES: dict[str, list[str]] = {
    "saelens": ["sae-lens==6.54.12"],
    "dictionary_learning": ["dictionary-learning==0.1.0"],
    "sparsify": ["eai-sparsify==1.3.3"],
}
"""PyPI requirement(s) per peer, pinned to the releases this runner code was written against."""

IMPORT_CHECK = {
    "saelens": "from sae_lens import StandardTrainingSAE; from sae_lens.training.sae_trainer import SAETrainer",
    "dictionary_learning": "from dictionary_learning.training import trainSAE; "
                           "from dictionary_learning.trainers.standard import StandardTrainer",
    "sparsify": "from sparsify import SparseCoderConfig, TrainConfig, Trainer",
}
"""What each runner imports from its library; checked once after the install."""

EXTRA = ["numpy", "safetensors"]
"""What every runner itself imports besides torch and the library."""

MARKER = ".bench_env_ok"
RECIPE = 2
"""Bump when the install steps change: venvs built by an older recipe are rebuilt."""

WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def _venv_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd: list, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _env_ready(py: Path, marker: Path, want: dict) -> bool:
    if not (marker.exists() and py.exists()):
        return False
    try:
        return json.loads(marker.read_text()).get("requested") == want
    except (OSError, ValueError):
        return False


def ensure_env(name: str, root: Path = REPO / ".bench_envs") -> Path:
    """Python of the side venv for peer `name`, creating `root/<name>` on first use: a fresh venv, torch==2.13.0
    installed first and alone, then the library (+ numpy, safetensors) under a constraints file pinning
    torch==2.13.0, then a check that the library imports. "reference" runs in our own venv: sys.executable.

    Idempotent: a finished venv carries a marker file (.bench_env_ok: what was asked for, `pip freeze`, any
    fix-ups); a venv without it (an interrupted install) or built by another recipe is rebuilt from scratch.
    Concurrent callers are serialised by a lock file next to the venv."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")
    if name == "reference":
        return Path(sys.executable)
    root = Path(root)
    env = root / name
    py = _venv_python(env)
    want = {"torch": TORCH_PIN, "packages": PACKAGES[name] + EXTRA, "recipe": RECIPE}
    marker = env / MARKER
    if _env_ready(py, marker, want):
        return py
    root.mkdir(parents=True, exist_ok=True)
    import fcntl
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _env_ready(py, marker, want):  # built by another process while we waited
            return py
        _build_env(name, env, py, root, want, marker)
    return py


def _build_env(name: str, env: Path, py: Path, root: Path, want: dict, marker: Path) -> None:
    import shutil
    constraints = root / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    if env.exists():
        shutil.rmtree(env)
    base = getattr(sys, "_base_executable", None) or sys.executable
    _run([base, "-m", "venv", env])
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    _run(pip + [TORCH_PIN])  # first and alone: pip takes the local CPU wheel
    _run(pip + ["-c", constraints] + PACKAGES[name] + EXTRA)
    fixups = []
    # A PyPI torchvision (nnsight asks for one) is built against another torch and fails to import beside
    # torch 2.13.0 ("operator torchvision::nms does not exist"), which breaks `import transformers` models and
    # with it `import dictionary_learning`. No runner needs torchvision: remove it when it cannot be imported.
    has_tv = subprocess.run([str(py), "-c", "import importlib.util, sys; "
                             "sys.exit(3 if importlib.util.find_spec('torchvision') else 0)"]).returncode == 3
    if has_tv and subprocess.run([str(py), "-c", "import torchvision"], capture_output=True).returncode != 0:
        _run([py, "-m", "pip", "uninstall", "-y", "torchvision"])
        fixups.append("uninstalled torchvision (a build for another torch; fails to import beside torch 2.13.0)")
    version = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"],
                             check=True, capture_output=True, text=True).stdout.strip()
    if not version.startswith(TORCH_PIN.split("==")[1]):
        raise RuntimeError(f"side venv {env} ended up with torch {version}, not {TORCH_PIN}")
    check = subprocess.run([str(py), "-c", IMPORT_CHECK[name]], capture_output=True, text=True,
                           env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled"))
    if check.returncode != 0:
        raise RuntimeError(f"side venv {env}: `{IMPORT_CHECK[name]}` failed:\n{check.stderr[-3000:]}")
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], check=True, capture_output=True, text=True).stdout
    marker.write_text(json.dumps({"requested": want, "torch": version, "fixups": fixups,
                                  "freeze": freeze.splitlines(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                 indent=1))


# ---------------------------------------------------------------- the common encode/decode rule

def encode_peer(weights: dict[str, torch.Tensor], spec: dict, x: torch.Tensor) -> torch.Tensor:
    """codes [n, d_hidden] = relu((x - b_dec if subtract_b_dec else x) @ W_enc + b_enc), keeping only the k
    largest pre-activations per row first when spec["activation"] == "topk"."""
    W_enc, b_enc, b_dec = weights["W_enc"], weights["b_enc"], weights["b_dec"]
    x = x.to(W_enc.dtype)
    pre = (x - b_dec if spec["subtract_b_dec"] else x) @ W_enc + b_enc
    act = spec["activation"]
    if act == "relu":
        return torch.relu(pre)
    if act == "topk":
        k = int(spec["k"])
        if not 0 < k <= pre.shape[-1]:
            raise ValueError(f"topk with k={k} and d_hidden={pre.shape[-1]}")
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))
    raise ValueError(f"unknown activation {act!r} (expected 'relu' or 'topk')")


def decode_peer(weights: dict[str, torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    """x_hat [n, d_in] = codes @ W_dec + b_dec."""
    return codes.to(weights["W_dec"].dtype) @ weights["W_dec"] + weights["b_dec"]


def load_peer(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, spec) from a runner's output folder; checks names and shapes."""
    from safetensors.torch import load_file
    out = Path(out)
    spec = json.loads((out / "spec.json").read_text())
    weights = load_file(str(out / "weights.safetensors"))
    missing = set(WEIGHT_NAMES) - set(weights)
    if missing:
        raise ValueError(f"{out}/weights.safetensors lacks {sorted(missing)}")
    d_in, d_hidden = weights["W_enc"].shape
    want = {"W_enc": (d_in, d_hidden), "b_enc": (d_hidden,), "W_dec": (d_hidden, d_in), "b_dec": (d_in,)}
    for name, shape in want.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{out}: {name} has shape {tuple(weights[name].shape)}, expected {shape}")
    if spec.get("activation") not in ("relu", "topk"):
        raise ValueError(f"{out}/spec.json: activation {spec.get('activation')!r}")
    return weights, spec


# ---------------------------------------------------------------- training a peer

def _pump(stream, sink, tail: deque | None) -> None:
    for line in iter(stream.readline, ""):
        sink.write(line)
        sink.flush()
        if tail is not None:
            tail.append(line)
    stream.close()


def train_peer(name: str, train_file: Path, out: Path, *, tokens: int, batch_size: int = 4096, lr: float = 1e-3,
               d_hidden: int, k: int | None = None, l1: float | None = None, seed: int = 0,
               options: dict | None = None, env_root: Path | None = None, timeout: float | None = None,
               threads: int | None = None, reuse: bool = False) -> dict:
    """Train one SAE of peer `name` on the first `tokens` rows of `train_file` (float32 .npy [n, d_in]) and
    write weights.safetensors + spec.json into `out`; returns the spec. Runs bench/peers/run_<name>.py in the
    peer's side venv (created on first use), streaming its output; raises RuntimeError with the tail of its
    stderr when it fails. `options`: library-specific overrides (JSON-able; each runner's OPTIONS lists what it
    accepts and refuses anything else), recorded in the spec's settings; e.g. input normalisation that the
    library folds back: saelens {"normalize_activations": "expected_average_only_in"}, dictionary_learning
    {"normalize_activations": True}, reference {"normalize": True}. `timeout`: seconds, None for no limit.
    `threads`: torch's CPU threads in the runner (OMP_NUM_THREADS; default: inherited) - on a shared machine
    give every peer the same number, and 1 when other jobs hold the cores (spinning threads then cost 10-50x).
    `reuse`: return the SAE already in `out` when its request.json records this very request (same training
    file, size and modification time, runner source, library environment and arguments) instead of training
    again; peer training is deterministic, so this only saves time."""
    import threading
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")
    py = ensure_env(name) if env_root is None else ensure_env(name, env_root)
    runner = RUNNERS / f"run_{name}.py"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = Path(train_file).resolve()
    request = {"peer": name, "train_file": str(train), "train_size": train.stat().st_size,
               "train_mtime_ns": train.stat().st_mtime_ns, "tokens": tokens, "batch_size": batch_size,
               "lr": float(lr), "d_hidden": d_hidden, "k": k, "l1": None if l1 is None else float(l1), "seed": seed,
               "options": options or {}, "python": str(py),
               "runner_sha256": hashlib.sha256(runner.read_bytes() + (RUNNERS / "_common.py").read_bytes()).hexdigest()}
    if reuse and (out / "weights.safetensors").exists() and (out / "spec.json").exists() \
            and (out / "request.json").exists() and json.loads((out / "request.json").read_text()) == request:
        print(f"[{name}] reusing the SAE in {out} (request.json matches)", flush=True)
        return json.loads((out / "spec.json").read_text())
    (out / "request.json").unlink(missing_ok=True)
    for stale in ("weights.safetensors", "spec.json"):
        (out / stale).unlink(missing_ok=True)
    cmd = [str(py), str(runner), "--train_file", str(Path(train_file).resolve()), "--out", str(out.resolve()),
           "--tokens", str(tokens), "--batch_size", str(batch_size), "--lr", repr(float(lr)),
           "--d_hidden", str(d_hidden), "--seed", str(seed), "--options", json.dumps(options or {})]
    if k is not None:
        cmd += ["--k", str(k)]
    if l1 is not None:
        cmd += ["--l1", repr(float(l1))]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="disabled", WANDB_DISABLED="true", TOKENIZERS_PARALLELISM="false", TQDM_MININTERVAL="10")
    env.pop("PYTHONPATH", None)  # the side venv must not see our venv's packages
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"[{name}] " + " ".join(cmd), flush=True)
    tail: deque = deque(maxlen=60)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, None), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, tail), daemon=True)]
    for t in pumps:
        t.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    for t in pumps:
        t.join()
    if rc != 0 or not (out / "spec.json").exists():
        why = "timed out" if rc is None else f"exited with status {rc}"
        raise RuntimeError(f"peer {name!r} {why} ({runner.name} in {py}); last lines of its stderr:\n"
                           + "".join(tail))
    (out / "request.json").write_text(json.dumps(request, indent=1))
    return json.loads((out / "spec.json").read_text())


# ---------------------------------------------------------------- smoke test (by hand: needs PyPI for the venvs)

def make_synthetic(path: Path, n: int = 200_000, d_in: int = 64, n_dirs: int = 512, mean_active: float = 8.0,
                   seed: int = 0) -> Path:
    """A float32 .npy [n, d_in] of sparse non-negative combinations (exponential coefficients, each direction
    active with probability mean_active / n_dirs) of n_dirs random unit directions, plus a constant offset,
    scaled so that E||x||^2 = d_in (the scale the L1 defaults assume)."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_dirs, d_in))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    x = np.empty((n, d_in), dtype=np.float64)
    for i in range(0, n, 20_000):
        m = min(20_000, n - i)
        coef = rng.exponential(1.0, (m, n_dirs)) * (rng.random((m, n_dirs)) < mean_active / n_dirs)
        x[i:i + m] = coef @ dirs
    x += 0.3 * dirs[:4].sum(0)
    x *= np.sqrt(d_in / (x ** 2).sum(1).mean())
    np.save(path, x.astype(np.float32))
    return path


@torch.no_grad()
def score(weights: dict[str, torch.Tensor], spec: dict, x: torch.Tensor) -> dict:
    """L0 (mean nonzero codes per row) and FVU = sum||x - x_hat||^2 / sum||x - mean||^2 on rows x."""
    codes = encode_peer(weights, spec, x)
    x_hat = decode_peer(weights, codes)
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    return {"L0": (codes > 0).float().sum(-1).mean().item(), "FVU": fvu.item(),
            "dead": int(((codes > 0).sum(0) == 0).sum().item())}


def smoke(work: Path, peers: tuple[str, ...] = PEERS, tokens: int = 102_400, batch_size: int = 1024,
          d_hidden: int = 512, l1: float = 3.0, k: int = 32, held_out: int = 20_000,
          threads: int | None = 1) -> list[dict]:
    """Train every peer in `peers` on a synthetic .npy in `work` (made once) and print L0 / FVU / dead
    features on held-out rows, with the training seconds each runner reported."""
    work.mkdir(parents=True, exist_ok=True)
    data = work / "acts.npy"
    if not data.exists():
        make_synthetic(data)
    arr = np.load(data, mmap_mode="r")
    x_test = torch.from_numpy(np.array(arr[-held_out:], dtype=np.float32))
    assert tokens <= arr.shape[0] - held_out
    rows = []
    for name in peers:
        spec = train_peer(name, data, work / name, tokens=tokens, batch_size=batch_size, d_hidden=d_hidden,
                          l1=None if name == "sparsify" else l1, k=k if name == "sparsify" else None,
                          threads=threads)
        weights, spec = load_peer(work / name)
        rows.append({"peer": name, "version": spec["library_version"], "activation": spec["activation"],
                     **score(weights, spec, x_test), "seconds": spec["seconds"]})
    print(f"\n{tokens} tokens, batch {batch_size}, lr 1e-3, d_in {arr.shape[1]}, d_hidden {d_hidden}, "
          f"l1 {l1} (relu peers), k {k} (sparsify), {threads or 'default'} torch thread(s); "
          f"scored on the last {held_out} rows")
    print(f"{'peer':<20} {'version':<18} {'act':<5} {'L0':>7} {'FVU':>7} {'dead':>5} {'seconds':>8}")
    for r in rows:
        print(f"{r['peer']:<20} {r['version']:<18} {r['activation']:<5} {r['L0']:7.1f} {r['FVU']:7.3f} "
              f"{r['dead']:5d} {r['seconds']:8.1f}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", type=Path, metavar="DIR", default=None,
                    help="build the side venvs, train every peer on a synthetic .npy in DIR, print L0/FVU")
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    ap.add_argument("--tokens", type=int, default=102_400)
    ap.add_argument("--batch_size", type=int, default=1024)
    ap.add_argument("--l1", type=float, default=3.0)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per runner (0: torch's default)")
    args = ap.parse_args()
    if args.smoke is None:
        ap.error("nothing to do: pass --smoke DIR")
    smoke(args.smoke, tuple(args.peers), tokens=args.tokens, batch_size=args.batch_size, l1=args.l1, k=args.k,
          threads=args.threads or None)
