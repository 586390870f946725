"""The causal tracker on real songs against librosa's offline beat_track (needs EDGEDANCE_DATA)."""
from __future__ import annotations

import numpy as np
import pytest

from device.audio import resample, to_pcm16
from device.beat import track
from device.contract import DEFAULT_FEATURES as CFG
from device.frontend import log_mel

SONGS = ("DANCE_C_2", "DANCE_R_3", "DANCE_W_1")  # cha-cha, rumba, waltz
SECONDS = 30.0


def _excerpt(path) -> np.ndarray:
    import soundfile as sf
    with sf.SoundFile(str(path)) as f:
        x = f.read(int(SECONDS * f.samplerate), dtype="float32", always_2d=True).mean(axis=1)
        return to_pcm16(resample(x, f.samplerate, CFG.sample_rate_hz))


def _octave_match(ours: float, ref: float, tol: float) -> bool:
    return min(abs(ours / (ref * k) - 1) for k in (0.5, 1.0, 2.0)) <= tol


@pytest.mark.realdata
@pytest.mark.slow
def test_tempo_agrees_with_librosa(real_data):
    """Our tempo (median over the second half of 30 s) within 8 % of librosa's offline estimate
    or its double / half, for at least 2 of 3 songs. librosa's own octave is not ground truth,
    so octave errors are forgiven; a tracker that locks to a wrong tempo (3:2, drift) fails."""
    import librosa
    hits, report = 0, []
    for name in SONGS:
        pcm = _excerpt(real_data / name / "audio.mp3")
        fr = track(log_mel(pcm, CFG), CFG)
        ours = float(np.median(fr.bpm[len(fr.bpm) // 2:]))
        ref = float(np.atleast_1d(librosa.beat.beat_track(y=pcm / 32768.0, sr=CFG.sample_rate_hz)[0])[0])
        ok = _octave_match(ours, ref, 0.08)
        hits += ok
        report.append(f"{name}: ours {ours:.1f} librosa {ref:.1f} {'ok' if ok else 'MISS'}")
        if name.startswith("DANCE_W"):
            report.append(f"  metre {fr.meter[-1]}")
    assert hits >= 2, "; ".join(report)
