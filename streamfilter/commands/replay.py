"""`streamfilter replay` and `streamfilter compare`.

    replay --mode route    scored records of a range → decisions of a policy and snapshot → --output
                           (and --rejected-output), exactly once, resumable: the live route's code
    replay --mode rescore  raw records of a range → the models → scored records in --output
    replay --mode dry-run  decide a range and print what would be kept; nothing is written
    replay --compare A B   (or `compare A B`) decide a range with two policies and report the differences

This module only parses: it turns the arguments into a `replay.spec.ReplaySpec` or
`CompareSpec`, loads the configuration once, and prints what the jobs return. The work is
`replay.run.ReplayJob` (route, rescore) and `replay.decide` (dry-run, compare); every
argument is checked, and the range fixed, before anything is produced: a bad one fails
with one line (UserError/ConfigError).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from streamfilter.policies import policy_class, policy_names
from streamfilter.replay.spec import DEFAULT_BY, MODES, CompareSpec, ReplaySpec, with_batch_docs


def register(subparsers) -> None:
    from streamfilter.commands.options import add_config_arguments

    text = "re-route or re-score a range of a topic under another policy or snapshot, exactly once"
    p = subparsers.add_parser("replay", help=text, description=text + " (see README, 'Replay').")
    add_config_arguments(p)
    _range_arguments(p)
    p.add_argument("--mode", choices=MODES, default="route",
                   help="route: scored → decisions (no models); rescore: raw → scored (runs the models); "
                        "dry-run: print what would be kept (default route)")
    p.add_argument("--output", metavar="TOPIC", help="where kept documents (route) or scored records (rescore) go")
    p.add_argument("--rejected-output", metavar="TOPIC", help="route: also write rejected documents here")
    p.add_argument("--dlq", metavar="TOPIC", help="undecodable input (default: OUTPUT.dlq)")
    p.add_argument("--append", action="store_true",
                   help="write into an output topic that already holds records of another job or the live route")
    _policy_arguments(p)
    p.add_argument("--job-id", help="names the replay's consumer group and transactional id; rerunning with the "
                                    "same id resumes it (default: derived from the arguments)")
    p.add_argument("--compare", nargs=2, metavar=("POLICY_A", "POLICY_B"),
                   help="compare two policies over the range instead of replaying (see `compare`)")
    _report_arguments(p)
    p.add_argument("--show", type=int, default=10, metavar="N",
                   help="dry-run: list the first N documents that would be kept (default 10; -1 = all)")
    p.add_argument("--batch-docs", type=int, metavar="N",
                   help="documents per transaction, fixed (default: adaptive, from batch.base_batch_docs "
                        "growing to batch.max_batch_docs while the range has more to read)")
    p.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto",
                   help="a bar on a terminal, log lines otherwise (default auto)")
    p.add_argument("--progress-interval-s", type=float, default=10.0, help="seconds between progress log lines")
    p.set_defaults(handler=run_replay)

    text = "compare policies over a range of scored records: keep rates, overlap, scores, kept share per topic"
    c = subparsers.add_parser("compare", help=text, description=text + ". POLICY is NAME or "
                              "NAME:keep_rate=F,quality_keep=F,seed=N,snapshot=REF, e.g. askllm:keep_rate=0.2.")
    add_config_arguments(c)
    _range_arguments(c)
    c.add_argument("policies", nargs="+", metavar="POLICY", help=f"two or more policies ({', '.join(policy_names())})")
    c.add_argument("--snapshot", default="latest", help="file, snapshot id or latest (default latest)")
    _report_arguments(c)
    c.set_defaults(handler=run_compare_command)


def _range_arguments(p) -> None:
    p.add_argument("--input", metavar="TOPIC", help="topic to replay (default: topics.scored; rescore: topics.raw)")
    p.add_argument("--from", dest="start", default="earliest", metavar="POS",
                   help="first position, inclusive: earliest, an offset (1200, 0:1200,1:800), a time "
                        "(2024-05-01T12:00:00Z, @UNIX_MS) or an age (now-2h) (default earliest)")
    p.add_argument("--to", dest="end", default="latest", metavar="POS",
                   help="end position, exclusive, fixed when the replay starts (default latest)")


def _policy_arguments(p) -> None:
    p.add_argument("--policy", help=f"policy name (policy.name): {', '.join(policy_names())}")
    p.add_argument("--keep-rate", type=float, help="target keep rate (policy.keep_rate)")
    gated = " / ".join(n for n in policy_names() if policy_class(n).has_quality_gate)
    p.add_argument("--quality-keep", type=float, help=f"{gated}'s quality gate (policy.quality_keep)")
    p.add_argument("--seed", type=int, help="policy seed for the coins (policy.seed)")
    p.add_argument("--snapshot", default="latest",
                   help="snapshot file, snapshot id in sketch.snapshot_dir, or latest (default latest)")


def _report_arguments(p) -> None:
    p.add_argument("--by", action="append", metavar="FIELD",
                   help="break the kept share down by this field (lang, url, meta.KEY; repeatable; "
                        "default meta.topic)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")


# ----------------------------------------------------------------------------- arguments → specs


def _replay_spec(args: argparse.Namespace) -> ReplaySpec:
    return ReplaySpec(
        mode=args.mode, input=args.input, start=args.start, end=args.end, output=args.output,
        rejected_output=args.rejected_output, dlq=args.dlq, append=args.append, snapshot=args.snapshot,
        job_id=args.job_id, policy=args.policy, keep_rate=args.keep_rate, quality_keep=args.quality_keep,
        seed=args.seed, batch_docs=args.batch_docs, progress=args.progress,
        progress_interval_s=args.progress_interval_s, show=args.show, by=tuple(args.by or DEFAULT_BY))


def _compare_spec(args: argparse.Namespace, policies) -> CompareSpec:
    return CompareSpec(policies=tuple(policies), input=args.input, start=args.start, end=args.end,
                       snapshot=args.snapshot, by=tuple(args.by or DEFAULT_BY))


def _load_config(args: argparse.Namespace, overrides: list[str]):
    """The configuration, loaded once: --set, then `overrides` (the policy flags), then the named flags."""
    from streamfilter.commands.options import config_from_args

    # kafka-python warns whenever one of its I/O tasks takes > 100 ms, which a busy machine does
    # often; a one-shot command's output is for the user's range, not for that.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)

    if args.metrics_port is None:
        overrides = [*overrides, "daemon.metrics_port=0"]  # a replay beside a daemon must not take its port
    return config_from_args(args, overrides)


# ----------------------------------------------------------------------------- replay


def run_replay(args: argparse.Namespace) -> int:
    spec = _replay_spec(args)
    config = with_batch_docs(_load_config(args, spec.policy_overrides()), spec.batch_docs)
    if args.compare:
        return _compare(args, config, _compare_spec(args, args.compare))
    if spec.mode == "dry-run":
        return _dry_run(args, config, spec)
    from streamfilter.replay.run import ReplayJob

    job = ReplayJob(config, spec)
    if not job.prepare():
        print(f"replay job {job.job_id} is already complete ({job.state.total} offsets of {job.input_topic}); "
              "choose another --job-id to replay the range again")
        return 0
    result = job.run()
    if not result.completed:
        print(f"replay job {result.job_id} stopped at {result.done}/{result.total} offsets; run the same command "
              f"(or --job-id {result.job_id}) to resume", file=sys.stderr)
        return 130 if result.interrupted else 1
    elapsed = result.elapsed_s
    kept_what = "kept" if result.mode == "route" else "scored"
    print(f"replay job {result.job_id} complete: {result.documents} documents in {elapsed:.1f}s "
          f"({result.documents / elapsed if elapsed > 0 else 0:,.0f} docs/s), {kept_what} {result.kept} → "
          f"{result.output}, rejected {result.rejected}, dlq {result.dlq}"
          + (f" (resumed at {result.resumed_at}/{result.total} offsets)" if result.resumed else ""))
    return 0


# ----------------------------------------------------------------------------- dry-run and compare


def _dry_run(args: argparse.Namespace, config, spec: ReplaySpec) -> int:
    from streamfilter.replay.compare import format_report
    from streamfilter.replay.decide import DryRun
    from streamfilter.replay.ranges import describe

    def show(scored, decision) -> None:
        text = " ".join(scored.document.text.split())[:70]
        print(f"keep  {scored.document.id}  askllm {decision.askllm:.3f}  density {decision.density:.4g}  "
              f"p {decision.probability:.3f}  {text}")

    with DryRun(config, spec) as dry:
        print(f"dry-run: {dry.input_topic} {describe(dry.ranges)}, policy {dry.label}"
              + (f", snapshot {dry.snapshot.snapshot_id}" if dry.snapshot else "") + "; nothing is written")
        report = dry.run(on_keep=show)
    print()
    print(format_report(report))
    if report["undecodable"]:
        print(f"\n{report['undecodable']} undecodable records (a replay would send them to the DLQ)")
    _write_json(args, report)
    return 0


def run_compare_command(args: argparse.Namespace) -> int:
    config = _load_config(args, [])
    return _compare(args, config, _compare_spec(args, args.policies))


def _compare(args: argparse.Namespace, config, spec: CompareSpec) -> int:
    from streamfilter.replay.compare import format_report
    from streamfilter.replay.decide import PolicyComparison
    from streamfilter.replay.ranges import describe

    comparison = PolicyComparison(config, spec)  # bad policies and positions fail before Kafka is touched
    report = comparison.run()
    print(f"compare: {comparison.input_topic} {describe(comparison.ranges)}")
    print(format_report(report))
    _write_json(args, report)
    return 0


def _write_json(args: argparse.Namespace, report: dict) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str, allow_nan=True))
        print(f"report written to {args.json}")
