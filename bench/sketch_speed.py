"""Density sketch speed: hash+add+query vs the bare projection matmul; snapshots; exact KDE at N=100k.

All figures are ratios measured in one run (the machine is shared: absolute numbers move,
ratios much less). Timings are medians of interleaved repeats.

    python bench/sketch_speed.py                     # D=768, R=1000, B=20000, default K
    python bench/sketch_speed.py --k 4 8 16          # overhead per K
    python bench/sketch_speed.py --leave-one-out     # also the daemon's leave-one-out query (issue 13)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from streamfilter.density.race import DEFAULT_BUCKETS, DEFAULT_K, DEFAULT_ROWS, DEFAULT_WIDTH, RaceSketch  # noqa: E402
from streamfilter.density.snapshot import Snapshot  # noqa: E402
from streamfilter.density.snapshot_store import SnapshotStore  # noqa: E402
from streamfilter.density.state import SketchState  # noqa: E402


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def interleaved(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def overhead(dim: int, ks: list[int], batch: int, repeats: int, leave_one_out: bool = False) -> None:
    print(f"\n### Hash + add + query vs the bare projection matmul (D={dim}, R={DEFAULT_ROWS}, "
          f"B={DEFAULT_BUCKETS}, batch {batch}, float32, median of {repeats} interleaved repeats)\n")
    print("| K | matmul ms | add ms | query ms | add docs/s | query docs/s | add+query docs/s | "
          "add overhead | query overhead | bookkeeping on top of 2 matmuls |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    x = unit(batch, dim, 1)
    for k in ks:
        sketch = RaceSketch.create(dim, k=k, width=DEFAULT_WIDTH, seed=0)
        sketch.add(unit(20000, dim, 2))  # a populated sketch: realistic cache behaviour for the gathers
        a = sketch.projections  # the bare projection: x @ A, same shapes, no bookkeeping at all,
        out = np.empty((batch, a.shape[1]), dtype=np.float32)  # into a preallocated output (pure compute)
        fns = {"matmul": lambda: np.matmul(x, a, out=out), "add": lambda: sketch.add(x),
               "query": lambda: sketch.query(x)}
        if leave_one_out:  # the same counters read by the leave-one-out estimator, timed in the same rounds
            loo = RaceSketch.from_arrays({**sketch.to_arrays(), "leave_one_out": np.array(True)})
            fns["query leave-one-out"] = lambda: loo.query(x)
        t = interleaved(fns, repeats)
        mm, add, q = t["matmul"], t["add"], t["query"]
        print(f"| {k} | {mm * 1e3:.1f} | {add * 1e3:.1f} | {q * 1e3:.1f} | {batch / add:,.0f} | {batch / q:,.0f} | "
              f"{batch / (add + q):,.0f} | {add / mm - 1:+.0%} | {q / mm - 1:+.0%} | {(add + q) / (2 * mm) - 1:+.0%} |")
        if leave_one_out:
            ql = t["query leave-one-out"]
            print(f"| {k}, leave-one-out query | {mm * 1e3:.1f} | {add * 1e3:.1f} | {ql * 1e3:.1f} | {batch / add:,.0f} | "
                  f"{batch / ql:,.0f} | {batch / (add + ql):,.0f} | {add / mm - 1:+.0%} | {ql / mm - 1:+.0%} | "
                  f"{(add + ql) / (2 * mm) - 1:+.0%} |")


def snapshots(dim: int, k: int) -> None:
    state = SketchState.create(dim, k=k, width=DEFAULT_WIDTH, reservoir_size=4096)
    n = 20000
    x = unit(n, dim, 3).astype(np.float16)
    state.on_batch([f"doc-{i}" for i in range(n)], x, np.random.default_rng(0).random(n),
                   [("crawl.scored", 0, i) for i in range(n)])
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        store = SnapshotStore(d, keep=2)
        t_snap = time.perf_counter()
        snap = state.snapshot()
        t_snap = time.perf_counter() - t_snap
        writes, loads = [], []
        for _ in range(3):
            t = time.perf_counter()
            path = store.write(snap)
            writes.append(time.perf_counter() - t)
            t = time.perf_counter()
            loaded = store.latest()
            loads.append(time.perf_counter() - t)
        assert loaded is not None and loaded.to_bytes() == snap.to_bytes()
        size = path.stat().st_size
    print(f"\n### Snapshot (D={dim}, R={DEFAULT_ROWS}, B={DEFAULT_BUCKETS}, K={k}, reservoir 4096, int32 counters)\n")
    print("| file size | state.snapshot() (copy) | write (serialise + sha256 + fsync + rename) | load (read + verify + parse) |")
    print("|---|---|---|---|")
    print(f"| {size / 1e6:.1f} MB | {t_snap * 1e3:.0f} ms | {np.median(writes) * 1e3:.0f} ms | {np.median(loads) * 1e3:.0f} ms |")


def exact_kde_speedup(dim: int, k: int, n: int, probe: int) -> None:
    """Sketch add+query of N points vs exact Gaussian KDE of N queries over N points (timed on `probe` queries)."""
    data = unit(n, dim, 4)
    sketch = RaceSketch.create(dim, k=k, width=DEFAULT_WIDTH)
    t = time.perf_counter()
    for lo in range(0, n, 1024):
        sketch.add(data[lo:lo + 1024])
    for lo in range(0, n, 1024):
        sketch.query(data[lo:lo + 1024])
    t_sketch = time.perf_counter() - t
    q = data[:probe]
    sq = (data * data).sum(axis=1)
    t = time.perf_counter()
    for lo in range(0, probe, 250):
        d2 = np.maximum(sq[None, :] + (q[lo:lo + 250] ** 2).sum(axis=1)[:, None] - 2 * (q[lo:lo + 250] @ data.T), 0)
        np.exp(d2 * (-1 / (2 * 0.35 ** 2))).sum(axis=1)
    t_probe = time.perf_counter() - t
    t_exact = t_probe * n / probe
    print(f"\n### Speed-up over an exact Gaussian KDE at N = {n:,} (D={dim}, K={k}, R={DEFAULT_ROWS})\n")
    print("| sketch: add N + query N | exact KDE: N queries x N points (float32 BLAS) | speed-up |")
    print("|---|---|---|")
    print(f"| {t_sketch:.1f} s | {t_exact:.0f} s (timed {probe:,} queries: {t_probe:.1f} s, x {n // probe}) | "
          f"{t_exact / t_sketch:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, nargs="+", default=[DEFAULT_K])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--kde-n", type=int, default=100_000)
    parser.add_argument("--kde-probe", type=int, default=2000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["overhead", "snapshot", "kde"])
    parser.add_argument("--leave-one-out", action="store_true", help="also time the leave-one-out query")
    args = parser.parse_args()
    import threadpoolctl  # noqa: F401  (report the BLAS in use)

    from threadpoolctl import threadpool_info

    blas = ", ".join(f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)" for i in threadpool_info())
    print(f"<!-- numpy {np.__version__}; {blas}; {os.cpu_count()} CPUs -->")
    if "overhead" not in args.skip:
        overhead(args.dim, args.k, args.batch, args.repeats, args.leave_one_out)
    k = DEFAULT_K if DEFAULT_K in args.k else args.k[0]
    if "snapshot" not in args.skip:
        snapshots(args.dim, k)
    if "kde" not in args.skip:
        exact_kde_speedup(args.dim, k, args.kde_n, args.kde_probe)


if __name__ == "__main__":
    main()
