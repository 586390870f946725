"""The MQTT schema v1 (docs/protocol.md): round trips, rejection, sequence guard."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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


# --- the device's own encoder (publish hot path): the same messages as the validating reference ---

_unit = st.floats(0.0, 1.0, exclude_max=True)
_beats = st.fixed_dictionaries({
    "bpm": st.floats(0.0, 1000.0), "phase": _unit, "bar_phase": _unit, "meter": st.integers(0, 16),
    "onset": st.floats(0.0, 1e6), "is_beat": st.booleans(), "next_beat_in": st.floats(0.0, 60.0)})
_poses = st.fixed_dictionaries({
    "seq": st.integers(0, 2**40), "t": st.floats(0.0, 4e9), "frame": st.integers(0, 2**31),
    "t_audio": st.floats(0.0, 1e7), "t_capture": st.floats(0.0, 4e9), "fps": st.floats(1.0, 240.0),
    "heading": st.floats(-math.pi, math.pi), "beat": _beats,
    "kp": hnp.arrays(np.float32, (14, 2), elements=st.floats(-1.0, 1.0, width=32))})


def _both(fmt, p):
    args = dict(p)
    seq, t = args.pop("seq"), args.pop("t")
    fast = P.PoseEncoder("pi-1_x", fmt).encode(seq, t, **args)
    ref = P.pose_message("pi-1_x", seq, t, **args)
    return fast, ref


@settings(max_examples=300, deadline=None)
@given(_poses)
def test_pose_encoder_json_decodes_to_the_reference_message(p):
    fast, ref = _both("json", p)
    got = P.decode(fast, "edgedance/v1/pi-1_x/pose")  # validates every field
    want = json.loads(P.encode_json(ref))
    assert list(json.loads(fast)) == list(want)  # the reference's key order, the beat's as documented
    assert list(got["beat"]) == ["bpm", "phase", "bar_phase", "meter", "onset", "is_beat", "next_beat_in"]
    kp_got, kp_want = np.array(got.pop("kp")), np.array(want.pop("kp"))
    assert got == want  # every other field exactly as json.dumps writes it
    assert np.abs(kp_got - kp_want).max() <= 5e-7 + 1e-12
    assert all(type(c) is float for pair in json.loads(fast)["kp"] for c in pair)


@settings(max_examples=300, deadline=None)
@given(_poses)
def test_pose_encoder_binary_is_byte_identical_to_the_reference(p):
    fast, ref = _both("binary", p)
    assert fast == P.encode_binary(ref)


def test_pose_encoder_values_outside_the_schema_take_the_reference_path():
    enc = P.PoseEncoder("pi1")
    msg = _pose()
    args = {k: msg[k] for k in ("frame", "t_audio", "t_capture", "fps", "heading", "beat")}
    clipped = P.decode(enc.encode(1, 5.0, **args, kp=np.full((14, 2), 3.0, np.float32)))
    assert all(c == 1.0 for pair in clipped["kp"] for c in pair)
    nan_kp = np.zeros((14, 2), np.float32)
    nan_kp[4, 1] = np.nan
    assert all(math.isfinite(c) for pair in P.decode(enc.encode(1, 5.0, **args, kp=nan_kp))["kp"] for c in pair)
    kp = np.zeros((14, 2), np.float32)
    for field, value, match in (("heading", math.nan, "'heading'"), ("heading", 4.0, "'heading'"),
                                ("t_capture", math.inf, "'t_capture'"), ("fps", 0.0, "'fps'")):
        with pytest.raises(P.ProtocolError, match=match):
            enc.encode(1, 5.0, **{**args, field: value}, kp=kp)
    for field, value in (("phase", 1.5), ("bpm", math.nan), ("next_beat_in", -1.0), ("onset", math.inf)):
        with pytest.raises(P.ProtocolError, match=f"'{field}'"):
            enc.encode(1, 5.0, **{**args, "beat": {**args["beat"], field: value}}, kp=kp)
    with pytest.raises(P.ProtocolError, match="'seq'"):
        enc.encode(-1, 5.0, **args, kp=kp)
    with pytest.raises(P.ProtocolError, match="'kp'"):
        enc.encode(1, 5.0, **args, kp=np.zeros((13, 2), np.float32))
    assert P.decode(enc.encode(1, 5.0, **args, kp=[[0.5, -0.5]] * 14))["kp"] == [[0.5, -0.5]] * 14  # pairs work too
    with pytest.raises(P.ProtocolError, match="device id"):
        P.PoseEncoder('pi"1')
    with pytest.raises(P.ProtocolError, match="format"):
        P.PoseEncoder("pi1", "xml")


def test_encode_json_check_false_skips_validation_but_never_writes_nan():
    bad = _pose(fps=0.5)
    with pytest.raises(P.ProtocolError, match="'fps'"):
        P.encode_json(bad)
    assert json.loads(P.encode_json(bad, check=False))["fps"] == 0.5
    with pytest.raises(ValueError):
        P.encode_json(_pose(heading=math.nan), check=False)
