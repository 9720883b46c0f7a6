"""`streamfilter snapshot list | inspect | verify | merge`: the sketch aggregator's snapshots for people."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from streamfilter.errors import UserError


def register(subparsers) -> None:
    from streamfilter.commands.options import add_config_arguments

    parser = subparsers.add_parser("snapshot", help="list, inspect, verify and merge sketch snapshots",
                                   description="Snapshots of the sketch aggregator (sketch.snapshot_dir unless "
                                               "--dir). SNAPSHOT is a file, a snapshot id in the directory, or latest.")
    commands = parser.add_subparsers(dest="snapshot_command", metavar="ACTION", required=True)

    def common(p):
        add_config_arguments(p)
        p.add_argument("--dir", type=Path, help="snapshot directory (default: sketch.snapshot_dir)")

    p = commands.add_parser("list", help="the snapshots in the directory, newest first")
    common(p)
    p.set_defaults(handler=run_list)

    p = commands.add_parser("inspect", help="parameters, documents, age, Ask-LLM quantiles, IPS constant, offsets")
    common(p)
    p.add_argument("snapshot", nargs="?", default="latest", help="file, id or latest (default)")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="draw the Ask-LLM histogram with the threshold and the density scores with the keep curve")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=run_inspect)

    p = commands.add_parser("verify", help="check checksums (every snapshot in the directory when none is named)")
    common(p)
    p.add_argument("snapshots", nargs="*", help="files or ids (default: all in the directory)")
    p.set_defaults(handler=run_verify)

    p = commands.add_parser("merge", help="add the sketches of several aggregators into one snapshot")
    common(p)
    p.add_argument("snapshots", nargs="+", help="two or more files or ids")
    p.add_argument("--output", type=Path, required=True,
                   help="a file, or a directory (then named so that `latest` finds it)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="merge even when two snapshots cover the same partition (their documents count twice)")
    p.set_defaults(handler=run_merge)


def _setup(args):
    from streamfilter.config import build_policy
    from streamfilter.commands.options import config_from_args

    config = config_from_args(args)
    directory = args.dir or Path(config.sketch.snapshot_dir)
    return config, directory, build_policy(config)


def run_list(args: argparse.Namespace) -> int:
    from streamfilter.density.snapshot import SnapshotCorrupt
    from streamfilter.density.snapshot_inspect import age_text
    from streamfilter.density.snapshot_store import SnapshotStore

    _, directory, _ = _setup(args)
    store = SnapshotStore(directory)
    paths = store.list()
    if not paths:
        print(f"no snapshots in {directory}")
        return 0
    print(f"{'snapshot id':<44} {'age':>7} {'documents':>10} {'R x B, K, w':>22} {'MB':>6}  status")
    now = time.time()
    for path in paths:
        try:
            s = store.load(path)
        except SnapshotCorrupt as exc:
            print(f"{path.name:<44} {'':>7} {'':>10} {'':>22} {path.stat().st_size / 1e6:>6.1f}  CORRUPT: {exc}")
            continue
        k = s.sketch
        params = f"{k.rows}x{k.buckets}, {k.k}, {k.width:g}"
        print(f"{s.snapshot_id:<44} {age_text(now - s.created_at):>7} {s.doc_count:>10} {params:>22} "
              f"{path.stat().st_size / 1e6:>6.1f}  ok")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from streamfilter.density import snapshot_inspect
    from streamfilter.density.snapshot_store import SnapshotStore

    _, directory, policy = _setup(args)
    path, snapshot = SnapshotStore(directory).find(args.snapshot)
    summary = snapshot_inspect.summarize(path, snapshot, policy)
    if args.plot:
        summary["plot"] = str(snapshot_inspect.plot_snapshot(snapshot, args.plot, policy))
    if args.json:
        print(json.dumps(summary, indent=2, default=_json_default))
    else:
        print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    from streamfilter.density.snapshot_inspect import age_text

    k = s["sketch"]
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(s["created_at"]))
    lines = [
        f"snapshot   {s['snapshot_id']}",
        f"file       {s['file']}",
        f"created    {created} ({age_text(s['age_s'])} ago)",
        f"documents  {s['documents']}",
        f"sketch     dim {k['dim']}, R={k['rows']} rows x B={k['buckets']} buckets, K={k['k']}, w={k['width']:g}, "
        f"hash seed {k['hash_seed']}, {k['counters']} counters ({k['megabytes']:.1f} MB)",
        f"reservoir  {s['reservoir']['documents']} of {s['reservoir']['capacity']} (policy seed {s['policy_seed']})",
    ]
    a = s["askllm"]
    if a["count"]:
        lines.append(f"Ask-LLM    {a['count']} scores, rank error {a['rank_error']:.2%}: "
                     + ", ".join(f"{name} {v:.3f}" for name, v in a["quantiles"].items()))
    if "density" in s:
        lines.append("density    reservoir scores: " + ", ".join(f"{n} {v:.4g}" for n, v in s["density"].items()))
    for key, c in sorted(s["ips_constants"].items()):
        lines.append(f"IPS c      {c:.6g} for {key}")
    p = s.get("policy")
    if p:
        if "not_ready" in p:
            lines.append(f"policy     {p['name']} (keep {p['keep_rate']:g}): not ready: {p['not_ready']}")
        else:
            parts = [f"{p['name']} (keep {p['keep_rate']:g}"
                     + (f", quality gate {p['quality_keep']:g})" if p["quality_keep"] is not None else ")")]
            if p["askllm_threshold"] is not None:
                parts.append(f"P(yes) threshold {p['askllm_threshold']:.4f}")
            if p["ips_constant"] is not None:
                parts.append(f"IPS c {p['ips_constant']:.6g}")
            lines.append("policy     " + ", ".join(parts))
    if s["offsets"]:
        lines.append("offsets    " + ", ".join(f"{o['topic']}[{o['partition']}]<{o['next_offset']}"
                                               for o in s["offsets"]))
    if "plot" in s:
        lines.append(f"plot       {s['plot']}")
    return "\n".join(lines)


def run_verify(args: argparse.Namespace) -> int:
    from streamfilter.density.snapshot import SnapshotCorrupt
    from streamfilter.density.snapshot_store import SnapshotStore

    _, directory, _ = _setup(args)
    store = SnapshotStore(directory)
    paths = [store.resolve(ref) for ref in args.snapshots]
    if not args.snapshots:
        paths = store.list()
        if not paths:
            raise UserError(f"no snapshots in {directory}")
    bad = 0
    for path in paths:
        try:
            s = store.load(path)
            print(f"ok       {path}  ({s.snapshot_id}, {s.doc_count} documents)")
        except SnapshotCorrupt as exc:
            bad += 1
            print(f"CORRUPT  {path}  {exc}")
    return 1 if bad else 0


def run_merge(args: argparse.Namespace) -> int:
    from streamfilter.density.snapshot_store import SnapshotStore, write_to
    from streamfilter.density.state import merge_snapshots

    _, directory, policy = _setup(args)
    store = SnapshotStore(directory)
    items = [store.find(ref) for ref in args.snapshots]
    merged = merge_snapshots(items, policies=[policy], allow_overlap=args.allow_overlap)
    path = write_to(merged, args.output)
    print(f"merged {len(items)} snapshots ({merged.doc_count} documents) into {merged.snapshot_id}: {path}")
    return 0


def _json_default(value):
    if isinstance(value, float):
        return None
    return str(value)
