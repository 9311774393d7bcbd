"""explain_features.py: explain and score every feature of a features.json with a chat model -> interp.jsonl.

Workers (`concurrency` of them, so never more requests in flight) take features in id order; each feature is
explained, then detection and fuzzing are asked when chosen, and its record is appended to interp.jsonl.
A rerun skips the features whose record already covers the chosen scorings with the same settings, and
the reply cache answers any prompt asked before: a killed run resumes without asking anything again.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from training.autointerp import prompts as P
from training.autointerp.client import (RESPONSE_FORMATS, ChatClient, ReplyCache, RequestFailed, Usage, api_key,
                                        price_of)
from training.autointerp.files import append_line, read_lines
from training.autointerp.scoring import score_detail
from training.cli import UserError
from training.feature_file import FEATURES_JSON, FeatureFile
from training.locks import output_lock

SCORINGS = ("clearness", "detection", "fuzzing")


@dataclass
class ExplainConfig:
    """Which features to explain, with which chat model, how to score the explanations, and where to write."""

    features: str | None = None
    """features.json (or its folder) written by gather_high_activations.py (dictionary features or --neurons)."""
    model: str = "gpt-4o-mini"
    """Chat model name at the endpoint."""
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 for vLLM (default: $OPENAI_BASE_URL, else OpenAI)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable (or .env entry) holding the API key; the key itself is never a flag."""
    env_file: str = ".env"
    """File of KEY=VALUE lines read for the key when the environment has none."""
    features_range: str | None = None
    """Feature ids start:stop (Python slice, e.g. 0:200) to explain (default: all)."""
    scoring: list[str] = field(default_factory=lambda: ["clearness"], metadata={"choices": list(SCORINGS)})
    """clearness (always done: the explanation rates itself), detection, fuzzing."""
    n_examples: int = 10
    """Top-activating examples shown to explain a feature (at most 10)."""
    n_detect: int = 10
    """Held-out activating examples per feature for detection and for fuzzing."""
    n_negative: int = 10
    """Non-activating examples per feature for detection (from features.json's random windows)."""
    negative_max: float = 0.0
    """A random window is non-activating when its largest activation is at most this x the feature's max
    (raise it for dense neurons, which fire almost everywhere)."""
    seed: int = 0
    """Seed of the example shuffles."""
    concurrency: int = 8
    """Requests in flight at most."""
    max_retries: int = 6
    """Retries of a request after 429, 5xx, a timeout or a connection error."""
    backoff: float = 1.0
    """First retry wait in seconds (doubled each retry)."""
    timeout: float = 60.0
    """Seconds to wait for one reply."""
    temperature: float = 0.0
    """Sampling temperature."""
    max_tokens: int = 800
    """Reply length limit in tokens."""
    response_format: str = field(default="json_schema", metadata={"choices": list(RESPONSE_FORMATS)})
    """Structured output asked for: json_schema, json_object (older servers), or text (parse the JSON out of it)."""
    price_input: float | None = None
    """USD per million input tokens (default: known for some OpenAI models)."""
    price_output: float | None = None
    """USD per million output tokens."""
    output: str | None = None
    """Results file (default: interp.jsonl next to features.json); its reply cache is {output}.cache.jsonl."""
    overwrite: bool = False
    """Start the results file over (the cache is kept)."""


def features_path(cfg: ExplainConfig) -> Path:
    """The features.json the config names."""
    if not cfg.features:
        raise UserError("give --features (a features.json written by gather_high_activations.py)")
    p = Path(cfg.features)
    return p / FEATURES_JSON if p.is_dir() else p


def parse_range(text: str | None, n: int) -> range:
    """--features_range start:stop (either may be empty) as a range over 0..n-1."""
    if not text:
        return range(n)
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start = int(parts[0]) if parts[0].strip() else 0
        stop = int(parts[1]) if parts[1].strip() else n
    except ValueError:
        raise UserError(f"--features_range {text!r}: write start:stop, e.g. 0:200") from None
    r = range(n)[slice(start, stop)]
    if not len(r):
        raise UserError(f"--features_range {text} selects no feature: the file has features 0..{n - 1}")
    return r


def check_config(cfg: ExplainConfig) -> None:
    """One-line errors for impossible flag values."""
    for name in ("n_examples", "concurrency"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
    for name in ("n_detect", "n_negative", "max_retries"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative (got {getattr(cfg, name)})")
    if cfg.n_examples > P.MAX_EXAMPLES:
        raise UserError(f"--n_examples {cfg.n_examples}: at most {P.MAX_EXAMPLES} examples are shown")
    if cfg.timeout <= 0 or cfg.backoff < 0:
        raise UserError("--timeout must be positive and --backoff not negative")
    bad = [s for s in cfg.scoring if s not in SCORINGS]
    if bad:
        raise UserError(f"--scoring {bad[0]}: choose from {', '.join(SCORINGS)}")


def settings(cfg: ExplainConfig, header: dict[str, Any]) -> str:
    """Hash of everything that changes the answers (not the scorings chosen: those can be added later)."""
    keys = ("model", "n_examples", "n_detect", "n_negative", "negative_max", "seed", "temperature", "max_tokens",
            "response_format")
    return P.short_hash({**{k: getattr(cfg, k) for k in keys}, "templates": P.templates_hash(),
                         "source": header.get("source"), "n_tokens": header.get("n_tokens")})


async def score_feature(client: ChatClient, feat: dict[str, Any], cfg: ExplainConfig, sig: str
                        ) -> dict[str, Any]:
    """The interp.jsonl record of one feature (see training.autointerp.files)."""
    fid = int(feat["id"])
    rec: dict[str, Any] = {"feature": fid, "model": cfg.model, "settings": sig, "explanation": None,
                           "clearness": None, "prompts": {}, "errors": {}}
    if not feat["top"]:
        rec["skipped"] = "never fired: nothing to explain"
        return rec
    tokens = [0, 0]

    async def ask(step: str, messages: P.Messages, schema: dict[str, Any]) -> str | None:
        rec["prompts"][step] = P.short_hash(messages)
        try:
            reply = await client.complete(fid, messages, schema)
        except RequestFailed as e:
            rec["errors"][step] = f"request failed: {e}"
            return None
        tokens[0] += reply.prompt_tokens
        tokens[1] += reply.completion_tokens
        return reply.content

    text = await ask("explain", P.explain_messages(feat, cfg.n_examples), P.EXPLAIN_SCHEMA)
    if text is not None:
        try:
            rec.update(P.parse_explanation(text))
            rec["explanation"] = rec.pop("description")
        except P.Unusable as e:
            rec["errors"]["explain"] = str(e)
    rng = np.random.default_rng([cfg.seed, fid])
    for step in ("detection", "fuzzing"):
        if step not in cfg.scoring:
            continue
        rec[step] = None
        if rec["explanation"] is None:
            rec["errors"][step] = "no usable explanation"
            continue
        if step == "detection":
            lines, truth = P.detection_set(feat, cfg.n_examples, cfg.n_detect, cfg.n_negative, cfg.negative_max, rng)
            system = P.DETECT_SYSTEM
        else:
            lines, truth = P.fuzzing_set(feat, cfg.n_examples, cfg.n_detect, rng)
            system = P.FUZZ_SYSTEM
        if not any(truth) or all(truth):
            rec["errors"][step] = (f"{step} needs both kinds of examples: {sum(truth)} positive, "
                                   f"{len(truth) - sum(truth)} negative"
                                   + (" (no non-activating window: raise --negative_max, or regather with "
                                      "--n_random)" if step == "detection" and all(truth) else ""))
            continue
        text = await ask(step, P.answers_messages(system, rec["explanation"], lines), P.ANSWERS_SCHEMA)
        if text is None:
            continue
        try:
            detail = score_detail(truth, P.parse_answers(text, len(lines)))
        except P.Unusable as e:
            rec["errors"][step] = str(e)
            continue
        rec[step] = detail.pop("balanced_accuracy")
        rec[f"{step}_detail"] = detail
    rec["usage"] = {"prompt_tokens": tokens[0], "completion_tokens": tokens[1]}
    return rec


def covers(rec: dict[str, Any], sig: str, scoring: list[str]) -> bool:
    """Whether a stored record already answers this run: same settings, every chosen scoring present, and no
    request that failed after its retries (those are asked again; unusable replies are not: same answer)."""
    failed = any(str(e).startswith("request failed") for e in rec.get("errors", {}).values())
    return rec.get("settings") == sig and not failed and ("skipped" in rec or all(
        s == "clearness" or s in rec for s in scoring))


@dataclass
class ExplainResult:
    """What a run did."""

    path: Path
    n_selected: int
    n_done_before: int
    n_written: int
    errors: dict[str, int]
    usage: Usage
    seconds: float
    price: tuple[float, float] | None
    model: str
    first_errors: list[str]

    def __str__(self) -> str:
        u = self.usage
        lines = [f"{self.n_written:,} features done in {self.seconds:.1f} s ({self.n_done_before:,} of "
                 f"{self.n_selected:,} were already done) -> {self.path}"]
        if self.errors:
            lines.append("unusable or failed (not counted): " + ", ".join(f"{k} {v:,}" for k, v in self.errors.items()))
            lines += [f"  {e}" for e in self.first_errors]
        cost = ""
        if self.price is not None:
            usd = (u.prompt_tokens * self.price[0] + u.completion_tokens * self.price[1]) / 1e6
            cost = f"; cost ${usd:.4f} ({self.model} at ${self.price[0]:g}/${self.price[1]:g} per M tokens)"
        lines.append(f"tokens: {u.prompt_tokens:,} prompt + {u.completion_tokens:,} completion in {u.requests:,} "
                     f"requests ({u.retries:,} retries, {u.cached:,} replies from the cache){cost}")
        return "\n".join(lines)


async def _run(cfg: ExplainConfig, todo: Iterator[dict[str, Any]], n_todo: int, client: ChatClient, sig: str,
               out: Path, errors: dict[str, int], first_errors: list[str]) -> int:
    """Workers over the features to do; returns how many records were written."""
    written = 0
    lock = asyncio.Lock()
    bar = tqdm(total=n_todo, desc="explaining", unit="feature", dynamic_ncols=True)

    async def worker() -> None:
        nonlocal written
        while True:
            async with lock:
                feat = next(todo, None)
            if feat is None:
                return
            rec = await score_feature(client, feat, cfg, sig)
            append_line(out, rec)
            written += 1
            for step, why in rec["errors"].items():
                errors[step] = errors.get(step, 0) + 1
                if len(first_errors) < 5:
                    first_errors.append(f"feature {rec['feature']} {step}: {why}")
            bar.update()
            bar.set_postfix(tokens=client.usage.prompt_tokens + client.usage.completion_tokens, refresh=False)

    try:
        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    finally:
        bar.close()
        await client.close()
    return written


def explain_features(cfg: ExplainConfig) -> ExplainResult:
    """Explain and score the chosen features, appending one record per feature to interp.jsonl."""
    check_config(cfg)
    t0 = time.perf_counter()
    path = features_path(cfg)
    doc = FeatureFile(path)
    header = doc.header
    selected = parse_range(cfg.features_range, int(header["n_features"]))
    if "detection" in cfg.scoring and not header.get("n_random"):
        raise UserError(f"{path} has no non-activating examples for detection: regather it with "
                        "gather_high_activations.py --n_random 10 (the default now)")
    out = Path(cfg.output) if cfg.output else path.parent / "interp.jsonl"
    if out.suffix != ".jsonl":
        out = out / "interp.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    sig = settings(cfg, header)
    with output_lock(out):  # one writer per results file
        if cfg.overwrite and out.exists():
            out.unlink()
        done = {int(r["feature"]): r for r in read_lines(out)}
        foreign = [r for r in done.values() if r.get("settings") != sig]
        if foreign:
            raise UserError(f"{out} holds results made with other settings (model {foreign[0].get('model')}): pass "
                            "--output for a new file, or --overwrite to start it over")
        skip = {i for i, r in done.items() if covers(r, sig, cfg.scoring)}
        base_url = cfg.base_url or os.environ.get("OPENAI_BASE_URL") or None
        client = ChatClient(cfg.model, base_url, api_key(cfg.api_key_env, cfg.env_file, base_url), cfg.concurrency,
                            cfg.max_retries, cfg.backoff, cfg.timeout, cfg.temperature, cfg.max_tokens,
                            cfg.response_format, ReplyCache(out.with_name(out.stem + ".cache.jsonl")))
        wanted = set(selected) - skip
        todo = (f for f in doc if int(f["id"]) in wanted)
        errors: dict[str, int] = {}
        first_errors: list[str] = []
        written = asyncio.run(_run(cfg, todo, len(wanted), client, sig, out, errors, first_errors))
        return ExplainResult(out, len(selected), len(set(selected) & skip), written, errors, client.usage,
                             time.perf_counter() - t0, price_of(cfg.model, cfg.price_input, cfg.price_output),
                             cfg.model, first_errors)
