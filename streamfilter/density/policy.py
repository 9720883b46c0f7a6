"""Sampling policies: scores + snapshot -> keep/drop decisions (pure; no Kafka).

- `askllm`: keep the top fraction by P(yes): keep iff score >= the (1 - q) quantile of the
  stream's Ask-LLM scores (paper section 3.3: top-K for Ask-LLM). Deterministic.
- `density`: inverse propensity sampling (paper section 3.3, Theorem A.2): keep with
  probability min(1, c / S(x)), S the RACE density score. NOT proportional to S (the paper's
  Algorithm 2 has that typo; DESIGN.md "Known pitfalls").
- `random`: keep with probability q.
- `perplexity`: the paper's perplexity baseline (section B.5): keep the lowest fraction by
  mean per-token NLL: keep iff NLL <= the q quantile of the stream's NLLs. Needs scored
  records with a perplexity (`models.perplexity`). Deterministic.
- `askllm+density`: a quality gate (keep the top `quality_keep` by P(yes)), then IPS among
  what passes, with c set so that the overall keep rate is q.
- `density-top` / `density-bottom`: the paper's other density baselines (section 3.3,
  "Top / Bottom K"): keep the fraction q with the highest density score (the head of the
  distribution) or the lowest (the tail). Deterministic. The paper found that neither keeps
  coverage; they exist so that the coverage bench and `compare` can show them beside IPS.

`Policy.prepare(snapshot)` solves the thresholds and c (or the density threshold of
`density-top`/`-bottom`) once per snapshot, over the snapshot's reservoir (a uniform sample of the whole stream), so the keep rate is normalised
globally, never per batch. Every coin is a hash of (document id, policy seed), so the same
documents, snapshot and seed give the same decisions in any batching, order or machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from streamfilter.density.hashing import uniform_coins
from streamfilter.errors import ConfigError

if TYPE_CHECKING:  # the snapshot format pulls in the quantile sketches: not needed to name the policies
    from streamfilter.density.snapshot import Snapshot

POLICY_NAMES = ("askllm", "density", "random", "askllm+density", "perplexity", "density-top", "density-bottom")
DENSITY_RANK_POLICIES = ("density-top", "density-bottom")  # keep a fraction by density rank, no coin


class PolicyNotReady(Exception):
    """The snapshot cannot support this policy yet (no snapshot, or no documents in it)."""


@dataclass(frozen=True)
class Decision:
    keep: bool
    probability: float  # the keep probability the coin was compared with
    askllm: float  # P(yes) as given
    density: float  # the debiased RACE score; NaN for policies that do not use density
    policy: str
    snapshot_id: str  # "" when decided without a snapshot (random)


def solve_ips_constant(scores: np.ndarray, keep_rate: float) -> float:
    """The c with mean(min(1, c / scores)) == keep_rate (exactly, over these scores).

    With scores sorted ascending s_1..s_n and c in [s_j, s_{j+1}), the mean is
    (j + c * sum_{i>j} 1/s_i) / n, linear in c; the unique segment whose solution lies in it
    is found with one vectorised pass. keep_rate == 1 returns max(scores).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    n = s.size
    if n == 0:
        raise ValueError("no scores to solve the IPS constant over")
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep rate {keep_rate} outside (0, 1]")
    if np.any(s <= 0) or not np.isfinite(s).all():
        raise ValueError("IPS scores must be positive and finite")
    if keep_rate >= 1.0:
        return float(s[-1])
    inv_suffix = np.cumsum((1.0 / s)[::-1])[::-1]  # inv_suffix[j] = sum_{i >= j} 1 / s[i] (0-based)
    j = np.arange(n)  # j documents below c (kept with probability 1)
    c = (keep_rate * n - j) / inv_suffix
    lower = np.concatenate([[0.0], s[:-1]])
    valid = (c >= lower) & (c <= s)
    if not valid.any():  # unreachable in exact arithmetic; guard against rounding at a segment edge
        return float(c[np.argmin(np.abs(np.clip(c, lower, s) - c))])
    return float(c[np.argmax(valid)])


@dataclass(frozen=True)
class Policy:
    """A named policy with its target keep rate; `prepare` binds it to one snapshot."""

    name: str
    keep_rate: float
    quality_keep: float | None = None  # the Ask-LLM gate's keep fraction (askllm+density only)
    seed: int = 0

    @property
    def key(self) -> str:
        """Identifies what c depends on (not the seed): the key of `Snapshot.ips_constants`."""
        return f"{self.name}:keep={self.keep_rate!r}:quality={self.quality_keep!r}"

    @property
    def uses_quality(self) -> bool:
        return self.name in ("askllm", "askllm+density")

    @property
    def uses_density(self) -> bool:
        return self.name in ("density", "askllm+density") + DENSITY_RANK_POLICIES

    def quality_threshold(self, snapshot: Snapshot) -> float:
        fraction = self.keep_rate if self.name == "askllm" else self.quality_keep
        if snapshot.quantiles.count == 0:
            raise PolicyNotReady(f"policy {self.name}: the snapshot has no Ask-LLM scores yet")
        if fraction >= 1.0:
            return -math.inf
        return snapshot.quantiles.quantile(1.0 - fraction)

    def perplexity_threshold(self, snapshot: Snapshot) -> float:
        """The NLL at rank keep_rate of the stream's NLLs: `nll <= threshold` keeps the lowest fraction."""
        if snapshot.perplexity_quantiles.count == 0:
            raise PolicyNotReady(f"policy {self.name}: the snapshot has no perplexity scores "
                                 "(configure models.perplexity for the score stage)")
        if self.keep_rate >= 1.0:
            return math.inf
        return snapshot.perplexity_quantiles.quantile(self.keep_rate)

    def solve_constant(self, snapshot: Snapshot, quality_threshold: float | None = None) -> float:
        """Solve c over the snapshot's reservoir (the expensive part: one sketch query of the reservoir).

        For `density-top`/`density-bottom` the constant is the density threshold instead: the
        (1 - q) quantile of the reservoir's scores (keep at or above) or the q quantile (keep at
        or below).
        """
        reservoir = snapshot.reservoir
        if len(reservoir) == 0:
            raise PolicyNotReady(f"policy {self.name}: the snapshot's reservoir is empty")
        scores = snapshot.sketch.query(reservoir.embeddings)
        if self.name == "density-top":
            return -math.inf if self.keep_rate >= 1.0 else float(np.quantile(scores, 1.0 - self.keep_rate))
        if self.name == "density-bottom":
            return math.inf if self.keep_rate >= 1.0 else float(np.quantile(scores, self.keep_rate))
        target = self.keep_rate
        if self.name == "askllm+density":
            threshold = self.quality_threshold(snapshot) if quality_threshold is None else quality_threshold
            passing = reservoir.askllm >= threshold
            if not passing.any():
                raise PolicyNotReady(f"policy {self.name}: no reservoir document passes the quality gate")
            # overall keep = mean(pass * min(1, c/s)) = frac_pass * mean_pass(min(1, c/s))
            target = self.keep_rate / passing.mean()
            scores = scores[passing]
            if target >= 1.0:
                return math.inf
        return solve_ips_constant(scores, target)

    def prepare(self, snapshot: Snapshot | None) -> "PreparedPolicy":
        """Solve the quality threshold and the IPS constant once for this snapshot."""
        if self.name == "random":
            return PreparedPolicy(self, snapshot_id=snapshot.snapshot_id if snapshot else "", sketch=None,
                                  quality_threshold=None, ips_constant=None)
        if snapshot is None:
            raise PolicyNotReady(f"policy {self.name} needs a snapshot")
        threshold = self.quality_threshold(snapshot) if self.uses_quality else None
        nll_threshold = self.perplexity_threshold(snapshot) if self.name == "perplexity" else None
        constant = None
        if self.uses_density:
            constant = snapshot.ips_constants.get(self.key)
            if constant is None:
                constant = self.solve_constant(snapshot, threshold)
        ranked = self.name in DENSITY_RANK_POLICIES
        return PreparedPolicy(self, snapshot_id=snapshot.snapshot_id,
                              sketch=snapshot.sketch if self.uses_density else None,
                              quality_threshold=threshold, ips_constant=None if ranked else constant,
                              perplexity_threshold=nll_threshold, density_threshold=constant if ranked else None)


class AskLLMPolicy(Policy):
    """`askllm`: keep the top `keep_rate` fraction by P(yes) (deterministic)."""


class InversePropensityPolicy(Policy):
    """`density`: keep with probability min(1, c / S(x)), c solved for the target keep rate."""


class RandomPolicy(Policy):
    """`random`: keep with probability `keep_rate` (the paper's baseline)."""


class PerplexityPolicy(Policy):
    """`perplexity`: keep the lowest `keep_rate` fraction by mean per-token NLL (the paper's baseline)."""


class QualityGatedIPSPolicy(Policy):
    """`askllm+density`: keep the top `quality_keep` by P(yes), then inverse propensity sampling."""


class DensityTopPolicy(Policy):
    """`density-top`: keep the `keep_rate` fraction with the highest density score (the paper's top-K baseline)."""


class DensityBottomPolicy(Policy):
    """`density-bottom`: keep the `keep_rate` fraction with the lowest density score (the paper's bottom-K)."""


_POLICY_CLASSES = {"askllm": AskLLMPolicy, "density": InversePropensityPolicy, "random": RandomPolicy,
                   "askllm+density": QualityGatedIPSPolicy, "perplexity": PerplexityPolicy,
                   "density-top": DensityTopPolicy, "density-bottom": DensityBottomPolicy}


def build_policy(name: str, keep_rate: float, *, quality_keep: float | None = None, seed: int = 0) -> Policy:
    """Validate and build a policy. `quality_keep` is the askllm+density gate's fraction
    (default sqrt(keep_rate): the reduction split evenly between quality and coverage)."""
    if name not in POLICY_NAMES:
        raise ConfigError(f"policy: unknown policy {name!r}; valid policies are {', '.join(POLICY_NAMES)}")
    if not (isinstance(keep_rate, (int, float)) and 0.0 < keep_rate <= 1.0):
        raise ConfigError(f"keep_rate: must be in (0, 1], got {keep_rate!r}")
    if name == "askllm+density":
        if quality_keep is None:
            quality_keep = math.sqrt(keep_rate)
        if not (isinstance(quality_keep, (int, float)) and 0.0 < quality_keep <= 1.0):
            raise ConfigError(f"quality_keep: must be in (0, 1], got {quality_keep!r}")
        if quality_keep < keep_rate:
            raise ConfigError(f"quality_keep: the quality gate keeps {quality_keep}, less than keep_rate {keep_rate}")
    elif quality_keep is not None:
        raise ConfigError(f"quality_keep: only the askllm+density policy has a quality gate, not {name!r}")
    return _POLICY_CLASSES[name](name=name, keep_rate=float(keep_rate),
                  quality_keep=None if quality_keep is None else float(quality_keep), seed=int(seed))


@dataclass(frozen=True)
class PreparedPolicy:
    """A policy bound to one snapshot: thresholds and c are fixed; `decide` is per batch and cheap."""

    policy: Policy
    snapshot_id: str
    sketch: object | None  # RaceSketch, queried for density when the policy uses it
    quality_threshold: float | None
    ips_constant: float | None
    perplexity_threshold: float | None = None  # `perplexity` policy: keep iff mean NLL <= this
    density_threshold: float | None = None  # `density-top`: keep iff density >= this; `density-bottom`: <=

    def probabilities(self, askllm: np.ndarray, density: np.ndarray | None,
                      perplexity: np.ndarray | None = None) -> np.ndarray:
        """[n] keep probabilities, vectorised."""
        n = askllm.shape[0]
        p = np.full(n, self.policy.keep_rate if self.policy.name == "random" else 1.0)
        if self.quality_threshold is not None:
            p = np.where(askllm >= self.quality_threshold, p, 0.0)  # NaN scores fail the gate
        if self.perplexity_threshold is not None:
            nll = np.full(n, np.nan) if perplexity is None else np.asarray(perplexity, dtype=np.float64).reshape(-1)
            p = np.where(nll <= self.perplexity_threshold, p, 0.0)  # records without a perplexity are not kept
        if self.ips_constant is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                p = p * np.minimum(1.0, self.ips_constant / density)
        if self.density_threshold is not None:
            passes = density >= self.density_threshold if self.policy.name == "density-top" \
                else density <= self.density_threshold
            p = np.where(passes, p, 0.0)
        return p

    def decide(self, ids: Sequence[str], askllm: np.ndarray, embeddings: np.ndarray | None,
               perplexity: np.ndarray | None = None) -> list[Decision]:
        """One decision per document. askllm: [n] P(yes); embeddings: [n, dim] (may be None unless density is used);
        perplexity: [n] mean NLL, NaN where missing (used by the `perplexity` policy only)."""
        askllm = np.asarray(askllm, dtype=np.float64).reshape(-1)
        if askllm.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} ids but {askllm.shape[0]} Ask-LLM scores")
        density = None
        if self.sketch is not None:
            if embeddings is None or np.asarray(embeddings).shape[0] != len(ids):
                raise ValueError(f"policy {self.policy.name} needs one embedding per document")
            density = self.sketch.query(embeddings) if len(ids) else np.empty(0)
        p = self.probabilities(askllm, density, perplexity)
        coins = uniform_coins(ids, self.policy.seed)
        keep = coins < p  # p == 1 always keeps (coins < 1); p == 0 never does
        dens = density if density is not None else np.full(len(ids), np.nan)
        name, sid = self.policy.name, self.snapshot_id
        return [Decision(bool(k), float(pi), float(a), float(d), name, sid)
                for k, pi, a, d in zip(keep.tolist(), p.tolist(), askllm.tolist(), dens.tolist())]
