#!/usr/bin/env bash
# Validates every Kubernetes document under deploy/kubernetes/ against the API schemas of the
# Kubernetes versions a cluster runs today, strictly (an unknown or missing field is an error), with
# `kubernetes-validate` (its schemas ship with it: no cluster, no network once installed). It is
# pip-installed into a venv under ${XDG_CACHE_HOME:-~/.cache}/tsusage/ the first time.
#
#   bash scripts/validate-deploy.sh [VERSION…]     # default: 1.29.0 … 1.33.0
set -euo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(1.29.0 1.30.0 1.31.0 1.32.0 1.33.0)
venv="${XDG_CACHE_HOME:-$HOME/.cache}/tsusage/kubernetes-validate-venv"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  echo "validate-deploy: installing kubernetes-validate (pip) into $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check kubernetes-validate >&2
fi
status=0
for v in "${versions[@]}"; do
  if "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" deploy/kubernetes/*.yaml; then
    echo "validate-deploy: deploy/kubernetes/*.yaml valid for Kubernetes $v"
  else
    status=1
  fi
done
exit "$status"
