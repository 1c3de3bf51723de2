#!/usr/bin/env bash
# Night after night on one state store: 30 consecutive `tsusage run --simulate --date D` of 20,000
# ICCIDs at 50 requests/s (100 jobs a night, the simulator's per-device callbacks), printing per
# night the exit code, wall time, peak RSS, what the tracker read, and the store's size.
#
#   bash benches/compare/nightly.sh                 (no retention: the store keeps everything)
#   RETAIN=7 bash benches/compare/nightly.sh        (state.retain_days = 7)
#   NIGHTS=30 ICCIDS=20000 DATA=/tmp/tsusage-nightly bash benches/compare/nightly.sh
#   BIN=/tmp/b/tsusage bash benches/compare/nightly.sh   (a copy of a build, with examples/gen_data)
#
# Night N runs with TSUSAGE_TEST_DAYS_LATER=N, so that its callbacks are received N days after the
# first night's (retention counts receipt days); without RETAIN this changes nothing. Ends with the
# medians of nights 2-4 and of the last three, and their ratio.
set -euo pipefail
cd "$(dirname "$0")/../.."
NIGHTS=${NIGHTS:-30}
ICCIDS=${ICCIDS:-20000}
RETAIN=${RETAIN:-0}
DATA=${DATA:-/tmp/tsusage-nightly}
if [ -z "${BIN:-}" ]; then # BIN=path: measure that binary as it is (gen_data beside it, in examples/)
  cargo build --release --locked --bin tsusage --example gen_data >&2
  BIN=$PWD/target/release/tsusage
fi
GEN=$(dirname "$BIN")/examples/gen_data
rm -rf "$DATA" && mkdir -p "$DATA"
"$GEN" iccids "$ICCIDS" > "$DATA/iccids.csv"
cat > "$DATA/tsusage.toml" <<TOML
account_name = "0000123456-00001"
[input]
paths = ["$DATA/iccids.csv"]
[api]
requests_per_sec = 50
[output]
dir = "$DATA/out"
[state]
path = "$DATA/state/tsusage.db"
retain_days = $RETAIN
TOML

field() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }
printf "%5s %4s %7s %8s %9s %9s %10s %9s\n" night exit wall_s rss_mb read unmatched journaled store_mb
: > "$DATA/nights.tsv"
for n in $(seq 0 $((NIGHTS - 1))); do
  day=$(date -u -d "2021-09-01 + $n days" +%F)
  set +e
  TSUSAGE_TEST_DAYS_LATER=$n /usr/bin/time -f "%e %M" -o "$DATA/time" \
    "$BIN" --log warn run --simulate --config "$DATA/tsusage.toml" --date "$day" > "$DATA/stdout" 2> "$DATA/stderr"
  code=$?
  set -e
  read -r wall rss < "$DATA/time"
  report=$(tail -1 "$DATA/stdout")
  read_=$(field "$report" "r['collect']['callbacks_read']")
  unmatched=$(field "$report" "r['collect']['unmatched_callbacks']")
  journal=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT COUNT(*) FROM callbacks').fetchone()[0])" "$DATA/state/tsusage.db")
  store=$(du -cb "$DATA"/state/tsusage.db* | tail -1 | cut -f1)
  printf "%5s %4s %7s %8.1f %9s %9s %10s %9.1f\n" $((n + 1)) "$code" "$wall" "$(echo "$rss/1024" | bc -l)" \
    "$read_" "$unmatched" "$journal" "$(echo "$store/1048576" | bc -l)"
  echo "$((n + 1)) $code $wall $rss" >> "$DATA/nights.tsv"
done
python3 - "$DATA/nights.tsv" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
bad = [r[0] for r in rows if r[1] != "0"]
first, last = rows[1:4], rows[-3:]
med = lambda rs, i: statistics.median(float(r[i]) for r in rs)
w2, w30 = med(first, 2), med(last, 2)
m2, m30 = med(first, 3) / 1024, med(last, 3) / 1024
print(f"nights not exit 0: {bad or 'none'}")
print(f"wall: nights 2-4 median {w2:.2f} s, last 3 median {w30:.2f} s, ratio {w30 / w2:.2f}")
print(f"peak RSS: nights 2-4 median {m2:.1f} MB, last 3 median {m30:.1f} MB, ratio {m30 / m2:.2f}")
PY
