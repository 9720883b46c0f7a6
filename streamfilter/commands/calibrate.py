"""`streamfilter calibrate`: recommend the LSH bandwidth w (per K) from a sample of embeddings, and print
the `[sketch]` lines to paste. The width is computed as the daemon calibrates it on a stream's first
documents (`calibrate.stream_width`), so pasting the lines pins what `sketch.width = 0` would choose."""

from __future__ import annotations

import argparse

from streamfilter.errors import ConfigError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="recommend the density sketch's bandwidth w for each K from an .npy of embeddings",
        description="Reads [n, dim] embeddings (.npy, float16/float32), measures near-neighbour and "
                    "random-pair distances on a sample, and prints the width w that gives random pairs "
                    "the target K-tuple collision probability, with the collision rates a sketch measures.",
    )
    p.add_argument("embeddings", help="path to an .npy file of shape [n, dim]")
    p.add_argument("--k", type=_positive_int, nargs="+", default=[4, 8, 16], metavar="K",
                   help="hashes per row to calibrate for (default: 4 8 16); the config lines are for the "
                        "first K given that is the default K (8), else the first")
    p.add_argument("--target-random", type=float, default=None,
                   help="K-tuple collision probability of a median random pair (default 1e-4, the daemon's "
                        "leave-one-out sketch; the plain sketch's w = 1.5 on MiniLM is 5e-4)")
    p.add_argument("--neighbours", type=_positive_int, default=10, help="m of the m-th nearest neighbour (default 10)")
    p.add_argument("--sample", type=_positive_int, default=2000, help="embeddings sampled (default 2000)")
    p.add_argument("--buckets", type=_positive_int, default=20000, help="sketch buckets B (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    import numpy as np  # the handler imports lazily; the CLI module stays cheap

    from streamfilter.density.calibrate import STREAM_TARGET_RANDOM_COLLISION, calibrate_width, stream_width
    from streamfilter.density.race import DEFAULT_K

    target = STREAM_TARGET_RANDOM_COLLISION if args.target_random is None else args.target_random
    if not 0.0 < target < 1.0:
        raise ConfigError(f"--target-random: must be in (0, 1), got {target}")
    try:
        x = np.load(args.embeddings, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"embeddings: cannot read {args.embeddings!r} as .npy: {exc}") from None
    if x.ndim != 2 or x.shape[0] < args.neighbours + 2 or not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"embeddings: expected a float array [n >= {args.neighbours + 2}, dim], "
                          f"got {x.dtype} {x.shape}")
    print(f"{x.shape[0]} embeddings of dimension {x.shape[1]}; sample {min(args.sample, x.shape[0])}, "
          f"target random-pair collision {target:g}, B={args.buckets}")
    print(f"{'K':>3} {'w':>8} {'d_near':>7} {'d_rand':>7} {'p_near':>9} {'p_rand':>9} {'meas_near':>9} {'meas_rand':>9}")
    rng = np.random.default_rng(args.seed)
    sample = x if x.shape[0] <= args.sample else x[np.sort(rng.choice(x.shape[0], size=args.sample, replace=False))]
    sample = np.asarray(sample, dtype=np.float32)
    widths = {}
    for k in args.k:
        c = calibrate_width(sample, k, target_random=target, neighbours=args.neighbours, sample_size=args.sample,
                            buckets=args.buckets, seed=args.seed)
        widths[k] = stream_width(sample, k, target, seed=args.seed)
        print(f"{k:>3} {widths[k]:8.4g} {c.near_distance:7.4f} {c.random_distance:7.4f} {c.predicted_near:9.2e} "
              f"{c.predicted_random:9.2e} {c.measured_near:9.2e} {c.measured_random:9.2e}")
    print("p_*: predicted K-tuple collision probability at the median distance; meas_*: fraction of sketch rows "
          "in which pairs at that distance (+-5%) share a bucket "
          f"(includes ~1/B = {1 / args.buckets:.1e} of bucket collisions).")
    k = DEFAULT_K if DEFAULT_K in widths else args.k[0]
    print(f"\n# paste into the configuration file (K = {k}; the daemon's leave-one-out sketch, "
          f"random-pair collision {target:g}):")
    print("[sketch]")
    print(f"k = {k}")
    print(f"width = {widths[k]:.6g}")
    print("leave_one_out = true")
    return 0
