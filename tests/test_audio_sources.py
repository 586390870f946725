"""Live audio sources: a real PortAudio capture through a private PulseAudio null sink,
paced file playback, raw PCM on a pipe, the streaming resampler and the device errors."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from device.audio import (CHUNK_MS, AudioError, FileSource, MicSource, StdinSource, StreamResampler, list_devices,
                          load_file, open_source, resample)

SR = 16000


def _pattern(seconds: float, sr: int, seed: int = 3) -> np.ndarray:
    """Noise bursts of random length and level: a signal whose cross-correlation has one sharp peak."""
    rng = np.random.default_rng(seed)
    x = np.zeros(int(seconds * sr), np.float32)
    i = 0
    while i < len(x):
        n = int(rng.integers(sr // 20, sr // 5))
        x[i:i + n] = rng.standard_normal(min(n, len(x) - i)) * rng.uniform(0.05, 0.4)
        i += n + int(rng.integers(sr // 20, sr // 4))
    return x


@pytest.fixture
def pulse(monkeypatch):
    """A private PulseAudio daemon with a null sink 'edge' whose monitor is the default source."""
    if not shutil.which("pulseaudio") or not shutil.which("pactl"):
        pytest.skip("pulseaudio is not installed (scripts/setup.sh installs it)")
    run_dir = tempfile.mkdtemp(prefix="edpa")
    env = dict(os.environ, XDG_RUNTIME_DIR=run_dir, HOME=run_dir)
    subprocess.run(["pulseaudio", "--daemonize=yes", "--exit-idle-time=-1", "-n", "--disable-shm=yes",
                    "--load=module-native-protocol-unix", "--load=module-null-sink sink_name=edge"],
                   env=env, check=True, capture_output=True, timeout=30)
    pid = int(open(os.path.join(run_dir, "pulse", "pid")).read())
    try:
        subprocess.run(["pactl", "set-default-source", "edge.monitor"], env=env, check=True, timeout=10)
        for k in ("XDG_RUNTIME_DIR", "HOME"):
            monkeypatch.setenv(k, run_dir)
        yield env
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        shutil.rmtree(run_dir, ignore_errors=True)


def _capture_while_playing(env, tmp_path, rates_hz):
    played = _pattern(3.0, 44100)
    wav = tmp_path / "song.wav"
    sf.write(wav, played, 44100, subtype="PCM_16")
    chunks = []
    with MicSource("pulse", rates_hz=rates_hz) as mic:
        player = subprocess.Popen(["paplay", "--device=edge", str(wav)], env=env)
        try:
            t_end = time.monotonic() + 5.0
            while time.monotonic() < t_end and player.poll() is None or time.monotonic() < t_end - 4.0:
                c = mic.read(timeout=0.2)
                if c is not None:
                    chunks.append(c)
            for _ in range(30):  # the tail after paplay returns
                c = mic.read(timeout=0.02)
                if c is not None:
                    chunks.append(c)
        finally:
            player.wait(timeout=10)
        rate = mic.rate_hz
    return played, chunks, rate


@pytest.mark.parametrize("rates_hz", [(16000,), (48000,)], ids=["16k", "48k-decimated"])
def test_mic_captures_what_pulseaudio_plays(pulse, tmp_path, rates_hz):
    played, chunks, rate = _capture_while_playing(pulse, tmp_path, rates_hz)
    assert rate == rates_hz[0]
    assert chunks, "no audio came through the PortAudio stream"
    pcm = np.concatenate([c.pcm for c in chunks])
    assert pcm.dtype == np.int16
    assert [c.start for c in chunks] == list(np.cumsum([0] + [len(c.pcm) for c in chunks[:-1]]))
    assert all(b.t_capture >= a.t_capture for a, b in zip(chunks, chunks[1:]))
    ref = resample(played, 44100, SR)
    got = pcm.astype(np.float32) / 32767
    assert np.abs(got).max() > 0.05, "captured only silence"
    # normalized cross-correlation at the best lag: the capture is the played song, shifted
    n = 1 << int(np.ceil(np.log2(len(got) + len(ref))))
    xc = np.fft.irfft(np.fft.rfft(got, n) * np.conj(np.fft.rfft(ref, n)), n)
    lag = int(np.argmax(xc))
    lag = lag if lag < n // 2 else lag - n
    a, b = max(lag, 0), max(-lag, 0)
    m = min(len(got) - a, len(ref) - b)
    seg, r = got[a:a + m], ref[b:b + m]
    assert m > SR, f"only {m} samples overlap"
    rho = float(np.dot(seg, r) / (np.linalg.norm(seg) * np.linalg.norm(r) + 1e-12))
    assert rho > 0.9, f"captured audio correlates only {rho:.2f} with the played file (lag {lag})"
    assert -SR // 2 < lag < SR * 2, f"captured audio is shifted by {lag} samples"


def test_mic_errors_list_the_devices(pulse):
    with pytest.raises(AudioError) as e:
        MicSource("no-such-microphone").open()
    assert "no-such-microphone" in str(e.value) and "'pulse'" in str(e.value)
    with pytest.raises(AudioError, match="index 999 is not an input device.*'pulse'"):
        MicSource(999).open()
    names = [d["name"] for d in list_devices()]
    assert "pulse" in names


def test_file_source_paces_in_real_time(tmp_path):
    x = (_pattern(0.5, SR) * 32767).astype(np.int16)
    wav = tmp_path / "a.wav"
    sf.write(wav, x, SR, subtype="PCM_16")
    t0 = time.monotonic()
    with FileSource(wav, realtime=True) as src:
        chunks = list(src)
    took = time.monotonic() - t0
    x = load_file(wav)  # (file int16 -> float -> int16 may move a sample by one LSB)
    assert np.array_equal(np.concatenate([c.pcm for c in chunks]), x)
    assert took > 0.45, f"0.5 s of audio delivered in {took:.2f} s: not paced"
    n = 16000 * CHUNK_MS // 1000  # the default chunk; the file's tail may be shorter
    assert all(len(c.pcm) == n for c in chunks[:-1]) and 0 < len(chunks[-1].pcm) <= n
    t0 = time.monotonic()
    with FileSource(wav, realtime=False) as src:
        fast = list(src)
    assert np.array_equal(np.concatenate([c.pcm for c in fast]), x)


def test_file_source_loops_and_closes(tmp_path):
    x = np.arange(1000, dtype=np.int16)
    with FileSource("mem", realtime=False, pcm=x, loop=True) as src:
        got = [src.read() for _ in range(20)]
    assert np.concatenate([c.pcm for c in got])[:2000].tolist() == list(range(1000)) * 2
    assert src.exhausted and src.read() is None


def test_stdin_source_reads_raw_pcm_from_a_pipe():
    x = (_pattern(1.0, SR) * 32767).astype("<i2")
    r, w = os.pipe()

    def writer():
        with os.fdopen(w, "wb") as f:
            b = x.tobytes()
            for i in range(0, len(b), 333):  # odd sizes: a sample split across writes
                f.write(b[i:i + 333])
                f.flush()

    th = threading.Thread(target=writer)
    th.start()
    with os.fdopen(r, "rb", buffering=0) as f, StdinSource(16000, stream=f) as src:
        got = np.concatenate([c.pcm for c in src])
    th.join()
    assert np.array_equal(got, x)


def test_stdin_source_resamples_48k():
    x48 = _pattern(1.0, 48000)
    raw = (np.clip(x48, -1, 1) * 32767).round().astype("<i2")
    r, w = os.pipe()

    def writer():
        with os.fdopen(w, "wb") as f:
            f.write(raw.tobytes())

    th = threading.Thread(target=writer)
    th.start()
    with os.fdopen(r, "rb") as f, StdinSource(48000, stream=f) as src:
        got = np.concatenate([c.pcm for c in src]).astype(np.float32) / 32767
    th.join()
    ref = resample(raw.astype(np.float32) / 32767, 48000, SR)
    assert abs(len(got) - len(ref)) <= 16
    assert np.abs(got - ref[:len(got)]).max() < 2 / 32767


@pytest.mark.parametrize("sr_in", [48000, 44100, 22050, 16000])
def test_stream_resampler_equals_batch(sr_in):
    x = np.random.default_rng(0).standard_normal(sr_in).astype(np.float32) * 0.1
    r = StreamResampler(sr_in, SR)
    rng = np.random.default_rng(1)
    out, i = [], 0
    while i < len(x):
        n = int(rng.integers(1, 900))
        out.append(r.process(x[i:i + n]))
        i += n
    got = np.concatenate(out)
    ref = resample(x, sr_in, SR)
    assert len(ref) - len(got) <= r.width and len(got) > 0.99 * SR
    np.testing.assert_array_equal(got, ref[:len(got)])


def test_open_source_rejects_bad_kinds():
    with pytest.raises(AudioError, match="'radio'"):
        open_source("radio")
    with pytest.raises(AudioError, match="audio.file"):
        open_source("file")
    with pytest.raises(AudioError, match="12345 Hz"):
        StdinSource(12345)
