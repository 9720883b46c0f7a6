"""What every export shares: the `export` extra, optimum's exporter, the staging folder, the manifest's
common fields, and the check against the reference before a folder is published.

A folder is written beside its destination (`staging_dir`), its manifest written, the export
checked against the PyTorch reference (`publish`: on failure the staging folder is removed),
and only then renamed into place, so a folder with a manifest is a folder that passed.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from streamfilter.errors import UserError
from streamfilter.models.manifest import write_manifest

TOKENIZER_FILE = "tokenizer.json"
VALIDATION_TEXTS = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "buy cheap buy cheap buy cheap click here click here",
    "Photosynthesis converts light energy into chemical energy that can later be released to fuel the "
    "organism's activities. " * 6,
    "?",
)


def require_export_extra() -> None:
    """UserError naming the `export` extra unless optimum's exporter, torch and transformers import."""
    try:
        for module in ("optimum.exporters.onnx", "torch", "transformers"):
            importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"exporting needs the `export` extra (pip install 'streamfilter[export]'): {exc}") from None


def check_variants(variants: Sequence[str], allowed: Sequence[str]) -> None:
    """Every export writes fp32 (the reference the others are checked against) and only known variants."""
    if "fp32" not in variants or set(variants) - set(allowed):
        raise UserError(f"variants: must include fp32 and be among {', '.join(allowed)} (got {', '.join(variants)})")


def optimum_export(model: str, folder: str, *, task: str, revision: str | None, opset: int | None,
                   library_name: str, **options) -> None:
    """optimum's ONNX exporter into `folder` (its own validation off: each export is checked here)."""
    from optimum.exporters.onnx import main_export

    main_export(model, folder, task=task, revision=revision or "main", opset=opset, library_name=library_name,
                do_validation=False, **options)


def versions() -> dict[str, str]:
    """The installed versions of the libraries an export depends on (the manifest's `exporter`)."""
    out = {}
    for dist in ("optimum", "optimum-onnx", "transformers", "torch", "sentence-transformers", "onnx", "onnxruntime", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def source_fields(model: str, revision: str | None, library: str, commit: str | None) -> dict:
    """The manifest's `source`: a hub id, or the absolute path of a local folder."""
    local = Path(model).exists()
    return {"model": str(Path(model).resolve()) if local else model, "revision": revision or ("local" if local else "main"),
            "commit": commit, "library": library}


def display_name(model: str) -> str:
    return Path(model.rstrip("/")).name


def created_at() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def variant_notes(variant: str) -> dict:
    return {
        "fp32": {"device": "any"},
        "int8": {"device": "cpu", "note": "dynamic int8 quantization of weight matmuls; LM head kept fp32"},
        "fp16": {"device": "gpu", "note": "fp16 attention/FFN-input matmuls; FFN output, norms, residuals fp32"},
    }[variant]


def manifest_variants(files: dict[str, list[str]], notes: Callable[[str], dict] | None = None) -> dict:
    """The manifest's `variants` for {variant: [graph file, side files...]}, with `notes(variant)` merged in."""
    return {v: {"model": f[0], "external_data": f[1:], **(notes(v) if notes else {})} for v, f in files.items()}


def save_tokenizer(backend, path: Path) -> None:
    """Write a `tokenizers` JSON with padding and truncation off (the runtime pads and truncates itself)."""
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(path))


def staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))


def publish(staging: Path, out: Path, fields: dict, files: dict[str, list[str]],
            check: Callable[[], None] | None) -> None:
    """Write `staging`'s manifest (`fields`, and the sha256 of every variant file and the tokenizer),
    run `check` on it (on failure the staging folder is removed, so no validated-looking folder
    remains), then replace `out` with it (readers never see a half-written folder with a manifest)."""
    write_manifest(staging, fields, [f for fs in files.values() for f in fs] + [TOKENIZER_FILE])
    if check is not None:
        try:
            check()
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{time.time_ns()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
