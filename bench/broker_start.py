"""Time `KafkaBroker.start()` (jars cached) until the broker answers a metadata request.

    .venv/bin/python bench/broker_start.py [--runs 3]

Each run formats a fresh data folder (first start) and then restarts on it (second start).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from streamfilter.broker import KafkaBroker, ensure_jars, free_port


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ensure_jars()
    first, second, stop = [], [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            broker = KafkaBroker(tmp, port=free_port())
            for bucket in (first, second):
                t0 = time.monotonic()
                broker.start()
                bucket.append(time.monotonic() - t0)
                t0 = time.monotonic()
                broker.stop()
                stop.append(time.monotonic() - t0)
    for label, values in (("first start (format + start)", first), ("restart on formatted data", second),
                          ("stop (SIGTERM until exit)", stop)):
        print(f"{label:32s} median {statistics.median(values):5.1f}s  min {min(values):5.1f}s  max {max(values):5.1f}s")


if __name__ == "__main__":
    main()
