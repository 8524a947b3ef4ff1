#!/usr/bin/env bash
# The local stack as plain processes (no Docker engine here): Postgres,
# Kafka (KRaft, single node) and Redis, with their state under .local/.
#
#   stack/stack.sh up [SERVICE...]      install what is missing, start, wait for health
#   stack/stack.sh down [SERVICE...]    stop exactly the processes that `up` started
#   stack/stack.sh status               one line per service
#
# SERVICE is postgres, redis or kafka (default: all). Ports and the Kafka
# directory can be overridden (PG_PORT, REDIS_PORT, KAFKA_PORT,
# KAFKA_CONTROLLER_PORT, KAFKA_DIR): tests use that for a second, disposable broker.
#
# Idempotent: `up` on a running stack does nothing; stale pid files are
# cleaned; a port held by someone else is named, never silently shared.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCAL="$ROOT/.local"
PG_PORT=${PG_PORT:-55432}
KAFKA_PORT=${KAFKA_PORT:-59092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-59093}
REDIS_PORT=${REDIS_PORT:-56379}
KAFKA_VERSION=3.9.1

PG_DIR=${PG_DIR:-"$LOCAL/postgres"}
KAFKA_DIR=${KAFKA_DIR:-"$LOCAL/kafka"}
KAFKA_LIBS="$LOCAL/kafka/libs"
REDIS_DIR="$LOCAL/redis"

say() { printf '%s\n' "stack: $*"; }
die() { printf '%s\n' "stack: error: $*" >&2; exit 1; }

# --- helpers ---------------------------------------------------------------

port_listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q LISTEN; }

port_owner() {
    # "pid=123 (cmd)" of whoever listens on the port, or "unknown process"
    local line
    line=$(ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n1 || true)
    if [ -n "$line" ]; then
        local pid=${line#pid=}
        printf 'pid %s (%s)' "$pid" "$(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null | cut -c1-80)"
    else
        printf 'an unknown process'
    fi
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

read_pid() { [ -f "$1" ] && head -n1 "$1" | tr -dc '0-9' || true; }

require_port_free() {
    local port=$1 name=$2
    if port_listening "$port"; then
        die "port $port (for $name) is taken by $(port_owner "$port"); stop it, or set ${3} to another port"
    fi
    # not listening, yet bound: a client connection was given it as its local port (the
    # stack's ports lie in Linux's ephemeral range); the service could not bind it
    local held
    held=$(ss -Htanp state established "sport = :$port" 2>/dev/null | head -n1 || true)
    if [ -n "$held" ]; then
        die "port $port (for $name) is held by a connection's local end ($held); wait for it to close, or set ${3} to another port"
    fi
}

reserve_ports() {
    # Keep the kernel from giving the stack's ports (inside the ephemeral range,
    # 32768-60999 by default) to client connections as their local port: once that
    # happened, a service could not bind its port at start (seen in CI: a test's
    # Postgres; and Kafka on a restart). Needs root; best effort.
    local f=/proc/sys/net/ipv4/ip_local_reserved_ports current
    [ -w "$f" ] || return 0
    current=$(cat "$f" 2>/dev/null || true)
    printf '%s' "${current:+$current,}$PG_PORT,$REDIS_PORT,$KAFKA_PORT,$KAFKA_CONTROLLER_PORT" >"$f" 2>/dev/null || true
}

wait_for() {
    # wait_for <seconds> <description> <command...>
    local secs=$1 what=$2
    shift 2
    local i
    for ((i = 0; i < secs * 5; i++)); do
        if "$@"; then return 0; fi
        sleep 0.2
    done
    return 1
}

apt_install() {
    say "installing Debian packages: $*"
    if [ "$(id -u)" != 0 ]; then die "installing $* needs root (apt-get); install them and rerun"; fi
    if [ ! -f "$LOCAL/.apt-updated" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
        mkdir -p "$LOCAL" && touch "$LOCAL/.apt-updated"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
        || die "apt-get install $* failed"
}

# --- Postgres ----------------------------------------------------------------

pg_bindir() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/postgres" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

ensure_postgres_installed() {
    if ! pg_bindir >/dev/null; then apt_install postgresql postgresql-contrib; fi
    pg_bindir >/dev/null || die "no Postgres server binaries under /usr/lib/postgresql after installing postgresql"
    id postgres >/dev/null 2>&1 || die "the 'postgres' OS user is missing (the postgresql package creates it)"
}

as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

make_traversable() {
    # Postgres refuses to run as root, so it runs as the postgres user, which
    # must be able to reach its data directory through every parent.
    local d=$1
    while [ "$d" != "/" ]; do
        if ! as_postgres test -x "$d" 2>/dev/null; then
            chmod o+x "$d" || die "cannot make $d traversable for the postgres user"
        fi
        d=$(dirname "$d")
    done
}

pg_running() {
    local pid
    pid=$(read_pid "$PG_DIR/data/postmaster.pid")
    pid_alive "$pid"
}

pg_healthy() { "$(pg_bindir)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -d postgres -U postgres; }

pg_up() {
    ensure_postgres_installed
    local bin
    bin=$(pg_bindir)
    if pg_running; then
        pg_healthy || wait_for 30 postgres pg_healthy || die "Postgres (pid $(read_pid "$PG_DIR/data/postmaster.pid")) runs but does not answer on port $PG_PORT; see $PG_DIR/postgres.log"
        ensure_shop_database
        say "postgres already running on 127.0.0.1:$PG_PORT"
        return 0
    fi
    require_port_free "$PG_PORT" postgres PG_PORT
    mkdir -p "$PG_DIR/run"
    if [ "$(id -u)" = 0 ]; then chown -R postgres: "$PG_DIR"; fi
    make_traversable "$PG_DIR"
    if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
        say "initialising a Postgres cluster in $PG_DIR/data"
        rm -rf "$PG_DIR/data"
        as_postgres "$bin/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$PG_DIR/initdb.log" 2>&1 \
            || die "initdb failed; see $PG_DIR/initdb.log"
    fi
    # Settings live in their own file, rewritten on every start, so a changed
    # port or setting takes effect without a new cluster.
    cat >"$PG_DIR/data/readside.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR/run'
wal_level = logical
max_wal_senders = 20
max_replication_slots = 20
max_slot_wal_keep_size = ${PG_MAX_SLOT_WAL_KEEP_SIZE:-8GB}
wal_sender_timeout = 60s
max_connections = 200
shared_buffers = ${PG_SHARED_BUFFERS:-512MB}
wal_buffers = 16MB
max_wal_size = 4GB
checkpoint_timeout = 15min
logical_decoding_work_mem = 64MB
log_min_messages = warning
log_line_prefix = '%m [%p] '
EOF
    if [ "$(id -u)" = 0 ]; then chown postgres: "$PG_DIR/data/readside.conf"; fi
    grep -q "^include_if_exists = 'readside.conf'" "$PG_DIR/data/postgresql.conf" \
        || echo "include_if_exists = 'readside.conf'" >>"$PG_DIR/data/postgresql.conf"
    # stale postmaster.pid (a crash, a reboot): pg_ctl handles it, but only
    # when the pid no longer exists; ours was checked above.
    as_postgres "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 start >/dev/null \
        || die "Postgres did not start; see $PG_DIR/postgres.log"
    wait_for 30 postgres pg_healthy || die "Postgres started but does not answer on port $PG_PORT; see $PG_DIR/postgres.log"
    ensure_shop_database
    say "postgres up on 127.0.0.1:$PG_PORT (wal_level=logical, data in $PG_DIR/data)"
}

ensure_shop_database() {
    if ! psql_cmd -d postgres -tAc "select 1 from pg_database where datname='shop'" | grep -q 1; then
        psql_cmd -d postgres -c "create database shop" >/dev/null || die "cannot create database shop"
    fi
}

psql_cmd() { "$(pg_bindir)/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"; }

pg_down() {
    local bin
    if pg_running && bin=$(pg_bindir); then
        as_postgres "$bin/pg_ctl" -D "$PG_DIR/data" -m fast -w -t 60 stop >/dev/null || die "Postgres did not stop; see $PG_DIR/postgres.log"
        say "postgres stopped"
    else
        say "postgres not running"
    fi
}

pg_status() {
    if pg_running; then
        if pg_healthy; then
            say "postgres  up    pid $(read_pid "$PG_DIR/data/postmaster.pid")  127.0.0.1:$PG_PORT"
        else
            say "postgres  sick  pid $(read_pid "$PG_DIR/data/postmaster.pid")  not answering on $PG_PORT"
        fi
    else
        say "postgres  down"
    fi
}

# --- Redis -------------------------------------------------------------------

redis_running() { pid_alive "$(read_pid "$REDIS_DIR/redis.pid")"; }

redis_healthy() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

# PONG, or LOADING while it reads its append-only file back after a start
redis_answers() {
    local reply
    reply=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>&1)
    [ "$reply" = PONG ] || [[ "$reply" == LOADING* ]]
}

# Wait until Redis serves: a big append-only file takes a while to load.
redis_wait() {
    wait_for 20 redis redis_answers || die "Redis does not answer on port $REDIS_PORT; see $REDIS_DIR/redis.log"
    if ! redis_healthy; then
        say "redis is loading its append-only file ($(du -sh "$REDIS_DIR/appendonlydir" 2>/dev/null | cut -f1)); waiting"
        wait_for 600 redis-load redis_healthy \
            || die "Redis is still loading its data after 10 minutes; see $REDIS_DIR/redis.log"
    fi
}

redis_up() {
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null || apt_install redis-server redis-tools
    if redis_running; then
        wait_for 10 redis redis_answers || die "Redis (pid $(read_pid "$REDIS_DIR/redis.pid")) runs but does not answer on port $REDIS_PORT; see $REDIS_DIR/redis.log"
        redis_wait
        say "redis already running on 127.0.0.1:$REDIS_PORT"
        return 0
    fi
    rm -f "$REDIS_DIR/redis.pid"
    require_port_free "$REDIS_PORT" redis REDIS_PORT
    mkdir -p "$REDIS_DIR"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
        --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log" --dir "$REDIS_DIR" \
        --appendonly yes --appendfsync everysec --save '' --protected-mode yes >/dev/null \
        || die "redis-server did not start; see $REDIS_DIR/redis.log"
    redis_wait
    say "redis up on 127.0.0.1:$REDIS_PORT"
}

redis_down() {
    local pid
    pid=$(read_pid "$REDIS_DIR/redis.pid")
    if pid_alive "$pid"; then
        kill "$pid"
        wait_for 20 redis-stop bash -c "! kill -0 $pid 2>/dev/null" || kill -9 "$pid" 2>/dev/null || true
        say "redis stopped"
    else
        say "redis not running"
    fi
    rm -f "$REDIS_DIR/redis.pid"
}

redis_status() {
    if redis_running; then
        if redis_healthy; then say "redis     up    pid $(read_pid "$REDIS_DIR/redis.pid")  127.0.0.1:$REDIS_PORT"
        else say "redis     sick  pid $(read_pid "$REDIS_DIR/redis.pid")  not answering on $REDIS_PORT"; fi
    else
        say "redis     down"
    fi
}

# --- Kafka -------------------------------------------------------------------

kafka_jars_ready() { [ -f "$KAFKA_LIBS/.complete-$KAFKA_VERSION" ]; }

ensure_kafka_installed() {
    command -v java >/dev/null || apt_install openjdk-17-jre-headless
    if kafka_jars_ready; then return 0; fi
    command -v mvn >/dev/null || apt_install maven
    say "fetching Kafka $KAFKA_VERSION broker jars from Maven Central"
    rm -rf "$KAFKA_LIBS"
    mkdir -p "$KAFKA_DIR"
    mvn -q -B -f "$ROOT/stack/kafka/pom.xml" dependency:copy-dependencies \
        -DoutputDirectory="$KAFKA_LIBS" -DincludeScope=runtime >"$KAFKA_DIR/mvn.log" 2>&1 \
        || die "could not fetch Kafka jars with Maven; see $KAFKA_DIR/mvn.log"
    ls "$KAFKA_LIBS"/kafka_2.13-*.jar >/dev/null 2>&1 || die "Maven ran but no kafka_2.13 jar arrived; see $KAFKA_DIR/mvn.log"
    touch "$KAFKA_LIBS/.complete-$KAFKA_VERSION"
}

kafka_running() { pid_alive "$(read_pid "$KAFKA_DIR/kafka.pid")"; }

kafka_healthy() {
    port_listening "$KAFKA_PORT" && grep -q 'Kafka Server started' "$KAFKA_DIR/logs/server.log" 2>/dev/null
}

KAFKA_JAVA=(java -Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true
    "-Dlog4j.configuration=file:$ROOT/stack/kafka/log4j.properties"
    "-Dkafka.logs.dir=$KAFKA_DIR/logs" -cp "$KAFKA_LIBS/*")

kafka_up() {
    ensure_kafka_installed
    if kafka_running; then
        wait_for 60 kafka port_listening "$KAFKA_PORT" || die "Kafka (pid $(read_pid "$KAFKA_DIR/kafka.pid")) runs but is not serving on port $KAFKA_PORT; see $KAFKA_DIR/logs/server.log"
        say "kafka already running on 127.0.0.1:$KAFKA_PORT"
        return 0
    fi
    rm -f "$KAFKA_DIR/kafka.pid"
    require_port_free "$KAFKA_PORT" kafka KAFKA_PORT
    require_port_free "$KAFKA_CONTROLLER_PORT" "kafka controller" KAFKA_CONTROLLER_PORT
    mkdir -p "$KAFKA_DIR/data" "$KAFKA_DIR/logs"
    cat >"$KAFKA_DIR/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DIR/data
num.partitions=6
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
log.retention.hours=-1
log.segment.bytes=268435456
message.max.bytes=10485760
num.network.threads=2
num.io.threads=4
EOF
    if [ ! -f "$KAFKA_DIR/data/meta.properties" ]; then
        local cluster_id
        cluster_id=$("${KAFKA_JAVA[@]}" kafka.tools.StorageTool random-uuid 2>>"$KAFKA_DIR/logs/format.log") \
            || die "could not generate a Kafka cluster id; see $KAFKA_DIR/logs/format.log"
        "${KAFKA_JAVA[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_DIR/server.properties" \
            >>"$KAFKA_DIR/logs/format.log" 2>&1 || die "could not format Kafka storage; see $KAFKA_DIR/logs/format.log"
    fi
    # a fresh server.log per start, so health means "started this time"
    [ -f "$KAFKA_DIR/logs/server.log" ] && mv -f "$KAFKA_DIR/logs/server.log" "$KAFKA_DIR/logs/server.log.prev"
    nohup setsid "${KAFKA_JAVA[@]}" kafka.Kafka "$KAFKA_DIR/server.properties" \
        >"$KAFKA_DIR/logs/stdout.log" 2>&1 </dev/null &
    echo $! >"$KAFKA_DIR/kafka.pid"
    if ! wait_for 90 kafka kafka_healthy; then
        kafka_running || die "Kafka exited during start; see $KAFKA_DIR/logs/server.log and $KAFKA_DIR/logs/stdout.log"
        die "Kafka did not become healthy within 90 s; see $KAFKA_DIR/logs/server.log"
    fi
    say "kafka up on 127.0.0.1:$KAFKA_PORT (KRaft, data in $KAFKA_DIR/data)"
}

kafka_down() {
    local pid
    pid=$(read_pid "$KAFKA_DIR/kafka.pid")
    if pid_alive "$pid"; then
        kill "$pid"
        if ! wait_for 30 kafka-stop bash -c "! kill -0 $pid 2>/dev/null"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
        say "kafka stopped"
    else
        say "kafka not running"
    fi
    rm -f "$KAFKA_DIR/kafka.pid"
}

kafka_status() {
    if kafka_running; then
        if port_listening "$KAFKA_PORT"; then say "kafka     up    pid $(read_pid "$KAFKA_DIR/kafka.pid")  127.0.0.1:$KAFKA_PORT"
        else say "kafka     sick  pid $(read_pid "$KAFKA_DIR/kafka.pid")  not serving on $KAFKA_PORT"; fi
    else
        say "kafka     down"
    fi
}

# --- main --------------------------------------------------------------------

command -v ss >/dev/null || apt_install iproute2

cmd=${1:-}
shift || true
services=("$@")
[ ${#services[@]} -gt 0 ] || services=(postgres redis kafka)
for svc in "${services[@]}"; do
    case "$svc" in postgres | redis | kafka) ;; *) die "unknown service '$svc' (postgres, redis, kafka)" ;; esac
done
wants() { local s; for s in "${services[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

case "$cmd" in
up)
    mkdir -p "$LOCAL"
    reserve_ports
    if wants postgres; then pg_up; fi
    if wants redis; then redis_up; fi
    if wants kafka; then kafka_up; fi
    ;;
down)
    if wants kafka; then kafka_down; fi
    if wants redis; then redis_down; fi
    if wants postgres; then pg_down; fi
    ;;
status)
    pg_status
    redis_status
    kafka_status
    ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
