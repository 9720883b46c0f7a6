"""Model folders are checked against their manifest before anything is loaded."""

from __future__ import annotations

import json
import shutil

import pytest

from streamfilter.errors import UserError
from streamfilter.models import AskLLMScorer, SentenceEmbedder, load_manifest


@pytest.fixture
def askllm_copy(test_models, tmp_path):
    return shutil.copytree(test_models.askllm, tmp_path / "askllm")


def test_manifest_describes_the_export(test_models):
    m = load_manifest(test_models.askllm)
    assert m.kind == "askllm" and set(m.variants) == {"fp32", "int8", "fp16"}
    assert m.config["yes_token_id"] == 4273 and m.config["no_token_id"] == 150
    assert m.config["prompt_version"] and m.config["max_tokens"] == 512
    assert {"optimum", "transformers", "torch", "onnx", "onnxruntime"} <= set(m.raw["exporter"])
    assert all(len(f["sha256"]) == 64 for f in m.files.values())
    e = load_manifest(test_models.sentence_t5)
    assert [mod["type"] for mod in e.config["modules"]] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert e.config["dense_layers"] == [{"in": 64, "out": 64, "bias": False, "activation": "identity"}]


def test_a_tampered_model_file_is_refused_with_a_clear_message(askllm_copy):
    path = askllm_copy / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.onnx: sha256 .* does not match the manifest"):
        AskLLMScorer.load(askllm_copy, variant="fp32")
    AskLLMScorer.load(askllm_copy, variant="int8")  # other files are still good


def test_a_tampered_tokenizer_is_refused(askllm_copy):
    path = askllm_copy / "tokenizer.json"
    path.write_text(path.read_text().replace('"▁yes"', '"▁yas"', 1))
    with pytest.raises(UserError, match="tokenizer.json: sha256"):
        AskLLMScorer.load(askllm_copy, variant="fp32")


def test_missing_or_wrong_manifest(askllm_copy, test_models, tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        AskLLMScorer.load(tmp_path)
    with pytest.raises(UserError, match="holds a 'askllm' model"):
        SentenceEmbedder.load(askllm_copy)
    with pytest.raises(UserError, match="holds a 'embedder' model"):
        AskLLMScorer.load(test_models.minilm)
    (askllm_copy / "model.int8.onnx").unlink()
    with pytest.raises(UserError, match="missing"):
        AskLLMScorer.load(askllm_copy, variant="int8")
    raw = json.loads((askllm_copy / "manifest.json").read_text())
    raw["config"]["prompt_version"] = "someone-elses-prompt"
    (askllm_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="prompt"):
        AskLLMScorer.load(askllm_copy, variant="fp32")


def test_ensure_test_models_is_cheap_once_built(test_models):
    import time

    from streamfilter.models.testmodels import ensure_test_models

    t0 = time.perf_counter()
    again = ensure_test_models(test_models.askllm.parent)
    assert again == test_models and time.perf_counter() - t0 < 5
