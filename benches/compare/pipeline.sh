#!/usr/bin/env bash
# Submission rate, end-to-end run time and peak memory, against the built-in simulator (loopback).
#
#   bash benches/compare/pipeline.sh      (data and state in ${DATA:-/tmp/tsusage-pipeline})
#
# 1. `tsusage submit` against a separate `tsusage sim` process at 50 and at 500 req/s: achieved
#    rate, most requests in flight, CPU per request (user+sys of the submit process / requests).
# 2. `tsusage run --simulate`, 100,000 ICCIDs x 7 days (3,500 requests) at 500 req/s: wall time
#    against requests / rate + the time the last callbacks take (simulator in batched mode).
# 3. Peak RSS of `run --simulate` over 100,000 and 1,000,000 ICCIDs (one day), and of `ingest`
#    over 1x, 3x and 10x the comparison data (1, 3 and 10 million rows in one NDJSON file).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-/tmp/tsusage-pipeline}
BIN=target/release/tsusage
GEN=target/release/examples/gen_data
cargo build --release --locked --bin tsusage --example gen_data >&2
mkdir -p "$DATA"
[ -f "$DATA/iccids-100k.csv" ] || "$GEN" iccids 100000 > "$DATA/iccids-100k.csv"
[ -f "$DATA/iccids-1m.csv" ] || "$GEN" iccids 1000000 > "$DATA/iccids-1m.csv"

config() { # config NAME ICCIDS EXTRA...
  cat > "$DATA/$1.toml" <<TOML
account_name = "0000123456-00001"
[input]
paths = ["$DATA/$2"]
[api]
base_url = "http://127.0.0.1:9310/api"
requests_per_sec = 500
max_in_flight = 64
[output]
dir = "$DATA/out-$1"
[state]
path = "$DATA/state-$1/tsusage.db"
[sim]
listen_addr = "127.0.0.1:9310"
callback_mode = "batched"
$3
TOML
}
report() { python3 -c "import json,glob,sys; print(json.load(open(sorted(glob.glob('$1/runs/*Z-*.json'))[-1]))$2)"; }
timed() { /usr/bin/time -f "%e %U %S %M" -o "$DATA/time" "$@" > /dev/null 2>&1 || true; cat "$DATA/time"; }

echo "== submission against a separate simulator process"
config submit iccids-100k.csv ""
$BIN --log warn sim --config "$DATA/submit.toml" > /dev/null 2>&1 & SIM=$!
trap 'kill $SIM 2>/dev/null || true' EXIT
sleep 1
export TSUSAGE_API__APP_KEY=k TSUSAGE_API__APP_SECRET=s TSUSAGE_API__USERNAME=u TSUSAGE_API__PASSWORD=p
for rate_to in "50 2021-08-01" "500 2021-08-07"; do
  read -r rate to <<< "$rate_to"
  rm -rf "$DATA/out-submit" "$DATA/state-submit"
  read -r wall user sys rss < <(timed env TSUSAGE_API__REQUESTS_PER_SEC="$rate" $BIN --log warn submit --config "$DATA/submit.toml" --from 2021-08-01 --to "$to")
  python3 - "$rate" "$user" "$sys" <<PY
import json,sys,glob
r=json.load(open(sorted(glob.glob('$DATA/out-submit/runs/*Z-*.json'))[-1]))['submit']
rate,user,sys_=float(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3])
print(f"{rate:.0f} req/s configured: {r['submitted']} requests in {r['elapsed_secs']:.2f} s, achieved {r['achieved_rate_per_sec']:.1f} req/s ({100*(r['achieved_rate_per_sec']/rate-1):+.1f} %), max in flight {r['max_in_flight']} (cap 64), CPU {1000*(user+sys_)/r['submitted']:.2f} ms/request")
PY
done
kill $SIM; trap - EXIT; unset TSUSAGE_API__APP_KEY TSUSAGE_API__APP_SECRET TSUSAGE_API__USERNAME TSUSAGE_API__PASSWORD

echo "== end to end: run --simulate, 100,000 ICCIDs x 7 days at 500 req/s"
config e2e iccids-100k.csv ""
for i in 1 2 3; do
  rm -rf "$DATA/out-e2e" "$DATA/state-e2e"
  read -r wall user sys rss < <(timed $BIN --log warn run --simulate --config "$DATA/e2e.toml" --from 2021-08-01 --to 2021-08-07)
  python3 - "$wall" "$rss" <<PY
import json,sys,glob
r=json.load(open(sorted(glob.glob('$DATA/out-e2e/runs/*Z-*.json'))[-1]))
wall,rss=float(sys.argv[1]),int(sys.argv[2])//1024
n=r['submit']['submitted']; ideal=n/500
print(f"run {$i}: {wall:.2f} s wall, {rss} MB peak; {n} requests / 500 req/s = {ideal:.2f} s (+ 2 s settle in --simulate = {ideal+2:.2f} s): {wall/(ideal+2):.2f}x; status {r['status']}, {r['output']['rows_written']} rows")
PY
done

echo "== peak RSS of run --simulate, one day"
for n in 100k 1m; do
  config "mem-$n" "iccids-$n.csv" ""
  rm -rf "$DATA/out-mem-$n" "$DATA/state-mem-$n"
  read -r wall user sys rss < <(timed $BIN --log warn run --simulate --config "$DATA/mem-$n.toml" --from 2021-08-01 --to 2021-08-01)
  echo "$n ICCIDs: $wall s, peak RSS $((rss / 1024)) MB, $(report "$DATA/out-mem-$n" "['output']['rows_written']") rows"
done

echo "== peak RSS of ingest over 1x, 3x, 10x (one NDJSON file, 1,000,000 rows per day)"
for scale in 1 3 10; do
  src="$DATA/ingest-$scale"
  [ -d "$src" ] || "$GEN" callbacks "$src" --callbacks $((scale * 10000)) --records 100 --days "$scale" --ndjson
  printf 'account_name = "0000123456-00001"\n[callbacks]\nmax_file_bytes = 5000000000\n[output]\ndir = "%s"\n[state]\npath = "%s"\n' \
    "$DATA/out-ingest" "$DATA/state-ingest/tsusage.db" > "$DATA/ingest.toml"
  rm -rf "$DATA/out-ingest" "$DATA/state-ingest"
  read -r wall user sys rss < <(timed $BIN --log warn ingest "$src" --keep --config "$DATA/ingest.toml")
  echo "${scale}x ($((scale))M rows): $wall s, peak RSS $((rss / 1024)) MB"
done
