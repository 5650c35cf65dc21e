"""Top contexts of every feature and the ComSem sample sets, in one bounded-memory dask pass.

Scores (docs/method.md): a BAE bit scores ``|h1 − p̄|`` (its rarer state scores higher), an SAE
feature its activation, optionally z-scored per feature. A (token, feature) pair is *eligible* when
the score is positive (for an SAE: when the feature fires); tokens are assigned to features by this
score. Contexts are *ranked* by it too for an SAE; a BAE's score has only two values, so its contexts
(and ComSem's explain samples) are ranked by the bit's *margin*: the encoder's pre-step value
``(W_enc x + b_enc)_j`` signed toward the bit's rarer state (positive exactly when the bit is in it,
larger = further past the threshold). Ties are broken by a seeded random key
per (row, feature), so equal scores never favour low feature indices or early rows, and the result
does not depend on how rows are batched or split across workers.

Per feature the pass keeps (each a top-k heap merged across units):
``contexts``  the ``top_k`` highest-scoring eligible rows (the report),
``explain``   the ``n_explain`` highest-scoring rows among those *assigned* to it (each token is
              assigned to its top ``features_per_token`` eligible features),
``test``      ``n_explain + n_test`` assigned rows chosen uniformly at random (judge samples),
and globally ``negative_pool`` uniformly random rows with the features each is assigned to.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bae.common.atomic_files import atomic_write_json, read_json
from bae.common.console import print_summary
from bae.common.errors import BaeError
from bae.pipeline.analysis.scan import ScanSpec, map_reduce_units
from bae.pipeline.analysis.token_text import TokenText, load_store_tokenizer
from bae.pipeline.features.config import FeaturesConfig, check_recorded
from bae.pipeline.features.frequency import FrequencyResult, run_frequency
from bae.pipeline.features.report import write_report
from bae.pipeline.features.spec import output_dir, scan_spec
from bae.pipeline.features.topk import TopK, random_keys, select_top
from bae.stores import ActivationStore
from bae.trainer.models import Autoencoder

CONTEXTS_JSON = "contexts.json"
# a BAE context's score; contexts.json files recording another BAE score are recomputed
BAE_MARGIN = "margin: encoder pre-step value toward the bit's rarer state"
KEY_TIES, KEY_SAMPLE, KEY_NEGATIVE = 0, 1, 2


@dataclass(frozen=True)
class ScoreParams:
    """What turns codes into scores, and how many entries each heap keeps (picklable)."""

    architecture: str
    center: np.ndarray  # BAE: p̄ per bit; SAE with z-score: mean activation; else zeros
    scale: np.ndarray | None  # SAE with z-score: activation std; else None
    seed: int
    top_k: int
    features_per_token: int
    n_explain: int
    n_test: int
    negative_pool: int

    def scores(self, bits: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Scores [n, F] float64, -inf where the pair is not eligible."""
        center = torch.from_numpy(self.center).to(code.device)
        if self.architecture == "bae":
            score = (code.double() - center).abs()
            eligible = score > 0
        else:
            score = code.double()
            if self.scale is not None:
                score = (score - center) / torch.from_numpy(self.scale).to(code.device)
            eligible = bits
        return torch.where(eligible, score, -torch.inf)

    def ranks(self, score: torch.Tensor, model: Autoencoder, x: torch.Tensor) -> torch.Tensor:
        """What orders a feature's contexts [n, F]: a BAE bit's margin toward its rarer state, an
        SAE's score; -inf where ``score`` is."""
        if self.architecture != "bae":
            return score
        with torch.no_grad():
            sign = torch.from_numpy(rarer_sign(self.center)).to(x.device)
            margin = model.pre_activations(x).double() * sign
        return torch.where(score > -torch.inf, margin, -torch.inf)


def rarer_sign(frequency: np.ndarray) -> np.ndarray:
    """+1 for bits whose rarer state is on (p̄ ≤ ½), −1 for the others."""
    return np.where(frequency <= 0.5, 1.0, -1.0)


@dataclass
class ContextsPartial:
    rows: int
    assigned: np.ndarray | torch.Tensor  # int64 [F]: tokens assigned to each feature (a tensor on a device)
    contexts: TopK  # extra: [bit]
    explain: TopK
    test: TopK
    negatives: TopK  # one group; extra: the row's assigned features (-1 padded)

    @classmethod
    def empty(cls, n_features: int, p: ScoreParams, device: torch.device | None = None) -> ContextsPartial:
        return cls(
            0,
            torch.zeros(n_features, dtype=torch.int64, device=device),
            TopK.empty(n_features, p.top_k, extra=1, device=device),
            TopK.empty(n_features, p.n_explain, device=device),
            TopK.empty(n_features, p.n_explain + p.n_test, device=device),
            TopK.empty(1, p.negative_pool, extra=p.features_per_token, device=device),
        )

    def cpu(self) -> ContextsPartial:
        """This partial in host memory (what dask ships and merges)."""
        heaps = (self.contexts.cpu(), self.explain.cpu(), self.test.cpu(), self.negatives.cpu())
        return ContextsPartial(self.rows, torch.as_tensor(self.assigned).cpu().numpy(), *heaps)

    def merge(self, other: ContextsPartial) -> ContextsPartial:
        return ContextsPartial(
            self.rows + other.rows,
            self.assigned + other.assigned,
            self.contexts.merge(other.contexts),
            self.explain.merge(other.explain),
            self.test.merge(other.test),
            self.negatives.merge(other.negatives),
        )


def assign(score: torch.Tensor, ties: torch.Tensor, per_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's top ``per_token`` eligible features: (mask [n, F], ids [n, per_token], -1 padded)."""
    top = select_top(score, ties, per_token)
    valid = score.gather(1, top) > -torch.inf
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, top, valid)
    return mask, torch.where(valid, top, -1)


def contexts_partial(spec: ScanSpec, p: ScoreParams, unit: int) -> ContextsPartial:
    """The heaps and assignment counts of one store unit, computed on the model's device; only the
    heaps (k entries per feature) leave it, once per unit."""
    _, model = spec.open()
    device = model.encoder.weight.device
    n_features = model.n_bits
    part = ContextsPartial.empty(n_features, p, device)
    features = torch.arange(n_features, device=device)
    for x, rows in spec.batches(unit):
        seen = model.analyse(x)
        bits, code = seen.bits, seen.code
        score = p.scores(bits, code)
        rank = p.ranks(score, model, x)
        row = torch.from_numpy(rows).to(device)
        ties = random_keys(row[:, None], features[None, :], p.seed, KEY_TIES)
        mask, top = assign(score, ties, p.features_per_token)
        sample = random_keys(row[:, None], features[None, :], p.seed, KEY_SAMPLE)
        negative = torch.zeros(1, 1, dtype=torch.int64, device=device)
        neg_key = random_keys(row[None, :], negative, p.seed, KEY_NEGATIVE)
        part = part.merge(
            ContextsPartial(
                len(x),
                mask.sum(0),
                TopK(rank.T, ties.T, row.expand(n_features, -1), bits.T.long()[..., None]),
                TopK(torch.where(mask, rank, -torch.inf).T, ties.T, row.expand(n_features, -1)),
                TopK(torch.where(mask, sample, -torch.inf).T, sample.T, row.expand(n_features, -1)),
                TopK(neg_key, neg_key, row[None, :], top[None]),
            )
        )
    return part.cpu()


class ContextReader:
    """Token windows around store rows (same document only), reading each unit's row arrays once."""

    def __init__(
        self, store: ActivationStore, text: TokenText, before: int, after: int, cache_units: int = 4
    ):
        self.store, self.text, self.before, self.after = store, text, before, after
        self._units: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._cache_units = cache_units

    def _unit_rows(self, unit: int) -> dict[str, np.ndarray]:
        if unit not in self._units:
            self._units[unit] = self.store.read_unit_rows(unit)
            if len(self._units) > self._cache_units:
                self._units.popitem(last=False)
        self._units.move_to_end(unit)
        return self._units[unit]

    def _rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Row arrays of ``start:stop``, which may straddle a unit boundary."""
        size = self.store.unit_rows
        parts = []
        for unit in range(start // size, (stop - 1) // size + 1):
            a = max(start, unit * size) - unit * size
            b = min(stop, (unit + 1) * size) - unit * size
            parts.append({k: v[a:b] for k, v in self._unit_rows(unit).items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _window(self, row: int) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
        """Row arrays from ``row - before`` on, the offsets shown (same document, valid, real tokens;
        ``row`` itself always) and ``row``'s offset."""
        start, stop = max(0, row - self.before), min(self.store.n_rows, row + self.after + 1)
        rows = self._rows(start, stop)
        at = row - start
        keep = rows["doc_ids"] == rows["doc_ids"][at]
        keep &= rows["valid"].astype(bool) & (rows["token_ids"] >= 0)
        keep[at] = True
        return rows, np.flatnonzero(keep), at

    def window(self, row: int) -> tuple[list[int], list[int], int]:
        """The tokens shown around ``row``: their store rows, token ids, and where ``row`` is among them."""
        rows, kept, at = self._window(row)
        start = max(0, row - self.before)
        return (start + kept).tolist(), rows["token_ids"][kept].tolist(), int(np.searchsorted(kept, at))

    def sample(self, row: int) -> dict[str, Any]:
        """The token at ``row`` with the text before and after it in its document."""
        rows, kept, at = self._window(row)
        ids = rows["token_ids"]
        token = int(ids[at])
        return {
            "row": row,
            "doc": int(rows["doc_ids"][at]),
            "position": int(rows["positions"][at]),
            "token_id": token,
            "before": self.text.decode(ids[kept[kept < at]].tolist()),
            "token": self.text.decode([token]),
            "after": self.text.decode(ids[kept[kept > at]].tolist()),
        }

    def samples(self, rows: list[int]) -> dict[int, dict[str, Any]]:
        """``sample`` of each row, read in row order so the unit cache is effective."""
        return {r: self.sample(r) for r in sorted(set(rows))}


def feature_records(
    part: ContextsPartial, p: ScoreParams, freq: FrequencyResult, reader: ContextReader, n_negative: int
) -> list[dict[str, Any]]:
    """One record per feature: frequency, assigned count, top contexts and ComSem samples with text."""
    n_features = len(freq.frequency)
    neg_rows = part.negatives.row[0]
    assert part.negatives.extra is not None and part.contexts.extra is not None  # both made with extra
    neg_feats = part.negatives.extra[0]
    neg_ok = neg_rows >= 0
    neg_rows, neg_feats = neg_rows[neg_ok], neg_feats[neg_ok]
    plan: list[dict[str, Any]] = []
    wanted: list[int] = []
    for j in range(n_features):
        contexts = part.contexts.entries(j)
        states = part.contexts.extra[j, : len(contexts), 0].tolist()
        explain = part.explain.entries(j)
        chosen = {r for r, _ in explain}
        test = [r for r, _ in part.test.entries(j) if r not in chosen][: p.n_test]
        candidates = neg_rows[~(neg_feats == j).any(1)].tolist()
        rng = np.random.default_rng([p.seed, 3, j])
        negative = sorted(rng.choice(candidates, min(n_negative, len(candidates)), replace=False).tolist())
        plan.append(
            {"contexts": contexts, "states": states, "explain": explain, "test": test, "negative": negative}
        )
        wanted += [r for r, _ in contexts] + [r for r, _ in explain] + test + negative
    text = reader.samples(wanted)
    records = []
    for j, item in enumerate(plan):
        f = float(freq.frequency[j])
        record: dict[str, Any] = {"feature": j, "frequency": f, "assigned": int(part.assigned[j])}
        if p.architecture == "bae":
            record["oriented_frequency"] = min(f, 1 - f)
        record["contexts"] = [
            {**text[r], "score": s, **({"bit": b} if p.architecture == "bae" else {})}
            for (r, s), b in zip(item["contexts"], item["states"])
        ]
        record["comsem"] = {
            "explain": [{**text[r], "score": s} for r, s in item["explain"]],
            "test": [text[r] for r in item["test"]],
            "negative": [text[r] for r in item["negative"]],
        }
        records.append(record)
    return records


def score_params(config: FeaturesConfig, architecture: str, freq: FrequencyResult) -> ScoreParams:
    it = config.interpret
    if architecture == "bae":
        center, scale = freq.frequency.astype(np.float64), None
    elif config.z_score:
        center, scale = freq.code_mean.astype(np.float64), freq.code_std.astype(np.float64)
    else:
        center, scale = np.zeros(len(freq.frequency)), None
    return ScoreParams(
        architecture,
        center,
        scale,
        config.seed,
        config.top_k,
        it.features_per_token,
        it.n_explain,
        it.n_test,
        it.negative_pool,
    )


def run_contexts(config: FeaturesConfig, show_progress: bool = True, quiet: bool = False) -> dict[str, Any]:
    """``bae features contexts``: ``<out>/contexts.json`` and ``<out>/report.html`` (reused if up to date)."""
    out = output_dir(config)
    path = out / CONTEXTS_JSON
    recorded = read_json(path)
    if check_recorded(f"contexts output {path}", recorded and recorded["config"], config, "contexts") and (
        _current(recorded)
    ):
        assert recorded is not None  # check_recorded is False for a missing file
        data: dict[str, Any] = recorded
    else:
        spec = scan_spec(config)
        store, model = spec.open()
        freq = run_frequency(config, show_progress, spec=spec, quiet=True)
        params = score_params(config, model.architecture, freq)
        part = map_reduce_units(
            spec.units,
            functools.partial(contexts_partial, spec, params),
            ContextsPartial.merge,
            config.scheduler,
            "features: contexts",
            show_progress,
        )
        if part.rows == 0:
            raise BaeError(f"store {spec.store} layer {spec.layer}: no rows pass the filters")
        text = TokenText(load_store_tokenizer(store, config.tokenizer))
        reader = ContextReader(store, text, config.context_before, config.context_after)
        data = {
            "config": config.stage_config("contexts"),
            "architecture": model.architecture,
            "score": score_name(model.architecture, config.z_score),
            "decoded": text.tokenizer is not None,
            "rows": part.rows,
            "summary": freq.summary,
            "features": feature_records(part, params, freq, reader, config.interpret.n_negative),
        }
        atomic_write_json(path, data)
    report = write_report(out, data, read_json(out / "interpretation.json"))
    if not quiet:
        with_contexts = sum(1 for f in data["features"] if f["contexts"])
        print_summary(
            f"bae features contexts -> {out}",
            {
                "features": len(data["features"]),
                "with contexts": with_contexts,
                "score": data["score"],
                "contexts.json": path,
                "report": report,
            },
        )
    return data


def _current(recorded: dict[str, Any] | None) -> bool:
    """False for a BAE's contexts.json written with an earlier score (recomputed, not reused)."""
    return recorded is not None and (recorded["architecture"] != "bae" or recorded["score"] == BAE_MARGIN)


def score_name(architecture: str, z_score: bool) -> str:
    """What a context's ``score`` is (recorded in contexts.json)."""
    if architecture == "bae":
        return BAE_MARGIN
    return "activation z-score" if z_score else "activation"
