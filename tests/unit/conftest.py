"""
Hypothesis profiles for the property tests in this directory, and a fixture for the
bench's tests.

``default``: what ``scripts/test.sh`` runs; no deadline, since the machine running it may be
loaded and a slow example is not a failure.  ``mutation``: fewer examples, derandomised, so a
mutant is killed or not the same way every run (scripts/mutation.sh).  ``thorough``: many
more examples, for a long hunt by hand.  Pick one with ``HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("default", max_examples=150, **_COMMON)  # type: ignore[arg-type]
settings.register_profile(
    "mutation",
    max_examples=60,
    derandomize=True,
    database=None,
    **_COMMON,  # type: ignore[arg-type]
)
settings.register_profile("thorough", max_examples=5000, **_COMMON)  # type: ignore[arg-type]
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def bench_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put the checkout on ``sys.path``: the bench runs from it, it is not installed."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
