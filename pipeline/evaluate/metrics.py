"""Per-document sums of the next-token terms, saved per unit, merged, and turned into the reported
means with bootstrap intervals over documents; the checkpoint's FVU sums on the same tokens.

A document's sums (tokens, tokens with a next token, Σ CE, Σ KL, Σ JSD) for each variant of the forward
(``clean``, ``zero``, ``mean``, ``spliced``) are all that the means need: a mean is a ratio of sums,
and a bootstrap replicate reweights whole documents (resampled with replacement), so a document cut
across two windows or units counts once.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bae.common.atomic_files import atomic_write_bytes
from bae.common.stats import fvu_from_sums

COLUMNS = ("tokens", "ce_tokens", "ce", "kl", "jsd")
FVU_KEYS = ("fvu_sse", "fvu_x_sum", "fvu_x_sq", "fvu_rows", "atypical_rows")


def doc_sums(doc_ids: np.ndarray, terms: dict[str, np.ndarray], has_target: np.ndarray) -> tuple:
    """(sorted documents, float64 [D, 5] sums of ``COLUMNS``) of per-row terms."""
    docs, inverse = np.unique(doc_ids, return_inverse=True)
    weights = [np.ones(len(doc_ids)), has_target, terms["ce"], terms["kl"], terms["jsd"]]
    return docs, np.stack([np.bincount(inverse, w, minlength=len(docs)) for w in weights], axis=1)


@dataclass
class Partial:
    """Per-document sums of one or more variants (same documents), plus extras (FVU sums)."""

    docs: np.ndarray  # int64 [D], sorted
    variants: dict[str, np.ndarray]  # name -> float64 [D, 5]
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        buffer = io.BytesIO()
        arrays = {"docs": self.docs, **{f"v_{k}": v for k, v in self.variants.items()}, **self.extras}
        np.savez(buffer, **arrays)  # pyright: ignore[reportArgumentType]  (numpy's stub binds **arrays to allow_pickle)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> Partial:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        variants = {k[2:]: v for k, v in arrays.items() if k.startswith("v_")}
        extras = {k: v for k, v in arrays.items() if k in FVU_KEYS}
        return cls(arrays["docs"], variants, extras)

    @classmethod
    def merge(cls, parts: list[Partial]) -> Partial:
        """One partial over every document of ``parts`` (a document's sums added across parts)."""
        docs, inverse = np.unique(np.concatenate([p.docs for p in parts]), return_inverse=True)
        variants = {}
        for name in parts[0].variants:
            stacked = np.concatenate([p.variants[name] for p in parts])
            total = np.zeros((len(docs), stacked.shape[1]))
            np.add.at(total, inverse, stacked)
            variants[name] = total
        extras = {k: np.sum([p.extras[k] for p in parts], axis=0) for k in parts[0].extras}
        return cls(docs, variants, extras)


@dataclass
class FvuSums:
    """Σ‖x − x̂‖², Σx, Σx² (float64) over a checkpoint's typical measured rows, and the rows left out."""

    d: int
    sse: float = 0.0
    rows: int = 0
    atypical: int = 0
    x_sum: np.ndarray = field(init=False)
    x_sq: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.x_sum, self.x_sq = np.zeros(self.d), np.zeros(self.d)

    def add(self, x: torch.Tensor, recon: torch.Tensor, typical: torch.Tensor | None) -> None:
        """Rows ``x`` and their reconstructions (raw space); ``typical``: the rows the FVU counts."""
        if typical is not None:
            self.atypical += int((~typical).sum())
            x, recon = x[typical], recon[typical]
        x64 = x.double()
        self.sse += float((x64 - recon.double()).pow(2).sum())
        self.x_sum += x64.sum(0).cpu().numpy()
        self.x_sq += x64.pow(2).sum(0).cpu().numpy()
        self.rows += len(x)

    def extras(self) -> dict[str, np.ndarray]:
        values = (self.sse, self.x_sum, self.x_sq, self.rows, self.atypical)
        return {k: np.asarray(v) for k, v in zip(FVU_KEYS, values)}


def fvu_of(extras: dict[str, np.ndarray]) -> float:
    """The project's FVU (``FVU_DEFINITION``) from merged FVU sums."""
    if int(extras["fvu_rows"]) == 0:
        return math.nan
    return fvu_from_sums(
        float(extras["fvu_sse"]), extras["fvu_x_sum"], extras["fvu_x_sq"], int(extras["fvu_rows"])
    )


def bootstrap_weights(n_docs: int, replicates: int, seed: int) -> np.ndarray:
    """[1 + replicates, D]: all ones (the estimate), then each replicate's document multiplicities
    (documents resampled with replacement)."""
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_docs, np.full(n_docs, 1.0 / n_docs), size=replicates)
    return np.vstack([np.ones((1, n_docs)), draws]).astype(np.float64)


def means(sums: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Per weighting (row of ``weights``): mean CE per predicted token, KL and JSD per token."""
    total = weights @ sums  # [W, 5]
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "ce": total[:, 2] / total[:, 1],
            "kl": total[:, 3] / total[:, 0],
            "jsd": total[:, 4] / total[:, 0],
        }


def recovered(zero: np.ndarray, spliced: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Fraction of the CE loss recovered: (CE_ablated − CE_spliced) / (CE_ablated − CE_clean)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (zero - spliced) / (zero - clean)


def interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (NaN when there are none or none is finite)."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return math.nan, math.nan
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)
