"""Shared fixtures. Real-data tests use `real_data`: skipped when EDGEDANCE_DATA is unset,
a failure (not a skip) when it is set but missing, and always a failure in CI."""
from __future__ import annotations

import os
import pathlib

import pytest


@pytest.fixture(scope="session")
def real_data() -> pathlib.Path:
    root = os.environ.get("EDGEDANCE_DATA")
    if not root:
        if os.environ.get("CI"):
            pytest.fail("CI must set EDGEDANCE_DATA to the Music-to-Dance folder")
        pytest.skip("EDGEDANCE_DATA is not set (point it at the Music-to-Dance folder to run real-data tests)")
    path = pathlib.Path(root)
    dances = sorted(p for p in path.glob("DANCE_*") if (p / "audio.mp3").exists())
    if not dances:
        pytest.fail(f"EDGEDANCE_DATA={root!r} holds no DANCE_*/audio.mp3 folders")
    return path
