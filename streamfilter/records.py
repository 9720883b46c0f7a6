"""The record codec: raw crawl documents in, scored records between the passes, headers out.

Pure and Kafka-free. A raw value is a msgpack map or a JSON object with `text` and `id`
(or `url`, from which the id is derived), and optionally `url`, `fetched_at`, `lang`,
`meta`. Anything else becomes an `InvalidDocument` with a stable reason code, which the
daemon sends to the DLQ with the original bytes.

A scored record (topic `crawl.scored`) is a msgpack map carrying the document, its
Ask-LLM score, its embedding as little-endian float16 bytes, the model ids and the source
coordinates, so that re-routing never runs a model again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from streamfilter.errors import InvalidDocument

SCORED_VERSION = 1
OPTIONAL_FIELDS = ("url", "fetched_at", "lang", "meta")

# DLQ reason codes (stable: they are header values and metric labels).
REASONS = (
    "empty_value", "too_large", "undecodable", "invalid_utf8", "not_a_map", "missing_text", "bad_type",
    "empty_text", "missing_id", "bad_scored_record",
)


@dataclass(frozen=True)
class Document:
    """A validated crawl document."""

    id: str
    text: str
    url: str | None = None
    fetched_at: Any = None
    lang: str | None = None
    meta: dict | None = None

    def to_map(self) -> dict:
        out = {"id": self.id, "text": self.text}
        for name in OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True)
class ScoredRecord:
    document: Document
    askllm: float
    embedding: np.ndarray  # [dim] float16
    askllm_model: str
    embedder_model: str
    source: tuple[str, int, int]  # topic, partition, offset of the raw record
    extra: dict = field(default_factory=dict)
    # The paper's perplexity baseline (models.perplexity): mean per-token NLL in nats. Optional:
    # absent from the encoding when None, so records without it read as before.
    perplexity: float | None = None
    perplexity_model: str | None = None


def decode_raw(value: bytes | None, max_doc_bytes: int) -> Document:
    """Validate one raw Kafka value; raise `InvalidDocument` with a reason code."""
    if value is None or len(value) == 0:
        raise InvalidDocument("empty_value", "the record has no value")
    if len(value) > max_doc_bytes:
        raise InvalidDocument("too_large", f"{len(value)} bytes > max_doc_bytes {max_doc_bytes}")
    obj = _unpack(value)
    if not isinstance(obj, dict):
        raise InvalidDocument("not_a_map", f"expected a map/object, got {type(obj).__name__}")
    return document_from_map(obj)


def _unpack(value: bytes) -> Any:
    try:
        return msgpack.unpackb(value, raw=False, strict_map_key=False)
    except UnicodeDecodeError as exc:
        raise InvalidDocument("invalid_utf8", f"msgpack string is not UTF-8: {exc.reason}") from None
    except Exception:  # noqa: BLE001 - msgpack raises many types; not msgpack: try JSON below
        pass
    if value.lstrip()[:1] not in (b"{", b"["):
        raise InvalidDocument("undecodable", "neither msgpack nor JSON")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidDocument("invalid_utf8", f"JSON is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidDocument("undecodable", f"invalid JSON: {exc}") from None


def document_from_map(obj: dict) -> Document:
    text = obj.get("text")
    if text is None:
        raise InvalidDocument("missing_text", "no 'text' field")
    if not isinstance(text, str):
        raise InvalidDocument("bad_type", f"'text' must be a string, got {type(text).__name__}")
    _check_unicode(text, "text")
    if not text.strip():
        raise InvalidDocument("empty_text", "'text' is empty or whitespace")
    url = obj.get("url")
    if url is not None and not isinstance(url, str):
        raise InvalidDocument("bad_type", f"'url' must be a string, got {type(url).__name__}")
    doc_id = obj.get("id")
    if doc_id is None:
        if not url:
            raise InvalidDocument("missing_id", "neither 'id' nor 'url'")
        doc_id = url
    elif isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise InvalidDocument("bad_type", f"'id' must be a string or integer, got {type(doc_id).__name__}")
    doc_id = str(doc_id)
    if not doc_id:
        raise InvalidDocument("missing_id", "'id' is empty")
    _check_unicode(doc_id, "id")
    lang = obj.get("lang")
    if lang is not None and not isinstance(lang, str):
        raise InvalidDocument("bad_type", f"'lang' must be a string, got {type(lang).__name__}")
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise InvalidDocument("bad_type", f"'meta' must be a map, got {type(meta).__name__}")
    fetched_at = obj.get("fetched_at")
    if fetched_at is not None and (isinstance(fetched_at, bool) or not isinstance(fetched_at, (str, int, float))):
        raise InvalidDocument("bad_type", f"'fetched_at' must be a string or number, got {type(fetched_at).__name__}")
    return Document(id=doc_id, text=text, url=url, fetched_at=fetched_at, lang=lang, meta=meta)


def _check_unicode(value: str, name: str) -> None:
    # JSON escapes can smuggle lone surrogates ("\ud800") into a str: not encodable text.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidDocument("invalid_utf8", f"'{name}' holds a lone surrogate at {exc.start}") from None


def encode_scored(record: ScoredRecord) -> bytes:
    embedding = np.ascontiguousarray(record.embedding, dtype="<f2")
    return msgpack.packb({
        "v": SCORED_VERSION,
        "doc": record.document.to_map(),
        "askllm": float(record.askllm),
        "askllm_model": record.askllm_model,
        "embedding": embedding.tobytes(),
        "embedder_model": record.embedder_model,
        "source": list(record.source),
        **({"extra": record.extra} if record.extra else {}),
        **({"perplexity": float(record.perplexity), "perplexity_model": record.perplexity_model}
           if record.perplexity is not None else {}),
    }, use_bin_type=True)


def decode_scored(value: bytes | None) -> ScoredRecord:
    """Decode a scored record; raise `InvalidDocument("bad_scored_record")` on anything unexpected."""
    try:
        obj = msgpack.unpackb(value, raw=False, strict_map_key=False)
        if obj.get("v") != SCORED_VERSION:
            raise ValueError(f"unknown scored record version {obj.get('v')!r}")
        embedding = np.frombuffer(obj["embedding"], dtype="<f2")
        topic, partition, offset = obj["source"]
        return ScoredRecord(
            document=document_from_map(obj["doc"]), askllm=float(obj["askllm"]), embedding=embedding,
            askllm_model=str(obj["askllm_model"]), embedder_model=str(obj["embedder_model"]),
            source=(str(topic), int(partition), int(offset)), extra=obj.get("extra") or {},
            perplexity=float(obj["perplexity"]) if obj.get("perplexity") is not None else None,
            perplexity_model=str(obj["perplexity_model"]) if obj.get("perplexity_model") is not None else None,
        )
    except InvalidDocument as exc:
        raise InvalidDocument("bad_scored_record", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any malformation is data, not a bug
        raise InvalidDocument("bad_scored_record", f"{type(exc).__name__}: {exc}") from None


def encode_document(document: Document) -> bytes:
    """The value written to the accepted/rejected topics: the document as a msgpack map."""
    return msgpack.packb(document.to_map(), use_bin_type=True)


def stack_embeddings(records: list[ScoredRecord]) -> np.ndarray:
    """[n, dim] float32 from the records' float16 embeddings (one allocation)."""
    if not records:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([r.embedding for r in records]).astype(np.float32)


def dlq_headers(exc: InvalidDocument, stage: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        ("sf-dlq-reason", exc.reason.encode()),
        ("sf-dlq-error", type(exc).__name__.encode()),
        ("sf-dlq-detail", exc.detail.encode("utf-8", "replace")[:1000]),
        ("sf-stage", stage.encode()),
        ("sf-source-topic", topic.encode()),
        ("sf-source-partition", str(partition).encode()),
        ("sf-source-offset", str(offset).encode()),
    ]
