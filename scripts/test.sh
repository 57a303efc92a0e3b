#!/usr/bin/env bash
# Install everything the test suite needs on Debian 12 and run all of it
# (real docker-registry, containerd, skopeo, podman, prometheus, redis,
# network namespaces). Needs root. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then exec sudo "$0" "$@"; fi

# Debian starts services on install (docker-registry on :5000, prometheus on :9090,
# on all interfaces); the tests start their own, on 127.0.0.1 only.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    python3 python3-venv python3-pip ca-certificates curl tmux \
    docker-registry containerd skopeo podman prometheus redis-server \
    iproute2 ethtool stargz-snapshotter apache2-utils nginx-light

[ -x .venv/bin/pip ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest "$@"
