"""ComSem interpretation against a real OpenAI-compatible HTTP server on loopback (no mocks)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from features_helpers import make_text_store, save_autoencoder, save_tokenizer

from bae.errors import BaeError
from bae.pipeline.features_config import FeaturesConfig
from bae.pipeline.interpret import run_interpret
from bae.pipeline.llm_client import clean_explanation, parse_yes_no


class ChatServer:
    """Answers /v1/chat/completions deterministically; fails the first ``fail_first`` requests with 503."""

    def __init__(self, fail_first: int = 0, key: str | None = None):
        self.bodies: list[dict] = []
        self.fail_first, self.key = fail_first, key
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                if server.key and self.headers.get("Authorization") != f"Bearer {server.key}":
                    return self._send(401, {"error": "bad key"})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "no such route"})
                if len(server.bodies) <= server.fail_first:
                    return self._send(503, {"error": "warming up"})
                return self._send(
                    200, {"choices": [{"message": {"role": "assistant", "content": server.answer(body)}}]}
                )

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def answer(body: dict) -> str:
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if system.startswith("You explain"):
            return "**Explanation:** Words with the letter e."
        token = user.split("Sample: token ", 1)[1].split(" (position", 1)[0]
        return "Yes." if "e" in token else "no"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interpret")
    tokenizer = save_tokenizer(tmp / "tokenizer")
    make_text_store(tmp / "store.zarr", tokenizer)
    return tmp, save_autoencoder(tmp / "sae", "relu_sae")


def _config(tmp: Path, checkpoint: Path, out: str, url: str, **interpret) -> FeaturesConfig:
    options = {
        "base_url": url,
        "backoff_s": 0.01,
        "max_backoff_s": 0.05,
        "concurrency": 2,
        "cache_dir": str(tmp / "llm_cache"),
        **interpret,
    }
    return FeaturesConfig(
        store=str(tmp / "store.zarr"), checkpoint=str(checkpoint), out=str(tmp / out), interpret=options
    )


def test_parse_answers():
    assert parse_yes_no("Yes.") is True
    assert parse_yes_no("  **yes**") is True
    assert parse_yes_no("Answer: No.") is False
    assert parse_yes_no("no, it does not") is False
    assert parse_yes_no("I would say yes") is True
    assert parse_yes_no("maybe") is None
    assert parse_yes_no("") is None
    assert clean_explanation('Explanation: "Capital cities."\nmore') == "Capital cities"


def test_interpret_retries_caches_and_reports(setup, monkeypatch):
    tmp, checkpoint = setup
    monkeypatch.setenv("BAE_LLM_API_KEY", "secret")
    with ChatServer(fail_first=2, key="secret") as server:
        config = _config(tmp, checkpoint, "out", server.url, min_samples=40)
        result = run_interpret(config, show_progress=False, quiet=True)
        first = len(server.bodies)
        summary = result["summary"]
        assert summary["interpreted"] > 0 and summary["llm_requests"] == first  # 2 failures were retried
        assert {b["model"] for b in server.bodies} == {config.interpret.model}
        for verdict in result["features"]:
            if verdict["assigned"] < 40:
                assert verdict["interpretable"] is False and "too few samples" in verdict["reason"]
            else:
                assert verdict["explanation"] == "Words with the letter e"
                judged = verdict["judgements"]
                assert len(judged) == verdict["n_positive"] + 4 and verdict["n_positive"] <= 8
                for j in judged:  # "Yes." parsed as yes, "no" as no
                    assert j["parsed"] is (j["answer"] == "Yes.")
                assert verdict["score"] == sum(j["consistent"] for j in judged) / len(judged)
                assert verdict["interpretable"] is (verdict["score"] > 0.5)
        asked = [json.dumps(b["messages"]) for b in server.bodies[2:]]
        assert len(set(asked)) == len(asked)  # identical prompts (same sample, same explanation) asked once
        html = (tmp / "out" / "report.html").read_text()
        assert "Words with the letter e" in html

        (tmp / "out" / "interpretation.json").unlink()  # force the stage to run again: all from the cache
        again = run_interpret(config, show_progress=False, quiet=True)
        assert len(server.bodies) == first
        asks = summary["interpreted"] + sum(len(v.get("judgements", [])) for v in result["features"])
        assert again["summary"]["llm_requests"] == 0 and again["summary"]["cache_hits"] == asks
        assert again["features"] == result["features"]


def test_unreachable_endpoint_fails_after_bounded_retries_and_keeps_cache(setup):
    tmp, checkpoint = setup
    cache = tmp / "dead_cache"
    options = {"min_samples": 6, "max_retries": 2, "model": "other-model", "cache_dir": str(cache)}
    with ChatServer() as server:
        url = server.url
        run_interpret(_config(tmp, checkpoint, "partial", url, max_features=2, **options), False, quiet=True)
    kept = sorted(cache.rglob("*.json"))
    assert kept
    config = _config(tmp, checkpoint, "dead", url, max_features=4, **options)  # the server is gone now
    with pytest.raises(BaeError, match=r"failed 3 times .*kept in"):
        run_interpret(config, show_progress=False, quiet=True)
    assert not (tmp / "dead" / "interpretation.json").exists()
    assert set(kept) <= set(cache.rglob("*.json"))


def test_refused_request_is_not_retried(setup, monkeypatch):
    tmp, checkpoint = setup
    monkeypatch.delenv("BAE_LLM_API_KEY", raising=False)
    with ChatServer(key="secret") as server:
        config = _config(tmp, checkpoint, "refused", server.url, cache_dir=str(tmp / "other_cache"))
        with pytest.raises(BaeError, match="HTTP 401"):
            run_interpret(config, show_progress=False, quiet=True)
        assert len(server.bodies) <= config.interpret.concurrency
