"""RACE kernel-density sketch with p-stable (Gaussian) LSH: the paper's Density score (section 3.2, A.2).

R rows x B buckets of counters. Row r hashes a point with K concatenated p-stable LSH
functions h_j(x) = floor((a_j . x + b_j) / w) (Datar et al., 2004) and maps the K-tuple
into [0, B) with a vector multiply-shift hash (Dietzfelbinger, 1996: 32-bit multiply-add
with wrap-around, then the top bits scaled into [0, B) as in Lemire's fastrange). Adding a
point increments one counter per row; the score of a query is the mean over rows of the
counters it hashes to, minus the expected mass of spurious bucket collisions:

    E[C_r(q)] = S(q) + (N - S(q)) / B,      S(q) = sum_x p(||x - q||)^K

so the debiased score (C - N/B) / (1 - 1/B) estimates the LSH kernel sum S(q) (the
expected number of stream points sharing q's K-tuple in a row). Without the subtraction a
long stream (N >> B) adds a constant N/B to every score, which flattens inverse propensity
sampling toward uniform-random sampling.

Leave-one-out (`leave_one_out=True`, what the daemon builds): a query the sketch holds
always finds itself in its bucket, in every row, so its kernel sum carries a 1 for itself
that says nothing about density; with a kernel narrow enough to tell near-copies from
merely related documents, that 1 outweighs the rest and sampling degenerates to random
(bench/RESULTS.md, "Density fidelity"). A query whose counter is >= 1 in every row is
taken to be in the sketch and its own count is removed:

    E[C_r(q) | q added] = 1 + S'(q) + (N - 1 - S'(q)) / B,   S'(q) = the sum over the *other* points,

so the estimate is (C - 1 - (N - 1)/B) / (1 - 1/B). A query that is not in the sketch but
finds a counter in every row (an identical copy was added, or the region is so dense that
no row is empty) loses 1 from a sum that is then large anyway; one that is in the sketch is
never missed, so snapshots of the stream they score are exact in this respect.

The hash parameters (projections, offsets, w, K, the tuple-hash multipliers) are stored
with the sketch and never re-derived from the seed, because numpy's random streams are not
stable across versions. Counters are int32 (the paper's 80 MB at R=1000, B=20000) and are
widened to int64 before any counter could overflow (a counter never exceeds `count`).

Embeddings are expected to be about unit-norm (cells beyond +-2**22 alias onto each other).
Determinism: the hash is float32 arithmetic through BLAS, so two machines with different
BLAS builds may put a point that lies within ~1e-6 of a cell boundary in different cells;
everything else (tuple hash, counting, debiasing) is exact integer arithmetic.
"""

from __future__ import annotations

import math
from copy import copy as _shallow_copy
from dataclasses import dataclass, field

import numpy as np

DEFAULT_ROWS = 1000
DEFAULT_BUCKETS = 20000
DEFAULT_K = 8
DEFAULT_WIDTH = 1.5  # for unit-norm all-MiniLM-L6-v2 embeddings; run `streamfilter calibrate` for others
# (the daemon calibrates its width from the stream instead: streamfilter.density.calibrate)
SCORE_FLOOR = 1e-6  # queries never return less, so 1 / score is finite
_INT32_MAX = np.iinfo(np.int32).max
_ROUNDING_MAGIC = np.float32(1.5 * 2**23)  # x + this rounds x to an integer held in the low mantissa bits
_CHUNK_ELEMENTS = 1 << 23  # hash at most this many (document, row*k) cells at once: 32 MB of float32


def pstable_collision_probability(distance: np.ndarray | float, width: float) -> np.ndarray:
    """P[floor((a.x+b)/w) == floor((a.y+b)/w)] for a ~ N(0, I), b ~ U[0, w), at ||x - y|| = distance.

    Datar et al. (2004), p-stable LSH with p = 2. Equals 1 at distance 0 and decreases monotonically.
    """
    d = np.asarray(distance, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = width / d
        from scipy.special import ndtr  # scipy is only needed here, off the hot path

        p = 1.0 - 2.0 * ndtr(-t) - 2.0 / (math.sqrt(2.0 * math.pi) * t) * (1.0 - np.exp(-(t * t) / 2.0))
    return np.where(d <= 0, 1.0, p)


def lsh_kernel(distance: np.ndarray | float, width: float, k: int) -> np.ndarray:
    """The kernel the sketch estimates: probability that two points share a row's K-tuple."""
    return pstable_collision_probability(distance, width) ** k


@dataclass(eq=False)
class RaceSketch:
    """A RACE sketch. Build with `create`; `add` and `query` take [n, dim] float16/float32 batches."""

    projections: np.ndarray  # [dim, k * rows] float32; column j * rows + r is hash j of row r
    offsets: np.ndarray  # [k * rows] float32, uniform in [0, width)
    width: float
    k: int
    buckets: int
    tuple_multipliers: np.ndarray  # [k, rows] uint32, odd
    tuple_addend: np.ndarray  # [rows] uint32
    counters: np.ndarray  # [rows, buckets] int32, or int64 once widened
    count: int = 0  # documents added
    seed: int = 0  # informational only: the parameters above are what define the hash
    leave_one_out: bool = False  # query() removes a held query's own count (module docstring)
    _hash_matrix_t: np.ndarray = field(init=False, repr=False)  # derived: [k * rows, dim + 1] float32
    _row_base_col: np.ndarray = field(init=False, repr=False)  # derived: [rows, 1] int64, r * buckets
    _row_high_col: np.ndarray = field(init=False, repr=False)  # derived: [rows, 1] uint64, r << 32
    _mult_col: np.ndarray = field(init=False, repr=False)  # derived: [k, rows, 1] int32 view of the multipliers
    _addend_col: np.ndarray = field(init=False, repr=False)  # derived: [rows, 1] int32
    _work: dict | None = field(init=False, repr=False, default=None)  # scratch buffers, see _workspace

    def __post_init__(self) -> None:
        dim, cols = self.projections.shape
        rows = self.counters.shape[0]
        if self.k < 1 or self.buckets < 2 or rows < 1 or not (self.width > 0 and math.isfinite(self.width)):
            raise ValueError(f"bad sketch parameters: k={self.k}, buckets={self.buckets}, rows={rows}, width={self.width}")
        if cols != self.k * rows or self.offsets.shape != (cols,) or self.counters.shape != (rows, self.buckets):
            raise ValueError("sketch arrays have inconsistent shapes")
        if self.tuple_multipliers.shape != (self.k, rows) or self.tuple_addend.shape != (rows,):
            raise ValueError("tuple-hash parameters have inconsistent shapes")
        w = np.float32(self.width)
        # (a.x + b) / w as one matmul: x is extended with a constant 1 column.
        hash_matrix = np.vstack([self.projections / w, (self.offsets / w - np.float32(0.5))[None, :]]).astype(np.float32)
        self._hash_matrix_t = np.ascontiguousarray(hash_matrix.T)
        if rows * self.buckets >= 1 << 32:
            raise ValueError(f"rows * buckets = {rows * self.buckets} must be below 2**32")
        self._row_base_col = (np.arange(rows, dtype=np.int64) * self.buckets)[:, None]
        self._row_high_col = (np.arange(rows, dtype=np.uint64) << np.uint64(32))[:, None]
        self._mult_col = self.tuple_multipliers.view(np.int32)[:, :, None].copy()
        self._addend_col = self.tuple_addend.view(np.int32)[:, None].copy()

    # ---------------------------------------------------------------- construction

    @classmethod
    def create(
        cls,
        dim: int,
        rows: int = DEFAULT_ROWS,
        buckets: int = DEFAULT_BUCKETS,
        k: int = DEFAULT_K,
        width: float = DEFAULT_WIDTH,
        seed: int = 0,
        leave_one_out: bool = False,
    ) -> "RaceSketch":
        """A fresh, empty sketch whose hash parameters are drawn from `seed` (and then stored)."""
        if dim < 1 or rows < 1 or buckets < 2 or k < 1 or not (width > 0 and math.isfinite(width)):
            raise ValueError(f"bad sketch parameters: dim={dim}, rows={rows}, buckets={buckets}, k={k}, width={width}")
        if rows * buckets >= 1 << 32:
            raise ValueError(f"rows * buckets = {rows * buckets} must be below 2**32")
        rng = np.random.default_rng(seed)
        return cls(
            projections=rng.standard_normal((dim, k * rows), dtype=np.float32),
            offsets=(rng.random(k * rows, dtype=np.float32) * np.float32(width)).astype(np.float32),
            width=float(width),
            k=int(k),
            buckets=int(buckets),
            tuple_multipliers=(rng.integers(0, 1 << 32, size=(k, rows), dtype=np.uint64) | 1).astype(np.uint32),
            tuple_addend=rng.integers(0, 1 << 32, size=rows, dtype=np.uint64).astype(np.uint32),
            counters=np.zeros((rows, buckets), dtype=np.int32),
            count=0,
            seed=int(seed),
            leave_one_out=bool(leave_one_out),
        )

    @property
    def dim(self) -> int:
        return self.projections.shape[0]

    @property
    def rows(self) -> int:
        return self.counters.shape[0]

    # ---------------------------------------------------------------- hashing

    def _chunks(self, x: np.ndarray):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected embeddings of shape [n, {self.dim}], got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("embeddings contain NaN or infinity")
        step = max(1, _CHUNK_ELEMENTS // self._hash_matrix_t.shape[0])
        for start in range(0, x.shape[0], step):
            yield start, x[start:start + step]

    def _workspace(self, n: int) -> dict[str, np.ndarray]:
        """Scratch arrays for hashing n <= chunk points, allocated once and reused.

        Reuse matters: faulting in fresh 32 MB temporaries on every batch costs as much as
        the matmul itself on a busy machine. (So one sketch must not hash from two threads.)
        Everything is laid out [row, document] so that counting and gathering walk the
        counters row by row (one row's 80 KB of counters stays in cache) instead of jumping
        across all 80 MB for every document.
        """
        cols, rows = self._hash_matrix_t.shape[0], self.rows
        shapes = {"x1": ((n, self.dim + 1), np.float32), "z": ((cols, n), np.float32),
                  "acc": ((rows, n), np.int32), "tmp": ((rows, n), np.int32), "flat": ((rows, n), np.uint64)}
        if self._work is None or self._work["x1"].size < n * (self.dim + 1):
            self._work = {name: np.empty(math.prod(shape), dtype=dtype) for name, (shape, dtype) in shapes.items()}
        # flat buffers, so the first n columns' worth is one contiguous [*, n] array
        return {name: self._work[name][:math.prod(shape)].reshape(shape) for name, (shape, _) in shapes.items()}

    def _hash(self, x: np.ndarray) -> np.ndarray:
        """Flat counter indices [rows, n] (int64: row r's bucket + r * buckets) of one chunk.

        The result is a view of the workspace: valid until the next call.
        """
        n, dim = x.shape
        rows = self.rows
        w = self._workspace(n)
        x1, z, acc, tmp, flat = w["x1"], w["z"], w["acc"], w["tmp"], w["flat"]
        x1[:, :dim] = x
        x1[:, dim] = 1.0
        np.matmul(self._hash_matrix_t, x1.T, out=z)  # the one matmul: (a.x + b) / w for every (row, j)
        # floor without a cast pass: the matrix computes (a.x + b) / w - 1/2, and adding
        # 1.5 * 2**23 rounds that to the nearest integer (= the floor of (a.x + b) / w) and leaves
        # it in the low mantissa bits: the float32's bits are 0x4B400000 + cell (|cell| < 2**22).
        np.add(z, _ROUNDING_MAGIC, out=z)
        cells = z.view(np.int32)  # K blocks of `rows`
        mult = self._mult_col
        # Multiply-add over the K-tuple in int32 with wrap-around (= mod 2**32).
        np.multiply(cells[:rows], mult[0], out=acc)
        for j in range(1, self.k):  # K is small; each step is one array op over [rows, n]
            np.multiply(cells[j * rows:(j + 1) * rows], mult[j], out=tmp)
            np.add(acc, tmp, out=acc)
        np.add(acc, self._addend_col, out=acc)
        # Top bits of the 32-bit hash h scaled into [0, B), plus the row's base r * B, in one go:
        # ((r * 2**32 + h) * B) >> 32 == r * B + ((h * B) >> 32), exact while rows * B < 2**32.
        np.add(acc.view(np.uint32), self._row_high_col, out=flat)
        np.multiply(flat, np.uint64(self.buckets), out=flat)
        np.right_shift(flat, np.uint64(32), out=flat)
        return flat.view(np.int64)

    def bucket_indices(self, x: np.ndarray) -> np.ndarray:
        """[n, rows] int64 bucket index in [0, buckets) of each point in each row (for tests and calibration)."""
        out = [(self._hash(chunk) - self._row_base_col).T for _, chunk in self._chunks(x)]  # copies the views
        return np.concatenate(out) if out else np.empty((0, self.rows), dtype=np.int64)

    # ---------------------------------------------------------------- sketch operations

    def add(self, x: np.ndarray) -> None:
        """Insert a batch of points: x [n, dim] float16/float32 (finite)."""
        n = np.asarray(x).shape[0] if np.ndim(x) == 2 else 0
        if self.counters.dtype == np.int32 and self.count + n > _INT32_MAX:
            self.counters = self.counters.astype(np.int64)  # widen before any counter could overflow
        flat_counters = self.counters.reshape(-1)
        one = flat_counters.dtype.type(1)
        for _, chunk in self._chunks(x):
            np.add.at(flat_counters, self._hash(chunk).reshape(-1), one)
            self.count += chunk.shape[0]

    def raw_counts(self, x: np.ndarray) -> np.ndarray:
        """[n] float64 mean over rows of the counters x hashes to (the paper's score, not debiased)."""
        return self._gather(x, held=False)[0]

    def held(self, x: np.ndarray) -> np.ndarray:
        """[n] bool: x's counter is >= 1 in every row (x, or an identical point, was added)."""
        return self._gather(x, held=True)[1]

    def _gather(self, x: np.ndarray, held: bool) -> tuple[np.ndarray, np.ndarray | None]:
        flat_counters = self.counters.reshape(-1)
        n = np.asarray(x).shape[0]
        out = np.empty(n, dtype=np.float64)
        inside = np.empty(n, dtype=bool) if held else None
        for start, chunk in self._chunks(x):
            idx = self._hash(chunk)  # [rows, n]
            hits = np.take(flat_counters, idx)  # the one gather
            out[start:start + chunk.shape[0]] = hits.sum(axis=0, dtype=np.int64) / self.rows
            if held:
                inside[start:start + chunk.shape[0]] = hits.min(axis=0) >= 1
        return out, inside

    def query(self, x: np.ndarray) -> np.ndarray:
        """[n] float64 debiased density score: an estimate of sum_x p(||x - q||)^K over added points
        (with `leave_one_out`, over the added points other than q itself).

        Scores are at least `SCORE_FLOOR` (debiasing can make a sparse region's estimate <= 0).
        """
        raw, inside = self._gather(x, held=self.leave_one_out)
        spurious = self.count / self.buckets
        if inside is not None:  # a held query: its own count, and one fewer point to collide spuriously
            raw = raw - inside * (1.0 - 1.0 / self.buckets)
        score = (raw - spurious) / (1.0 - 1.0 / self.buckets)
        return np.maximum(score, SCORE_FLOOR)

    # ---------------------------------------------------------------- merging

    def parameter_mismatch(self, other: "RaceSketch") -> str | None:
        """The name of the first hash parameter that differs from `other`'s, or None if all agree."""
        for name in ("dim", "rows", "buckets", "k", "width", "leave_one_out"):
            if getattr(self, name) != getattr(other, name):
                return f"{name} ({getattr(self, name)} != {getattr(other, name)})"
        for name in ("projections", "offsets", "tuple_multipliers", "tuple_addend"):
            if not np.array_equal(getattr(self, name), getattr(other, name)):
                return f"{name} (same shape, different values: sketches built from different seeds)"
        return None

    def params_equal(self, other: "RaceSketch") -> bool:
        return self.parameter_mismatch(other) is None

    def merge(self, other: "RaceSketch") -> None:
        """Add `other`'s counters into this sketch (the result equals one sketch of both streams)."""
        mismatch = self.parameter_mismatch(other)
        if mismatch is not None:
            raise ValueError(f"cannot merge RACE sketches with different parameters: {mismatch}")
        total = self.count + other.count
        if total > _INT32_MAX or other.counters.dtype == np.int64:
            self.counters = self.counters.astype(np.int64, copy=False)
        self.counters += other.counters
        self.count = total

    def copy(self) -> "RaceSketch":
        """An independent sketch with the same counts: the counters are copied; the hash parameters,
        which nothing modifies after construction, are shared with what is derived from them.

        Copying the parameters and deriving the hash matrix again (~100 MB of array passes at the
        paper's size, ~0.4 CPU-s) is no longer done; the 80 MB counter copy remains (~0.02 s into
        memory the process has used before, ~0.25 s on fresh pages).
        """
        new = _shallow_copy(self)  # no __post_init__: the derived arrays are shared too, only ever read
        new.counters = self.counters.copy()
        new._work = None  # scratch buffers are per sketch (one sketch must not hash from two threads)
        return new

    # ---------------------------------------------------------------- serialisation (no pickle)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything that defines the sketch, as plain numpy arrays (scalars as 0-d arrays)."""
        return {
            "projections": self.projections,
            "offsets": self.offsets,
            "width": np.array(self.width, dtype=np.float64),
            "k": np.array(self.k, dtype=np.int64),
            "buckets": np.array(self.buckets, dtype=np.int64),
            "tuple_multipliers": self.tuple_multipliers,
            "tuple_addend": self.tuple_addend,
            "counters": self.counters,
            "count": np.array(self.count, dtype=np.int64),
            "seed": np.array(self.seed, dtype=np.int64),
            "leave_one_out": np.array(self.leave_one_out, dtype=np.bool_),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "RaceSketch":
        expected = {"projections": np.float32, "offsets": np.float32, "tuple_multipliers": np.uint32,
                    "tuple_addend": np.uint32}
        for name, dtype in expected.items():
            if arrays[name].dtype != dtype:
                raise ValueError(f"sketch array {name} has dtype {arrays[name].dtype}, expected {np.dtype(dtype)}")
        if arrays["counters"].dtype not in (np.int32, np.int64):
            raise ValueError(f"sketch counters have dtype {arrays['counters'].dtype}")
        return cls(
            projections=arrays["projections"],
            offsets=arrays["offsets"],
            width=float(arrays["width"]),
            k=int(arrays["k"]),
            buckets=int(arrays["buckets"]),
            tuple_multipliers=arrays["tuple_multipliers"],
            tuple_addend=arrays["tuple_addend"],
            counters=arrays["counters"],
            count=int(arrays["count"]),
            seed=int(arrays["seed"]),
            leave_one_out=bool(arrays["leave_one_out"]) if "leave_one_out" in arrays else False,  # older snapshots
        )
