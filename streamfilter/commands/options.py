"""The options every command that reads the configuration takes: --config, --set and the shortcuts."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from streamfilter.config import Config, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting (repeatable), e.g. --set policy.keep_rate=0.1")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (kafka.bootstrap_servers)")
    parser.add_argument("--metrics-port", type=int, help="port for /metrics, /ready and /live (daemon.metrics_port)")
    parser.add_argument("--instance-id", help="stable id of this process (kafka.instance_id)")


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    """The configuration for a command: the file, the environment, --set, then `extra` (a command's
    own flags, e.g. replay's --policy), then the named shortcuts."""
    overrides = [*args.set, *extra]
    for flag, key in (("bootstrap", "kafka.bootstrap_servers"), ("metrics_port", "daemon.metrics_port"),
                      ("instance_id", "kafka.instance_id"), ("sink_format", "sink.format"),
                      ("sink_path", "sink.path"), ("sink_topic", "sink.topic")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "sink_until_end", False):
        overrides.append("sink.until_end=true")
    return load_config(args.config, overrides=overrides)
