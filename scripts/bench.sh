#!/usr/bin/env bash
# The benchmark: on one real booted guest, the agent's ping, exec, push and pull against a
# bare echo and the same transfers by C tools in the guest, through the same kind of
# virtio-serial channel. Options: python -m bench --help.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
exec .venv/bin/python -m bench "$@"
