"""Benchmark: `streamfilter replay --mode route` documents/s against the live `streamfilter route`, same data, one run.

Produces N scored records (768-dimensional float16 embeddings, as Sentence-T5 writes them)
to a fresh topic, builds a snapshot of them, then times, one after the other on the same
broker and machine:

  live route       `streamfilter route` (a consumer group, batch.max_batch_docs per transaction)
  replay           `streamfilter replay --mode route` with its default batch size
  replay (same b.) `streamfilter replay --mode route --batch-docs <the live route's>`

Each is timed by a read_committed reader of its output topics: from the process start to
the last of the N decisions (wall, includes start-up) and from its first committed output
to its last (steady docs/s). Usage:

    .venv/bin/python bench/replay.py [--bootstrap HOST:PORT] [--docs 20000] [--rows 1000 --buckets 20000]

Without --bootstrap a broker is started in a temporary folder (and stopped at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def scored_values(n: int, dim: int, seed: int = 0) -> tuple[list[bytes], list]:
    from streamfilter.records import Document, ScoredRecord, encode_scored

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((16, dim))
    labels = rng.integers(0, 16, size=n)
    x = centres[labels] / np.sqrt(dim) + 0.5 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    askllm = rng.beta(2, 2, size=n)
    records = [ScoredRecord(Document(id=f"b{i}", text=f"benchmark document {i} " * 40, meta={"topic": f"t{c}"}),
                            float(a), e.astype(np.float16), "bench", "bench", ("crawl.raw", 0, i))
               for i, (c, a, e) in enumerate(zip(labels, askllm, x))]
    return [encode_scored(r) for r in records], records


def build_snapshot(records, directory: Path, rows: int, buckets: int, policy) -> str:
    from streamfilter.density.snapshot_store import SnapshotStore
    from streamfilter.density.state import SketchState

    state = SketchState.create(records[0].embedding.shape[0], rows=rows, buckets=buckets, policies=[policy])
    for i in range(0, len(records), 2000):
        chunk = records[i:i + 2000]
        state.on_batch([r.document.id for r in chunk], np.stack([r.embedding for r in chunk]).astype(np.float32),
                       np.array([r.askllm for r in chunk]), [("crawl.scored", 0, i + j) for j in range(len(chunk))])
    snapshot = state.snapshot()
    SnapshotStore(directory).write(snapshot)
    return snapshot.snapshot_id


def timed(command: list[str], bootstrap: str, outputs: list[str], n: int, log: Path) -> dict:
    """Run a streamfilter command until its outputs hold n records; the timings of its committed output."""
    from kafka import KafkaConsumer

    reader = KafkaConsumer(*outputs, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                           enable_auto_commit=False, isolation_level="read_committed",
                           max_partition_fetch_bytes=16 * 1_048_576)
    reader.poll(timeout_ms=500)  # join the topics before the clock starts
    started = time.monotonic()
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "streamfilter", *command], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    got, first_at, first_n, last_at = 0, None, 0, None
    deadline = time.monotonic() + 1800
    while got < n and time.monotonic() < deadline:
        polled = reader.poll(timeout_ms=200)
        new = sum(len(v) for v in polled.values())
        if new:
            got += new
            now = time.monotonic()
            if first_at is None:
                first_at, first_n = now, got
            last_at = now
        if proc.poll() is not None and not new and got < n and proc.returncode != 0:
            raise RuntimeError(f"{command[0]} exited with {proc.returncode}: see {log}")
    reader.close()
    if proc.poll() is None:
        if command[0] == "route":
            proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    exited = time.monotonic()
    if got < n:
        raise RuntimeError(f"{command[0]}: only {got} of {n} outputs; see {log}")
    steady = (n - first_n) / (last_at - first_at) if last_at > first_at else float("nan")
    return {"wall_s": last_at - started, "docs_per_s_wall": n / (last_at - started),
            "docs_per_s_steady": steady, "exit_s": exited - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap")
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--buckets", type=int, default=20000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--policy", default="askllm+density")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    broker = None
    work = Path(tempfile.mkdtemp(prefix="sf-bench-replay-"))
    if args.bootstrap is None:
        from streamfilter.broker import KafkaBroker, free_port

        broker = KafkaBroker(data_dir=work / "kafka", port=free_port())
        broker.start()
        args.bootstrap = broker.bootstrap
    try:
        run(args, work)
    finally:
        if broker is not None:
            broker.stop()


def run(args, work: Path) -> None:
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    from streamfilter.config import build_policy, load_config

    prefix = f"bench-replay-{uuid.uuid4().hex[:6]}"
    names = ["scored", "accepted", "rejected", "r1.accepted", "r1.rejected", "r2.accepted", "r2.rejected", "dlq"]
    topics = {k: f"{prefix}.{k}" for k in names}
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap)
    admin.create_topics([NewTopic(t, num_partitions=args.partitions, replication_factor=1,
                                  topic_configs={"max.message.bytes": str(16 * 1_048_576)}) for t in topics.values()])
    admin.close()
    config_path = work / "streamfilter.toml"
    config_path.write_text("\n".join([
        "[kafka]", f'bootstrap_servers = "{args.bootstrap}"', f'group_prefix = "{prefix}"', 'instance_id = "bench"',
        "[topics]", *(f'{k} = "{topics[k]}"' for k in ("scored", "accepted", "rejected", "dlq")),
        f"partitions = {args.partitions}",
        "[sketch]", f"rows = {args.rows}", f"buckets = {args.buckets}", f'snapshot_dir = "{work / "snapshots"}"',
        "[policy]", f'name = "{args.policy}"', "keep_rate = 0.2",
        "[route]", "min_snapshot_docs = 1",
        "[daemon]", "metrics_port = 0", ""]))
    config = load_config(config_path, env={})

    t0 = time.monotonic()
    values, records = scored_values(args.docs, args.dim)
    producer = KafkaProducer(bootstrap_servers=args.bootstrap, linger_ms=20, max_request_size=16 * 1_048_576)
    for value, record in zip(values, records):
        producer.send(topics["scored"], value=value, key=record.document.id.encode())
    producer.flush()
    producer.close()
    snapshot_id = build_snapshot(records, work / "snapshots", args.rows, args.buckets, build_policy(config))
    print(f"{args.docs} scored records (dim {args.dim}, {sum(map(len, values)) / len(values) / 1024:.1f} KiB each) "
          f"on {args.partitions} partitions, snapshot R={args.rows} B={args.buckets}, policy {args.policy}: "
          f"set-up {time.monotonic() - t0:.0f}s", flush=True)

    live_batch = config.batch.max_batch_docs
    runs = {
        f"live route (batch {live_batch})": (["route", "--config", str(config_path)],
                                               [topics["accepted"], topics["rejected"]]),
        "replay --mode route (default batch 1000)": (
            ["replay", "--config", str(config_path), "--snapshot", snapshot_id, "--output", topics["r1.accepted"],
             "--rejected-output", topics["r1.rejected"], "--progress", "none"],
            [topics["r1.accepted"], topics["r1.rejected"]]),
        f"replay --mode route --batch-docs {live_batch}": (
            ["replay", "--config", str(config_path), "--snapshot", snapshot_id, "--output", topics["r2.accepted"],
             "--rejected-output", topics["r2.rejected"], "--batch-docs", str(live_batch), "--progress", "none"],
            [topics["r2.accepted"], topics["r2.rejected"]]),
    }
    results = {}
    for label, (command, outputs) in runs.items():
        results[label] = timed(command, args.bootstrap, outputs, args.docs, work / f"{command[0]}-{len(results)}.log")
        r = results[label]
        print(f"{label:<45} steady {r['docs_per_s_steady']:>8,.0f} docs/s   wall {r['wall_s']:6.1f}s "
              f"({r['docs_per_s_wall']:,.0f} docs/s incl. start-up)", flush=True)
    live = next(iter(results.values()))
    for label, r in list(results.items())[1:]:
        print(f"{label}: {r['docs_per_s_steady'] / live['docs_per_s_steady']:.2f}x the live route (steady), "
              f"{r['docs_per_s_wall'] / live['docs_per_s_wall']:.2f}x (wall)")
    if args.json:
        args.json.write_text(json.dumps({"docs": args.docs, "dim": args.dim, "rows": args.rows,
                                         "buckets": args.buckets, "results": results}, indent=2))


if __name__ == "__main__":
    main()
