"""Training-ready shards: names, columns, encoders, and the checkpoint read back from a listing.

Pure and Kafka-free; `stages/sink.py` is the Kafka shell around it. A shard holds the accepted
records of one partition whose offsets lie in `[start, end)`, and its name says so:

    {topic}-p{partition:05d}-{start:020d}-{end:020d}.parquet      (or .jsonl.zst)

The shards of a partition tile its offsets: each one starts where the previous one ended, and
`end` is the offset after the shard's last record (offsets between a shard's last record and
the next shard's first one are transaction markers or aborted records, which a read_committed
reader never sees). The names are the sink's checkpoint: the sink resumes each partition at
the highest `end` among its complete shards (`scan`). A shard becomes visible only whole (see
`ShardStore.publish`), so a name that exists is a complete shard, and a killed sink leaves at
most a temporary file (`.tmp-...`), which `scan` removes.

Columns (both formats): `id`, `text`, `url`, `lang`, `fetched_at`, `meta`, the route's decision
from the `sf-*` headers (`decision`, `policy`, `snapshot`, `askllm`, `density`, `probability`,
`askllm_model`, `embedder_model`, `source_topic`, `source_partition`, `source_offset`), and the
accepted record's own `kafka_partition`, `kafka_offset`, `kafka_timestamp_ms`. JSON lines keep
`fetched_at` and `meta` as JSON values; Parquet stores `fetched_at` as text (it may be a string,
an integer or a float) and `meta` as a JSON string (it is free-form). Bytes inside `meta` become
`{"$base64": "..."}`; a non-finite score (no density under a policy without one) is null.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from streamfilter.errors import InvalidDocument
from streamfilter.records import decode_raw

log = logging.getLogger("streamfilter.sink")

FORMATS = {"parquet": "parquet", "jsonl": "jsonl.zst"}  # format -> file extension
TMP_PREFIX = ".tmp-"
MANIFEST_PREFIX = "_SUCCESS-"
_NAME = re.compile(
    r"^(?P<topic>.+)-p(?P<partition>\d{5,})-(?P<start>\d{20})-(?P<end>\d{20})\.(?P<ext>parquet|jsonl\.zst)$")

# Headers written by the route (`stages.route.decision_headers`) -> (column, kind).
HEADER_COLUMNS = {
    "sf-decision": ("decision", "str"),
    "sf-policy": ("policy", "str"),
    "sf-snapshot": ("snapshot", "str"),
    "sf-askllm": ("askllm", "float"),
    "sf-density": ("density", "float"),
    "sf-probability": ("probability", "float"),
    "sf-askllm-model": ("askllm_model", "str"),
    "sf-embedder-model": ("embedder_model", "str"),
}
DOCUMENT_COLUMNS = ("id", "text", "url", "lang", "fetched_at", "meta")
COLUMNS = (*DOCUMENT_COLUMNS, *(c for c, _ in HEADER_COLUMNS.values()), "source_topic", "source_partition",
           "source_offset", "kafka_partition", "kafka_offset", "kafka_timestamp_ms")


# -- names ---------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class ShardName:
    """One shard's identity: the accepted records of `topic`/`partition` at offsets [start, end)."""

    topic: str
    partition: int
    start: int
    end: int
    format: str  # "parquet" | "jsonl"

    @property
    def name(self) -> str:
        return f"{self.topic}-p{self.partition:05d}-{self.start:020d}-{self.end:020d}.{FORMATS[self.format]}"

    @classmethod
    def parse(cls, name: str) -> "ShardName | None":
        """The shard a file name denotes, or None for any other file (temporary files, manifests)."""
        m = _NAME.match(name)
        if m is None:
            return None
        fmt = "parquet" if m["ext"] == "parquet" else "jsonl"
        start, end = int(m["start"]), int(m["end"])
        if end <= start:
            return None
        return cls(m["topic"], int(m["partition"]), start, end, fmt)


# -- rows ----------------------------------------------------------------------------------------


class ShardRows:
    """The rows of one shard in the making, column by column (one partition, contiguous offsets).

    `start` is the first offset the shard covers; `end` the offset after the last record added,
    good or bad: a record that cannot be decoded is skipped (`skipped`) but still covered, so
    that the shards of a partition tile its offsets.
    """

    def __init__(self, topic: str, partition: int, start: int, max_doc_bytes: int):
        self.topic, self.partition, self.start, self.end = topic, partition, start, start
        self.max_doc_bytes = max_doc_bytes
        self.columns: dict[str, list] = {c: [] for c in COLUMNS}
        self.skipped = 0
        self.value_bytes = 0
        self.opened_at = time.monotonic()

    def __len__(self) -> int:
        return len(self.columns["id"])

    @property
    def records(self) -> int:
        return len(self) + self.skipped

    def add(self, records: Iterable) -> None:
        """Append Kafka records (`.value`, `.headers`, `.offset`, `.timestamp`) of this partition, in order."""
        cols = self.columns
        ids, texts, urls, langs, fetched, metas = (cols[c] for c in DOCUMENT_COLUMNS)
        str_headers = [(h, cols[c]) for h, (c, kind) in HEADER_COLUMNS.items() if kind == "str"]
        float_headers = [(h, cols[c]) for h, (c, kind) in HEADER_COLUMNS.items() if kind == "float"]
        isfinite = math.isfinite
        src_t, src_p, src_o = cols["source_topic"], cols["source_partition"], cols["source_offset"]
        k_p, k_o, k_ts = cols["kafka_partition"], cols["kafka_offset"], cols["kafka_timestamp_ms"]
        for record in records:
            if record.offset < self.end:
                raise ValueError(f"offset {record.offset} of partition {self.partition} is not after {self.end - 1}")
            self.end = record.offset + 1
            value = record.value
            self.value_bytes += len(value) if value else 0
            try:
                doc = decode_raw(value, self.max_doc_bytes)
                headers = dict(record.headers) if record.headers else {}
                strs = [None if (v := headers.get(h)) is None else v.decode("utf-8") for h, _ in str_headers]
                # a nan density: the policy computed none
                nums = [None if (v := headers.get(h)) is None or not isfinite(f := float(v)) else f
                        for h, _ in float_headers]
                source = _parse_source(headers.get("sf-source"))
            except (InvalidDocument, ValueError, UnicodeDecodeError) as exc:
                # Only the route writes this topic, and it sends bad input to the DLQ: a record that does
                # not decode here came from elsewhere. It stays in Kafka at these coordinates.
                log.warning("sink: skipping %s/%d/%d: %s", self.topic, self.partition, record.offset, exc)
                self.skipped += 1
                continue
            ids.append(doc.id)
            texts.append(doc.text)
            urls.append(doc.url)
            langs.append(doc.lang)
            fetched.append(doc.fetched_at)
            metas.append(doc.meta)
            for (_, values), v in zip(str_headers, strs):
                values.append(v)
            for (_, values), v in zip(float_headers, nums):
                values.append(v)
            src_t.append(source[0])
            src_p.append(source[1])
            src_o.append(source[2])
            k_p.append(self.partition)
            k_o.append(record.offset)
            k_ts.append(record.timestamp if record.timestamp is not None and record.timestamp >= 0 else None)

    def shard_name(self, fmt: str) -> ShardName:
        return ShardName(self.topic, self.partition, self.start, self.end, fmt)


def _parse_source(raw: bytes | None) -> tuple:
    if raw is None:
        return None, None, None
    topic, partition, offset = raw.decode("utf-8").rsplit("/", 2)
    return topic, int(partition), int(offset)


# -- encoders ------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$base64": base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_default)


def encode_parquet(rows: ShardRows, compression_level: int) -> bytes:
    """The shard as a Parquet file (zstd); see the module docstring for the column types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    c = rows.columns
    encode = _JSON.encode
    arrays = {
        "id": pa.array(c["id"], pa.string()),
        "text": pa.array(c["text"], pa.large_string()),
        "url": pa.array(c["url"], pa.string()),
        "lang": pa.array(c["lang"], pa.string()),
        "fetched_at": pa.array([None if v is None else v if isinstance(v, str) else repr(v) for v in c["fetched_at"]],
                               pa.string()),
        "meta": pa.array([None if m is None else encode(m) for m in c["meta"]], pa.string()),
    }
    for column, kind in HEADER_COLUMNS.values():
        arrays[column] = pa.array(c[column], pa.float64() if kind == "float" else pa.string())
    arrays["source_topic"] = pa.array(c["source_topic"], pa.string())
    arrays["source_partition"] = pa.array(c["source_partition"], pa.int32())
    arrays["source_offset"] = pa.array(c["source_offset"], pa.int64())
    arrays["kafka_partition"] = pa.array(c["kafka_partition"], pa.int32())
    arrays["kafka_offset"] = pa.array(c["kafka_offset"], pa.int64())
    arrays["kafka_timestamp_ms"] = pa.array(c["kafka_timestamp_ms"], pa.int64())
    table = pa.table(arrays, metadata={
        "streamfilter.topic": rows.topic, "streamfilter.partition": str(rows.partition),
        "streamfilter.start": str(rows.start), "streamfilter.end": str(rows.end),
        "streamfilter.skipped": str(rows.skipped)})
    out = io.BytesIO()
    pq.write_table(table, out, compression="zstd", compression_level=compression_level)
    return out.getvalue()


def encode_jsonl_zst(rows: ShardRows, compression_level: int) -> bytes:
    """The shard as JSON lines in one zstd frame (with its content checksum): `zstd -d < F | jq`."""
    import zstandard

    c = rows.columns
    names = COLUMNS
    encode = _JSON.encode
    lines = [encode(dict(zip(names, values))) for values in zip(*(c[n] for n in names))]
    text = "\n".join(lines) + "\n" if lines else ""
    return zstandard.ZstdCompressor(level=compression_level, write_checksum=True).compress(text.encode("utf-8"))


ENCODERS = {"parquet": encode_parquet, "jsonl": encode_jsonl_zst}


def count_rows(data: bytes, fmt: str) -> int:
    """Rows of a complete shard's bytes; raises on a truncated or corrupt one (footer, zstd checksum)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    import zstandard

    stream = zstandard.ZstdDecompressor().decompressobj()
    text = stream.decompress(data)  # checks the frame's content checksum
    if not stream.eof or (text and not text.endswith(b"\n")):
        raise ValueError("truncated zstd frame or JSON lines")
    return text.count(b"\n")


# -- the store -----------------------------------------------------------------------------------


@dataclass
class ScanResult:
    """What `ShardStore.scan` found for one topic: per partition, the resume offset and its shards."""

    resume: dict[int, int] = field(default_factory=dict)  # partition -> end of its highest complete shard
    shards: dict[int, list[ShardName]] = field(default_factory=dict)  # partition -> shards, by start
    removed: list[str] = field(default_factory=list)  # temporary files and corrupt shards deleted


class ShardStore:
    """A directory of shards on any fsspec filesystem (a local path, `file://`, `memory://`, `s3://`...).

    `publish` makes a shard visible only whole: on a local filesystem it writes a temporary file in
    the same directory, fsyncs it and renames it (`os.replace`, atomic on POSIX), then fsyncs the
    directory; elsewhere it writes the final name in one `pipe_file` call, which object stores
    (S3, GCS, Azure; `memory://`) make visible all at once or not at all. On a remote filesystem
    without atomic writes (SFTP, HDFS, SMB) a torn file is possible: `scan` verifies the newest
    shard of each partition (Parquet footer, zstd checksum) and deletes it when it is incomplete.
    """

    def __init__(self, url: str):
        import fsspec

        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/") or "/"
        self.local = "file" in _protocols(self.fs)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def names(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=False, refresh=True) if not self.local else os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def scan(self, topic: str, fmt: str, verify: bool = True) -> ScanResult:
        """The checkpoint of `topic`'s shards in format `fmt`: per partition, the end of its highest
        complete shard. Deletes this topic's temporary files (left by a killed sink) and, with
        `verify`, a newest shard that does not read back whole (then the one before counts)."""
        result = ScanResult()
        for name in self.names():
            if name.startswith(TMP_PREFIX) and name[len(TMP_PREFIX):].startswith(
                    (f"{topic}-p", f"{MANIFEST_PREFIX}{topic}.{fmt}.json")):
                self._remove(name)
                result.removed.append(name)
                continue
            shard = ShardName.parse(name)
            if shard is not None and shard.topic == topic and shard.format == fmt:
                result.shards.setdefault(shard.partition, []).append(shard)
        for partition, shards in result.shards.items():
            shards.sort(key=lambda s: (s.end, s.start))
            while shards and verify and not self._whole(shards[-1]):
                bad = shards.pop()
                log.warning("sink: shard %s is incomplete or corrupt; deleting it and resuming before it", bad.name)
                self._remove(bad.name)
                result.removed.append(bad.name)
            shards.sort(key=lambda s: s.start)
            if shards:
                result.resume[partition] = max(s.end for s in shards)
        result.shards = {p: s for p, s in result.shards.items() if s}
        return result

    def _whole(self, shard: ShardName) -> bool:
        try:
            count_rows(self.read(shard.name), shard.format)
            return True
        except Exception:  # noqa: BLE001 - any failure to read it back means it is not a complete shard
            return False

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def _remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    def publish(self, name: str, data: bytes, before_visible=None) -> None:
        """Make `name` appear with content `data`, whole or not at all (see the class docstring).

        `before_visible()` is called just before the shard becomes visible (fault injection)."""
        final = self.path(name)
        if not self.local:
            if before_visible is not None:
                before_visible()
            self.fs.pipe_file(final, data)
            return
        tmp = self.path(f"{TMP_PREFIX}{name}.{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if before_visible is not None:
                before_visible()
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a power loss
        finally:
            os.close(fd)


def _protocols(fs) -> tuple:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


# -- the manifest --------------------------------------------------------------------------------


def manifest_name(topic: str, fmt: str) -> str:
    return f"{MANIFEST_PREFIX}{topic}.{fmt}.json"


def build_manifest(store: ShardStore, topic: str, fmt: str, ends: dict[int, int],
                   known: dict[str, tuple[int, str]] | None = None) -> dict:
    """The `_SUCCESS` manifest of a completed one-shot run: every shard of `topic` in the store up to
    the fixed `ends` (partition -> end offset), with rows, bytes and sha256, and the range they tile.

    `known` maps shard names written by this process to (rows, sha256), so that only shards of
    earlier runs are read back. Raises ValueError when a partition's shards do not tile their range.
    """
    known = known or {}
    scan = store.scan(topic, fmt, verify=False)
    partitions, listed = {}, []
    for partition in sorted(ends):
        shards = [s for s in scan.shards.get(partition, []) if s.end <= ends[partition]]
        for before, after in zip(shards, shards[1:]):
            if after.start != before.end:
                raise ValueError(f"partition {partition}: shard {after.name} does not start where {before.name} ends")
        start = shards[0].start if shards else ends[partition]
        partitions[str(partition)] = {"start": start, "end": ends[partition], "shards": len(shards)}
        for s in shards:
            if s.name in known:
                rows, digest = known[s.name]
                size = None
            else:
                data = store.read(s.name)
                rows, digest, size = count_rows(data, fmt), hashlib.sha256(data).hexdigest(), len(data)
            listed.append({"name": s.name, "partition": s.partition, "start": s.start, "end": s.end,
                           "rows": rows, "sha256": digest, **({"bytes": size} if size is not None else {})})
    for entry in listed:
        if "bytes" not in entry:
            entry["bytes"] = store.fs.size(store.path(entry["name"]))
    return {"topic": topic, "format": fmt, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "partitions": partitions, "rows": sum(e["rows"] for e in listed), "shards": listed}


def write_manifest(store: ShardStore, manifest: dict) -> str:
    name = manifest_name(manifest["topic"], manifest["format"])
    store.publish(name, (json.dumps(manifest, indent=2) + "\n").encode())
    return name
