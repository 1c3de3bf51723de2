#!/usr/bin/env bash
# Soak: `tsusage listen` under sustained load for a given time, killed with SIGKILL and restarted at
# once a few times, on one store; samples the listener's RSS, callbacks/s and the store's size every
# 10 s, checks that every acknowledged callback is in the journal, and prints a table
# (examples/soak.rs does the work; docs/performance.md quotes its runs).
#
#   bash benches/compare/soak.sh [SECS] [KILLS] [CONNECTIONS] [sqlite|postgres|both]
#
# Defaults: 600 s, 3 kills, 128 connections, sqlite. `postgres` uses $SOAK_PG_URL when set, else
# starts the test servers with scripts/services.sh (and stops them after); its `public` schema is
# emptied first. The SQLite store is a new directory under ${SOAK_DIR:-/tmp/tsusage-soak}, removed
# after the run unless SOAK_KEEP=1. Run it on a quiet machine: the load generator and the listener
# share its cores, and anything else running moves the figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-600}
KILLS=${2:-3}
CONNECTIONS=${3:-128}
BACKEND=${4:-sqlite}
ROOT=${SOAK_DIR:-/tmp/tsusage-soak}
cargo build --release --locked --bin tsusage --example soak >&2
SOAK=target/release/examples/soak
export SOAK_BIN="$PWD/target/release/tsusage"

soak_sqlite() {
  local dir="$ROOT/sqlite-$$"
  rm -rf "$dir" && mkdir -p "$dir"
  SOAK_DIR="$dir" env -u SOAK_PG_URL "$SOAK" "$SECS" "$KILLS" "$CONNECTIONS"
  [ "${SOAK_KEEP:-0}" = 1 ] || rm -rf "$dir"
}

soak_postgres() {
  local dir="$ROOT/postgres-$$" started=
  rm -rf "$dir" && mkdir -p "$dir"
  if [ -z "${SOAK_PG_URL:-}" ]; then
    export SERVICES_DIR="$ROOT/services-$$"
    eval "$(scripts/services.sh start)"
    started=1
    SOAK_PG_URL="$TSUSAGE_TEST_PG_URL"
  fi
  SOAK_DIR="$dir" SOAK_PG_URL="$SOAK_PG_URL" "$SOAK" "$SECS" "$KILLS" "$CONNECTIONS" || status=$?
  [ -z "$started" ] || scripts/services.sh stop
  [ "${SOAK_KEEP:-0}" = 1 ] || rm -rf "$dir"
  return "${status:-0}"
}

case "$BACKEND" in
  sqlite) soak_sqlite ;;
  postgres) soak_postgres ;;
  both) soak_sqlite && soak_postgres ;;
  *) echo "soak.sh: backend must be sqlite, postgres or both, not $BACKEND" >&2; exit 2 ;;
esac
