#!/usr/bin/env bash
# Mutation testing (mutmut) of the code that defends against a hostile peer: the wire protocol
# (guest_agent/protocol/), the host client's request, transfer and exec code
# (vmcontroller/client.py, _files.py, _exec.py) and the agent's file operations
# (guest_agent/ops/files.py).  The modules and the unit tests that run are in setup.cfg
# ([mutmut]); for each mutant mutmut runs only the tests that call the mutated function.
#
#   bash scripts/mutation.sh             # run (results are cached in mutants/; rerun resumes)
#   bash scripts/mutation.sh --fresh     # forget earlier results first
#   bash scripts/mutation.sh NAME...     # run these mutants again (after adding tests, say)
#
# Prints the score and the mutants not killed; `.venv/bin/mutmut show NAME` shows one.
# Takes about 30 minutes on 2 cores (about 4,000 mutants).
#
# A mutant of the file operations can do anything a file operation can: with the agent's
# refusal of "/" broken, `remove("/", recursive=True)` empties the file system.  So, started
# as root (CI), mutmut runs as the user nobody, in a private mount namespace where every file
# system is read-only but fresh tmpfs on /tmp and /dev/shm and the mutants/ directory.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fresh" ]]; then
    rm -rf mutants
    shift
fi
if ! .venv/bin/python -c "import hypothesis, mutmut" 2>/dev/null; then
    .venv/bin/python -m pip install -q -e ".[test,mutation]"
fi
mkdir -p mutants
# Derandomised property tests: a mutant is killed or not the same way every run.
export HYPOTHESIS_PROFILE=mutation
run=(.venv/bin/mutmut run --max-children "${MUTATION_JOBS:-2}" "$@")
if [[ $(id -u) == 0 ]]; then
    chown -R nobody: mutants
    # shellcheck disable=SC2016
    unshare --mount --propagation private bash -c '
        set -euo pipefail
        findmnt -rn -o TARGET | sort -u | while read -r target; do
            mount -o remount,bind,ro "$target" 2>/dev/null || true
        done
        mount -o remount,bind,ro /
        mount -t tmpfs -o size=4g,mode=1777 tmpfs /tmp
        mount -t tmpfs -o size=1g,mode=1777 tmpfs /dev/shm  # multiprocessing locks
        mount --bind mutants mutants
        mount -o remount,bind,rw mutants
        touch / 2>/dev/null && { echo "mutation.sh: / is still writable, refusing to run" >&2; exit 1; }
        exec setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all \
            env HOME=/tmp "$@"
    ' mutation "${run[@]}" > mutants/run.log 2>&1 || { tail -40 mutants/run.log; exit 1; }
else
    "${run[@]}" > mutants/run.log 2>&1 || { tail -40 mutants/run.log; exit 1; }
fi
.venv/bin/python scripts/mutation_score.py
