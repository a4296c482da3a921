"""
The vmcontroller benchmark: ``python -m bench`` (or ``bash scripts/bench.sh``) boots one
guest and times the agent's ping, exec, push and pull against a bare echo and the same
transfers done by C tools in the guest, through a virtio-serial port of the same VM, then
prints them beside the project's targets.
"""

from __future__ import annotations

from bench.run import Results, Settings, measure, run

__all__ = ["Results", "Settings", "measure", "run"]
