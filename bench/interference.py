"""How other activity on the same cores slows the bare scorers: a competing process takes the same
share of one core in short or long bursts (many or few wake-ups) while the scorers run.

flan-t5-small + sentence-t5-base architectures (random weights, int8, 2 intra-op threads), the
web mix, 128 documents per call (the daemon's micro-batch), as `bench/daemon_e2e.py`'s bare pass.

    .venv/bin/python bench/interference.py [--docs 800] [--share 0.15] [--rounds 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from daemon_e2e import bare  # noqa: E402
from models_cpu import build, document_sets  # noqa: E402

BURN = ("import sys, time\nbusy, idle = float(sys.argv[1]), float(sys.argv[2])\nwhile True:\n"
        "    t = time.perf_counter()\n    while time.perf_counter() - t < busy: pass\n    time.sleep(idle)\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=800)
    parser.add_argument("--share", type=float, default=0.15, help="the competitor's share of one core")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    root = REPO / ".cache" / "bench-models"
    _, askllm = build("flan-t5-small", root)
    _, embedder = build("sentence-t5-base", root)
    texts = document_sets(0, args.docs)["web mix"]
    print("| competitor | docs/s | CPU s/doc |\n|---|---|---|")
    for _ in range(args.rounds):
        for burst in (None, 0.001, 0.010):
            competitor = None
            if burst is not None:
                idle = burst * (1 - args.share) / args.share
                competitor = subprocess.Popen([sys.executable, "-c", BURN, str(burst), str(idle)])
            try:
                rate, cpu = bare(askllm, embedder, texts, "int8", 32, 2, chunk=128)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            label = "none" if burst is None else f"{args.share:.0%} of a core in {burst * 1000:g} ms bursts"
            print(f"| {label} | {rate:.2f} | {cpu:.4f} |", flush=True)


if __name__ == "__main__":
    main()
