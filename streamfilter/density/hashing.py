"""Deterministic per-document randomness: a keyed hash of (document id, seed).

Every coin flip and every reservoir priority is a pure function of the document id and a
seed, so decisions do not depend on batch boundaries, arrival order, process or machine,
and a replay reproduces them exactly. blake2b keyed with the seed, personalised with the
purpose (so the reservoir's priorities and the policy's coins are independent).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_TWO_POW_MINUS_53 = 2.0 ** -53


def hash64(ids: Sequence[str], seed: int, purpose: bytes) -> np.ndarray:
    """[n] uint64: blake2b-64 of each id (UTF-8), keyed by `seed`, personalised by `purpose` (<= 16 bytes)."""
    key = int(seed).to_bytes(8, "little", signed=True)
    out = np.empty(len(ids), dtype=np.uint64)
    for i, doc_id in enumerate(ids):  # hashlib has no batch API; ~1 us per id
        digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8, key=key, person=purpose).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


def uniform_coins(ids: Sequence[str], seed: int, purpose: bytes = b"coin") -> np.ndarray:
    """[n] float64 uniform in [0, 1), one per id: the top 53 bits of `hash64`."""
    return (hash64(ids, seed, purpose) >> np.uint64(11)).astype(np.float64) * _TWO_POW_MINUS_53
