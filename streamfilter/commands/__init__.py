"""The `streamfilter` command line: every argparse module of the project, one per command group.

A module listed in `COMMAND_MODULES` exposes
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
    "streamfilter.commands.broker",
    "streamfilter.commands.calibrate",
    "streamfilter.commands.snapshots",
    "streamfilter.commands.run",
    "streamfilter.commands.demo",
    "streamfilter.commands.models",
    "streamfilter.commands.replay",
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


class KafkaLogSummary(logging.Filter):
    """kafka-python's WARNING/ERROR lines, one per condition per `window_s`, with a count.

    During a broker outage every client logs the same failure several times a second (hundreds
    of lines a minute). The first record of a condition (logger, message template, exception
    type) passes; the others within the window are counted, and the first one after the window
    passes with "(N more like this in the last S s)" appended. `flush()` logs what is still counted.
    """

    def __init__(self, window_s: float = 60.0, clock=None):
        super().__init__()
        import time

        self.window_s = window_s
        self.clock = clock or time.monotonic
        self._open: dict[tuple, tuple[float, int, logging.LogRecord]] = {}  # key -> (window start, count, last)

    @staticmethod
    def key(record: logging.LogRecord) -> tuple:
        last = record.args[-1] if isinstance(record.args, tuple) and record.args else None
        kind = type(last).__name__ if isinstance(last, BaseException) else ""
        return record.name, record.levelno, str(record.msg), kind

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("kafka") or record.levelno < logging.WARNING:
            return True
        key, now = self.key(record), self.clock()
        started, count, _ = self._open.get(key, (None, 0, None))
        if started is not None and now - started < self.window_s:
            self._open[key] = (started, count + 1, record)
            return False
        if count:
            record.msg = f"{record.msg} ({count} more like this in the last {now - started:.0f} s)"
        self._open[key] = (now, 0, record)
        return True

    def flush(self) -> None:
        """Log the counts of conditions still inside their window (at exit)."""
        for (name, level, msg, _), (started, count, last) in list(self._open.items()):
            if count:
                logging.getLogger(name).log(level, "%s (%d more like this in the last %.0f s)",
                                            last.getMessage(), count, self.clock() - started)
        self._open.clear()


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
    summary = KafkaLogSummary()
    for handler in logging.getLogger().handlers:  # a handler filter sees every kafka.* logger's records
        handler.addFilter(summary)
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"streamfilter {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(summary)
        summary.flush()
