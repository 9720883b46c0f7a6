"""The one configuration object: TOML file, then STREAMFILTER_* environment, then CLI flags.

Validated once at start-up; every error names the field (`section.key`). Nothing else in
the package reads settings from the environment. Frozen once loaded: a command that needs a
variant (a replay's output topics) derives one with `dataclasses.replace`.

    [kafka]   bootstrap_servers, client settings passed through (security_protocol, sasl_*, ssl_*)
    [topics]  raw, scored, accepted, rejected ("" = do not write rejected), dlq
    ...

Environment: STREAMFILTER_<SECTION>_<KEY>, e.g. STREAMFILTER_POLICY_KEEP_RATE=0.2,
STREAMFILTER_KAFKA_BOOTSTRAP_SERVERS=broker:9092. CLI: `--set section.key=value`
(repeatable) and the few named flags each command offers.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import socket
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from streamfilter.errors import ConfigError

ENV_PREFIX = "STREAMFILTER_"
# Kubernetes injects these for every Service in the namespace (enableServiceLinks, on by default):
# a Service named `streamfilter-metrics` sets STREAMFILTER_METRICS_SERVICE_HOST, _SERVICE_PORT,
# _PORT=tcp://10.0.0.7:9308, _PORT_9308_TCP_ADDR, ... They are not settings.
_SERVICE_LINK_NAME = re.compile(r"_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)$")
_SERVICE_LINK_VALUE = re.compile(r"^(tcp|udp|sctp)://[^\s]+:\d+$")

log = logging.getLogger(__name__)

# kafka-python client settings that may be passed through verbatim (security and tuning).
KAFKA_PASSTHROUGH = {
    "security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
    "sasl_kerberos_service_name", "sasl_kerberos_domain_name", "sasl_oauth_token_provider",
    "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_check_hostname", "ssl_crlfile",
    "ssl_ciphers", "client_id", "request_timeout_ms", "retry_backoff_ms", "reconnect_backoff_ms",
    "reconnect_backoff_max_ms", "connections_max_idle_ms", "metadata_max_age_ms", "api_version",
}


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    # Stable per process across restarts: the transactional id is derived from it, so a
    # restarted daemon fences its crashed predecessor's open transaction at once.
    instance_id: str = field(default_factory=socket.gethostname)
    group_prefix: str = "streamfilter"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    transaction_timeout_ms: int = 30_000
    max_poll_records: int = 500
    fetch_max_bytes: int = 52_428_800
    # The producer's record batch per partition (kafka-python's batch_size). One batch per partition
    # goes into each produce request, so kafka-python's 16 KiB default sends a large micro-batch's
    # outputs as hundreds of sequential requests.
    producer_batch_bytes: int = 1_048_576
    client: dict[str, typing.Any] = field(default_factory=dict)  # passthrough, see KAFKA_PASSTHROUGH


@dataclass(frozen=True)
class TopicsConfig:
    raw: str = "crawl.raw"
    scored: str = "crawl.scored"
    accepted: str = "crawl.accepted"
    rejected: str = "crawl.rejected"  # "" to drop rejected documents (they are still counted)
    dlq: str = "crawl.dlq"
    partitions: int = 4  # used when streamfilter creates a missing topic


@dataclass(frozen=True)
class ModelsConfig:
    askllm: str = "onnx_models/flan-t5-small"
    embedder: str = "onnx_models/sentence-t5-base"
    perplexity: str = ""  # optional: a perplexity model folder; scored records then carry mean NLL
    max_tokens: int = 512
    variant: str = "auto"  # auto | fp32 | int8
    # Inference batches run at once (each by one thread on the model's one session) and the threads
    # each run uses; 0 = chosen (models.runtime.thread_layout): on CPU one worker per core, each
    # single-threaded; on a GPU one worker. Given one, the other divides the cores by it.
    inference_workers: int = 0
    intra_op_threads: int = 0
    inference_batch_docs: int = 32
    # The most padded tokens in one inference batch; 0: the model's default for its device
    # (on CPU ~1M hidden values: flan-t5-small 2048, sentence-t5-base 1280; no limit on a GPU).
    inference_batch_tokens: int = 0


@dataclass(frozen=True)
class BatchConfig:
    # A micro-batch (one transaction) closes on size, or once max_wait_ms has passed and the batch
    # before it is transformed (under load it takes in what arrives meanwhile). Its size adapts: it starts at
    # base_batch_docs and doubles with each batch that fills while input is waiting (a backlog),
    # up to max_batch_docs or max_batch_bytes, as long as the previous batch's transform took less
    # than half of target_batch_ms; batches that close on time (input is not waiting) halve it back.
    base_batch_docs: int = 256  # the size at low load (clipped to max_batch_docs)
    max_batch_docs: int = 4096
    max_batch_bytes: int = 67_108_864  # 64 MiB of input values: a batch of large documents closes earlier
    target_batch_ms: int = 1000
    # How long a batch waits for company while its stage is idle (a busy stage's batch fills while it
    # works). Little buys more latency than efficiency: on 2 CPU cores at 4 and 8 docs/s, 20 ms
    # halved p50 and lowered p99 against 200 (bench/RESULTS.md, "Latency at a steady load").
    max_wait_ms: int = 20


@dataclass(frozen=True)
class RecordsConfig:
    # Larger raw values go to the DLQ as too_large. 1 MB: with its headroom a record fits the broker's
    # default max.message.bytes (1048588), which start-up checks (kafka_clients.check_topic_limits).
    max_doc_bytes: int = 1_000_000


@dataclass(frozen=True)
class SketchConfig:
    rows: int = 1000  # paper: R=1000
    buckets: int = 20000  # paper: B=20000
    k: int = 0  # 0 = the density package's measured default
    width: float = 0.0  # 0 = calibrated on the first `calibration_docs` documents, then stored in the snapshots
    calibration_docs: int = 1000  # documents the width is calibrated on (and a configured width checked against)
    leave_one_out: bool = True  # a document's density excludes its own count (bench/RESULTS.md, issue 13)
    hash_seed: int = 0
    reservoir_size: int = 0  # 0 = the density package's default
    snapshot_dir: str = ".cache/snapshots"
    snapshot_interval_s: float = 30.0
    keep_snapshots: int = 3


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "askllm+density"
    keep_rate: float = 0.2
    quality_keep: float = 0.5  # a policy with a quality gate (askllm+density): the fraction passing it
    seed: int = 0


@dataclass(frozen=True)
class OutputConfig:
    # The values of accepted, rejected and DLQ records: "msgpack" (the document map; the decision in
    # headers) or "json" (one UTF-8 object per record: the document, decision, scores, provenance).
    format: str = "msgpack"
    # Input headers carried through to accepted/rejected records: "*" all, "" none, or a comma list
    # of names (streamfilter's own sf-* headers are never carried).
    input_headers: str = "*"


@dataclass(frozen=True)
class RouteConfig:
    emit_rejected: bool = True
    # Wait for a snapshot covering at least this many documents: decisions against a younger sketch
    # keep the right fraction but lose coverage (bench/RESULTS.md, "Warm-up"); 4096 = the reservoir's size.
    min_snapshot_docs: int = 4096
    snapshot_poll_s: float = 5.0


@dataclass(frozen=True)
class SinkConfig:
    # `streamfilter sink`: the accepted topic as training-ready shards (README, "Training-ready shards").
    path: str = ".cache/shards"  # a local folder or any fsspec URL (file://, memory://, s3://...)
    format: str = "parquet"  # parquet | jsonl (JSON lines, zstd)
    topic: str = ""  # the topic to read; "" = topics.accepted
    shard_max_docs: int = 100_000  # a partition's shard rolls at this many records...
    shard_max_bytes: int = 268_435_456  # ...or this many bytes of record values (256 MiB)...
    roll_interval_s: float = 300.0  # ...or when its first record has waited this long
    compression_level: int = 3  # zstd level, 1-22
    until_end: bool = False  # one-shot: stop at the end offsets found at start, write the _SUCCESS manifest


@dataclass(frozen=True)
class DaemonConfig:
    metrics_port: int = 9308  # 0 = no HTTP server
    metrics_host: str = "127.0.0.1"
    shutdown_timeout_s: float = 30.0
    # Backoff between retries of a failing broker; kept short so progress resumes within seconds
    # of the broker's return.
    retry_backoff_max_s: float = 5.0
    # Fault injection for chaos tests: the probability that a transactional stage SIGKILLs its own
    # process between send_offsets_to_transaction and commit_transaction (0 = never).
    crash_before_commit: float = 0.0


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    sketch: SketchConfig = field(default_factory=SketchConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    route: RouteConfig = field(default_factory=RouteConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)

    def __post_init__(self) -> None:
        # The one place that decides whether rejected documents are written: `route.emit_rejected = false`
        # is `topics.rejected = ""`, however the configuration was built.
        if not self.route.emit_rejected and self.topics.rejected:
            object.__setattr__(self, "topics", dataclasses.replace(self.topics, rejected=""))

    def kafka_client_settings(self) -> dict[str, typing.Any]:
        # kafka-python backs reconnects off up to 30 s, so a client could still be waiting that long
        # after a broker came back; 1 s keeps recovery within seconds (kafka.reconnect_backoff_max_ms overrides).
        return {"bootstrap_servers": self.kafka.bootstrap_servers.split(","), "reconnect_backoff_max_ms": 1000,
                **self.kafka.client}

    def group(self, stage: str) -> str:
        return f"{self.kafka.group_prefix}.{stage}"

    def transactional_id(self, stage: str) -> str:
        return f"{self.kafka.group_prefix}.{stage}.{self.kafka.instance_id}"


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
SECTIONS_TYPES = {f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}


def load_config(
    path: str | os.PathLike | None = None,
    env: typing.Mapping[str, str] | None = None,
    overrides: typing.Sequence[str] = (),
) -> Config:
    """Build and validate the configuration: defaults < TOML file < environment < `section.key=value` overrides."""
    values: dict[str, dict[str, typing.Any]] = {section: {} for section in SECTIONS}
    client: dict[str, typing.Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, items in data.items():
            if not isinstance(items, dict):
                raise ConfigError(f"{section}: expected a [{section}] table")
            for key, value in items.items():
                _set(values, client, section, key, value, source=str(path))
    for name, value in sorted((env if env is not None else os.environ).items()):
        if name.startswith(ENV_PREFIX):
            section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
            if _is_service_link(name, value, section, key):
                log.debug("ignoring %s: a Kubernetes service-link variable, not a setting", name)
                continue
            _set(values, client, section, key, value, source=name)
    for item in overrides:
        dotted, sep, value = item.partition("=")
        section, _, key = dotted.strip().partition(".")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set(values, client, section, key, value, source="--set")
    values["kafka"]["client"] = client
    config = Config(**{section: SECTIONS_TYPES[section](**items) for section, items in values.items()})
    validate(config)
    return config


def _is_known(section: str, key: str) -> bool:
    if section not in SECTIONS:
        return False
    return (section == "kafka" and key in KAFKA_PASSTHROUGH) or (
        key != "client" and key in {f.name for f in dataclasses.fields(SECTIONS_TYPES[section])})


def _is_service_link(name: str, value: str, section: str, key: str) -> bool:
    """A variable Kubernetes set for a Service (named like one, and not a setting, or valued `tcp://host:port`)."""
    if not _SERVICE_LINK_NAME.search(name):
        return False
    return not _is_known(section, key) or bool(_SERVICE_LINK_VALUE.match(str(value)))


def _set(values: dict[str, dict[str, typing.Any]], client: dict[str, typing.Any], section: str, key: str,
         value: typing.Any, source: str) -> None:
    if section not in SECTIONS:
        close = difflib.get_close_matches(section, SECTIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{section}.{key} ({source}): unknown section {section!r}{hint}; "
                          f"known: {', '.join(SECTIONS)}")
    kind = SECTIONS_TYPES[section]
    if section == "kafka" and key in KAFKA_PASSTHROUGH:
        client[key] = _coerce(value, typing.Any, f"kafka.{key}")
        return
    fields = {f.name: f for f in dataclasses.fields(kind)}
    if key not in fields or key == "client":
        raise ConfigError(f"{section}.{key} ({source}): unknown setting; known: {', '.join(sorted(fields))}")
    values[section][key] = _coerce(value, typing.get_type_hints(kind)[key], f"{section}.{key}")


def _coerce(value: typing.Any, kind: typing.Any, name: str) -> typing.Any:
    """Convert strings from the environment or CLI to the field's type; check TOML values' types."""
    if kind is typing.Any:
        if isinstance(value, str):
            low = value.lower()
            if low in ("true", "false"):
                return low == "true"
            try:
                return int(value)
            except ValueError:
                return value
        return value
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{name}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def validate(config: Config) -> None:
    """Range checks that types cannot express; each error names its field."""

    def check(ok: bool, name: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{name}: {message}, got {_lookup(config, name)!r}")

    check(bool(config.kafka.bootstrap_servers.strip()), "kafka.bootstrap_servers", "must name at least one broker")
    check(bool(config.kafka.instance_id.strip()), "kafka.instance_id", "must not be empty")
    for name in ("raw", "scored", "accepted", "dlq"):
        check(bool(getattr(config.topics, name).strip()), f"topics.{name}", "must not be empty")
    check(3_000 <= config.kafka.transaction_timeout_ms <= 900_000, "kafka.transaction_timeout_ms",
          "must be in [3000, 900000] (the broker's transaction.max.timeout.ms default caps it at 15 minutes)")
    check(config.topics.partitions >= 1, "topics.partitions", "must be >= 1")
    check(config.models.max_tokens >= 64, "models.max_tokens", "must be >= 64 (the prompt alone takes ~60 tokens)")
    check(config.models.variant in ("auto", "fp32", "int8"), "models.variant", "must be auto, fp32 or int8")
    check(config.models.inference_workers >= 0, "models.inference_workers", "must be >= 0 (0: one per core on CPU)")
    check(config.models.intra_op_threads >= 0, "models.intra_op_threads", "must be >= 0 (0: chosen with the workers)")
    check(config.models.inference_batch_docs >= 1, "models.inference_batch_docs", "must be >= 1")
    check(config.models.inference_batch_tokens >= 0, "models.inference_batch_tokens",
          "must be >= 0 (0: the model's default for its device)")
    check(config.batch.max_batch_docs >= 1, "batch.max_batch_docs", "must be >= 1")
    check(config.kafka.producer_batch_bytes >= 1024, "kafka.producer_batch_bytes", "must be >= 1024")
    check(config.batch.base_batch_docs >= 1, "batch.base_batch_docs", "must be >= 1")
    check(config.batch.max_batch_bytes >= 1, "batch.max_batch_bytes", "must be >= 1")
    check(config.batch.target_batch_ms > 0, "batch.target_batch_ms", "must be > 0")
    check(config.batch.max_wait_ms >= 0, "batch.max_wait_ms", "must be >= 0")
    check(config.records.max_doc_bytes >= 64, "records.max_doc_bytes", "must be >= 64")
    check(config.sketch.rows >= 1, "sketch.rows", "must be >= 1")
    check(config.sketch.buckets >= 2, "sketch.buckets", "must be >= 2")
    check(config.sketch.k >= 0, "sketch.k", "must be >= 0 (0 = default)")
    check(config.sketch.width >= 0, "sketch.width", "must be >= 0 (0 = calibrate on the stream)")
    check(config.sketch.calibration_docs >= 2, "sketch.calibration_docs", "must be >= 2")
    check(config.sketch.snapshot_interval_s > 0, "sketch.snapshot_interval_s", "must be > 0")
    check(config.sketch.keep_snapshots >= 1, "sketch.keep_snapshots", "must be >= 1")
    check(0 < config.policy.keep_rate <= 1, "policy.keep_rate", "must be in (0, 1]")
    check(0 < config.policy.quality_keep <= 1, "policy.quality_keep", "must be in (0, 1]")
    check(config.route.min_snapshot_docs >= 1, "route.min_snapshot_docs", "must be >= 1")
    check(config.output.format in ("msgpack", "json"), "output.format", "must be msgpack or json")
    check(config.daemon.shutdown_timeout_s > 0, "daemon.shutdown_timeout_s", "must be > 0")
    check(config.daemon.retry_backoff_max_s > 0, "daemon.retry_backoff_max_s", "must be > 0")
    check(0 <= config.daemon.crash_before_commit <= 1, "daemon.crash_before_commit", "must be in [0, 1]")
    check(0 <= config.daemon.metrics_port < 65536, "daemon.metrics_port", "must be a port number (0 = off)")
    validate_kafka_client(config.kafka.client)
    check(bool(config.sink.path.strip()), "sink.path", "must name a folder or an fsspec URL")
    check(config.sink.format in ("parquet", "jsonl"), "sink.format", "must be parquet or jsonl")
    check(config.sink.shard_max_docs >= 1, "sink.shard_max_docs", "must be >= 1")
    check(config.sink.shard_max_bytes >= 1, "sink.shard_max_bytes", "must be >= 1")
    check(config.sink.roll_interval_s > 0, "sink.roll_interval_s", "must be > 0")
    check(1 <= config.sink.compression_level <= 22, "sink.compression_level", "must be a zstd level in [1, 22]")
    build_policy(config)  # an unknown policy name fails here, naming policy.name


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")  # kafka-python's accepted values


def validate_kafka_client(client: dict[str, typing.Any]) -> None:
    """The pass-through settings kafka-python would only reject at the first connection (or never)."""
    from kafka.net.sasl import SASL_MECHANISMS

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"kafka.{key}: {message}, got {client[key]!r}")

    protocol = client.get("security_protocol", "PLAINTEXT")
    if "security_protocol" in client and protocol not in SECURITY_PROTOCOLS:
        fail("security_protocol", f"must be one of {', '.join(SECURITY_PROTOCOLS)}")
    if "sasl_mechanism" in client:
        if client["sasl_mechanism"] not in SASL_MECHANISMS:
            fail("sasl_mechanism", f"must be one of {', '.join(sorted(SASL_MECHANISMS))}")
        if not str(protocol).startswith("SASL_"):
            fail("sasl_mechanism", "needs kafka.security_protocol SASL_PLAINTEXT or SASL_SSL")
        if client["sasl_mechanism"] in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            for key in ("sasl_plain_username", "sasl_plain_password"):
                if not client.get(key):
                    raise ConfigError(f"kafka.{key}: required by kafka.sasl_mechanism {client['sasl_mechanism']}")
    elif str(protocol).startswith("SASL_"):
        raise ConfigError(f"kafka.sasl_mechanism: required by kafka.security_protocol {protocol}")
    for key, value in client.items():
        if key.endswith("_ms") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            fail(key, "must be a non-negative integer (milliseconds)")
        if key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile") and not Path(str(value)).is_file():
            fail(key, "no such file")
        if key == "ssl_check_hostname" and not isinstance(value, bool):
            fail(key, "must be true or false")


def build_policy(config: Config):
    """The configured sampling policy; errors name the `policy.*` field."""
    from streamfilter.policies import build_policy as build, policy_class

    p = config.policy
    try:
        gated = policy_class(p.name).has_quality_gate  # policy.quality_keep applies only to a policy with a gate
        return build(p.name, p.keep_rate, quality_keep=p.quality_keep if gated else None, seed=p.seed)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message.replace("policy:", "policy.name:", 1) if message.startswith("policy:")
                          else f"policy.{message}") from None


def _lookup(config: Config, dotted: str) -> typing.Any:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)
