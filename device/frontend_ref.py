"""Float64 reference of the log-Mel frontend: the same config and framing as device.frontend.

Used by tests and benchmarks to measure the fixed-point frontend's error; never on the device.

Definition (shared with the fixed-point code):
- Frame i analyses samples [(i + 1) * hop - n_fft, (i + 1) * hop) (causal; zeros before the
  stream starts), so a signal of N samples yields N // hop frames.
- x = pcm / 32768 (int16 full scale = 1.0), periodic Hann window w[n] = 0.5 - 0.5 cos(2 pi n / n_fft).
- Power |X_k|^2 of the n_fft-point DFT, bins k = 0 .. n_fft / 2.
- HTK Mel scale, n_mels triangular filters with peak weight 1 (no area normalisation), corner
  frequencies equally spaced in Mel from fmin_hz to fmax_hz (librosa's `htk=True, norm=None`).
- dB = 10 log10(mel_power / P_REF) floored at floor_db, with P_REF = (n_fft / 4)^2.

What 0 dB means: P_REF is the power a full-scale sine (amplitude 1.0 = 32768 LSB) centred on an
FFT bin puts into that bin through the Hann window (|X_k| = A * n_fft / 4). Such a sine on the peak
bin of a Mel band reads 0 dB plus what its two neighbour bins leak in (each |X| = A * n_fft / 8,
a quarter of the power, times their filter weights < 1): between 0 and +1.8 dB. The highest
reading any int16 input can produce is about +6 dB (full-scale DC or square waves).
"""
from __future__ import annotations

import numpy as np

from device.contract import DEFAULT_FEATURES, FeatureConfig


def hz_to_mel(f_hz):
    """HTK Mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(f_hz, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_corners_hz(cfg: FeatureConfig = DEFAULT_FEATURES) -> np.ndarray:
    """The n_mels + 2 corner frequencies: band m rises from corner m to m + 1 and falls to m + 2."""
    mels = np.linspace(hz_to_mel(cfg.fmin_hz), hz_to_mel(cfg.fmax_hz), cfg.n_mels + 2)
    return mel_to_hz(mels)  # (n_mels + 2,)


def bin_hz(cfg: FeatureConfig = DEFAULT_FEATURES) -> np.ndarray:
    return np.arange(cfg.n_fft // 2 + 1) * (cfg.sample_rate_hz / cfg.n_fft)  # (n_fft/2 + 1,)


def mel_weights(cfg: FeatureConfig = DEFAULT_FEATURES) -> np.ndarray:
    """Triangular HTK filters, peak 1, shape (n_mels, n_fft / 2 + 1)."""
    f = bin_hz(cfg)
    c = mel_corners_hz(cfg)
    lower = (f[None, :] - c[:-2, None]) / (c[1:-1, None] - c[:-2, None])
    upper = (c[2:, None] - f[None, :]) / (c[2:, None] - c[1:-1, None])
    return np.maximum(0.0, np.minimum(lower, upper))


def hann(n_fft: int) -> np.ndarray:
    """Periodic Hann window (the STFT convention of scipy/librosa)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)


def reference_power(cfg: FeatureConfig = DEFAULT_FEATURES) -> float:
    """P_REF: a full-scale, bin-centred sine's power in its own bin, (n_fft / 4)^2."""
    return (cfg.n_fft / 4.0) ** 2


def frames(pcm: np.ndarray, cfg: FeatureConfig = DEFAULT_FEATURES) -> np.ndarray:
    """Causal frames as float in [-1, 1): (N // hop, n_fft)."""
    pcm = np.asarray(pcm)
    n = len(pcm) // cfg.hop_length
    pad = cfg.n_fft - cfg.hop_length
    x = np.concatenate([np.zeros(pad), pcm[: n * cfg.hop_length].astype(np.float64) / 32768.0])
    idx = np.arange(n)[:, None] * cfg.hop_length + np.arange(cfg.n_fft)[None, :]
    return x[idx]  # (n, n_fft)


def mel_power_ref(pcm: np.ndarray, cfg: FeatureConfig = DEFAULT_FEATURES) -> np.ndarray:
    """Linear Mel power relative to P_REF: (N // hop, n_mels) float64."""
    spec = np.fft.rfft(frames(pcm, cfg) * hann(cfg.n_fft), axis=1)
    power = spec.real ** 2 + spec.imag ** 2  # (n, n_fft/2 + 1)
    return power @ mel_weights(cfg).T / reference_power(cfg)


def log_mel_ref(pcm: np.ndarray, cfg: FeatureConfig = DEFAULT_FEATURES) -> np.ndarray:
    """Float reference log-Mel in dB re full scale, floored: (N // hop, n_mels) float64."""
    p = mel_power_ref(pcm, cfg)
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(p)
    return np.maximum(db, cfg.floor_db)
