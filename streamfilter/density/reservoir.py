"""A uniform, mergeable sample of the stream's documents, for solving the IPS constant c.

Bottom-k sampling: each document gets a priority hash64(id, seed); the reservoir holds the
`size` documents with the smallest priorities seen so far. That is a uniform sample of the
whole stream (so c is normalised globally, never per batch), it does not depend on batch
boundaries or order, a document seen twice occupies one slot, and two reservoirs merge
exactly (the bottom-k of the union). Embeddings are kept as float16 (what `crawl.scored`
carries), Ask-LLM scores as float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamfilter.density.hashing import hash64

DEFAULT_RESERVOIR_SIZE = 4096
_PURPOSE = b"reservoir"


@dataclass(eq=False)
class Reservoir:
    size: int
    seed: int
    priorities: np.ndarray  # [m] uint64, sorted ascending, unique; m <= size
    embeddings: np.ndarray  # [m, dim] float16
    askllm: np.ndarray  # [m] float64

    @classmethod
    def empty(cls, dim: int, size: int = DEFAULT_RESERVOIR_SIZE, seed: int = 0) -> "Reservoir":
        if size < 1:
            raise ValueError(f"reservoir size must be positive, got {size}")
        return cls(size=int(size), seed=int(seed), priorities=np.empty(0, dtype=np.uint64),
                   embeddings=np.empty((0, dim), dtype=np.float16), askllm=np.empty(0, dtype=np.float64))

    def __len__(self) -> int:
        return int(self.priorities.shape[0])

    def offer(self, ids: Sequence[str], embeddings: np.ndarray, askllm: np.ndarray) -> None:
        """Consider a batch: [n] ids, [n, dim] embeddings, [n] Ask-LLM scores."""
        if len(ids) == 0:
            return
        prio = hash64(ids, self.seed, _PURPOSE)
        if len(self) >= self.size:  # full: only documents beating the current worst can enter
            candidate = prio < self.priorities[-1]
            if not candidate.any():
                return
            prio = prio[candidate]
            embeddings = np.asarray(embeddings)[candidate]
            askllm = np.asarray(askllm)[candidate]
        self._absorb(prio, np.asarray(embeddings, dtype=np.float16), np.asarray(askllm, dtype=np.float64))

    def merge(self, other: "Reservoir") -> None:
        if (other.size, other.seed) != (self.size, self.seed):
            raise ValueError(f"cannot merge reservoirs with different size/seed: "
                             f"({self.size}, {self.seed}) != ({other.size}, {other.seed})")
        self._absorb(other.priorities, other.embeddings, other.askllm)

    def _absorb(self, prio: np.ndarray, embeddings: np.ndarray, askllm: np.ndarray) -> None:
        all_prio = np.concatenate([self.priorities, prio])
        # np.unique sorts and keeps the first occurrence: existing entries win over repeats.
        uniq, first = np.unique(all_prio, return_index=True)
        keep = first[: self.size]
        self.priorities = uniq[: self.size]
        self.embeddings = np.concatenate([self.embeddings, embeddings])[keep]
        self.askllm = np.concatenate([self.askllm, askllm])[keep]

    def copy(self) -> "Reservoir":
        return Reservoir(self.size, self.seed, self.priorities.copy(), self.embeddings.copy(), self.askllm.copy())
