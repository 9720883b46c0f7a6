"""The record codec: raw crawl documents in, scored records between the passes, headers out.

Pure and Kafka-free. A raw value is a msgpack map or a JSON object with `text` and `id`
(or `url`, from which the id is derived), and optionally `url`, `fetched_at`, `lang`,
`meta`. The whole map is validated here, so that a document that passes can always be
encoded again (`encode_scored`, `encode_document`): the unit of failure is one record, never
the batch. Anything else becomes an `InvalidDocument` with a stable reason code, which the
daemon sends to the DLQ with the original bytes (capped by `dlq_value`).

A scored record (topic `crawl.scored`) is a msgpack map carrying the document, its
Ask-LLM score, its embedding as little-endian float16 bytes, the model ids and the source
coordinates, so that re-routing never runs a model again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
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
    "bad_value",         # a value of the right type out of range: huge int, NaN/inf, meta nested too deep
    "model_error",       # a model, tokenizer or scorer raised on this document
    "unencodable",       # the output record for this document could not be encoded
    "output_too_large",  # the output record exceeds what the producer/topic accept
    "stage_error",       # any other per-record failure, isolated by splitting the batch
)

# What msgpack (and so every output record) can carry; `fetched_at` integers must fit int64.
MSGPACK_INT_MIN, MSGPACK_INT_MAX = -2**63, 2**64 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
# `meta` itself is level 1; each map or list inside it one more.
MAX_META_DEPTH = 32


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


class _ExtValue(Exception):
    """Raised by the msgpack ext hook: ext values never reach a document."""


def _reject_ext(code: int, data: bytes) -> Any:
    raise _ExtValue(code)


def _unpackb(value: bytes) -> Any:
    # Ext types raise `_ExtValue`; timestamps (ext -1) bypass ext_hook and come back as
    # msgpack.Timestamp, which `document_from_map` rejects as bad_type in every field it reads.
    return msgpack.unpackb(value, raw=False, strict_map_key=False, ext_hook=_reject_ext)


def _unpack(value: bytes) -> Any:
    try:
        return _unpackb(value)
    except UnicodeDecodeError as exc:
        raise InvalidDocument("invalid_utf8", f"msgpack string is not UTF-8: {exc.reason}") from None
    except _ExtValue as exc:
        raise InvalidDocument("bad_type", f"msgpack ext type {exc.args[0]} is not supported") from None
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
    """Validate a decoded map (raw input or a scored record's `doc`) into a `Document`.

    Every field read is checked, so the document can always be encoded again:
    - `text` (non-blank), `url`, `lang`: strings; `id`: a string or an integer (or taken
      from `url`); `fetched_at`: a string, an int64 integer or a finite float; else bad_type,
      or bad_value for an out-of-range number (int beyond int64, NaN, inf).
    - every string, including meta's keys and nested values, must be encodable UTF-8 (no lone
      surrogates, which JSON escapes can carry): invalid_utf8.
    - `meta`: a map whose keys (at every level) are strings and whose values are None, bool,
      int (-2**63 .. 2**64-1, what msgpack packs), finite float, str, bytes, lists and maps,
      nested at most MAX_META_DEPTH levels (meta itself is level 1). A non-string key or any
      other type (msgpack Timestamp or ext, set, tuple, ...) is bad_type; an int out of range,
      a NaN or infinite float (msgpack would pack it, JSON output would not, and it breaks
      equality) or deeper nesting is bad_value.
    Unknown top-level fields are ignored: not validated, not kept, never re-encoded.
    """
    text = obj.get("text")
    if text is None:
        raise InvalidDocument("missing_text", "no 'text' field")
    if not isinstance(text, str):
        raise InvalidDocument("bad_type", f"'text' must be a string, got {type(text).__name__}")
    _check_unicode(text, "text")
    if not text.strip():
        raise InvalidDocument("empty_text", "'text' is empty or whitespace")
    url = _optional_string(obj, "url")
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
    lang = _optional_string(obj, "lang")
    meta = obj.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise InvalidDocument("bad_type", f"'meta' must be a map, got {type(meta).__name__}")
        if meta:
            try:
                _check_tree(meta, 1)
            except _BadValue as exc:
                where = "meta" + "".join(f"[{key!r:.40}]" for key in reversed(exc.path))
                raise InvalidDocument(exc.reason, f"'{where}' {exc.detail}") from None
    fetched_at = obj.get("fetched_at")
    if fetched_at is not None:
        if isinstance(fetched_at, str):
            _check_unicode(fetched_at, "fetched_at")
        elif isinstance(fetched_at, bool) or not isinstance(fetched_at, (int, float)):
            raise InvalidDocument("bad_type",
                                  f"'fetched_at' must be a string or number, got {type(fetched_at).__name__}")
        elif isinstance(fetched_at, int):
            if not INT64_MIN <= fetched_at <= INT64_MAX:
                raise InvalidDocument("bad_value", "'fetched_at' integer does not fit int64")
        elif not math.isfinite(fetched_at):
            raise InvalidDocument("bad_value", f"'fetched_at' must be finite, got {fetched_at!r}")
    return Document(id=doc_id, text=text, url=url, fetched_at=fetched_at, lang=lang, meta=meta)


def _optional_string(obj: dict, name: str) -> str | None:
    """The field `name` if present: a string (bad_type otherwise) of valid Unicode."""
    value = obj.get(name)
    if value is not None:
        if not isinstance(value, str):
            raise InvalidDocument("bad_type", f"'{name}' must be a string, got {type(value).__name__}")
        _check_unicode(value, name)
    return value


def _check_unicode(value: str, name: str) -> None:
    # JSON escapes can smuggle lone surrogates ("\ud800") into a str: not encodable text.
    if value.isascii():  # O(1) in CPython: a flag of the string
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidDocument("invalid_utf8", f"'{name}' holds a lone surrogate at {exc.start}") from None


class _BadValue(Exception):
    """A bad value inside meta; `path` collects the keys/indexes innermost first on the way out."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.path: list = []


def _check_str(value: str) -> None:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _BadValue("invalid_utf8", f"holds a lone surrogate at {exc.start}") from None


def _check_tree(value: Any, depth: int) -> None:
    """Raise `_BadValue` unless msgpack and JSON (but for bytes) can encode `value` as is."""
    if value is None or isinstance(value, (bool, bytes)):
        return
    if isinstance(value, str):
        _check_str(value)
    elif isinstance(value, int):
        if not MSGPACK_INT_MIN <= value <= MSGPACK_INT_MAX:
            raise _BadValue("bad_value", "integer does not fit msgpack (-2**63 .. 2**64-1)")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _BadValue("bad_value", f"must be a finite float, got {value!r}")
    elif isinstance(value, (dict, list)):
        if depth > MAX_META_DEPTH:
            raise _BadValue("bad_value", f"nested deeper than {MAX_META_DEPTH} levels")
        key: Any = None
        try:
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise _BadValue("bad_type", f"keys must be strings, got {type(key).__name__}")
                    if not key.isascii():
                        _check_str(key)
                    if type(item) is not str or not item.isascii():  # fast path: ASCII string values
                        _check_tree(item, depth + 1)
            else:
                for key, item in enumerate(value):
                    _check_tree(item, depth + 1)
        except _BadValue as exc:
            exc.path.append(key)
            raise
    else:
        raise _BadValue("bad_type", f"unsupported type {type(value).__name__}")


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
        obj = _unpackb(value)
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


def dlq_headers(exc: InvalidDocument, stage: str, topic: str, partition: int, offset: int,
                error: str | None = None) -> list[tuple[str, bytes]]:
    """The DLQ entry's headers; `error` names the exception behind `exc` (default: `exc`'s own type)."""
    return [
        ("sf-dlq-reason", exc.reason.encode()),
        ("sf-dlq-error", (error or type(exc).__name__).encode()),
        ("sf-dlq-detail", exc.detail.encode("utf-8", "replace")[:1000]),
        ("sf-stage", stage.encode()),
        ("sf-source-topic", topic.encode()),
        ("sf-source-partition", str(partition).encode()),
        ("sf-source-offset", str(offset).encode()),
    ]


def dlq_value(value: bytes | None, cap_bytes: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value a DLQ entry carries for an original raw value, and extra headers.

    Up to cap_bytes: the original bytes unchanged and no extra headers. Larger: the first cap_bytes
    bytes plus headers ("sf-dlq-truncated", b"1"), ("sf-dlq-original-bytes", b"<size>"),
    ("sf-dlq-original-sha256", b"<hex sha256 of the whole original>"). None -> b"".
    """
    if value is None:
        return b"", []
    cap = max(0, cap_bytes)
    if len(value) <= cap:
        return bytes(value), []
    return bytes(value[:cap]), [
        ("sf-dlq-truncated", b"1"),
        ("sf-dlq-original-bytes", str(len(value)).encode()),
        ("sf-dlq-original-sha256", hashlib.sha256(value).hexdigest().encode()),
    ]


# -- output records: what accepted, rejected and DLQ records carry (README, "Output records") ---------

OUTPUT_FORMATS = ("msgpack", "json")
OUTPUT_SCHEMA_VERSION = 1  # the "schema_version" of JSON output values; bumped on an incompatible change
RESERVED_HEADER_PREFIX = "sf-"  # streamfilter's own headers: never carried over from the input


@dataclass(frozen=True)
class Provenance:
    """Which run decided a record: the policy and its parameters, and the job (`live` or a replay's id)."""

    policy: str
    keep_rate: float
    quality_keep: float | None
    seed: int
    job: str = "live"

    def headers(self) -> list[tuple[str, bytes]]:
        out = [("sf-keep-rate", repr(self.keep_rate).encode()), ("sf-policy-seed", str(self.seed).encode()),
               ("sf-job", self.job.encode())]
        if self.quality_keep is not None:
            out.append(("sf-quality-keep", repr(self.quality_keep).encode()))
        return out

    def to_map(self) -> dict:
        return {"name": self.policy, "keep_rate": self.keep_rate, "quality_keep": self.quality_keep,
                "seed": self.seed}


def carried_headers(headers, allow: str) -> list[tuple[str, bytes]]:
    """The input headers passed on to outputs: all (`allow = "*"`), none (`""`) or the named ones
    (comma-separated); streamfilter's own `sf-*` headers are never carried (they would read as ours)."""
    if not headers or not allow.strip():
        return []
    names = None if allow.strip() == "*" else {n.strip() for n in allow.split(",") if n.strip()}
    return [(k, v if isinstance(v, bytes) else b"" if v is None else bytes(v)) for k, v in headers
            if not k.startswith(RESERVED_HEADER_PREFIX) and (names is None or k in names)]


def json_safe(value: Any) -> Any:
    """A document value as JSON can carry it: bytes become {"$base64": ...} (msgpack input may hold bin)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def decision_json(scored: "ScoredRecord", decision, provenance: Provenance) -> bytes:
    """An accepted/rejected record's value in the `json` output format: one UTF-8 JSON object."""
    topic, partition, offset = scored.source
    obj = {
        "schema_version": OUTPUT_SCHEMA_VERSION,
        "kind": "decision",
        **json_safe(scored.document.to_map()),
        "decision": "accept" if decision.keep else "reject",
        "scores": {"askllm": _finite_or_none(decision.askllm), "density": _finite_or_none(decision.density),
                   "probability": _finite_or_none(decision.probability),
                   "perplexity": _finite_or_none(scored.perplexity)},
        "policy": provenance.to_map(),
        "snapshot": decision.snapshot_id or None,
        "job": provenance.job,
        "models": {"askllm": scored.askllm_model, "embedder": scored.embedder_model,
                   **({"perplexity": scored.perplexity_model} if scored.perplexity_model else {})},
        "source": {"topic": topic, "partition": partition, "offset": offset},
    }
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def dlq_json(value: bytes, headers: list[tuple[str, bytes]]) -> bytes:
    """A DLQ record's value in the `json` output format: the entry's metadata and the original bytes in base64
    (as capped by `dlq_value`); the same `sf-dlq-*` headers are on the record as in the msgpack format."""
    h = {k: v.decode("utf-8", "replace") for k, v in headers}
    obj = {
        "schema_version": OUTPUT_SCHEMA_VERSION,
        "kind": "dlq",
        "reason": h.get("sf-dlq-reason"),
        "error": h.get("sf-dlq-error"),
        "detail": h.get("sf-dlq-detail"),
        "stage": h.get("sf-stage"),
        "source": {"topic": h.get("sf-source-topic"), "partition": int(h.get("sf-source-partition", -1)),
                   "offset": int(h.get("sf-source-offset", -1))},
        "original_base64": base64.b64encode(value).decode("ascii"),
        "truncated": h.get("sf-dlq-truncated") == "1",
        **({"original_bytes": int(h["sf-dlq-original-bytes"]), "original_sha256": h.get("sf-dlq-original-sha256")}
           if "sf-dlq-original-bytes" in h else {}),
    }
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
