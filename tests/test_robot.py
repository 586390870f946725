"""The robot: kinematics, safety, beat lead, watchdog, rejection, drivers; real Mosquitto for the follower."""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import Broker
from device import protocol
from subscribers.robot.config import RobotConfigError, load_config
from subscribers.robot.controller import Controller
from subscribers.robot.drivers import BusError, SerialBus, ServoKitBus, SimulatedBus
from subscribers.robot.follower import Follower
from subscribers.robot.kinematics import JOINTS, joint_angles, pose_from_angles

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CFG = load_config()
J = {name: i for i, name in enumerate(JOINTS)}


# --- a synthetic performance: moves whose extremes fall on the tracker's beats ----------

def beat_stream(seconds: float, bpm: float = 100.0, first_beat: float = 0.3, fps: float = 25.0, device="pi1"):
    """Pose messages at `fps` whose right arm peaks (roll 90) exactly on each beat, with the
    beat fields (`next_beat_in`, `is_beat`, `phase`) a tracker with that beat grid reports.
    Returns (messages, beat_times)."""
    period = 60.0 / bpm
    beats = first_beat + period * np.arange(int(seconds / period) + 2)
    msgs = []
    for f in range(int(seconds * fps)):
        t = (f + 1) / fps  # end of the audio this frame heard
        nxt = beats[beats > t][0]
        phase = ((t - first_beat) / period) % 1.0
        c = math.cos(2 * math.pi * (t - first_beat) / period)  # 1 on beats
        kp = pose_from_angles({"r_shoulder": 60 + 30 * c, "l_shoulder": 40 - 20 * c, "r_hip": 10 + 5 * c},
                              {"r_shoulder": 40 - 30 * c, "r_hip": 20 + 10 * c})
        beat = {"bpm": bpm, "phase": phase, "bar_phase": phase / 4, "meter": 4, "onset": 0.5,
                "is_beat": bool(np.any((beats > t - 1 / fps) & (beats <= t))), "next_beat_in": float(nxt - t)}
        # Captured at wall time t (the clocks of this simulation start with the audio).
        msgs.append(protocol.pose_message(device, f, t + 0.03, frame=f, t_audio=t, t_capture=t,
                                          fps=fps, kp=kp, heading=0.0, beat=beat))
    return msgs, beats[beats < seconds]


def run_offline(cfg, msgs, seconds, lag_s=0.12, jitter_s=0.02, seed=0, cut_at=None):
    """Drive a Follower with an injected clock: frame i arrives at t_capture + lag + jitter
    (lag: the device's and the network's latency); the control loop ticks at control_hz."""
    rng = np.random.default_rng(seed)
    arrivals = [m["t_audio"] + lag_s + rng.uniform(0, jitter_s) for m in msgs]
    bus = SimulatedBus({j.channel: j.name for j in cfg.joints})
    f = Follower(cfg, bus, "pi1")
    topic = protocol.topic("pi1", "pose")
    i, dt = 0, 1.0 / cfg.control_hz
    for k in range(int(seconds * cfg.control_hz)):
        now = k * dt
        while i < len(msgs) and arrivals[i] <= now and (cut_at is None or arrivals[i] < cut_at):
            assert f.handle(protocol.encode_json(msgs[i]), topic, now)
            i += 1
        f.tick(now)
    return f, bus


def joint_series(bus, cfg, name):
    j = cfg.joints[J[name]]
    t, servo = bus.series(j.channel)
    return t, j.from_servo(servo)


def peak_times(t, y, min_height):
    """Times of local maxima, refined by a parabola through the three samples around each."""
    out = []
    for k in range(1, len(y) - 1):
        if y[k] >= y[k - 1] and y[k] > y[k + 1] and y[k] > min_height:
            a, b, c = y[k - 1], y[k], y[k + 1]
            denom = a - 2 * b + c
            shift = 0.5 * (a - c) / denom if denom else 0.0
            out.append(t[k] + shift * (t[1] - t[0]))
    return np.array(out)


def landing_errors(bus, cfg, beats, settle_s=2.0):
    t, roll = joint_series(bus, cfg, "r_shoulder_roll")
    peaks = peak_times(t, roll, min_height=75) + cfg.actuator_latency_s  # when the servo gets there
    peaks = peaks[peaks > settle_s]
    return np.array([p - beats[np.argmin(np.abs(beats - p))] for p in peaks])


# --- kinematics -------------------------------------------------------------------------

def test_kinematics_recovers_the_angles_of_a_drawn_pose():
    rolls = {"r_shoulder": 75, "l_shoulder": 150, "r_hip": 20, "l_hip": -10}
    flex = {"r_shoulder": 60, "l_shoulder": 10, "r_hip": 45, "l_hip": 90}
    a = joint_angles(pose_from_angles(rolls, flex))
    for side in "rl":
        assert a[J[f"{side}_shoulder_roll"]] == pytest.approx(rolls[f"{side}_shoulder"], abs=1e-6)
        assert a[J[f"{side}_elbow"]] == pytest.approx(flex[f"{side}_shoulder"], abs=1e-6)
        assert a[J[f"{side}_hip_roll"]] == pytest.approx(rolls[f"{side}_hip"], abs=1e-6)
        assert a[J[f"{side}_knee"]] == pytest.approx(flex[f"{side}_hip"], abs=1e-6)
        assert a[J[f"{side}_shoulder_pitch"]] == pytest.approx(0, abs=1e-4)


def test_kinematics_pitch_from_foreshortening_and_degenerate_poses():
    kp = pose_from_angles({}, {})
    kp[3] = kp[2] + (kp[3] - kp[2]) * 0.5  # the right upper arm looks half as long: pointing 60 deg forward
    assert joint_angles(kp)[J["r_shoulder_pitch"]] == pytest.approx(60.0, abs=1e-6)
    a = joint_angles(np.zeros((14, 2)))
    assert np.all(np.isfinite(a))
    batch = joint_angles(np.stack([pose_from_angles({"r_shoulder": x}, {}) for x in (0, 45, 90)]))
    assert batch.shape == (3, 12) and batch[:, J["r_shoulder_roll"]] == pytest.approx([0, 45, 90])


# --- config -----------------------------------------------------------------------------

def test_config_rejects_unsafe_tables(tmp_path):
    text = (ROOT / "subscribers/robot/robot.ini").read_text()
    bad = {"offset = 10\n": "offset = 100\n",  # r_shoulder_roll max 170 -> servo 270
           "glide_s = 1.0": "glide_s = 0.1",  # 180 deg in 0.1 s exceeds max_speed
           "control_hz = 50": "control_hz = 50\nspeed = 3",  # unknown key
           "[joint.l_knee]": "[joint.l_toe]"}
    for old, new in bad.items():
        p = tmp_path / "robot.ini"
        p.write_text(text.replace(old, new, 1))
        with pytest.raises(RobotConfigError, match=str(p)):
            load_config(p)


# --- the targets ------------------------------------------------------------------------

def test_frames_on_time_stay_within_limits_and_rate_limits():
    msgs, _ = beat_stream(6.0)
    rng = np.random.default_rng(1)
    for m in msgs[60:90]:  # a burst of wild but valid poses: full-range jumps every frame
        m["kp"] = rng.uniform(-1, 1, (14, 2)).tolist()
    f, bus = run_offline(CFG, msgs, 6.0)
    dt = 1.0 / CFG.control_hz
    for j in CFG.joints:
        t, servo = bus.series(j.channel)
        angle = j.from_servo(servo)
        assert len(t) == 6.0 * CFG.control_hz
        assert np.all(angle >= j.min - 1e-9) and np.all(angle <= j.max + 1e-9), j.name
        assert np.all((servo >= 0) & (servo <= 180))
        speed = np.abs(np.diff(angle)) / dt
        assert speed.max() <= j.max_speed + 1e-6, f"{j.name}: {speed.max():.0f} deg/s > {j.max_speed}"
    assert f.counts["accepted"] >= len(msgs) - 5 and f.rejected == 0  # the last frames arrive after 6 s


def test_beat_aligned_moves_land_on_the_beats():
    """The arm's peaks are commanded early by lag + actuator latency + smoothing lag, so
    command time + actuator latency falls on the tracker's beats: target +/-40 ms."""
    msgs, beats = beat_stream(12.0)
    f, bus = run_offline(CFG, msgs, 12.0, lag_s=0.12, jitter_s=0.02)
    err = landing_errors(bus, CFG, beats)
    assert len(err) >= 15, "too few beat-aligned peaks found"
    assert np.max(np.abs(err)) <= 0.040, f"landing errors ms: {np.round(err * 1000)}"
    # A robot that does not know its servos' latency (lead 0) lands that much late: the test can tell.
    f0, bus0 = run_offline(CFG.replace(actuator_latency_s=0.0, smoothing_tau_s=0.0), msgs, 12.0)
    late = landing_errors(bus0, CFG, beats)
    assert np.median(late) > 0.06, f"without the lead the moves should land ~80 ms late: {np.round(late * 1000)}"
    print(f"landing error with lead: mean {np.mean(err) * 1000:+.1f} ms, max |err| {np.max(np.abs(err)) * 1000:.1f} ms "
          f"over {len(err)} beats; without lead: median {np.median(late) * 1000:+.1f} ms")
    names = {j.channel: j.name for j in CFG.joints}
    plot_bus = SimulatedBus(names)
    plot_bus.trace = [r for r in bus.trace if 3.0 <= r[0] <= 7.0]
    chans = [CFG.joints[J[n]].channel for n in ("r_shoulder_roll", "r_elbow", "l_shoulder_roll", "r_knee")]
    shifted = [b - CFG.actuator_latency_s for b in beats if 3.0 <= b <= 7.0]
    title = (f"commanded servo angles; red: tracker beats minus actuator latency "
             f"({CFG.actuator_latency_s * 1000:.0f} ms); landing error max {np.max(np.abs(err)) * 1000:.0f} ms")
    for path in (ARTIFACTS / "robot_trace.png", ROOT / "docs" / "robot_trace.png"):
        assert plot_bus.plot(path, channels=chans, beats=shifted, title=title).stat().st_size > 5000


def test_stream_cut_glides_to_neutral_in_time():
    msgs, _ = beat_stream(6.0)
    cut = 3.0
    f, bus = run_offline(CFG, msgs, 6.0, cut_at=cut)
    deadline = cut + CFG.watchdog_s + CFG.glide_s + 1.0 / CFG.control_hz  # + one control period
    moving_until = None
    for j in CFG.joints:
        t, servo = bus.series(j.channel)
        angle = j.from_servo(servo)
        after = angle[t >= deadline]
        assert np.allclose(after, j.neutral, atol=1e-6), f"{j.name} not neutral after {deadline:.2f} s"
        off = np.nonzero(np.abs(angle - j.neutral) > 1e-6)[0]
        moving_until = max(moving_until or 0, t[off[-1]] if len(off) else 0)
    assert moving_until > cut + CFG.watchdog_s - 0.1, "the robot should keep dancing until the watchdog trips"
    assert f.controller.watchdog.trips == 1


def test_device_offline_status_goes_neutral_at_once():
    msgs, _ = beat_stream(3.0)
    f, bus = run_offline(CFG, msgs, 3.0)
    status = {"v": 1, "type": "status", "device": "pi1", "seq": 0, "t": 1.0, "state": "offline"}
    assert f.handle(protocol.encode_json(status), protocol.topic("pi1", "status"), now=3.0)
    for k in range(int((CFG.glide_s + 0.05) * CFG.control_hz)):
        angles = f.tick(3.0 + k / CFG.control_hz)
    assert np.allclose(angles, CFG.neutral)


# --- rejection ----------------------------------------------------------------------------

def _hostile(valid: dict) -> dict[str, list[tuple[bytes, str]]]:
    pose_t = protocol.topic("pi1", "pose")
    def variant(**changes):
        m = json.loads(json.dumps(valid))
        for k, v in changes.items():
            m[k] = v
        return json.dumps(m).encode()
    big_kp = [[0.0, 0.0]] * 13 + [[1.5, 0.0]]
    return {
        "malformed": [(b"", pose_t), (b"not json", pose_t), (b"[1,2]", pose_t), (b"\xed\x01\x01", pose_t),
                      (variant(kp=[[0, 0]] * 13), pose_t), (variant(seq="7"), pose_t),
                      (b"{" * 5000, pose_t)],
        "wrong_version": [(variant(v=2), pose_t), (bytes([0xED, 2]) + bytes(92), pose_t)],
        "out_of_range": [(variant(kp=big_kp), pose_t), (variant(fps=0.0), pose_t),
                         (json.dumps(valid).replace('"heading": 0.0', '"heading": NaN').encode(), pose_t)],
        "wrong_topic": [(protocol.encode_json(valid), protocol.topic("pi2", "pose")),
                        (protocol.encode_json(valid), protocol.topic("pi1", "beat"))],
    }


def test_hostile_messages_are_rejected_counted_and_never_reach_a_servo():
    msgs, _ = beat_stream(2.0)
    f, bus = run_offline(CFG, msgs, 2.0)
    frames, history = f.controller.frames, list(f.controller.times)
    cases = _hostile(msgs[-1])
    for reason, items in cases.items():
        for payload, topic_name in items:
            assert not f.handle(payload, topic_name, now=2.0), (reason, payload[:40])
    stale = json.loads(protocol.encode_json(msgs[10]))
    assert not f.handle(json.dumps(stale).encode(), protocol.topic("pi1", "pose"), now=2.0)  # seq went back
    for reason, items in cases.items():
        assert f.counts[reason] == len(items), (reason, f.counts, f.last_error)
    assert f.counts["out_of_order"] == 1
    assert f.controller.frames == frames and f.controller.times == history


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), st.binary(min_size=94, max_size=94).map(lambda b: b"\xed\x01" + b[2:])))
def test_fuzz_decode_bytes_only_raises_protocol_error(payload):
    try:
        msg = protocol.decode(payload, "edgedance/v1/pi1/pose")
    except protocol.ProtocolError:
        return
    assert all(abs(c) <= 1 for pair in msg["kp"] for c in pair)


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                     | st.text(max_size=8), lambda kids: st.lists(kids, max_size=5)
                     | st.dictionaries(st.text(max_size=6), kids, max_size=5), max_leaves=20)
_VALID = beat_stream(0.2)[0][0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(_VALID) + ["beat.bpm", "beat.phase", "beat.next_beat_in", "kp.3", "kp.3.1"]),
       _json)
def test_fuzz_decode_mutated_messages(field, value):
    m = json.loads(json.dumps(_VALID))
    target, *path = field.split(".")
    if not path:
        m[target] = value
    elif len(path) == 1 and isinstance(m[target], dict):
        m[target][path[0]] = value
    elif len(path) == 1:
        m[target][int(path[0])] = value
    else:
        m[target][int(path[0])][int(path[1])] = value
    payload = json.dumps(m, allow_nan=True).encode()
    f = Follower(CFG, SimulatedBus(), "pi1")
    try:
        protocol.decode(payload, "edgedance/v1/pi1/pose")
        accepted = True
    except protocol.ProtocolError:
        accepted = False
    assert f.handle(payload, "edgedance/v1/pi1/pose", now=0.0) == accepted
    angles = f.tick(0.02)
    assert np.all((angles >= CFG.lo) & (angles <= CFG.hi))


# --- drivers ----------------------------------------------------------------------------

def test_serial_bus_line_protocol_over_a_pty():
    master, slave = os.openpty()
    try:
        with SerialBus(os.ttyname(slave)) as bus:
            bus.write({3: 92.54, 0: 10.0, 7: 250.0, 8: -5}, 0.0)
            time.sleep(0.05)
            data = os.read(master, 4096)
        assert data == b"S0:10.0\nS3:92.5\nS7:180.0\nS8:0.0\n"
    finally:
        os.close(master)
        os.close(slave)
    with pytest.raises(BusError, match="/dev/no-such-tty"):
        SerialBus("/dev/no-such-tty")


def test_servokit_bus_without_the_library_is_a_clear_error():
    try:
        import adafruit_servokit  # noqa: F401
        pytest.skip("adafruit_servokit is installed here; this checks the missing-library message")
    except ImportError:
        pass
    with pytest.raises(BusError, match="adafruit-circuitpython-servokit"):
        ServoKitBus()


# --- the follower against a real Mosquitto ----------------------------------------------

@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("robot-broker"), devices=("pi1",), tls=False, websockets=False) as b:
        yield b


def _publish_live(client, msgs, fmt="json", cut_after=None):
    """Publish at the stream's own pace (25 fps), like a device."""
    t0 = time.monotonic()
    for i, m in enumerate(msgs):
        if cut_after is not None and i >= cut_after:
            break
        delay = t0 + i / m["fps"] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = time.time()
        m = dict(m, t=now, t_capture=now - 0.02)
        payload = protocol.encode_binary(m) if fmt == "binary" else protocol.encode_json(m)
        client.publish(protocol.topic("pi1", "pose"), payload, qos=0)


@pytest.mark.parametrize("fmt", ["json", "binary"])
def test_follower_over_mqtt(broker, fmt):
    msgs, _ = beat_stream(2.0)
    bus = SimulatedBus()
    dev = broker.client("device-pi1")
    with Follower(CFG, bus, "pi1") as f:
        assert f.connect(broker.host, broker.port, user="robot", password=broker.credentials["robot"]).wait(5)
        time.sleep(0.2)
        dev.publish(protocol.topic("pi1", "pose"), b'{"v": 1, "type": "pose"}', qos=1).wait_for_publish(5)
        _publish_live(dev, msgs, fmt)
        cut = time.time()  # the follower's clock
        time.sleep(CFG.watchdog_s + CFG.glide_s + 0.3)
        counts = dict(f.counts)
    dev.disconnect()
    assert counts["accepted"] >= len(msgs) - 2 and counts["malformed"] == 1, counts
    start = bus.trace[0][0]
    for j in CFG.joints:
        t, servo = bus.series(j.channel)
        angle = j.from_servo(servo)
        assert np.all(angle >= j.min - 1e-9) and np.all(angle <= j.max + 1e-9)
        if j.name == "r_shoulder_roll":
            assert np.ptp(angle[(t > start + 0.5) & (t < cut)]) > 30, "the arm should dance while frames arrive"
        assert np.allclose(angle[t > cut + CFG.watchdog_s + CFG.glide_s + 0.1], j.neutral), j.name


def test_cli_follows_and_writes_a_trace(broker, tmp_path):
    msgs, _ = beat_stream(1.5)
    png = tmp_path / "trace.png"
    proc = subprocess.Popen([sys.executable, "-m", "subscribers.robot", "--device", "pi1",
                             "--broker", f"{broker.host}:{broker.port}", "--user", "robot",
                             "--password-file", str(broker.credentials_file), "--driver", "sim",
                             "--trace", str(png), "--seconds", "3.5"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dev = broker.client("device-pi1")
    time.sleep(1.0)  # interpreter start-up and subscription
    _publish_live(dev, msgs)
    out, err = proc.communicate(timeout=30)
    dev.disconnect()
    assert proc.returncode == 0, err
    accepted = int(out.split("accepted ")[1].split(",")[0])
    assert accepted >= len(msgs) - 2, out
    assert png.stat().st_size > 5000
