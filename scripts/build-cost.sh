#!/usr/bin/env bash
# What the embedded Kafka broker (cargo feature `embedded-kafka`) adds to a clean release build of
# the `telemetry` binary: wall and CPU time, binary size (as built and stripped), target directory.
# Builds twice from empty target directories under ${BUILD_COST_DIR:-/tmp/telemetry-build-cost};
# takes 30 minutes or more on 2 cores. Figures go to docs/benchmarks.md ("Build cost").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
base=${BUILD_COST_DIR:-/tmp/telemetry-build-cost}
cargo fetch --locked >/dev/null
for variant in default lean; do
  dir=$base/$variant
  rm -rf "$dir"
  flags=()
  [ "$variant" = lean ] && flags=(--no-default-features)
  echo "== $variant ${flags[*]:-} (start $(date -u +%H:%M:%S) UTC)"
  /usr/bin/time -f "wall %e s, user %U s, sys %S s, peak RSS %M KB" \
    env CARGO_TARGET_DIR="$dir" cargo build --release --locked --quiet -p telemetry "${flags[@]}"
  echo "binary: $(stat -c %s "$dir/release/telemetry") bytes"
  strip -o "$dir/telemetry.stripped" "$dir/release/telemetry"
  echo "stripped: $(stat -c %s "$dir/telemetry.stripped") bytes"
  echo "target directory: $(du -sh "$dir" | cut -f1)"
  echo "packages in the resolve: $(cargo metadata --format-version 1 --locked "${flags[@]}" |
    python3 -c 'import json, sys; print(len(json.load(sys.stdin)["packages"]))')"
done
