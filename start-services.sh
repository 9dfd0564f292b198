#!/usr/bin/env bash
# Starts the whole telemetry pipeline on this machine, idempotently:
#   1. the infrastructure: MariaDB, Mosquitto and Apache Kafka (scripts/services.sh start);
#   2. builds the release binary (cargo build --release -p telemetry);
#   3. installs PM2 when missing (npm install -g pm2);
#   4. starts or reloads the services under PM2 (ecosystem.config.js: telemetry-bridge,
#      telemetry-audit, telemetry-api, telemetry-rollup and telemetry-alert); running this script again reloads them, it never
#      duplicates them;
#   5. waits until the bridge answers 200 on /readyz, then prints how to use it (the dashboard URL).
# Stop with ./stop-services.sh (add --all to stop the infrastructure too).
#
# Environment (all optional):
#   CARGO_TARGET_DIR        cargo build directory        default /var/cache/telemetry-pipeline/target
#   TELEMETRY_STATE_DIR     infrastructure data and logs default /var/lib/telemetry-pipeline
#   TELEMETRY_*             passed to the services (see `telemetry bridge --help`,
#                           `telemetry audit --help`) and to scripts/services.sh
#   TELEMETRY_CONFIG        a configuration file for every service (config/telemetry.example.toml)
#   TELEMETRY_LOG_DIR       the services' log files          default $TELEMETRY_STATE_DIR/logs
#   TELEMETRY_BINARY        run this build of `telemetry` instead of building the release one
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$repo"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/telemetry-pipeline/target}
state_dir=${TELEMETRY_STATE_DIR:-/var/lib/telemetry-pipeline}
log_dir=${TELEMETRY_LOG_DIR:-$state_dir/logs}
binary=${TELEMETRY_BINARY:-$CARGO_TARGET_DIR/release/telemetry}
ready_seconds=60

# Where the services serve HTTP (/healthz, /readyz); a wildcard address is reached on loopback.
loopback() {
  local host=${1%:*} port=${1##*:}
  case "$host" in
  "" | 0.0.0.0 | "[::]" | "::") host=127.0.0.1 ;;
  esac
  printf '%s:%s' "$host" "$port"
}
bridge_http=$(loopback "${TELEMETRY_BRIDGE_LISTEN:-127.0.0.1:8080}")
audit_http=$(loopback "${TELEMETRY_AUDIT_LISTEN:-127.0.0.1:8081}")
api_http=$(loopback "${TELEMETRY_API_LISTEN:-127.0.0.1:8082}")
rollup_http=$(loopback "${TELEMETRY_ROLLUP_LISTEN:-127.0.0.1:8083}")
alert_http=$(loopback "${TELEMETRY_ALERT_LISTEN:-127.0.0.1:8084}")
mqtt_port=${TELEMETRY_MQTT_PORT:-1883}
mysql_port=${TELEMETRY_MYSQL_PORT:-3306}

say() { printf 'start-services: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}

# --- 1. infrastructure ---------------------------------------------------------------------
say "starting MariaDB, Mosquitto and Kafka (scripts/services.sh start)"
"$repo/scripts/services.sh" start

# --- 2. build ------------------------------------------------------------------------------
if [ -n "${TELEMETRY_BINARY:-}" ]; then
  [ -x "$binary" ] || die "TELEMETRY_BINARY=$binary is not an executable"
  say "running $binary (TELEMETRY_BINARY), not building"
else
  command -v cargo >/dev/null || die "cargo not found; install Rust (https://rustup.rs) first"
  say "building the release binary into $CARGO_TARGET_DIR (the first build takes several minutes)"
  cargo build --release --locked --quiet -p telemetry || die "cargo build --release -p telemetry failed"
  [ -x "$binary" ] || die "the build did not produce $binary"
fi

# --- 3. PM2 --------------------------------------------------------------------------------
pm2=$(command -v pm2 || true)
if [ -z "$pm2" ]; then
  say "pm2 is not installed; installing it with: npm install -g pm2"
  command -v npm >/dev/null ||
    die "npm not found: install Node.js and npm (e.g. apt-get install nodejs npm), then run this again"
  npm install -g --no-fund --no-audit --loglevel=error pm2 || die "npm install -g pm2 failed"
  pm2=$(command -v pm2 || true)
  if [ -z "$pm2" ] && [ -x "$(npm prefix -g)/bin/pm2" ]; then
    pm2="$(npm prefix -g)/bin/pm2"
  fi
  [ -n "$pm2" ] || die "pm2 was installed but is not on PATH; add \"$(npm prefix -g)/bin\" to PATH"
fi

# --- 4. start or reload the services -------------------------------------------------------
# The signal PM2 stops apps with is the daemon's, read when it starts: make it SIGTERM (PM2's
# default is SIGINT, which the services handle the same way).
export PM2_KILL_SIGNAL=${PM2_KILL_SIGNAL:-SIGTERM}
mkdir -p "$log_dir"
# A port held by another process would make an app crash-loop while that process answers /readyz.
port_open() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
for check in "telemetry-bridge $bridge_http TELEMETRY_BRIDGE_LISTEN" \
  "telemetry-audit $audit_http TELEMETRY_AUDIT_LISTEN" \
  "telemetry-api $api_http TELEMETRY_API_LISTEN" \
  "telemetry-rollup $rollup_http TELEMETRY_ROLLUP_LISTEN" \
  "telemetry-alert $alert_http TELEMETRY_ALERT_LISTEN"; do
  read -r app address variable <<<"$check"
  pid=$("$pm2" pid "$app" 2>/dev/null || true)
  if { [ -z "$pid" ] || [ "$pid" = 0 ]; } && port_open "$address"; then
    die "$address is taken by another process, so $app could not listen there; stop it or set $variable"
  fi
done
# The bridge logs in to the development Mosquitto as telemetry-bridge (scripts/services.sh makes
# it; it may only read devices/+/telemetry). For another broker set TELEMETRY_MQTT_USERNAME and
# TELEMETRY_MQTT_PASSWORD, or put the credentials in TELEMETRY_MQTT_URL.
if [ -z "${TELEMETRY_MQTT_USERNAME:-}" ] && [[ "${TELEMETRY_MQTT_URL:-}" != *@* ]]; then
  export TELEMETRY_MQTT_USERNAME=telemetry-bridge TELEMETRY_MQTT_PASSWORD=telemetry-bridge
fi

# With a certificate (TELEMETRY_TLS_CERTIFICATE_FILE, TELEMETRY_TLS_KEY_FILE) the API and the
# bridge speak only TLS: https:// and wss://.
web=http
live=ws
if [ -n "${TELEMETRY_TLS_CERTIFICATE_FILE:-}" ]; then
  web=https
  live=wss
  command -v curl >/dev/null || die "curl is needed to check the services over TLS"
fi

# The live view lets in the dashboard's page, which comes from the API's address.
if [ -z "${TELEMETRY_WS_ALLOWED_ORIGINS:-}" ]; then
  export TELEMETRY_WS_ALLOWED_ORIGINS="$web://$api_http,$web://localhost:${api_http##*:}"
fi

# The schema is made and migrated with the owner's account (TELEMETRY_MYSQL_OWNER_URL; default the
# development owner of scripts/services.sh); the services then need only their own roles.
say "migrating the database (telemetry migrate)"
"$binary" migrate || die "telemetry migrate failed (TELEMETRY_MYSQL_OWNER_URL: the owner's account)"
say "starting the services with PM2 (pm2 startOrReload ecosystem.config.js)"
# startOrReload starts the apps that are missing and reloads those already running (a fork-mode
# reload is a graceful restart), so running this script twice keeps one process per app.
# --update-env hands changed TELEMETRY_* values to reloaded apps.
"$pm2" startOrReload "$repo/ecosystem.config.js" --update-env >/dev/null ||
  die "pm2 startOrReload ecosystem.config.js failed"

# --- 5. readiness --------------------------------------------------------------------------
# http_status HOST:PORT PATH [SCHEME]: prints the HTTP status of GET SCHEME://HOST:PORT/PATH
# (default http), or 000. Over https the certificate is not checked: the probe only reads the
# status our own process answers on loopback, and the certificate names the public host.
http_status() {
  if [ "${3:-http}" = https ]; then
    curl -s -k -o /dev/null -m 2 -w '%{http_code}' "https://$1$2" || true
  elif command -v curl >/dev/null; then
    curl -s -o /dev/null -m 2 -w '%{http_code}' "http://$1$2" || true
  else
    local line=""
    if exec 3<>"/dev/tcp/${1%:*}/${1##*:}"; then
      printf 'GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$2" "$1" >&3
      IFS=' ' read -r -t 2 _ line _ <&3 || true
      exec 3<&- 3>&-
    fi 2>/dev/null
    printf '%s' "${line:-000}"
  fi
}

deadline=$((SECONDS + ready_seconds))
say "waiting up to ${ready_seconds}s for $web://$bridge_http/readyz (the bridge subscribed to MQTT)"
until [ "$(http_status "$bridge_http" /readyz "$web")" = 200 ]; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    say "error: the bridge did not become ready within ${ready_seconds}s; last lines of its log:"
    tail -n 30 "$log_dir/telemetry-bridge.error.log" >&2 || true
    "$pm2" ls >&2 || true
    say "the apps stay under PM2 (restarting on crashes); ./stop-services.sh stops them"
    exit 1
  fi
  sleep 1
done
say "the bridge is ready"

# The audit service and the API are not required to be ready (the bridge feeds Kafka meanwhile;
# the API needs the schema the audit service creates), but a database they cannot reach or a
# crash loop should not go unnoticed.
# check_ready APP ADDRESS WHAT [SCHEME]: waits until the deadline for ADDRESS/readyz, else warns
# with the log.
check_ready() {
  while :; do
    if [ "$(http_status "$2" /readyz "${4:-http}")" = 200 ]; then
      say "$3 ready"
      return
    fi
    [ "$SECONDS" -lt "$deadline" ] || break
    sleep 1
  done
  say "warning: $3 not ready at ${4:-http}://$2/readyz; last lines of its log:"
  grep -v -E '^ +([0-9]+: |at )' "$log_dir/$1.error.log" | tail -n 20 >&2 || true
}
check_ready telemetry-audit "$audit_http" "the audit service is"
check_ready telemetry-api "$api_http" "the API and dashboard are" "$web"
check_ready telemetry-rollup "$rollup_http" "the rollup service is"
check_ready telemetry-alert "$alert_http" "the alerter is"

# --- summary -------------------------------------------------------------------------------
"$pm2" ls
cat <<EOF

Telemetry pipeline is running.
  Dashboard:  $web://$api_http/   (API: $web://$api_http/api/devices, documented at /api/openapi.json)
  Logs:       $log_dir/telemetry-{bridge,audit,api,rollup,alert}.error.log
              (stdout in *.out.log; or: pm2 logs)
  WebSocket:  $live://$bridge_http/ws
  Health:     $web://$bridge_http/readyz (bridge), http://$audit_http/readyz (audit),
              $web://$api_http/readyz (API), http://$rollup_http/readyz (rollup),
              http://$alert_http/readyz (alerts); also /healthz, /metrics
  Alerts:     rules in config/alerts.toml; every alert is produced to telemetry.alerts and logged
              in $log_dir/telemetry-alert.error.log
  Try it:
    scripts/services.sh add-device pico-1     (prints its MQTT password, once)
    mosquitto_pub -h 127.0.0.1 -p $mqtt_port -u pico-1 -P '<password>' -t devices/pico-1/telemetry -q 1 -m "{\\"device_id\\":\\"pico-1\\",\\"device_ts\\":\$(date +%s),\\"temp\\":21.5}"
    MYSQL_PWD=telemetry-reader mariadb -h127.0.0.1 -P$mysql_port -utelemetry_reader telemetry -e 'select device_id, device_ts, metrics from telemetry order by received_at desc limit 3'
  Stop:       ./stop-services.sh   (--all also stops MariaDB, Mosquitto and Kafka)
EOF
