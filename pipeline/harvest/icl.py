"""``bae icl-prompts``: in-context-learning prompts from a staicc dataset, as a JSONL corpus for harvest.

A prompt is ``instruction`` + k demonstrations ``<input prefix><text>\\n<label prefix> <label word>\\n\\n``
+ the query ``<input prefix><text>\\n<label prefix>``, ending exactly at the label prefix. Queries come
from the derived ``test`` split, demonstrations from ``train`` less any text equal to a query text, so a
query is never among its demonstrations; the same n queries serve every k. Every draw is seeded by a
string of (seed, dataset, k, query number), so the prompts of one k do not depend on the other ks.

Harvest with ``--text-field prompt --mode document --positions last``; group by ``k`` in entropy.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from bae.common.atomic_files import atomic_write_text
from bae.common.command import cli
from bae.common.configs import StrictModel, comma_list
from bae.common.console import print_summary
from bae.common.errors import BaeError
from bae.common.outputs import LocalOutput
from bae.pipeline.harvest.staicc import LABELS, Record, load_staicc

DEFAULT_KS = [0, 1, 2, 4, 8]


class IclPromptsConfig(StrictModel):
    """Which dataset, how many prompts with how many demonstrations, and how they are laid out."""

    dataset: str = Field(
        description="staicc dataset name, e.g. sst2 (a wrong name lists them)",
        json_schema_extra=cli(argument=True),
    )
    out: LocalOutput = Field(
        default="prompts.jsonl", description="JSONL file to write", json_schema_extra=cli("-o")
    )
    n: int = Field(default=100, ge=1, description="queries, i.e. prompts per k", json_schema_extra=cli("-n"))
    ks: list[int] = Field(
        default_factory=lambda: list(DEFAULT_KS),
        description="numbers of demonstrations, e.g. 0,1,2,4,8",
        json_schema_extra=cli("-k"),
    )
    seed: int = Field(default=0, ge=0, description="seed of every draw")
    label_prefix: str = Field(default="Answer:", description="text before each label word")
    input_prefix: str = Field(default="", description="text before each input, e.g. 'Review: '")
    instruction: str = Field(default="", description="text before the first demonstration; \\n is a newline")
    demo_labels: Literal["balanced", "random"] = Field(
        default="balanced", description="demonstration labels: as even as k allows, or drawn at random"
    )
    balanced_queries: bool = Field(default=False, description="draw queries with labels as even as n allows")
    max_chars: int | None = Field(
        default=None, ge=1, description="truncate every text to this many characters"
    )

    @field_validator("ks", mode="before")
    @classmethod
    def _ks(cls, value: Any) -> Any:
        return comma_list(value)

    @field_validator("ks")
    @classmethod
    def _ks_valid(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 0 or len(set(value)) != len(value):
            raise ValueError("expected distinct non-negative integers, e.g. 0,1,2,4,8")
        return value

    @field_validator("instruction", mode="after")
    @classmethod
    def _newlines(cls, value: str) -> str:
        return value.replace("\\n", "\n")


@dataclass(frozen=True)
class Template:
    """How demonstrations and the query are laid out."""

    label_prefix: str = "Answer:"
    input_prefix: str = ""
    instruction: str = ""
    demo_sep: str = "\n\n"

    def demo(self, text: str, word: str) -> str:
        return f"{self.input_prefix}{text}\n{self.label_prefix} {word}{self.demo_sep}"

    def query(self, text: str) -> str:
        return f"{self.input_prefix}{text}\n{self.label_prefix}"


@dataclass(frozen=True)
class Pools:
    """Queries (test split) and demonstrations (train split, no text equal to a query's), cleaned."""

    queries: list[Record]
    demos: list[Record]

    def demos_by_label(self) -> dict[int, list[Record]]:
        return _by_label(self.demos)


def _by_label(records: Sequence[Record]) -> dict[int, list[Record]]:
    groups: dict[int, list[Record]] = defaultdict(list)
    for rec in records:
        groups[rec.label].append(rec)
    return dict(sorted(groups.items()))


def _clean(text: str, max_chars: int | None) -> str:
    text = text.strip()
    return text[:max_chars].rstrip() if max_chars else text


def pools(dataset: str, max_chars: int | None = None) -> Pools:
    """The non-empty, cleaned records of ``dataset`` split into query and demonstration pools."""
    records = [replace(r, text=_clean(r.text, max_chars)) for r in load_staicc(dataset)]
    records = [r for r in records if r.text]
    queries = [r for r in records if r.split == "test"]
    query_texts = {r.text for r in queries}
    demos = [r for r in records if r.split == "train" and r.text not in query_texts]
    return Pools(queries, demos)


def _sample(rng: random.Random, pool: Sequence[Record], n: int, what: str) -> list[Record]:
    if n > len(pool):
        raise BaeError(f"{what}: {n} needed, only {len(pool)} available")
    return rng.sample(pool, n)


def sample_balanced(rng: random.Random, groups: dict[int, list[Record]], n: int, what: str) -> list[Record]:
    """n records without replacement whose label counts differ by at most one, in shuffled order."""
    labels = sorted(groups)
    extra = set(rng.sample(labels, n % len(labels)))
    out: list[Record] = []
    for label in labels:
        count = n // len(labels) + (label in extra)
        out += _sample(rng, groups[label], count, f"{what}, label {label}")
    rng.shuffle(out)
    return out


def label_words(dataset: str, labels: set[int], words: Sequence[str] | None = None) -> list[str]:
    """The word shown for each label index: ``words``, else the dataset's short label words."""
    if words is None:
        if dataset not in LABELS:
            raise BaeError(f"staicc dataset {dataset!r} has no label words; pass label_words")
        words = LABELS[dataset].words
    if labels and max(labels) >= len(words):
        raise BaeError(f"staicc dataset {dataset!r}: label {max(labels)} has no word ({len(words)} given)")
    return list(words)


def build_prompts(cfg: IclPromptsConfig, words: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``cfg.n`` prompts per k, k-major, each with its k, query and demonstrations as metadata."""
    pool = pools(cfg.dataset, cfg.max_chars)
    vocab = label_words(cfg.dataset, {r.label for r in pool.queries + pool.demos}, words)
    template = Template(cfg.label_prefix, cfg.input_prefix, cfg.instruction)
    what = f"{cfg.dataset} queries (test split)"
    rng = random.Random(f"{cfg.seed}:{cfg.dataset}:queries")
    if cfg.balanced_queries:
        queries = sample_balanced(rng, _by_label(pool.queries), cfg.n, what)
    else:
        queries = _sample(rng, pool.queries, cfg.n, what)
    groups = pool.demos_by_label()
    records = []
    for k in cfg.ks:
        what = f"{cfg.dataset} demonstrations (train split), k={k}"
        for i, query in enumerate(queries):
            rng = random.Random(f"{cfg.seed}:{cfg.dataset}:k{k}:{i}")
            if cfg.demo_labels == "balanced":
                demos = sample_balanced(rng, groups, k, what)
            else:
                demos = _sample(rng, pool.demos, k, what)
            shown = "".join(template.demo(d.text, vocab[d.label]) for d in demos)
            records.append(
                {
                    "prompt": template.instruction + shown + template.query(query.text),
                    "k": k,
                    "query_label": query.label,
                    "query_label_name": query.label_name,
                    "query_index": query.index,
                    "demo_labels": ",".join(str(d.label) for d in demos),
                    "demo_indices": ",".join(str(d.index) for d in demos),
                    "dataset": cfg.dataset,
                    "seed": cfg.seed,
                    "prompt_id": f"{cfg.dataset}-s{cfg.seed}-k{k}-{i:05d}",
                }
            )
    return records


def write_jsonl(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One JSON object per line, written atomically."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    try:
        return atomic_write_text(path, text)
    except OSError as exc:
        raise BaeError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_icl_prompts(cfg: IclPromptsConfig) -> Path:
    """Build the prompts, write them to ``cfg.out`` and print a summary."""
    records = build_prompts(cfg)
    path = write_jsonl(records, cfg.out)
    print_summary(
        f"bae icl-prompts -> {path}",
        {
            "dataset": cfg.dataset,
            "prompts": f"{len(records)} ({cfg.n} queries x k = {','.join(map(str, cfg.ks))})",
            "demo labels": cfg.demo_labels,
            "next": f"bae harvest --corpus {path} --text-field prompt --mode document --positions last",
        },
    )
    return path
