"""Hidden states with a known code entropy, shaped like a store's layer (``bae entropy calibrate``).

    h = μ + Σ_k (b_k − E b_k) · a ⊙ (c_k v_k) + σ ⊙ ε,        ε ~ N(0, I_d)

- ``b ∈ {0,1}^r`` the ground-truth bits, drawn by one of three laws:
    ``independent``  b_k ~ Bernoulli(1/2) i.i.d.                     H(b) = r
    ``markov``       b_1 ~ Bern(1/2), b_{k+1} = b_k XOR Bern(q)       H(b) = 1 + (r − 1)·H_b(q)
                     (fair marginals, Corr(b_j, b_k) = (1 − 2q)^|j−k|)
    ``sparse``       b_k ~ Bernoulli(p) i.i.d.                       H(b) = r·H_b(p)
- ``v_k`` unit directions (orthonormal when r ≤ d, else independent random unit vectors) and
  ``c_k`` log-uniform amplitudes over a span of ``amplitude_span``;
- ``μ`` and ``s`` the target per-dimension mean and standard deviation (a store's, in practice);
- ``g_j`` = Var(Σ_k b_k c_k v_kj), the population signal variance of dimension j before scaling;
  ``a_j = s_j √(1 − f) / √g_j`` and ``σ_j = s_j √f`` with ``f = noise_fraction``.

So in the population every dimension has mean exactly μ_j and variance exactly s_j² (signal s_j²(1−f)
plus noise s_j² f), and the noise is the same fraction f of every dimension's variance, hence also
of the total: ``fvu_floor`` = f, the FVU of an ideal decoder that recovers b exactly. A sample of n
rows matches μ and s up to sampling error (bits are not Gaussian: a sparse bit's kurtosis makes its
dimensions' sample variance the noisiest). The per-dimension scaling ``a`` keeps the r directions
linearly independent (r ≤ d), so b stays recoverable from h up to the noise; for r > d it is not in
general, and the calibration then measures that too.

The structure (v, c, a, σ) depends only on (seed, kind, r, d, μ, s, options); rows come from
independent streams (``SyntheticSpec.sample(n, stream)``), so a store is written unit by unit with
stream = unit index and any unit can be regenerated alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bae.common.errors import BaeError
from bae.common.stats import binary_entropy

KINDS = ("independent", "markov", "sparse")


def true_entropy(kind: str, r: int, p_sparse: float, q_flip: float) -> float:
    """H(b) in bits of ``r`` bits drawn by ``kind`` (the formulas in the module docstring)."""
    if kind == "independent":
        return float(r)
    if kind == "markov":
        return float(1 + (r - 1) * binary_entropy(np.asarray(q_flip)))
    if kind == "sparse":
        return float(r * binary_entropy(np.asarray(p_sparse)))
    raise BaeError(f"unknown synthetic kind {kind!r}: expected one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class SyntheticSpec:
    """One synthetic law: the bits' distribution and the fixed map from bits to hidden states."""

    kind: str
    r: int
    seed: int
    mixing: np.ndarray  # [r, d]: row k = a ⊙ c_k v_k
    offset: np.ndarray  # [d]: μ − E[b] · mixing, so that E h = μ
    noise_std: np.ndarray  # [d]: σ
    p: float  # firing probability of a bit (sparse) or 1/2
    q: float  # flip probability between neighbouring bits (markov)
    noise_fraction: float

    @classmethod
    def build(
        cls,
        kind: str,
        r: int,
        mean: np.ndarray,
        std: np.ndarray,
        seed: int,
        *,
        noise_fraction: float = 0.02,
        amplitude_span: float = 4.0,
        p_sparse: float = 0.05,
        q_flip: float = 0.2,
    ) -> SyntheticSpec:
        """The law of ``kind`` with ``r`` bits whose states have per-dimension mean ``mean`` and
        standard deviation ``std`` (float64 [d] each) in the population."""
        if kind not in KINDS:
            raise BaeError(f"unknown synthetic kind {kind!r}: expected one of {', '.join(KINDS)}")
        if r < 1:
            raise BaeError(f"rank {r}: a synthetic code needs at least one bit")
        mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        d = len(mean)
        rng = np.random.default_rng([seed, r, d, KINDS.index(kind), 0xBAE])
        g = rng.standard_normal((d, r))
        # [r, d]: orthonormal rows when r <= d, else independent unit vectors
        directions = np.linalg.qr(g)[0].T if r <= d else (g / np.linalg.norm(g, axis=0)).T
        amplitudes = np.exp(rng.uniform(0, np.log(amplitude_span), r)) / np.sqrt(amplitude_span)
        base = amplitudes[:, None] * directions
        p = p_sparse if kind == "sparse" else 0.5
        spec = cls(kind, r, seed, base, np.zeros(d), np.zeros(d), p, q_flip, noise_fraction)
        signal = np.einsum("kj,kl,lj->j", base, spec.bit_covariance(), base)  # g_j
        scale = np.where(
            signal > 0, std * np.sqrt(1 - noise_fraction) / np.sqrt(np.maximum(signal, 1e-300)), 0.0
        )
        mixing = base * scale[None, :]
        noise_std = np.where(signal > 0, std * np.sqrt(noise_fraction), std)
        offset = mean - spec.bit_mean() @ mixing
        return cls(kind, r, seed, mixing, offset, noise_std, p, q_flip, noise_fraction)

    @property
    def d(self) -> int:
        return self.mixing.shape[1]

    def bit_mean(self) -> np.ndarray:
        """E[b] [r]."""
        return np.full(self.r, self.p)

    def bit_covariance(self) -> np.ndarray:
        """Population covariance of b [r, r]."""
        k = np.arange(self.r)
        if self.kind == "markov":
            return 0.25 * (1 - 2 * self.q) ** np.abs(k[:, None] - k[None, :])
        return np.eye(self.r) * self.p * (1 - self.p)

    @property
    def entropy(self) -> float:
        """H(b) in bits: the code entropy a perfect encoder would show."""
        return true_entropy(self.kind, self.r, self.p, self.q)

    @property
    def mean(self) -> np.ndarray:
        """Population mean of h [d]."""
        return self.offset + self.bit_mean() @ self.mixing

    def per_dim_variance(self) -> np.ndarray:
        """Population variance of h per dimension [d]."""
        signal = np.einsum("kj,kl,lj->j", self.mixing, self.bit_covariance(), self.mixing)
        return signal + self.noise_std**2

    def bit_shares(self) -> np.ndarray:
        """[r]: Var(b_k)·‖mixing_k‖² / total variance, the share of the variance bit k carries alone
        (its FVU cost when dropped, ignoring its correlations with other bits)."""
        own = np.diag(self.bit_covariance()) * (self.mixing**2).sum(axis=1)
        return own / float(self.per_dim_variance().sum())

    @property
    def fvu_floor(self) -> float:
        """Noise variance / total variance: the FVU of a decoder that recovers b exactly."""
        total = float(self.per_dim_variance().sum())
        return float((self.noise_std**2).sum()) / total if total > 0 else 0.0

    def sample_bits(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """bool [n, r] drawn by this law."""
        if self.kind == "markov":
            bits = np.empty((n, self.r), dtype=bool)
            bits[:, 0] = rng.random(n) < 0.5
            flips = rng.random((n, self.r - 1)) < self.q
            for k in range(1, self.r):
                bits[:, k] = bits[:, k - 1] ^ flips[:, k - 1]
            return bits
        return rng.random((n, self.r)) < self.p

    def sample(self, n: int, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(states float32 [n, d], bits bool [n, r]) from row stream ``stream`` (independent of the
        structure and of every other stream)."""
        rng = np.random.default_rng([self.seed, self.r, self.d, KINDS.index(self.kind), 0x5A3, stream])
        bits = self.sample_bits(n, rng)
        noise = rng.standard_normal((n, self.d))
        states = self.offset + bits.astype(np.float64) @ self.mixing + self.noise_std * noise
        return states.astype(np.float32), bits
