"""The released 23-joint 3D skeleton -> the contract's BODY-14 2D keypoints in the body frame.

Joint order and handedness of the Music-to-Dance release (not documented by it; decided
from the data, see docs/results/data.md, pinned by tests/test_skeleton.py):

    0, 1   two points on the head (left/right of it)      2      lower spine
    3-11   the dancer's LEFT side:  3 shoulder, 4 elbow, 5 forearm, 6 wrist,
                                    7 hip, 8 knee, 9 ankle, 10 heel, 11 toe
    12-20  the dancer's RIGHT side, same order             21, 22 extra hand points

Coordinates are left-handed (Unity's: x right, y up, z forward), centimetres, relative to
`center`. The body's front is cross(up, p3 - p12) computed on the raw numbers (toes and
knees point that way in every dance).

The body frame: each frame is seen from straight in front of the dancer (rotated about the
vertical so she faces the viewer, depth dropped). x points to the viewer's right, so the
dancer's own right side has negative x, as in a photo; y is up; the origin is the mid-hip;
one fixed global scale maps centimetres into [-1, 1]. The heading (yaw) is kept apart.
"""
from __future__ import annotations

import numpy as np

from device.contract import KP, N_KEYPOINTS

N_JOINTS = 23

HEAD = (0, 1)
LEFT = {"shoulder": 3, "elbow": 4, "forearm": 5, "wrist": 6, "hip": 7, "knee": 8, "ankle": 9, "heel": 10, "toe": 11}
RIGHT = {"shoulder": 12, "elbow": 13, "forearm": 14, "wrist": 15, "hip": 16, "knee": 17, "ankle": 18, "heel": 19, "toe": 20}

# BODY-14 keypoint -> source joint(s), averaged. Order = device.contract.KEYPOINTS.
BODY14_SOURCES = (
    HEAD,                                          # head: mean of the two head points
    (LEFT["shoulder"], RIGHT["shoulder"]),         # neck: mid-shoulders
    (RIGHT["shoulder"],), (RIGHT["elbow"],), (RIGHT["wrist"],),
    (LEFT["shoulder"],), (LEFT["elbow"],), (LEFT["wrist"],),
    (RIGHT["hip"],), (RIGHT["knee"],), (RIGHT["ankle"],),
    (LEFT["hip"],), (LEFT["knee"],), (LEFT["ankle"],),
)
assert len(BODY14_SOURCES) == N_KEYPOINTS

SCALE_CM = 120.0
"""Global scale: keypoint = centimetres / SCALE_CM, then clipped to [-1, 1]. Body-frame keypoints
of the real data reach at most 100 cm (cha-cha hands overhead) and -95 cm (ankles) from the
mid-hip, i.e. 0.84 after scaling: a margin for bigger dancers, and clipping is rare."""

HEADING_SMOOTH_FRAMES = 5
"""Centred moving average (200 ms at 25 fps) of the shoulder + hip line before taking its yaw."""


def normalization() -> dict:
    """What travels with a model so its output can be turned back into centimetres."""
    return {
        "frame": "body",
        "x": "to the viewer's right; the dancer faces the viewer, so her right side is at negative x",
        "y": "up",
        "origin": "mid-hip",
        "scale_cm": SCALE_CM,
        "clip": 1.0,
        "heading": "radians, unwrapped; yaw of the body's front, positive = turning to the dancer's right "
                   "(clockwise seen from above); 0 = facing the capture's +z",
        "keypoint_sources": {"head": "mean of joints 0, 1", "neck": "mean of shoulders 3, 12"},
    }


def check_skeletons(sk: np.ndarray, *, source: str = "skeletons") -> np.ndarray:
    """Validate a (T, 23, 3) array; returns it as float64. Raises ValueError naming `source`."""
    sk = np.asarray(sk, dtype=np.float64)
    if sk.ndim != 3 or sk.shape[1:] != (N_JOINTS, 3):
        raise ValueError(f"{source}: expected shape (T, {N_JOINTS}, 3), got {sk.shape}")
    if sk.shape[0] == 0:
        raise ValueError(f"{source}: holds no frames")
    if not np.all(np.isfinite(sk)):
        bad = np.argwhere(~np.isfinite(sk))[0]
        raise ValueError(f"{source}: non-finite value at frame {bad[0]}, joint {bad[1]}")
    return sk


def _smooth(x: np.ndarray, n: int) -> np.ndarray:
    """Centred moving average along axis 0 with edge padding; n odd."""
    if n <= 1 or len(x) < 2:
        return x
    pad = n // 2
    xp = np.concatenate([np.repeat(x[:1], pad, 0), x, np.repeat(x[-1:], pad, 0)])
    c = np.cumsum(np.concatenate([np.zeros_like(x[:1]), xp]), axis=0)
    return (c[n:] - c[:-n]) / n


def left_axis(sk: np.ndarray, smooth: int = HEADING_SMOOTH_FRAMES) -> np.ndarray:
    """(T, 3) horizontal unit vector pointing to the dancer's LEFT (shoulder + hip lines)."""
    v = (sk[:, LEFT["shoulder"]] - sk[:, RIGHT["shoulder"]]) + (sk[:, LEFT["hip"]] - sk[:, RIGHT["hip"]])
    v = v.copy()
    v[:, 1] = 0.0
    v = _smooth(v, smooth)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    if np.any(n < 1e-6):
        raise ValueError(f"skeleton: shoulder/hip line is vertical or degenerate at frame {int(np.argmin(n))}")
    return v / n


def heading(sk: np.ndarray, smooth: int = HEADING_SMOOTH_FRAMES) -> np.ndarray:
    """(T,) yaw of the body's front in radians, unwrapped. Front = cross(up, left) on the raw
    numbers; yaw = atan2(front_x, front_z): 0 facing +z, growing toward +x (a right turn in
    Unity's left-handed frame)."""
    lft = left_axis(sk, smooth)
    front = np.cross(np.array([0.0, 1.0, 0.0]), lft)  # (T, 3)
    return np.unwrap(np.arctan2(front[:, 0], front[:, 2]))


def to_body14_3d(sk: np.ndarray) -> np.ndarray:
    """(T, 23, 3) -> (T, 14, 3) by BODY14_SOURCES (no rotation, no scaling)."""
    return np.stack([sk[:, list(src)].mean(axis=1) for src in BODY14_SOURCES], axis=1)


def to_body_frame(sk: np.ndarray, *, source: str = "skeletons",
                  smooth: int = HEADING_SMOOTH_FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """(T, 23, 3) centimetres -> (poses (T, 14, 2) float32 in [-1, 1], heading (T,) float32 rad)."""
    sk = check_skeletons(sk, source=source)
    lft = left_axis(sk, smooth)  # (T, 3)
    kp = to_body14_3d(sk)  # (T, 14, 3)
    root = 0.5 * (kp[:, KP["l_hip"]] + kp[:, KP["r_hip"]])  # (T, 3)
    rel = kp - root[:, None, :]
    # Seen from the front, the dancer's left is at the viewer's right (+x).
    x = np.einsum("tkc,tc->tk", rel, lft)
    y = rel[:, :, 1]
    poses = np.clip(np.stack([x, y], axis=-1) / SCALE_CM, -1.0, 1.0).astype(np.float32)
    return poses, heading(sk, smooth).astype(np.float32)


def poses_to_cm(poses: np.ndarray) -> np.ndarray:
    """Inverse of the normalization (without the clip): (T, 14, 2) -> centimetres."""
    return np.asarray(poses, np.float64) * SCALE_CM


def synthetic_skeleton(T: int = 50, *, yaw0: float = 0.0, yaw_rate: float = 0.0,
                       raise_right_wrist: float = 0.0, beat_period_frames: float = 12.5,
                       beats_per_bar: int = 3, seed: int = 0) -> np.ndarray:
    """A plausible (T, 23, 3) skeleton in the release's convention (left-handed coordinates,
    joints 3-11 = LEFT), facing yaw0 + yaw_rate * t (radians; 0 = +z), with a known
    asymmetry (the RIGHT wrist raised by `raise_right_wrist` cm) and motion locked to a beat:
    arms swing once per beat, the body rises and falls once per bar. For tests and fakes."""
    rng = np.random.default_rng(seed)
    # Body-local coordinates in cm: (lat = toward the dancer's RIGHT, up, fwd).
    side = {"shoulder": (18, 45, 0), "elbow": (40, 38, 0), "forearm": (42, 38, 8), "wrist": (42, 40, 18),
            "hip": (10, 0, 0), "knee": (12, -45, 5), "ankle": (12, -80, -3), "heel": (11, -85, -8),
            "toe": (12, -88, 12)}
    local = np.zeros((N_JOINTS, 3))
    local[0] = (-5, 60, 2)
    local[1] = (5, 60, 2)
    local[2] = (0, 15, 0)
    for k, (lat, up, fwd) in side.items():
        local[RIGHT[k]] = (lat, up, fwd)
        local[LEFT[k]] = (-lat, up, fwd)
    local[21] = local[RIGHT["wrist"]] + (0, 0, 5)
    local[22] = local[LEFT["wrist"]] + (0, 0, 5)
    local[RIGHT["wrist"], 1] += raise_right_wrist
    t = np.arange(T, dtype=np.float64)
    beat = 2 * np.pi * t / beat_period_frames  # (T,)
    bar = beat / beats_per_bar
    p = np.repeat(local[None], T, axis=0)  # (T, 23, 3)
    upper = [0, 1, 2] + [LEFT[k] for k in ("shoulder", "elbow", "forearm", "wrist", "hip")] \
        + [RIGHT[k] for k in ("shoulder", "elbow", "forearm", "wrist", "hip")] + [21, 22]
    rise = 4.0 * np.sin(bar)  # (T,) cm: rise and fall once per bar
    p[:, upper, 1] += rise[:, None]
    p[:, [LEFT["knee"], RIGHT["knee"]], 1] += 0.5 * rise[:, None]
    for j, sign in ((LEFT["wrist"], 1.0), (RIGHT["wrist"], -1.0), (21, -1.0), (22, 1.0)):
        p[:, j, 1] += 6.0 * sign * np.sin(beat)
        p[:, j, 2] += 4.0 * np.cos(beat)
    p += rng.normal(0, 0.2, p.shape)
    yaw = yaw0 + yaw_rate * t  # (T,)
    # Left-handed (Unity): facing (sin yaw, 0, cos yaw); the dancer's right is (cos yaw, 0, -sin yaw),
    # so that front = cross(up, left) on the raw numbers, as in the release.
    right = np.stack([np.cos(yaw), np.zeros(T), -np.sin(yaw)], axis=1)[:, None, :]  # (T, 1, 3)
    front = np.stack([np.sin(yaw), np.zeros(T), np.cos(yaw)], axis=1)[:, None, :]
    upv = np.array([0.0, 1.0, 0.0])
    return p[:, :, :1] * right + p[:, :, 1:2] * upv + p[:, :, 2:3] * front
