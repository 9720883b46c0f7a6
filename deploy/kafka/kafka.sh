#!/usr/bin/env bash
# A single-node Apache Kafka (KRaft) broker on 127.0.0.1, for people without the Python
# package. Same folder layout and settings as `streamfilter broker` (streamfilter/broker.py).
#
#   deploy/kafka/kafka.sh start|stop|status|fetch [--port 9092] [--data-dir .cache/broker]
#
# Needs Java 17+ and Maven (once, to fetch the jars pinned in deploy/kafka/pom.xml).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ACTION="${1:-}"; shift || true
PORT=9092; DATA_DIR=".cache/broker"; HEAP_MB=512
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/streamfilter/kafka"
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --data-dir) DATA_DIR="$2"; shift 2 ;;
    --cache-dir) CACHE_DIR="$2"; shift 2 ;;
    --heap-mb) HEAP_MB="$2"; shift 2 ;;
    *) echo "kafka.sh: error: unknown argument $1" >&2; exit 2 ;;
  esac
done
die() { echo "kafka.sh: error: $*" >&2; exit 1; }
CPORT=$((PORT + 1))
mkdir -p "$DATA_DIR"; DATA_DIR="$(cd "$DATA_DIR" && pwd)"
VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$HERE/pom.xml")"
JARS="$CACHE_DIR/kafka-$VERSION"

java_bin() {
  if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then echo "$JAVA_HOME/bin/java"
  elif command -v java >/dev/null; then command -v java
  else die "no Java found: Kafka needs Java 17 or newer"; fi
}

jars_complete() {  # every jar listed in the marker present with its size and readable
  [ -f "$JARS/jars.json" ] || return 1
  python3 - "$JARS" <<'PY' 2>/dev/null
import json, sys, zipfile, pathlib
d = pathlib.Path(sys.argv[1]); listed = json.loads((d / "jars.json").read_text())["jars"]
ok = listed and all((d / n).is_file() and (d / n).stat().st_size == s and zipfile.ZipFile(d / n).namelist() for n, s in listed.items())
sys.exit(0 if ok else 1)
PY
}

fetch() {
  jars_complete && return 0
  command -v mvn >/dev/null || die "Maven (mvn) is needed once to fetch the Kafka jars"
  rm -rf "$JARS" "$JARS.partial"; mkdir -p "$JARS.partial"
  mvn -q -B -f "$HERE/pom.xml" dependency:copy-dependencies -DoutputDirectory="$JARS.partial" -DincludeScope=runtime \
    || die "fetching the Kafka jars with Maven failed"
  python3 - "$JARS.partial" "$VERSION" <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
(d / "jars.json").write_text(json.dumps({"kafka_version": sys.argv[2], "jars": {j.name: j.stat().st_size for j in sorted(d.glob("*.jar"))}}, indent=1))
PY
  mv "$JARS.partial" "$JARS"
}

pid_of() { sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$DATA_DIR/broker.json" 2>/dev/null || true; }
running() { local pid; pid="$(pid_of)"; [ -n "$pid" ] && tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -q "kafka.Kafka $DATA_DIR/server.properties"; }

answers_metadata() {  # one Metadata v1 request (all topics); the answer must carry our correlation id 7
  { exec 3<>"/dev/tcp/127.0.0.1/$PORT"; } 2>/dev/null || return 1
  printf '\x00\x00\x00\x14\x00\x03\x00\x01\x00\x00\x00\x07\x00\x06kcheck\xff\xff\xff\xff' >&3
  local reply; reply="$(timeout 2 head -c 8 <&3 | od -An -tx1 | tr -d ' \n')"; exec 3<&- 3>&-
  [ "${reply:8:8}" = "00000007" ]
}

port_free() { ! { (exec 4<>"/dev/tcp/127.0.0.1/$1"); } 2>/dev/null; }

start() {
  if running; then echo "running: pid $(pid_of) at 127.0.0.1:$PORT"; return 0; fi
  local java; java="$(java_bin)"
  port_free "$PORT" || die "port $PORT on 127.0.0.1 is already in use; pick another with --port"
  port_free "$CPORT" || die "port $CPORT on 127.0.0.1 is already in use; pick another with --port"
  fetch
  local cluster; cluster="$(sed -n 's/.*"cluster_id": *"\([^"]*\)".*/\1/p' "$DATA_DIR/broker.json" 2>/dev/null || true)"
  if [ -f "$DATA_DIR/kraft/meta.properties" ]; then
    local found; found="$(sed -n 's/^cluster.id=//p' "$DATA_DIR/kraft/meta.properties")"
    [ "$found" = "$cluster" ] || die "data folder $DATA_DIR holds storage of another Kafka cluster (id $found); remove the folder or choose another --data-dir"
  else
    # never an id that starts with "-": kafka-storage would read "-t -B6ux..." as two options
    cluster="$(python3 -c 'import base64,uuid
while (c := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"): pass
print(c)')"
  fi
  cat > "$DATA_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CPORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$DATA_DIR/kraft
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=500
PROPS
  printf 'rootLogger.level = WARN\nrootLogger.appenderRef.stdout.ref = STDOUT\nappender.console.type = Console\nappender.console.name = STDOUT\nappender.console.layout.type = PatternLayout\nappender.console.layout.pattern = [%%d] %%p %%m (%%c)%%n\n' > "$DATA_DIR/log4j2.properties"
  local jvm=("$java" "-Xmx${HEAP_MB}m" -Djava.awt.headless=true "-Dlog4j2.configurationFile=$DATA_DIR/log4j2.properties" -cp "$JARS/*")
  if [ ! -f "$DATA_DIR/kraft/meta.properties" ]; then
    "${jvm[@]}" kafka.tools.StorageTool format --ignore-formatted --cluster-id="$cluster" -c "$DATA_DIR/server.properties" >/dev/null \
      || die "formatting Kafka storage in $DATA_DIR/kraft failed"
  fi
  setsid "${jvm[@]}" kafka.Kafka "$DATA_DIR/server.properties" >>"$DATA_DIR/broker.log" 2>&1 < /dev/null &
  local pid=$!
  printf '{"pid": %s, "port": %s, "controller_port": %s, "cluster_id": "%s", "kafka_version": "%s"}\n' \
    "$pid" "$PORT" "$CPORT" "$cluster" "$VERSION" > "$DATA_DIR/broker.json"
  for _ in $(seq 1 360); do
    kill -0 "$pid" 2>/dev/null || die "the broker exited while starting; see $DATA_DIR/broker.log"
    if answers_metadata; then echo "running: Kafka $VERSION pid $pid at 127.0.0.1:$PORT (data $DATA_DIR)"; return 0; fi
    sleep 0.25
  done
  kill "$pid"; die "the broker did not answer a metadata request within 90s; see $DATA_DIR/broker.log"
}

stop() {
  running || { echo "not running"; return 0; }
  local pid; pid="$(pid_of)"; kill -TERM "$pid"
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || { echo "stopped"; return 0; }; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true; echo "stopped (killed after 30s)"
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  status) if running; then echo "running: pid $(pid_of) at 127.0.0.1:$PORT (data $DATA_DIR)"; else echo "stopped (data $DATA_DIR)"; exit 3; fi ;;
  fetch) fetch; echo "Kafka jars in $JARS" ;;
  *) echo "usage: kafka.sh start|stop|status|fetch [--port N] [--data-dir DIR]" >&2; exit 2 ;;
esac
