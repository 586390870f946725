"""`make demo`: the whole system on one machine, dancing to a song the project synthesizes.

Starts the project's Mosquitto, the display page, the simulated robot and the device
(file source at real-time pace, shipped bundle); writes an animated GIF of the dance
and the robot's servo trace; stops everything on Ctrl-C.
"""
from __future__ import annotations

import numpy as np

from device.audio import to_pcm16

DEMO_SAMPLE_RATE_HZ = 22050


def synthesize_song(seconds: float = 40.0, bpm: float = 96.0, meter: int = 3, seed: int = 0,
                    sr: int = DEMO_SAMPLE_RATE_HZ) -> np.ndarray:
    """A small ballroom-like tune: kick on the downbeat, soft hits on the other beats,
    a bass line and bar-long chords. Float32 mono in [-1, 1] at `sr`."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    out = np.zeros(n, np.float32)
    beat_s = 60.0 / bpm
    t_beat = np.arange(int(0.25 * sr)) / sr

    kick = np.sin(2 * np.pi * (50 + 90 * np.exp(-t_beat * 30)) * t_beat) * np.exp(-t_beat * 14)
    hit = rng.standard_normal(len(t_beat)) * np.exp(-t_beat * 40) * 0.35
    roots = [220.0, 174.61, 196.0, 146.83]  # A3 F3 G3 D3: a four-bar progression
    for b in range(int(seconds / beat_s)):
        start = int(b * beat_s * sr)
        bar, pos = divmod(b, meter)
        root = roots[bar % len(roots)]
        sound = kick if pos == 0 else hit * (1.0 if pos % 2 else 0.7)
        end = min(n, start + len(sound))
        out[start:end] += sound[:end - start].astype(np.float32)
        # Bass on every beat, stronger on the downbeat.
        length = int(beat_s * 0.9 * sr)
        tb = np.arange(min(length, n - start)) / sr
        out[start:start + len(tb)] += (0.25 if pos == 0 else 0.12) * np.sin(2 * np.pi * root / 2 * tb) * np.exp(-tb * 3)
        if pos == 0:  # a bar-long chord: root, third, fifth
            length = int(beat_s * meter * sr)
            tc = np.arange(min(length, n - start)) / sr
            env = np.minimum(1.0, tc * 20) * np.exp(-tc * 1.2)
            chord = sum(np.sin(2 * np.pi * root * r * tc) for r in (1.0, 1.26, 1.5))
            out[start:start + len(tc)] += (0.06 * chord * env).astype(np.float32)
    return (0.8 * out / max(1e-9, float(np.abs(out).max()))).astype(np.float32)


def write_song(path, **kw) -> str:
    import soundfile as sf
    sr = kw.pop("sr", DEMO_SAMPLE_RATE_HZ)
    sf.write(path, to_pcm16(synthesize_song(sr=sr, **kw)), sr, subtype="PCM_16")
    return str(path)
