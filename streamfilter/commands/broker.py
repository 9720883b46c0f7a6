"""`streamfilter broker start | stop | status | fetch`: the local single-node Kafka broker (`broker.KafkaBroker`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from streamfilter.broker import DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR, DEFAULT_PORT, KafkaBroker, ensure_jars
from streamfilter.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("broker", help="start, stop or check the local single-node Kafka broker")
    parser.add_argument("action", choices=["start", "stop", "status", "fetch"],
                        help="fetch only downloads the jars into the cache")
    parser.add_argument("--port", type=int, default=None, help=f"client port on 127.0.0.1 (default {DEFAULT_PORT})")
    parser.add_argument("--controller-port", type=int, default=None, help="KRaft controller port (default port+1)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"default {DEFAULT_DATA_DIR}")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where the Kafka jars are kept")
    parser.add_argument("--heap-mb", type=int, default=512)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.port is not None and not 1 <= args.port < 65535:
        raise UserError(f"--port must be in 1..65534, got {args.port}")
    broker = KafkaBroker(args.data_dir, args.port, args.controller_port, args.cache_dir, heap_mb=args.heap_mb)
    if args.action == "fetch":
        print(f"Kafka jars in {ensure_jars(args.cache_dir)}")
        return 0
    if args.action == "start":
        t0 = time.monotonic()
        status = broker.start()
        print(f"{status.describe()}; ready in {time.monotonic() - t0:.1f}s")
        return 0
    if args.action == "stop":
        print("stopped" if broker.stop() else "not running")
        return 0
    status = broker.status()
    print(status.describe())
    return 0 if status.running else 3
