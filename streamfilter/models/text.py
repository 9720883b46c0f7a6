"""Text to token ids, bounded: a 10 MB document costs no more than a 10 kB one.

Only a prefix of the characters is tokenized, cut at whitespace so that the words kept
tokenize exactly as they would inside the whole text (the T5 and BERT pre-tokenizers
split on whitespace first). The window grows geometrically if the prefix yields too few
tokens (whitespace-heavy text), so the cost stays proportional to what is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from tokenizers import Tokenizer

from streamfilter.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

# Characters per token to try first: English averages ~4.5 for T5 and BERT vocabularies.
FIRST_WINDOW_CHARS_PER_TOKEN = 8
GROWTH = 4


def clean_text(text: str) -> str:
    """`text` as valid Unicode: lone surrogates (from lenient JSON decoding) become U+FFFD.

    Paired surrogates are joined into the character they encode. Cheap when nothing needs fixing.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def prefix_window(text: str, n_chars: int) -> str:
    """The first ~`n_chars` characters of `text`, cut after a whitespace character when there is one."""
    if len(text) <= n_chars:
        return text
    head = text[:n_chars]
    # Look back a little for whitespace; a single huge "word" is simply cut.
    for i in range(len(head) - 1, max(-1, len(head) - 200), -1):
        if head[i].isspace():
            return head[: i + 1]
    return head


def load_tokenizer(path: str) -> Tokenizer:
    """A `tokenizers` tokenizer from a tokenizer.json, with its own padding and truncation disabled."""
    try:
        tok = Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise UserError(f"{path}: not a valid tokenizer.json ({exc})") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def special_wrap(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The special-token ids the tokenizer's post-processor puts before and after a single text.

    E.g. BERT: ([CLS], [SEP]); T5: ([], [</s>]). Found by encoding a probe word both ways.
    """
    probe = "hello"
    bare = tokenizer.encode(probe, add_special_tokens=False).ids
    full = tokenizer.encode(probe, add_special_tokens=True).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise UserError("tokenizer: cannot locate the text inside its post-processed encoding")


def encode_bounded(tokenizer: Tokenizer, texts: Sequence[str], budget: int) -> list[list[int]]:
    """Token ids of each text without special tokens, the first `budget` of them.

    Tokenizes only a bounded prefix of each text (see the module docstring).
    """
    window = max(64, budget * FIRST_WINDOW_CHARS_PER_TOKEN)
    cleaned = [clean_text(t) for t in texts]
    ids: list[list[int]] = [[] for _ in cleaned]
    pending = list(range(len(cleaned)))
    while pending:
        pieces = [prefix_window(cleaned[i], window) for i in pending]
        encodings = tokenizer.encode_batch(pieces, add_special_tokens=False)
        retry = []
        for i, piece, enc in zip(pending, pieces, encodings):
            tokens = enc.ids
            if len(tokens) < budget and len(piece) < len(cleaned[i]):
                retry.append(i)  # too few tokens in the window and more text left: widen it
            else:
                ids[i] = tokens[:budget]
        pending = retry
        window *= GROWTH
    return ids


PAD_MULTIPLE = 8  # a batch's length is rounded up to this


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, multiple: int = PAD_MULTIPLE) -> tuple[np.ndarray, np.ndarray]:
    """int64 input_ids and attention_mask [batch, length], right-padded to a multiple of `multiple`."""
    import numpy as np

    longest = max(len(s) for s in seqs)
    length = -(-longest // multiple) * multiple
    input_ids = np.full((len(seqs), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=np.int64)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return input_ids, mask


# What one more inference batch costs, in padded tokens (a session run's fixed work, the decoder
# step): splitting a batch must save more padding than this.
BATCH_OVERHEAD_TOKENS = 256


def length_buckets(lengths: Sequence[int], batch_size: int, max_tokens: int = 0,
                   overhead_tokens: int = BATCH_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices grouped into batches of at most `batch_size` documents and, when `max_tokens` > 0, at
    most `max_tokens` padded tokens (documents times the longest, rounded up to `PAD_MULTIPLE` as
    `pad_batch` pads it; a document longer than that is a batch alone), sorted by length, with the cuts between batches placed where they minimise the
    padded tokens (each batch costs its size times its longest sequence, plus `overhead_tokens`).

    Fixed cuts every `batch_size` documents make the batch that straddles a jump in length pad
    everything to the long end: on a web-like mix of short and 512-token documents that was
    ~30% more tokens than the documents hold when called on 128 documents at a time (a score
    micro-batch), ~5% on 800 (bench/RESULTS.md, "Throughput and latency"). An exact dynamic
    programme over the sorted lengths, O(n * batch_size). The token limit is the CPU's: 32
    long documents cost 20-50% more per token than batches of ~1-2k tokens (bench/RESULTS.md,
    "Inference batches capped by tokens").
    """
    import numpy as np

    if max_tokens < 0:
        raise UserError(f"max_tokens: must be >= 0 (0: no limit), got {max_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    order = np.argsort(lengths, kind="stable")
    n = len(order)
    if n <= 1 or batch_size <= 1:
        return [order[i : i + max(1, batch_size)].tolist() for i in range(0, n, max(1, batch_size))]
    sorted_len = lengths[order]
    best = np.zeros(n + 1)  # best[j]: the least cost of batching the j shortest
    cut = np.zeros(n + 1, dtype=np.int64)  # where the last batch of that solution starts
    for j in range(1, n + 1):
        padded = -(-max(1, int(sorted_len[j - 1])) // PAD_MULTIPLE) * PAD_MULTIPLE
        most = batch_size if max_tokens <= 0 else min(batch_size, max(1, max_tokens // padded))
        starts = np.arange(max(0, j - most), j)
        cost = best[starts] + (j - starts) * sorted_len[j - 1] + overhead_tokens
        k = int(np.argmin(cost))  # the first minimum: the largest last batch among equals
        best[j], cut[j] = cost[k], starts[k]
    bounds = []
    j = n
    while j > 0:
        bounds.append((int(cut[j]), j))
        j = int(cut[j])
    return [order[i:j].tolist() for i, j in reversed(bounds)]
