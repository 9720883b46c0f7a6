"""`streamfilter calibrate` as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from streamfilter.commands import main
from streamfilter.density.calibrate import calibrate_width, width_for_collision
from streamfilter.density.race import lsh_kernel


def test_calibrate_prints_width_per_k(tmp_path, capsys, make_clustered):
    x, _ = make_clustered(600, dim=32, clusters=5)
    path = tmp_path / "emb.npy"
    np.save(path, x.astype(np.float16))
    assert main(["calibrate", str(path), "--k", "4", "8", "--sample", "400"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("4", "8")]
    assert [line[0] for line in lines] == ["4", "8"]
    assert float(lines[1][1]) > float(lines[0][1])  # more hashes per row -> wider hashes


def test_calibrate_rejects_bad_input(tmp_path, capsys):
    assert main(["calibrate", str(tmp_path / "missing.npy")]) == 2
    np.save(tmp_path / "flat.npy", np.zeros(10))
    assert main(["calibrate", str(tmp_path / "flat.npy")]) == 2
    assert "embeddings" in capsys.readouterr().err
    np.save(tmp_path / "ok.npy", np.random.default_rng(0).standard_normal((50, 4)))
    assert main(["calibrate", str(tmp_path / "ok.npy"), "--target-random", "2"]) == 2


def test_calibration_hits_its_target(make_clustered):
    x, _ = make_clustered(800, dim=32, clusters=5)
    c = calibrate_width(x, 8, target_random=1e-3, sample_size=800, rows=300)
    assert c.predicted_random == __import__("pytest").approx(1e-3, rel=1e-6)
    assert c.measured_random < 2.5e-3 and c.measured_near > 10 * c.measured_random
    assert lsh_kernel(1.0, width_for_collision(1.0, 4, 0.05), 4) == __import__("pytest").approx(0.05)


def test_cli_module_imports_cheaply():
    code = "import sys, streamfilter.commands; streamfilter.commands.build_parser(); print('scipy' in sys.modules, 'datasketches' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
