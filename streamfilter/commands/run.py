"""`streamfilter score | sketch | route | run | sink`: the long-running stages (`daemon.run_stages`)."""

from __future__ import annotations

import argparse

from streamfilter.commands.options import add_config_arguments, config_from_args
from streamfilter.daemon import STAGES, run_stages


def register(subparsers: argparse._SubParsersAction) -> None:
    helps = {
        "score": "pass 1: score raw documents with Ask-LLM and the embedder into the scored topic (stateless)",
        "sketch": "the aggregator: count scored embeddings in the RACE sketch and write snapshots",
        "route": "pass 2: apply the policy with the newest snapshot; write accepted (and rejected) documents",
        "run": "score, sketch and route in one process (one machine, the demo)",
    }
    for name, text in helps.items():
        parser = subparsers.add_parser(name, help=text, description=text)
        add_config_arguments(parser)
        parser.set_defaults(handler=_run_command, stages=STAGES if name == "run" else (name,))
    text = "write the accepted topic as training-ready shards (Parquet or JSON lines, zstd), exactly once"
    sink = subparsers.add_parser("sink", help=text, description=text)
    add_config_arguments(sink)
    sink.add_argument("--until-end", dest="sink_until_end", action="store_true",
                      help="one-shot: stop at the end offsets found at start and write the _SUCCESS manifest")
    sink.add_argument("--format", dest="sink_format", choices=("parquet", "jsonl"), help="sink.format")
    sink.add_argument("--out", dest="sink_path", metavar="URL", help="sink.path: a folder or an fsspec URL")
    sink.add_argument("--topic", dest="sink_topic", metavar="TOPIC", help="sink.topic (default: topics.accepted)")
    sink.set_defaults(handler=_run_sink_command, stages=("sink",))


def _run_command(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    run_stages(config, args.stages)
    return 0


def _run_sink_command(args: argparse.Namespace) -> int:
    from streamfilter.stages.sink import check_requirements

    config = config_from_args(args)
    check_requirements(config)  # a missing extra or a bad sink.path: one line, before any topic is created
    run_stages(config, args.stages)
    return 0
