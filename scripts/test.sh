#!/usr/bin/env bash
# Runs every test of telemetry-pipeline: starts (installing if needed) the real services the
# integration tests use (Apache Kafka, MariaDB, Mosquitto on 127.0.0.1), then `cargo test`.
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh -p telemetry-core`.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/telemetry-pipeline/target}

# The toolchain rust-toolchain.toml pins, also where rustup does not install it by itself
# (RUSTUP_AUTO_INSTALL=0); a no-op when it is there.
rustup toolchain install >/dev/null

scripts/services.sh start

# The dashboard's browser test (crates/telemetry/tests/dashboard.rs) drives Debian's Chromium with
# playwright-core from npm (tests/browser); never a browser download.
if [ ! -x /usr/bin/chromium ]; then
  command -v apt-get >/dev/null || { echo "test: install Chromium (/usr/bin/chromium) by hand" >&2; exit 1; }
  echo "test: installing chromium (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 ||
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
fi
if [ ! -d tests/browser/node_modules/playwright-core ] ||
  [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
  echo "test: npm ci --prefix tests/browser" >&2
  npm ci --prefix tests/browser --no-fund --no-audit --loglevel=error
fi

# Each integration test makes a database of its own (named test_...); drop those of earlier runs
# (with the tests' own account, which may do so on test_ databases only).
mysql_port=${TELEMETRY_MYSQL_PORT:-3306}
stale=$(MYSQL_PWD=telemetry-test mariadb --no-defaults -h127.0.0.1 -P"$mysql_port" -utelemetry_test -N -e \
  "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE 'test\\_%'" || true)
for database in $stale; do
  MYSQL_PWD=telemetry-test mariadb --no-defaults -h127.0.0.1 -P"$mysql_port" -utelemetry_test -e "DROP DATABASE \`$database\`"
done

# cargo prints one result line per test binary; the last line sums them up for people and CI.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
if [ $# -eq 0 ]; then set -- --workspace; fi
cargo test --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ {
       for (i = 2; i <= NF; i++) {
         if ($i ~ /^passed;?$/) passed += $(i - 1)
         if ($i ~ /^failed;?$/) failed += $(i - 1)
       }
     }
     END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
