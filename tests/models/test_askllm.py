"""Ask-LLM on ONNX Runtime against the PyTorch reference, on the offline tiny Flan-T5."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.stats import kendalltau

from streamfilter.corpus import wiki_documents
from streamfilter.errors import ConfigError
from streamfilter.models import AskLLMScorer
from streamfilter.models.askllm import PROMPT_PREFIX, PROMPT_SUFFIX, make_prompt


def test_scores_match_pytorch_reference(askllm, torch_askllm, sample_texts):
    ours_p, ours_log = askllm.score_with_log(sample_texts, batch_size=8)
    ref_log = torch_askllm.log_p_yes([make_prompt(t) for t in sample_texts], batch_size=8)
    assert ours_p.dtype == np.float32 and ours_p.shape == (len(sample_texts),)
    assert np.max(np.abs(ours_p - np.exp(ref_log))) <= 1e-4
    assert np.max(np.abs(ours_log - ref_log)) <= 1e-4
    # The tiny model is calibrated so that this parity is not vacuous: scores are spread out.
    assert ours_p.min() < 0.2 and ours_p.max() > 0.5


def test_prompt_tokens_equal_tokenizing_the_whole_prompt(askllm, torch_askllm, sample_texts):
    ours = askllm.prompt_ids(sample_texts)
    theirs = [torch_askllm.tokenizer(make_prompt(t))["input_ids"] for t in sample_texts]
    assert ours == theirs


def test_padded_batch_of_very_different_lengths_equals_one_by_one(askllm):
    texts = ["Hi.", wiki_documents()[5].text * 4, "A cat.", wiki_documents()[9].text, "word " * 300]
    batched = askllm.log_score(texts, batch_size=len(texts))
    # Force one batch with heavy padding too (bucketing would otherwise sort them apart).
    ids = askllm.prompt_ids(texts)
    from streamfilter.models.text import pad_batch

    input_ids, mask = pad_batch(ids, askllm.pad_token_id)
    (padded,) = askllm.session.run({"input_ids": input_ids, "attention_mask": mask})
    alone = np.array([askllm.log_score([t])[0] for t in texts])
    assert np.max(np.abs(batched - alone)) <= 1e-5
    assert np.max(np.abs(padded[:, 0] - alone)) <= 1e-5
    assert input_ids.shape[1] == 512  # the long ones were truncated to the full budget


def test_truncation_keeps_the_whole_question_for_a_100k_character_document(askllm):
    doc = " ".join(f"word{i}" for i in range(20_000))[:100_000]
    (ids,) = askllm.prompt_ids([doc])
    tok = askllm.tokenizer
    prefix = tok.encode(PROMPT_PREFIX, add_special_tokens=False).ids
    suffix = tok.encode(PROMPT_SUFFIX, add_special_tokens=False).ids
    assert len(ids) == askllm.max_tokens == 512
    assert ids[: len(prefix)] == prefix
    assert ids[-len(suffix) - 1 : -1] == suffix and ids[-1] == 1  # ...OPTIONS: - yes - no </s>
    assert "OPTIONS" in tok.decode(ids) and tok.decode(ids).rstrip().endswith("- yes - no")
    doc_ids = tok.encode(doc, add_special_tokens=False).ids
    assert ids[len(prefix) : -len(suffix) - 1] == doc_ids[: askllm.document_budget]


def test_a_10_megabyte_document_is_truncated_cheaply(askllm):
    big = ("All work and no play makes Jack a dull boy. " * 250_000)[:10_000_000]
    t0 = time.perf_counter()
    (ids,) = askllm.prompt_ids([big])
    assert time.perf_counter() - t0 < 0.5
    assert len(ids) == 512
    # A 10 MB run without whitespace, and 10 MB of whitespace, are defined too.
    for odd in ("x" * 10_000_000, " " * 5_000_000 + "end"):
        (p,) = askllm.score([odd])
        assert 0.0 <= p <= 1.0


@pytest.mark.parametrize("text", ["", "   \n\t ", "\ud800 lone surrogate \udfff", "emoji as a pair \ud83d\ude00",
                                  "\x00\x01 control", "ünïcödé ✓ 中文 עברית"])
def test_odd_text_gets_a_defined_score(askllm, text):
    (p,) = askllm.score([text])
    assert np.isfinite(p) and 0.0 <= p <= 1.0


def test_lone_surrogates_score_like_the_replacement_character(askllm):
    assert askllm.score(["bad \ud800 text"])[0] == askllm.score(["bad \ufffd text"])[0]
    assert askllm.score(["pair \ud83d\ude00"])[0] == askllm.score(["pair \U0001F600"])[0]


def test_empty_input_and_order(askllm, sample_texts):
    assert askllm.score([]).shape == (0,)
    forward = askllm.score(sample_texts, batch_size=3)
    backward = askllm.score(sample_texts[::-1], batch_size=5)[::-1]
    np.testing.assert_allclose(forward, backward, atol=1e-6)


def test_model_id_names_the_model_and_its_file(askllm, askllm_int8):
    assert askllm.model_id.startswith("askllm-tiny@") and len(askllm.model_id.split("@")[1]) == 12
    assert askllm.model_id != askllm_int8.model_id
    assert askllm.provider == "CPUExecutionProvider"


def test_int8_ranks_like_fp32_on_500_wikipedia_summaries(askllm, askllm_int8, record_property):
    texts = [d.text for d in wiki_documents()[:500]]
    fp32 = askllm.score(texts, batch_size=32)
    int8 = askllm_int8.score(texts, batch_size=32)
    tau = kendalltau(fp32, int8).statistic
    record_property("askllm_int8_kendall_tau", round(float(tau), 4))
    print(f"Ask-LLM int8 vs fp32 Kendall tau on 500 Wikipedia summaries (tiny random model): {tau:.4f}, "
          f"max |dP| {np.max(np.abs(fp32 - int8)):.4f}")
    assert tau > 0.8


def test_fp16_variant_with_fp32_feed_forward_matches_fp32(test_models, askllm, sample_texts):
    # Runs on CPU here; the GPU measurement is bench/gpu's.
    fp16 = AskLLMScorer.load(test_models.askllm, variant="fp16")
    assert np.max(np.abs(fp16.score(sample_texts) - askllm.score(sample_texts))) <= 5e-3


def test_max_tokens_must_leave_room_for_the_document(test_models):
    with pytest.raises(ConfigError, match="max_tokens"):
        AskLLMScorer.load(test_models.askllm, max_tokens=40, variant="fp32")
    short = AskLLMScorer.load(test_models.askllm, max_tokens=128, variant="fp32")
    (ids,) = short.prompt_ids(["word " * 1000])
    assert len(ids) == 128


def test_default_variant_on_cpu_is_int8(test_models):
    assert AskLLMScorer.load(test_models.askllm).variant == "int8"
