#!/usr/bin/env bash
# Installs (when missing) and runs the infrastructure telemetry-pipeline needs, on 127.0.0.1 only:
#   Apache Kafka (KRaft, single node), MariaDB and Mosquitto.
#
#   scripts/services.sh start [SERVICE...]   install what is missing, start what is not running,
#                                            wait until ready
#   scripts/services.sh stop [SERVICE...]    stop what this script started (SIGTERM, then wait)
#   scripts/services.sh status               one line per service
# SERVICE is kafka, mariadb or mosquitto; without any, all three.
#
# Idempotent: running `start` twice starts nothing twice. Downloads are cached outside the clone.
#
# Environment (all optional):
#   TELEMETRY_CACHE_DIR   downloads (Kafka jars)             default /var/cache/telemetry-pipeline
#   TELEMETRY_STATE_DIR   data, logs and pid files           default /var/lib/telemetry-pipeline
#   TELEMETRY_KAFKA_PORT  Kafka client port                  default 9092 (controller: port + 1)
#   TELEMETRY_MYSQL_PORT  MariaDB port                       default 3306
#   TELEMETRY_MQTT_PORT   Mosquitto port                     default 1883
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_dir=${TELEMETRY_CACHE_DIR:-/var/cache/telemetry-pipeline}
state_dir=${TELEMETRY_STATE_DIR:-/var/lib/telemetry-pipeline}
kafka_port=${TELEMETRY_KAFKA_PORT:-9092}
kafka_controller_port=$((kafka_port + 1))
mysql_port=${TELEMETRY_MYSQL_PORT:-3306}
mqtt_port=${TELEMETRY_MQTT_PORT:-1883}
kafka_version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$repo/deploy/kafka/pom.xml")
kafka_libs="$cache_dir/kafka-$kafka_version/libs"

# The credentials of the development database; tests create one database each, so the user may
# create databases. Production deployments use their own server and credentials.
mysql_user=telemetry
mysql_password=telemetry
mysql_database=telemetry

say() { printf 'services: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_for NAME SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local name=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      return 1
    fi
    sleep 0.5
  done
  say "$name is ready"
}

apt_updated=false
apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found; install these packages by hand: $*"
  if [ "$apt_updated" = false ]; then
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=true
  fi
  say "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_missing() {
  local packages=()
  command -v mariadbd >/dev/null || packages+=(mariadb-server mariadb-client)
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || packages+=(mosquitto)
  command -v mosquitto_pub >/dev/null || packages+=(mosquitto-clients)
  if [ ${#packages[@]} -gt 0 ]; then
    apt_install "${packages[@]}"
  fi
  command -v java >/dev/null || die "java (17 or newer) is required to run Apache Kafka"
  if [ ! -f "$kafka_libs/kafka_2.13-$kafka_version.jar" ]; then
    command -v mvn >/dev/null || die "mvn is required to fetch the Apache Kafka jars from Maven Central"
    say "fetching Apache Kafka $kafka_version jars into $kafka_libs"
    mkdir -p "$kafka_libs.partial"
    mvn -q -B -Dstyle.color=never -f "$repo/deploy/kafka/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$kafka_libs.partial"
    rm -rf "$kafka_libs"
    mv "$kafka_libs.partial" "$kafka_libs"
  fi
}

# --- MariaDB -------------------------------------------------------------------------------
mysql_dir="$state_dir/mariadb"
mysql_socket="$mysql_dir/mariadb.sock"
mysql_pid="$mysql_dir/mariadb.pid"

mysql_root() { mariadb --no-defaults --socket="$mysql_socket" -uroot "$@"; }

mysql_ready() { mysql_root -e 'SELECT 1' >/dev/null 2>&1; }

start_mysql() {
  if pid_alive "$mysql_pid" && mysql_ready; then
    say "MariaDB already running on 127.0.0.1:$mysql_port"
    return
  fi
  port_open "$mysql_port" && die "port $mysql_port is taken by another process; set TELEMETRY_MYSQL_PORT"
  mkdir -p "$mysql_dir"
  if [ ! -d "$mysql_dir/data/mysql" ]; then
    say "initialising MariaDB data directory"
    mariadb-install-db --no-defaults --user=root --datadir="$mysql_dir/data" \
      --auth-root-authentication-method=socket >"$mysql_dir/install.log" 2>&1 ||
      die "mariadb-install-db failed; see $mysql_dir/install.log"
  fi
  say "starting MariaDB on 127.0.0.1:$mysql_port"
  nohup mariadbd --no-defaults --user=root --datadir="$mysql_dir/data" \
    --bind-address=127.0.0.1 --port="$mysql_port" --socket="$mysql_socket" --pid-file="$mysql_pid" \
    --log-error="$mysql_dir/error.log" --default-time-zone=+00:00 \
    --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci \
    --innodb-buffer-pool-size=512M --innodb-log-file-size=256M --innodb-flush-log-at-trx-commit=1 \
    --max-connections=500 --skip-name-resolve >/dev/null 2>&1 &
  wait_for MariaDB 60 mysql_ready || die "MariaDB did not start; see $mysql_dir/error.log"
  mysql_root <<SQL
CREATE DATABASE IF NOT EXISTS \`$mysql_database\`;
CREATE USER IF NOT EXISTS '$mysql_user'@'127.0.0.1' IDENTIFIED BY '$mysql_password';
CREATE USER IF NOT EXISTS '$mysql_user'@'localhost' IDENTIFIED BY '$mysql_password';
GRANT ALL PRIVILEGES ON *.* TO '$mysql_user'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO '$mysql_user'@'localhost';
SQL
}

stop_mysql() { stop_pid MariaDB "$mysql_pid" 60; }

# --- Mosquitto -----------------------------------------------------------------------------
mqtt_dir="$state_dir/mosquitto"
mqtt_pid="$mqtt_dir/mosquitto.pid"

start_mqtt() {
  if pid_alive "$mqtt_pid" && port_open "$mqtt_port"; then
    say "Mosquitto already running on 127.0.0.1:$mqtt_port"
    return
  fi
  port_open "$mqtt_port" && die "port $mqtt_port is taken by another process; set TELEMETRY_MQTT_PORT"
  mkdir -p "$mqtt_dir"
  sed -e "s:@STATE_DIR@:$state_dir:g" -e "s:@MQTT_PORT@:$mqtt_port:g" \
    "$repo/deploy/mosquitto/mosquitto.conf" >"$mqtt_dir/mosquitto.conf"
  # Started as root, Mosquitto drops to its own user, which must be able to write its state.
  if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown -R mosquitto "$mqtt_dir"
  fi
  say "starting Mosquitto on 127.0.0.1:$mqtt_port"
  local binary
  binary=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  "$binary" -c "$mqtt_dir/mosquitto.conf" -d
  wait_for Mosquitto 30 port_open "$mqtt_port" || die "Mosquitto did not start; see $mqtt_dir/mosquitto.log"
}

stop_mqtt() { stop_pid Mosquitto "$mqtt_pid" 30; }

# --- Apache Kafka --------------------------------------------------------------------------
kafka_dir="$state_dir/kafka"
kafka_pid="$kafka_dir/kafka.pid"

kafka_java_options=(-Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$repo/deploy/kafka/log4j2.properties" -cp "$kafka_libs/*")

kafka_java() { java "${kafka_java_options[@]}" "$@"; }

start_kafka() {
  if pid_alive "$kafka_pid" && port_open "$kafka_port"; then
    say "Kafka already running on 127.0.0.1:$kafka_port"
    return
  fi
  port_open "$kafka_port" && die "port $kafka_port is taken by another process; set TELEMETRY_KAFKA_PORT"
  mkdir -p "$kafka_dir"
  sed -e "s:@STATE_DIR@:$state_dir:g" -e "s:@KAFKA_PORT@:$kafka_port:g" \
    -e "s:@KAFKA_CONTROLLER_PORT@:$kafka_controller_port:g" \
    "$repo/deploy/kafka/server.properties" >"$kafka_dir/server.properties"
  if [ ! -f "$kafka_dir/data/meta.properties" ]; then
    say "formatting Kafka storage"
    local cluster_id
    cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$kafka_dir/server.properties" \
      >"$kafka_dir/format.log" 2>&1 || die "formatting Kafka storage failed; see $kafka_dir/format.log"
  fi
  say "starting Apache Kafka $kafka_version on 127.0.0.1:$kafka_port"
  nohup java "${kafka_java_options[@]}" kafka.Kafka "$kafka_dir/server.properties" \
    >"$kafka_dir/kafka.log" 2>&1 &
  echo $! >"$kafka_pid"
  wait_for Kafka 90 kafka_ready || die "Kafka did not start; see $kafka_dir/kafka.log"
}

# The port opens before the broker has registered with its controller; the log line is the signal.
kafka_ready() {
  port_open "$kafka_port" && grep -q 'Kafka Server started' "$kafka_dir/kafka.log"
}

stop_kafka() { stop_pid Kafka "$kafka_pid" 60; }

# --- common --------------------------------------------------------------------------------
stop_pid() {
  local name=$1 pid_file=$2 seconds=$3
  if ! pid_alive "$pid_file"; then
    say "$name is not running"
    return
  fi
  local pid
  pid=$(cat "$pid_file")
  say "stopping $name (pid $pid)"
  kill -TERM "$pid"
  local deadline=$((SECONDS + seconds))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "$name did not stop within ${seconds}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.5
  done
  rm -f "$pid_file"
}

status_line() {
  local name=$1 pid_file=$2 port=$3
  if pid_alive "$pid_file" && port_open "$port"; then
    echo "$name: running (pid $(cat "$pid_file")) on 127.0.0.1:$port"
  else
    echo "$name: stopped"
  fi
}

command=${1:-}
shift || true
services=("$@")
if [ ${#services[@]} -eq 0 ]; then
  services=(mariadb mosquitto kafka)
fi
for service in "${services[@]}"; do
  case "$service" in
  kafka | mariadb | mosquitto) ;;
  *) die "unknown service '$service' (kafka, mariadb or mosquitto)" ;;
  esac
done

case "$command" in
start)
  mkdir -p "$cache_dir" "$state_dir"
  install_missing
  for service in "${services[@]}"; do
    case "$service" in
    mariadb) start_mysql ;;
    mosquitto) start_mqtt ;;
    kafka) start_kafka ;;
    esac
  done
  ;;
stop)
  # Kafka first: it holds the most in-flight state.
  for service in kafka mosquitto mariadb; do
    case " ${services[*]} " in
    *" $service "*) ;;
    *) continue ;;
    esac
    case "$service" in
    mariadb) stop_mysql ;;
    mosquitto) stop_mqtt ;;
    kafka) stop_kafka ;;
    esac
  done
  ;;
status)
  status_line MariaDB "$mysql_pid" "$mysql_port"
  status_line Mosquitto "$mqtt_pid" "$mqtt_port"
  status_line Kafka "$kafka_pid" "$kafka_port"
  ;;
*)
  echo "usage: $0 start|stop|status [kafka|mariadb|mosquitto ...]" >&2
  exit 2
  ;;
esac
