"""`streamfilter demo` (the README's first quick-start command), at a small size."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from streamfilter.broker import KafkaBroker, free_port

pytestmark = pytest.mark.kafka


def test_the_demo_runs_on_real_density_says_ask_llm_is_random_and_stops_its_broker(tmp_path, test_models):
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "streamfilter", "demo", "--docs", "200", "--port", str(port),
                             "--data-dir", str(tmp_path / "demo"), "--policy", "density"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "all-MiniLM-L6-v2 embedder" in out and "RANDOM WEIGHTS" in out
    decided = re.search(r"decisions: (\d+) accepted, (\d+) rejected, (\d+) to the DLQ", out)
    assert decided and int(decided[1]) + int(decided[2]) == 200 and int(decided[3]) == 5
    assert re.search(r"coverage of the \d+ Wikipedia topics \(embedder all-MiniLM-L6-v2\): .* ratio \d\.\d\d", out)
    assert "The broker is stopped" in out
    assert not KafkaBroker(tmp_path / "demo" / "broker", port=port).status().running
