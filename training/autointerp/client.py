"""An OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp's server, Ollama, ...) through the `openai`
package: the key from the environment or a .env file, bounded concurrency, our own retries with
exponential backoff, a reply cache, and token counts.

Retries: on HTTP 429, 5xx, timeouts, connection errors and unreadable response bodies, wait
backoff * 2^attempt seconds (x a random factor in [1, 1.25]; at least the server's Retry-After, at most 60 s)
and ask again, up to `max_retries` times; the openai client's own retries are off (max_retries=0).
Any other HTTP error (401, 403, 404, 400: a wrong key, model or request) stops the run with one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from training.autointerp.files import append_line, read_lines
from training.autointerp.prompts import Messages, short_hash
from training.cli import UserError

RESPONSE_FORMATS = ("json_schema", "json_object", "text")
PRICES = {"gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00), "gpt-4.1": (2.00, 8.00),
          "gpt-4.1-mini": (0.40, 1.60), "gpt-4.1-nano": (0.10, 0.40)}
"""USD per million (input, output) tokens of some OpenAI models (list prices of 2025; a dated snapshot name
such as gpt-4o-mini-2024-07-18 uses its family's price)."""


def read_env_file(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (blank lines, # comments and a leading `export ` ignored; one pair of
    surrounding quotes removed). A missing file is empty."""
    p = Path(path)
    if not p.is_file():
        return {}
    out: dict[str, str] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


def api_key(env_name: str, env_file: str | Path, base_url: str | None) -> str:
    """The key from environment variable `env_name`, else from the .env file; a local server (any --base_url)
    may do without one."""
    key = os.environ.get(env_name) or read_env_file(env_file).get(env_name)
    if key:
        return key
    if base_url:
        return "no-key"                      # local servers accept any key
    raise UserError(f"no API key: set {env_name} in the environment or in {env_file} (KEY=VALUE), or pass "
                    "--base_url of a local server")


def public_url(url: str | None) -> str | None:
    """`url` without user:password@ (safe to write to a file)."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def price_of(model: str, price_input: float | None, price_output: float | None) -> tuple[float, float] | None:
    """USD per million (input, output) tokens: the flags, else the table (longest model-name prefix)."""
    if price_input is not None and price_output is not None:
        return price_input, price_output
    match = [m for m in PRICES if model == m or model.startswith(m + "-2")]
    return PRICES[max(match, key=len)] if match else None


@dataclass
class Reply:
    """One chat completion: its text and token counts (0 when served from the cache)."""

    content: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


class RequestFailed(Exception):
    """A request that still failed after every retry; the message is the one-line reason."""


@dataclass
class Usage:
    """Totals over a run."""

    requests: int = 0
    cached: int = 0
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


class ReplyCache:
    """Replies by key (feature, prompt, model and request settings hashed): a JSONL file, one reply appended
    per line as it arrives; a torn last line (a killed run) is dropped when the file is opened."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.replies: dict[str, dict[str, Any]] = {}
        if self.path is not None:
            for obj in read_lines(self.path):
                if isinstance(obj.get("key"), str):
                    self.replies[obj["key"]] = obj

    def get(self, key: str) -> Reply | None:
        """The cached reply (token counts not charged again)."""
        hit = self.replies.get(key)
        return None if hit is None else Reply(hit["content"], cached=True)

    def put(self, key: str, reply: Reply) -> None:
        """Remember and append a reply."""
        obj = {"key": key, "content": reply.content, "prompt_tokens": reply.prompt_tokens,
               "completion_tokens": reply.completion_tokens}
        self.replies[key] = obj
        if self.path is not None:
            append_line(self.path, obj)


def _status(e: Exception) -> int | None:
    return getattr(e, "status_code", None)


class ChatClient:
    """Chat completions with bounded concurrency, retries and a cache (see the module docstring)."""

    def __init__(self, model: str, base_url: str | None, key: str, concurrency: int = 8, max_retries: int = 6,
                 backoff: float = 1.0, timeout: float = 60.0, temperature: float = 0.0, max_tokens: int = 800,
                 response_format: str = "json_schema", cache: ReplyCache | None = None):
        import openai
        self.openai = openai
        self.client = openai.AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout)
        self.model, self.max_retries, self.backoff = model, max_retries, backoff
        self.temperature, self.max_tokens, self.response_format = temperature, max_tokens, response_format
        self.cache = cache or ReplyCache(None)
        self.gate = asyncio.Semaphore(concurrency)
        self.usage = Usage()

    def request(self, messages: Messages, schema: dict[str, Any] | None) -> dict[str, Any]:
        """The body of the chat-completions request (without the model's credentials)."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature,
                                "max_tokens": self.max_tokens}
        if self.response_format == "json_schema" and schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif self.response_format in ("json_schema", "json_object"):
            body["response_format"] = {"type": "json_object"}
        return body

    def cache_key(self, feature: int, body: dict[str, Any]) -> str:
        """Key of (feature, prompt, model, request settings)."""
        return short_hash({"feature": feature, "request": body})

    async def complete(self, feature: int, messages: Messages, schema: dict[str, Any] | None = None) -> Reply:
        """The reply to `messages` (from the cache when asked before), retrying transient failures."""
        body = self.request(messages, schema)
        key = self.cache_key(feature, body)
        hit = self.cache.get(key)
        if hit is not None:
            self.usage.cached += 1
            return hit
        reply = await self._ask(body)
        self.usage.prompt_tokens += reply.prompt_tokens
        self.usage.completion_tokens += reply.completion_tokens
        self.cache.put(key, reply)
        return reply

    async def _ask(self, body: dict[str, Any]) -> Reply:
        """One request with retries."""
        o = self.openai
        for attempt in range(self.max_retries + 1):
            wait: float | None = None
            async with self.gate:
                self.usage.in_flight += 1
                self.usage.max_in_flight = max(self.usage.max_in_flight, self.usage.in_flight)
                self.usage.requests += 1
                try:
                    resp = await self.client.chat.completions.create(**body)
                    content = resp.choices[0].message.content if resp.choices else None
                    if content is None:
                        raise ValueError("the reply has no message content")
                    usage = resp.usage
                    return Reply(content, getattr(usage, "prompt_tokens", 0) or 0,
                                 getattr(usage, "completion_tokens", 0) or 0)
                except (o.RateLimitError, o.InternalServerError, o.APITimeoutError, o.APIConnectionError,
                        o.APIResponseValidationError, json.JSONDecodeError, ValueError, AttributeError,
                        TypeError) as e:
                    status = _status(e)
                    reason = (f"HTTP {status}" if status else "timeout" if isinstance(e, o.APITimeoutError)
                              else type(e).__name__)
                    wait = self.backoff * 2 ** attempt * (1 + 0.25 * random.random())
                    headers = getattr(getattr(e, "response", None), "headers", None) or {}
                    try:
                        wait = max(wait, float(headers.get("retry-after", 0)))
                    except ValueError:
                        pass
                    wait = min(wait, 60.0)
                except o.APIStatusError as e:
                    msg = str(getattr(e, "message", e)).splitlines()[0][:200]
                    raise UserError(f"the endpoint refused the request (HTTP {e.status_code}: {msg}); check the "
                                    "key, --model and --base_url"
                                    + (", or try --response_format json_object or text" if e.status_code == 400
                                       else "")) from None
                finally:
                    self.usage.in_flight -= 1
            if attempt == self.max_retries:
                self.usage.failed += 1
                raise RequestFailed(f"{reason} after {self.max_retries + 1} attempts")
            self.usage.retries += 1
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self.client.close()
