"""Chat LLM access for ComSem: an OpenAI-compatible HTTP endpoint or a local ``transformers`` model,
behind an on-disk prompt/answer cache with bounded retries, exponential backoff and a rate limit.

A cached answer is a file named by the sha256 of the request (backend, model, messages, sampling
options), written atomically once the answer is complete, so a re-run never asks twice and a crash
never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from bae.common.atomic_files import atomic_write_json, read_json
from bae.common.errors import BaeError
from bae.pipeline.features.config import InterpretConfig

Messages = list[dict[str, str]]
BASE_URL_ENV = "BAE_LLM_BASE_URL"
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class TransientError(Exception):
    """A failure worth retrying (connection refused, timeout, 429, 5xx, a garbled reply)."""


class ChatBackend(Protocol):
    identity: str  # what, besides the request, a cached answer depends on

    def complete(self, messages: Messages, max_tokens: int, temperature: float) -> str: ...


class OpenAIChat:
    """``POST {base_url}/chat/completions`` with plain ``urllib`` (any OpenAI-compatible server)."""

    def __init__(self, base_url: str, api_key: str | None, model: str, timeout_s: float):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key, self.model, self.timeout_s = api_key, model, timeout_s
        self.identity = f"openai:{self.url}:{self.model}"  # another server may answer differently

    def complete(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:200].strip()
            if exc.code in _RETRY_STATUS:
                raise TransientError(f"HTTP {exc.code} {detail}") from exc
            raise BaeError(f"LLM endpoint {self.url} refused the request: HTTP {exc.code} {detail}") from None
        except (OSError, json.JSONDecodeError) as exc:  # URLError, timeouts, resets are OSErrors
            raise TransientError(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from exc
        try:
            return str(payload["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as exc:
            raise TransientError(f"reply without choices[0].message.content: {str(payload)[:200]}") from exc


class TransformersChat:
    """A local causal LM (hub id, directory or .gguf) answering greedily through its chat template."""

    def __init__(self, spec: str):
        self.spec = spec
        self.identity = f"transformers:{spec}"
        self._loaded: Any = None
        self._lock = threading.Lock()

    def complete(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        import torch

        from bae.pipeline.llm.load import load_model

        with self._lock:
            if self._loaded is None:
                self._loaded = load_model(self.spec, dtype="float32")
            model, tokenizer = self._loaded.model, self._loaded.tokenizer
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                out = model.generate(
                    **ids,
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                )
            return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def make_backend(config: InterpretConfig) -> ChatBackend:
    if config.backend == "transformers":
        return TransformersChat(config.model)
    base_url = config.base_url or os.environ.get(BASE_URL_ENV)
    if not base_url:
        raise BaeError(
            f"no LLM endpoint: set ${BASE_URL_ENV} or interpret.base_url (an OpenAI-compatible …/v1)"
        )
    return OpenAIChat(base_url, os.environ.get(config.api_key_env), config.model, config.timeout_s)


class RateLimiter:
    """At most ``per_second`` calls per second across threads (None: unlimited)."""

    def __init__(self, per_second: float | None):
        self.interval = 1.0 / per_second if per_second else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        time.sleep(max(0.0, start - now))


class CachedChat:
    """Ask a backend, answering from the on-disk cache when the same request was answered before."""

    def __init__(self, backend: ChatBackend, cache_dir: Path, config: InterpretConfig):
        self.backend, self.cache_dir, self.config = backend, Path(cache_dir), config
        self.limiter = RateLimiter(config.requests_per_second)
        self.requests = self.hits = 0
        self._count_lock = threading.Lock()
        self._in_flight: dict[str, threading.Lock] = {}
        self.failed: BaeError | None = None

    def _path(self, messages: Messages) -> Path:
        request = {
            "backend": self.backend.identity,
            "messages": messages,
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        }
        digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def ask(self, messages: Messages) -> str:
        """The answer to ``messages``: from the cache, or asked once even when threads ask together."""
        path = self._path(messages)
        with self._count_lock:
            in_flight = self._in_flight.setdefault(path.name, threading.Lock())
        with in_flight:
            cached = read_json(path)
            if cached is not None:
                with self._count_lock:
                    self.hits += 1
                return cached["answer"]
            if self.failed is not None:  # another thread already gave up: ask nothing more
                raise self.failed
            try:
                answer = self._with_retries(messages)
            except BaeError as exc:
                self.failed = exc
                raise
            atomic_write_json(
                path, {"backend": self.backend.identity, "messages": messages, "answer": answer}
            )
            return answer

    def _with_retries(self, messages: Messages) -> str:
        c = self.config
        for attempt in range(c.max_retries + 1):
            self.limiter.wait()
            with self._count_lock:
                self.requests += 1
            try:
                return self.backend.complete(messages, c.max_tokens, c.temperature)
            except TransientError as exc:
                last = exc
                if attempt < c.max_retries:
                    time.sleep(min(c.max_backoff_s, c.backoff_s * 2**attempt))
        where = getattr(self.backend, "url", self.backend.identity)
        raise BaeError(
            f"LLM endpoint {where} failed {c.max_retries + 1} times (last: {last}); answers so far are "
            f"kept in {self.cache_dir}, re-run to continue"
        )


_YES = {"yes", "y", "true", "correct", "consistent"}
_NO = {"no", "n", "false", "incorrect", "inconsistent"}


def parse_yes_no(answer: str) -> bool | None:
    """'Yes.', '**yes**', 'Answer: no' -> True/False; None when the answer says neither (or both)."""
    words = re.findall(r"[a-z]+", answer.lower())
    if not words:
        return None
    for word in words[:2]:  # "Yes, …", "Answer: yes"
        if word in _YES:
            return True
        if word in _NO:
            return False
    has_yes, has_no = "yes" in words, "no" in words
    return has_yes if has_yes != has_no else None


def clean_explanation(answer: str, limit: int = 160) -> str:
    """The first non-empty line, without a label, quotes, markdown or a final period."""
    line = next((ln.strip() for ln in answer.splitlines() if ln.strip()), "")
    line = re.sub(r"[*_`]+", "", line).strip()
    line = re.sub(r"^(explanation|answer|feature|description)\s*:\s*", "", line, flags=re.IGNORECASE)
    line = line.strip(" *_`\"'“”").rstrip(".").strip()
    return line[:limit]
