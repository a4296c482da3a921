#!/usr/bin/env bash
# Mutation testing (mutmut) of the code that defends against a hostile peer: the wire protocol
# (guest_agent/protocol/), the host client's request, transfer and exec code
# (vmcontroller/client.py, _files.py, _exec.py) and the agent's file operations
# (guest_agent/ops/files.py).  The modules and the unit tests that run are in setup.cfg
# ([mutmut]); for each mutant mutmut runs only the tests that call the mutated function.
#
#   bash scripts/mutation.sh            # run (results are cached in mutants/; rerun resumes)
#   bash scripts/mutation.sh --fresh    # forget earlier results first
#
# Prints the score and the mutants that survived; `.venv/bin/mutmut show NAME` shows one.
# Takes about 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fresh" ]]; then
    rm -rf mutants
fi
if ! .venv/bin/python -c "import mutmut, hypothesis" 2>/dev/null; then
    .venv/bin/python -m pip install -q -e ".[test,mutation]"
fi
# Derandomised property tests: a mutant is killed or not the same way every run.
mkdir -p mutants
# A mutant may loop allocating memory or writing a file: bound both, so that it fails alone
# instead of starving the machine (the kernel would pick any large process to kill).
ulimit -v 6000000
ulimit -f 2000000
export HYPOTHESIS_PROFILE=mutation
.venv/bin/mutmut run --max-children "${MUTATION_JOBS:-2}" > mutants/run.log 2>&1 || {
    tail -40 mutants/run.log
    exit 1
}
.venv/bin/python scripts/mutation_score.py
