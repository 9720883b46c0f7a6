"""`streamfilter demo`: the main job on an embedded default, end to end on one machine.

Starts the local Kafka broker, finds models (exported ones in onnx_models/, else the
offline models: a tiny random-weight Flan-T5 for Ask-LLM and the real all-MiniLM-L6-v2
embedder for density), writes a sample crawl (Wikipedia summaries mixed with generated
junk and a few malformed records), runs score → sketch → route until the sample is
drained, prints what happened and how to look at the topics with kcat, and stops the
broker (unless --keep-broker).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import random
import threading
import time
from pathlib import Path

from streamfilter.errors import UserError

log = logging.getLogger(__name__)

REAL_MODELS = (Path("onnx_models/flan-t5-small"), Path("onnx_models/sentence-t5-base"))
MALFORMED = [b"\xff\xfe not a document", b'{"id": "broken", "text": ""}', b'{"id": "no-text"}',
             b'{"id": "typed", "text": 42}', b"[1, 2, 3]"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="start a local broker and run the pipeline on a sample crawl",
                                   description=__doc__.split("\n\n")[1])
    parser.add_argument("--docs", type=int, default=2000, help="documents in the sample crawl (default 2000)")
    parser.add_argument("--port", type=int, default=19092, help="local broker port (default 19092)")
    parser.add_argument("--data-dir", type=Path, default=Path(".cache/demo"),
                        help="broker data, snapshots and logs (default .cache/demo)")
    parser.add_argument("--policy", default="askllm+density", help="a policy.name (default askllm+density)")
    parser.add_argument("--keep-rate", type=float, default=0.3)
    parser.add_argument("--timeout-s", type=float, default=900, help="give up after this long")
    parser.add_argument("--keep-broker", action="store_true", help="leave the broker running to inspect the topics")
    parser.set_defaults(handler=run_demo)


def find_models() -> tuple[Path, Path, bool]:
    """(askllm dir, embedder dir, real?) — exported models when present, else the offline ones: the tiny
    random-weight Ask-LLM test model and the real all-MiniLM-L6-v2 embedder (so density is real)."""
    if all((p / "manifest.json").is_file() for p in REAL_MODELS):
        return REAL_MODELS[0], REAL_MODELS[1], True
    from streamfilter.models import ensure_test_models

    models = ensure_test_models()
    return models.askllm, models.minilm, False


def sample_crawl(n: int, seed: int = 0) -> tuple[list[bytes], dict[str, dict]]:
    """Raw values (msgpack) for n documents, ~3/4 Wikipedia and ~1/4 junk, plus a few malformed ones."""
    import msgpack

    from streamfilter.corpus import junk_documents, wiki_documents

    rng = random.Random(seed)
    wiki = rng.sample(wiki_documents(), min(n - n // 4, len(wiki_documents())))
    docs = {}
    for i, d in enumerate(wiki):
        docs[f"wiki-{i}"] = {"id": f"wiki-{i}", "url": f"https://en.wikipedia.org/wiki/{d.id[5:].replace(' ', '_')}",
                             "text": d.text, "lang": "en", "meta": {"topic": d.topic}}
    for i, d in enumerate(junk_documents(n - len(wiki), seed=seed)):
        docs[f"junk-{i}"] = {"id": f"junk-{i}", "url": f"https://spam.example/{i}", "text": d.text,
                             "meta": {"topic": d.topic}}
    values = [msgpack.packb(d) for d in docs.values()] + MALFORMED
    rng.shuffle(values)
    return values, docs


def run_demo(args: argparse.Namespace) -> int:
    from streamfilter.broker import KafkaBroker

    if args.docs < 20:
        raise UserError(f"--docs must be at least 20, got {args.docs}")
    data_dir = args.data_dir.resolve()
    broker = KafkaBroker(data_dir / "broker", port=args.port)
    print(f"[1/5] starting the local Kafka broker ({data_dir / 'broker'}) ...", flush=True)
    was_running = broker.status().running
    status = broker.start()
    print(f"      {status.describe()}")
    keep = args.keep_broker or was_running  # a broker the demo did not start is not the demo's to stop
    try:
        return _demo(args, broker, data_dir, keep)
    finally:
        if not keep:
            broker.stop()


def _demo(args: argparse.Namespace, broker, data_dir: Path, keep_broker: bool) -> int:
    from kafka import KafkaProducer

    from streamfilter import metrics
    from streamfilter.config import load_config
    from streamfilter.daemon import STAGES, run_stages

    print("[2/5] finding models ...", flush=True)
    askllm, embedder, real = find_models()
    if real:
        print(f"      exported models: {askllm}, {embedder}")
    else:
        print(f"      no exported models in onnx_models/: using the offline models in {askllm.parent}:\n"
              f"      density: the real all-MiniLM-L6-v2 embedder ({embedder.name}), so the coverage figures are real;\n"
              f"      Ask-LLM: a tiny Flan-T5 with RANDOM WEIGHTS ({askllm.name}), so its scores mean NOTHING.\n"
              "      Where a model hub is reachable, export real ones with\n"
              "      `streamfilter models export askllm --model google/flan-t5-small --out onnx_models/flan-t5-small`\n"
              "      and `streamfilter models export embedder --model sentence-transformers/sentence-t5-base "
              "--out onnx_models/sentence-t5-base`.")

    run_id = time.strftime("%Y%m%d-%H%M%S")
    prefix = f"demo-{run_id}"
    values, docs = sample_crawl(args.docs)
    overrides = [
        f"kafka.bootstrap_servers={broker.bootstrap}", f"kafka.group_prefix={prefix}", "kafka.instance_id=demo",
        f"topics.raw={prefix}.raw", f"topics.scored={prefix}.scored", f"topics.accepted={prefix}.accepted",
        f"topics.rejected={prefix}.rejected", f"topics.dlq={prefix}.dlq", "topics.partitions=2",
        f"models.askllm={askllm}", f"models.embedder={embedder}",
        f"sketch.snapshot_dir={data_dir / 'snapshots' / run_id}", "sketch.snapshot_interval_s=2",
        f"policy.name={args.policy}", f"policy.keep_rate={args.keep_rate}",
        # the paper's second pass: route once the sketch has seen the whole sample
        f"route.min_snapshot_docs={len(docs)}", "route.snapshot_poll_s=1", "daemon.metrics_port=0",
    ]
    from streamfilter.policies import policy_class

    if policy_class(args.policy).has_quality_gate:
        overrides.append(f"policy.quality_keep={min(1.0, max(args.keep_rate, args.keep_rate ** 0.5))}")
    config = load_config(overrides=overrides, env={})

    print(f"[3/5] writing a sample crawl of {len(docs)} documents and {len(MALFORMED)} malformed records "
          f"to {config.topics.raw} ...", flush=True)
    from streamfilter.daemon import ensure_topics, stage_topics

    ensure_topics(config, stage_topics(config, STAGES))
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20)
    for value in values:
        producer.send(config.topics.raw, value=value)
    producer.flush()
    producer.close()

    print("[4/5] running score → sketch → route until the sample is drained ...", flush=True)
    stop = threading.Event()
    errors: list[BaseException] = []

    def pipeline() -> None:
        try:
            run_stages(config, STAGES, install_signals=False, stop_event=stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            stop.set()

    thread = threading.Thread(target=pipeline, name="pipeline")
    t0 = time.monotonic()
    thread.start()
    total = len(values)
    done = 0
    try:
        while thread.is_alive() and done < total:
            if time.monotonic() - t0 > args.timeout_s:
                raise UserError(f"the demo did not finish within {args.timeout_s:.0f}s")
            time.sleep(1)
            done = _routed(metrics)
            print(f"      {done}/{total} documents decided ({time.monotonic() - t0:.0f}s)", end="\r", flush=True)
    finally:
        stop.set()
        thread.join()
    print()
    if errors:
        raise errors[0]
    elapsed = time.monotonic() - t0
    print(f"[5/5] done in {elapsed:.0f}s ({len(values) / elapsed:.0f} documents/s end to end)\n")
    summarize(config, docs, real)
    kcat = (f"  kcat -C -b {broker.bootstrap} -t {config.topics.accepted} -X isolation.level=read_committed -e "
            "-f '%k %h\\n'\n"
            f"  kcat -C -b {broker.bootstrap} -t {config.topics.dlq} -e -f '%h\\n'")
    if keep_broker:
        print(f"\nThe broker keeps running. Look at the output with kcat:\n{kcat}\n"
              f"Stop it with: streamfilter broker stop --data-dir {data_dir / 'broker'}")
    else:
        print("\nThe broker is stopped at exit; its data stays in "
              f"{data_dir / 'broker'}. Run with --keep-broker to look at the topics with kcat, e.g.\n{kcat}")
    return 0


def _routed(metrics) -> int:
    def value(stage: str, outcome: str) -> float:
        return metrics.DOCUMENTS.labels(stage, outcome)._value.get()

    return int(value("route", "accepted") + value("route", "rejected") + value("route", "dlq")
               + value("score", "dlq"))


def summarize(config, docs: dict[str, dict], real: bool) -> None:
    import msgpack
    from kafka import KafkaConsumer

    topics = [config.topics.accepted, config.topics.rejected, config.topics.dlq]
    consumer = KafkaConsumer(*topics, bootstrap_servers=config.kafka.bootstrap_servers, group_id=None,
                             auto_offset_reset="earliest", isolation_level="read_committed",
                             consumer_timeout_ms=3000)
    by_topic = collections.defaultdict(list)
    for record in consumer:
        by_topic[record.topic].append(record)
    consumer.close()
    accepted, rejected, dlq = (by_topic[t] for t in topics)
    n = len(accepted) + len(rejected)
    print(f"decisions: {len(accepted)} accepted, {len(rejected)} rejected, {len(dlq)} to the DLQ")
    print(f"accept rate {len(accepted) / max(n, 1):.3f} against a target of {config.policy.keep_rate:.3f} "
          f"(policy {config.policy.name})")
    reasons = collections.Counter(dict(r.headers).get("sf-dlq-reason", b"?").decode() for r in dlq)
    print("DLQ reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    kinds = collections.Counter()
    for r in accepted:
        kinds["junk" if msgpack.unpackb(r.value)["id"].startswith("junk") else "wiki"] += 1
    total_kinds = collections.Counter("junk" if i.startswith("junk") else "wiki" for i in docs)
    print("kept share: " + ", ".join(f"{k} {kinds[k]}/{total_kinds[k]} ({kinds[k] / max(total_kinds[k], 1):.0%})"
                                     for k in ("wiki", "junk")))
    # the expected kept mix (each decision's keep probability, from its header): no coin-flip noise
    kept_topics: collections.Counter = collections.Counter()
    for r in accepted + rejected:
        doc_id = msgpack.unpackb(r.value)["id"]
        if doc_id.startswith("wiki"):
            kept_topics[docs[doc_id]["meta"]["topic"]] += float(dict(r.headers)["sf-probability"])
    input_topics = collections.Counter(d["meta"]["topic"] for i, d in docs.items() if i.startswith("wiki"))
    kl_kept, kl_input = topic_kl(kept_topics, input_topics), topic_kl(input_topics, input_topics)
    print(f"coverage of the {len(input_topics)} Wikipedia topics (embedder {'exported' if real else 'all-MiniLM-L6-v2'}): "
          f"KL(expected kept topic mix ‖ uniform) {kl_kept:.3f} against the input's {kl_input:.3f}, ratio "
          f"{kl_kept / kl_input if kl_input else float('nan'):.2f} (random sampling keeps the input's mix: 1.0; "
          "lower is more even)")
    scored = sorted(((float(dict(r.headers)["sf-askllm"]), msgpack.unpackb(r.value)) for r in accepted + rejected),
                    key=lambda x: x[0])
    note = "" if real else "  (Ask-LLM here has RANDOM WEIGHTS: these scores mean nothing)"
    print(f"\nhighest Ask-LLM P(yes){note}:")
    for score, doc in reversed(scored[-3:]):
        print(f"  {score:.4f}  {doc['id']:<10} {json.dumps(doc['text'][:90], ensure_ascii=False)}")
    print("lowest Ask-LLM P(yes):")
    for score, doc in scored[:3]:
        print(f"  {score:.4f}  {doc['id']:<10} {json.dumps(doc['text'][:90], ensure_ascii=False)}")


def topic_kl(counts: collections.Counter, topics: collections.Counter) -> float:
    """KL divergence (nats) of the mix `counts` over the topics of `topics` from the uniform mix."""
    import math

    total = sum(counts.values())
    if not total:
        return float("nan")
    return sum((c / total) * math.log((c / total) * len(topics)) for c in counts.values() if c)
