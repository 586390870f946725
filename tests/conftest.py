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


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> pathlib.Path:
    """A real full-int8 model bundle (random weights, the real architecture, 1 x 16 units) for the
    default feature config, built once per session by `converter.bundle.make_test_bundle`
    (needs TensorFlow, ~6 s). Load it with `device.model.load_bundle(tiny_bundle)`."""
    from converter.bundle import make_test_bundle
    from device import features
    from device.contract import DEFAULT_FEATURES

    return make_test_bundle(tmp_path_factory.mktemp("tiny_bundle") / "bundle",
                            n_features=features.n_features(DEFAULT_FEATURES))
