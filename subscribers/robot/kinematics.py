"""BODY-14 keypoints (body frame) -> joint angles of a small humanoid, degrees.

The pose contract: x to the viewer's right, y up, the dancer facing the viewer, so
the dancer's right side is at negative x. From a 2D frontal view:

- `*_roll` (shoulder, hip): the limb's angle from hanging straight down, in the frontal
  plane; positive outward (abduction): 0 down, 90 sideways, 180 straight up, negative
  across the body.
- `*_pitch` (shoulder, hip): how far the limb points forward, from foreshortening: a bone
  that looks shorter than its reference length (a fraction of the torso, robot.ini) is
  tilted out of the picture plane by acos(seen / reference). Always >= 0: a frontal view
  cannot tell forward from backward, and forward is the one a humanoid can do.
- `elbow`, `knee`: flexion, the angle between the two bones; 0 straight.
"""
from __future__ import annotations

import numpy as np

from device.contract import KP

JOINTS = (
    "r_shoulder_pitch", "r_shoulder_roll", "r_elbow",
    "l_shoulder_pitch", "l_shoulder_roll", "l_elbow",
    "r_hip_pitch", "r_hip_roll", "r_knee",
    "l_hip_pitch", "l_hip_roll", "l_knee",
)
N_JOINTS = len(JOINTS)  # 12
EPS = 1e-6

# (side, parent, child, grandchild, outward x sign, reference-length key)
_LIMBS = (
    ("r", "r_shoulder", "r_elbow", "r_wrist", -1.0, "upper_arm_to_torso"),
    ("l", "l_shoulder", "l_elbow", "l_wrist", +1.0, "upper_arm_to_torso"),
    ("r", "r_hip", "r_knee", "r_ankle", -1.0, "thigh_to_torso"),
    ("l", "l_hip", "l_knee", "l_ankle", +1.0, "thigh_to_torso"),
)


def _flexion(v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    n1, n2 = np.linalg.norm(v1, axis=-1), np.linalg.norm(v2, axis=-1)
    cos = np.sum(v1 * v2, axis=-1) / np.maximum(n1 * n2, EPS)
    return np.where((n1 > EPS) & (n2 > EPS), np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))), 0.0)


def joint_angles(kp, upper_arm_to_torso: float = 0.55, thigh_to_torso: float = 0.8) -> np.ndarray:
    """kp (..., 14, 2) -> angles (..., 12) in JOINTS order, degrees."""
    kp = np.asarray(kp, dtype=np.float64)
    assert kp.shape[-2:] == (14, 2), f"keypoints must be (..., 14, 2), got {kp.shape}"
    ratios = {"upper_arm_to_torso": upper_arm_to_torso, "thigh_to_torso": thigh_to_torso}
    mid_hip = (kp[..., KP["r_hip"], :] + kp[..., KP["l_hip"], :]) / 2
    torso = np.linalg.norm(kp[..., KP["neck"], :] - mid_hip, axis=-1)  # (...)
    out = []
    for _, parent, child, grand, outward, ref_key in _LIMBS:
        v1 = kp[..., KP[child], :] - kp[..., KP[parent], :]  # (..., 2)
        v2 = kp[..., KP[grand], :] - kp[..., KP[child], :]
        seen = np.linalg.norm(v1, axis=-1)
        ref = np.maximum(ratios[ref_key] * torso, EPS)
        pitch = np.degrees(np.arccos(np.clip(seen / ref, 0.0, 1.0)))
        roll = np.degrees(np.arctan2(outward * v1[..., 0], -v1[..., 1]))
        roll = np.where(seen > EPS, roll, 0.0)
        out += [pitch, roll, _flexion(v1, v2)]
    return np.stack(out, axis=-1)


def pose_from_angles(roll_deg: dict, flex_deg: dict, torso: float = 0.4) -> np.ndarray:
    """A frontal (pitch 0) BODY-14 pose with the given rolls and flexions, for tests and demos.

    roll_deg / flex_deg keys: 'r_shoulder', 'l_shoulder', 'r_hip', 'l_hip' (missing: 0).
    Upper arm 0.55, thigh 0.8 torso lengths (the robot.ini defaults), lower bones 0.9 of those.
    """
    kp = np.zeros((14, 2))
    kp[KP["r_hip"]], kp[KP["l_hip"]] = (-0.1, 0.0), (0.1, 0.0)
    kp[KP["neck"]] = (0.0, torso)
    kp[KP["head"]] = (0.0, torso * 1.35)
    kp[KP["r_shoulder"]], kp[KP["l_shoulder"]] = (-0.18, torso), (0.18, torso)
    for parent, child, grand, outward, ratio in (
            ("r_shoulder", "r_elbow", "r_wrist", -1, 0.55), ("l_shoulder", "l_elbow", "l_wrist", 1, 0.55),
            ("r_hip", "r_knee", "r_ankle", -1, 0.8), ("l_hip", "l_knee", "l_ankle", 1, 0.8)):
        a = np.radians(roll_deg.get(parent, 0.0))
        d1 = np.array([outward * np.sin(a), -np.cos(a)])
        b = a + np.radians(flex_deg.get(parent, 0.0))
        d2 = np.array([outward * np.sin(b), -np.cos(b)])
        length = ratio * torso
        kp[KP[child]] = kp[KP[parent]] + length * d1
        kp[KP[grand]] = kp[KP[child]] + 0.9 * length * d2
    return np.clip(kp, -1.0, 1.0)
