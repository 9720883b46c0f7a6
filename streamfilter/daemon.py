"""Running the long-lived stages (`streamfilter score | sketch | route | run | sink`, see `commands.run`).

From one loaded configuration: create missing topics, serves /metrics, /ready
and /live, and runs its stage(s) on an asyncio loop (uvloop) with blocking Kafka and
inference calls on worker threads. SIGTERM or SIGINT stops fetching, finishes or aborts
the open transaction, writes a last snapshot (sketch) and exits within
`daemon.shutdown_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

from streamfilter.config import Config
from streamfilter.errors import UserError

log = logging.getLogger(__name__)

STAGES = ("score", "sketch", "route")
# Larger than the broker's 1 MB default: a scored record carries the text plus its embedding,
# and the DLQ keeps oversized originals.
TOPIC_MAX_MESSAGE_BYTES = 16 * 1_048_576


def ensure_topics(config: Config, names: list[str], settings: dict[str, str] | None = None) -> None:
    """Create the topics that do not exist yet (partitions from topics.partitions), then check that
    each one the daemon writes to holds its largest records (`kafka_clients.check_topic_limits`).

    Waits, retrying with backoff, while no broker answers: a daemon may start before Kafka.
    `settings` maps each topic to the setting that names it, for the error message (default: the
    `topics.*` keys).
    """
    import time

    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    from streamfilter.kafka_clients import Backoff, SizeLimits, check_topic_limits

    backoff = Backoff(config.daemon.retry_backoff_max_s, first_s=0.5)
    while True:
        try:
            admin = KafkaAdminClient(**config.kafka_client_settings())
            break
        except KafkaError as exc:
            delay = backoff.next()
            log.warning("no Kafka broker answers at %s (kafka.bootstrap_servers): %s; retrying in %.1fs",
                        config.kafka.bootstrap_servers, exc, delay)
            time.sleep(delay)
    if settings is None:
        t = config.topics
        settings = {t.scored: "topics.scored", t.accepted: "topics.accepted", t.rejected: "topics.rejected",
                    t.dlq: "topics.dlq"}
    try:
        existing = set(admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n and n not in existing]
        if missing:
            message_bytes = max(TOPIC_MAX_MESSAGE_BYTES, SizeLimits.of(config).topic_message_bytes)
            topics = [NewTopic(n, num_partitions=config.topics.partitions, replication_factor=1,
                               topic_configs={"max.message.bytes": str(message_bytes)}) for n in missing]
            try:
                admin.create_topics(topics)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s", ", ".join(missing))
        check_topic_limits(config, admin, {settings[n]: n for n in dict.fromkeys(names) if n and n in settings})
    finally:
        admin.close()


def stage_topics(config: Config, stages) -> list[str]:
    t = config.topics
    names = []
    if "score" in stages:
        names += [t.raw, t.scored, t.dlq]
    if "sketch" in stages:
        names += [t.scored]
    if "route" in stages:
        names += [t.scored, t.accepted, t.rejected, t.dlq]
    if "sink" in stages:
        names += [config.sink.topic or t.accepted]
    return names


def build_stages(config: Config, stages, stopping: threading.Event) -> list:
    """The stage objects, each with `run(stop: asyncio.Event)`."""
    from streamfilter.density.snapshot_store import SnapshotHandoff
    from streamfilter.kafka_loop import TransactionalLoop
    from streamfilter.stages import RouteTransform, ScoreTransform, SketchAggregator

    # Sketch and route in one process: each snapshot is handed to the route as written, not read back.
    handoff = SnapshotHandoff() if "sketch" in stages and "route" in stages else None
    built = []
    if "score" in stages:
        transform = ScoreTransform.from_config(config)
        built.append(TransactionalLoop("score", config, config.topics.raw, transform, prepare=transform.load))
    if "sketch" in stages:
        built.append(SketchAggregator(config, handoff=handoff))
    if "route" in stages:
        route = RouteTransform.from_config(config, stopping, handoff=handoff)
        built.append(TransactionalLoop("route", config, config.topics.scored, route, prepare=route.wait_for_snapshot))
    if "sink" in stages:
        from streamfilter.stages.sink import ShardSink

        built.append(ShardSink(config))
    return built


async def run_async(config: Config, stages, stop: asyncio.Event, stopping: threading.Event) -> None:
    """Run the stages until `stop` is set, then give them `shutdown_timeout_s` to finish."""
    built = build_stages(config, stages, stopping)
    tasks = [asyncio.ensure_future(stage.run(stop)) for stage in built]
    stop_waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([*tasks, stop_waiter], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in done if t is not stop_waiter and t.exception() is not None]
    if failed:
        stop.set()
    stopping.set()
    _, pending = await asyncio.wait(tasks, timeout=config.daemon.shutdown_timeout_s)
    if pending:
        log.warning("shutdown: %d stage(s) did not finish within %.0fs; open transactions are left to abort",
                    len(pending), config.daemon.shutdown_timeout_s)
        for task in pending:
            task.cancel()
    stop_waiter.cancel()
    for task in failed:
        raise task.exception()


async def _ensure_topics_or_stop(config: Config, stages, stop: asyncio.Event) -> bool:
    """`ensure_topics` on a thread of its own while /live and /metrics answer and /ready says why
    the stages wait; False when `stop` is set first (the thread is a daemon: it dies with the process)."""
    from streamfilter import metrics

    reason = f"waiting for Kafka at {config.kafka.bootstrap_servers}"
    for stage in stages:
        metrics.READINESS.register(stage)
        metrics.READINESS.set(stage, False, reason)
        metrics.BROKER_UP.labels(stage).set(0)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(None)

    def work() -> None:
        try:
            ensure_topics(config, stage_topics(config, stages))
            exc = None
        except BaseException as e:  # noqa: BLE001 - handed to the event loop
            exc = e
        try:
            loop.call_soon_threadsafe(settle, exc)
        except RuntimeError:  # the loop is closed: the daemon stopped meanwhile
            pass

    threading.Thread(target=work, name="ensure-topics", daemon=True).start()
    stop_waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([done, stop_waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_waiter.cancel()
    if not done.done():
        log.info("stopped while waiting for Kafka at %s", config.kafka.bootstrap_servers)
        return False
    done.result()
    for stage in stages:
        metrics.BROKER_UP.labels(stage).set(1)
        metrics.READINESS.set(stage, False, "starting")
    return True


# setting -> (manifest kind, what `models export` takes, the folder `models build-test-models` writes)
MODEL_SOURCES = {"askllm": ("askllm", "google/flan-t5-small", "askllm-tiny"),
                 "embedder": ("embedder", "sentence-transformers/sentence-t5-base", "sentence-t5-tiny"),
                 "perplexity": ("perplexity", "MODEL", "perplexity-tiny")}


def check_model_folders(config: Config, stages) -> None:
    """The score stage's model folders hold exported models (their manifests parse); else one line
    naming the setting and how to get a model, offline or online."""
    from streamfilter.models.manifest import load_manifest

    if "score" not in stages:
        return
    for field_name, (kind, hub_model, test_folder) in MODEL_SOURCES.items():
        folder = getattr(config.models, field_name)
        if not folder:
            continue  # models.perplexity is optional
        try:
            load_manifest(folder, kind=kind)
        except UserError as exc:
            raise UserError(
                f"models.{field_name}: {exc}. Offline: `streamfilter models build-test-models --out DIR` builds "
                f"small test models (then models.{field_name} = \"DIR/{test_folder}\"); with a model hub: "
                f"`streamfilter models export {kind} --model {hub_model} --out {folder}`") from None


def run_stages(config: Config, stages, *, install_signals: bool = True, stop_event: threading.Event | None = None) -> None:
    """Blocking entry point: serve HTTP, create the topics, run the stages, stop on SIGTERM/SIGINT (or `stop_event`).

    The HTTP server starts first, so /live and /metrics answer while no broker does; /ready
    says why each stage is not ready.
    """
    from streamfilter.metrics import serve_http

    check_model_folders(config, stages)  # before any topic is created or group joined
    log.info("starting %s against %s", "+".join(stages), config.kafka.bootstrap_servers)
    server = None
    if config.daemon.metrics_port:
        try:
            server = serve_http(config.daemon.metrics_host, config.daemon.metrics_port)
        except OSError as exc:
            raise UserError(f"daemon.metrics_port: cannot listen on {config.daemon.metrics_host}:"
                            f"{config.daemon.metrics_port} ({exc.strerror})") from None
    stopping = stop_event or threading.Event()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, lambda s=sig: (log.info("received %s: stopping", s.name), stop.set()))

        async def watch_external() -> None:
            while not stopping.is_set():
                await asyncio.sleep(0.1)
            stop.set()

        watcher = asyncio.ensure_future(watch_external())
        try:
            if await _ensure_topics_or_stop(config, stages, stop):
                await run_async(config, stages, stop, stopping)
        finally:
            watcher.cancel()

    try:
        with _blas_threads(1 if "score" in stages else None):
            event_loop_runner()(main())
    finally:
        if server is not None:
            server.shutdown()


@contextlib.contextmanager
def _blas_threads(limit: int | None):
    """numpy's BLAS limited to `limit` threads (None: left alone) while the stages run.

    With the score stage in the process, ONNX Runtime's intra-op threads already use every core:
    a second BLAS thread for the sketch's hash matmul and the route's query only competes with
    them, and OpenBLAS's idle threads spin. On 2 cores one thread hashes and queries a 128-document
    batch at the paper's size with ~12% less CPU (37 vs 42 ms) in 1.6x the wall time (34 vs 21 ms),
    which the sketch and the route, beside inference rather than in its way, can afford.
    """
    if limit is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=limit, user_api="blas"):
        yield


def event_loop_runner():
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # uvloop is a runtime dependency; plain asyncio still works without it
        return asyncio.run
