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

Each policy is one class: it declares what it needs (`needs_snapshot`, `uses_quality`,
`uses_density`, `uses_perplexity`, `has_quality_gate`), solves its thresholds in `prepare`
and turns scores into keep probabilities in `keep_probabilities`. Defining a subclass with
a `name` registers it; the registry (`policy_names`, `policy_class`) is the only list of
policies: configuration, the CLI's help and replay read it.

`Policy.prepare(snapshot)` solves the thresholds and c (or the density threshold of
`density-top`/`-bottom`) once per snapshot, over the snapshot's reservoir (a uniform sample
of the whole stream), so the keep rate is normalised globally, never per batch. Every coin
is a hash of (document id, policy seed), so the same documents, snapshot and seed give the
same decisions in any batching, order or machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from streamfilter.density.hashing import uniform_coins
from streamfilter.errors import ConfigError

if TYPE_CHECKING:  # the snapshot format pulls in the quantile sketches: not needed to name the policies
    from streamfilter.density.snapshot import Snapshot


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


# ----------------------------------------------------------------------------- the registry

_REGISTRY: dict[str, type[Policy]] = {}  # name -> class, in registration (definition) order


def policy_names() -> tuple[str, ...]:
    """Every registered policy's name, in registration order."""
    return tuple(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    """The class registered under `name`; ConfigError (naming the valid policies) when there is none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"policy: unknown policy {name!r}; valid policies are {', '.join(_REGISTRY)}") from None


def unregister_policy(name: str) -> None:
    """Forget the class registered under `name` (a test's or a plugin's own policy)."""
    del _REGISTRY[name]


# ----------------------------------------------------------------------------- the policies


@dataclass(frozen=True)
class Policy:
    """A policy with its target keep rate; `prepare` binds it to one snapshot.

    A subclass that sets `name` is registered under it (a second class with the same name is
    an error). It declares what it needs and implements `keep_probabilities` (and `prepare`
    when it solves something over the snapshot: the default solves nothing).
    """

    name: ClassVar[str]
    needs_snapshot: ClassVar[bool] = True  # False: decides without one (`prepare(None)` works)
    uses_quality: ClassVar[bool] = False  # thresholds P(yes) against the snapshot's Ask-LLM quantiles
    uses_density: ClassVar[bool] = False  # queries the sketch; its constant is stored in Snapshot.ips_constants
    uses_perplexity: ClassVar[bool] = False  # thresholds the mean NLL against the snapshot's perplexity quantiles
    has_quality_gate: ClassVar[bool] = False  # takes `quality_keep` (the Ask-LLM gate's keep fraction)

    keep_rate: float
    quality_keep: float | None = None  # the Ask-LLM gate's keep fraction (policies with a quality gate only)
    seed: int = 0

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in _REGISTRY:
                raise ValueError(f"policy {cls.name!r} is already registered by {_REGISTRY[cls.name].__qualname__}")
            _REGISTRY[cls.name] = cls

    @property
    def key(self) -> str:
        """Identifies what c depends on (not the seed): the key of `Snapshot.ips_constants`."""
        return f"{self.name}:keep={self.keep_rate!r}:quality={self.quality_keep!r}"

    @property
    def quality_fraction(self) -> float | None:
        """The fraction of the stream the Ask-LLM threshold keeps; None without one."""
        return None

    def prepare(self, snapshot: Snapshot | None) -> PreparedPolicy:
        """Solve what `keep_probabilities` needs once for this snapshot (the default: nothing)."""
        if snapshot is None and self.needs_snapshot:
            raise PolicyNotReady(f"policy {self.name} needs a snapshot")
        return PreparedPolicy(self, snapshot_id=snapshot.snapshot_id if snapshot is not None else "")

    def keep_probabilities(self, prepared: PreparedPolicy, askllm: np.ndarray, density: np.ndarray | None,
                           perplexity: np.ndarray | None) -> np.ndarray:
        """[n] float64 keep probabilities in [0, 1]. askllm: [n] P(yes); density: [n] when the policy uses
        density, else None; perplexity: [n] mean NLL (NaN where missing) or None."""
        raise NotImplementedError(f"policy {self.name} defines no keep_probabilities")

    def _require(self, snapshot: Snapshot | None) -> Snapshot:
        if snapshot is None:
            raise PolicyNotReady(f"policy {self.name} needs a snapshot")
        return snapshot

    def quality_threshold(self, snapshot: Snapshot) -> float:
        """The P(yes) at rank 1 - quality_fraction: `askllm >= threshold` keeps the top fraction."""
        fraction = self.quality_fraction
        if fraction is None:
            raise TypeError(f"policy {self.name} has no Ask-LLM threshold")
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


def _gate(p: np.ndarray, passes: np.ndarray) -> np.ndarray:
    """p where the gate passes, 0 elsewhere (NaN comparisons fail the gate)."""
    return np.where(passes, p, 0.0)


def _inverse_propensity(p: np.ndarray, constant: float, density: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return p * np.minimum(1.0, constant / density)


class AskLLMPolicy(Policy):
    """`askllm`: keep the top `keep_rate` fraction by P(yes) (deterministic)."""

    name = "askllm"
    uses_quality = True

    @property
    def quality_fraction(self) -> float:
        return self.keep_rate

    def prepare(self, snapshot: Snapshot | None) -> PreparedPolicy:
        snapshot = self._require(snapshot)
        return PreparedPolicy(self, snapshot.snapshot_id, quality_threshold=self.quality_threshold(snapshot))

    def keep_probabilities(self, prepared, askllm, density, perplexity):
        return _gate(np.ones(askllm.shape[0]), askllm >= prepared.quality_threshold)


class DensityScoredPolicy(Policy):
    """A policy that queries the RACE sketch. Its constant (c, or a density threshold) is solved over
    the snapshot's reservoir, and precomputed into `Snapshot.ips_constants` under `key` by the sketch
    stage. Not a policy itself (no `name`)."""

    uses_density = True

    def solve_constant(self, snapshot: Snapshot, quality_threshold: float | None = None) -> float:
        """Solve the constant over the snapshot's reservoir (the expensive part: one sketch query of it)."""
        raise NotImplementedError(f"policy {self.name} defines no solve_constant")

    def reservoir_density(self, snapshot: Snapshot) -> np.ndarray:
        """[m] density scores of the snapshot's reservoir; PolicyNotReady when it is empty."""
        reservoir = snapshot.reservoir
        if len(reservoir) == 0:
            raise PolicyNotReady(f"policy {self.name}: the snapshot's reservoir is empty")
        return snapshot.sketch.query(reservoir.embeddings)

    def constant(self, snapshot: Snapshot, quality_threshold: float | None = None) -> float:
        """The stored constant when the snapshot has one for `key`, else solved now."""
        stored = snapshot.ips_constants.get(self.key)
        return self.solve_constant(snapshot, quality_threshold) if stored is None else stored


class InversePropensityPolicy(DensityScoredPolicy):
    """`density`: keep with probability min(1, c / S(x)), c solved for the target keep rate."""

    name = "density"

    def solve_constant(self, snapshot, quality_threshold=None):
        return solve_ips_constant(self.reservoir_density(snapshot), self.keep_rate)

    def prepare(self, snapshot):
        snapshot = self._require(snapshot)
        return PreparedPolicy(self, snapshot.snapshot_id, sketch=snapshot.sketch, ips_constant=self.constant(snapshot))

    def keep_probabilities(self, prepared, askllm, density, perplexity):
        return _inverse_propensity(np.ones(askllm.shape[0]), prepared.ips_constant, density)


class RandomPolicy(Policy):
    """`random`: keep with probability `keep_rate` (the paper's baseline)."""

    name = "random"
    needs_snapshot = False

    def keep_probabilities(self, prepared, askllm, density, perplexity):
        return np.full(askllm.shape[0], self.keep_rate)


class QualityGatedIPSPolicy(DensityScoredPolicy):
    """`askllm+density`: keep the top `quality_keep` by P(yes), then inverse propensity sampling."""

    name = "askllm+density"
    uses_quality = True
    has_quality_gate = True

    @property
    def quality_fraction(self) -> float | None:
        return self.quality_keep

    def solve_constant(self, snapshot, quality_threshold=None):
        """c over the reservoir's documents that pass the gate, so that the overall keep rate is keep_rate."""
        scores = self.reservoir_density(snapshot)
        threshold = self.quality_threshold(snapshot) if quality_threshold is None else quality_threshold
        passing = snapshot.reservoir.askllm >= threshold
        if not passing.any():
            raise PolicyNotReady(f"policy {self.name}: no reservoir document passes the quality gate")
        # overall keep = mean(pass * min(1, c/s)) = frac_pass * mean_pass(min(1, c/s))
        target = self.keep_rate / passing.mean()
        if target >= 1.0:
            return math.inf
        return solve_ips_constant(scores[passing], target)

    def prepare(self, snapshot):
        snapshot = self._require(snapshot)
        threshold = self.quality_threshold(snapshot)
        return PreparedPolicy(self, snapshot.snapshot_id, sketch=snapshot.sketch, quality_threshold=threshold,
                              ips_constant=self.constant(snapshot, threshold))

    def keep_probabilities(self, prepared, askllm, density, perplexity):
        p = _gate(np.ones(askllm.shape[0]), askllm >= prepared.quality_threshold)
        return _inverse_propensity(p, prepared.ips_constant, density)


class PerplexityPolicy(Policy):
    """`perplexity`: keep the lowest `keep_rate` fraction by mean per-token NLL (the paper's baseline)."""

    name = "perplexity"
    uses_perplexity = True

    def prepare(self, snapshot):
        snapshot = self._require(snapshot)
        return PreparedPolicy(self, snapshot.snapshot_id, perplexity_threshold=self.perplexity_threshold(snapshot))

    def keep_probabilities(self, prepared, askllm, density, perplexity):
        n = askllm.shape[0]
        nll = np.full(n, np.nan) if perplexity is None else np.asarray(perplexity, dtype=np.float64).reshape(-1)
        return _gate(np.ones(n), nll <= prepared.perplexity_threshold)  # records without a perplexity are not kept


class _DensityRankPolicy(DensityScoredPolicy):
    """Keep a fraction by density rank, no coin: the constant is a density threshold."""

    def prepare(self, snapshot):
        snapshot = self._require(snapshot)
        return PreparedPolicy(self, snapshot.snapshot_id, sketch=snapshot.sketch,
                              density_threshold=self.constant(snapshot))


class DensityTopPolicy(_DensityRankPolicy):
    """`density-top`: keep the `keep_rate` fraction with the highest density score (the paper's top-K baseline)."""

    name = "density-top"

    def solve_constant(self, snapshot, quality_threshold=None):
        """The (1 - q) quantile of the reservoir's density scores (keep at or above it)."""
        scores = self.reservoir_density(snapshot)
        return -math.inf if self.keep_rate >= 1.0 else float(np.quantile(scores, 1.0 - self.keep_rate))

    def keep_probabilities(self, prepared, askllm, density, perplexity):
        return _gate(np.ones(askllm.shape[0]), density >= prepared.density_threshold)


class DensityBottomPolicy(_DensityRankPolicy):
    """`density-bottom`: keep the `keep_rate` fraction with the lowest density score (the paper's bottom-K)."""

    name = "density-bottom"

    def solve_constant(self, snapshot, quality_threshold=None):
        """The q quantile of the reservoir's density scores (keep at or below it)."""
        scores = self.reservoir_density(snapshot)
        return math.inf if self.keep_rate >= 1.0 else float(np.quantile(scores, self.keep_rate))

    def keep_probabilities(self, prepared, askllm, density, perplexity):
        return _gate(np.ones(askllm.shape[0]), density <= prepared.density_threshold)


def build_policy(name: str, keep_rate: float, *, quality_keep: float | None = None, seed: int = 0) -> Policy:
    """Validate and build a registered policy. `quality_keep` is the quality gate's fraction, for a policy
    that has one (default sqrt(keep_rate): the reduction split evenly between quality and coverage)."""
    cls = policy_class(name)
    if not (isinstance(keep_rate, (int, float)) and 0.0 < keep_rate <= 1.0):
        raise ConfigError(f"keep_rate: must be in (0, 1], got {keep_rate!r}")
    if cls.has_quality_gate:
        if quality_keep is None:
            quality_keep = math.sqrt(keep_rate)
        if not (isinstance(quality_keep, (int, float)) and 0.0 < quality_keep <= 1.0):
            raise ConfigError(f"quality_keep: must be in (0, 1], got {quality_keep!r}")
        if quality_keep < keep_rate:
            raise ConfigError(f"quality_keep: the quality gate keeps {quality_keep}, less than keep_rate {keep_rate}")
    elif quality_keep is not None:
        gated = [n for n, c in _REGISTRY.items() if c.has_quality_gate]
        which = f"the {gated[0]} policy has" if len(gated) == 1 else f"the {', '.join(gated)} policies have"
        raise ConfigError(f"quality_keep: only {which} a quality gate, not {name!r}")
    return cls(keep_rate=float(keep_rate), quality_keep=None if quality_keep is None else float(quality_keep),
               seed=int(seed))


@dataclass(frozen=True)
class PreparedPolicy:
    """A policy bound to one snapshot: thresholds and c are fixed; `decide` is per batch and cheap."""

    policy: Policy
    snapshot_id: str
    sketch: object | None = None  # RaceSketch, queried for density when the policy uses it
    quality_threshold: float | None = None  # keep iff P(yes) >= this (policies that use quality)
    ips_constant: float | None = None  # c of min(1, c / density) (inverse propensity policies)
    perplexity_threshold: float | None = None  # `perplexity` policy: keep iff mean NLL <= this
    density_threshold: float | None = None  # `density-top`: keep iff density >= this; `density-bottom`: <=

    def probabilities(self, askllm: np.ndarray, density: np.ndarray | None,
                      perplexity: np.ndarray | None = None) -> np.ndarray:
        """[n] keep probabilities, vectorised."""
        return self.policy.keep_probabilities(self, askllm, density, perplexity)

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
