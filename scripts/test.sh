#!/usr/bin/env bash
# Runs every test: lint, types, the docs build, unit, local and integration tests on a real QEMU guest.
# Sets the host up first (packages, libvirt daemons, virtual environment).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
exec .venv/bin/tox -e lint,type,docs,tests -- "$@"
