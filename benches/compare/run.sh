#!/usr/bin/env bash
# tsusage ingest vs DuckDB on the same callbacks, same machine, alternately, medians of N runs.
#
#   bash benches/compare/run.sh [RUNS]        (default 3; data in ${DATA:-/tmp/tsusage-compare})
#
# Data: 10,000 usage callbacks x 100 records (+ 10,000 completion callbacks) = 1,000,000 rows, as
# 20,000 files and as one NDJSON file (examples/gen_data.rs). DuckDB casts to the same schema and
# writes zstd Parquet: `read_text` + `from_json` on one thread for the files (its fastest form there),
# `read_json` on 2 threads for NDJSON. Wall time includes process start; peak RSS from /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-3}
DATA=${DATA:-/tmp/tsusage-compare}
cargo build --release --locked --bin tsusage --example gen_data --example floor >&2
python3 -c "import duckdb" 2>/dev/null || python3 -m pip install --quiet duckdb >&2
GEN=target/release/examples/gen_data
if [ ! -d "$DATA/files-src" ]; then
  "$GEN" callbacks "$DATA/files-src" --callbacks 10000 --records 100
  "$GEN" callbacks "$DATA/ndjson-src" --callbacks 10000 --records 100 --ndjson
fi
cat > "$DATA/tsusage.toml" <<TOML
account_name = "0000123456-00001"
[output]
dir = "$DATA/out"
[state]
path = "$DATA/state/tsusage.db"
TOML

SCHEMA='{"requestId":"VARCHAR","deviceResponse":{"devicePromoUsageResponse":[{"deviceIdentifierCollection":[{"id":"VARCHAR","kind":"VARCHAR"}],"dataUsage":"VARCHAR","smsUsage":"VARCHAR","moSms":"VARCHAR","mtSms":"VARCHAR","startDate":"VARCHAR","endDate":"VARCHAR"}]}}'
ROWS="SELECT '0000123456-00001' AS account_name, r.deviceIdentifierCollection[1].id AS iccid,
        CAST(r.startDate AS TIMESTAMPTZ) AS usage_start, CAST(r.endDate AS TIMESTAMPTZ) AS usage_end,
        CAST(r.dataUsage AS BIGINT) AS data_usage_bytes, CAST(r.smsUsage AS BIGINT) AS sms_usage,
        CAST(r.moSms AS BIGINT) AS mo_sms, CAST(r.mtSms AS BIGINT) AS mt_sms, request_id,
        now() AS received_at"

cat > "$DATA/duck_files.py" <<PY
import duckdb, sys
src, out = sys.argv[1], sys.argv[2]
con = duckdb.connect(); con.execute("SET threads=1")
con.execute("""COPY (
  WITH cb AS (SELECT from_json(content, '$SCHEMA') AS j FROM read_text('SRC/*.json')),
       recs AS (SELECT j.requestId AS request_id, unnest(j.deviceResponse.devicePromoUsageResponse) AS r
                FROM cb WHERE j.deviceResponse.devicePromoUsageResponse IS NOT NULL)
  $ROWS FROM recs) TO 'OUT' (FORMAT parquet, COMPRESSION zstd)""".replace("SRC", src).replace("OUT", out))
PY

cat > "$DATA/duck_ndjson.py" <<PY
import duckdb, sys
src, out = sys.argv[1], sys.argv[2]
con = duckdb.connect(); con.execute("SET threads=2")
con.execute("""COPY (
  WITH cb AS (SELECT requestId AS request_id, deviceResponse FROM read_json('SRC/callbacks.ndjson',
                format='newline_delimited', columns={'requestId':'VARCHAR','deviceResponse':'STRUCT(devicePromoUsageResponse STRUCT(deviceIdentifierCollection STRUCT(id VARCHAR, kind VARCHAR)[], dataUsage VARCHAR, smsUsage VARCHAR, moSms VARCHAR, mtSms VARCHAR, startDate VARCHAR, endDate VARCHAR)[])'})),
       recs AS (SELECT request_id, unnest(deviceResponse.devicePromoUsageResponse) AS r FROM cb
                WHERE deviceResponse.devicePromoUsageResponse IS NOT NULL)
  $ROWS FROM recs) TO 'OUT' (FORMAT parquet, COMPRESSION zstd)""".replace("SRC", src).replace("OUT", out))
PY

# Runs "$@" once; prints "seconds peak_rss_mb".
measure() {
  local t; t=$(mktemp)
  /usr/bin/time -f "%e %M" -o "$t" "$@" > /dev/null 2>&1
  awk '{printf "%s %.0f\n", $1, $2/1024}' "$t"; rm -f "$t"
}

fresh() { rm -rf "$DATA/out" "$DATA/state" "$DATA/$1"; cp -r "$DATA/$1-src" "$DATA/$1"; sync; }

declare -A T M
for i in $(seq 1 "$RUNS"); do
  fresh files;  read -r s m < <(measure target/release/tsusage --log warn ingest "$DATA/files" --config "$DATA/tsusage.toml"); T[tf]+="$s "; M[tf]+="$m "
  read -r s m < <(measure python3 "$DATA/duck_files.py" "$DATA/files-src" "$DATA/duck-files.parquet"); T[df]+="$s "; M[df]+="$m "
  fresh ndjson; read -r s m < <(measure target/release/tsusage --log warn ingest "$DATA/ndjson" --config "$DATA/tsusage.toml"); T[tn]+="$s "; M[tn]+="$m "
  read -r s m < <(measure python3 "$DATA/duck_ndjson.py" "$DATA/ndjson-src" "$DATA/duck-ndjson.parquet"); T[dn]+="$s "; M[dn]+="$m "
  # The floor under ingest, with its own stages (examples/floor.rs): read; + parse; + Parquet.
  for stage in read parse parquet; do
    for shape in files ndjson; do
      read -r s m < <(measure target/release/examples/floor "$stage" "$DATA/$shape-src"); T[$stage-$shape]+="$s "; M[$stage-$shape]+="$m "
    done
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
row() {
  local tt dt tm dm; tt=$(echo "${T[$1]}" | median); dt=$(echo "${T[$2]}" | median)
  tm=$(echo "${M[$1]}" | median); dm=$(echo "${M[$2]}" | median)
  printf "%-28s tsusage %6.2f s %5d MB | DuckDB %6.2f s %5d MB | speed-up %.2fx, memory %.2fx  (tsusage: %s| DuckDB: %s)\n" \
    "$3" "$tt" "$tm" "$dt" "$dm" "$(echo "$dt / $tt" | bc -l)" "$(echo "$tm / $dm" | bc -l)" "${T[$1]}" "${T[$2]}"
}
echo "medians of $RUNS runs on $(nproc) cores:"
row tf df "20,000 callback files"
row tn dn "one NDJSON file"
echo "the floor under ingest (its own stages, without journal, rejects, moves, report), medians:"
for stage in read parse parquet; do
  printf "  %-8s files %5.2f s (%s)  NDJSON %5.2f s (%s)\n" "$stage" \
    "$(echo "${T[$stage-files]}" | median)" "${T[$stage-files]}" \
    "$(echo "${T[$stage-ndjson]}" | median)" "${T[$stage-ndjson]}"
done
# What the kernel charges here for the moves and the journal's fsyncs (they vary between VMs of
# this kind by up to 3x: read the ratios above next to these).
python3 benches/compare/machine.py "$DATA"
