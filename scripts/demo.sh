#!/usr/bin/env bash
# The main job: build or reuse the default guest image, boot it, reach its agent, exec,
# push and pull a 16 MiB file, snapshot and revert, shut down. Each step prints its time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
exec .venv/bin/vmcontroller demo "$@"
