"""ComSem interpretation (docs/method.md): explain each feature from its top-scoring assigned tokens
as one short phrase, then judge further assigned tokens (should be "yes") and non-assigned ones
(should be "no"); the score is the fraction of judgements consistent with that expectation.

Samples come from ``bae features contexts`` (seeded, tie-breaking at random); the LLM only ever reads
text and answers yes/no, never numbers. A feature with fewer than ``min_samples`` assigned tokens is
reported as not interpretable, not as an error.
"""

from __future__ import annotations

from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from bae.common.atomic_files import atomic_write_json, read_json
from bae.common.console import print_summary, progress
from bae.pipeline.features.config import FeaturesConfig, InterpretConfig, check_recorded
from bae.pipeline.features.contexts import run_contexts
from bae.pipeline.features.llm_client import (
    CachedChat,
    Messages,
    clean_explanation,
    make_backend,
    parse_yes_no,
)
from bae.pipeline.features.report import write_report
from bae.pipeline.features.spec import output_dir

INTERPRETATION_JSON = "interpretation.json"

EXPLAIN_SYSTEM = (
    "You explain features of a language model. A feature is active on certain tokens of a text. "
    "Reply with one short phrase (at most 12 words) saying what the feature detects, and nothing else."
)
JUDGE_SYSTEM = (
    "You check whether a description of a language-model feature applies to one marked token. "
    "Reply with yes or no only."
)


def _sample_text(sample: dict[str, Any]) -> str:
    text = f"{sample['before']}<<{sample['token']}>>{sample['after']}"
    return f"token {sample['token']!r} (position {sample['position']}) in: {text}"


def explain_messages(samples: list[dict[str, Any]]) -> Messages:
    lines = "\n".join(f"{i}. {_sample_text(s)}" for i, s in enumerate(samples, 1))
    user = (
        "The feature is active on the token marked <<like this>> in each sample.\n\n"
        f"{lines}\n\nWhat does the feature detect? One short phrase."
    )
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def judge_messages(explanation: str, sample: dict[str, Any]) -> Messages:
    user = (
        f"Feature description: {explanation}\n\nSample: {_sample_text(sample)}\n\n"
        "Does the description apply to the marked token? Answer yes or no."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def interpret_feature(record: dict[str, Any], chat: CachedChat, config: InterpretConfig) -> dict[str, Any]:
    """Explanation, judgements and score of one feature (or why it was not interpreted)."""
    result: dict[str, Any] = {"feature": record["feature"], "assigned": record["assigned"]}
    samples = record["comsem"]
    if record["assigned"] < config.min_samples or not samples["test"]:
        return {
            **result,
            "interpretable": False,
            "reason": f"too few samples ({record['assigned']} assigned, need {config.min_samples})",
        }
    explanation = clean_explanation(chat.ask(explain_messages(samples["explain"][: config.n_explain])))
    if not explanation:
        return {**result, "interpretable": False, "reason": "the explainer gave no explanation"}
    judged = [(s, True) for s in samples["test"][: config.n_test]]
    judged += [(s, False) for s in samples["negative"]]
    judgements = []
    for sample, expected in judged:
        answer = chat.ask(judge_messages(explanation, sample))
        said = parse_yes_no(answer)
        judgements.append(
            {
                "row": sample["row"],
                "expected": expected,
                "answer": answer.strip()[:40],
                "parsed": said,
                "consistent": said is expected,
            }
        )
    score = sum(j["consistent"] for j in judgements) / len(judgements)
    return {
        **result,
        "explanation": explanation,
        "score": score,
        "interpretable": score > config.threshold,
        "n_positive": sum(expected for _, expected in judged),
        "judgements": judgements,
    }


def choose_features(records: list[dict[str, Any]], config: InterpretConfig, seed: int) -> list[int]:
    """Features with enough samples; a seeded subset of them when ``max_features`` is set."""
    eligible = [r["feature"] for r in records if r["assigned"] >= config.min_samples and r["comsem"]["test"]]
    if config.max_features is not None and len(eligible) > config.max_features:
        rng = np.random.default_rng([seed, 4])
        eligible = sorted(rng.choice(eligible, config.max_features, replace=False).tolist())
    return eligible


def run_interpret(config: FeaturesConfig, show_progress: bool = True, quiet: bool = False) -> dict[str, Any]:
    """``bae features interpret``: ``<out>/interpretation.json`` and the report with explanations."""
    out = output_dir(config)
    path = out / INTERPRETATION_JSON
    recorded = read_json(path)
    data = run_contexts(config, show_progress, quiet=True)
    if check_recorded(f"interpretation {path}", recorded and recorded["config"], config, "interpret"):
        assert recorded is not None  # check_recorded is False for a missing file
        result: dict[str, Any] = recorded
    else:
        it = config.interpret
        chat = CachedChat(make_backend(it), Path(it.cache_dir or out / "llm_cache"), it)
        records = data["features"]
        chosen = set(choose_features(records, it, config.seed))
        verdicts: dict[int, dict[str, Any]] = {}
        bar = progress(len(chosen), "features: interpret", unit="feature", disable=not show_progress)
        with ThreadPoolExecutor(it.concurrency, thread_name_prefix="bae-interpret") as pool:
            futures = {pool.submit(interpret_feature, records[j], chat, it): j for j in sorted(chosen)}
            for future in futures:
                future.add_done_callback(lambda _: bar.update(1))
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for future in done:
                exc = future.exception()
                if exc is not None:
                    bar.close()
                    raise exc
                verdicts[futures[future]] = future.result()
        bar.close()
        features = []
        for r in records:
            if r["feature"] in verdicts:
                features.append(verdicts[r["feature"]])
            else:
                reason = (
                    "not sampled (interpret.max_features)"
                    if r["assigned"] >= it.min_samples
                    else f"too few samples ({r['assigned']} assigned, need {it.min_samples})"
                )
                features.append(
                    {
                        "feature": r["feature"],
                        "assigned": r["assigned"],
                        "interpretable": False,
                        "reason": reason,
                    }
                )
        scores = [v["score"] for v in verdicts.values() if "score" in v]
        summary = {
            "features": len(records),
            "eligible": sum(r["assigned"] >= it.min_samples for r in records),
            "interpreted": len(scores),
            "interpretable": sum(v["interpretable"] for v in verdicts.values()),
            "mean_score": float(np.mean(scores)) if scores else None,
            "threshold": it.threshold,
            "llm": chat.backend.identity,
            "llm_requests": chat.requests,
            "cache_hits": chat.hits,
        }
        result = {"config": config.stage_config("interpret"), "summary": summary, "features": features}
        atomic_write_json(path, result)
    report = write_report(out, data, result)
    if not quiet:
        print_summary(f"bae features interpret -> {out}", {**result["summary"], "report": report})
    return result
