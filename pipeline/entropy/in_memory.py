"""Set entropy of codes in memory: what ``bae entropy`` reports for one group, without a store.

``set_entropy(codes)`` takes bool/0-1 codes ``[N, d']`` (or hidden states ``[N, d]`` and a
checkpoint that encodes them) as one group and counts them exactly as ``bae entropy`` counts a
group of a store (``batch_counts``), then applies the same estimators, intervals and verdict
(``estimate_columns``): the numbers equal ``bae entropy --group-by all --null-groups 0`` on a
store of the same rows with the same ``doc_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bae.common.errors import BaeError
from bae.pipeline.entropy.bounds import pair_bits_for
from bae.pipeline.entropy.counts import batch_counts, merge_all
from bae.pipeline.entropy.estimates import estimate_columns
from bae.trainer.models import Autoencoder, load_autoencoder


@dataclass(frozen=True)
class SetEntropy:
    """One group's row of the ``bae entropy`` table (docs/entropy.md names every column).

    ``columns`` holds them all; the attributes below are the ones most read. ``verdict`` says which
    numbers the data support: ``resolved`` (``joint_bits`` in [``joint_low``, ``joint_high``]),
    ``lower_bound`` (only H ≥ ``joint_plugin_bits``), ``upper_bound_only`` (only H ≤ ``upper_bits``),
    ``collapsed`` (H = 0), ``atypical`` (most rows outside the checkpoint's typical radius: a
    code it never fitted)."""

    columns: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        """A column by name: ``result.joint_bits``, ``result.ci_low`` (with a bootstrap), ..."""
        columns = self.__dict__.get("columns", {})
        if name not in columns:
            raise AttributeError(f"SetEntropy has no column {name!r} (joint counting or the bootstrap off?)")
        return columns[name]

    @property
    def reported_bits(self) -> float:
        """The joint estimate where the verdict is resolved, else Σ H_b (the upper bound)."""
        return self.columns["joint_bits"] if self.verdict == "resolved" else self.columns["entropy_bits"]

    @property
    def interval(self) -> tuple[float, float]:
        """The joint estimate's interval (NaN where there is none)."""
        return self.columns.get("joint_low", np.nan), self.columns.get("joint_high", np.nan)


def as_bits(
    values: torch.Tensor | np.ndarray, checkpoint: str | Path | Autoencoder | None, batch_rows: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(bool [N, d'], typical): the codes themselves (typical None), or the checkpoint's codes of
    hidden states and which of them lie inside its typical radius (None: it keeps every row)."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim != 2 or len(array) == 0:
        raise BaeError(f"expected a non-empty [N, d] array of rows, got shape {tuple(array.shape)}")
    if checkpoint is None:
        if not np.isin(array, (0, 1)).all():
            raise BaeError("codes must be bool or 0/1; pass checkpoint= to encode hidden states")
        return array.astype(bool), None
    model = checkpoint if isinstance(checkpoint, Autoencoder) else load_autoencoder(checkpoint)
    if array.shape[1] != model.config.d_model:
        raise BaeError(f"rows have d={array.shape[1]}, the checkpoint expects d={model.config.d_model}")
    parts = [model.encode_typical(array[a : a + batch_rows]) for a in range(0, len(array), batch_rows)]
    bits = torch.cat([b for b, _ in parts]).cpu().numpy()
    masks = [t for _, t in parts if t is not None]
    return bits, torch.cat(masks).cpu().numpy() if masks else None


def set_entropy(
    values: torch.Tensor | np.ndarray,
    checkpoint: str | Path | Autoencoder | None = None,
    *,
    doc_ids: np.ndarray | torch.Tensor | None = None,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    confidence: float = 0.95,
    joint: bool = True,
    pair_bits: int = 64,
    batch_rows: int = 4096,
) -> SetEntropy:
    """The entropy of the set of codes ``values`` (one group), as ``bae entropy`` measures it,
    counted ``batch_rows`` rows at a time (as ``bae entropy --batch-rows``).

    ``values``: bool/0-1 codes [N, d'], or hidden states [N, d] with ``checkpoint`` (a path, a
    ``bae train`` run or a loaded autoencoder). ``doc_ids`` [N] name each row's document for the
    bootstrap, which resamples documents (default: every row its own document). The options are
    ``bae entropy``'s flags of the same names; ``pair_bits`` beyond d' are ranked on all N rows.
    """
    bits, typical = as_bits(values, checkpoint, batch_rows)
    n = len(bits)
    docs = np.arange(n) if doc_ids is None else np.asarray(doc_ids).astype(np.int64).reshape(-1)
    if len(docs) != n:
        raise BaeError(f"doc_ids has {len(docs)} entries for {n} rows")
    if not 0 < confidence < 1:
        raise BaeError(f"confidence {confidence}: expected a number in (0, 1)")
    chosen = pair_bits_for(bits.shape[1], pair_bits, lambda: (bits.sum(0), n))
    parts = [
        batch_counts(
            np.zeros(1, np.int64),
            np.zeros(len(part), np.int64),
            part,
            docs[a : a + batch_rows],
            bootstrap=bootstrap,
            bootstrap_seed=bootstrap_seed,
            pair_bits=chosen,
            joint=joint,
            typical=None if typical is None else typical[a : a + batch_rows],
        )
        for a in range(0, n, batch_rows)
        for part in [bits[a : a + batch_rows]]
    ]
    counts = merge_all(parts)
    columns = estimate_columns(counts, confidence, chosen)
    return SetEntropy({name: np.asarray(col)[:1].tolist()[0] for name, col in columns.items()})
