"""The `streamfilter` command line.

Each subsystem owns its subcommands: a module listed in `COMMAND_MODULES` exposes
`register(subparsers)`, which adds its parsers and sets `handler` (a callable taking the
parsed arguments and returning an exit code). Modules here must import cheaply: heavy
imports (onnxruntime, torch, kafka) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from streamfilter import __version__
from streamfilter.errors import UserError

COMMAND_MODULES = (
    "streamfilter.broker",
    "streamfilter.density.cli",
    "streamfilter.density.snapshot_cli",
    "streamfilter.daemon",
    "streamfilter.demo",
    "streamfilter.models.cli",
    "streamfilter.replay.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamfilter",
        description="Streaming data curation for LLM pre-training (Ask-LLM and Density samplers on Kafka).",
    )
    parser.add_argument("--version", action="version", version=f"streamfilter {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _not_cancelled_refresh(record: logging.LogRecord) -> bool:
    """kafka-python logs "Metadata refresh: failed Cancelled" at ERROR when a client is closed
    while a refresh is in flight: a normal shutdown, not an error (it broke one-line error exits)."""
    from kafka.errors import Cancelled

    return not (record.msg.startswith("Metadata refresh: failed") and record.args
                and isinstance(record.args[0], Cancelled))


def _not_unstable_offsets(record: logging.LogRecord) -> bool:
    """kafka-python logs "Unknown error fetching offsets ...: UnstableOffsetCommitError" at ERROR
    while a read_committed consumer waits for a transaction's pending offsets, which it then
    retries: the wait that makes a rewind exact after an aborted commit, not an error."""
    from kafka.errors import UnstableOffsetCommitError

    return not (record.msg.startswith("Unknown error fetching offsets") and record.args
                and isinstance(record.args[-1], UnstableOffsetCommitError))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.log_level != "DEBUG":
        logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python logs every connection at INFO
    logging.getLogger("kafka.cluster").addFilter(_not_cancelled_refresh)
    logging.getLogger("kafka.coordinator.consumer").addFilter(_not_unstable_offsets)
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"streamfilter {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
