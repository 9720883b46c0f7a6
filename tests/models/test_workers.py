"""Inference workers: several batches of one call run at once, one thread each, on the model's one session."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from streamfilter.config import load_config
from streamfilter.errors import ConfigError
from streamfilter.models import AskLLMScorer, SentenceEmbedder
from streamfilter.models import runtime
from streamfilter.models.runtime import thread_layout


@pytest.mark.parametrize("cores, workers, threads, on_gpu, expected", [
    (2, None, None, False, (2, 1)),  # the default on CPU: one single-threaded worker per core
    (16, None, None, False, (16, 1)),
    (16, 4, None, False, (4, 4)),  # given the workers, each run gets its share of the cores
    (16, None, 4, False, (4, 4)),  # given the threads, as many workers as fit
    (2, None, 2, False, (1, 2)),  # the layout before workers existed: one run on every core
    (2, 3, 1, False, (3, 1)),  # both given: as given
    (1, None, None, False, (1, 1)),
    (16, None, None, True, (1, None)),  # a GPU: one worker feeds it; ONNX Runtime's own threads
    (16, 0, 0, False, (16, 1)),  # 0 is "chosen", as in the config
])
def test_thread_layout(monkeypatch, cores, workers, threads, on_gpu, expected):
    monkeypatch.setattr(runtime, "_default_threads", lambda: cores)
    assert thread_layout(workers, threads, on_gpu) == expected


def test_negative_layouts_are_config_errors():
    with pytest.raises(ConfigError, match="inference_workers"):
        thread_layout(-1, None, False)
    with pytest.raises(ConfigError, match="intra_op_threads"):
        thread_layout(None, -2, False)
    for field in ("models.inference_workers", "models.intra_op_threads"):
        with pytest.raises(ConfigError, match=field):
            load_config(env={}, overrides=[f"{field}=-1"])


def test_models_get_the_layout(test_models):
    scorer = AskLLMScorer.load(test_models.askllm, variant="fp32", workers=3)
    assert scorer.workers == 3
    assert scorer.session.session.get_session_options().intra_op_num_threads == max(1, runtime._default_threads() // 3)
    before = AskLLMScorer.load(test_models.askllm, variant="fp32", intra_op_threads=2, workers=1)
    assert before.workers == 1 and before.session.session.get_session_options().intra_op_num_threads == 2
    # runs side by side do not each hold a memory pattern's block for all their activations
    assert not scorer.session.session.get_session_options().enable_mem_pattern
    assert before.session.session.get_session_options().enable_mem_pattern


class Watch:
    """Wraps a model's session.run: which threads ran batches, how many ran at once at most, and
    optionally an error for the batch holding a given token id."""

    def __init__(self, model, fail_on_token: int | None = None, hold_s: float = 0.02):
        self.run, self.fail_on_token, self.hold_s = model.session.run, fail_on_token, hold_s
        self.lock = threading.Lock()
        self.running = self.most = self.finished = 0
        self.threads: set[str] = set()
        model.session.run = self

    def __call__(self, feeds):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
        try:
            time.sleep(self.hold_s)  # long enough for the other worker to start its batch
            if self.fail_on_token is not None and (feeds["input_ids"] == self.fail_on_token).any():
                raise RuntimeError("onnxruntime: a kernel failed")
            return self.run(feeds)
        finally:
            with self.lock:
                self.running -= 1
                self.finished += 1


def test_two_workers_run_batches_at_once_and_score_as_one(test_models, sample_texts):
    one = AskLLMScorer.load(test_models.askllm, variant="fp32", workers=1, intra_op_threads=1)
    two = AskLLMScorer.load(test_models.askllm, variant="fp32", workers=2, intra_op_threads=1)
    watch = Watch(two)
    expected = one.score(sample_texts, batch_size=4)
    got = two.score(sample_texts, batch_size=4)
    np.testing.assert_allclose(got, expected, atol=1e-5)  # row order kept, whatever order batches finish in
    assert watch.most == 2
    assert len(watch.threads) == 2 and all(name.startswith("sf-infer-2w") for name in watch.threads)


def test_a_small_call_is_cut_so_that_every_worker_has_a_batch(test_models, sample_texts):
    emb1 = SentenceEmbedder.load(test_models.minilm, variant="fp32", workers=1, intra_op_threads=1)
    emb2 = SentenceEmbedder.load(test_models.minilm, variant="fp32", workers=2, intra_op_threads=1)
    watch = Watch(emb2)
    texts = sample_texts[:3]
    np.testing.assert_allclose(emb2.embed(texts, batch_size=32), emb1.embed(texts, batch_size=32), atol=1e-5)
    assert watch.finished == 2 and watch.most == 2  # 3 documents: batches of 2 and 1, side by side
    assert emb2.embed(texts[:1], batch_size=32).shape == (1, emb2.dim)  # one document: one batch


def test_an_error_in_one_batch_is_raised_after_the_others_finish(test_models, sample_texts):
    scorer = AskLLMScorer.load(test_models.askllm, variant="fp32", workers=2, intra_op_threads=1)
    poisoned = "Zebra zebra zebra."
    token = scorer.tokenizer.encode("Zebra", add_special_tokens=False).ids[0]
    watch = Watch(scorer)
    scorer.score([*sample_texts, poisoned], batch_size=4)
    batches, watch.finished, watch.fail_on_token = watch.finished, 0, token
    with pytest.raises(RuntimeError, match="a kernel failed"):
        scorer.score([*sample_texts, poisoned], batch_size=4)
    assert watch.running == 0  # nothing still writes into the call's outputs
    assert watch.finished == batches > 2  # every batch ran to its end first
    assert scorer.score(sample_texts[:5], batch_size=4).shape == (5,)  # and the model works on


def test_the_score_stage_loads_its_models_with_the_configured_layout(test_models):
    from streamfilter.stages.score import ScoreTransform

    config = load_config(env={}, overrides=[f"models.askllm={test_models.askllm}", f"models.embedder={test_models.minilm}",
                                            "models.variant=fp32", "models.inference_workers=3"])
    stage = ScoreTransform.from_config(config)
    stage.load()
    assert stage.scorer.workers == stage.embedder.workers == 3


def test_batches_running_at_once_share_the_cpu_token_limit():
    from types import SimpleNamespace

    from streamfilter.models.base import cpu_batch_tokens

    flan_t5_small, sentence_t5_base = SimpleNamespace(config={"d_model": 512}), SimpleNamespace(config={"dim": 768})
    assert [cpu_batch_tokens(flan_t5_small, w) for w in (1, 2, 4, 64)] == [2048, 1024, 512, 256]
    assert [cpu_batch_tokens(sentence_t5_base, w) for w in (1, 2)] == [1280, 512]


class SharedWatch:
    """Wraps the session.run of several models: how many batches ran at once over all of them, and
    whether batches of different models ran at the same time."""

    def __init__(self, *models, hold_s: float = 0.05):
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.most = 0
        self.mixed = False  # batches of two models ran at once
        for model in models:
            self._wrap(model, hold_s)

    def _wrap(self, model, hold_s: float) -> None:
        run, kind = model.session.run, model.KIND

        def watched(feeds):
            with self.lock:
                self.running[kind] = self.running.get(kind, 0) + 1
                self.most = max(self.most, sum(self.running.values()))
                self.mixed |= sum(1 for n in self.running.values() if n) > 1
            try:
                time.sleep(hold_s)
                return run(feeds)
            finally:
                with self.lock:
                    self.running[kind] -= 1

        model.session.run = watched


def test_models_called_side_by_side_share_the_workers_and_give_the_same_results(test_models, sample_texts):
    from streamfilter.models.base import run_side_by_side

    scorer = AskLLMScorer.load(test_models.askllm, variant="fp32", workers=2, intra_op_threads=1)
    embedder = SentenceEmbedder.load(test_models.minilm, variant="fp32", workers=2, intra_op_threads=1)
    expected = scorer.score(sample_texts, batch_size=2), embedder.embed(sample_texts, batch_size=2)
    watch = SharedWatch(scorer, embedder)
    results, seconds = run_side_by_side({"askllm": lambda: scorer.score(sample_texts, batch_size=2),
                                         "embedder": lambda: embedder.embed(sample_texts, batch_size=2)})
    np.testing.assert_allclose(results["askllm"], expected[0], atol=1e-5)
    np.testing.assert_allclose(results["embedder"], expected[1], atol=1e-5)
    assert watch.mixed, "the two models' batches never ran at the same time"
    assert watch.most == 2, f"{watch.most} batches ran at once on two workers"  # one pool for both models
    assert set(seconds) == {"askllm", "embedder"} and all(s > 0 for s in seconds.values())


def test_an_error_in_one_call_is_raised_after_the_others_finish():
    from streamfilter.models.base import run_side_by_side

    finished = threading.Event()

    def slow():
        time.sleep(0.3)
        finished.set()
        return 1

    def broken():
        raise RuntimeError("onnxruntime: a kernel failed")

    with pytest.raises(RuntimeError, match="a kernel failed"):
        run_side_by_side({"broken": broken, "slow": slow})
    assert finished.is_set()  # nothing still runs once the error is raised
    with pytest.raises(RuntimeError, match="a kernel failed"):
        run_side_by_side({"slow": slow, "broken": broken})
    assert run_side_by_side({"one": lambda: 7})[0] == {"one": 7}


def test_the_score_stage_runs_its_models_side_by_side():
    from streamfilter.stages.score import ScoreTransform

    spans: dict[str, tuple[float, float]] = {}

    class Slow:
        def __init__(self, name, result):
            self.name, self.result, self.model_id = name, result, f"{name}@1"

        def _run(self, texts):
            started = time.perf_counter()
            time.sleep(0.3)
            spans[self.name] = (started, time.perf_counter())
            return self.result(len(texts))

        score = embed = lambda self, texts, batch_size=32: self._run(texts)

    stage = ScoreTransform.from_config(load_config(env={}, overrides=[]),
                                       scorer=Slow("askllm", lambda n: np.full(n, 0.5, dtype=np.float32)),
                                       embedder=Slow("embedder", lambda n: np.ones((n, 4), dtype=np.float32)))
    scores, embeddings, _ = stage._infer(["a text", "another text"])
    assert scores.shape == (2,) and embeddings.shape == (2, 4)
    (a0, a1), (e0, e1) = spans["askllm"], spans["embedder"]
    assert a0 < e1 and e0 < a1, f"the models ran one after the other: {spans}"


def test_a_one_batch_call_beside_another_takes_a_worker_too(test_models, sample_texts):
    """A call that makes one inference batch runs it on the shared workers as well, so that beside
    another model's call no more batches run at once than there are workers."""
    from streamfilter.models.base import run_side_by_side

    scorer = AskLLMScorer.load(test_models.askllm, variant="fp32", workers=2, intra_op_threads=1)
    embedder = SentenceEmbedder.load(test_models.minilm, variant="fp32", workers=2, intra_op_threads=1)
    watch = SharedWatch(scorer, embedder, hold_s=0.2)
    run_side_by_side({"askllm": lambda: scorer.score(sample_texts, batch_size=2),
                      "embedder": lambda: embedder.embed(sample_texts[:1], batch_size=2)})
    assert watch.most <= 2, f"{watch.most} batches ran at once on two workers"
