"""Shared fixtures: the real-data folder (skipped cleanly when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""../shared/data beside the checkout (real anonymised HNC cases; never copied here)."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; skips the test when it is absent."""
    if not (SHARED_DATA / "onko_hn_eyes").is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA
