"""How far apart identical bare runs are on this machine: the noise floor of bench/daemon_e2e.py.

The bare scorers (flan-t5-small + sentence-t5-base architectures, int8, as daemon_e2e's `bare`)
on the same documents, `--rounds` times, each round once in this long-lived process and once in
a fresh process (as the daemon is one), one after the other. No daemon and no Kafka: whatever
the runs differ by is the machine's, and a daemon run's ratio cannot be read finer than that.

    .venv/bin/python bench/bare_noise.py [--rounds 4] [--docs 800]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from daemon_e2e import bare  # noqa: E402
from models_cpu import build, document_sets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--docs", type=int, default=800)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one fresh-process run
    args = parser.parse_args()
    root = REPO / ".cache" / "bench-models"
    _, askllm = build("flan-t5-small", root)
    _, embedder = build("sentence-t5-base", root)
    texts = document_sets(0, args.docs)["web mix"]
    if args.child:
        print(json.dumps(bare(askllm, embedder, texts, "int8", 32, 2)))
        return
    runs: dict[str, list[float]] = {"this process": [], "fresh process": []}
    for _ in range(args.rounds):
        rate, cpu = bare(askllm, embedder, texts, "int8", 32, 2)
        runs["this process"].append(rate)
        print(f"this process:  {rate:.2f} docs/s, {cpu:.4f} CPU s/doc", flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", "--docs", str(args.docs)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rate, cpu = json.loads(out)
        runs["fresh process"].append(rate)
        print(f"fresh process: {rate:.2f} docs/s, {cpu:.4f} CPU s/doc", flush=True)
    every = [r for rates in runs.values() for r in rates]
    for where, rates in runs.items():
        print(f"{where}: mean {np.mean(rates):.2f} docs/s, standard deviation {np.std(rates, ddof=1):.2f}"
              if len(rates) > 1 else f"{where}: {rates[0]:.2f} docs/s")
    print(f"all runs: {min(every):.2f}-{max(every):.2f} docs/s, the slowest {1 - min(every) / max(every):.0%} "
          "below the fastest")


if __name__ == "__main__":
    main()
