#!/usr/bin/env bash
# The analyst example on a fresh simulated run: `tsusage run --simulate` on the bundled sample into a
# temp directory, then examples/analyst/daily_usage.py on its output (checks + PNG).
#
#   bash examples/analyst/run.sh            # uses target/debug/tsusage (built by `cargo test`)
#   TSUSAGE_BIN=target/release/tsusage PNG=daily_usage.png bash examples/analyst/run.sh
#
# Python: uses python3 when it has duckdb and matplotlib, else a venv with them (pip install);
# without pip it says so and exits 0 (the only reason it skips).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${TSUSAGE_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/tsusage}"
[ -x "$bin" ] || { echo "no tsusage binary at $bin: run cargo build first" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
png="${PNG:-$work/daily_usage.png}"

python="${PYTHON:-python3}"
if ! "$python" -c 'import duckdb, matplotlib' 2>/dev/null; then
  venv="${TMPDIR:-/tmp}/tsusage-analyst-venv"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import duckdb, matplotlib' 2>/dev/null; then
    if ! "$python" -m venv "$venv" 2>/dev/null || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
      echo "SKIPPED examples/analyst: no pip for $python to install duckdb and matplotlib"
      exit 0
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check duckdb matplotlib
  fi
  python="$venv/bin/python"
fi

cd "$work"
status=0
TSUSAGE_INPUT__PATHS="[\"$root/data/iccids.csv\"]" TSUSAGE_OUTPUT__DIR="$work/out" \
  TSUSAGE_STATE__PATH="$work/state/tsusage.db" \
  "$bin" --log warn run --simulate --config "$root/data/tsusage.toml" --from 2021-08-15 --to 2021-08-17 \
  > run.txt || status=$?
# 3: partial, because the sample's bad ICCID rows are rejected on purpose.
[ "$status" = 3 ] || { cat run.txt; echo "tsusage run exited $status (expected 3)" >&2; exit 1; }
"$python" "$root/examples/analyst/daily_usage.py" --out "$work/out" --png "$png"
[ -s "$png" ] && head -c 8 "$png" | grep -q PNG || { echo "no PNG at $png" >&2; exit 1; }
echo "examples/analyst: ok ($png)"
