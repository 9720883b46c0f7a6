"""`manifest.json`: what an exported model folder holds, and the sha256 of every file in it.

A model folder is written by `streamfilter models export` (or `build-test-models`) and
read by `loader.load_model` (or one class's `load`). Loading refuses a file whose
sha256 differs from the manifest's: the bytes that are hashed are the bytes handed to
ONNX Runtime (no window between check and use).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamfilter.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
KINDS = ("askllm", "embedder", "perplexity")
BACKENDS = ("seq2seq", "causal")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest. `files` maps a file name (relative to `root`) to its sha256 and size."""

    root: Path
    kind: str  # "askllm" | "embedder" | "perplexity"
    name: str  # short display name, e.g. "flan-t5-small"
    source: dict[str, Any]  # {"model": ..., "revision": ..., "library": ...}
    files: dict[str, dict[str, Any]]  # name -> {"sha256": hex, "bytes": int}
    variants: dict[str, dict[str, Any]]  # "fp32"/"int8"/"fp16" -> {"model": file, "external_data": [files], ...}
    tokenizer: str  # file name of the HF tokenizers JSON
    config: dict[str, Any]  # kind-specific settings (token ids, prompt version, pooling, dim, ...)
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def backend(self) -> str:
        """askllm/perplexity: "seq2seq" or "causal" (manifests written before backends existed: seq2seq)."""
        return self.raw.get("backend", "seq2seq")

    def path(self, name: str) -> Path:
        return self.root / name

    def read_verified(self, name: str) -> bytes:
        """The bytes of `name`, after checking them against the manifest (UserError if they differ)."""
        entry = self._entry(name)
        data = self.path(name).read_bytes()
        self._check(name, entry, sha256_bytes(data))
        return data

    def verify_file(self, name: str) -> None:
        self._check(name, self._entry(name), sha256_file(self.path(name)))

    def verify_all(self) -> None:
        for name in self.files:
            self.verify_file(name)

    def variant_sha256(self, variant: str) -> str:
        return self.files[self.variants[variant]["model"]]["sha256"]

    def _entry(self, name: str) -> dict[str, Any]:
        if name not in self.files:
            raise UserError(f"{self.root / MANIFEST_NAME}: lists no file {name!r}")
        if not self.path(name).is_file():
            raise UserError(f"{self.path(name)}: missing (listed in {self.root / MANIFEST_NAME}); re-export the model")
        return self.files[name]

    def _check(self, name: str, entry: dict[str, Any], actual: str) -> None:
        if actual != entry["sha256"]:
            raise UserError(
                f"{self.path(name)}: sha256 {actual[:16]}… does not match the manifest's "
                f"{entry['sha256'][:16]}…; the file was modified or is corrupt: re-export the model"
            )


def load_manifest(model_dir: str | Path, kind: str | None = None) -> Manifest:
    """Parse `model_dir/manifest.json` and check its structure (not the file hashes: see `Manifest.verify_*`)."""
    root = Path(model_dir)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{root}: no {MANIFEST_NAME}; export a model with `streamfilter models export` first")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported manifest format_version {raw.get('format_version') if isinstance(raw, dict) else None!r} (expected {FORMAT_VERSION})")
    try:
        m = Manifest(
            root=root, kind=raw["kind"], name=raw["name"], source=raw["source"], files=raw["files"],
            variants=raw["variants"], tokenizer=raw["tokenizer"], config=raw["config"], raw=raw,
        )
    except KeyError as exc:
        raise UserError(f"{path}: missing field {exc.args[0]!r}") from None
    if m.kind not in KINDS:
        raise UserError(f"{path}: unknown kind {m.kind!r} (expected one of {', '.join(KINDS)})")
    if m.backend not in BACKENDS:
        raise UserError(f"{path}: unknown backend {m.backend!r} (expected one of {', '.join(BACKENDS)})")
    if kind is not None and m.kind != kind:
        raise UserError(f"{root}: holds a {m.kind!r} model, not an {kind!r} model")
    for variant, spec in m.variants.items():
        for name in [spec["model"], *spec.get("external_data", [])]:
            if name not in m.files:
                raise UserError(f"{path}: variant {variant!r} uses {name!r}, which has no sha256 in 'files'")
    if m.tokenizer not in m.files:
        raise UserError(f"{path}: tokenizer {m.tokenizer!r} has no sha256 in 'files'")
    return m


def write_manifest(root: Path, fields: dict[str, Any], file_names: list[str]) -> Path:
    """Hash `file_names` (relative to `root`) and write `root/manifest.json` with `fields`."""
    files = {name: {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size} for name in sorted(file_names)}
    doc = {"format_version": FORMAT_VERSION, **fields, "files": files}
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(root / MANIFEST_NAME)
    return root / MANIFEST_NAME
