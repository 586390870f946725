"""Metric sanity on made-up motions with known answers."""
import types

import numpy as np
import pytest

from device.audio import resample, to_pcm16
from device.contract import KP
from trainer import baselines, evaluate
from trainer.dataset import synth_music

FPS = 25


def beat_motion(T, period_s, seed=0, amp=0.1, phase=0.0):
    """A (T, 14, 2) body that bobs (hips over ankles) and swings its arms with one period."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-0.5, 0.5, (14, 2))
    t = np.arange(T) / FPS
    s = np.sin(2 * np.pi * t / period_s + phase)
    p = np.repeat(base[None], T, 0)
    p[:, :, 1] += amp * s[:, None]  # the whole body rises and falls ...
    p[:, [KP["l_ankle"], KP["r_ankle"]], 1] -= 2 * amp * s[:, None]  # ... above the ankles
    p[:, [KP["l_wrist"], KP["r_wrist"]], 0] += 0.1 * np.cos(2 * np.pi * t / period_s)[:, None]
    return np.clip(p + rng.normal(0, 0.002, p.shape), -1, 1)


def fake_features(T, bpm, meter=3):
    beat = 60.0 / bpm
    t = np.arange(T) / FPS
    return types.SimpleNamespace(bpm=np.full(T, bpm), meter=np.full(T, meter), phase=(t / beat) % 1.0,
                                 beat_times=np.arange(0, T / FPS, beat))


def fake_dance(poses, bpm=120.0, meter=3, pcm=None):
    return types.SimpleNamespace(name="fake", style="W", poses=poses, n_frames=len(poses), pcm=pcm,
                                 features=fake_features(len(poses), bpm, meter))


def test_perfect_prediction():
    gt = beat_motion(500, 0.5)
    m = evaluate.evaluate(gt.copy(), fake_dance(gt))
    assert m["mse"] == 0.0
    assert m["energy_ratio"] == pytest.approx(1.0)
    assert m["jitter_ratio"] == pytest.approx(1.0)


def test_frozen_pose_has_no_energy_and_mean_pose_beats_it_on_mse_only():
    gt = beat_motion(500, 0.5)
    frozen = np.repeat(gt.mean(0, keepdims=True), len(gt), 0)
    m = evaluate.evaluate(frozen, fake_dance(gt))
    assert m["energy_ratio"] == 0.0 and m["jitter_ratio"] == 0.0
    assert m["period_match"] == 0.0
    shifted = beat_motion(500, 0.5, phase=np.pi)
    assert evaluate.mse(frozen, gt) < evaluate.mse(shifted, gt)  # why MSE alone is not the goal


def test_energy_scales_with_amplitude():
    a = beat_motion(400, 0.5)
    b = a.mean(0) + 2 * (a - a.mean(0))
    assert evaluate.energy(b) / evaluate.energy(a) == pytest.approx(2.0)
    assert evaluate.jitter(b) / evaluate.jitter(a) == pytest.approx(2.0)


@pytest.mark.parametrize("bpm,mult", [(120, 1), (120, 3), (96, 2), (140, 1)])
def test_period_match_at_beat_or_bar(bpm, mult):
    beat = 60 / bpm
    poses = beat_motion(30 * FPS, beat * mult)
    pm = evaluate.period_match(poses, fake_features(len(poses), bpm, meter=3))
    assert pm["mean"] > 0.9, pm


def test_period_match_low_for_unrelated_periods():
    rng = np.random.default_rng(1)
    fracs = []
    for i in range(12):
        beat = 0.5
        # periods (and their halves: speed peaks twice a cycle) away from 0.25/0.5/0.75/1/1.5/3 s
        period = rng.choice([0.37, 0.62, 0.85, 1.25, 2.2, 2.6])
        fracs.append(evaluate.period_match(beat_motion(30 * FPS, period, seed=i), fake_features(750, 60 / beat))["mean"])
    assert np.mean(fracs) < 0.1


def test_dominant_period_accuracy():
    for period in (0.45, 0.8, 1.5, 2.6):
        x = np.sin(2 * np.pi * np.arange(225) / FPS / period)
        assert evaluate.dominant_period(x) == pytest.approx(period, rel=0.02)
    assert np.isnan(evaluate.dominant_period(np.zeros(225)))


def test_bas_prefers_motion_stopping_on_beats():
    bpm = 120
    T = 500
    t = np.arange(T) / FPS
    beats = np.arange(0, T / FPS, 0.5)
    base = np.zeros((T, 14, 2))

    def motion(offset):
        # position follows a half-rectified cosine: speed minima at beat + offset
        pos = 0.1 * np.cos(2 * np.pi * (t - offset) / 1.0)
        p = base.copy()
        p[:, :, 0] += pos[:, None]
        return p

    on, off = evaluate.bas(motion(0.0), beats), evaluate.bas(motion(0.125), beats)
    assert on > 0.8 and off < 0.3
    f = fake_features(T, bpm)
    assert evaluate.beat_phase_locking(motion(0.0), f) > 0.9
    assert evaluate.beat_phase_locking(beat_motion(T, 0.437), f) < 0.4


def test_diversity():
    a, b, c = beat_motion(300, 0.5, seed=0), beat_motion(300, 0.7, seed=1), beat_motion(300, 1.1, seed=2)
    assert evaluate.diversity([a, a.copy(), a.copy()]) == 0.0
    assert evaluate.diversity([a, b, c]) > 0.1
    with pytest.raises(ValueError):
        evaluate.diversity([a])


def test_bad_prediction_shape_is_named():
    gt = beat_motion(100, 0.5)
    with pytest.raises(ValueError, match="pred_poses.*shape"):
        evaluate.evaluate(np.zeros((100, 13, 2)), fake_dance(gt))


def test_baselines():
    d1 = fake_dance(beat_motion(200, 0.5, seed=0))
    d2 = fake_dance(beat_motion(120, 0.6, seed=1))
    d1.name, d2.name = "DANCE_W_1", "DANCE_W_2"
    mp = baselines.mean_pose([d1, d2])
    np.testing.assert_allclose(mp, np.concatenate([d1.poses, d2.poses]).mean(0), atol=1e-6)
    assert baselines.mean_pose_predict([d1], 7).shape == (7, 14, 2)
    other, src = baselines.other_song(d1, [d1, d2])
    assert src == "DANCE_W_2" and other.shape == d1.poses.shape
    np.testing.assert_allclose(other[120:200], d2.poses[:80], atol=1e-6)  # looped
    with pytest.raises(ValueError, match="no training dance"):
        baselines.other_song(d1, [d1, d2], groups=[["DANCE_W_1", "DANCE_W_2"]])


def beat_generator(pcm):
    """A 'model' that listens: tracks the beat of the audio (librosa) and bobs once per beat."""
    import librosa

    y = pcm.astype(np.float32) / 32767
    _, beats = librosa.beat.beat_track(y=y, sr=16000, hop_length=160, units="time")
    T = len(pcm) // 640
    t = np.arange(T) / FPS
    phase = np.interp(t, beats, np.arange(len(beats)))  # beats counted, linear between
    p = np.zeros((T, 14, 2))
    p[:, :, 1] += 0.1 * np.sin(2 * np.pi * phase)[:, None]
    p[:, [KP["l_ankle"], KP["r_ankle"]], 1] = -0.8
    return p


@pytest.mark.slow
def test_tempo_response_of_a_beat_driven_generator():
    x = synth_music(24.0, 110.0, sr=44100)[:, 0]
    pcm = to_pcm16(resample(x, 44100, 16000))
    d = fake_dance(np.zeros((len(pcm) // 640, 14, 2)), pcm=pcm)
    r = evaluate.tempo_response(beat_generator, d)
    assert r["pass"], r
    for rate, v in r["rates"].items():
        assert v["period_scale"] == pytest.approx(1 / float(rate), rel=0.05)
    # and a generator deaf to the music fails
    deaf = lambda pcm: beat_motion(len(pcm) // 640, 0.5)  # noqa: E731
    r2 = evaluate.tempo_response(deaf, d)
    assert not r2["pass"], r2
