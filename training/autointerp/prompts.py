"""What the chat model is asked, which examples it sees, and the strict parsers of its replies.

Explanation (clearness): up to `n_examples` (at most 10) top-activating examples of a feature, one per
line, each token followed by its block character (training.render: U+2581..U+2588, level
ceil(8 a / max)), go to the model, which answers with a JSON object {"scratch": working notes,
"clearness": 1..5, "description": the pattern in at most ten words}; clearness 1 = no discernible
pattern ... 5 = a clear pattern with no exceptions.

Detection: the description and a shuffled mix of held-out activating examples (the top examples not
shown, and the quantile bands, taken in turn so that several activation levels are present) and
non-activating ones (the feature's "random" windows of features.json whose largest activation is at most
`negative_max` x the feature's max), shown as plain text; the model answers {"answers": [0 or 1 per
excerpt]}; the score is the balanced accuracy of those answers (training.autointerp.scoring).

Fuzzing: held-out activating examples with block characters, half on the real tokens and half moved to as
many randomly chosen other tokens; the model answers whether each highlighting matches the description;
balanced accuracy again (correct highlighting = positive).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Sequence

import numpy as np

from training.render import BLOCKS, block_level, render_example, visible_token

PROMPT_VERSION = 1
"""Bumped whenever a prompt's wording changes (part of the results file's settings)."""
MAX_EXAMPLES = 10
"""Examples shown to explain a feature, at most (the study's convention)."""

LEGEND = (f"In each excerpt, a token followed by a block character is a token where the feature is active; the "
          f"block's height shows how strongly: {BLOCKS[0]} weakest, {BLOCKS[1:-1]} in between, {BLOCKS[-1]} "
          "strongest (the feature's maximum). A token with no block after it: the feature is not active there. "
          f"{visible_token(chr(10))} stands for a newline, {visible_token(chr(9))} for a tab.")

EXPLAIN_SYSTEM = ("You study one feature of a language model's internal activations. You see up to 10 text "
                  "excerpts on which the feature is active. " + LEGEND + "\n"
                  "Find the pattern: what do the tokens it is active on (and their context) have in common?\n"
                  "Reply with a JSON object with exactly these fields:\n"
                  '"scratch": brief working notes;\n'
                  '"clearness": an integer from 1 to 5 rating how clear the pattern is: 1 = no discernible '
                  "pattern, 2 = a vague pattern with many exceptions, 3 = a pattern with some exceptions, "
                  "4 = a clear pattern with few exceptions, 5 = a clear pattern with no exceptions;\n"
                  '"description": the pattern in at most 10 words.')

DETECT_SYSTEM = ("You check an explanation of a feature of a language model against text excerpts. The "
                 "explanation says on what text the feature is active. For each numbered excerpt, decide "
                 "whether the feature is active anywhere in it, according to the explanation.\n"
                 'Reply with a JSON object {"answers": [...]} holding one integer per excerpt, in order: '
                 "1 if the feature is active in it, 0 if not.")

FUZZ_SYSTEM = ("You check an explanation of a feature of a language model against highlighted text excerpts. "
               + LEGEND + " In some excerpts the highlighting is on the right tokens; in others it was moved to "
               "other tokens at random. For each numbered excerpt, decide whether the highlighted tokens are "
               "ones the explanation describes.\n"
               'Reply with a JSON object {"answers": [...]} holding one integer per excerpt, in order: 1 if the '
               "highlighting is right, 0 if not.")

EXPLAIN_SCHEMA = {"name": "feature_explanation", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["scratch", "clearness", "description"],
    "properties": {"scratch": {"type": "string"}, "clearness": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                   "description": {"type": "string"}}}}
ANSWERS_SCHEMA = {"name": "answers", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["answers"],
    "properties": {"answers": {"type": "array", "items": {"type": "integer", "enum": [0, 1]}}}}}

Messages = list[dict[str, str]]


class Unusable(Exception):
    """A reply that cannot be used; the message is the one-line reason."""


def templates_hash() -> str:
    """Short hash of every prompt template and schema (part of the results file's settings)."""
    return short_hash([PROMPT_VERSION, EXPLAIN_SYSTEM, DETECT_SYSTEM, FUZZ_SYSTEM, EXPLAIN_SCHEMA, ANSWERS_SCHEMA])


def short_hash(obj: Any) -> str:
    """First 16 hex digits of the SHA-256 of `obj` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def plain(ex: dict[str, Any]) -> str:
    """An example as one line of text without highlighting."""
    return "".join(visible_token(t) for t in ex["tokens"])


def numbered(lines: Sequence[str]) -> str:
    """Excerpts as "1. ...", one per line."""
    return "\n".join(f"{i + 1}. {line}" for i, line in enumerate(lines))


def explain_messages(feat: dict[str, Any], n_examples: int) -> Messages:
    """The explanation prompt of one feature: its first `n_examples` top examples with block characters."""
    shown = feat["top"][:min(n_examples, MAX_EXAMPLES)]
    lines = [render_example(ex["tokens"], ex["acts"], feat["max"]) for ex in shown]
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": "Excerpts:\n" + numbered(lines)}]


def answers_messages(system: str, description: str, lines: Sequence[str]) -> Messages:
    """A detection or fuzzing prompt: the explanation and the numbered excerpts."""
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Explanation: {description}\n\nExcerpts:\n{numbered(lines)}"}]


# ------------------------------------------------------------------------------------- examples

def _key(ex: dict[str, Any]) -> tuple[int, int]:
    return int(ex["sequence"]), int(ex["position"])


def held_out_activating(feat: dict[str, Any], n_examples: int, n: int) -> list[dict[str, Any]]:
    """Up to `n` activating examples not shown for the explanation: the quantile bands (lowest first) and the
    remaining top examples, taken in turn one from each, so that several activation levels are present."""
    shown = {_key(ex) for ex in feat["top"][:min(n_examples, MAX_EXAMPLES)]}
    bands = [list(g["examples"]) for g in feat.get("quantiles", [])] + [feat["top"][min(n_examples, MAX_EXAMPLES):]]
    out: list[dict[str, Any]] = []
    seen = set(shown)
    while len(out) < n and any(bands):
        for band in bands:
            while band:
                ex = band.pop(0)
                if _key(ex) not in seen and ex["activation"] > 0:
                    seen.add(_key(ex))
                    out.append(ex)
                    break
            if len(out) == n:
                break
    return out


def non_activating(feat: dict[str, Any], n: int, negative_max: float) -> list[dict[str, Any]]:
    """Up to `n` of the feature's random windows whose largest activation is at most negative_max x its max."""
    limit = negative_max * feat["max"]
    return [ex for ex in feat.get("random", [])
            if max((a for a in ex["acts"] if a is not None), default=0.0) <= limit][:n]


def detection_set(feat: dict[str, Any], n_examples: int, n_activating: int, n_non: int, negative_max: float,
                  rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """(excerpt lines, truth 1/0) for detection: held-out activating and non-activating examples, shuffled."""
    pos = held_out_activating(feat, n_examples, n_activating)
    neg = non_activating(feat, n_non, negative_max)
    items = [(plain(ex), 1) for ex in pos] + [(plain(ex), 0) for ex in neg]
    order = rng.permutation(len(items))
    return [items[i][0] for i in order], [items[i][1] for i in order]


def fuzzed(ex: dict[str, Any], max_act: float, rng: np.random.Generator) -> str:
    """The example with its blocks moved to as many other tokens, chosen at random (unchanged if every token is
    lit: `fuzzing_set` does not fuzz those)."""
    acts = [a if a is not None else 0.0 for a in ex["acts"]]
    lit = [i for i, a in enumerate(acts) if block_level(a, max_act)]
    dark = [i for i in range(len(acts)) if i not in lit]
    if not dark:
        return render_example(ex["tokens"], ex["acts"], max_act)
    k = min(len(lit), len(dark))
    moved = [0.0] * len(acts)
    for i, a in zip(rng.choice(dark, size=k, replace=False), rng.permutation([acts[i] for i in lit])[:k]):
        moved[int(i)] = float(a)
    return render_example(ex["tokens"], moved, max_act)


def fuzzing_set(feat: dict[str, Any], n_examples: int, n: int, rng: np.random.Generator
                ) -> tuple[list[str], list[int]]:
    """(excerpt lines, truth 1/0) for fuzzing: held-out activating examples, half of them (after a shuffle)
    highlighted on the real tokens, the other half on random other tokens (only examples with a token
    left dark can be fuzzed; the others stay real)."""
    pos = held_out_activating(feat, n_examples, n)
    order = [pos[int(i)] for i in rng.permutation(len(pos))]

    def can_fuzz(ex: dict[str, Any]) -> bool:
        return any(not block_level(a, feat["max"]) for a in ex["acts"])
    n_fake = min(len(pos) // 2, sum(map(can_fuzz, order)))
    items = []
    for ex in order:
        if n_fake and can_fuzz(ex):
            items.append((fuzzed(ex, feat["max"], rng), 0))
            n_fake -= 1
        else:
            items.append((render_example(ex["tokens"], ex["acts"], feat["max"]), 1))
    shuffle = rng.permutation(len(items))
    return [items[i][0] for i in shuffle], [items[i][1] for i in shuffle]


# ------------------------------------------------------------------------------------- parsing

def json_object(text: str) -> dict[str, Any]:
    """The JSON object in a reply: the whole reply, else the text between the first "{" and the last "}"
    (which also strips Markdown fences); anything else is Unusable."""
    text = (text or "").strip()
    if not text:
        raise Unusable("empty reply")
    candidates = [text]
    lo, hi = text.find("{"), text.rfind("}")
    if 0 <= lo < hi:
        candidates.append(text[lo:hi + 1])
    for c in candidates:
        try:
            obj = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
        raise Unusable(f"reply is JSON but not an object: {c[:60]!r}")
    raise Unusable(f"reply is not JSON: {text[:60]!r}")


def _integer(v: Any) -> int | None:
    """An int given as a JSON integer or a string of digits; None otherwise (booleans and floats refused)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and re.fullmatch(r"\s*\d+\s*", v):
        return int(v)
    return None


def parse_explanation(text: str) -> dict[str, Any]:
    """{"scratch", "clearness" (1..5), "description"} from an explanation reply, or Unusable."""
    obj = json_object(text)
    for name in ("clearness", "description"):
        if name not in obj:
            raise Unusable(f"reply has no {name!r} field")
    c = _integer(obj["clearness"])
    if c is None or not 1 <= c <= 5:
        raise Unusable(f"clearness {obj['clearness']!r} is not an integer from 1 to 5")
    desc = obj["description"]
    if not isinstance(desc, str) or not desc.strip():
        raise Unusable("description is empty or not text")
    scratch = obj.get("scratch", "")
    return {"scratch": scratch if isinstance(scratch, str) else json.dumps(scratch), "clearness": c,
            "description": " ".join(desc.split())}


def parse_answers(text: str, n: int) -> list[int]:
    """The n answers (each 0 or 1) of a detection or fuzzing reply, or Unusable."""
    obj = json_object(text)
    if "answers" not in obj:
        raise Unusable("reply has no 'answers' field")
    ans = obj["answers"]
    if not isinstance(ans, list):
        raise Unusable("answers is not a list")
    if len(ans) != n:
        raise Unusable(f"{len(ans)} answers for {n} excerpts")
    out = [_integer(a) for a in ans]
    if any(a not in (0, 1) for a in out):
        raise Unusable(f"answers must be 0 or 1 (got {ans!r})")
    return out  # type: ignore[return-value]
