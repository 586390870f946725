"""Audio in: files (WAV, MP3, FLAC) to int16 mono PCM at the contract's rate.

Live sources (microphone, stdin, paced file playback) live below the file loader.
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np

from device.contract import DEFAULT_FEATURES, FeatureConfig

log = logging.getLogger(__name__)

SUPPORTED_RATES_HZ = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)


class AudioError(RuntimeError):
    """An audio file or device that cannot be used; the text names it and says why."""


def load_file(path: str | os.PathLike, cfg: FeatureConfig = DEFAULT_FEATURES) -> np.ndarray:
    """Decode a WAV/MP3/FLAC file to int16 mono at cfg.sample_rate_hz, shape (N,)."""
    x, sr = read_float(path)
    return to_pcm16(resample(x, sr, cfg.sample_rate_hz))


def read_float(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode a file to float32 mono in [-1, 1] at its own rate: (samples (N,), rate)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"audio file {path!r} does not exist")
    if os.path.isdir(path):
        raise AudioError(f"audio file {path!r} is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"audio file {path!r} is empty (0 bytes)")
    try:
        import soundfile as sf
    except ImportError as e:
        raise AudioError("reading audio files needs the 'soundfile' package: pip install 'edgedance[device]'") from e
    try:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports corrupt, truncated and unknown formats alike
        raise AudioError(f"audio file {path!r} cannot be decoded as WAV, MP3 or FLAC "
                         f"(corrupt, truncated or not audio): {e}") from e
    if x.shape[0] == 0:
        raise AudioError(f"audio file {path!r} holds no samples")
    if sr not in SUPPORTED_RATES_HZ:
        raise AudioError(f"audio file {path!r} has sample rate {sr} Hz; supported: {SUPPORTED_RATES_HZ}")
    mono = x.mean(axis=1, dtype=np.float32)  # (N,)
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"audio file {path!r} contains non-finite samples")
    return mono, int(sr)


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> int16, clipped (full scale = 32767)."""
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def resample(x: np.ndarray, sr_in: int, sr_out: int, taps_per_side: int = 16) -> np.ndarray:
    """Band-limited resampling (Kaiser-windowed sinc), float in, float32 out.

    Cutoff at 0.95 of the lower Nyquist; each output sample is a dot product of
    2 * taps_per_side input samples. Good to about -80 dB, ample for Mel features.
    """
    if sr_in == sr_out:
        return np.asarray(x, dtype=np.float32)
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    ratio = sr_out / sr_in
    cutoff = 0.95 * min(1.0, ratio)  # fraction of the input Nyquist
    n_out = int(len(x) * up // down)
    width = math.ceil(taps_per_side / min(1.0, ratio))
    # Output n sits at input position n * down / up; its fractional part cycles through `up` phases.
    phases = np.arange(up) / up  # (up,)
    k = np.arange(-width + 1, width + 1)  # (2 * width,)
    d = k[None, :] - phases[:, None]  # (up, 2 * width) distance of each tap
    beta = 8.0
    win = np.i0(beta * np.sqrt(np.clip(1 - (d / width) ** 2, 0, 1))) / np.i0(beta)
    kern = (cutoff * np.sinc(cutoff * d) * win).astype(np.float32)  # (up, 2 * width)
    xp = np.concatenate([np.zeros(width, np.float32), np.asarray(x, np.float32), np.zeros(width + 1, np.float32)])
    out = np.empty(n_out, dtype=np.float32)
    chunk = 65536
    for s in range(0, n_out, chunk):
        n = np.arange(s, min(n_out, s + chunk))
        base = (n * down) // up  # integer input index
        ph = (n * down) % up
        idx = base[:, None] + k[None, :] + width  # (n, 2 * width)
        out[s:s + len(n)] = np.einsum("ij,ij->i", xp[idx], kern[ph])
    return out
