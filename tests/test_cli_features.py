"""`python -m device beats|features` through a real subprocess on WAV files written here."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from device import features
from test_beat import drum_track, f_measure


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "device", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    pcm, beats, _ = drum_track([(120, 15)], meter=4, seed=1)
    stereo = np.stack([pcm, pcm], axis=1).astype(np.float32) / 32768  # 44.1 kHz stereo, as songs are
    from device.audio import resample
    path = tmp_path_factory.mktemp("cli") / "drums.wav"
    sf.write(path, np.stack([resample(stereo[:, 0], 16000, 44100)] * 2, axis=1), 44100, subtype="PCM_16")
    return path, beats


def test_beats(wav):
    path, beats = wav
    r = _run("beats", str(path), "--tempo")
    assert r.returncode == 0, r.stderr
    times = np.array([float(line) for line in r.stdout.split()])
    assert np.all(np.diff(times) > 0)
    assert f_measure(beats, times) >= 0.95
    assert "120" in r.stderr or "119" in r.stderr or "121" in r.stderr, r.stderr
    assert "4/4" in r.stderr


def test_features(wav, tmp_path):
    path, _ = wav
    out = tmp_path / "f.npy"
    r = _run("features", str(path), "--out", str(out), "--info")
    assert r.returncode == 0, r.stderr
    x = np.load(out)
    want = features.extract_file(path)
    assert np.array_equal(x, want.x)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["columns"] == list(features.FEATURE_NAMES)
    assert len(meta["bpm"]) == x.shape[0]
    assert f"{x.shape[0]} frames x 48 features" in r.stdout


@pytest.mark.parametrize("content", [None, b"", b"RIFF0000WAVEfmt garbage"])
def test_bad_file(tmp_path, content):
    path = tmp_path / "broken.wav"
    if content is not None:
        path.write_bytes(content)
    for cmd in (["beats", str(path)], ["features", str(path), "--info"]):
        r = _run(*cmd)
        assert r.returncode == 2
        assert "broken.wav" in r.stderr and "Traceback" not in r.stderr


def test_help():
    r = _run("--help")
    assert r.returncode == 0 and "beats" in r.stdout and "features" in r.stdout
    for cmd in ("beats", "features"):
        r = _run(cmd, "--help")
        assert r.returncode == 0 and "AUDIO" in r.stdout
    r = _run("features", "x.wav")  # nothing to do
    assert r.returncode == 2 and "--out" in r.stderr
