"""The record codec: every kind of bad input becomes an InvalidDocument with a stable reason."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamfilter.errors import InvalidDocument
from streamfilter.records import (
    REASONS, Document, ScoredRecord, decode_raw, decode_scored, encode_document, encode_scored,
)

LIMIT = 10_000


def reason_of(value) -> str:
    with pytest.raises(InvalidDocument) as info:
        decode_raw(value, LIMIT)
    return info.value.reason


def test_msgpack_and_json_documents_decode_the_same():
    doc = {"id": "d1", "url": "https://example.org/a", "text": "Hello wörld", "lang": "en",
           "fetched_at": "2026-11-29T07:00:00Z", "meta": {"topic": "Arts"}}
    a = decode_raw(msgpack.packb(doc), LIMIT)
    b = decode_raw(json.dumps(doc).encode(), LIMIT)
    assert a == b == Document(id="d1", text="Hello wörld", url="https://example.org/a",
                              fetched_at="2026-11-29T07:00:00Z", lang="en", meta={"topic": "Arts"})


def test_id_is_derived_from_url_and_integers_are_accepted():
    assert decode_raw(json.dumps({"url": "https://x.org/1", "text": "t"}).encode(), LIMIT).id == "https://x.org/1"
    assert decode_raw(msgpack.packb({"id": 7, "text": "t"}), LIMIT).id == "7"


@pytest.mark.parametrize("value, reason", [
    (None, "empty_value"),
    (b"", "empty_value"),
    (b"x" * (LIMIT + 1), "too_large"),
    (b"\xff\xfe garbage", "undecodable"),
    (b"{not json", "undecodable"),
    (b'{"text": "caf\xe9"}', "invalid_utf8"),
    (msgpack.packb([1, 2, 3]), "not_a_map"),
    (b"[1, 2]", "not_a_map"),
    (msgpack.packb({"id": "a"}), "missing_text"),
    (msgpack.packb({"id": "a", "text": 5}), "bad_type"),
    (msgpack.packb({"id": "a", "text": "   \n\t"}), "empty_text"),
    (msgpack.packb({"text": "hello"}), "missing_id"),
    (msgpack.packb({"id": True, "text": "hello"}), "bad_type"),
    (msgpack.packb({"id": "a", "text": "x", "meta": [1]}), "bad_type"),
    (b'{"id": "a", "text": "lone \\ud800 surrogate"}', "invalid_utf8"),
    (b"\x81\xa4text\xa2\xc3\x28", "invalid_utf8"),  # msgpack map whose text has invalid UTF-8 bytes
])
def test_bad_input_has_a_reason(value, reason):
    assert reason_of(value) == reason
    assert reason in REASONS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_fail_with_a_known_reason(value):
    try:
        doc = decode_raw(value, LIMIT)
    except InvalidDocument as exc:
        assert exc.reason in REASONS
    else:
        assert doc.text.strip() and doc.id


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "url", "text", "lang", "meta", "fetched_at", "other"]), json_values))
def test_malformed_maps_fail_with_a_known_reason(obj):
    try:
        doc = decode_raw(msgpack.packb(obj), LIMIT)
    except InvalidDocument as exc:
        assert exc.reason in REASONS
    else:
        assert isinstance(doc.text, str) and doc.text.strip()


def test_scored_record_round_trips():
    doc = Document(id="d", text="t", url="u", meta={"k": 1})
    emb = np.random.default_rng(0).standard_normal(16).astype(np.float16)
    rec = ScoredRecord(doc, 0.25, emb, "askllm@abc", "emb@def", ("crawl.raw", 3, 17))
    back = decode_scored(encode_scored(rec))
    assert back.document == doc and back.askllm == 0.25 and back.source == ("crawl.raw", 3, 17)
    assert back.embedding.dtype == np.float16 and np.array_equal(back.embedding, emb)
    assert msgpack.unpackb(encode_document(doc)) == {"id": "d", "text": "t", "url": "u", "meta": {"k": 1}}


@pytest.mark.parametrize("value", [None, b"", b"junk", msgpack.packb({"v": 99}), msgpack.packb({"v": 1, "doc": {}})])
def test_bad_scored_records_are_invalid_documents(value):
    with pytest.raises(InvalidDocument) as info:
        decode_scored(value)
    assert info.value.reason == "bad_scored_record"


def test_scored_record_perplexity_is_optional_and_round_trips():
    doc = Document(id="d1", text="hello")
    emb = np.arange(4, dtype=np.float16)
    plain = ScoredRecord(doc, 0.25, emb, "askllm@abc", "emb@def", ("crawl.raw", 3, 17))
    assert "perplexity" not in msgpack.unpackb(encode_scored(plain))  # records without it are unchanged
    assert decode_scored(encode_scored(plain)).perplexity is None
    rec = ScoredRecord(doc, 0.25, emb, "askllm@abc", "emb@def", ("crawl.raw", 3, 17), perplexity=3.5,
                       perplexity_model="ppl@123")
    back = decode_scored(encode_scored(rec))
    assert back.perplexity == 3.5 and back.perplexity_model == "ppl@123" and back.askllm == 0.25
