#!/usr/bin/env bash
# Shows that the conformance suite fails when a driver lacks any one operation: for each
# configuration given (default: the ones that need no real VM) and each member of
# IHypervisorDriver, runs the suite with that member removed from the driver
# ($VMC_CONFORMANCE_REMOVE, see tests/conformance/conftest.py), then, for an operation, with it
# made hollow (it returns at once and does nothing: $VMC_CONFORMANCE_HOLLOW), and expects the
# suite to fail each time.
# Prints one line per pair (pytest stops at the first failure: -x); exits non-zero if the
# suite passed without some member.
# Usage: bash scripts/conformance-removal.sh [configuration-id ...]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export VMC_CONFORMANCE_EVENT_TIMEOUT=10
CONFIGS=("$@")
if [ ${#CONFIGS[@]} -eq 0 ]; then
    mapfile -t CONFIGS < <($PY -c '
from tests.conformance.configurations import CONFIGURATIONS
for c in CONFIGURATIONS:
    if not any(m.name == "integration" for m in c.marks):
        print(c.id)')
fi
mapfile -t MEMBERS < <($PY -c '
from hypervisors.interface import IHypervisorDriver
print("\n".join(sorted(IHypervisorDriver.names(all=True))))')
# Hollow versions of the operations (the methods); an attribute is only removed.
mapfile -t OPERATIONS < <($PY -c '
from zope.interface.interface import Method
from hypervisors.interface import IHypervisorDriver
print("\n".join(n for n in sorted(IHypervisorDriver.names(all=True)) if isinstance(IHypervisorDriver[n], Method)))')
status=0
for config in "${CONFIGS[@]}"; do
    VMC_CONFORMANCE_CONFIGURATIONS="$config" $PY -m pytest -q -p no:cacheprovider tests/conformance >/dev/null 2>&1 \
        || { echo "the suite fails on $config with nothing removed: fix that first"; exit 2; }
done
for config in "${CONFIGS[@]}"; do
    for member in "${MEMBERS[@]}"; do
        modes=(REMOVE)
        [[ " ${OPERATIONS[*]} " == *" $member "* ]] && modes+=(HOLLOW)
        for mode in "${modes[@]}"; do
            what=$([ "$mode" = REMOVE ] && echo removed || echo hollow)
            out=$(env VMC_CONFORMANCE_CONFIGURATIONS="$config" "VMC_CONFORMANCE_$mode=$member" \
                $PY -m pytest -q -x -p no:cacheprovider tests/conformance 2>&1)
            if [ $? -eq 0 ]; then
                echo "PASSED with $member $what on $config: the suite misses it"
                status=1
            else
                echo "fails with $member $what on $config: $(echo "$out" | tail -1)"
            fi
        done
    done
done
exit $status
