#!/usr/bin/env bash
# pyarrow and polars read a simulated run's Parquet straight from s3:// and agree with its report.
#
#   TSUSAGE_TEST_S3_ENDPOINT=http://127.0.0.1:8333 TSUSAGE_TEST_S3_BUCKET=tsusage-test \
#   AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... bash benches/compare/s3_read.sh
#
# The server and bucket are the tests' (docs/development.md, "Servers for the tests", starts
# one). The run writes to s3://$TSUSAGE_TEST_S3_BUCKET/compare-<time>-<pid>/ (left there to look
# at); each reader lists usage/, reads every partition with hive partitioning, and must find the
# report's rows per day.
# PROFILE=dev skips the release build.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${TSUSAGE_TEST_S3_ENDPOINT:?set it to the S3 server, see docs/development.md}"
: "${TSUSAGE_TEST_S3_BUCKET:?set it to an existing bucket}"
: "${AWS_ACCESS_KEY_ID:?}" "${AWS_SECRET_ACCESS_KEY:?}"
export AWS_REGION=${AWS_REGION:-us-east-1}
PROFILE=${PROFILE:-release}
cargo build --locked --profile "$PROFILE" --bin tsusage >&2
DIR=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
BIN=$(realpath "${CARGO_TARGET_DIR:-target}/$DIR/tsusage")
python3 -c "import pyarrow, polars" 2>/dev/null || python3 -m pip install --quiet pyarrow polars >&2

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PREFIX="compare-$(date +%s)-$$"
cat > "$WORK/tsusage.toml" <<TOML
account_name = "0000123456-00001"
[input]
paths = ["$(realpath data/iccids.csv)"]
[api]
requests_per_sec = 50
[output]
dir = "$WORK/out"
url = "s3://$TSUSAGE_TEST_S3_BUCKET/$PREFIX"
endpoint = "$TSUSAGE_TEST_S3_ENDPOINT"
path_style = true
[state]
path = "$WORK/state/tsusage.db"
TOML
code=0
(cd "$WORK" && "$BIN" run --simulate --config tsusage.toml --from 2021-08-15 --to 2021-08-17 \
  > stdout 2> stderr) || code=$?
# 3 (partial) is expected: the sample list holds deliberately bad rows.
if [ "$code" != 0 ] && [ "$code" != 3 ]; then
  cat "$WORK/stderr" >&2
  exit "$code"
fi

python3 - "$(tail -1 "$WORK/stdout")" "$TSUSAGE_TEST_S3_BUCKET/$PREFIX" <<'PY'
import json, os, sys, time
import polars as pl
import pyarrow.dataset as ds
import pyarrow.fs as pafs

report = json.load(open(sys.argv[1]))
where = sys.argv[2]
endpoint = os.environ["TSUSAGE_TEST_S3_ENDPOINT"]
expected = {p["partition"].split("=", 1)[1]: p["rows"] for p in report["output"]["partitions"]}
print(f"run {report['run_id']}: {report['output']['rows_written']} rows in "
      f"{report['output']['location']}")

def check(name, counts, seconds):
    ok = counts == expected
    print(f"  {name:8} {sum(counts.values()):>8} rows  {len(counts)} partitions  "
          f"{seconds * 1000:7.1f} ms  {'= report' if ok else f'!= report {expected}'}")
    return ok

started = time.perf_counter()
fs = pafs.S3FileSystem(endpoint_override=endpoint, region=os.environ["AWS_REGION"])
table = ds.dataset(f"{where}/usage", filesystem=fs, format="parquet",
                   partitioning="hive").to_table()
took = time.perf_counter() - started
days = table.group_by("usage_date").aggregate([([], "count_all")]).to_pylist()
ok = check("pyarrow", {str(d["usage_date"]): d["count_all"] for d in days}, took)

started = time.perf_counter()
df = pl.read_parquet(f"s3://{where}/usage/**/*.parquet", hive_partitioning=True,
                     storage_options={"aws_endpoint_url": endpoint, "aws_allow_http": "true",
                                      "aws_region": os.environ["AWS_REGION"]})
took = time.perf_counter() - started
counts = {str(k): v for k, v in df.group_by("usage_date").len().iter_rows()}
ok = check("polars", counts, took) and ok
assert str(table.schema.field("usage_start").type) == "timestamp[us, tz=UTC]"
sys.exit(0 if ok else 1)
PY
