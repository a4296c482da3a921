"""
Print the mutation score of the last ``mutmut run`` and the mutants it did not kill.

Killed means a test failed (or the mutant hung past mutmut's timeout); ``no tests`` means no
selected test calls the mutated function, and counts as not killed.  Mutants listed in
scripts/mutation-equivalent.txt (one name and the reason per line) are judged equivalent to
the original: they are reported apart, and the score is given with and without them.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "scripts" / "mutation-equivalent.txt"
KILLED = {"killed", "timeout"}


def main() -> int:
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "mutmut"), "results", "--all", "true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    status = dict(line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)
    equivalent = {}
    if EQUIVALENT.exists():
        for line in EQUIVALENT.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, why = line.partition(" ")
                equivalent[name] = why.strip()
    counts = Counter(status.values())
    killed = sum(counts[s] for s in KILLED)
    alive = sorted(name for name, s in status.items() if s not in KILLED)
    judged = [name for name in alive if name in equivalent]
    print(f"mutants: {len(status)}  " + "  ".join(f"{s}: {n}" for s, n in sorted(counts.items())))
    print(f"score: {killed}/{len(status)} killed = {100 * killed / len(status):.1f} %")
    if judged:
        rest = len(status) - len(judged)
        print(
            f"score without the {len(judged)} judged equivalent: {killed}/{rest} "
            f"= {100 * killed / rest:.1f} %"
        )
    for name in alive:
        note = f"  (equivalent: {equivalent[name]})" if name in equivalent else ""
        print(f"  {status[name]:<10} {name}{note}")
    # A name is kept only while its function's source is unchanged: a changed function
    # renumbers its mutants, and its judgements must be made again.
    for name in sorted(equivalent):
        if name not in status or status[name] in KILLED:
            why = "no such mutant now" if name not in status else "killed"
            print(f"  stale      {name}  (judged equivalent, but {why}: judge its function again)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
