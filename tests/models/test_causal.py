"""Ask-LLM with a decoder-only chat model, and the perplexity baseline, on a tiny offline Qwen2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamfilter.errors import UserError
from streamfilter.models import AskLLMScorer, load_model
from streamfilter.models.askllm import PROMPT_PREFIX, PROMPT_SUFFIX, make_prompt
from streamfilter.models.askllm_causal import CausalAskLLMScorer
from streamfilter.models.manifest import load_manifest
from streamfilter.models.perplexity import PerplexityScorer
from streamfilter.models.text import pad_batch


@pytest.fixture(scope="module")
def chat_tokenizer(causal_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(causal_models.source))


@pytest.fixture(scope="module")
def perplexity(causal_models):
    return PerplexityScorer.load(causal_models.perplexity, variant="fp32")


def test_manifest_records_the_causal_backend_and_load_picks_it(causal_models, causal_askllm):
    m = load_manifest(causal_models.askllm)
    assert m.raw["backend"] == "causal" and m.kind == "askllm"
    assert isinstance(causal_askllm, CausalAskLLMScorer) and causal_askllm.backend == "causal"
    assert m.config["chat_prefix"].endswith("<|im_start|>user\n")
    assert m.config["chat_suffix"] == "<|im_end|>\n<|im_start|>assistant\n"
    assert m.config["yes_token_id"] == m.config["yes_variant_ids"][0]
    p = load_manifest(causal_models.perplexity)
    assert p.raw["backend"] == "causal" and p.kind == "perplexity"
    with pytest.raises(Exception, match="not an 'askllm' model"):
        load_model(causal_models.perplexity, kind="askllm")
    with pytest.raises(UserError, match="holds a 'causal' askllm model"):
        AskLLMScorer.load(causal_models.askllm)  # one class, one graph: no hidden switch to another class


def test_old_manifests_without_backend_are_seq2seq(test_models):
    assert load_manifest(test_models.askllm).backend == "seq2seq"
    assert AskLLMScorer.load(test_models.askllm, variant="fp32").backend == "seq2seq"


def test_prompt_ids_equal_the_chat_template(causal_models, chat_tokenizer, sample_texts):
    # A budget that truncates none of them: the 2000-token test BPE needs more tokens than T5's.
    ours = CausalAskLLMScorer.load(causal_models.askllm, variant="fp32", max_tokens=2048).prompt_ids(sample_texts)
    theirs = [chat_tokenizer.apply_chat_template([{"role": "user", "content": make_prompt(t)}],
                                                 add_generation_prompt=True, tokenize=True) for t in sample_texts]
    theirs = [t["input_ids"] if isinstance(t, dict) else t for t in theirs]
    assert ours == theirs


def test_p_yes_matches_transformers(causal_askllm, torch_causal, sample_texts):
    ids = causal_askllm.prompt_ids(sample_texts)
    yes_no, variants = causal_askllm.log_probs_all(sample_texts, batch_size=8)
    ref = torch_causal.answer_log_probs(ids, [causal_askllm.yes_token_id, causal_askllm.no_token_id,
                                              *causal_askllm.yes_variant_ids])
    assert np.max(np.abs(np.exp(yes_no) - np.exp(ref[:, :2]))) <= 1e-4
    assert np.max(np.abs(np.exp(variants) - np.exp(ref[:, 2:]))) <= 1e-4
    p, p_any = causal_askllm.score_variants(sample_texts)
    assert np.all(p_any >= p - 1e-7) and np.all(p_any <= 1.0)
    assert p.min() < 0.2 and p.max() > 0.5  # the tiny model is spread, so parity is not vacuous


def test_batch_equals_single_and_left_padding_equals_right(causal_askllm):
    from streamfilter.corpus import wiki_documents

    texts = ["Hi.", wiki_documents()[5].text * 4, "A cat.", wiki_documents()[9].text, "word " * 300]
    batched = causal_askllm.log_score(texts, batch_size=len(texts))
    alone = np.array([causal_askllm.log_score([t])[0] for t in texts])
    assert np.max(np.abs(batched - alone)) <= 1e-5
    ids = causal_askllm.prompt_ids(texts)
    right_ids, right_mask = pad_batch(ids, causal_askllm.pad_token_id)
    left_ids = np.full_like(right_ids, causal_askllm.pad_token_id)
    left_mask = np.zeros_like(right_mask)
    for r, seq in enumerate(ids):
        left_ids[r, right_ids.shape[1] - len(seq):] = seq
        left_mask[r, right_ids.shape[1] - len(seq):] = 1
    (right, _) = causal_askllm.session.run({"input_ids": right_ids, "attention_mask": right_mask})
    (left, _) = causal_askllm.session.run({"input_ids": left_ids, "attention_mask": left_mask})
    assert np.max(np.abs(right[:, 0] - alone)) <= 1e-5
    assert np.max(np.abs(left[:, 0] - alone)) <= 1e-4


def test_truncation_keeps_the_question_and_the_template(causal_askllm):
    doc = " ".join(f"word{i}" for i in range(20_000))[:100_000]
    (ids,) = causal_askllm.prompt_ids([doc])
    tok = causal_askllm.tokenizer
    cfg = causal_askllm.manifest.config
    prefix = tok.encode(cfg["chat_prefix"] + PROMPT_PREFIX, add_special_tokens=False).ids
    suffix = tok.encode(PROMPT_SUFFIX + cfg["chat_suffix"], add_special_tokens=False).ids
    assert len(ids) == causal_askllm.max_tokens == 512
    assert ids[: len(prefix)] == prefix and ids[-len(suffix):] == suffix
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system") and text.endswith("- yes\n- no<|im_end|>\n<|im_start|>assistant\n")
    doc_ids = tok.encode(doc, add_special_tokens=False).ids
    assert ids[len(prefix): -len(suffix)] == doc_ids[: causal_askllm.document_budget]
    small = CausalAskLLMScorer.load(causal_askllm.manifest.root, variant="fp32",
                                    max_tokens=len(prefix) + len(suffix) + 3)
    (short,) = small.prompt_ids([doc])
    assert short[: len(prefix)] == prefix and short[-len(suffix):] == suffix and len(short) == small.max_tokens


def test_default_variant_on_cpu_is_fp32_for_causal_askllm_and_int8_for_perplexity(causal_models):
    assert CausalAskLLMScorer.load(causal_models.askllm).variant == "fp32"  # its int8 measurably mis-ranks
    assert PerplexityScorer.load(causal_models.perplexity).variant == "int8"
    assert CausalAskLLMScorer.load(causal_models.askllm, variant="int8").variant == "int8"  # pinned: honoured


def test_int8_variant_ranks_like_fp32(causal_models, causal_askllm, sample_texts):
    from scipy.stats import kendalltau

    int8 = CausalAskLLMScorer.load(causal_models.askllm, variant="int8")
    assert kendalltau(int8.score(sample_texts), causal_askllm.score(sample_texts)).statistic > 0.8


def _run_graph(path, ids, mask):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})


def test_side_file_graphs_are_quantized_one_weight_at_a_time_like_onnxruntime(causal_models, causal_askllm,
                                                                               sample_texts, tmp_path, monkeypatch):
    """A graph over 2 GB (its weights in a side file) gets int8 from the streaming quantizer, which
    must compute what onnxruntime's quantize_dynamic would (that one needs > 20 GB for a 1.5B model)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from streamfilter.models.graphs import edit, quantize

    fp32 = onnx.load(str(causal_models.askllm / "model.onnx"))
    head = quantize.lm_head_nodes(fp32, load_manifest(causal_models.askllm).config["vocab_size"])
    weights = {n.input[1] for n in fp32.graph.node if n.op_type == "MatMul" and n.name not in head} & {
        i.name for i in fp32.graph.initializer}
    onnx.save_model(fp32, str(tmp_path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=64)
    monkeypatch.setattr(edit, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)  # what a 7 GB export looks like
    files = quantize.quantize_int8(tmp_path / "model.onnx", tmp_path / "model.int8.onnx", exclude_nodes=head)
    assert files == ["model.int8.onnx", "model.int8.onnx.data", "model.onnx_data"]  # fp32 rest shared, not copied

    q = onnx.load(str(tmp_path / "model.int8.onnx"), load_external_data=False)
    assert sum(n.op_type == "DynamicQuantizeMatMul" for n in q.graph.node) == len(weights) > 0
    assert not weights & {i.name for i in q.graph.initializer}  # no fp32 copy of a quantized weight left
    assert [n.name for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in
            {i.name for i in q.graph.initializer}] == head  # the LM head stays fp32

    quantize_dynamic(str(causal_models.askllm / "model.onnx"), str(tmp_path / "reference.onnx"),
                     weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=head, extra_options={"MatMulConstBOnly": True})
    ids, mask = pad_batch(causal_askllm.prompt_ids(sample_texts), causal_askllm.pad_token_id)
    ours, reference, full = (_run_graph(tmp_path / name, ids, mask)[0]
                             for name in ("model.int8.onnx", "reference.onnx", "model.onnx"))
    assert np.max(np.abs(ours - reference)) <= 1e-6
    assert np.max(np.abs(np.exp(ours) - np.exp(full))) > 1e-4  # quantization did happen

    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    with pytest.raises(UserError, match="must be written beside it"):
        quantize.quantize_int8_streaming(tmp_path / "model.onnx", elsewhere / "model.int8.onnx")


def test_int8_is_added_to_an_fp32_only_export(causal_models, causal_askllm, sample_texts, tmp_path):
    import shutil

    from streamfilter.models.export import add_int8_variant
    from streamfilter.models.manifest import write_manifest

    folder = tmp_path / "askllm"
    shutil.copytree(causal_models.askllm, folder)
    m = load_manifest(folder)
    (folder / m.variants["int8"]["model"]).unlink()
    fields = {k: v for k, v in m.raw.items() if k not in ("format_version", "files")}
    fields["variants"] = {"fp32": m.variants["fp32"]}
    write_manifest(folder, fields, [f for f in m.files if f != m.variants["int8"]["model"]])
    with pytest.raises(Exception, match="int8"):
        CausalAskLLMScorer.load(folder, variant="int8")

    add_int8_variant(folder)
    int8 = CausalAskLLMScorer.load(folder, variant="int8")
    load_manifest(folder).verify_all()
    reference = CausalAskLLMScorer.load(causal_models.askllm, variant="int8")
    assert np.max(np.abs(int8.score(sample_texts) - reference.score(sample_texts))) <= 1e-6

    before = set(p.name for p in folder.iterdir())
    add_int8_variant(folder, replace=True)  # made anew: same files, nothing left over
    assert set(p.name for p in folder.iterdir()) == before
    load_manifest(folder).verify_all()


def test_causal_int8_keeps_the_down_projections_lm_head_and_embeddings_fp32(causal_models):
    import onnx

    from streamfilter.models.graphs import quantize

    m = load_manifest(causal_models.askllm)
    fp32 = onnx.load(str(m.path(m.variants["fp32"]["model"])), load_external_data=False)
    down = quantize.down_projection_nodes(fp32, m.config["vocab_size"])
    assert len(down) == 2 and all("down_proj" in name for name in down)  # one per layer of the tiny Qwen2
    int8 = onnx.load(str(m.path(m.variants["int8"]["model"])), load_external_data=False)
    ops = {n.name: n.op_type for n in int8.graph.node}
    assert all(ops[name] == "MatMul" for name in down + quantize.lm_head_nodes(fp32, m.config["vocab_size"]))
    assert sum(op == "DynamicQuantizeMatMul" for op in ops.values()) == 2 * 6  # q, k, v, o, gate, up per layer
    assert "down projections" in m.variants["int8"]["note"]


def test_perplexity_matches_transformers_loss(perplexity, torch_causal, sample_texts):
    ids = perplexity.token_ids(sample_texts)
    assert all(seq[0] == perplexity.start_token_id for seq in ids)
    ours = perplexity.mean_nll(sample_texts, batch_size=8)
    ref = torch_causal.mean_nll(ids)
    assert ours.dtype == np.float32 and ours.shape == (len(sample_texts),)
    assert np.max(np.abs(ours - ref)) <= 1e-4
    sums, counts = perplexity.nll(sample_texts)
    assert counts.tolist() == [len(s) - 1 for s in ids]
    assert np.allclose(perplexity.perplexity(sample_texts), np.exp(ref), rtol=1e-4)


def test_perplexity_batch_equals_single_and_truncates(perplexity):
    texts = ["Hi.", "word " * 2000, "The cat sat on the mat."]
    batched = perplexity.mean_nll(texts, batch_size=3)
    alone = np.array([perplexity.mean_nll([t])[0] for t in texts])
    assert np.max(np.abs(batched - alone)) <= 1e-5
    assert len(perplexity.token_ids(["word " * 2000])[0]) == perplexity.max_tokens


def test_cli_scores_with_a_causal_model(causal_models, tmp_path):
    import subprocess
    import sys

    docs = "\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(["A fact about Paris.", "buy buy buy"]))
    out = subprocess.run([sys.executable, "-m", "streamfilter", "models", "score", "--askllm", str(causal_models.askllm),
                          "--perplexity", str(causal_models.perplexity), "--variant", "fp32"],
                         input=docs, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["id"] for r in rows] == [0, 1]
    assert all(0 <= r["askllm"] <= 1 and r["askllm_variants"] >= r["askllm"] - 1e-7 and r["perplexity"] > 0 for r in rows)
