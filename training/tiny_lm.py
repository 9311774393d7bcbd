"""Train a small GPT-NeoX causal LM (and its byte-level BPE tokenizer) on any dataset, on CPU.

The project's embedded default model, `models/tiny-stdlib` (DEFAULT_MODEL_DIR), is this script's
output with its default config: 2 layers, d_model 128, 4 heads, d_mlp 512, a 4096-token BPE vocab,
trained on the built-in Python-docs corpus. The output folder is a Hugging Face model folder
(config.json, model.safetensors, tokenizer.json, ...) plus `training.json` (config, data sizes,
held-out loss, versions); it boots with `TransformerBridge.boot_transformers(str(folder))`.

Training data: the token rows (see training.text.pack_token_rows) of the first `max_train_tokens`
tokens of the training split are held in memory and shuffled each epoch; AdamW with linear warmup
and cosine decay. The held-out loss is the mean next-token cross-entropy over the eval split's rows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from training.cli import UserError, config_to_dict
from training.locks import output_lock
from training.corpus import BUILTIN_DATASET, document_bucket
from training.text import Document, available_splits, iter_documents, pack_token_rows

DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "models" / "tiny-stdlib"
"""Absolute path of the project's embedded default model."""

SPECIAL_TOKEN = "<|endoftext|>"
"""The one special token of a trained tokenizer (id 0): BOS, EOS, PAD and UNK at once."""


@dataclass
class TinyLMConfig:
    """How to train a small GPT-NeoX language model and its tokenizer."""

    dataset: str = BUILTIN_DATASET
    """Text to train on: 'python-docs' (built in), a local .txt/.jsonl/.parquet file or folder, or a HF hub dataset name[:config]."""
    dataset_split: str = "train"
    """Split of `dataset` to train on."""
    eval_split: str = "validation"
    """Split used for the held-out loss; when `dataset` has no such split, a hash-picked `heldout_fraction` of the training documents is held out instead."""
    heldout_fraction: float = 0.05
    """Fraction of training documents held out for evaluation when `dataset` has no `eval_split`."""
    text_column: str | None = None
    """Column holding the text (default: detected, e.g. 'text' or 'content')."""
    streaming: bool = False
    """Stream a hub dataset instead of downloading it whole."""
    tokenizer: str | None = None
    """A saved HF tokenizer folder to use instead of training a new BPE tokenizer (needed for a pre-tokenised dataset)."""
    vocab_size: int = 4096
    """Vocabulary size of the byte-level BPE tokenizer trained on the data (special token included)."""
    tokenizer_max_chars: int = 50_000_000
    """At most this many characters of training text are used to train the tokenizer."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block (must divide d_model)."""
    d_mlp: int = 512
    """Hidden width of each MLP."""
    dropout: float = 0.1
    """Dropout on attention weights and block outputs while training (the saved model runs without)."""
    context_length: int = 128
    """Tokens per training row; also the model's maximum position (max_position_embeddings)."""
    batch_size: int = 32
    """Rows per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays the learning rate to lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Steps of linear learning-rate warmup."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; not biases, norms or embeddings)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    steps: int = 1000
    """Optimizer steps (the cosine schedule spans them)."""
    eval_every: int = 100
    """Measure the held-out loss every this many steps (0: only at the end)."""
    max_minutes: float | None = None
    """Stop early after this many minutes of training (the run then depends on machine speed)."""
    max_train_tokens: int = 20_000_000
    """At most this many training tokens are tokenised and held in memory (further text is not read)."""
    max_eval_tokens: int = 500_000
    """At most this many held-out tokens are evaluated."""
    seed: int = 0
    """Seed of the model initialisation and batch order."""
    threads: int | None = None
    """Torch CPU threads (default: torch's choice)."""
    output_dir: str = "models/tiny-stdlib"
    """Folder to write the model, tokenizer and training.json to (replaced atomically at the end)."""
    overwrite: bool = False
    """Replace `output_dir` if it already holds files."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        """Raise a UserError for settings that cannot work."""
        checks = [
            (self.d_model % self.n_heads == 0, f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})"),
            (self.context_length >= 2, "context_length must be at least 2"),
            (self.vocab_size >= 260, "vocab_size must be at least 260 (256 bytes + specials)"),
            (self.batch_size >= 1 and self.steps >= 1, "batch_size and steps must be positive"),
            (0.0 < self.heldout_fraction < 1.0, "heldout_fraction must be between 0 and 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.lr > 0, "lr must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


# ------------------------------------------------------------------------------------------- data

@dataclass
class DataPlan:
    """Where training and held-out documents come from."""

    train: Callable[[], Iterator[Document]]
    """Fresh iterator over the training documents."""
    heldout: Callable[[], Iterator[Document]]
    """Fresh iterator over the held-out documents."""
    heldout_source: str
    """What the held-out documents are, in words."""


def plan_data(cfg: TinyLMConfig) -> DataPlan:
    """Training and held-out documents: the eval split when the dataset has one, else a hash split."""
    def docs(split: str) -> Iterator[Document]:
        return iter_documents(cfg.dataset, split, cfg.text_column, cfg.streaming)

    splits = available_splits(cfg.dataset)
    if cfg.dataset_split not in splits:
        raise UserError(f"dataset {cfg.dataset!r} has no split {cfg.dataset_split!r}; it has {splits}")
    if cfg.eval_split in splits and cfg.eval_split != cfg.dataset_split:
        return DataPlan(lambda: docs(cfg.dataset_split), lambda: docs(cfg.eval_split),
                        f"split {cfg.eval_split!r}")
    frac = cfg.heldout_fraction
    return DataPlan(lambda: (d for d in docs(cfg.dataset_split) if not _held_out(d, frac)),
                    lambda: (d for d in docs(cfg.dataset_split) if _held_out(d, frac)),
                    f"{frac:.0%} of split {cfg.dataset_split!r} picked by document hash")


def _held_out(doc: Document, fraction: float) -> bool:
    """Whether a document falls in the hash-picked held-out fraction."""
    return document_bucket(doc) >= 1.0 - fraction


def text_only(documents: Iterable[Document], max_chars: int) -> Iterator[str]:
    """The text documents, up to about `max_chars` characters in all; raise on token-id documents."""
    total = 0
    for doc in documents:
        if not isinstance(doc, str):
            raise UserError("this dataset is pre-tokenised, so no tokenizer can be trained on it; "
                            "pass --tokenizer with the folder of the tokenizer that made it")
        yield doc
        total += len(doc)
        if total >= max_chars:
            return


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, with SPECIAL_TOKEN (id 0) as BOS/EOS/PAD/UNK."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN,
                                   pad_token=SPECIAL_TOKEN, unk_token=SPECIAL_TOKEN)


def load_tokenizer(path: str) -> Any:
    """A saved HF tokenizer from a local folder."""
    from transformers import AutoTokenizer
    if not Path(path).is_dir():
        raise UserError(f"tokenizer folder {path!r} does not exist")
    return AutoTokenizer.from_pretrained(path)


def token_rows(documents: Iterable[Document], tokenizer: Any, context_length: int,
               max_tokens: int) -> torch.Tensor:
    """Packed rows of at most `max_tokens` tokens in all: int64 [n_rows, context_length]."""
    max_rows = max(1, max_tokens // context_length)
    rows: list[torch.Tensor] = []
    for row in pack_token_rows(documents, tokenizer, context_length):  # BOS as the generation stage does
        rows.append(torch.tensor(row, dtype=torch.int32))
        if len(rows) >= max_rows:
            break
    if not rows:
        return torch.zeros((0, context_length), dtype=torch.int64)
    return torch.stack(rows).long()


# ------------------------------------------------------------------------------------------ model

def build_model(cfg: TinyLMConfig, tokenizer: Any) -> Any:
    """A randomly initialised GPT-NeoX causal LM sized by `cfg`, seeded by `cfg.seed`."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(cfg.seed)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_mlp,
        max_position_embeddings=cfg.context_length, bos_token_id=tokenizer.bos_token_id,
        hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout,
        eos_token_id=sep, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep,
        tie_word_embeddings=False)
    return GPTNeoXForCausalLM(config)


def lr_at(step: int, cfg: TinyLMConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup then cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: Any, cfg: TinyLMConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on the 2-D weight matrices of the blocks only."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim >= 2 and "embed" not in name
        (decay if is_matrix else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def next_token_loss(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `tokens` int64 [batch, seq] under `model` (a scalar)."""
    logits = model(input_ids=tokens).logits  # [batch, seq, vocab]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def batches(n_rows: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless row indices [batch_size], a fresh seeded permutation each epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n_rows, generator=gen)
        for i in range(0, n_rows - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def train_model(model: Any, rows: torch.Tensor, cfg: TinyLMConfig,
                eval_rows: torch.Tensor | None = None) -> dict[str, Any]:
    """Train `model` on token rows int64 [n_rows, context_length]; return step/time/loss stats.

    Every `cfg.eval_every` steps the held-out loss on `eval_rows` [n_eval, context_length] is logged.
    """
    from tqdm import tqdm

    model.train()
    opt = make_optimizer(model, cfg)
    deadline = None if cfg.max_minutes is None else time.monotonic() + 60.0 * cfg.max_minutes
    tokens_per_step = cfg.batch_size * cfg.context_length
    curve: list[tuple[int, float]] = []
    heldout_curve: list[tuple[int, float]] = []
    every = max(1, cfg.steps // 100)
    smooth = float("nan")
    start = time.monotonic()
    bar = tqdm(total=cfg.steps, disable=not cfg.progress, unit="step", dynamic_ncols=True)
    done = 0
    for idx in batches(len(rows), cfg.batch_size, cfg.seed):  # idx: [batch_size]
        if done >= cfg.steps or (deadline is not None and time.monotonic() > deadline):
            break
        lr = lr_at(done, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = next_token_loss(model, rows[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        value = loss.item()
        smooth = value if math.isnan(smooth) else 0.98 * smooth + 0.02 * value
        if done % every == 0 or done == cfg.steps - 1:
            curve.append((done, round(value, 4)))
        done += 1
        if cfg.eval_every and eval_rows is not None and len(eval_rows) and done % cfg.eval_every == 0:
            heldout_curve.append((done, round(evaluate_loss(model, eval_rows, cfg.batch_size), 4)))
            bar.write(f"step {done}: held-out loss {heldout_curve[-1][1]:.4f}")
            model.train()
        elapsed = time.monotonic() - start
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.3f}", lr=f"{lr:.1e}",
                        tok_s=f"{done * tokens_per_step / max(elapsed, 1e-9):,.0f}")
    bar.close()
    wall = time.monotonic() - start
    model.eval()
    return {"steps": done, "tokens_trained": done * tokens_per_step, "wall_seconds": round(wall, 1),
            "tokens_per_second": round(done * tokens_per_step / max(wall, 1e-9)),
            "epochs": round(done * cfg.batch_size / len(rows), 2),
            "final_train_loss_smoothed": round(smooth, 4), "loss_curve": curve,
            "heldout_curve": heldout_curve}


@torch.no_grad()
def evaluate_loss(model: Any, rows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over all predicted positions of rows int64 [n, seq]."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]  # [b, seq]
        n = batch[:, 1:].numel()
        total += next_token_loss(model, batch).item() * n
        count += n
    return total / count if count else float("nan")


def unigram_loss(train_rows: torch.Tensor, eval_rows: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) of the held-out targets under the add-one-smoothed training unigram."""
    counts = torch.bincount(train_rows.reshape(-1), minlength=vocab_size).double() + 1.0  # [vocab]
    log_probs = (counts / counts.sum()).log()
    targets = eval_rows[:, 1:].reshape(-1)
    return float(-log_probs[targets].mean()) if targets.numel() else float("nan")


# ----------------------------------------------------------------------------------------- saving

def save_atomically(model: Any, tokenizer: Any, info: dict[str, Any], output_dir: Path) -> None:
    """Write model (safetensors), tokenizer and training.json to a temp folder, then rename it into place."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.{os.getpid()}.tmp"
    old = output_dir.parent / f".{output_dir.name}.{os.getpid()}.old.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    if output_dir.exists():
        output_dir.rename(old)
    tmp.rename(output_dir)
    shutil.rmtree(old, ignore_errors=True)


def check_bridge(path: Path, prompt: str = "def main():\n    return") -> tuple[int, ...]:
    """Boot the saved model in TransformerLens' TransformerBridge, run_with_cache, check logits are finite."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
    tokens = bridge.to_tokens(prompt)  # [1, seq]
    logits, cache = bridge.run_with_cache(tokens)  # [1, seq, vocab]
    if not torch.isfinite(logits).all() or len(cache) == 0:
        raise RuntimeError(f"the model saved in {path} gives non-finite logits or an empty cache")
    return tuple(logits.shape)


def _check_output_dir(cfg: TinyLMConfig) -> Path:
    """The output folder, refusing to replace one that holds files unless --overwrite."""
    out = Path(cfg.output_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise UserError(f"output_dir {str(out)!r} already holds files; pass --overwrite to replace it "
                        "or choose another --output_dir")
    return out


# ------------------------------------------------------------------------------------------- main

def train_tiny_lm(cfg: TinyLMConfig) -> dict[str, Any]:
    """Train tokenizer + model as `cfg` says, save them to `cfg.output_dir`; return training.json's content."""
    cfg.validate()
    out = _check_output_dir(cfg)
    with output_lock(out):  # one writer per output folder
        return _train(cfg, out)


def _train(cfg: TinyLMConfig, out: Path) -> dict[str, Any]:
    """Train and save, the output folder `out` locked."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()
    plan = plan_data(cfg)
    tokenizer = (load_tokenizer(cfg.tokenizer) if cfg.tokenizer
                 else train_tokenizer(text_only(plan.train(), cfg.tokenizer_max_chars), cfg.vocab_size))
    tokenizer.model_max_length = cfg.context_length
    train_rows = token_rows(plan.train(), tokenizer, cfg.context_length, cfg.max_train_tokens)
    eval_rows = token_rows(plan.heldout(), tokenizer, cfg.context_length, cfg.max_eval_tokens)
    if len(train_rows) < cfg.batch_size:
        raise UserError(f"the training data gives only {len(train_rows)} rows of {cfg.context_length} tokens, "
                        f"fewer than batch_size {cfg.batch_size}; use more text or a smaller batch/context")
    prep_seconds = time.monotonic() - t0
    print(f"data: {len(train_rows):,} training rows ({train_rows.numel():,} tokens), {len(eval_rows):,} "
          f"held-out rows ({plan.heldout_source}); vocab {len(tokenizer)}; prepared in {prep_seconds:.1f}s",
          file=sys.stderr)

    model = build_model(cfg, tokenizer)
    stats = train_model(model, train_rows, cfg, eval_rows)
    heldout = evaluate_loss(model, eval_rows, cfg.batch_size) if len(eval_rows) else None
    unigram = unigram_loss(train_rows, eval_rows, len(tokenizer)) if len(eval_rows) else None
    info = {
        "config": config_to_dict(cfg) | {"output_dir": out.name},
        "data": {"dataset": cfg.dataset, "train_rows": len(train_rows), "train_tokens": train_rows.numel(),
                 "heldout": plan.heldout_source, "heldout_rows": len(eval_rows),
                 "heldout_tokens": eval_rows.numel(), "vocab_size": len(tokenizer)}
                | _corpus_size(cfg),
        "model": {"parameters": sum(p.numel() for p in model.parameters()),
                  "architecture": "GPTNeoXForCausalLM"},
        "training": stats | {"prepare_seconds": round(prep_seconds, 1)},
        "heldout_loss": None if heldout is None else round(heldout, 4),
        "unigram_heldout_loss": None if unigram is None else round(unigram, 4),
        "versions": _versions(),
    }
    model.config.hidden_dropout = model.config.attention_dropout = 0.0  # the saved model has no dropout
    save_atomically(model, tokenizer, info, out)
    check_bridge(out)
    print(f"{heldout_line(heldout, unigram, plan.heldout_source, cfg.context_length)}; "
          f"{stats['tokens_trained']:,} tokens in {stats['wall_seconds']:.0f}s; saved to {out}",
          file=sys.stderr)
    return info


def heldout_line(heldout: float | None, unigram: float | None, source: str, context_length: int) -> str:
    """The held-out loss and its unigram baseline, or why there is none (an empty held-out set)."""
    if heldout is None or unigram is None:
        return (f"no held-out loss: the held-out text ({source}) gives no row of {context_length} tokens (raise "
                "--heldout_fraction, or give a dataset with an eval split)")
    return f"held-out loss {heldout:.4f} nats/token (unigram baseline {unigram:.4f})"


def _corpus_size(cfg: TinyLMConfig) -> dict[str, Any]:
    """Size of the built-in corpus (documents, characters) when it is the dataset; else nothing."""
    if cfg.dataset != BUILTIN_DATASET:
        return {}
    from training.corpus import corpus_stats
    return {"corpus": corpus_stats()}


def _versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the result."""
    import tokenizers
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


__all__ = ["DEFAULT_MODEL_DIR", "SPECIAL_TOKEN", "TinyLMConfig", "train_tiny_lm", "train_tokenizer",
           "build_model", "evaluate_loss", "unigram_loss", "check_bridge", "save_atomically", "lr_at",
           "token_rows", "plan_data", "DataPlan"]
