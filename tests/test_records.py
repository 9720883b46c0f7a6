"""The record codec: every kind of bad input becomes an InvalidDocument with a stable reason."""

from __future__ import annotations

import hashlib
import json
import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamfilter.errors import InvalidDocument
from streamfilter.records import (
    MAX_META_DEPTH, REASONS, Document, ScoredRecord, decode_raw, decode_scored, dlq_value, document_from_map,
    encode_document, encode_scored,
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


# --- the whole map is validated: what passes can always be encoded again -----------------------------

def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def _m(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _nested(depth: int, leaf=1):
    """A meta of `depth` levels: meta itself is level 1."""
    value = leaf
    for i in range(depth - 1):
        value = {"k": value} if i % 2 else [value]
    return {"k": value}


DOC = {"id": "a", "text": "hello"}


@pytest.mark.parametrize("value, reason", [
    # integers beyond msgpack's range (packb would raise OverflowError)
    (b'{"id": "a", "text": "x", "meta": {"n": 123456789012345678901234567890}}', "bad_value"),
    (_j({**DOC, "meta": {"n": [2**64]}}), "bad_value"),
    (_j({**DOC, "meta": {"n": -2**63 - 1}}), "bad_value"),
    # lone surrogates (JSON escapes) in nested values, meta keys and the other string fields
    (b'{"id": "a", "text": "x", "meta": {"k\\ud800": 1}}', "invalid_utf8"),
    (b'{"id": "a", "text": "x", "meta": {"a": [{"b": "x\\udfff"}]}}', "invalid_utf8"),
    (b'{"id": "a", "text": "x", "lang": "e\\ud800"}', "invalid_utf8"),
    (b'{"id": "a", "text": "x", "url": "https://x.org/\\ud800"}', "invalid_utf8"),
    (b'{"text": "x", "url": "https://x.org/\\ud800"}', "invalid_utf8"),
    (b'{"id": "a", "text": "x", "fetched_at": "2026\\ud800"}', "invalid_utf8"),
    # non-string meta keys (msgpack input), at any level
    (_m({**DOC, "meta": {1: "x"}}), "bad_type"),
    (_m({**DOC, "meta": {b"k": "x"}}), "bad_type"),
    (_m({**DOC, "meta": {None: "x"}}), "bad_type"),
    (_m({**DOC, "meta": {"a": [{2.5: "x"}]}}), "bad_type"),
    # msgpack ext types and timestamps
    (_m({**DOC, "meta": {"t": msgpack.Timestamp(1, 2)}}), "bad_type"),
    (_m({**DOC, "meta": {"e": [msgpack.ExtType(5, b"x")]}}), "bad_type"),
    (_m({**DOC, "fetched_at": msgpack.Timestamp(1, 2)}), "bad_type"),
    (_m({**DOC, "text": msgpack.ExtType(5, b"x")}), "bad_type"),
    (_m({**DOC, "lang": msgpack.Timestamp(1, 2)}), "bad_type"),
    # fetched_at: finite, int64
    (b'{"id": "a", "text": "x", "fetched_at": NaN}', "bad_value"),
    (b'{"id": "a", "text": "x", "fetched_at": Infinity}', "bad_value"),
    (b'{"id": "a", "text": "x", "fetched_at": -Infinity}', "bad_value"),
    (b'{"id": "a", "text": "x", "fetched_at": 1e400}', "bad_value"),
    (_m({**DOC, "fetched_at": 2**63}), "bad_value"),
    (_j({**DOC, "fetched_at": -2**63 - 1}), "bad_value"),
    (_m({**DOC, "fetched_at": [1]}), "bad_type"),
    # non-finite floats inside meta
    (b'{"id": "a", "text": "x", "meta": {"f": NaN}}', "bad_value"),
    (_m({**DOC, "meta": {"f": [1.0, float("inf")]}}), "bad_value"),
    (_m({**DOC, "meta": {"f": float("-inf")}}), "bad_value"),
    # nesting
    (_j({**DOC, "meta": _nested(MAX_META_DEPTH + 1)}), "bad_value"),
    (_m({**DOC, "meta": _nested(MAX_META_DEPTH + 1)}), "bad_value"),
    (_m({**DOC, "meta": _nested(400)}), "bad_value"),
    (b'{"id": "a", "text": "x", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "undecodable"),
])
def test_values_that_would_not_encode_are_rejected_at_decode(value, reason):
    with pytest.raises(InvalidDocument) as info:
        decode_raw(value, 10**7)
    assert info.value.reason == reason
    assert reason in REASONS


def test_rejection_detail_names_the_path_inside_meta():
    with pytest.raises(InvalidDocument) as info:
        decode_raw(_j({**DOC, "meta": {"a": [0, {"b": 2**70}]}}), LIMIT)
    assert "meta['a'][1]['b']" in info.value.detail


@pytest.mark.parametrize("meta", [
    {"n": 2**64 - 1, "m": -2**63, "b": True, "z": None, "f": -0.0, "s": "é", "bin": b"\x00\xff"},
    _nested(MAX_META_DEPTH),
    {},
])
def test_edges_that_do_encode_are_accepted(meta):
    doc = decode_raw(_m({**DOC, "meta": meta, "fetched_at": 2**63 - 1}), LIMIT)
    assert doc.meta == meta
    rec = ScoredRecord(doc, 0.5, np.zeros(4, np.float16), "a", "e", ("crawl.raw", 0, 0))
    assert decode_scored(encode_scored(rec)).document == doc
    assert msgpack.unpackb(encode_document(doc)) == doc.to_map()


def test_unknown_top_level_fields_are_ignored():
    doc = decode_raw(_j({**DOC, "other": {"n": 10**30, 1: float("nan")}, "x\ud800": "\ud800"}), LIMIT)
    assert doc == Document(id="a", text="hello")
    encode_document(doc)


@pytest.mark.parametrize("meta", [{"s": {1, 2}}, {"t": (1, 2)}, {"o": object()}, {"b": bytearray(b"x")},
                                  {"n": np.int64(3)}, {1: "x"}])
def test_document_from_map_rejects_other_python_types(meta):
    with pytest.raises(InvalidDocument) as info:
        document_from_map({**DOC, "meta": meta})
    assert info.value.reason == "bad_type"


def test_new_reason_codes_are_registered():
    for reason in ("bad_value", "model_error", "unencodable", "output_too_large", "stage_error"):
        assert reason in REASONS
    assert len(set(REASONS)) == len(REASONS)


# The property: whatever decode_raw accepts, from msgpack or JSON, re-encodes and round-trips.

texts = st.text(max_size=8) | st.text(st.sampled_from("aé \t\U0001f600\ud800\udfff\x00"), max_size=6)
big_ints = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**30, -10**30])
scalars = (st.none() | st.booleans() | st.integers() | big_ints
           | st.floats(allow_nan=True, allow_infinity=True) | texts | st.binary(max_size=6)
           | st.sampled_from([msgpack.Timestamp(1, 2), msgpack.ExtType(7, b"x")]))
keys = st.text(max_size=4) | texts | st.integers(-3, 3) | st.binary(max_size=3) | st.none()
any_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                          max_leaves=12)
edges = st.sampled_from([2**64, -2**63 - 1, 10**30, math.nan, math.inf, -math.inf, "\ud800", "a\udfffb",
                         msgpack.Timestamp(1, 2), msgpack.ExtType(7, b"x")])
near_valid_trees = st.recursive(  # what meta may hold, with a few edge leaves and keys: about half are accepted
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8) | st.binary(max_size=6) | edges,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=4) | st.sampled_from([1, b"k", None, "k\ud800"]), inner, max_size=3),
    max_leaves=16)
maps = st.fixed_dictionaries(
    {"text": st.sampled_from(["hello world", "é"]) | texts,
     "id": st.text(min_size=1, max_size=4) | st.integers() | any_values},
    optional={"url": texts | any_values, "lang": texts | any_values, "other": any_values,
              "fetched_at": texts | st.integers() | big_ints | st.floats() | any_values,
              "meta": st.dictionaries(keys, any_values, max_size=4) | any_values},
) | st.fixed_dictionaries(  # plausible documents: mostly accepted, meta mostly valid
    {"text": st.just("hello world"), "id": st.text(min_size=1, max_size=4),
     "meta": st.dictionaries(st.text(max_size=4), near_valid_trees, min_size=1, max_size=5)},
    optional={"url": st.text(max_size=8), "lang": st.text(max_size=3),
              "fetched_at": st.integers(-2**63, 2**63 - 1) | big_ints | st.floats() | st.text(max_size=8)},
)


def _check_reencodes(doc: Document) -> None:
    rec = ScoredRecord(doc, 0.5, np.arange(4, dtype=np.float16), "askllm@x", "emb@y", ("crawl.raw", 1, 2))
    back = decode_scored(encode_scored(rec))
    assert back.document == doc
    assert msgpack.unpackb(encode_document(doc), raw=False) == doc.to_map()
    # and JSON could carry it too, but for bytes: finite floats, string keys, no surrogates
    json.dumps(doc.to_map(), allow_nan=False, ensure_ascii=False, default=bytes.hex).encode("utf-8")


@settings(max_examples=600, deadline=None)
@given(maps)
def test_whatever_decodes_reencodes_and_round_trips(obj):
    encodings = []
    try:
        encodings.append(msgpack.packb(obj, use_bin_type=True))
    except (OverflowError, UnicodeEncodeError, TypeError, ValueError):
        pass
    try:
        encodings.append(json.dumps(obj).encode())
    except (TypeError, ValueError):
        pass
    for value in encodings:
        try:
            doc = decode_raw(value, 10**6)
        except InvalidDocument as exc:
            assert exc.reason in REASONS
        else:
            _check_reencodes(doc)
    try:  # the map as is, without a codec in between (sets, tuples, Timestamps, ...)
        doc = document_from_map(obj)
    except InvalidDocument as exc:
        assert exc.reason in REASONS
    else:
        _check_reencodes(doc)


# --- DLQ value cap --------------------------------------------------------------------------------------

def test_dlq_value_up_to_the_cap_is_unchanged():
    assert dlq_value(None, 10) == (b"", [])
    assert dlq_value(b"", 0) == (b"", [])
    assert dlq_value(b"x" * 10, 10) == (b"x" * 10, [])
    assert dlq_value(b"abc", 100) == (b"abc", [])


@pytest.mark.parametrize("size", [11, 12, 10_000])
def test_dlq_value_over_the_cap_is_truncated_with_headers(size):
    original = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert len(original) == size
    value, headers = dlq_value(original, 10)
    assert value == original[:10]
    assert headers == [("sf-dlq-truncated", b"1"), ("sf-dlq-original-bytes", str(size).encode()),
                       ("sf-dlq-original-sha256", hashlib.sha256(original).hexdigest().encode())]


def test_dlq_value_cap_zero():
    value, headers = dlq_value(b"x", 0)
    assert value == b"" and dict(headers)["sf-dlq-original-bytes"] == b"1"
