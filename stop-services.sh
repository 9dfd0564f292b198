#!/usr/bin/env bash
# Stops the telemetry pipeline's services that run under PM2 (the apps of ecosystem.config.js:
# telemetry-bridge, telemetry-audit, telemetry-api, telemetry-rollup, telemetry-alert),
# gracefully: `pm2 stop` signals the app (SIGTERM from a PM2 daemon started by start-services.sh,
# SIGINT from one started with PM2's defaults: the services handle both alike) and waits up to the
# app's kill_timeout (20 s) while the service finishes in-flight work and commits its Kafka
# offsets; `pm2 delete` then removes the app from PM2's list. Other PM2 apps are left alone.
#
#   ./stop-services.sh          stop our PM2 apps (nothing to do when they or PM2 are absent)
#   ./stop-services.sh --all    also stop MariaDB, Mosquitto and Kafka (scripts/services.sh stop),
#                               and the PM2 daemon if it no longer manages any app
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$repo"

say() { printf 'stop-services: %s\n' "$*" >&2; }

all=false
case "${1:-}" in
"") ;;
--all) all=true ;;
*)
  echo "usage: $0 [--all]" >&2
  exit 2
  ;;
esac

# The app names, from the ecosystem file (so a new app there is stopped too).
apps=$(node -e 'console.log(require(process.argv[1]).apps.map((app) => app.name).join(" "))' \
  "$repo/ecosystem.config.js" 2>/dev/null || echo "telemetry-bridge telemetry-audit telemetry-api telemetry-rollup telemetry-alert")

# Whether the PM2 daemon runs; asking the pm2 command would start one.
pm2_home=${PM2_HOME:-$HOME/.pm2}
daemon_running() { [ -f "$pm2_home/pm2.pid" ] && kill -0 "$(cat "$pm2_home/pm2.pid")" 2>/dev/null; }

if ! command -v pm2 >/dev/null; then
  say "PM2 is not installed: no service of ours runs under it"
elif ! daemon_running; then
  say "the PM2 daemon is not running: no service of ours runs under it"
else
  for app in $apps; do
    if pm2 describe "$app" >/dev/null 2>&1; then
      say "stopping $app (graceful shutdown, up to 20 s)"
      pm2 stop "$app" >/dev/null
      pm2 delete "$app" >/dev/null
      say "stopped and removed $app"
    else
      say "$app is not under PM2: nothing to stop"
    fi
  done
fi

if [ "$all" = true ]; then
  if command -v pm2 >/dev/null && daemon_running &&
    [ "$(pm2 jlist 2>/dev/null | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{try{console.log(JSON.parse(s.slice(s.indexOf("["))).length)}catch(e){console.log(-1)}})')" = 0 ]; then
    say "stopping the PM2 daemon (it manages no other app)"
    pm2 kill >/dev/null
  fi
  say "stopping MariaDB, Mosquitto and Kafka (scripts/services.sh stop)"
  "$repo/scripts/services.sh" stop
fi
say "done"
