"""The dataset on fake dances written in the release's real format: alignment, trimming, cache,
clear errors, splits, generic data."""
import json
import os

import numpy as np
import pytest

from device.audio import load_file
from device.contract import DEFAULT_FEATURES, KP
from trainer import dataset
from trainer.dataset import Dance, DatasetError, load_dance, split_by_dance, write_fake_dance

SPF = DEFAULT_FEATURES.samples_per_pose_frame  # 640


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("m2d")
    info = write_fake_dance(root / "DANCE_W_1", seconds=10, seed=3, bpm=120.0, start_position=7)
    return root, info


def test_load_fake_dance_aligned_and_trimmed(fake, tmp_path):
    root, info = fake
    d = load_dance(root / "DANCE_W_1", DEFAULT_FEATURES, tmp_path / "cache")
    T = info["length"]  # `length` is 3 frames shorter than end - start: trimmed to it
    assert d.name == "DANCE_W_1" and d.style == "W"
    assert d.poses.shape == (T, 14, 2) and d.poses.dtype == np.float32
    assert d.heading.shape == (T,) and len(d.features.x) == T and len(d.features.bpm) == T
    assert d.pcm.dtype == np.int16 and len(d.pcm) == T * SPF
    song = load_file(root / "DANCE_W_1" / "audio.mp3")
    np.testing.assert_array_equal(d.pcm, song[7 * SPF: 7 * SPF + T * SPF])  # sample 0 = start_position / 25 s
    assert np.abs(d.poses).max() <= 1.0
    # the fake's known handedness: its RIGHT wrist is raised 10 cm
    assert np.mean(d.poses[:, KP["r_wrist"], 1] - d.poses[:, KP["l_wrist"], 1]) > 0.05
    # heading turns at the fake's yaw rate
    assert np.median(np.diff(d.heading)) == pytest.approx(info["yaw_rate"], abs=2e-3)


def test_music_beats_land_on_the_motions_beat_grid(fake, tmp_path):
    """If the audio were offset against the motion, the tracker's beats would not fall on k * 0.5 s."""
    root, _ = fake
    d = load_dance(root / "DANCE_W_1", DEFAULT_FEATURES, tmp_path / "cache")
    bt = d.features.beat_times
    assert len(bt) >= 8
    ang = 2 * np.pi * bt / 0.5
    offset = np.angle(np.mean(np.exp(1j * ang))) / (2 * np.pi) * 0.5
    assert abs(offset) < 0.06  # within 60 ms (the causal tracker is allowed a little lag)


def test_cache_keyed_by_config_hash_and_invalidated(fake, tmp_path):
    root, _ = fake
    src = tmp_path / "DANCE_W_1"
    src.mkdir()
    for f in ("audio.mp3", "config.json", "skeletons.json"):
        (src / f).write_bytes((root / "DANCE_W_1" / f).read_bytes())
    cache = tmp_path / "cache"
    a = load_dance(src, DEFAULT_FEATURES, cache)
    entry = cache / DEFAULT_FEATURES.config_hash() / "DANCE_W_1.npz"
    assert entry.exists()
    b = load_dance(src, DEFAULT_FEATURES, cache)
    np.testing.assert_array_equal(a.features.x, b.features.x)
    np.testing.assert_array_equal(a.poses, b.poses)
    assert type(b.features).__name__ == "FeatureFrames"
    # change the dance: the stale entry is not used
    cfg = json.loads((src / "config.json").read_text())
    cfg["start_position"] += 2
    (src / "config.json").write_text(json.dumps(cfg))
    st = os.stat(src / "config.json")
    os.utime(src / "config.json", (st.st_atime, st.st_mtime + 10))
    c = load_dance(src, DEFAULT_FEATURES, cache)
    assert not np.array_equal(c.pcm[:1000], a.pcm[:1000])


def test_audio_shorter_than_motion(fake, tmp_path):
    root, info = fake
    src = tmp_path / "DANCE_R_2"
    src.mkdir()
    for f in ("audio.mp3", "skeletons.json"):
        (src / f).write_bytes((root / "DANCE_W_1" / f).read_bytes())
    start = info["start_position"] + 60  # 2.4 s later: the song ends before the motion
    (src / "config.json").write_text(json.dumps({"start_position": start, "end_position": start + 400}))
    d = load_dance(src)
    song = load_file(src / "audio.mp3")
    assert d.n_frames == (len(song) - start * SPF) // SPF < info["length"]
    assert len(d.pcm) == d.n_frames * SPF and len(d.features.x) == d.n_frames


def _copy(root, tmp_path, name="DANCE_C_1"):
    dst = tmp_path / name
    dst.mkdir()
    for f in ("audio.mp3", "config.json", "skeletons.json"):
        (dst / f).write_bytes((root / "DANCE_W_1" / f).read_bytes())
    return dst


@pytest.mark.parametrize("case,match", [
    ("no_config", r"config\.json: file is missing"),
    ("bad_json", r"config\.json: not valid JSON"),
    ("no_start", r"config\.json: missing key 'start_position'"),
    ("neg_end", r"config\.json: 'end_position' must be a non-negative integer"),
    ("no_center", r"skeletons\.json: missing key 'center'"),
    ("22_joints", r"skeletons\.json: 'skeletons' must have shape \(T, 23, 3\)"),
    ("ragged", r"skeletons\.json: 'skeletons' is not a regular"),
    ("nan", r"skeletons\.json: 'skeletons' holds NaN.*frame 4"),
    ("no_audio", r"no audio file"),
    ("bad_audio", r"audio\.mp3.*cannot be decoded"),
])
def test_bad_files_are_named(fake, tmp_path, case, match):
    root, _ = fake
    d = _copy(root, tmp_path)
    sk_path, cfg_path = d / "skeletons.json", d / "config.json"
    if case == "no_config":
        cfg_path.unlink()
    elif case == "bad_json":
        cfg_path.write_text("{start_position: 3")
    elif case == "no_start":
        cfg_path.write_text(json.dumps({"end_position": 100}))
    elif case == "neg_end":
        cfg_path.write_text(json.dumps({"start_position": 0, "end_position": -5}))
    else:
        sk = json.loads(sk_path.read_text())
        if case == "no_center":
            del sk["center"]
        elif case == "22_joints":
            sk["skeletons"] = [f[:22] for f in sk["skeletons"]]
        elif case == "ragged":
            sk["skeletons"][3] = sk["skeletons"][3][:10]
        elif case == "nan":
            sk["skeletons"][4][2][0] = float("nan")
        elif case == "no_audio":
            (d / "audio.mp3").unlink()
        elif case == "bad_audio":
            (d / "audio.mp3").write_bytes(b"ID3 this is not an mp3 at all" * 100)
        sk_path.write_text(json.dumps(sk))
    with pytest.raises(DatasetError, match=match):
        load_dance(d)


def _dance(name, seed, poses=None):
    rng = np.random.default_rng(seed)
    p = poses if poses is not None else rng.uniform(-0.5, 0.5, (60, 14, 2)).astype(np.float32)
    return Dance(name=name, style=dataset.style_of(name), pcm=np.zeros(0, np.int16), poses=p,
                 heading=np.zeros(len(p), np.float32), features=None)


def test_split_by_dance_properties():
    names = [f"DANCE_W_{i}" for i in range(10)] + [f"DANCE_C_{i}" for i in range(4)] + \
            [f"DANCE_R_{i}" for i in range(5)] + ["DANCE_T_1"]
    dances = [_dance(n, i) for i, n in enumerate(names)]
    train, val = split_by_dance(dances, 0.2, seed=0)
    tn, vn = {d.name for d in train}, {d.name for d in val}
    assert not tn & vn and tn | vn == set(names)
    for st, n in (("W", 10), ("C", 4), ("R", 5)):
        k = sum(d.style == st for d in val)
        assert k == max(1, round(0.2 * n)), (st, k)
    assert "DANCE_T_1" in tn  # a style with one dance cannot be on both sides
    again = split_by_dance(dances, 0.2, seed=0)
    assert [d.name for d in again[1]] == [d.name for d in val]
    other = {tuple(sorted(d.name for d in split_by_dance(dances, 0.2, seed=s)[1])) for s in range(6)}
    assert len(other) > 1
    js = dataset.split_to_json(train, val, 0, 0.2)
    assert json.loads(json.dumps(js))["val"] == sorted(vn)


def test_split_keeps_dances_sharing_motion_together():
    base = _dance("x", 0).poses
    a = _dance("DANCE_W_1", 1, poses=np.concatenate([base, base[:30] + 0.1]))
    b = _dance("DANCE_W_2", 2, poses=np.concatenate([base[::-1] - 0.1, base]))  # shares 60 frames with a
    rest = [_dance(f"DANCE_W_{i}", i) for i in range(3, 9)]
    assert ["DANCE_W_1", "DANCE_W_2"] in dataset.shared_motion_groups([a, b] + rest)
    for seed in range(8):
        train, val = split_by_dance([a, b] + rest, 0.25, seed=seed)
        vn = {d.name for d in val}
        assert ("DANCE_W_1" in vn) == ("DANCE_W_2" in vn)


def test_load_generic(fake, tmp_path):
    root, info = fake
    poses = np.random.default_rng(0).uniform(-0.9, 0.9, (200, 14, 2)).astype(np.float32)
    np.save(tmp_path / "mine.npy", poses)
    d = dataset.load_generic(root / "DANCE_W_1" / "audio.mp3", tmp_path / "mine.npy")
    assert d.n_frames == 200 and len(d.pcm) == 200 * SPF and len(d.features.x) == 200
    np.save(tmp_path / "wide.npy", poses * 3)
    with pytest.raises(DatasetError, match=r"wide\.npy.*\[-1, 1\]"):
        dataset.load_generic(root / "DANCE_W_1" / "audio.mp3", tmp_path / "wide.npy")
    np.save(tmp_path / "shape.npy", poses[:, :13])
    with pytest.raises(DatasetError, match=r"shape\.npy.*\(T, 14, 2\)"):
        dataset.load_generic(root / "DANCE_W_1" / "audio.mp3", tmp_path / "shape.npy")
    with pytest.raises(DatasetError, match="missing"):
        dataset.load_generic(root / "DANCE_W_1" / "audio.mp3", tmp_path / "nope.npy")


def test_wav_fake_and_load_dataset(tmp_path):
    write_fake_dance(tmp_path / "DANCE_R_1", seconds=4, seed=1, audio_format="wav")
    write_fake_dance(tmp_path / "DANCE_C_1", seconds=4, seed=2)
    ds = dataset.load_dataset(tmp_path, DEFAULT_FEATURES, tmp_path / "cache")
    assert [d.name for d in ds] == ["DANCE_C_1", "DANCE_R_1"]
    with pytest.raises(DatasetError, match="DANCE_W_9"):
        dataset.load_dataset(tmp_path, names=["DANCE_W_9"])


@pytest.mark.realdata
def test_real_dance(real_data, tmp_path):
    folder = real_data / "DANCE_W_24"
    cfg = json.loads((folder / "config.json").read_text())
    length = json.loads((folder / "skeletons.json").read_text())["length"]
    d = load_dance(folder, DEFAULT_FEATURES, tmp_path)
    assert d.n_frames == min(length, cfg["end_position"] - cfg["start_position"])
    assert np.abs(d.poses).max() < 0.95
    assert len(d.features.x) == d.n_frames and len(d.features.beat_times) > 20
    assert 0.9 < np.mean(np.abs(d.poses[:, KP["l_shoulder"], 0] - d.poses[:, KP["r_shoulder"], 0])) * 120 / 25 < 1.3


def test_split_never_puts_an_oversized_group_in_validation():
    base = _dance("x", 0).poses
    big = [_dance(f"DANCE_W_{i}", i, poses=np.concatenate([base, base[:30] + 0.01 * i])) for i in range(6)]
    rest = [_dance(f"DANCE_W_{i}", i) for i in range(6, 10)]
    for seed in range(10):
        train, val = split_by_dance(big + rest, 0.2, seed=seed)
        assert {d.name for d in val} <= {d.name for d in rest} and len(val) == 2


@pytest.mark.realdata
def test_real_split_keeps_reused_waltz_motion_in_training(real_data):
    """16 waltzes reuse the same captured motion: they must never straddle train and validation."""
    ds = [Dance(name=p.name, style=dataset.style_of(p.name), pcm=np.zeros(0, np.int16),
                poses=dataset.skeleton.to_body_frame(dataset.read_skeletons(p)[0])[0], heading=None, features=None)
          for p in dataset.dance_folders(real_data)]
    big = max(dataset.shared_motion_groups(ds), key=len)
    assert {"DANCE_W_1", "DANCE_W_11", "DANCE_W_26", "DANCE_W_33"} <= set(big)
    train, val = split_by_dance(ds, 0.2, seed=0)
    vn = {d.name for d in val}
    assert not vn & set(big)
    assert {d.style for d in val} == {"C", "R", "W"}
