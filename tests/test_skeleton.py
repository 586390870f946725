"""23-joint skeleton -> BODY-14 body frame: handedness, heading, yaw invariance, range."""
import json

import numpy as np
import pytest

from device.contract import KP
from trainer import skeleton


def test_known_handedness_synthetic():
    # The synthetic skeleton follows the release's convention (left-handed, 3-11 = LEFT)
    # with the dancer's RIGHT wrist raised 15 cm.
    sk = skeleton.synthetic_skeleton(30, yaw0=2.0, raise_right_wrist=15.0)
    poses, _ = skeleton.to_body_frame(sk)
    # Facing the viewer, the dancer's right side is at the viewer's left: negative x.
    for side, sign in (("r", -1), ("l", 1)):
        for part in ("shoulder", "elbow", "wrist", "hip", "knee", "ankle"):
            assert np.all(sign * poses[:, KP[f"{side}_{part}"], 0] > 0), (side, part)
    lift = poses[:, KP["r_wrist"], 1] - poses[:, KP["l_wrist"], 1]
    assert abs(np.mean(lift) - 15.0 / skeleton.SCALE_CM) < 0.02  # raised RIGHT wrist shows up as r_wrist


def test_mirrored_skeleton_is_detected():
    # Swap sides 3-11 <-> 12-20: the raised wrist must move to l_wrist.
    sk = skeleton.synthetic_skeleton(10, raise_right_wrist=15.0)
    m = sk.copy()
    m[:, 3:12], m[:, 12:21] = sk[:, 12:21], sk[:, 3:12]
    p, _ = skeleton.to_body_frame(m)
    assert np.all(p[:, KP["l_wrist"], 1] > p[:, KP["r_wrist"], 1])


@pytest.mark.parametrize("yaw0", [-3.0, -1.0, 0.0, 0.7, 2.5])
def test_heading_of_rotated_skeleton(yaw0):
    sk = skeleton.synthetic_skeleton(60, yaw0=yaw0, yaw_rate=0.0)
    h = skeleton.heading(sk)
    err = np.angle(np.exp(1j * (h - yaw0)))
    assert np.max(np.abs(err)) < 0.02


def test_heading_unwrapped_through_turns():
    sk = skeleton.synthetic_skeleton(400, yaw0=0.0, yaw_rate=0.05)  # 20 rad: more than 3 turns
    h = skeleton.heading(sk)
    assert np.all(np.diff(h) > 0)
    assert abs(h[200] - 0.05 * 200) < 0.02
    assert abs((h[-1] - h[0]) - 0.05 * 399) < 0.1  # edges lose a little to the centred smoothing


def test_body_frame_invariant_to_yaw_and_translation():
    sk = skeleton.synthetic_skeleton(40, yaw0=0.0, seed=3)
    p0, h0 = skeleton.to_body_frame(sk)
    a = 1.3
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    sk2 = sk @ rot.T + np.array([55.0, 0.0, -20.0])
    p2, h2 = skeleton.to_body_frame(sk2)
    np.testing.assert_allclose(p2, p0, atol=1e-5)
    assert np.all(np.abs(np.angle(np.exp(1j * (h2 - h0 - a)))) < 1e-4)


def test_range_and_dtype():
    sk = skeleton.synthetic_skeleton(20)
    sk[5, 15] = (500.0, 500.0, 0.0)  # a wild wrist is clipped, not out of range
    p, h = skeleton.to_body_frame(sk)
    assert p.dtype == np.float32 and h.dtype == np.float32
    assert p.shape == (20, 14, 2) and h.shape == (20,)
    assert np.abs(p).max() <= 1.0
    assert abs(p[0, KP["r_hip"]] + p[0, KP["l_hip"]]).max() < 1e-6  # root = mid-hip


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="my.json.*shape"):
        skeleton.to_body_frame(np.zeros((5, 22, 3)), source="my.json")
    sk = skeleton.synthetic_skeleton(5)
    sk[2, 7, 0] = np.nan
    with pytest.raises(ValueError, match="frame 2, joint 7"):
        skeleton.to_body_frame(sk, source="x")


@pytest.mark.realdata
def test_real_frames_handedness(real_data):
    """Pins the reading 3-11 = LEFT on real waltz frames: toes point to the front, the lady's
    right arm (side 12-20) is raised in the hold, and her head leans back and to her left."""
    for name in ("DANCE_W_1", "DANCE_W_3", "DANCE_T_5"):
        sk = np.array(json.load(open(real_data / name / "skeletons.json"))["skeletons"])
        lft = skeleton.left_axis(sk)
        front = np.cross([0.0, 1.0, 0.0], lft)
        toe_dir = sk[:, 11] - sk[:, 10] + sk[:, 20] - sk[:, 19]
        assert np.mean(np.sum(toe_dir * front, axis=1) > 0) > 0.9
        p, _ = skeleton.to_body_frame(sk)
        assert np.mean(p[:, KP["r_wrist"], 1] - p[:, KP["r_shoulder"], 1]) > 0.03  # raised right hand
        assert np.mean(p[:, KP["head"], 0] - p[:, KP["neck"], 0]) > 0.01  # head toward her left (+x)
        assert np.abs(p).max() <= 1.0 and np.abs(p).max() < 0.95
