"""The MQTT schema v1 (docs/protocol.md): round trips, rejection, sequence guard."""
import json
import math

import numpy as np
import pytest

from device import protocol as P


def _pose(seq=7, **over):
    kp = np.linspace(-0.9, 0.9, 28).reshape(14, 2)
    beat = {"bpm": 92.5, "phase": 0.25, "bar_phase": 0.75, "meter": 3, "onset": 0.5,
            "is_beat": True, "next_beat_in": 0.48}
    msg = P.pose_message("pi1", seq, 1795000000.5, frame=seq, t_audio=12.0, t_capture=1795000000.47,
                         fps=25.0, kp=kp, heading=1.0, beat=beat)
    msg.update(over)
    return msg


def test_json_round_trip_is_exact():
    msg = _pose()
    assert P.decode(P.encode_json(msg), "edgedance/v1/pi1/pose") == msg


def test_binary_round_trip_within_quantization():
    msg = _pose()
    raw = P.encode_binary(msg)
    assert len(raw) == 94 and raw[0] == 0xED
    back = P.decode(raw, "edgedance/v1/pi1/pose")
    assert back["device"] == "pi1" and back["seq"] == 7 and back["beat"]["is_beat"] is True
    assert np.abs(np.array(back["kp"]) - np.array(msg["kp"])).max() <= 0.5 / 32767 + 1e-9
    assert abs(back["heading"] - 1.0) < 1e-4
    assert abs(back["beat"]["phase"] - 0.25) < 1e-4 and back["beat"]["meter"] == 3
    assert abs(back["t_capture"] - msg["t_capture"]) < 1e-5
    assert back["beat"]["next_beat_in"] == pytest.approx(0.48, abs=1e-3)


@pytest.mark.parametrize("mutate, field", [
    (lambda m: m.update(v=2), "'v'"),
    (lambda m: m.pop("seq"), "'seq'"),
    (lambda m: m.update(seq=-1), "'seq'"),
    (lambda m: m.update(seq="5"), "'seq'"),
    (lambda m: m["kp"].pop(), "'kp'"),
    (lambda m: m["kp"][3].__setitem__(0, 1.5), "kp[3][0]"),
    (lambda m: m["kp"][2].__setitem__(1, True), "kp[2][1]"),
    (lambda m: m["beat"].update(phase=1.5), "'phase'"),
    (lambda m: m["beat"].update(is_beat=1), "'is_beat'"),
    (lambda m: m.update(type="dance"), "'type'"),
    (lambda m: m.update(heading=7.0), "'heading'"),
])
def test_invalid_pose_is_rejected_naming_the_field(mutate, field):
    msg = _pose()
    mutate(msg)
    with pytest.raises(P.ProtocolError, match=field.replace("[", r"\[").replace("]", r"\]")):
        P.decode(json.dumps(msg).encode(), "edgedance/v1/pi1/pose")


def test_non_finite_and_garbage_payloads_are_rejected():
    raw = P.encode_json(_pose()).replace(b'"heading":1.0', b'"heading":NaN')
    with pytest.raises(P.ProtocolError, match="non-finite"):
        P.decode(raw)
    for junk in (b"", b"\x00\x01", b"[1,2]", b"{", b"\xed" + b"\x00" * 10, b"x" * (70 * 1024)):
        with pytest.raises(P.ProtocolError):
            P.decode(junk)


def test_topic_device_must_match_payload():
    with pytest.raises(P.ProtocolError, match="topic names 'pi2'"):
        P.decode(P.encode_json(_pose()), "edgedance/v1/pi2/pose")
    with pytest.raises(P.ProtocolError, match="topic"):
        P.decode(P.encode_json(_pose()), "edgedance/v2/pi1/pose")
    with pytest.raises(P.ProtocolError, match="device id"):
        P.topic("pi 1/#", "pose")


def test_sequence_guard_drops_stale_and_duplicate_frames():
    g = P.SequenceGuard()
    assert [g.accept(_pose(s)) for s in (1, 2, 2, 1, 5, 4, 6)] == [True, True, False, False, True, False, True]
    assert g.dropped == 3
    assert g.accept(_pose(0))  # a restarted device starts again at 0


def test_keypoints_are_clipped_into_range_when_built():
    msg = _pose()
    built = P.pose_message("pi1", 1, 1.0, frame=1, t_audio=0.0, t_capture=1.0, fps=25, heading=0.0,
                           beat=msg["beat"], kp=np.full((14, 2), 3.0))
    assert all(c == 1.0 for pair in built["kp"] for c in pair)
    assert math.isfinite(P.decode(P.encode_json(built))["kp"][0][0])
