"""Model input features (device.features): contract, fixed maps, streaming == batch, causality."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from device import features
from device.contract import DEFAULT_FEATURES as CFG
from device.contract import FeatureConfig
from test_beat import drum_track, f_measure

SPF = CFG.samples_per_pose_frame  # 640


@pytest.fixture(scope="module")
def song():
    pcm, beats, downs = drum_track([(100, 12), (125, 12)], meter=4, seed=11)
    return pcm, beats


@pytest.fixture(scope="module")
def batch(song):
    return features.extract(song[0], CFG)


def _equal(a: features.FeatureFrames, b: features.FeatureFrames, n: int | None = None) -> None:
    for f in dataclasses.fields(features.FeatureFrames):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if f.name == "beat_times":
            va = va[: len(vb)] if n is not None else va
        elif n is not None:
            va = va[:n]
        assert va.dtype == vb.dtype and np.array_equal(va, vb), f.name


def test_contract(batch, song):
    pcm = song[0]
    t = len(pcm) // SPF
    assert len(features.FEATURE_NAMES) == features.n_features(CFG) == 48
    assert len(set(features.FEATURE_NAMES)) == 48
    assert batch.x.shape == (t, 48) and batch.x.dtype == np.float32
    assert batch.mel.shape == (t, CFG.n_mels)
    for name in ("bpm", "phase", "bar_phase", "meter", "onset", "is_beat", "next_beat_in"):
        assert getattr(batch, name).shape == (t,), name
    assert np.all(np.abs(batch.x) <= 1.0) and np.all(np.isfinite(batch.x))
    for name in features.FEATURE_NAMES:
        assert (name if not name.startswith("mel_") else "mel") in features.FEATURE_SCALE
    # the beat flag column is exactly is_beat; beat times fall in flagged frames
    col = {n: i for i, n in enumerate(features.FEATURE_NAMES)}
    assert np.array_equal(batch.x[:, col["beat"]] > 0.5, batch.is_beat)
    frames_of_beats = np.floor(batch.beat_times * CFG.pose_fps - 1e-9).astype(int)
    assert np.all(batch.is_beat[frames_of_beats])
    assert batch.is_beat.sum() == len(batch.beat_times)


def test_fixed_maps(batch):
    """x is the documented affine map of the per-frame quantities (no per-file normalization)."""
    col = {n: i for i, n in enumerate(features.FEATURE_NAMES)}
    x = batch.x
    ph = 2 * np.pi * batch.phase
    np.testing.assert_allclose(x[:, col["beat_sin"]], np.sin(ph), atol=1e-6)
    np.testing.assert_allclose(x[:, col["beat_cos"]], np.cos(ph), atol=1e-6)
    np.testing.assert_allclose(x[:, col["bar_cos"]], np.cos(2 * np.pi * batch.bar_phase), atol=1e-6)
    known = batch.bpm > 0
    np.testing.assert_allclose(x[known, col["tempo"]], np.clip(np.log2(batch.bpm[known] / 110), -1, 1), atol=1e-6)
    assert np.all(x[~known, col["tempo"]] == 0)
    np.testing.assert_allclose(x[:, col["onset"]], np.clip((batch.onset - 2) / 2, -1, 1), atol=1e-6)
    m = batch.meter
    assert np.all(x[m == 3, col["meter"]] == -1) and np.all(x[m == 4, col["meter"]] == 1)
    assert np.all(x[m == 0, col["meter"]] == 0)
    # Mel columns: pooled dB minus a per-frame offset shared by all bands, / 40
    mel_x = x[:, : CFG.n_mels].astype(np.float64) * 40
    offset = batch.mel - mel_x  # (T, n_mels): the running loudness, same in every band
    inside = np.all(np.abs(x[:, : CFG.n_mels]) < 1, axis=1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(offset[inside], offset[inside][:, :1].repeat(CFG.n_mels, 1), atol=1e-3)


def test_level_invariant_mel():
    """6 dB less gain moves the pooled dB by -6 but the Mel columns only while R catches up."""
    pcm, _, _ = drum_track([(120, 20)], seed=2)
    a = features.extract(pcm, CFG)
    b = features.extract((pcm.astype(np.int32) // 2).astype(np.int16), CFG)
    late = slice(len(a) // 2, None)
    assert np.median(a.mel[late] - b.mel[late]) == pytest.approx(6.02, abs=0.3)
    assert np.abs(a.x[late, : CFG.n_mels] - b.x[late, : CFG.n_mels]).mean() < 0.02


@pytest.mark.parametrize("chunk", [640, 160, 1, 1000, "random"])
def test_streaming_equals_batch(song, batch, chunk):
    pcm = song[0]
    if chunk == 1:
        pcm = pcm[: 3 * CFG.sample_rate_hz]  # one sample at a time is slow in Python; 3 s will do
    rng = np.random.default_rng(0)
    fx = features.FeatureExtractor(CFG)
    parts, i = [], 0
    while i < len(pcm):
        n = int(rng.integers(1, 7000)) if chunk == "random" else chunk
        out = fx.process(pcm[i:i + n])
        assert len(out) == (i + n) // SPF - i // SPF if i + n <= len(pcm) else True
        parts.append(out)
        i += n
    got = features.FeatureFrames.concat(parts)
    assert len(got) == len(pcm) // SPF
    _equal(batch, got, n=len(got))


def test_reset_repeats(song, batch):
    fx = features.FeatureExtractor(CFG)
    fx.process(song[0][:50000])
    fx.reset()
    _equal(batch, fx.process(song[0]))


def test_copied_extractor_continues_the_stream(song, batch):
    """The frontend and tracker keep views into their own buffers: a deepcopy or a pickle
    round trip taken mid-stream must carry on exactly like the original."""
    import copy
    import pickle
    pcm, cut = song[0], 200 * SPF
    fx = features.FeatureExtractor(CFG)
    head = fx.process(pcm[:cut])
    for other in (copy.deepcopy(fx), pickle.loads(pickle.dumps(fx)), fx):
        _equal(batch, features.FeatureFrames.concat([head, other.process(pcm[cut:])]))


@pytest.mark.parametrize("cut_frame", [150, 400])
def test_causal(song, batch, cut_frame):
    """Frame t depends on audio before (t + 1) * 640 only: replace everything after it."""
    pcm = song[0].copy()
    start = (cut_frame + 1) * SPF
    pcm[start:] = np.random.default_rng(1).integers(-20000, 20000, len(pcm) - start).astype(np.int16)
    other = features.extract(pcm, CFG)
    n = cut_frame + 1
    for f in dataclasses.fields(features.FeatureFrames):
        va, vb = getattr(batch, f.name), getattr(other, f.name)
        if f.name == "beat_times":
            va, vb = va[va <= n / CFG.pose_fps], vb[vb <= n / CFG.pose_fps]
            assert np.array_equal(va, vb)
        else:
            assert np.array_equal(va[:n], vb[:n]), f.name
    assert not np.array_equal(batch.x[n:], other.x[n:])


def test_beats_through_features(song, batch):
    """The features carry the tracker's own beats (same causal code), on the beat before the change."""
    from device.beat import track
    from device.frontend import log_mel
    direct = track(log_mel(song[0], CFG), CFG).beat_times
    assert np.array_equal(batch.beat_times, direct[direct <= len(batch) / CFG.pose_fps])
    assert f_measure(song[1][song[1] < 12], batch.beat_times[batch.beat_times < 12]) >= 0.95


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="int16"):
        features.extract(np.zeros(1000, np.float32), CFG)
    from device.audio import AudioError
    bad = tmp_path / "not_audio.wav"
    bad.write_bytes(b"this is not a wav file at all" * 10)
    with pytest.raises(AudioError, match="not_audio.wav"):
        features.extract_file(bad, CFG)


def test_short_and_empty():
    assert len(features.extract(np.zeros(0, np.int16), CFG)) == 0
    assert len(features.extract(np.zeros(639, np.int16), CFG)) == 0
    f = features.extract(np.zeros(641, np.int16), CFG)
    assert len(f) == 1 and np.all(np.isfinite(f.x))


def test_other_config():
    cfg = FeatureConfig(n_mels=24, pose_fps=20)  # 800 samples = 5 hops per frame
    f = features.extract(drum_track([(120, 8)], seed=4)[0], cfg)
    assert f.x.shape == (8 * 20, features.n_features(cfg)) and len(features.feature_names(cfg)) == 24 + 8
