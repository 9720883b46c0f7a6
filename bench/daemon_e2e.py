"""End-to-end `streamfilter run` against the bare scorers, and the daemon's peak memory.

Full-size architectures with random weights (speed does not depend on weights):
flan-t5-small for Ask-LLM and sentence-t5-base for the embedder, built and exported by
bench/models_cpu.py into .cache/bench-models/, with the paper's sketch (R=1000, B=20000).

1. bare: `AskLLMScorer.score` + `SentenceEmbedder.embed` over the documents, in-process,
   same variant, threads and batch size;
2. run:  the same documents produced to a raw topic after `streamfilter run` reports
   /ready for scoring; timed until every document is decided (accepted ∪ rejected).
   Peak RSS is the daemon's VmHWM.

Latency: for each document, the seconds from its produce call to its decision being readable
(read_committed, so committed) in the accepted or rejected topic, p50 and p99. With
`--rate` the documents arrive at that many per second instead of all at once (all at once,
a document's latency is mostly its place in the queue). Also printed: the micro-batch time
(mean poll-to-commit seconds per batch of each stage, from /metrics), and the seconds from
the first scored record being committed to the first decision.

Latency is also reported for the documents produced after the first decision (warm), and in
steady state: for those produced `SETTLE_S` (10) seconds or more after it, once the backlog that
built up while the daemon warmed up has drained.
`--bare-queue` (with `--rate`) also runs the bare scorers as a queue at the same rate, before and
after the daemon: each call takes every document waiting when the models come free, with no Kafka
and no wait. Its p99 is the tail that queueing behind documents of uneven cost gives before the
daemon adds anything, and its p99 / call is the best "p99 / micro-batch" any daemon could reach
at that load.
The daemon's CPU and wake-ups (voluntary context switches per second) are printed per thread
(names with `--py-spy`), and the CPU of the bench process and of the broker (found by the
bootstrap port) while the documents flow: both share the cores being measured. The ratios are
printed against the better of the two bare runs (the goal's) and against their mean, with how far
the two bare runs are apart: on a shared machine that is the run's noise floor.
`--py-spy FILE` records a py-spy profile of the daemon (raw collapsed stacks, all threads) while
the documents flow;
`--bare-chunks N` also times the bare scorers called on N documents at a time, as the score
stage calls them per micro-batch; `--sketch-interval-s` sets sketch.snapshot_interval_s.

    .venv/bin/python bench/daemon_e2e.py [--docs 400] [--variant int8] [--batch 32] [--rate 0]
        [--bootstrap HOST:PORT] [--py-spy profile.txt] [--bare-chunks 128] [--no-bare] [--repeats 1]
        [--bare-queue]
        [--workers 0] [--threads 0]

`--workers` and `--threads` set `models.inference_workers` and `models.intra_op_threads` for the
daemon and the bare scorers alike (0: chosen, as the daemon's defaults: one single-threaded
worker per core on CPU).

`--repeats N` makes N daemon runs, each followed by a bare run, and prints each run's ratios
against the two bare runs around it and their medians (the detailed figures are the first run's).
`--alternate SECTION.KEY=VALUE` adds that --set to every second of those runs (B), for an A/B of a
setting in one bench: medians for A and B apart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from models_cpu import build, document_sets  # noqa: E402

from streamfilter.broker import KafkaBroker, free_port  # noqa: E402


def load_scorers(askllm: Path, embedder: Path, texts: list[str], variant: str, batch: int, threads: int,
                 workers: int):
    """The Ask-LLM scorer and the embedder as the score stage loads them (`workers` and `threads` as the
    daemon's `models.inference_workers` and `models.intra_op_threads`, 0: chosen), warmed up on one batch."""
    from streamfilter.models import AskLLMScorer, SentenceEmbedder

    layout = {"intra_op_threads": threads or None, "workers": workers or None}
    scorer = AskLLMScorer.load(askllm, variant=variant, **layout)
    emb = SentenceEmbedder.load(embedder, variant=variant, dtype="float16", **layout)
    scorer.score(texts[:batch], batch_size=batch)  # warm-up
    emb.embed(texts[:batch], batch_size=batch)
    return scorer, emb


def bare(askllm: Path, embedder: Path, texts: list[str], variant: str, batch: int, threads: int,
         chunk: int = 0, workers: int = 0) -> tuple[float, float]:
    """(docs/s, CPU seconds per document) of the scorers alone, run side by side as the score stage runs them;
    `chunk` > 0 calls them on that many documents at a time, as the score stage does per micro-batch (each
    call sorts its documents by length into inference batches, so larger calls pad less). `workers` and
    `threads` as the daemon's `models.inference_workers` and `models.intra_op_threads` (0: chosen)."""
    from streamfilter.models.base import run_side_by_side

    scorer, emb = load_scorers(askllm, embedder, texts, variant, batch, threads, workers)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), chunk or len(texts)):
        part = texts[i:i + (chunk or len(texts))]
        # side by side on the shared inference workers, as the score stage runs them
        run_side_by_side({"askllm": lambda: scorer.score(part, batch_size=batch),
                          "embedder": lambda: emb.embed(part, batch_size=batch)})
    return len(texts) / (time.perf_counter() - t0), (time.process_time() - c0) / len(texts)


@dataclass
class QueueResult:
    latencies_s: np.ndarray  # per document: arrival -> its call returned
    call_seconds: np.ndarray  # per call
    call_docs: np.ndarray  # documents per call
    busy: float  # the share of the run the scorers were working


def bare_queue(askllm: Path, embedder: Path, texts: list[str], variant: str, batch: int, threads: int,
               rate: float, max_call_docs: int, workers: int = 0) -> QueueResult:
    """The bare scorers as a queue, the latency counterpart of `bare`: the documents arrive at `rate` per
    second (the daemon run's schedule); whenever the scorers are free, one call (both models side by side)
    takes every document that has arrived, up to `max_call_docs`, as the score stage's batches do while it
    is busy. No Kafka, no commits, no route, and no wait for company when idle: a document's latency here
    (arrival -> its call returned) is what the models alone, under this load, would give. Its tail is what
    queueing behind documents of uneven cost costs before the daemon adds anything."""
    from streamfilter.models.base import run_side_by_side

    scorer, emb = load_scorers(askllm, embedder, texts, variant, batch, threads, workers)
    start = time.perf_counter()
    arrivals = start + np.arange(len(texts)) / rate
    latencies, seconds, sizes = np.empty(len(texts)), [], []
    i = 0
    while i < len(texts):
        now = time.perf_counter()
        if arrivals[i] > now:
            time.sleep(arrivals[i] - now)
            continue
        j = min(len(texts), i + max_call_docs, int(np.searchsorted(arrivals, now, side="right")))
        part = texts[i:j]
        t = time.perf_counter()
        run_side_by_side({"askllm": lambda: scorer.score(part, batch_size=batch),
                          "embedder": lambda: emb.embed(part, batch_size=batch)})
        done = time.perf_counter()
        latencies[i:j] = done - arrivals[i:j]
        seconds.append(done - t)
        sizes.append(j - i)
        i = j
    return QueueResult(latencies_s=latencies, call_seconds=np.array(seconds), call_docs=np.array(sizes),
                       busy=sum(seconds) / (time.perf_counter() - start))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Steady state, for latency: documents produced this long after the first decision. The first "warm"
# documents still queue behind what piled up while the daemon warmed up (the first snapshot written, the
# route's consumer joining its group), and at a high load that backlog takes seconds to drain.
SETTLE_S = 10.0


@dataclass
class RunResult:
    docs_per_s: float
    cpu_per_doc: float  # the daemon process's CPU seconds per document
    peak_kb: int  # the daemon's VmHWM
    latencies_s: np.ndarray  # per document: produce call -> decision committed
    steady_latencies_s: np.ndarray  # the same for documents produced after the first decision (warm)
    settled_latencies_s: np.ndarray  # the same for documents produced SETTLE_S or more after the first decision
    first_decision_s: float  # first scored record committed -> first decision committed
    batch_seconds: dict = field(default_factory=dict)  # stage -> mean poll-to-commit seconds per micro-batch
    settled_batch_seconds: dict = field(default_factory=dict)  # the same over the batches of steady state
    batch_docs: dict = field(default_factory=dict)  # stage -> mean documents per micro-batch
    snapshots: int = 0
    thread_cpu_s: dict = field(default_factory=dict)  # thread id -> (CPU seconds, wake-ups/s) while the documents flowed
    broker_cpu_s: float = float("nan")  # the broker's CPU seconds while the documents flowed (same cores)
    inference_s: float = float("nan")  # wall seconds inside the models (score stage), from /metrics
    # per warm document, seconds: produce -> scored record sent (the score stage's wait and transform),
    # scored sent -> decision sent (score commit, the route's poll and transform), decision sent -> read
    # committed (the route's commit and the bench's poll); from the records' CreateTime stamps
    split_s: np.ndarray = field(default_factory=lambda: np.empty((0, 3)))
    split_produced_at: np.ndarray = field(default_factory=lambda: np.empty(0))  # their produce calls (time.time())


def listener_pid(bootstrap: str) -> int | None:
    """The pid of the local process listening on the bootstrap's port (the broker), or None (also
    for a broker on another host, whose CPU is not taken from these cores)."""
    host, _, port = bootstrap.rpartition(":")
    if host.strip("[]") not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return None
    try:
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"pid=(\d+)", out)
    return int(found.group(1)) if found else None


def process_cpu(pid: int | None) -> float:
    """`cpu_seconds(pid)`, or NaN when there is no such process (none found, or it has exited)."""
    try:
        return cpu_seconds(pid) if pid else float("nan")
    except OSError:
        return float("nan")


def bracket_ratios(run: "RunResult", before: tuple[float, float], after: tuple[float, float]) -> dict[str, float]:
    """A daemon run's ratios to the two bare runs (docs/s, CPU s/doc) around it: against the better
    of the two (the goal's) and against their mean; NaN where the bare runs were skipped."""
    (r0, c0), (r1, c1) = before, after
    return {"wall_best": run.docs_per_s / max(r0, r1), "wall_mean": 2 * run.docs_per_s / (r0 + r1),
            "cpu_best": run.cpu_per_doc / min(c0, c1), "cpu_mean": 2 * run.cpu_per_doc / (c0 + c1)}


def thread_cpu(pid: int) -> dict[int, tuple[float, int]]:
    """(CPU seconds, voluntary context switches) of each thread of a process, by thread id: how much it
    ran and how often it went to sleep, each sleep a wake-up later. Halving the wake-ups that use almost
    no CPU did not speed inference up (bench/RESULTS.md); the counts show where the rest comes from."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        sleeps = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
        out[int(task.name)] = ((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), sleeps)
    return out


def thread_names(py_spy_raw: Path) -> dict[int, str]:
    """Thread id -> Python thread name, from a py-spy raw profile ("thread (TID): NAME;...")."""
    names = {}
    for line in py_spy_raw.read_text().splitlines():
        m = re.match(r"thread \((\d+)\): ([^;]+);", line)
        if m:
            names[int(m.group(1))] = m.group(2).strip()
    return names


def record_times(bootstrap: str, topic: str, n: int, timeout_s: float = 60) -> dict[bytes, float]:
    """key -> CreateTime (seconds) of the first `n` committed records of a topic (read after the run)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, isolation_level="read_committed",
                             auto_offset_reset="earliest", enable_auto_commit=False)
    times: dict[bytes, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(times) < n and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            for r in records:
                times.setdefault(r.key, r.timestamp / 1000)
    consumer.close()
    return times


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def inference_seconds(text: str) -> float:
    """The score stage's wall seconds in its transforms (`streamfilter_transform_seconds`: the models, which run
    side by side, plus decoding and encoding the records); from a daemon older than that metric, the sum of
    `streamfilter_inference_seconds` over the models (which ran one after the other then)."""
    found = re.search(r'^streamfilter_transform_seconds_sum{stage="score"} (\S+)$', text, re.M)
    if found:
        return float(found.group(1))
    return sum(float(v) for v in re.findall(r'^streamfilter_inference_seconds_sum{model="\w+"} (\S+)$', text, re.M))


def histogram_means(text: str, name: str, since: str = "") -> dict:
    """stage -> sum / count of a per-stage Prometheus histogram; with `since` (an earlier scrape), of the
    observations made after it."""
    def totals(body: str, part: str) -> dict:
        return {m[0]: float(m[1]) for m in re.findall(rf'^{name}_{part}{{stage="(\w+)"}} (\S+)$', body, re.M)}

    sums, counts = totals(text, "sum"), totals(text, "count")
    sums0, counts0 = totals(since, "sum"), totals(since, "count")
    return {k: (sums[k] - sums0.get(k, 0.0)) / (counts[k] - counts0.get(k, 0.0))
            for k in sums if counts.get(k, 0.0) > counts0.get(k, 0.0)}


def end_to_end(bootstrap: str, askllm: Path, embedder: Path, texts: list[str], variant: str, batch: int,
               threads: int, workdir: Path, rate: float = 0.0, interval_s: float = 30.0,
               py_spy: Path | None = None, extra: list[str] = (), workers: int = 0) -> RunResult:
    import msgpack
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    prefix = f"e2e-{uuid.uuid4().hex[:6]}"
    topics = {k: f"{prefix}.{k}" for k in ("raw", "scored", "accepted", "rejected", "dlq")}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(t, num_partitions=2, replication_factor=1,
                                  topic_configs={"max.message.bytes": str(16 * 1_048_576)}) for t in topics.values()])
    admin.close()
    port = free_port()
    config = workdir / "e2e.toml"
    config.write_text("\n".join([
        "[kafka]", f'bootstrap_servers = "{bootstrap}"', f'group_prefix = "{prefix}"', 'instance_id = "bench"',
        "[topics]", *[f'{k} = "{v}"' for k, v in topics.items()],
        "[models]", f'askllm = "{askllm}"', f'embedder = "{embedder}"', f'variant = "{variant}"',
        f"inference_batch_docs = {batch}", f"intra_op_threads = {threads}",
        f"inference_workers = {workers}",
        "[batch]", f"max_batch_docs = {batch * 4}",  # max_wait_ms: the daemon's default (20; 200 before 2026-12-07)
        "[sketch]", "rows = 1000", "buckets = 20000", f'snapshot_dir = "{workdir / "snapshots"}"',
        f"snapshot_interval_s = {interval_s}",  # the default 30: a snapshot (80 MB at R=1000, B=20000) is not free
        "[policy]", 'name = "askllm+density"', "keep_rate = 0.3", "quality_keep = 0.6",
        # the daemon's overhead, not its warm-up: decide from the first snapshot on (the default waits for 4096)
        "[route]", "min_snapshot_docs = 1",
        "[daemon]", f"metrics_port = {port}",
    ]) + "\n")
    log = open(workdir / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamfilter", "run", "--config", str(config), *extra],
                            stdout=log, stderr=subprocess.STDOUT)
    spy = None
    try:
        while True:  # ready to score: models loaded, consumer assigned (route waits for a snapshot)
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1).read().decode()
            except urllib.error.HTTPError as exc:
                body = exc.read().decode()
            except OSError:
                body = ""
            if "score ready" in body:
                break
            if proc.poll() is not None:
                raise RuntimeError("the daemon exited; see " + str(workdir / "daemon.log"))
            time.sleep(0.2)
        if py_spy is not None:
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid),
                                    "--rate", "50", "--format", "raw", "--threads", "--nonblocking",
                                    "--output", str(py_spy)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        consumer = KafkaConsumer(topics["accepted"], topics["rejected"], topics["scored"], bootstrap_servers=bootstrap,
                                 isolation_level="read_committed", auto_offset_reset="earliest")
        while not consumer.assignment():
            consumer.poll(timeout_ms=100)
        sent_at: dict[bytes, float] = {}
        sent_wall: dict[bytes, float] = {}  # the same instants on the clock of the records' CreateTime
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=10 if rate <= 0 else 0)

        def produce() -> None:
            start = time.perf_counter()
            for i, text in enumerate(texts):
                if rate > 0:
                    delay = start + i / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                key = f"d{i}".encode()
                sent_at[key] = time.perf_counter()
                sent_wall[key] = time.time()
                producer.send(topics["raw"], key=key, value=msgpack.packb({"id": f"d{i}", "text": text}))
            producer.flush()

        broker_pid = listener_pid(bootstrap)
        b0 = process_cpu(broker_pid)
        t0, c0, threads0 = time.perf_counter(), cpu_seconds(proc.pid), thread_cpu(proc.pid)
        own0 = time.process_time()
        sender = threading.Thread(target=produce)
        sender.start()
        decided_at: dict[bytes, float] = {}
        decided_wall: dict[bytes, float] = {}
        decision_sent: dict[bytes, float] = {}
        first_scored = first_decided = None
        settled_metrics = ""  # /metrics when steady state begins (SETTLE_S after the first decision)
        while len(decided_at) < len(texts):
            polled = consumer.poll(timeout_ms=100)
            now, now_wall = time.perf_counter(), time.time()
            for tp, records in polled.items():
                if tp.topic == topics["scored"]:
                    # Only the first scored record's time is needed: stop fetching the topic, so that the
                    # bench's own decoding of ~2 KB records does not take CPU from the daemon it measures.
                    first_scored = first_scored or now
                    consumer.pause(*[p for p in consumer.assignment() if p.topic == topics["scored"]])
                    continue
                for r in records:
                    if r.key not in decided_at:
                        decided_at[r.key], decided_wall[r.key], decision_sent[r.key] = now, now_wall, r.timestamp / 1000
                        first_decided = first_decided or now  # the values come in time order: this is their min
            if first_decided is not None and not settled_metrics and now >= first_decided + SETTLE_S:
                settled_metrics = scrape(port)
            if proc.poll() is not None:
                raise RuntimeError("the daemon exited; see " + str(workdir / "daemon.log"))
        elapsed = time.perf_counter() - t0
        cpu_per_doc = (cpu_seconds(proc.pid) - c0) / len(texts)
        broker_cpu = process_cpu(broker_pid) - b0
        print(f"bench process CPU while the documents flowed: {time.process_time() - own0:.2f} s over {elapsed:.1f} s "
              "(producing the documents, reading the decisions' keys)", flush=True)
        threads1 = thread_cpu(proc.pid)
        sender.join()
        producer.close()
        consumer.close()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
        text = scrape(port)
        scored_sent = record_times(bootstrap, topics["scored"], len(texts))
        warm = [k for k in decided_at if sent_at[k] > first_decided and k in scored_sent]
        split = np.array([(scored_sent[k] - sent_wall[k], decision_sent[k] - scored_sent[k],
                           decided_wall[k] - decision_sent[k]) for k in warm]).reshape(-1, 3)
        snapshots = re.search(r"^streamfilter_snapshots_written_total (\S+)$", text, re.M)
        return RunResult(
            docs_per_s=len(texts) / elapsed, cpu_per_doc=cpu_per_doc, peak_kb=peak_kb, broker_cpu_s=broker_cpu,
            latencies_s=np.array([decided_at[k] - sent_at[k] for k in decided_at]),
            steady_latencies_s=np.array([decided_at[k] - sent_at[k] for k in decided_at
                                         if sent_at[k] > first_decided] or [np.nan]),
            settled_latencies_s=np.array([decided_at[k] - sent_at[k] for k in decided_at
                                          if sent_at[k] >= first_decided + SETTLE_S] or [np.nan]),
            first_decision_s=first_decided - first_scored,
            batch_seconds=histogram_means(text, "streamfilter_batch_seconds"),
            settled_batch_seconds=histogram_means(text, "streamfilter_batch_seconds", settled_metrics)
            if settled_metrics else {},
            batch_docs=histogram_means(text, "streamfilter_batch_documents"),
            snapshots=int(float(snapshots.group(1))) if snapshots else 0, inference_s=inference_seconds(text),
            split_s=split, split_produced_at=np.array([sent_wall[k] for k in warm]),
            thread_cpu_s={t: (c - threads0.get(t, (0.0, 0))[0], (w - threads0.get(t, (0.0, 0))[1]) / elapsed)
                          for t, (c, w) in threads1.items()})
    finally:
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its profile
            spy.wait(60)
        proc.terminate()
        proc.wait(60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--variant", default="int8", choices=["fp32", "int8"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0,
                        help="models.intra_op_threads, daemon and bare (0: chosen with the workers)")
    parser.add_argument("--workers", type=int, default=0,
                        help="models.inference_workers, daemon and bare (0: one per core on CPU)")
    parser.add_argument("--rate", type=float, default=0.0, help="documents per second offered (0: all at once)")
    parser.add_argument("--sketch-interval-s", type=float, default=30.0, help="sketch.snapshot_interval_s")
    parser.add_argument("--set", action="append", default=[], help="extra --set for the daemon (SECTION.KEY=VALUE)")
    parser.add_argument("--py-spy", type=Path, help="write a py-spy profile (raw, collapsed stacks) of the daemon")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare scorers (profiling runs)")
    parser.add_argument("--bare-chunks", type=int, default=0,
                        help="also time the bare scorers called on this many documents at a time (a micro-batch)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="daemon runs, each followed by a bare run (the summary gives each run's ratios "
                             "against the two bare runs around it, and their medians)")
    parser.add_argument("--alternate", action="append", default=[],
                        help="with --repeats: every second daemon run (2nd, 4th, ...) also gets this --set "
                             "(SECTION.KEY=VALUE): an A/B in one bench, with medians for each setting")
    parser.add_argument("--bare-queue", action="store_true",
                        help="with --rate: also run the bare scorers as a queue at that rate (no Kafka), before "
                             "and after the daemon run: the latency the models alone give under the same load")
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats: must be >= 1, got {args.repeats}")
    if args.alternate and (args.repeats < 2 or args.no_bare):
        parser.error("--alternate: needs --repeats 2 or more, and the bare runs")
    if args.bare_queue and args.rate <= 0:
        parser.error("--bare-queue: needs --rate (documents per second offered)")
    root = REPO / ".cache" / "bench-models"
    _, askllm = build("flan-t5-small", root)
    _, embedder = build("sentence-t5-base", root)
    texts = document_sets(0, args.docs)["web mix"]
    broker = None
    if args.bootstrap is None:
        broker = KafkaBroker(tempfile.mkdtemp(prefix="bench-broker-"), port=free_port())
        broker.start()
        args.bootstrap = broker.bootstrap
    extra = [a for kv in args.set for a in ("--set", kv)]
    alternate = [a for kv in args.alternate for a in ("--set", kv)]
    bare_rate = bare_cpu = bare_rate2 = bare_cpu2 = float("nan")
    queues = []

    def queue() -> None:
        queues.append(bare_queue(askllm, embedder, texts, args.variant, args.batch, args.threads, args.rate,
                                 args.batch * 4, workers=args.workers))  # the daemon's max_batch_docs here
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if not args.no_bare:
                bare_rate, bare_cpu = bare(askllm, embedder, texts, args.variant, args.batch, args.threads,
                                           workers=args.workers)
            if args.bare_queue:
                queue()
            res = end_to_end(args.bootstrap, askllm, embedder, texts, args.variant, args.batch, args.threads,
                             Path(tmp), rate=args.rate, interval_s=args.sketch_interval_s, py_spy=args.py_spy,
                             extra=extra, workers=args.workers)
            if args.bare_queue:
                queue()
            if not args.no_bare:
                bare_rate2, bare_cpu2 = bare(askllm, embedder, texts, args.variant, args.batch, args.threads,
                                             workers=args.workers)
            # --repeats: more daemon runs, each followed by a bare run, so that every daemon run is
            # bracketed by two bare runs and its ratios are taken against its own neighbours.
            bares, repeats = [(bare_rate, bare_cpu), (bare_rate2, bare_cpu2)], [res]
            for i in range(1, args.repeats):
                workdir = Path(tmp) / f"repeat{i}"
                workdir.mkdir()
                repeats.append(end_to_end(args.bootstrap, askllm, embedder, texts, args.variant, args.batch,
                                          args.threads, workdir, rate=args.rate, interval_s=args.sketch_interval_s,
                                          extra=extra + (alternate if i % 2 else []), workers=args.workers))
                if not args.no_bare:
                    bares.append(bare(askllm, embedder, texts, args.variant, args.batch, args.threads,
                                      workers=args.workers))
            if args.bare_chunks:
                chunk_rate, chunk_cpu = bare(askllm, embedder, texts, args.variant, args.batch, args.threads,
                                             chunk=args.bare_chunks, workers=args.workers)
    finally:
        if broker is not None:
            broker.stop()
    # The two bare runs bracket the daemon's; how far apart they are is this run's noise floor.
    ratios = bracket_ratios(res, bares[0], bares[1])
    p50, p99 = np.percentile(res.latencies_s, [50, 99])
    s50, s99 = np.percentile(res.steady_latencies_s, [50, 99])
    t50, t99 = np.percentile(res.settled_latencies_s, [50, 99])
    score_batch = res.batch_seconds.get("score", float("nan"))
    # Steady state's own batches: the warm-up's larger ones (a backlog) would flatter the ratio.
    settled_batch = res.settled_batch_seconds.get("score", float("nan"))
    print(json.dumps({"docs": args.docs, "variant": args.variant, "batch": args.batch, "threads": args.threads, "workers": args.workers,
                      "rate": args.rate, "snapshot_interval_s": args.sketch_interval_s, "set": args.set,
                      "bare_docs_per_s": [round(bare_rate, 2), round(bare_rate2, 2)],
                      "run_docs_per_s": round(res.docs_per_s, 2), "ratio_wall": round(ratios["wall_best"], 3),
                      "bare_cpu_s_per_doc": [round(bare_cpu, 4), round(bare_cpu2, 4)],
                      "run_cpu_s_per_doc": round(res.cpu_per_doc, 4),
                      "ratio_cpu_run_over_bare": round(ratios["cpu_best"], 3),
                      "ratio_wall_vs_mean_bare": round(ratios["wall_mean"], 3),
                      "ratio_cpu_vs_mean_bare": round(ratios["cpu_mean"], 3),
                      "latency_p50_s": round(p50, 2), "latency_p99_s": round(p99, 2),
                      "warm_latency_p50_s": round(s50, 2), "warm_latency_p99_s": round(s99, 2),
                      "warm_documents": int(np.isfinite(res.steady_latencies_s).sum()),
                      "steady_latency_p50_s": round(t50, 2), "steady_latency_p99_s": round(t99, 3),
                      "steady_documents": int(np.isfinite(res.settled_latencies_s).sum()),
                      "steady_batch_seconds": {k: round(v, 3) for k, v in res.settled_batch_seconds.items()},
                      "batch_seconds": {k: round(v, 3) for k, v in res.batch_seconds.items()},
                      "batch_docs": {k: round(v, 1) for k, v in res.batch_docs.items()},
                      "first_decision_after_first_scored_s": round(res.first_decision_s, 2),
                      "snapshots_written": res.snapshots, "peak_rss_mib": round(res.peak_kb / 1024),
                      "broker_cpu_s": round(res.broker_cpu_s, 2), "inference_s": round(res.inference_s, 2),
                      "warm_split_median_s": [round(float(v), 3) for v in np.median(res.split_s, axis=0)]
                      if len(res.split_s) else [],
                      "bare_queue": [{"p50_s": round(float(np.percentile(q.latencies_s, 50)), 3),
                                      "p99_s": round(float(np.percentile(q.latencies_s, 99)), 3),
                                      "call_s": round(float(q.call_seconds.mean()), 3),
                                      "call_docs": round(float(q.call_docs.mean()), 2), "busy": round(q.busy, 3)}
                                     for q in queues]}))
    print(f"bare scorers (flan-t5-small + sentence-t5-base): {bare_rate:.1f} and {bare_rate2:.1f} docs/s "
          "(before and after the daemon run)")
    print(f"streamfilter run end to end:                     {res.docs_per_s:.1f} docs/s"
          + (f" ({args.rate:g} docs/s offered)" if args.rate > 0 else " (all documents at once)"))
    print(f"ratio run / bare (best bare): {ratios['wall_best']:.2f} (goal >= 0.9)")
    print(f"the bare runs differ by {abs(bare_rate - bare_rate2) / min(bare_rate, bare_rate2):.0%} (docs/s) and "
          f"{abs(bare_cpu - bare_cpu2) / min(bare_cpu, bare_cpu2):.0%} (CPU s/doc); against their mean: ratio "
          f"{ratios['wall_mean']:.2f}, CPU {ratios['cpu_mean']:.2f}")
    # On a shared machine wall-clock rates swing with the neighbours' load; CPU time per
    # document does much less: the same ratio from the cost of a document in each setting.
    print(f"CPU s/document: bare {bare_cpu:.3f} and {bare_cpu2:.3f}, run {res.cpu_per_doc:.3f} (the daemon process, "
          f"not the broker); ratio run / bare: {ratios['cpu_best']:.2f} (goal <= 1.1)")
    print(f"latency produce -> decision committed: p50 {p50:.2f} s, p99 {p99:.2f} s; micro-batch time "
          + ", ".join(f"{k} {v:.2f} s ({res.batch_docs.get(k, 0):.0f} docs)"
                      for k, v in sorted(res.batch_seconds.items()))
          + f"; p99 / score micro-batch {p99 / score_batch:.1f}")
    print(f"latency of the documents produced after the first decision (warm, "
          f"{int(np.isfinite(res.steady_latencies_s).sum())} documents): p50 {s50:.2f} s, p99 {s99:.2f} s; "
          f"p99 / score micro-batch {s99 / score_batch:.1f}")
    print(f"latency in steady state (produced {SETTLE_S:g} s or more after the first decision, "
          f"{int(np.isfinite(res.settled_latencies_s).sum())} documents): p50 {t50:.2f} s, p99 {t99:.2f} s; "
          f"score micro-batch then {settled_batch:.3f} s; p99 / that {t99 / settled_batch:.1f} (goal <= 3, with --rate)")
    if len(res.split_s):
        # Where a warm document's time goes, for the typical one and for the slowest 1%.
        total_s = res.split_s.sum(axis=1)
        slow = res.split_s[total_s >= np.percentile(total_s, 99)]
        typical = np.median(res.split_s, axis=0)
        print("warm latency split, score (wait + transform) / score commit + route / route commit + read: median "
              + " / ".join(f"{v:.2f}" for v in typical) + f" s; the slowest 1% ({len(slow)} documents), mean "
              + " / ".join(f"{v:.2f}" for v in slow.mean(axis=0)) + " s")
    for i, q in enumerate(queues):
        # The same load on the models alone: how much of the tail is queueing that no daemon could avoid.
        q50, q99 = np.percentile(q.latencies_s, [50, 99])
        print(f"bare scorers as a queue at {args.rate:g} docs/s ({'before' if i == 0 else 'after'} the daemon run; "
              f"no Kafka): p50 {q50:.2f} s, p99 {q99:.2f} s; calls {q.call_seconds.mean():.2f} s "
              f"({q.call_docs.mean():.1f} docs), busy {q.busy:.0%}; p99 / call {q99 / q.call_seconds.mean():.1f}; "
              f"the daemon's steady p99 / this p99 {t99 / q99:.2f}")
    print(f"first decision {res.first_decision_s:.2f} s after the first scored record (goal <= 5); "
          f"{res.snapshots} snapshots written")
    if args.bare_chunks:
        print(f"bare scorers called {args.bare_chunks} documents at a time: {chunk_rate:.1f} docs/s, "
              f"{chunk_cpu:.3f} CPU s/document (run / this: {res.cpu_per_doc / chunk_cpu:.2f})")
    print(f"broker CPU while the documents flowed: {res.broker_cpu_s:.2f} s (the same cores)")
    # Time inside the models, against the bare scorers (which are nothing but that time): how much
    # slower inference itself runs beside the daemon's other threads and the broker.
    # The share of the run the score stage spent transforming (its utilisation at an offered --rate): the
    # latency tail is queueing behind documents of uneven cost, and it grows fast as this nears 100%.
    wall_s = args.docs / res.docs_per_s
    print(f"inside the models: {res.inference_s:.1f} s of the run's {wall_s:.1f} s "
          f"(the score stage busy {100 * res.inference_s / wall_s:.0f}% of the time), "
          f"{args.docs / res.inference_s:.2f} docs/s there against the bare runs' {bare_rate:.2f} and {bare_rate2:.2f}")
    if len(repeats) > 1 and not args.no_bare:
        print(f"{len(repeats)} daemon runs, each against the two bare runs around it (best, mean):")
        each = [bracket_ratios(run, bares[i], bares[i + 1]) for i, run in enumerate(repeats)]
        labels = [("B" if i % 2 else "A") if alternate else "" for i in range(len(repeats))]
        for i, (run, r) in enumerate(zip(repeats, each)):
            print(f"  run {i + 1}{labels[i]}: {run.docs_per_s:.2f} docs/s ({args.docs / run.inference_s:.2f} inside the models), "
                  f"{run.cpu_per_doc:.4f} CPU s/doc, broker "
                  f"{run.broker_cpu_s:.1f} s; bare {bares[i][0]:.2f} and {bares[i + 1][0]:.2f} docs/s; "
                  f"wall {r['wall_best']:.3f}, {r['wall_mean']:.3f}; CPU {r['cpu_best']:.3f}, {r['cpu_mean']:.3f}")
        groups = {"": each} if not alternate else {
            f" A ({' '.join(args.set) or 'as configured'})": each[0::2], f" B (+ {' '.join(args.alternate)})": each[1::2]}
        for label, runs in groups.items():
            med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            print(f"  medians{label}: wall {med['wall_best']:.3f}, {med['wall_mean']:.3f} (goal >= 0.9); "
                  f"CPU {med['cpu_best']:.3f}, {med['cpu_mean']:.3f} (goal <= 1.1)")
    print(f"peak RSS of `run` (paper sketch R=1000 B=20000): {res.peak_kb / 1024:.0f} MiB")
    names = thread_names(args.py_spy) if args.py_spy and args.py_spy.exists() else {}
    total = sum(cpu for cpu, _ in res.thread_cpu_s.values())
    wakes = sum(w for _, w in res.thread_cpu_s.values())
    print("daemon CPU and wake-ups by thread while the documents flowed (threads without a Python name: "
          f"ONNX Runtime's pools; names with --py-spy); {wakes:.0f} wake-ups/s in all:")
    busiest = sorted(res.thread_cpu_s.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))
    for tid, (cpu, wake) in [t for t in busiest if t[1][0] > 0.05 or t[1][1] >= 1][:20]:
        print(f"  {cpu:7.1f} s  {cpu / total:5.1%}  {wake:6.1f}/s  {names.get(tid, f'thread {tid}')}")


if __name__ == "__main__":
    main()
