"""ComSem interpretation against a real OpenAI-compatible HTTP server on loopback (no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bae_testing.features import ChatServer, make_text_store, save_autoencoder, save_tokenizer

from bae.common.errors import BaeError
from bae.pipeline.features.config import FeaturesConfig, InterpretConfig
from bae.pipeline.features.interpret import run_interpret
from bae.pipeline.features.llm_client import clean_explanation, parse_yes_no


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
        store=str(tmp / "store.zarr"),
        checkpoint=str(checkpoint),
        out=str(tmp / out),
        interpret=InterpretConfig.model_validate(options),
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
