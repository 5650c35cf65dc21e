"""What a group's numbers support: ``resolved``, ``lower_bound``, ``upper_bound_only``, ``collapsed``,
``atypical`` (most rows lie outside what the BAE was trained on, so its code there was never fitted),
or, for several trainings of one BAE read together, ``unstable`` (``bae.pipeline.entropy.trainings``).

The thresholds come from simulations on distributions with known entropy (docs/method.md): below
Good–Turing coverage 0.95 or with fewer than 10 coincidences, no joint estimator was within 0.5
bits of the truth on every distribution tried, so such a group only supports "≥ plug-in".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bae.pipeline.entropy.joint import LN2, JointEstimate


@dataclass(frozen=True)
class VerdictRules:
    """Thresholds for ``verdict`` (justified by the simulations in docs/method.md).

    min_coincidences: Delta = n - distinct below this -> lower_bound (NSB with
                      Delta <= 5 missed the truth by up to 8 bits in simulation).
    min_coverage:     Good-Turing coverage 1 - f1/n needed for 'resolved'; at
                      >= 0.95 the max |NSB error| over all test distributions was
                      0.18 bits and the joint_estimate interval covered >= 92%.
                      Below 0.9 errors of 0.5-5 bits occur (Zipf, Bernoulli products).
    max_halfwidth:    max (high - low)/2 in bits for 'resolved'.
    tol_bits:         slack when comparing the estimate with the upper bound; the
                      plug-in marginal sum is additionally allowed its Miller-Madow
                      bias, varying_bits / (2 n ln 2).
    max_atypical:     largest share of a group's rows outside the checkpoint's typical
                      radius before its numbers describe an unfitted code: on SmolLM2
                      the first token's rows lie ~60 000x the typical squared distance,
                      and their code changed by more than its interval between seeds.
    """

    min_coincidences: int = 10
    min_coverage: float = 0.95
    max_halfwidth: float = 0.5
    tol_bits: float = 0.25
    max_atypical: float = 0.5


# ``unstable`` is given only to several trainings read together (trainings.py): each resolves the
# group, but their intervals together span more than max_halfwidth
VERDICTS = ("resolved", "lower_bound", "upper_bound_only", "collapsed", "atypical", "unstable")


def verdict(
    n: int,
    distinct: int | None,
    f1: int | None,
    varying_bits: int,
    estimate: JointEstimate | None,
    upper_bits: float,
    rules: VerdictRules = VerdictRules(),
    atypical_rows: int = 0,
) -> str:
    """Classify one group (first matching rule wins).

    0. atypical         : more than max_atypical of the n rows lie outside the checkpoint's
                          typical radius (rows its training loss left out): whatever the
                          counts, they describe a code the BAE never fitted there.
    1. collapsed        : varying_bits == 0 or distinct == 1 (H = 0 exactly).
    2. upper_bound_only : no distinct-code statistics (distinct/f1/estimate None,
                          e.g. CodeCounts over its cap): only sum H_b / Chow-Liu.
    3. lower_bound      : Delta < min_coincidences, or no finite estimate, or
                          coverage 1 - f1/n < min_coverage: only H >~ plug-in
                          (= log2 n when all codes are distinct) is supported.
    4. upper_bound_only : estimate.low > upper + tol + varying/(2 n ln 2): the joint
                          estimate contradicts the bound, trust only the bound.
    5. lower_bound      : interval half-width > max_halfwidth.
    6. resolved         : otherwise; report estimate [low, high].
    """
    if atypical_rows > rules.max_atypical * n:
        return "atypical"
    if varying_bits == 0 or distinct == 1:
        return "collapsed"
    if distinct is None or f1 is None or estimate is None:
        return "upper_bound_only"
    if (
        n - distinct < rules.min_coincidences
        or not np.isfinite(estimate.bits)
        or 1.0 - f1 / n < rules.min_coverage
    ):
        return "lower_bound"
    slack = rules.tol_bits + varying_bits / (2.0 * n * LN2)
    if estimate.low > upper_bits + slack:
        return "upper_bound_only"
    if (estimate.high - estimate.low) / 2.0 > rules.max_halfwidth:
        return "lower_bound"
    return "resolved"
