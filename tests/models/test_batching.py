"""Inference batches: cut by length, at most `batch_size` documents and `batch_tokens` padded tokens."""

from __future__ import annotations

import numpy as np
import pytest

from streamfilter.corpus import wiki_documents
from streamfilter.errors import ConfigError, UserError
from streamfilter.models.text import length_buckets


def padded_tokens(batch: list[int], lengths: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_tokens", [0, 1, 300, 2048])
def test_buckets_cover_every_document_once_within_both_limits(seed, max_tokens):
    rng = np.random.default_rng(seed)
    lengths = rng.choice([3, 17, 60, 128, 256, 512], size=200).tolist()
    batches = length_buckets(lengths, 32, max_tokens)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 32 for b in batches)
    if max_tokens:  # a document longer than the limit is a batch alone; every other batch fits
        assert all(len(b) == 1 or padded_tokens(b, lengths) <= max_tokens for b in batches)


def test_no_token_limit_batches_as_before():
    """0 is no limit: 40 documents of 512 tokens make two batches, not 40."""
    assert len(length_buckets([512] * 40, 32)) == 2
    assert len(length_buckets([512] * 40, 32, 2048)) == 10
    assert len(length_buckets([10] * 40, 32, 2048)) == 2  # short documents: batch_size is the limit


def test_a_token_limit_is_not_negative():
    with pytest.raises(UserError, match="max_tokens"):
        length_buckets([1, 2], 4, -1)


def spy_on_batches(model) -> list[tuple[int, int]]:
    """Record the [batch, length] of every input the model's session runs."""
    shapes: list[tuple[int, int]] = []
    run = model.session.run

    def recording(feeds):
        shapes.append(feeds["input_ids"].shape)
        return run(feeds)

    model.session.run = recording
    return shapes


def test_cpu_models_cap_batch_tokens_and_score_the_same(test_models, sample_texts):
    from streamfilter.models import AskLLMScorer
    from streamfilter.models.base import cpu_batch_tokens

    capped = AskLLMScorer.load(test_models.askllm, variant="fp32")
    uncapped = AskLLMScorer.load(test_models.askllm, variant="fp32", batch_tokens=0)
    assert capped.batch_tokens == cpu_batch_tokens(capped.manifest, capped.workers) > 0 and uncapped.batch_tokens == 0
    small = AskLLMScorer.load(test_models.askllm, variant="fp32", batch_tokens=600)
    texts = sample_texts + [wiki_documents()[7].text * 6] * 4  # four 512-token prompts
    shapes, wide = spy_on_batches(small), spy_on_batches(uncapped)
    ours, theirs = small.log_score(texts, batch_size=32), uncapped.log_score(texts, batch_size=32)
    assert all(b * n <= 600 or b == 1 for b, n in shapes)
    assert max(b * n for b, n in wide) > 600  # without the cap the same call makes larger batches
    assert len(shapes) > len(wide)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_embedder_takes_the_token_limit_too(test_models):
    from streamfilter.models import load_model

    emb = load_model(test_models.minilm, kind="embedder", variant="fp32", batch_tokens=64)
    shapes = spy_on_batches(emb)
    texts = [d.text for d in wiki_documents()[:12]]
    vectors = emb.embed(texts, batch_size=32)
    assert all(b * n <= 64 or b == 1 for b, n in shapes)
    alone = np.concatenate([emb.embed([t]) for t in texts])
    np.testing.assert_allclose(vectors, alone, atol=1e-5)


def test_a_negative_token_limit_fails_at_load(test_models):
    from streamfilter.models import AskLLMScorer

    with pytest.raises(ConfigError, match="batch_tokens"):
        AskLLMScorer.load(test_models.askllm, variant="fp32", batch_tokens=-5)


@pytest.mark.parametrize("setting, expected", [(0, None), (700, 700)])
def test_the_score_stage_loads_its_models_with_the_configured_limit(test_models, setting, expected):
    from streamfilter.config import load_config
    from streamfilter.models.base import cpu_batch_tokens
    from streamfilter.stages import ScoreTransform

    config = load_config(env={}, overrides=[f"models.askllm={test_models.askllm}", f"models.embedder={test_models.minilm}",
                                            "models.variant=fp32", f"models.inference_batch_tokens={setting}"])
    stage = ScoreTransform.from_config(config)
    stage.load()
    for model in (stage.scorer, stage.embedder):
        assert model.batch_tokens == (expected or cpu_batch_tokens(model.manifest, model.workers))


def test_the_token_limit_counts_the_padding_to_a_multiple_of_eight():
    """Five documents of 409 tokens are 2045 tokens, but 5 x 416 = 2080 once padded: over 2048."""
    from streamfilter.models.text import pad_batch

    lengths = [409] * 5
    for batch in length_buckets(lengths, 32, 2048):
        input_ids, _ = pad_batch([[1] * lengths[i] for i in batch], 0)
        assert input_ids.size <= 2048
