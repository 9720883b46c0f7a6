"""A real single-node Apache Kafka (KRaft) broker on loopback, for tests and the demo.

The broker's jars come from Maven Central through the small Maven project in
`deploy/kafka/pom.xml` (which pins the Kafka version), fetched once into a cache folder
and reused. `streamfilter broker start|stop|status` drives this module; so does the
test harness (`tests/conftest.py`) and `streamfilter demo`.

Layout of a data folder:
    DIR/server.properties   broker and controller settings (written on every start)
    DIR/log4j2.properties   broker logging
    DIR/broker.log          the broker's stdout and stderr
    DIR/broker.json         what `stop`/`status` need: pid, ports, cluster id
    DIR/kraft/              the KRaft metadata and topic data (formatted once)
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from streamfilter.errors import UserError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamfilter" / "kafka"
DEFAULT_DATA_DIR = Path(".cache") / "broker"
DEFAULT_PORT = 9092
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
COMPLETE_MARKER = "jars.json"

# Single-node settings: every internal topic with replication factor and min ISR 1, so
# that transactions and consumer groups work; groups may use short session timeouts so
# test consumers join in about a second.
BROKER_SETTINGS = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "num.partitions": "1",
    "default.replication.factor": "1",
    "min.insync.replicas": "1",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "4",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "4",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    "group.min.session.timeout.ms": "500",
    "auto.create.topics.enable": "true",
    "log.retention.hours": "168",
}

LOG4J2 = """\
status = error
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stdout.ref = STDOUT
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
"""


def kafka_version(pom: Path = DEFAULT_POM) -> str:
    """The Kafka version pinned in the Maven project."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", _read_pom(pom))
    if not match:
        raise UserError(f"{pom} does not pin <kafka.version>")
    return match.group(1).strip()


def _read_pom(pom: Path) -> str:
    try:
        return pom.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read the Kafka Maven project {pom}: {exc.strerror}") from None


def find_java() -> str:
    """The `java` executable: $JAVA_HOME/bin/java, else the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if not java:
        raise UserError("no Java found: Kafka needs Java 17 or newer (install openjdk-17-jre-headless or set JAVA_HOME)")
    return java


def _jar_is_valid(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as jar:
            return len(jar.namelist()) > 0
    except (OSError, zipfile.BadZipFile):
        return False


def jars_complete(jars_dir: Path) -> bool:
    """True when `jars_dir` holds every jar its marker lists, each the recorded size and a readable zip."""
    marker = jars_dir / COMPLETE_MARKER
    try:
        listed = json.loads(marker.read_text())["jars"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name, size in listed.items():
        path = jars_dir / name
        if not path.is_file() or path.stat().st_size != size or not _jar_is_valid(path):
            return False
    return bool(listed)


def ensure_jars(cache_dir: Path = DEFAULT_CACHE_DIR, pom: Path = DEFAULT_POM) -> Path:
    """Fetch the broker jars with Maven once; reuse them while they are complete.

    An incomplete or corrupt cache (a missing, truncated or unreadable jar) is fetched
    again from scratch. Returns the folder holding the jars.
    """
    version = kafka_version(pom)
    jars_dir = Path(cache_dir) / f"kafka-{version}"
    if jars_complete(jars_dir):
        return jars_dir
    if jars_dir.exists():
        log.warning("Kafka jar cache %s is incomplete or corrupt: fetching it again", jars_dir)
        shutil.rmtree(jars_dir)
    mvn = shutil.which("mvn")
    if not mvn:
        raise UserError("Maven (mvn) is needed once to fetch the Kafka jars from Maven Central: apt-get install maven")
    staging = jars_dir.with_name(jars_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log.info("fetching Apache Kafka %s jars from Maven Central into %s", version, jars_dir)
    cmd = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
           f"-DoutputDirectory={staging}", "-DincludeScope=runtime"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    jars = sorted(staging.glob("*.jar"))
    if result.returncode != 0 or not jars:
        tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"fetching the Kafka jars with Maven failed ({' / '.join(tail) or 'no jars'})")
    bad = [j.name for j in jars if not _jar_is_valid(j)]
    if bad:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"Maven fetched unreadable jars ({', '.join(bad)}); clear ~/.m2/repository and retry")
    marker = {"kafka_version": version, "jars": {j.name: j.stat().st_size for j in jars}}
    (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1))
    staging.rename(jars_dir)
    return jars_dir


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    """A port the OS says is free now, with the next one free too (the controller's)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 65535 and not port_in_use(port + 1):
            return port
    raise UserError("no two adjacent free ports found on 127.0.0.1")


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (what kafka-storage prints).

    Never one that starts with "-" (1 in 64 would): kafka-storage's argument parser takes
    `-t -B6ux...` for two options and fails ("argument --cluster-id/-t: expected one argument");
    Kafka's own `Uuid.randomUuid()` redraws those too.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for our purposes.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def _pid_is_our_broker(pid: int, data_dir: Path) -> bool:
    """Guards against signalling a recycled pid: the process must be kafka.Kafka on this data folder."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return _pid_alive(pid)
    return "kafka.Kafka" in cmdline and str(data_dir / "server.properties") in cmdline


@dataclass
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    data_dir: Path
    kafka_version: str | None

    def describe(self) -> str:
        if self.running:
            return f"running: Kafka {self.kafka_version} pid {self.pid} at {self.bootstrap} (data {self.data_dir})"
        return f"stopped (data {self.data_dir})"


class KafkaBroker:
    """One single-node KRaft broker (broker and controller in one JVM) on 127.0.0.1."""

    def __init__(
        self,
        data_dir: Path | str = DEFAULT_DATA_DIR,
        port: int | None = None,
        controller_port: int | None = None,
        cache_dir: Path | str = DEFAULT_CACHE_DIR,
        pom: Path | str = DEFAULT_POM,
        heap_mb: int = 512,
    ):
        self.data_dir = Path(data_dir).resolve()
        state = self._read_state()
        self.port = port or state.get("port") or DEFAULT_PORT
        self.controller_port = controller_port or (self.port + 1)
        self.cache_dir = Path(cache_dir)
        self.pom = Path(pom)
        self.heap_mb = heap_mb

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "broker.json"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    def _read_state(self) -> dict:
        try:
            return json.loads((self.data_dir / "broker.json").read_text())
        except (OSError, ValueError):
            return {}

    def _write_state(self, **state) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_file)

    # -- lifecycle -------------------------------------------------------------

    def status(self) -> BrokerStatus:
        state = self._read_state()
        pid = state.get("pid")
        running = bool(pid) and _pid_alive(pid) and _pid_is_our_broker(pid, self.data_dir)
        port = state.get("port", self.port)
        return BrokerStatus(running, pid if running else None, f"127.0.0.1:{port}", self.data_dir,
                            state.get("kafka_version"))

    def start(self, ready_timeout_s: float = READY_TIMEOUT_S) -> BrokerStatus:
        """Start the broker in the background; return once it answers a metadata request."""
        current = self.status()
        if current.running:
            log.info("broker already running (pid %s)", current.pid)
            return current
        java = find_java()
        for port in (self.port, self.controller_port):
            if port_in_use(port):
                raise UserError(f"port {port} on 127.0.0.1 is already in use; pick another with --port")
        jars_dir = ensure_jars(self.cache_dir, self.pom)
        version = kafka_version(self.pom)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster_id = self._prepare_storage(java, jars_dir)
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                self._java_command(java, jars_dir, "kafka.Kafka", str(self.data_dir / "server.properties")),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # survives the command that started it; stop() signals it
            )
        self._write_state(pid=proc.pid, port=self.port, controller_port=self.controller_port,
                          cluster_id=cluster_id, kafka_version=version)
        self._wait_ready(proc, ready_timeout_s)
        return self.status()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """SIGTERM the broker and wait for it to exit (SIGKILL after `timeout_s`). False if it was not running."""
        current = self.status()
        if not current.running:
            return False
        pid = current.pid
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                break
            _reap(pid)
            time.sleep(0.1)
        else:
            log.warning("broker pid %s did not stop within %.0fs of SIGTERM: killing it", pid, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap(pid)
        return True

    # -- internals ---------------------------------------------------------------

    def _java_command(self, java: str, jars_dir: Path, main: str, *args: str) -> list[str]:
        return [
            java, f"-Xmx{self.heap_mb}m", f"-Xms{min(self.heap_mb, 256)}m", "-XX:+UseG1GC",
            "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp", f"{jars_dir}/*", main, *args,
        ]

    def _prepare_storage(self, java: str, jars_dir: Path) -> str:
        """Write the config; format the KRaft storage on first use. Returns the cluster id."""
        kraft_dir = self.data_dir / "kraft"
        state = self._read_state()
        meta = kraft_dir / "meta.properties"
        cluster_id = state.get("cluster_id")
        if meta.exists():
            found = _read_properties(meta).get("cluster.id")
            if cluster_id is None or found != cluster_id:
                raise UserError(
                    f"data folder {self.data_dir} holds storage of another Kafka cluster (id {found}); "
                    "remove the folder or choose another --data-dir"
                )
        else:
            cluster_id = new_cluster_id()
        settings = dict(BROKER_SETTINGS)
        settings.update({
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "log.dirs": str(kraft_dir),
        })
        (self.data_dir / "server.properties").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        (self.data_dir / "log4j2.properties").write_text(LOG4J2)
        if not meta.exists():
            cmd = self._java_command(java, jars_dir, "kafka.tools.StorageTool", "format", "--ignore-formatted",
                                     f"--cluster-id={cluster_id}", "-c", str(self.data_dir / "server.properties"))
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                detail = (result.stdout + result.stderr).strip().splitlines()[-1:]
                raise UserError(f"formatting Kafka storage in {kraft_dir} failed: {' '.join(detail)}")
            # Record the id before the broker starts, so a later start recognises its own storage.
            self._write_state(port=self.port, controller_port=self.controller_port, cluster_id=cluster_id,
                              kafka_version=kafka_version(self.pom))
        return cluster_id

    def _wait_ready(self, proc: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise UserError(f"the broker exited with status {proc.returncode} while starting: "
                                f"{_last_error_line(self.log_file)} (log: {self.log_file})")
            try:
                answer_metadata(self.bootstrap, timeout_s=2.0)
                return
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.25)
        proc.terminate()
        raise UserError(f"the broker did not answer a metadata request within {timeout_s:.0f}s ({last_error}); "
                        f"log: {self.log_file}")


def answer_metadata(bootstrap: str, timeout_s: float = 2.0) -> list[int]:
    """Send one Metadata request (v1, all topics) over a plain socket; return the broker ids it lists.

    A bare request keeps readiness independent of client-library state; raises OSError
    when the broker does not answer properly.
    """
    host, port = bootstrap.rsplit(":", 1)
    client_id = b"streamfilter"
    # Request header v1: api_key=3 (Metadata), api_version=1, correlation_id, client_id;
    # body: topics array = -1 (null: all topics).
    body = (
        (3).to_bytes(2, "big") + (1).to_bytes(2, "big") + (7).to_bytes(4, "big")
        + len(client_id).to_bytes(2, "big") + client_id + (-1).to_bytes(4, "big", signed=True)
    )
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(len(body).to_bytes(4, "big") + body)
        size = int.from_bytes(_recv_exact(sock, 4), "big")
        payload = _recv_exact(sock, size)
    if int.from_bytes(payload[:4], "big") != 7:
        raise OSError("metadata answer with a wrong correlation id")
    n_brokers = int.from_bytes(payload[4:8], "big", signed=True)
    if n_brokers < 1:
        raise OSError("broker answered with no brokers yet")
    ids, pos = [], 8
    for _ in range(n_brokers):
        ids.append(int.from_bytes(payload[pos:pos + 4], "big"))
        pos += 4
        host_len = int.from_bytes(payload[pos:pos + 2], "big")
        pos += 2 + host_len + 4  # host, port
        rack_len = int.from_bytes(payload[pos:pos + 2], "big", signed=True)
        pos += 2 + max(rack_len, 0)
    return ids


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise OSError("connection closed by the broker")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _read_properties(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _last_error_line(log_file: Path) -> str:
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [ln for ln in lines if " ERROR " in ln or "Exception" in ln]
    return (errors or lines or ["no log"])[-1][:300]
