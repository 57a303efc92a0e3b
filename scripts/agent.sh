#!/usr/bin/env bash
# Install fleetp2p into ./.venv (Debian 12) and run the agent with its defaults:
# an OCI pull-through mirror on 127.0.0.1:5050 with an embedded tracker.
# Extra arguments go to `fleetp2p agent` (e.g. --config /etc/fleetp2p/agent.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
fi
[ -x .venv/bin/pip ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check .
exec .venv/bin/fleetp2p agent "$@"
