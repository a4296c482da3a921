"""``python -m guest_agent run ...`` serves the host; ``... install`` installs the agent."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["install"]:
        from guest_agent import install

        return install.main(argv[1:])
    if argv[:1] == ["run"]:
        from guest_agent import service

        return service.main(argv[1:])
    print("usage: python -m guest_agent {run|install} [options]  (--help after either)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
