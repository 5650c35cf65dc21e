"""Entropy of whole codes from their multiplicities in a set of rows: plug-in, Miller–Madow,
Chao–Shen and NSB (Nemenman–Shafee–Bialek), and the bias-corrected estimate bae reports.

Input everywhere: the multiplicities of the distinct codes seen in one group (counts summing to
n). Output in bits. The alphabet is 2^d' codes, astronomically larger than any sample, so every
estimator here needs *coincidences* (codes seen more than once) to say anything beyond the
plug-in's lower side; where a group has none, there is no estimate (NaN). Validity regimes and the
simulations behind them: docs/method.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import betaln, digamma, gammaln, polygamma

LN2 = float(np.log(2.0))


def _mults(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.int64).ravel()
    m = m[m > 0]
    if m.size == 0:
        raise ValueError("empty multiplicity vector")
    return m


def plugin_entropy(mults: np.ndarray) -> float:
    """Maximum-likelihood entropy -sum p log2 p (biased low when undersampled)."""
    m = _mults(mults)
    n = m.sum()
    return float(np.log2(n) - (m * np.log2(m)).sum() / n)


def miller_madow(mults: np.ndarray) -> float:
    """Plug-in + (observed support - 1) / (2 n ln 2)."""
    m = _mults(mults)
    return plugin_entropy(m) + (m.size - 1) / (2.0 * m.sum() * LN2)


def chao_shen(mults: np.ndarray) -> float:
    """Coverage-adjusted Horvitz-Thompson estimator (Chao & Shen 2003).

    C = 1 - f1/n (f1 := n-1 when every code is a singleton), p = C m/n,
    H = -sum p ln p / (1 - (1-p)^n).
    """
    m = _mults(mults)
    n = int(m.sum())
    f1 = int((m == 1).sum())
    if f1 == n:
        f1 = n - 1
    cov = 1.0 - f1 / n
    if cov <= 0:  # n == 1: single observation, nothing to adjust
        return 0.0
    p = cov * m / n
    with np.errstate(divide="ignore"):
        incl = -np.expm1(n * np.log1p(-p))  # 1 - (1-p)^n, stable (p = 1 -> 1)
    return float(-(p * np.log(p) / incl).sum() / LN2)


class NSBResult(NamedTuple):
    mean: float  # posterior mean, bits
    std: float  # posterior std, bits
    low: float  # mean - 1.96 std (clipped to >= 0)
    high: float  # mean + 1.96 std (clipped to <= log2 K)


def nsb_asymptotic(n: int, distinct: int) -> NSBResult:
    """Large-K NSB limit (Nemenman 2011): depends only on n and Delta = n - distinct.

    H = (gamma - ln 2 + 2 ln n - psi(Delta)) / ln 2,  std = sqrt(psi_1(Delta)) / ln 2.
    Valid for K -> inf (K >> n^2/Delta), n >> 1 and 1 <= Delta << n; NaN if Delta = 0.
    """
    delta = int(n) - int(distinct)
    if delta <= 0:
        return NSBResult(np.nan, np.nan, np.nan, np.nan)
    mean = (np.euler_gamma - LN2 + 2 * np.log(n) - digamma(delta)) / LN2
    std = float(np.sqrt(polygamma(1, delta)) / LN2)
    return NSBResult(float(mean), std, max(0.0, mean - 1.96 * std), mean + 1.96 * std)


def _nsb_terms(
    kappa: np.ndarray, r: np.ndarray, f: np.ndarray, n: int, k1: int, log2_k: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log posterior weight (per d ln kappa) and E[H], E[H^2] (nats) on a kappa grid."""
    inv_k = 0.0 if log2_k is None else float(np.exp2(-log2_k))  # 1/K (0 for huge K)
    beta = kappa * inv_k  # per-bin pseudocount
    kap_u = kappa * (1.0 - k1 * inv_k)  # mass of unseen bins
    a = r[None, :] + beta[:, None]  # observed a_i
    A = n + kappa
    # evidence: Gamma(kappa)/Gamma(n+kappa) prod_i Gamma(n_i+beta)/Gamma(beta)
    # (betaln forms avoid cancellation of gammaln differences at large kappa/beta)
    rm1 = np.maximum(r - 1.0, 1.0)[None, :]
    obs = np.where(r[None, :] > 1.0, gammaln(rm1) - betaln(1.0 + beta[:, None], rm1), 0.0)
    loglik = betaln(kappa, n) - gammaln(n) + k1 * np.log(kappa) + (f * obs).sum(1)
    # NSB prior: uniform in xi = E[H|beta] = psi(kappa+1) - psi(beta+1)
    dxi = polygamma(1, kappa + 1.0) - inv_k * polygamma(1, beta + 1.0)
    logw = loglik + np.log(np.maximum(dxi, 1e-300)) + np.log(kappa)
    # E[H | kappa, data] for Dirichlet posterior (observed + unseen bins)
    psA1 = digamma(A + 1.0)
    eh = psA1 - ((f * a * digamma(a + 1.0)).sum(1) + kap_u * digamma(beta + 1.0)) / A
    # E[H^2 | kappa, data]
    psA2, p1A2 = digamma(A + 2.0), polygamma(1, A + 2.0)
    u_o = digamma(a + 1.0) - psA2[:, None]
    u_u = digamma(beta + 1.0) - psA2
    s1 = (f * a * u_o).sum(1) + kap_u * u_u
    s2 = (f * a * a * u_o * u_o).sum(1) + kap_u * beta * u_u * u_u
    saa = (f * a * a).sum(1) + kap_u * beta
    off = s1 * s1 - s2 - p1A2 * (A * A - saa)
    j_o = (digamma(a + 2.0) - psA2[:, None]) ** 2 + polygamma(1, a + 2.0) - p1A2[:, None]
    j_u = (digamma(beta + 2.0) - psA2) ** 2 + polygamma(1, beta + 2.0) - p1A2
    diag = (f * a * (a + 1.0) * j_o).sum(1) + kap_u * (beta + 1.0) * j_u
    eh2 = (off + diag) / (A * (A + 1.0))
    return logw, eh, eh2


def nsb(mults: np.ndarray, log2_alphabet: float | None = None, grid: int = 400) -> NSBResult:
    """Full NSB posterior mean/std of the entropy, in bits.

    ``log2_alphabet`` = log2 K (None = K -> infinity, the Dirichlet-process limit,
    which is numerically identical to K = 2**d' for d' >= ~64).  The integral over
    the concentration kappa = K beta is done on a log-spaced grid around the
    posterior mode; the std combines E[Var(H|kappa)] and Var(E[H|kappa]).
    Interval: mean -/+ 1.96 std.  Returns NaN when there is no coincidence
    (Delta = n - distinct = 0): the posterior is then prior-dominated (improper for
    K -> inf) and the caller should report the plug-in as a lower bound.
    """
    m = _mults(mults)
    n, k1 = int(m.sum()), int(m.size)
    if n - k1 <= 0:
        return NSBResult(np.nan, np.nan, np.nan, np.nan)
    r, f = np.unique(m, return_counts=True)
    r, f = r.astype(float), f.astype(float)
    # coarse scan, then refine on the region holding the posterior mass
    t = np.linspace(-12.0, 80.0, 600)
    logw, _, _ = _nsb_terms(np.exp(t), r, f, n, k1, log2_alphabet)
    keep = np.flatnonzero(logw > logw.max() - 50.0)
    lo, hi = t[max(keep[0] - 1, 0)], t[min(keep[-1] + 1, t.size - 1)]
    t = np.linspace(lo, hi, grid)
    logw, eh, eh2 = _nsb_terms(np.exp(t), r, f, n, k1, log2_alphabet)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    mean = float((w * eh).sum())
    var = max(float((w * eh2).sum()) - mean * mean, 0.0)
    mean_b, std_b = mean / LN2, float(np.sqrt(var)) / LN2
    hi_cap = np.inf if log2_alphabet is None else float(log2_alphabet)
    return NSBResult(mean_b, std_b, max(0.0, mean_b - 1.96 * std_b), min(hi_cap, mean_b + 1.96 * std_b))


class JointEstimate(NamedTuple):
    bits: float
    low: float
    high: float
    method: str


def joint_estimate(mults: np.ndarray, log2_alphabet: float | None) -> JointEstimate:
    """Bias-corrected joint entropy (bits) with an interval that includes model error.

    Point: full NSB posterior mean.  Interval: envelope of NSB mean -/+ 1.96 std,
    Miller-Madow, Chao-Shen and NSB -/+ |NSB - Miller-Madow|.  NSB's own std
    ignores prior misspecification (it under-covers badly for heavy-tailed or
    finite-support distributions); the spread between estimators with opposite
    bias directions is used as a systematic-error allowance.  In simulations the
    envelope covered the truth in >= 92% of runs once Good-Turing coverage
    1 - f1/n >= 0.95 (docs/method.md).  Delta = 0: bits = high = NaN,
    low = plug-in (a lower bound only), method 'none:no_coincidences'.
    """
    m = _mults(mults)
    res = nsb(m, log2_alphabet)
    if np.isnan(res.mean):
        return JointEstimate(np.nan, plugin_entropy(m), np.nan, "none:no_coincidences")
    mm, cs = miller_madow(m), chao_shen(m)
    spread = abs(res.mean - mm)
    low = max(0.0, min(res.low, mm, cs, res.mean - spread))
    high = max(res.high, cs, mm, res.mean + spread)
    if log2_alphabet is not None:
        high = min(high, float(log2_alphabet))
    return JointEstimate(res.mean, low, high, "nsb+envelope")
