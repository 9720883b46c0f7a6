"""Where snapshots live: a directory of snapshot files, written atomically, the newest `keep` kept.

`SnapshotStore` names files by creation time (`snapshot-<micros>-<id>.sfsnap`), writes them
atomically (temp file, fsync, rename, fsync of the directory), finds the newest one that
loads cleanly (skipping corrupt or truncated files, which the caller's `on_corrupt` counts),
and resolves what a person types (`latest`, a path, a snapshot id). `SnapshotHandoff` hands a
written snapshot to a route in the same process. The file format is `density.snapshot`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from streamfilter.density.snapshot import Snapshot, SnapshotCorrupt
from streamfilter.errors import UserError

log = logging.getLogger(__name__)

_STALE_TMP_S = 600  # temp files older than this are from a dead writer
_NAME = re.compile(r"^snapshot-(\d{20})-([A-Za-z0-9_.-]+)\.sfsnap$")


class SnapshotStore:
    """A directory of snapshot files; keeps the newest `keep`.

    `on_corrupt(path, error)` is called for each corrupt or truncated file that `latest` skips
    (the stages count them in a metric); `corrupt_skipped` counts them too.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3,
                 on_corrupt: Callable[[Path, SnapshotCorrupt], None] | None = None):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.on_corrupt = on_corrupt
        self.corrupt_skipped = 0  # corrupt or truncated files skipped by `latest`

    def list(self) -> list[Path]:
        """Snapshot files, newest first (by the creation time in the name)."""
        if not self.directory.is_dir():
            return []
        return sorted((p for p in self.directory.iterdir() if _NAME.match(p.name)), key=lambda p: p.name, reverse=True)

    def path_for(self, snapshot: Snapshot) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", snapshot.snapshot_id):
            raise ValueError(f"snapshot id {snapshot.snapshot_id!r} is not safe in a file name")
        micros = int(round(snapshot.created_at * 1e6))
        return self.directory / f"snapshot-{micros:020d}-{snapshot.snapshot_id}.sfsnap"

    def write(self, snapshot: Snapshot) -> Path:
        """Write atomically under the store's naming, then prune old files."""
        final = write_file(snapshot, self.path_for(snapshot))
        self._prune()
        return final

    def load(self, path: str | os.PathLike) -> Snapshot:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SnapshotCorrupt(f"unreadable: {exc}") from exc
        return Snapshot.from_bytes(data)

    def latest(self) -> Snapshot | None:
        """The newest snapshot that loads cleanly; corrupt ones are logged, counted and skipped."""
        return self.latest_with_path()[1]

    def latest_with_path(self) -> tuple[Path | None, Snapshot | None]:
        """(file, snapshot) of the newest snapshot that loads cleanly; (None, None) if there is none."""
        for path in self.list():
            try:
                return path, self.load(path)
            except SnapshotCorrupt as exc:
                self.corrupt_skipped += 1
                log.warning("skipping corrupt snapshot %s: %s", path, exc)
                if self.on_corrupt is not None:
                    self.on_corrupt(path, exc)
        return None, None

    def resolve(self, ref: str) -> Path:
        """The file for what a person types: a path, or a snapshot id in this directory; UserError otherwise."""
        path = Path(ref)
        if path.is_file():
            return path
        matches = [p for p in self.list() if p.name.endswith(f"-{ref}.sfsnap")]
        if not matches:
            raise UserError(f"snapshot {ref!r}: no such file, and no snapshot with that id in {self.directory}")
        return matches[0]

    def find(self, ref: str) -> tuple[Path, Snapshot]:
        """(path, snapshot) for `latest` (the newest that loads), a file path or a snapshot id; UserError otherwise."""
        if ref == "latest":
            path, snapshot = self.latest_with_path()
            if snapshot is None:
                raise UserError(f"no valid snapshot in {self.directory} (sketch.snapshot_dir)")
            return path, snapshot
        path = self.resolve(ref)
        try:
            return path, self.load(path)
        except SnapshotCorrupt as exc:
            raise UserError(f"snapshot {path}: {exc}") from None

    def _prune(self) -> None:
        for old in self.list()[self.keep:]:
            old.unlink(missing_ok=True)
        for stale in self.directory.glob(".snapshot-*.tmp"):  # left by a writer killed mid-write
            try:
                if time.time() - stale.stat().st_mtime > _STALE_TMP_S:
                    stale.unlink(missing_ok=True)
            except OSError:
                pass


def write_file(snapshot: Snapshot, path: str | os.PathLike) -> Path:
    """Write one snapshot file atomically: temp file, fsync, rename, fsync of the directory."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            snapshot.write_to(fh)  # hashed while written: no copy of the 100 MB payload
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(final.parent)
    return final


def write_to(snapshot: Snapshot, output: str | os.PathLike) -> Path:
    """Into a directory (store naming, so `latest` finds it, nothing pruned) or to a file path."""
    output = Path(output)
    if output.is_dir() or str(output).endswith(os.sep):
        output.mkdir(parents=True, exist_ok=True)
        return write_file(snapshot, SnapshotStore(output).path_for(snapshot))
    return write_file(snapshot, output)


class SnapshotHandoff:
    """The snapshot the aggregator of this process wrote last, for a route in the same process (`run`).

    The writer publishes the `Snapshot` object once its file is durable (fsynced and renamed);
    a route that finds that file newest in the store adopts the object instead of reading the
    file back and hashing it again (~1.8 s of CPU at the paper's sketch, R=1000, B=20000).
    A file the handoff does not hold (another writer's, or one found at start-up) is still
    loaded and verified. The snapshot is never modified after publishing (it is a copy of the
    live state), so readers share it without a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._name: str | None = None
        self._snapshot: Snapshot | None = None
        self.version = 0  # incremented on each publish: a cheap "anything new?" for the route

    def publish(self, path: Path, snapshot: Snapshot) -> None:
        with self._lock:
            self._name, self._snapshot = Path(path).name, snapshot
            self.version += 1
            self._lock.notify_all()

    def get(self, path: Path) -> Snapshot | None:
        """The published snapshot if it is the one in file `path`, else None (read the file)."""
        with self._lock:
            return self._snapshot if self._name == Path(path).name else None

    def wait(self, version: int, timeout_s: float) -> bool:
        """Block until a snapshot newer than `version` is published or `timeout_s` passes; True if one was."""
        with self._lock:
            return self._lock.wait_for(lambda: self.version != version, timeout=timeout_s)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
