// PM2 ecosystem of telemetry-pipeline: runs the `telemetry` release binary as five services.
//
//   telemetry-bridge   `telemetry bridge`  MQTT -> WebSocket live view (/ws) + Kafka raw topic
//   telemetry-audit    `telemetry audit`   Kafka raw topic -> validate -> MariaDB + cleaned topic/DLQ
//   telemetry-api      `telemetry api`     HTTP API and dashboard, reading MariaDB
//   telemetry-rollup   `telemetry rollup`  Kafka cleaned topic -> minute/hour aggregates in MariaDB
//   telemetry-alert    `telemetry alert`   Kafka cleaned + DLQ topics -> rules (config/alerts.toml)
//                                          -> telemetry.alerts topic and an optional webhook
//
// Normally driven by ./start-services.sh (pm2 startOrReload ecosystem.config.js --update-env) and
// ./stop-services.sh; the infrastructure (MariaDB, Mosquitto, Kafka) comes from scripts/services.sh.
//
// - script: "$CARGO_TARGET_DIR/release/telemetry" (default target dir
//   /var/cache/telemetry-pipeline/target, where start-services.sh builds it); `interpreter: 'none'`
//   runs it directly, not through node.
// - logs: one out and one error file per app under "$TELEMETRY_LOG_DIR" (default
//   "$TELEMETRY_STATE_DIR/logs/", /var/lib/telemetry-pipeline/logs/). The services log to stderr, so the *.error.log files hold
//   their logs. PM2 does not rotate them (`pm2 install pm2-logrotate` does).
// - shutdown: PM2 signals the app and waits kill_timeout (20 s) before SIGKILL. On the signal the
//   services finish in-flight work and commit Kafka offsets (TELEMETRY_SHUTDOWN_GRACE_SECONDS,
//   10 s by default): keep kill_timeout above that grace period. The signal is the PM2 daemon's
//   (PM2 has no per-app setting): SIGINT, or PM2_KILL_SIGNAL from the daemon's environment when it
//   started; start-services.sh sets PM2_KILL_SIGNAL=SIGTERM. The binary treats both alike.
// - restarts: autorestart with exponential backoff (PM2 waits 100 ms, then 1.5x longer after each
//   crash, at most 15 s, and starts again from 100 ms once an app has stayed up 30 s), so an outage
//   of Kafka, MariaDB or Mosquitto does not become a tight crash loop. max_restarts is high so that
//   PM2 keeps retrying through a long outage instead of marking the app "errored".
// - env: only the TELEMETRY_* variables (and RUST_LOG) that are set in the environment of the pm2
//   command are passed; the binary applies its own defaults to the rest (`telemetry bridge --help`,
//   `telemetry audit --help`, `telemetry api --help`, `telemetry rollup --help`,
//   `telemetry alert --help`). Reload with --update-env so that changed values take effect.
'use strict';

const fs = require('fs');
const path = require('path');

// A relative CARGO_TARGET_DIR is relative to where cargo runs: the repository root.
const targetDir = path.resolve(
  __dirname,
  process.env.CARGO_TARGET_DIR || '/var/cache/telemetry-pipeline/target',
);
const stateDir = path.resolve(
  __dirname,
  process.env.TELEMETRY_STATE_DIR || '/var/lib/telemetry-pipeline',
);
const logDir = path.resolve(__dirname, process.env.TELEMETRY_LOG_DIR || path.join(stateDir, 'logs'));
// TELEMETRY_BINARY runs another build of the binary (the PM2 test runs the debug one).
const binary = path.resolve(
  __dirname,
  process.env.TELEMETRY_BINARY || path.join(targetDir, 'release', 'telemetry'),
);

// PM2 does not create missing log directories.
try {
  fs.mkdirSync(logDir, { recursive: true });
} catch (error) {
  // PM2 reports it when it cannot open the log files.
}

// The environment of every app: only what is set; the binary has the defaults.
const settings = Object.fromEntries(
  Object.entries(process.env).filter(
    ([name]) => name.startsWith('TELEMETRY_') || name === 'RUST_LOG',
  ),
);

// One service of the binary: `telemetry <subcommand>`.
function service(name, subcommand) {
  return {
    name,
    script: binary,
    args: [subcommand],
    interpreter: 'none',
    exec_mode: 'fork',
    instances: 1,
    cwd: __dirname,
    env: settings,
    out_file: path.join(logDir, `${name}.out.log`),
    error_file: path.join(logDir, `${name}.error.log`),
    merge_logs: true,
    // Graceful shutdown: up to 20 s after the signal before SIGKILL.
    kill_timeout: 20000,
    // Restart policy.
    autorestart: true,
    exp_backoff_restart_delay: 100,
    min_uptime: 5000,
    max_restarts: 1000,
    watch: false,
  };
}

module.exports = {
  apps: [
    service('telemetry-bridge', 'bridge'),
    service('telemetry-audit', 'audit'),
    service('telemetry-api', 'api'),
    service('telemetry-rollup', 'rollup'),
    service('telemetry-alert', 'alert'),
    // start-services.sh and stop-services.sh take the app names from this list.
  ],
};
