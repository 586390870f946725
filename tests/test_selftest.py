"""`python -m device selftest`: PASS on a good setup, non-zero exit on a broken bundle, a wrong
golden output or a broker that refuses the device; its golden vectors are the repository's."""
from __future__ import annotations

import hashlib
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from broker.launcher import Broker
from converter.bundle import copy_bundle
from device import selftest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_embedded_golden_hash_is_the_repositorys_golden_file():
    golden = np.load(REPO / "tests" / "golden" / "frontend_seed1234.npy")
    sha = hashlib.sha256(np.ascontiguousarray(golden).astype("<i2").tobytes()).hexdigest()
    assert sha == selftest.FRONTEND_GOLDEN_SHA256, (
        f"tests/golden/frontend_seed1234.npy changed: set FRONTEND_GOLDEN_SHA256 in device/selftest.py to {sha}")
    from test_frontend import golden_signal
    np.testing.assert_array_equal(selftest.golden_signal(), golden_signal())


@pytest.fixture
def good_bundle(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path / "bundle")
    selftest.write_bundle_golden(b)
    return b


def _selftest(tmp_path, *args, ini: str = "[audio]\nsource = stdin\n"):
    p = tmp_path / "device.ini"
    p.write_text(ini)
    # loose limits: a loaded CI machine must not fail a test on timing (the figures are bench.pipeline's)
    return subprocess.run([sys.executable, "-m", "device", "selftest", "--config", str(p), "--seconds", "2",
                           "--max-p99-ms", "5000", "--max-cpu-ms", "1000", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def _lines(r) -> dict:
    return {ln.split(" ", 2)[1].rstrip(":"): ln.split(" ", 1)[0] for ln in r.stdout.splitlines()
            if ln.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")}


def test_selftest_passes_on_a_good_setup(good_bundle, tmp_path):
    r = _selftest(tmp_path, "--model", str(good_bundle), "--broker", "local")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _lines(r) == {"frontend": "PASS", "bundle": "PASS", "broker": "PASS", "microphone": "SKIP",
                         "realtime": "PASS"}, r.stdout
    assert "golden output of 100 frames" in r.stdout and "round trip" in r.stdout
    assert "all checks passed" in r.stdout


def test_selftest_fails_on_a_truncated_model(good_bundle, tmp_path):
    m = good_bundle / "model.tflite"
    m.write_bytes(m.read_bytes()[:1000])
    r = _selftest(tmp_path, "--model", str(good_bundle), "--broker", "none")
    assert r.returncode == 1
    st = _lines(r)
    assert st["bundle"] == "FAIL" and st["realtime"] == "FAIL" and st["frontend"] == "PASS"
    assert "truncated" in r.stdout and "FAILED: bundle, realtime" in r.stdout


def test_selftest_fails_when_the_golden_output_differs(good_bundle, tmp_path):
    g = dict(np.load(good_bundle / selftest.BUNDLE_GOLDEN))
    g["pose"] = g["pose"] + 0.05
    np.savez(good_bundle / selftest.BUNDLE_GOLDEN, **g)
    r = selftest.check_bundle(good_bundle)
    assert r.status == "FAIL" and "max |pose diff| 0.05" in r.detail


def test_selftest_fails_against_a_broker_that_refuses_the_device(good_bundle, tmp_path):
    with Broker(tmp_path / "broker", devices=("pi1",), tls=False, websockets=False) as b:
        ini = (f"[audio]\nsource = stdin\n[mqtt]\nhost = {b.host}\nport = {b.port}\nusername = device-pi1\n"
               f"password = wrong\n")
        r = _selftest(tmp_path, "--model", str(good_bundle), "--broker", "auto", "--seconds", "1", ini=ini)
        assert r.returncode == 1 and _lines(r)["broker"] == "FAIL", r.stdout
        assert "refused" in r.stdout or "Not authorized" in r.stdout
        ok = ini.replace("password = wrong", f"password = {b.credentials['device-pi1']}")
        r = _selftest(tmp_path, "--model", str(good_bundle), "--seconds", "1", ini=ok)
        assert r.returncode == 0, r.stdout
        assert "publish acknowledged" in r.stdout and "no read-back" in r.stdout  # the ACL: write, not read
