"""The Music-to-Dance data as released (audio.mp3, config.json, skeletons.json) -> aligned `Dance`s.

Alignment: the dance covers the song from pose frame S = start_position to E = end_position
(25 fps). Audio sample 0 of a `Dance` is the song at S / 25 s; pose frame t pairs with audio
[t * 40 ms, (t + 1) * 40 ms). Audio and motion are trimmed to the shorter of
`length`, E - S and the audio after S. Features are computed on that aligned clip with the
device's own causal code (`device.features.extract`), so a model sees in training what the
device hears from the dance's first sample on.

Features and poses are cached in `cache_dir/<feature-config hash>/<dance>.npz`, keyed by the
config hash and checked against the source files' sizes and modification times.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from collections import defaultdict

import numpy as np

from device.audio import AudioError, load_file
from device.contract import DEFAULT_FEATURES, N_KEYPOINTS, FeatureConfig
from trainer import skeleton

log = logging.getLogger(__name__)

STYLES = {"C": "cha-cha", "R": "rumba", "T": "tango", "W": "waltz"}
AUDIO_NAMES = ("audio.mp3", "audio.wav", "audio.flac")
CACHE_VERSION = 1


class DatasetError(ValueError):
    """A dance folder or file that cannot be used; the text names the file and field."""


@dataclasses.dataclass
class Dance:
    name: str
    style: str  # the folder's style letter: C, R, T, W (or "?" for generic data)
    pcm: np.ndarray  # (T * 640,) int16 at cfg.sample_rate_hz; sample 0 = pose frame 0
    poses: np.ndarray  # (T, 14, 2) float32 in [-1, 1], body frame
    heading: np.ndarray  # (T,) float32 radians, unwrapped
    features: object  # device.features.FeatureFrames with exactly T frames
    center: np.ndarray | None = None  # (T, 3) float32 cm: travel through the room (not in the body frame)

    @property
    def n_frames(self) -> int:
        return len(self.poses)


def style_of(name: str) -> str:
    """'DANCE_W_12' -> 'W'; '?' when the name does not follow the release's pattern."""
    parts = name.split("_")
    return parts[1] if len(parts) >= 3 and parts[0] == "DANCE" and parts[1] in STYLES else "?"


# --- reading the released files ----------------------------------------------------------

def _read_json(path: pathlib.Path) -> dict:
    if not path.exists():
        raise DatasetError(f"{path}: file is missing (a dance folder needs config.json and skeletons.json)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); re-copy the file from the release") from e
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top, got {type(d).__name__}")
    return d


def _int_field(d: dict, key: str, path: pathlib.Path) -> int:
    if key not in d:
        raise DatasetError(f"{path}: missing key {key!r} (found {sorted(d)})")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 0:
        raise DatasetError(f"{path}: {key!r} must be a non-negative integer frame number, got {v!r}")
    return int(v)


def read_config(folder: pathlib.Path) -> tuple[int, int]:
    """(start_position, end_position) in pose frames."""
    path = folder / "config.json"
    d = _read_json(path)
    s, e = _int_field(d, "start_position", path), _int_field(d, "end_position", path)
    if e <= s:
        raise DatasetError(f"{path}: end_position {e} must be greater than start_position {s}")
    return s, e


def read_skeletons(folder: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """(skeletons (T, 23, 3), center (T, 3)) in cm, trimmed to `length`."""
    path = folder / "skeletons.json"
    d = _read_json(path)
    for key in ("length", "center", "skeletons"):
        if key not in d:
            raise DatasetError(f"{path}: missing key {key!r} (found {sorted(d)})")
    length = _int_field(d, "length", path)
    try:
        sk = np.asarray(d["skeletons"], dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise DatasetError(f"{path}: 'skeletons' is not a regular [T][23][3] array of numbers: {e}") from e
    try:
        center = np.asarray(d["center"], dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise DatasetError(f"{path}: 'center' is not a regular [T][3] array of numbers: {e}") from e
    if sk.ndim != 3 or sk.shape[1:] != (skeleton.N_JOINTS, 3):
        raise DatasetError(f"{path}: 'skeletons' must have shape (T, {skeleton.N_JOINTS}, 3), got {sk.shape}")
    if center.ndim != 2 or center.shape[1] != 3:
        raise DatasetError(f"{path}: 'center' must have shape (T, 3), got {center.shape}")
    n = min(length, len(sk), len(center))
    if n == 0:
        raise DatasetError(f"{path}: no frames ('length' {length}, {len(sk)} skeletons, {len(center)} centers)")
    if n < length:
        log.warning("%s: 'length' is %d but only %d frames are present; using %d", path, length,
                    min(len(sk), len(center)), n)
    sk, center = sk[:n], center[:n]
    for key, a in (("skeletons", sk), ("center", center)):
        if not np.all(np.isfinite(a)):
            t = int(np.argwhere(~np.isfinite(a))[0][0])
            raise DatasetError(f"{path}: {key!r} holds NaN or infinite values (first at frame {t})")
    return sk, center


def find_audio(folder: pathlib.Path) -> pathlib.Path:
    for n in AUDIO_NAMES:
        if (folder / n).exists():
            return folder / n
    raise DatasetError(f"{folder}: no audio file (looked for {', '.join(AUDIO_NAMES)})")


# --- features ----------------------------------------------------------------------------

def _features_module():
    try:
        from device import features
    except ImportError as e:
        raise RuntimeError("device.features is not available: the trainer computes its features "
                           "with the device's code (device/features.py)") from e
    return features


def compute_features(pcm: np.ndarray, cfg: FeatureConfig, n_frames: int):
    """FeatureFrames of the aligned clip, exactly n_frames long."""
    ff = _features_module().extract(pcm, cfg)
    have = len(ff.x)
    if have < n_frames:
        raise RuntimeError(f"device.features.extract gave {have} frames for {len(pcm)} samples; "
                           f"expected {n_frames} (one per {cfg.samples_per_pose_frame} samples)")
    return trim_features(ff, n_frames, cfg)


def trim_features(ff, n: int, cfg: FeatureConfig = DEFAULT_FEATURES):
    """The first n pose frames of a FeatureFrames (beat_times kept below n / fps)."""
    total = len(ff.x)
    kw = {}
    for f in dataclasses.fields(ff):
        v = getattr(ff, f.name)
        if f.name == "beat_times":
            bt = np.asarray(v, dtype=np.float64)
            kw[f.name] = bt[bt < n / cfg.pose_fps]
        elif isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == total:
            kw[f.name] = v[:n]
        else:
            kw[f.name] = v
    return type(ff)(**kw)


def _features_to_npz(ff) -> dict:
    return {"feat__" + f.name: np.asarray(getattr(ff, f.name)) for f in dataclasses.fields(ff)}


def _features_from_npz(z) -> object:
    cls = _features_module().FeatureFrames
    kw = {}
    for f in dataclasses.fields(cls):
        a = z["feat__" + f.name]
        kw[f.name] = a.item() if a.ndim == 0 else a
    return cls(**kw)


# --- one dance ---------------------------------------------------------------------------

def _source_stamp(paths) -> str:
    files = ";".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in paths)
    return f"{files};code:{feature_code_digest()}"


def feature_code_digest() -> str:
    """A digest of the code behind the features: the config hash alone misses algorithm edits."""
    import hashlib
    import device.audio
    import device.beat
    import device.features
    import device.frontend
    h = hashlib.sha256()
    for mod in (device.audio, device.frontend, device.beat, device.features):
        h.update(pathlib.Path(mod.__file__).read_bytes())
    return h.hexdigest()[:12]


def load_dance(folder: str | os.PathLike, cfg: FeatureConfig = DEFAULT_FEATURES,
               cache_dir: str | os.PathLike | None = None) -> Dance:
    """Read one dance folder of the release, aligned and trimmed; features from the cache when valid."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: dance folder does not exist")
    name = folder.name
    audio_path = find_audio(folder)
    sources = [audio_path, folder / "config.json", folder / "skeletons.json"]
    for p in sources[1:]:
        if not p.exists():
            raise DatasetError(f"{p}: file is missing (a dance folder needs config.json and skeletons.json)")
    stamp = _source_stamp(sources)
    cache_path = None
    if cache_dir is not None:
        cache_path = pathlib.Path(cache_dir) / cfg.config_hash() / f"{name}.npz"
        if cache_path.exists():
            try:
                with np.load(cache_path, allow_pickle=False) as z:
                    if str(z["stamp"]) == stamp and int(z["cache_version"]) == CACHE_VERSION:
                        return Dance(name=name, style=style_of(name), pcm=z["pcm"], poses=z["poses"],
                                     heading=z["heading"], features=_features_from_npz(z), center=z["center"])
                log.info("%s: stale cache entry, recomputing", cache_path)
            except (OSError, KeyError, ValueError) as e:
                log.warning("%s: unreadable cache entry (%s), recomputing", cache_path, e)

    start, end = read_config(folder)
    sk, center = read_skeletons(folder)
    try:
        song = load_file(audio_path, cfg)
    except AudioError as e:
        raise DatasetError(f"{audio_path}: {e}") from e
    spf = cfg.samples_per_pose_frame
    offset = start * spf  # start_position / 25 s at 16 kHz
    audio_frames = max(0, (len(song) - offset) // spf)
    n = min(len(sk), end - start, audio_frames)
    if n < 1:
        raise DatasetError(f"{folder}: no overlap of audio and motion (start_position {start} frames = "
                           f"{start / cfg.pose_fps:.2f} s, audio {len(song) / cfg.sample_rate_hz:.2f} s, "
                           f"{len(sk)} skeleton frames)")
    if n < len(sk) or n < end - start:
        log.debug("%s: trimmed to %d frames (skeletons %d, end-start %d, audio %d)",
                  name, n, len(sk), end - start, audio_frames)
    pcm = np.ascontiguousarray(song[offset:offset + n * spf])  # (n * 640,)
    poses, heading = skeleton.to_body_frame(sk[:n], source=str(folder / "skeletons.json"))
    feats = compute_features(pcm, cfg, n)
    dance = Dance(name=name, style=style_of(name), pcm=pcm, poses=poses, heading=heading,
                  features=feats, center=center[:n].astype(np.float32))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".{os.getpid()}.tmp.npz")  # two trainers may fill one cache
        np.savez(tmp, stamp=np.array(stamp), cache_version=np.array(CACHE_VERSION), pcm=pcm, poses=poses,
                 heading=heading, center=dance.center, **_features_to_npz(feats))
        os.replace(tmp, cache_path)
    return dance


def dance_folders(root: str | os.PathLike) -> list[pathlib.Path]:
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder does not exist")
    return sorted(p for p in root.iterdir() if p.is_dir() and any((p / a).exists() for a in AUDIO_NAMES)
                  and (p / "skeletons.json").exists())


def load_dataset(root: str | os.PathLike, cfg: FeatureConfig = DEFAULT_FEATURES,
                 cache_dir: str | os.PathLike | None = None, names=None) -> list[Dance]:
    """All dance folders under root (or just `names`), sorted by name."""
    folders = dance_folders(root)
    if names is not None:
        by_name = {p.name: p for p in folders}
        missing = sorted(set(names) - set(by_name))
        if missing:
            raise DatasetError(f"{root}: no dance folder(s) {missing}; found {sorted(by_name)}")
        folders = [by_name[n] for n in sorted(names)]
    if not folders:
        raise DatasetError(f"{root}: holds no dance folders (each needs audio.mp3 and skeletons.json)")
    return [load_dance(p, cfg, cache_dir) for p in folders]


# --- splits ------------------------------------------------------------------------------

def shared_motion_groups(dances, min_shared_frames: int = 25) -> list[list[str]]:
    """Groups of dances that share identical motion (>= min_shared_frames equal pose frames).

    Compared in the body frame (a 1.2 mm grid), so reuse under a different room orientation counts.
    16 of the release's 23 waltzes reuse the same captured motion under different songs (e.g.
    DANCE_W_1 and DANCE_W_11 share their first 12 s); a split must keep them together."""
    parent = {d.name: d.name for d in dances}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    owners = defaultdict(set)
    for d in dances:
        q = np.round(np.asarray(d.poses, np.float64) * 1000).astype(np.int32)  # 1.2 mm grid
        moving = np.r_[True, np.any(q[1:] != q[:-1], axis=(1, 2))]
        for t in np.flatnonzero(moving):
            owners[q[t].tobytes()].add(d.name)
    counts = defaultdict(int)
    for names in owners.values():
        if 1 < len(names) <= 8:
            names = sorted(names)
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    counts[names[i], names[j]] += 1
    for (a, b), c in counts.items():
        if c >= min_shared_frames:
            parent[find(a)] = find(b)
    groups = defaultdict(list)
    for d in dances:
        groups[find(d.name)].append(d.name)
    return sorted(sorted(g) for g in groups.values())


def split_by_dance(dances, val_fraction: float = 0.2, seed: int = 0):
    """(train, val) lists of Dance: by dance, never by frame; stratified by style; dances that
    share motion stay on the same side; deterministic for a seed. Each style with at least two
    groups contributes up to round(val_fraction * its dances) (at least 1) to validation, in whole
    groups (a group larger than that goes to training)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    names = [d.name for d in dances]
    if len(set(names)) != len(names):
        raise ValueError(f"split_by_dance: duplicate dance names {sorted({n for n in names if names.count(n) > 1})}")
    by_name = {d.name: d for d in dances}
    rng = np.random.default_rng(seed)
    groups = shared_motion_groups(dances)
    by_style = defaultdict(list)
    for g in groups:
        by_style[by_name[g[0]].style].append(g)
    val_names: set[str] = set()
    for style in sorted(by_style):
        gs = by_style[style]
        n_style = sum(len(g) for g in gs)
        if len(gs) < 2:
            continue  # a style with a single group cannot be on both sides: keep it for training
        want = max(1, int(round(val_fraction * n_style)))
        got = 0
        for i in rng.permutation(len(gs)):
            if got + len(gs[i]) <= want:
                val_names.update(gs[i])
                got += len(gs[i])
        if got == 0:  # every group is larger than wanted: the smallest one, if training keeps some
            small = min(gs, key=len)
            if len(small) < n_style:
                val_names.update(small)
    train = [d for d in dances if d.name not in val_names]
    val = [d for d in dances if d.name in val_names]
    if not val or not train:
        raise ValueError(f"split_by_dance: cannot split {len(dances)} dance(s) into non-empty train and validation")
    return train, val


def split_to_json(train, val, seed: int, val_fraction: float) -> dict:
    return {"seed": seed, "val_fraction": val_fraction,
            "train": sorted(d.name for d in train), "val": sorted(d.name for d in val)}


# --- generic data ------------------------------------------------------------------------

def load_generic(audio_path: str | os.PathLike, poses_npy: str | os.PathLike,
                 cfg: FeatureConfig = DEFAULT_FEATURES, heading_npy: str | os.PathLike | None = None) -> Dance:
    """A user's own data: an audio file + a (T, 14, 2) float npy of body-frame poses in [-1, 1]
    at cfg.pose_fps, frame 0 at audio sample 0 (optionally a (T,) heading npy in radians)."""
    poses_npy = pathlib.Path(poses_npy)
    if not poses_npy.exists():
        raise DatasetError(f"{poses_npy}: poses file is missing")
    try:
        poses = np.load(poses_npy, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DatasetError(f"{poses_npy}: not a readable .npy array: {e}") from e
    if poses.ndim != 3 or poses.shape[1:] != (N_KEYPOINTS, 2):
        raise DatasetError(f"{poses_npy}: poses must have shape (T, {N_KEYPOINTS}, 2) (BODY-14 x, y), got {poses.shape}")
    if not np.issubdtype(poses.dtype, np.number) or not np.all(np.isfinite(poses)):
        raise DatasetError(f"{poses_npy}: poses must be finite numbers")
    if np.abs(poses).max() > 1.0 + 1e-6:
        raise DatasetError(f"{poses_npy}: poses must be normalized to [-1, 1] (max |value| is "
                           f"{np.abs(poses).max():.3g}); divide by a global scale (see trainer.skeleton.SCALE_CM)")
    heading = np.zeros(len(poses), np.float32)
    if heading_npy is not None:
        heading = np.load(heading_npy, allow_pickle=False).astype(np.float32)
        if heading.shape != (len(poses),):
            raise DatasetError(f"{heading_npy}: heading must have shape ({len(poses)},), got {heading.shape}")
    try:
        song = load_file(audio_path, cfg)
    except AudioError as e:
        raise DatasetError(str(e)) from e
    spf = cfg.samples_per_pose_frame
    n = min(len(poses), len(song) // spf)
    if n < 1:
        raise DatasetError(f"{audio_path}: shorter than one pose frame ({spf} samples)")
    pcm = np.ascontiguousarray(song[:n * spf])
    name = pathlib.Path(poses_npy).stem
    return Dance(name=name, style="?", pcm=pcm, poses=poses[:n].astype(np.float32), heading=heading[:n],
                 features=compute_features(pcm, cfg, n), center=None)


# --- a tiny fake dance in the release's format, for tests ---------------------------------

def synth_music(seconds: float, bpm: float, sr: int = 44100, beats_per_bar: int = 3, seed: int = 0) -> np.ndarray:
    """(N, 2) float32 stereo: a kick with a click on every beat (accented on the bar), a soft
    hi-hat between, a bass note. Beat k is at k * 60 / bpm seconds."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    out = 0.05 * np.sin(2 * np.pi * 110.0 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.25 * t))
    beat_s = 60.0 / bpm
    kick_len = int(0.12 * sr)
    kt = np.arange(kick_len) / sr
    kick = np.sin(2 * np.pi * (50 + 80 * np.exp(-kt * 30)) * kt) * np.exp(-kt * 25)
    kick += 0.5 * rng.normal(0, 1, kick_len) * np.exp(-kt * 200)  # the beater's click: broadband onset
    hat_len = int(0.04 * sr)
    hat = rng.normal(0, 1, hat_len) * np.exp(-np.arange(hat_len) / sr * 120)
    for k in range(int(seconds / beat_s) + 1):
        i = int(round(k * beat_s * sr))
        gain = 0.7 if k % beats_per_bar == 0 else 0.45
        seg = out[i:i + kick_len]
        seg += gain * kick[:len(seg)]
        j = int(round((k + 0.5) * beat_s * sr))
        seg = out[j:j + hat_len]
        seg += 0.03 * hat[:len(seg)]
    out = 0.8 * out / max(1e-9, np.abs(out).max())
    return np.stack([out, out], axis=1).astype(np.float32)


def write_fake_dance(folder: str | os.PathLike, seconds: float = 8.0, seed: int = 0, *,
                     bpm: float | None = None, audio_format: str = "mp3", start_position: int = 5,
                     missing_frames: int = 3) -> dict:
    """Write a tiny dance in the release's format into `folder` (created): a 44.1 kHz stereo song
    with a beat, config.json with a start/end, skeletons.json with a 23-joint left-handed
    skeleton (3-11 = LEFT) whose RIGHT wrist is raised 10 cm and whose motion follows the beat.
    `length` is `missing_frames` shorter than end - start, as often in the release.
    Returns what was written (bpm, start/end, length, yaw rate, ...)."""
    import soundfile as sf

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bpm = float(bpm if bpm is not None else rng.uniform(90, 140))
    fps = DEFAULT_FEATURES.pose_fps
    n_motion = int(round(seconds * fps))
    end_position = start_position + n_motion + missing_frames
    song_s = (end_position + 10) / fps  # the song runs a little past the dance
    sr = 44100
    audio = synth_music(song_s, bpm, sr=sr, seed=seed)
    # The dance starts at start_position: shift the beat grid so beats fall at dance time k * beat.
    shift = int(round(start_position / fps * sr)) % max(1, int(round(60.0 / bpm * sr)))
    audio = np.roll(audio, shift, axis=0)
    if audio_format == "mp3":
        apath = folder / "audio.mp3"
        sf.write(apath, audio, sr, format="MP3")
    elif audio_format == "wav":
        apath = folder / "audio.wav"
        sf.write(apath, audio, sr, subtype="PCM_16")
    else:
        raise ValueError(f"audio_format must be 'mp3' or 'wav', got {audio_format!r}")
    yaw_rate = float(rng.uniform(0.01, 0.04)) * (1 if rng.random() < 0.5 else -1)
    sk = skeleton.synthetic_skeleton(n_motion, yaw0=float(rng.uniform(-math.pi, math.pi)), yaw_rate=yaw_rate,
                                     raise_right_wrist=10.0, beat_period_frames=60.0 / bpm * fps, seed=seed)
    t = np.arange(n_motion) / fps
    center = np.stack([150 * np.sin(0.2 * t), 90 + 0 * t, 150 * np.cos(0.2 * t)], axis=1)
    with open(folder / "config.json", "w") as f:
        json.dump({"start_position": start_position, "end_position": end_position}, f)
    with open(folder / "skeletons.json", "w") as f:
        json.dump({"length": n_motion, "center": np.round(center, 3).tolist(),
                   "skeletons": np.round(sk, 3).tolist()}, f)
    return {"bpm": bpm, "start_position": start_position, "end_position": end_position, "length": n_motion,
            "yaw_rate": yaw_rate, "audio": str(apath), "seconds_audio": song_s}


__all__ = ["Dance", "DatasetError", "load_dance", "load_dataset", "split_by_dance", "split_to_json",
           "load_generic", "write_fake_dance", "shared_motion_groups", "style_of"]
