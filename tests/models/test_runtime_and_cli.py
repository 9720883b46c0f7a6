"""Providers, the log line saying which ran, and `streamfilter models score|info`."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from streamfilter.commands import main
from streamfilter.errors import ConfigError
from streamfilter.models import AskLLMScorer
from streamfilter.models.runtime import resolve_providers


def test_providers_fall_back_to_cpu_and_unknown_ones_are_config_errors():
    assert resolve_providers(None)[-1] == "CPUExecutionProvider"
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="providers"):
        resolve_providers(["NoSuchExecutionProvider"])


def test_the_provider_that_ran_is_logged(test_models, caplog):
    with caplog.at_level(logging.INFO, logger="streamfilter.models.runtime"):
        AskLLMScorer.load(test_models.askllm, variant="fp32", intra_op_threads=1)
    assert any("runs on CPUExecutionProvider" in r.getMessage() and "askllm-tiny@" in r.getMessage()
               for r in caplog.records)


def test_score_command_reads_and_writes_json_lines(test_models, monkeypatch, capsys):
    lines = [json.dumps({"id": "a", "text": "The Eiffel Tower is in Paris."}), "not json",
             json.dumps({"id": 7, "text": "buy now buy now"}), json.dumps({"id": "x", "text": 5})]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    rc = main(["models", "score", "--askllm", str(test_models.askllm), "--embedder", str(test_models.minilm),
               "--variant", "fp32", "--log-score", "--batch-size", "2"])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 3  # two lines skipped, and said so
    assert [r["id"] for r in rows] == ["a", 7]
    assert all(0 <= r["askllm"] <= 1 and len(r["embedding"]) == 384 and "askllm_log" in r for r in rows)
    assert "line 2: skipped" in err and "line 4: skipped" in err
    scorer = AskLLMScorer.load(test_models.askllm, variant="fp32")
    assert rows[0]["askllm"] == pytest.approx(float(scorer.score(["The Eiffel Tower is in Paris."])[0]), abs=1e-7)


def test_score_needs_a_model(capsys):
    assert main(["models", "score"]) == 2
    assert "--askllm" in capsys.readouterr().err


def test_info_verifies_the_files(test_models, capsys):
    assert main(["models", "info", str(test_models.sentence_t5)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["kind"] == "embedder" and "match their sha256" in err


def test_cli_module_imports_cheaply():
    import subprocess

    code = ("import sys, streamfilter.commands.models; "
            "print(sorted(m for m in ('onnxruntime', 'torch', 'transformers', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sessions_do_not_spin_idle_threads(test_models):
    # Spinning intra-op threads take the cores the daemon's other threads and the broker need.
    scorer = AskLLMScorer.load(test_models.askllm, variant="fp32", intra_op_threads=2)
    options = scorer.session.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
