"""The snapshot file format: the sketch aggregator's state in one checksummed file (`snapshot_store` keeps the files).

File layout (little-endian):

    magic      8 bytes   b"SFSNAP\\r\\n"
    version    u32       FORMAT_VERSION
    length     u64       payload length in bytes
    sha256     32 bytes  of the payload
    payload    msgpack map: {"meta": {...}, "arrays": {name: .npy bytes}, "quantiles": KLL bytes,
                             "perplexity_quantiles": KLL bytes (optional)}

Within a format version, payload keys are only ever added, optional, and ignored by
readers that do not know them: `perplexity_quantiles` (the paper's perplexity baseline,
mean NLL per token) was added that way, so older snapshots load with an empty sketch and
older builds read newer snapshots.

No pickle: arrays are `.npy` bytes read with `np.load(allow_pickle=False)`, the rest is
msgpack of plain types. Loading checks magic, version, length (truncation) and checksum,
and raises `SnapshotCorrupt` on any failure so the caller falls back to an older file.
"""

from __future__ import annotations

import hashlib
import io
import struct
import time
import uuid
from dataclasses import dataclass, field

import msgpack
import numpy as np

from streamfilter.density.quantiles import ScoreQuantiles
from streamfilter.density.race import RaceSketch
from streamfilter.density.reservoir import Reservoir


MAGIC = b"SFSNAP\r\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")


class SnapshotCorrupt(Exception):
    """A snapshot file that fails its magic, version, length, checksum or format checks."""


@dataclass(eq=False)
class Snapshot:
    snapshot_id: str
    created_at: float  # unix seconds
    sketch: RaceSketch
    quantiles: ScoreQuantiles
    offsets: dict[tuple[str, int], int]  # (topic, partition) -> next offset to consume
    doc_count: int
    policy_seed: int
    reservoir: Reservoir
    ips_constants: dict[str, float] = field(default_factory=dict)  # Policy.key -> c, precomputed
    perplexity_quantiles: ScoreQuantiles = field(default_factory=ScoreQuantiles)  # mean NLL; empty if unscored

    # ------------------------------------------------------------------ bytes

    def to_bytes(self) -> bytes:
        return b"".join(bytes(chunk) for chunk in self._file_chunks())

    def write_to(self, fh) -> int:
        """Write the file's bytes to the binary file `fh` (seekable), hashing while writing: the big
        arrays go out from their own memory, never copied into one payload. Returns the bytes written.

        The header, which carries the payload's sha256, is written last over a placeholder, so a
        reader of a half-written file (there is none: the store renames a complete file) would see a
        checksum mismatch. The bytes equal `to_bytes()`.
        """
        start = fh.tell()
        fh.write(bytes(_HEADER.size))
        digest = hashlib.sha256()
        length = 0
        for chunk in self._payload_chunks():
            digest.update(chunk)
            fh.write(chunk)
            length += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
        end = fh.tell()
        fh.seek(start)
        fh.write(_HEADER.pack(MAGIC, FORMAT_VERSION, length, digest.digest()))
        fh.seek(end)
        return end - start

    def _file_chunks(self):
        chunks = list(self._payload_chunks())
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
        length = sum(len(c) if isinstance(c, bytes) else c.nbytes for c in chunks)
        return [_HEADER.pack(MAGIC, FORMAT_VERSION, length, digest.digest()), *chunks]

    def _payload_chunks(self):
        """The msgpack payload in pieces (bytes, or uint8 views of the arrays' memory): the bytes of
        `msgpack.packb({"meta", "arrays": {name: .npy bytes}, "quantiles", ...}, use_bin_type=True)`."""
        arrays = {f"sketch.{k}": v for k, v in self.sketch.to_arrays().items()}
        arrays["reservoir.priorities"] = self.reservoir.priorities
        arrays["reservoir.embeddings"] = self.reservoir.embeddings
        arrays["reservoir.askllm"] = self.reservoir.askllm
        meta = {
            "snapshot_id": self.snapshot_id,
            "created_at": float(self.created_at),
            "offsets": [[t, int(p), int(o)] for (t, p), o in sorted(self.offsets.items())],
            "doc_count": int(self.doc_count),
            "policy_seed": int(self.policy_seed),
            "reservoir_size": int(self.reservoir.size),
            "reservoir_seed": int(self.reservoir.seed),
            "ips_constants": {k: float(v) for k, v in sorted(self.ips_constants.items())},
        }
        rest = {"quantiles": self.quantiles.to_bytes()}
        if self.perplexity_quantiles.count:  # optional key: absent from snapshots of unscored streams
            rest["perplexity_quantiles"] = self.perplexity_quantiles.to_bytes()
        packer = msgpack.Packer(use_bin_type=True)
        yield packer.pack_map_header(2 + len(rest)) + packer.pack("meta") + packer.pack(meta) + packer.pack("arrays")
        yield packer.pack_map_header(len(arrays))
        for name, array in arrays.items():
            header, data = _npy_parts(array)
            yield packer.pack(name) + _bin_header(len(header) + data.nbytes) + header
            if data.nbytes:
                yield data
        for key, value in rest.items():
            yield packer.pack(key) + packer.pack(value)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> "Snapshot":
        data = memoryview(data)
        if len(data) < _HEADER.size:
            raise SnapshotCorrupt(f"truncated: {len(data)} bytes is shorter than the header")
        magic, version, length, digest = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise SnapshotCorrupt("not a streamfilter snapshot (bad magic)")
        if version != FORMAT_VERSION:
            raise SnapshotCorrupt(f"unsupported snapshot format version {version} (this build reads {FORMAT_VERSION})")
        payload = data[_HEADER.size:]
        if len(payload) != length:
            raise SnapshotCorrupt(f"truncated or padded: payload is {len(payload)} bytes, header says {length}")
        if hashlib.sha256(payload).digest() != digest:
            raise SnapshotCorrupt("checksum mismatch")
        try:
            doc = msgpack.unpackb(payload, raw=False, strict_map_key=True)
            meta = doc["meta"]
            arrays = {k: _load_npy(v) for k, v in doc["arrays"].items()}
            sketch = RaceSketch.from_arrays({k[len("sketch."):]: v for k, v in arrays.items() if k.startswith("sketch.")})
            reservoir = Reservoir(
                size=int(meta["reservoir_size"]), seed=int(meta["reservoir_seed"]),
                priorities=arrays["reservoir.priorities"], embeddings=arrays["reservoir.embeddings"],
                askllm=arrays["reservoir.askllm"],
            )
            return cls(
                snapshot_id=str(meta["snapshot_id"]),
                created_at=float(meta["created_at"]),
                sketch=sketch,
                quantiles=ScoreQuantiles.from_bytes(doc["quantiles"]),
                offsets={(str(t), int(p)): int(o) for t, p, o in meta["offsets"]},
                doc_count=int(meta["doc_count"]),
                policy_seed=int(meta["policy_seed"]),
                reservoir=reservoir,
                ips_constants={str(k): float(v) for k, v in meta["ips_constants"].items()},
                perplexity_quantiles=(ScoreQuantiles.from_bytes(doc["perplexity_quantiles"])
                                      if doc.get("perplexity_quantiles") is not None else ScoreQuantiles()),
            )
        except SnapshotCorrupt:
            raise
        except Exception as exc:  # a checksummed payload we cannot parse: a writer bug or a format change
            raise SnapshotCorrupt(f"malformed payload: {type(exc).__name__}: {exc}") from exc


def new_snapshot_id(doc_count: int) -> str:
    """Unique, sortable, safe in file names: UTC time, document count, random suffix."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{stamp}-{doc_count}-{uuid.uuid4().hex[:8]}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, order="C"), allow_pickle=False)  # ascontiguousarray would make 0-d arrays 1-d
    return buf.getvalue()


def _bin_header(n: int) -> bytes:
    """msgpack's bin 8/16/32 header for `n` bytes (the Packer has none for binary)."""
    if n < 1 << 8:
        return struct.pack(">BB", 0xC4, n)
    if n < 1 << 16:
        return struct.pack(">BH", 0xC5, n)
    return struct.pack(">BI", 0xC6, n)


def _npy_parts(array: np.ndarray) -> tuple[bytes, np.ndarray]:
    """(.npy header, the data as a uint8 view): together the bytes of `_npy_bytes(array)`, without the copy."""
    array = np.asarray(array, order="C")  # ascontiguousarray would make 0-d arrays 1-d
    if array.dtype.hasobject:
        raise ValueError("object arrays are not stored in snapshots")
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(array))
    return buf.getvalue(), array.reshape(-1).view(np.uint8)


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
