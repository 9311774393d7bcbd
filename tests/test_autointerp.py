"""Autointerp against a real HTTP server on loopback that speaks the chat-completions protocol: scripted
replies, injected faults (429, 500, a timeout, malformed JSON, a missing field), resume after a kill,
bounded concurrency, no key in any written file; detection scoring by hand; the plots."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training.autointerp import prompts as P
from training.autointerp.client import api_key, price_of, public_url, read_env_file
from training.autointerp.files import read_results
from training.autointerp.run import ExplainConfig, explain_features
from training.autointerp.scoring import balanced_accuracy, score_detail
from training.cli import UserError
from training.feature_file import FORMAT, write_features_json
from training.render import BLOCKS

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-Zq8vX3secretkey0123456789"
N_FEATURES = 12


# ----------------------------------------------------------------------------- a features.json by hand

def example(tokens: list[str], acts: list[float], seq: int) -> dict[str, Any]:
    """An example entry of features.json (center: the strongest token)."""
    known = [a if a is not None else 0.0 for a in acts]
    return {"tokens": tokens, "acts": acts, "center": int(np.argmax(known)), "activation": max(known),
            "sequence": seq, "position": 3}


def feature(i: int) -> dict[str, Any]:
    """Feature i: 12 top examples about " cat", two quantile bands (one " bird" among them), random windows
    (first one weakly active; then two with " cat" and three with " dog", all silent)."""
    m = f"f{i}"
    top = [example([m, " the", " cat", " sat"], [0.0, 0.0, 2.0 - 0.1 * j, 0.0], 100 * i + j) for j in range(12)]
    q0 = [example([m, " a", " cat"], [0.0, 0.0, 0.5], 100 * i + 50), example([m, " a", " bird"], [0.0, 0.0, 0.4], 100 * i + 51)]
    q1 = [example([m, " my", " cat"], [0.0, 0.0, 1.0], 100 * i + 52), example([m, " one", " cat"], [0.0, 0.0, 1.1], 100 * i + 53)]
    rnd = [example([m, " a", " cow"], [0.0, 0.1, 0.0], 100 * i + 60)]
    rnd += [example([m, " the", " cat"], [0.0, 0.0, 0.0], 100 * i + 61 + j) for j in range(2)]
    rnd += [example([m, " a", " dog"], [0.0, None, 0.0], 100 * i + 63 + j) for j in range(3)]
    for ex in rnd:
        ex["activation"] = 0.0
    return {"id": i, "density": 0.01, "max": 2.0, "count": 40, "top": [] if i == 11 else top,
            "quantiles": [{"quantile": [0, 0.5], "range": [0.4, 0.5], "examples": q0},
                          {"quantile": [0.5, 1], "range": [1.0, 1.1], "examples": q1}],
            "random": rnd, "histogram": {"lo": 0, "hi": 2.0, "counts": [1], "sample": 1}, "text": ""}


@pytest.fixture()
def features_json(tmp_path) -> Path:
    """12 features (feature 11 never fired)."""
    header = {"format": FORMAT, "version": 1, "source": {"kind": "sae", "hook": "h"}, "n_tokens": 1000,
              "n_features": N_FEATURES, "n_random": 6}
    path = tmp_path / "feats" / "features.json"
    write_features_json(path, header, (feature(i) for i in range(N_FEATURES)))
    return path


# ----------------------------------------------------------------------------- the chat server

class ChatServer:
    """Chat completions on 127.0.0.1: a scripted model plus faults injected per (feature, step)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.faults: dict[tuple[int, str], list[str]] = {}
        self.log: list[tuple[int, str, str]] = []        # (feature, step, fault or "ok")
        self.auth: set[str] = set()
        self.in_flight = self.max_in_flight = 0
        self.tokens = [0, 0]
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.auth.add(self.headers.get("Authorization", ""))
                server.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def step_of(body: dict[str, Any]) -> str:
        system = body["messages"][0]["content"]
        return {P.EXPLAIN_SYSTEM: "explain", P.DETECT_SYSTEM: "detection", P.FUZZ_SYSTEM: "fuzzing"}[system]

    @staticmethod
    def excerpts(body: dict[str, Any]) -> list[str]:
        user = body["messages"][1]["content"]
        return [m.group(1) for m in re.finditer(r"^\d+\. (.*)$", user.split("Excerpts:\n", 1)[1], re.M)]

    def answer(self, fid: int, step: str, body: dict[str, Any]) -> dict[str, Any]:
        """The scripted model: explains as "the word cat" (clearness 1 + id % 5); detection: 1 iff the excerpt
        has " cat"; fuzzing: 1 iff a block follows " cat" or " bird"."""
        lines = self.excerpts(body)
        if step == "explain":
            return {"scratch": f"{len(lines)} excerpts", "clearness": 1 + fid % 5, "description": "the word cat"}
        if step == "detection":
            return {"answers": [int(" cat" in line) for line in lines]}
        return {"answers": [int(bool(re.search(f" (cat|bird)[{BLOCKS}]", line))) for line in lines]}

    def handle(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        step = self.step_of(body)
        marker = re.search(r"\bf(\d+)", body["messages"][1]["content"])
        fid = int(marker.group(1)) if marker else -1                  # -1: a feature of a real features.json
        with self.lock:
            queue = self.faults.get((fid, step), [])
            fault = queue.pop(0) if queue else "ok"
            self.log.append((fid, step, fault))
            if fault != "timeout":
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            if fault == "timeout":
                time.sleep(1.5)
                return self.send(h, 200, self.completion("{}"))
            if fault in ("429", "500"):
                return self.send(h, int(fault), {"error": {"message": "busy", "type": "x"}},
                                 {"Retry-After": "0"} if fault == "429" else {})
            content = self.answer(fid, step, body)
            if fault == "missing":
                content.pop("description", None)
                content.pop("answers", None)
            text = "{'clearness': 3, description: cat" if fault == "bad_json" else json.dumps(content)
            if fault == "fenced":
                text = "Sure!\n```json\n" + json.dumps(content) + "\n```"
            self.send(h, 200, self.completion(text))
        finally:
            with self.lock:
                if fault != "timeout":
                    self.in_flight -= 1

    def completion(self, text: str) -> dict[str, Any]:
        with self.lock:
            self.tokens[0] += 100
            self.tokens[1] += 20
        return {"id": "c1", "object": "chat.completion", "created": 0, "model": "scripted",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass                                        # the client gave up (timeout)

    def asked(self, step: str | None = None) -> list[int]:
        return [f for f, s, _ in self.log if step is None or s == step]


@pytest.fixture()
def server():
    s = ChatServer(delay=0.02)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def config(features: Path, url: str, **kw: Any) -> ExplainConfig:
    base = dict(features=str(features), model="gpt-4o-mini", base_url=url, concurrency=3, backoff=0.01,
                timeout=0.5, env_file="/nonexistent/.env")
    return ExplainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- hand-computed pieces

def test_balanced_accuracy_by_hand():
    # 4 positives with 3 found (TPR 3/4), 5 negatives with 3 rejected (TNR 3/5): (0.75 + 0.6) / 2
    truth = [1, 1, 1, 1, 0, 0, 0, 0, 0]
    answers = [1, 1, 0, 1, 1, 0, 0, 1, 0]
    assert balanced_accuracy(truth, answers) == pytest.approx(0.675)
    d = score_detail(truth, answers)
    assert (d["tpr"], d["tnr"], d["n_positive"], d["n_negative"]) == (0.75, 0.6, 4, 5)
    assert balanced_accuracy([1, 0], [1, 1]) == 0.5 and balanced_accuracy([0, 1, 1], [0, 1, 1]) == 1.0
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        balanced_accuracy([1, 1], [1, 0])


def test_parsers_are_strict_with_a_fallback():
    good = {"scratch": "s", "clearness": 4, "description": "  the   word cat "}
    assert P.parse_explanation(json.dumps(good)) == {"scratch": "s", "clearness": 4, "description": "the word cat"}
    assert P.parse_explanation("Here:\n```json\n" + json.dumps(good) + "\n```")["clearness"] == 4
    assert P.parse_explanation(json.dumps({**good, "clearness": "5"}))["clearness"] == 5
    for bad, why in [("", "empty reply"), ("cat", "not JSON"), ("[1, 2]", "not an object"),
                     (json.dumps({"clearness": 3}), "no 'description' field"),
                     (json.dumps({**good, "clearness": 6}), "not an integer from 1 to 5"),
                     (json.dumps({**good, "clearness": 3.5}), "not an integer from 1 to 5"),
                     (json.dumps({**good, "clearness": True}), "not an integer from 1 to 5"),
                     (json.dumps({**good, "description": ""}), "description is empty")]:
        with pytest.raises(P.Unusable, match=why):
            P.parse_explanation(bad)
    assert P.parse_answers('{"answers": [1, 0, "1"]}', 3) == [1, 0, 1]
    for bad, why in [('{"answers": [1, 0]}', "2 answers for 3 excerpts"), ('{"answers": [1, 2, 0]}', "0 or 1"),
                     ('{"answer": []}', "no 'answers' field")]:
        with pytest.raises(P.Unusable, match=why):
            P.parse_answers(bad, 3)


def test_prompt_states_the_convention_and_shows_ten_examples():
    feat = feature(0)
    system, user = (m["content"] for m in P.explain_messages(feat, 10))
    assert "block character" in system and BLOCKS[0] in system and BLOCKS[-1] in system and "10 words" in system
    assert "1 = no discernible pattern" in system and "5 = a clear pattern with no exceptions" in system
    lines = user.splitlines()[1:]
    assert len(lines) == 10 and lines[0] == f"1. f0 the cat{BLOCKS[-1]} sat"          # 2.0 / max 2.0: level 8
    assert lines[9] == f"10. f0 the cat{BLOCKS[4]} sat"                                 # 1.1 / 2.0: ceil(4.4) = 5


def test_held_out_examples_and_the_detection_set():
    feat = feature(0)
    pos = P.held_out_activating(feat, 10, 4)
    # in turn: quantile band 0, band 1, the top examples not shown, band 0 again
    assert [ex["sequence"] for ex in pos] == [50, 52, 10, 51]
    neg = P.non_activating(feat, 5, 0.0)
    assert [ex["sequence"] for ex in neg] == [61, 62, 63, 64, 65]                    # the weakly active one left out
    assert [ex["sequence"] for ex in P.non_activating(feat, 2, 0.06)] == [60, 61]     # 0.1 <= 0.06 * 2.0
    lines, truth = P.detection_set(feat, 10, 4, 5, 0.0, np.random.default_rng(0))
    assert sorted(truth) == [0] * 5 + [1] * 4 and all(BLOCKS[0] not in line for line in lines)
    lines, truth = P.fuzzing_set(feat, 10, 4, np.random.default_rng(0))
    assert sorted(truth) == [0, 0, 1, 1] and all(any(b in line for b in BLOCKS) for line in lines)
    lit = {**feat, "quantiles": [], "top": [example(["a", "b"], [1.0, 2.0], j) for j in range(14)]}
    assert P.fuzzing_set(lit, 10, 4, np.random.default_rng(0))[1] == [1, 1, 1, 1]   # every token lit: not fuzzed
    real = [line for line, t in zip(lines, truth) if t]
    fake = [line for line, t in zip(lines, truth) if not t]
    assert all(re.search(f" (cat|bird)[{BLOCKS}]", line) for line in real)
    assert not any(re.search(f" (cat|bird)[{BLOCKS}]", line) for line in fake)


def test_key_from_environment_or_env_file(tmp_path, monkeypatch):
    env = tmp_path / ".env"
    env.write_text(f'# comment\nexport OTHER=1\nMY_KEY="{KEY}"\n\nBAD LINE\n')
    assert read_env_file(env) == {"OTHER": "1", "MY_KEY": KEY} and read_env_file(tmp_path / "none") == {}
    monkeypatch.delenv("MY_KEY", raising=False)
    assert api_key("MY_KEY", env, None) == KEY
    monkeypatch.setenv("MY_KEY", "from-env")
    assert api_key("MY_KEY", env, None) == "from-env"                 # the environment wins
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(UserError, match="no API key: set NOPE in the environment"):
        api_key("NOPE", env, None)
    assert api_key("NOPE", env, "http://localhost:8000/v1") == "no-key"
    assert public_url("http://user:pw@host:8000/v1?x=1") == "http://host:8000/v1"
    assert price_of("gpt-4o-mini", None, None) == (0.15, 0.60) == price_of("gpt-4o-mini-2024-07-18", None, None)
    assert price_of("llama3", None, None) is None and price_of("llama3", 1.0, 2.0) == (1.0, 2.0)


# ----------------------------------------------------------------------------- against the server

def all_bytes(root: Path) -> bytes:
    """Every file under `root` but the .env the test wrote the key into."""
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and p.suffix != ".env")


def test_faults_are_retried_or_reported(features_json, server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.faults = {(1, "explain"): ["429", "429"], (2, "explain"): ["500"], (3, "explain"): ["timeout"],
                     (4, "explain"): ["bad_json"], (5, "explain"): ["missing"], (6, "detection"): ["missing"],
                     (7, "explain"): ["fenced"], (8, "detection"): ["500"] * 10}
    res = explain_features(config(features_json, server.url, scoring=["clearness", "detection", "fuzzing"],
                                  n_detect=4, n_negative=5, max_retries=3))
    recs = read_results(res.path)
    assert res.path == features_json.parent / "interp.jsonl" and sorted(recs) == list(range(N_FEATURES))
    for i in (0, 1, 2, 3, 7, 9, 10):                                  # retries recovered, the fence was read
        r = recs[i]
        assert r["explanation"] == "the word cat" and r["clearness"] == 1 + i % 5 and not r["errors"], r
        assert r["detection"] == pytest.approx(0.675) and r["fuzzing"] == 1.0 and r["model"] == "gpt-4o-mini"
        assert set(r["prompts"]) == {"explain", "detection", "fuzzing"}
    # feature 0 by hand: held out 3 " cat" + 1 " bird" (TPR 3/4); non-activating 2 " cat" + 3 " dog" (TNR 3/5)
    d = recs[0]["detection_detail"]
    assert (d["tpr"], d["tnr"], d["n_positive"], d["n_negative"]) == (0.75, 0.6, 4, 5)
    assert recs[4]["explanation"] is None and recs[4]["errors"]["explain"].startswith("reply is not JSON")
    assert recs[4]["errors"]["detection"] == "no usable explanation" and recs[4]["detection"] is None
    assert recs[5]["errors"] == {"explain": "reply has no 'description' field", "detection": "no usable explanation",
                                 "fuzzing": "no usable explanation"}
    assert recs[6]["explanation"] == "the word cat" and recs[6]["detection"] is None
    assert recs[6]["errors"] == {"detection": "reply has no 'answers' field"} and recs[6]["fuzzing"] == 1.0
    assert recs[8]["errors"] == {"detection": "request failed: HTTP 500 after 4 attempts"}
    assert recs[11]["skipped"].startswith("never fired") and 11 not in server.asked()
    assert server.asked("explain").count(1) == 3 and server.asked("explain").count(3) == 2
    assert res.errors == {"explain": 2, "detection": 4, "fuzzing": 2}
    assert res.usage.retries == 2 + 1 + 1 + 3 and res.usage.failed == 1
    # unusable replies are not counted; the summary adds up the tokens the server reported
    assert res.usage.prompt_tokens == 100 * len([x for x in server.log if x[2] in ("ok", "fenced", "bad_json", "missing")])
    text = str(res)
    assert "unusable or failed (not counted): explain 2, detection 4, fuzzing 2" in text
    assert f"tokens: {res.usage.prompt_tokens:,} prompt + {res.usage.completion_tokens:,} completion" in text
    assert "cost $" in text and "gpt-4o-mini at $0.15/$0.6 per M tokens" in text
    # concurrency bounded (and used), the key sent but never written
    assert 2 <= server.max_in_flight <= 3 and res.usage.max_in_flight <= 3
    assert server.auth == {f"Bearer {KEY}"}
    assert KEY.encode() not in all_bytes(tmp_path)
    # a rerun asks again only the request that failed after its retries (the explanation comes from the cache)
    n = len(server.log)
    server.faults = {}
    again = explain_features(config(features_json, server.url, scoring=["clearness", "detection", "fuzzing"],
                                    n_detect=4, n_negative=5))
    assert server.log[n:] == [(8, "detection", "ok")] and again.n_written == 1 and again.n_done_before == 11
    assert read_results(res.path)[8]["detection"] == pytest.approx(0.675) and again.usage.cached == 2
    n = len(server.log)
    assert explain_features(config(features_json, server.url, scoring=["clearness", "detection", "fuzzing"],
                                   n_detect=4, n_negative=5)).n_written == 0 and len(server.log) == n


def test_cache_serves_earlier_prompts_and_settings_are_checked(features_json, server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    env = tmp_path / "my.env"
    env.write_text(f"OPENAI_API_KEY={KEY}\n")
    out = tmp_path / "out" / "interp.jsonl"
    explain_features(config(features_json, server.url, env_file=str(env), output=str(out), features_range="0:4",
                            n_detect=4, n_negative=5))
    assert sorted(server.asked("explain")) == [0, 1, 2, 3] and server.auth == {f"Bearer {KEY}"}
    res = explain_features(config(features_json, server.url, env_file=str(env), output=str(out),
                                  features_range="0:4", scoring=["detection"], n_detect=4, n_negative=5))
    assert sorted(server.asked("explain")) == [0, 1, 2, 3]             # explanations came from the cache
    assert sorted(server.asked("detection")) == [0, 1, 2, 3] and res.usage.cached == 4
    assert read_results(out)[0]["detection"] == pytest.approx(0.675)
    assert len(out.read_text().splitlines()) == 8                      # later lines replace earlier ones
    with pytest.raises(UserError, match="holds results made with other settings"):
        explain_features(config(features_json, server.url, env_file=str(env), output=str(out), n_examples=5))
    from lock_holder import held_lock
    with held_lock(out.parent, ".interp.jsonl.lock") as holder:
        with pytest.raises(UserError, match=f"interp.jsonl is in use by another process \\(PID {holder.pid}\\)"):
            explain_features(config(features_json, server.url, env_file=str(env), output=str(out)))
    with pytest.raises(UserError, match="--features_range 20:30 selects no feature"):
        explain_features(config(features_json, server.url, env_file=str(env), output=str(out), features_range="20:30"))
    assert KEY.encode() not in all_bytes(tmp_path)


def test_killed_run_resumes_without_asking_again(features_json, tmp_path):
    slow = ChatServer(delay=0.25)
    try:
        env = {**os.environ, "OPENAI_API_KEY": KEY}
        out = tmp_path / "interp.jsonl"
        cmd = [sys.executable, str(ROOT / "explain_features.py"), "--features", str(features_json), "--base_url",
               slow.url, "--concurrency", "2", "--output", str(out), "--scoring", "detection", "--n_detect", "4",
               "--n_negative", "5", "--env_file", "/nonexistent"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = read_results(out)
        asked_before = list(slow.log)
        assert 3 <= len(before) < N_FEATURES
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "features done in" in proc.stdout and "tokens:" in proc.stdout
        recs = read_results(out)
        assert sorted(recs) == list(range(N_FEATURES)) and len(out.read_text().splitlines()) == N_FEATURES
        second = slow.log[len(asked_before):]
        assert not {f for f, _, _ in second} & set(before)            # finished features were not asked again
        # each (feature, step) asked once overall, except a reply lost in flight at the kill
        pairs = [(f, s) for f, s, _ in slow.log]
        assert len(pairs) - len(set(pairs)) <= 2
        assert all(r["detection"] == pytest.approx(0.675) for i, r in recs.items() if i != 11)
        assert KEY.encode() not in all_bytes(tmp_path)
    finally:
        slow.httpd.shutdown()
        slow.httpd.server_close()


def test_detection_needs_the_random_windows(tmp_path, server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    path = tmp_path / "features.json"
    write_features_json(path, {"format": FORMAT, "version": 1, "source": {}, "n_tokens": 1, "n_features": 1}, [feature(0)])
    with pytest.raises(UserError, match="no non-activating examples for detection: regather it"):
        explain_features(config(path, server.url, scoring=["detection"]))
    with pytest.raises(UserError, match="--n_examples 11: at most 10"):
        explain_features(config(path, server.url, n_examples=11))


# ----------------------------------------------------------------------------- plots and the CLI

def test_plots_show_the_counts(tmp_path, capsys):
    from matplotlib.colors import to_hex

    from training.autointerp.plots import PlotInterpConfig, plot_interp
    from training.cli import run_cli
    feats = tmp_path / "features" / "interp.jsonl"
    neurons = tmp_path / "neurons" / "interp.jsonl"
    feats.parent.mkdir()
    neurons.parent.mkdir()
    f_recs = [(4, 0.9), (5, 0.95), (4, 0.55), (2, None), (None, None), (3, 1.0)]
    n_recs = [(1, 0.5), (2, 0.45), (1, None), (3, 0.72)]
    for path, recs in ((feats, f_recs), (neurons, n_recs)):
        path.write_text("".join(json.dumps({"feature": i, "clearness": c, "detection": d}) + "\n"
                                for i, (c, d) in enumerate(recs)))
    out, counts, fig = plot_interp(PlotInterpConfig(runs=[str(feats), str(neurons)], labels=["features", "neurons"],
                                                    bins=4, output=str(tmp_path / "p.png")))
    assert out.exists() and out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert counts.clearness.tolist() == [[0, 1, 1, 2, 1], [2, 1, 1, 0, 0]] and counts.n_scored == [5, 4]
    # bins [0,.25) [.25,.5) [.5,.75) [.75,1]: features .9 .95 .55 1.0; neurons .5 .45 .72
    assert counts.detection.tolist() == [[0, 0, 1, 3], [0, 1, 2, 0]]
    clear_ax, det_ax = fig.axes[:2]
    bars = clear_ax.patches
    assert [b.get_height() for b in bars] == [0, 1, 1, 2, 1, 2, 1, 1, 0, 0]                # features, then neurons
    assert to_hex(bars[0].get_facecolor()) != to_hex(bars[5].get_facecolor())            # two colours, one per run
    assert bars[0].get_x() < bars[5].get_x() < bars[1].get_x()                            # grouped side by side
    assert [t.get_text() for t in clear_ax.get_xticklabels()] == ["1", "2", "3", "4", "5"]
    assert [t.get_text() for t in clear_ax.get_legend().get_texts()] == ["features", "neurons"]
    assert [b.get_height() for b in det_ax.patches] == [0, 0, 1, 3, 0, 1, 2, 0]
    assert "features: 5" in clear_ax.get_title() and "balanced accuracy" in det_ax.get_xlabel()
    # one run without detection: one panel; the CLI prints a summary and where it wrote
    run_cli(lambda cfg: print(plot_interp(cfg)[1].clearness.tolist()), "", PlotInterpConfig,
            ["--runs", str(neurons), "--output", str(tmp_path / "one.png")])
    assert "[[2, 1, 1, 0, 0]]" in capsys.readouterr().out
    with pytest.raises(UserError, match="2 runs but 1 labels"):
        plot_interp(PlotInterpConfig(runs=[str(feats), str(neurons)], labels=["x"]))


def test_cli_reports_bad_input_on_one_line(features_json, capsys, monkeypatch):
    from training.cli import run_cli
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit) as info:
        run_cli(explain_features, "", ExplainConfig, ["--features", str(features_json), "--env_file", "/none"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no API key: set OPENAI_API_KEY")
    with pytest.raises(SystemExit):
        run_cli(explain_features, "", ExplainConfig, ["--features", str(features_json), "--features_range", "x"])
    assert capsys.readouterr().err.startswith("error: --features_range 'x': write start:stop")


def test_gathered_features_and_neurons_end_to_end(tiny_tokenizer_dir, tmp_path, server, monkeypatch):
    """gather_high_activations (a random dictionary, and the neurons) -> explain_features -> plot_interp."""
    from bench.top_activations import write_random_sweep, write_synthetic_folder
    from training.autointerp.plots import PlotInterpConfig, plot_interp
    from training.feature_file import read_features_json
    from training.top_activations import TopActivationsConfig, gather
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    hook_dir = write_synthetic_folder(tmp_path / "data", 3000, 8, str(tiny_tokenizer_dir), 300, chunk_size=1500,
                                      context_length=50)
    sweep = write_random_sweep(tmp_path / "sweep", hook_dir, 8, 16, bias=-1.5)
    sae = gather(TopActivationsConfig(sweep=str(sweep), device="cpu", top_k=12)).path
    neurons = gather(TopActivationsConfig(neurons=True, dataset_dir=str(hook_dir), make_positive_by="relu",
                                          device="cpu", top_k=12, output=str(tmp_path / "neurons"))).path
    assert all(len(f["random"]) == 10 for f in read_features_json(sae)["features"])
    runs = []
    for path, negative_max in ((sae, 0.0), (neurons, 0.3)):
        res = explain_features(config(path, server.url, scoring=["clearness", "detection"], negative_max=negative_max))
        recs = read_results(res.path)
        assert sorted(recs) == list(range(read_features_json(path)["n_features"]))
        live = [r for r in recs.values() if "skipped" not in r]
        assert live and all(r["clearness"] is not None for r in live)
        assert sum(r["detection"] is not None for r in live) >= len(live) // 2
        runs.append(str(res.path))
    out, counts, _ = plot_interp(PlotInterpConfig(runs=runs, labels=["features", "neurons"]))
    assert out == sae.parent / "interp.png" and counts.n_scored[1] == 8 and counts.detection.sum() > 0


def test_autointerp_imports_no_gatherer_or_trainer():
    code = ("import sys, training.autointerp.run, training.autointerp.plots; "
            "print(sorted(m for m in sys.modules if m in ('training.top_activations', 'training.sweep', "
            "'training.ensemble', 'training.steering', 'training.dashboards')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
