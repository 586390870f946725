"""Baselines on the same inputs and outputs as the models.

- mean pose: the mean of the training poses, held still (what a collapsed model converges to).
- other song: the real ground-truth motion of a *different* training dance, looped or trimmed to
  the length: real dancing that did not listen to this music. Dances that share captured motion
  with the target (see trainer.dataset.shared_motion_groups) are never chosen.
"""
from __future__ import annotations

import numpy as np


def mean_pose(train_dances) -> np.ndarray:
    """(14, 2) float32: mean over all frames of the training dances."""
    if not train_dances:
        raise ValueError("mean_pose needs at least one training dance")
    total = sum(np.asarray(d.poses, np.float64).sum(axis=0) for d in train_dances)
    return (total / sum(len(d.poses) for d in train_dances)).astype(np.float32)


def mean_pose_predict(train_dances, n_frames: int) -> np.ndarray:
    """(n_frames, 14, 2) the mean pose, frozen."""
    return np.repeat(mean_pose(train_dances)[None], n_frames, axis=0)


def loop_to_length(poses: np.ndarray, n_frames: int) -> np.ndarray:
    """Trim, or repeat whole, a (T, 14, 2) motion to n_frames."""
    poses = np.asarray(poses)
    reps = -(-n_frames // len(poses))
    return np.concatenate([poses] * reps, axis=0)[:n_frames]


def other_song(dance, train_dances, seed: int = 0, same_style: bool = True, groups=None) -> tuple[np.ndarray, str]:
    """(poses (T, 14, 2), source dance name): the motion of another training dance, preferably of the
    same style, never the target itself nor one sharing motion with it. `groups` (lists of names,
    e.g. from shared_motion_groups) default to each dance alone."""
    banned = {dance.name}
    for g in groups or []:
        if dance.name in g:
            banned |= set(g)
    pool = [d for d in train_dances if d.name not in banned]
    if same_style and any(d.style == dance.style for d in pool):
        pool = [d for d in pool if d.style == dance.style]
    if not pool:
        raise ValueError(f"other_song: no training dance other than {sorted(banned)} to take motion from")
    rng = np.random.default_rng(seed)
    src = pool[int(rng.integers(len(pool)))]
    return loop_to_length(src.poses, dance.n_frames).astype(np.float32), src.name


def beat_puppet(pcm: np.ndarray, pose: np.ndarray, cfg=None, amplitude: float = 0.05) -> np.ndarray:
    """A trivial listener: the given (14, 2) pose bobbing down on every beat of the device's own
    beat tracker (body dips at beat phase 0), ankles planted. (T, 14, 2), T = len(pcm) // 640.
    It shows what following the beat alone looks like, and it validates the tempo-response measure."""
    from device import features
    from device.contract import DEFAULT_FEATURES, KP

    cfg = cfg or DEFAULT_FEATURES
    ff = features.extract(np.asarray(pcm, np.int16), cfg)
    dip = -amplitude * np.cos(2 * np.pi * np.asarray(ff.phase, np.float64))  # (T,) lowest on the beat
    dip[np.asarray(ff.bpm) <= 0] = 0.0  # still until the tracker has a tempo
    out = np.repeat(np.asarray(pose, np.float32)[None], len(ff.x), axis=0)
    out[:, :, 1] += dip[:, None]
    out[:, [KP["l_ankle"], KP["r_ankle"]], 1] = pose[[KP["l_ankle"], KP["r_ankle"]], 1]
    return np.clip(out, -1, 1).astype(np.float32)
