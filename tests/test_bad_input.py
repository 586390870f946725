"""Bad input, end to end: every way a user, a file or the network can hand the system garbage.

Each case gets a clear error naming the file / key / field (non-zero exit, no traceback), or a
safe, documented behaviour; nothing crashes the device, the robot or the display. What other
test files already cover is listed in docs/reliability.md and not repeated here.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from broker.launcher import Broker
from device import protocol
from device.contract import DEFAULT_FEATURES
from subscribers.robot.config import load_config
from subscribers.robot.drivers import SimulatedBus
from subscribers.robot.follower import REJECT_REASONS, Follower

import faultlib as fl

REPO = pathlib.Path(__file__).resolve().parents[1]
SR = DEFAULT_FEATURES.sample_rate_hz
ROBOT = load_config()


def run_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(fl.device_argv(*args), capture_output=True, text=True, cwd=REPO, timeout=timeout, **kw)


def assert_clear_error(r: subprocess.CompletedProcess, *names: str):
    """Non-zero exit, one readable message naming every one of `names`, no traceback."""
    assert r.returncode != 0, f"exit 0 for bad input; stdout {r.stdout[-300:]!r}"
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    for name in names:
        assert name in r.stderr, f"{name!r} not named in: {r.stderr[-800:]!r}"


def tone(seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * 220 * t) * (1 + np.sign(np.sin(2 * np.pi * 2 * t))) / 2).astype(np.float32)


# --- audio files through the CLI ---------------------------------------------------------

@pytest.fixture(scope="module")
def bad_audio(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Files that must be refused, by name (empty, missing and plain garbage: tests/test_cli_features.py)."""
    d = tmp_path_factory.mktemp("bad-audio")
    sf.write(d / "good.wav", tone(2.0), SR, subtype="PCM_16")
    raw = (d / "good.wav").read_bytes()
    files = {
        "header_only.wav": raw[:44],  # a valid header, no samples
        "cut_in_header.wav": raw[:30],
        "png_named.wav": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8,
        "noise.flac": b"fLaC" + os.urandom(3000),
        "text.mp3": b"ID3" + b"this is not an mp3 " * 100,
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    sf.write(d / "rate_12k.wav", tone(1.0, 12000), 12000)  # a rate no sound card offers
    nan = tone(1.0)
    nan[100] = np.nan
    sf.write(d / "nan_float.wav", nan, SR, subtype="FLOAT")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(d / "good.wav"), "-c:a", "aac",
                    str(d / "aac.m4a")], check=True)  # a real audio format we do not read
    return {p.name: p for p in d.iterdir() if p.name != "good.wav"}


@pytest.mark.parametrize("command", ["beats", "features", "generate"])
def test_bad_audio_files_are_named_and_refused(bad_audio, command, request, tmp_path):
    """Every bad file, every audio command: exit 2, the file named, no traceback."""
    extra = {"beats": [], "features": ["--info"]}.get(command)
    if command == "generate":
        extra = ["--out", str(tmp_path / "p.npy"), "--model", str(request.getfixturevalue("tiny_bundle"))]
    for name, path in sorted(bad_audio.items()):
        r = run_cli(command, str(path), *extra)
        assert_clear_error(r, name)
        assert r.returncode == 2, (name, r.returncode)
        assert not (tmp_path / "p.npy").exists(), f"{command} wrote output for {name}"


def test_truncated_audio_plays_what_is_there(tmp_path):
    """Documented behaviour: a WAV or MP3 cut short (data missing, header intact) is decoded up to the cut."""
    sf.write(tmp_path / "full.wav", tone(4.0), SR, subtype="PCM_16")
    raw = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[:44 + 2 * SR * 1])  # the header says 4 s, 1 s is there
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(tmp_path / "full.wav"), str(tmp_path / "full.mp3")],
                   check=True)
    mp3 = (tmp_path / "full.mp3").read_bytes()
    (tmp_path / "cut.mp3").write_bytes(mp3[:len(mp3) // 2])
    for name, seconds in (("cut.wav", 1.0), ("cut.mp3", 2.0)):
        out = tmp_path / (name + ".npy")
        r = run_cli("features", str(tmp_path / name), "--out", str(out))
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        frames = np.load(out).shape[0]
        assert abs(frames - seconds * DEFAULT_FEATURES.pose_fps) <= 3, (name, frames)


# --- a bundle whose manifest does not match the frontend ---------------------------------

def _mismatched_bundle(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """A copy of the bundle made for another frontend: feature_config edited and its hash recomputed,
    so the bundle is self-consistent and only the device's frontend disagrees."""
    import dataclasses

    from device.contract import FeatureConfig
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    fc = dict(m["feature_config"], n_mels=64)
    m["feature_config"] = fc
    m["feature_hash"] = FeatureConfig(**{k: v for k, v in fc.items()
                                         if k in {f.name for f in dataclasses.fields(FeatureConfig)}}).config_hash()
    (dst / "manifest.json").write_text(json.dumps(m, indent=1))
    return dst


def test_bundle_for_another_frontend_is_refused_by_the_cli(tiny_bundle, tmp_path):
    bundle = _mismatched_bundle(tiny_bundle, tmp_path / "other-frontend")
    sf.write(tmp_path / "song.wav", tone(2.0), SR, subtype="PCM_16")
    r = run_cli("generate", str(tmp_path / "song.wav"), "--out", str(tmp_path / "p.npy"), "--model", str(bundle))
    assert_clear_error(r, "other-frontend", "n_mels")
    assert not (tmp_path / "p.npy").exists()


# --- hostile MQTT at the robot ------------------------------------------------------------

@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("bad-input-broker"), devices=("pi1",), tls=False, websockets=True) as b:
        yield b


def hostile_client(broker):
    """The publisher of the hostile payloads: MQTT 3.1.1, because Mosquitto 2.0.11 answers an oversized
    QoS 1 publish from an MQTT 5 client with a PUBACK reason code (0x95) that PUBACK may not carry,
    paho drops the connection as a protocol error and re-sends the message on every reconnect."""
    import paho.mqtt.client as mqtt
    return broker.client("device-pi1", protocol=mqtt.MQTTv311)


def _publish_all(client, items, device="pi1"):
    for kind, payload, _ in items:
        client.publish(protocol.topic(device, kind), payload, qos=1).wait_for_publish(10)


def test_hostile_payloads_at_the_robot_over_mqtt(broker):
    """Through a real Mosquitto: every hostile payload is rejected and counted, no servo moves, the robot
    stays connected and its control loop keeps ticking, and a good stream afterwards is followed."""
    items = [i for i in fl.hostile_payloads() if i[0] in ("pose", "status")]  # what the robot subscribes to
    bus = SimulatedBus()
    dev = hostile_client(broker)
    with Follower(ROBOT, bus, "pi1") as f:
        assert f.connect(broker.host, broker.port, user="robot", password=broker.credentials["robot"]).wait(5)
        time.sleep(0.3)
        _publish_all(dev, items)
        # the broker drops the payloads over 64 KiB: a marker after them shows everything else arrived
        _publish_all(dev, [("status", b"marker", "marker")])
        expect = len(fl.delivered(items)) + 1
        assert fl.wait_until(lambda: f.rejected >= expect, 10), (dict(f.counts), f.last_error)
        ticks = f.ticks
        time.sleep(0.2)
        assert f.ticks > ticks, "the control loop stopped"
        assert f.controller.frames == 0 and f.counts["accepted"] == 0, dict(f.counts)
        assert f.rejected == expect, dict(f.counts)
        assert set(REJECT_REASONS) - {"out_of_order"} <= {k for k, v in f.counts.items() if v}, dict(f.counts)
        servo = np.array([d for _, _, d in bus.trace]).reshape(-1, len(ROBOT.joints))
        neutral = np.array(list(ROBOT.to_servo(ROBOT.neutral).values()))
        assert np.allclose(servo, neutral), "a hostile message moved a servo"
        # still alive: a good frame is taken
        good = fl._valid_pose(seq=100)
        dev.publish(protocol.topic("pi1", "pose"), protocol.encode_json(good), qos=1).wait_for_publish(5)
        assert fl.wait_until(lambda: f.counts["accepted"] == 1, 5), dict(f.counts)
        assert f._client.is_connected()
    dev.disconnect()
    dev.loop_stop()


def test_hostile_payloads_at_the_robot_cli(broker, tmp_path):
    """The robot as its own process (`python -m subscribers.robot`): it survives them all, exits 0, counts them."""
    items = [i for i in fl.hostile_payloads() if i[0] in ("pose", "status")]
    proc = subprocess.Popen([sys.executable, "-m", "subscribers.robot", "--device", "pi1",
                             "--broker", f"{broker.host}:{broker.port}", "--password-file",
                             str(broker.credentials_file), "--driver", "sim", "--seconds", "6"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        dev = hostile_client(broker)
        time.sleep(2.5)  # the robot connects and subscribes
        _publish_all(dev, items)
        dev.disconnect()
        dev.loop_stop()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    counts = dict(kv.rsplit(" ", 1) for kv in out.split("messages: ", 1)[1].splitlines()[0].split(", "))
    assert int(counts["accepted"]) == 0, counts
    assert sum(int(counts[r]) for r in REJECT_REASONS) == len(fl.delivered(items)), counts


# --- hostile MQTT at the display -------------------------------------------------------------

@pytest.mark.browser
def test_hostile_payloads_at_the_display(broker, tmp_path):
    """Every hostile payload on every topic the page reads, and a flood of 300: all counted as rejected,
    no JavaScript error, the page stays connected and draws the next good frame. The 1 MiB ones must be
    dropped by the broker (message_size_limit): Mosquitto 2.0's WebSockets listener stalls on them."""
    from test_display import CHROMIUM, CHROMIUM_ARGS, Page, changed

    from subscribers.display.server import DisplayServer, page_config

    sync_api = pytest.importorskip("playwright.sync_api")
    items = fl.hostile_payloads()
    flood = [("pose", bytes([i % 200 + 1]) * (i % 50 + 1), "flood") for i in range(300)]
    config = page_config(broker_ws=f"ws://127.0.0.1:{broker.ws_port}", password=broker.credentials["display"],
                         device="pi1")
    dev = hostile_client(broker)
    with DisplayServer(config) as server, sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=CHROMIUM_ARGS)
        try:
            page = Page(context, server.url + "?device=pi1")
            page.wait("window.edgedance && window.edgedance.stats.subscribed")
            _publish_all(dev, [("pose", protocol.encode_json(fl._valid_pose(seq=1)), "good")])
            page.wait("window.edgedance.stats.poses >= 1")
            before = page.canvas()
            _publish_all(dev, items + flood)
            n = len(fl.delivered(items)) + len(flood)
            page.wait(f"window.edgedance.stats.rejected >= {n}", timeout=20000)
            stats = page.stats()
            assert stats["rejected"] == n and stats["poses"] == 1, stats
            assert stats["connected"], stats
            assert changed(before, page.canvas()) == 0, "a rejected message changed the drawing"
            _publish_all(dev, [("pose", protocol.encode_json(fl._valid_pose(seq=50)), "good")])
            page.wait("window.edgedance.stats.poses >= 2")
            assert not page.errors, page.errors
            page.close()
        finally:
            context.close()
    dev.disconnect()
    dev.loop_stop()


# --- the device process against bad credentials, bad settings and hostile commands ------------

@pytest.fixture(scope="module")
def song(tmp_path_factory):
    from device.demo import write_song
    return write_song(tmp_path_factory.mktemp("bad-input-song") / "song.wav", seconds=8)


def test_wrong_broker_credentials_device_keeps_dancing_and_retrying(broker, song, tiny_bundle, tmp_path):
    """`python -m device run` with a wrong password: the refusal is logged naming the broker and the reason,
    retried with backoff, the audio pipeline keeps running, and SIGTERM still ends it cleanly."""
    pw = tmp_path / "wrong.password"
    pw.write_text("not-the-password\n")
    argv = fl.device_run_argv(song, tiny_bundle, broker.host, broker.port, pw, mqtt_reconnect_max_s=1)
    with fl.DeviceProcess(argv, tmp_path / "device.log") as dev:
        time.sleep(6.0)
        assert dev.proc.poll() is None, "the device died:\n" + dev.log_text()[-2000:]
        rc = dev.stop()
    log = dev.log_text()
    assert rc == 0 and "Traceback" not in log, log[-3000:]
    refusals = [line for line in log.splitlines() if f"{broker.host}:{broker.port}" in line and
                ("Not authorized" in line or "Bad user name or password" in line)]
    assert len(refusals) >= 2, "the refusal should be logged, and retried:\n" + log[-2000:]
    assert "retrying" in refusals[0]
    m = re.search(r"frames (\d+), audio ([\d.]+) s", log)
    assert m and int(m.group(1)) >= 4 * 25, "the pipeline did not keep running offline:\n" + log[-1500:]


@pytest.mark.parametrize("how, value, names", [
    ("env", ("EDGEDANCE_MQTT_KEEPALIVE", "30"), ["EDGEDANCE_MQTT_KEEPALIVE", "'keepalive'", "keepalive_s"]),
    ("env", ("EDGEDANCE_AUDIO_RING_S", "0.01"), ["EDGEDANCE_AUDIO_RING_S", "ring_s", "[0.2, 30]"]),
    ("set", "mqtt.reconnect_max_s=0.1", ["reconnect_max_s", "reconnect_min_s"]),
    ("set", "device.latency_ms=nan", ["latency_ms", "'nan'"]),
    ("ini", "[robot]\ncontrol_hz = 50\n", ["unknown section [robot]", "device.ini"]),
    ("ini", "[audio]\nchunk_ms = 1000\n", ["chunk_ms", "[5, 100]", "device.ini"]),
])
def test_bad_settings_stop_the_device_naming_the_key(how, value, names, tmp_path, song, tiny_bundle):
    """Settings from every source (INI, environment, --set), through the real `device run`: exit 2, named."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEDANCE_")}
    args = ["run", "--file", str(song), "--model", str(tiny_bundle), "--set", "mqtt.enabled=false"]
    if how == "env":
        env[value[0]] = value[1]
    elif how == "set":
        args += ["--set", value]
    else:
        (tmp_path / "device.ini").write_text(value)
        args += ["--config", str(tmp_path / "device.ini")]
    r = run_cli(*args, env=env, timeout=60)
    assert_clear_error(r, *names)
    assert r.returncode == 2


def test_hostile_commands_never_stop_the_device(broker, song, tiny_bundle, tmp_path):
    """Junk and hostile `cmd` messages (admin is the only writer): rejected and logged; a bundle made for
    another frontend is refused at run time with the reason in the status; the device keeps publishing."""
    other = _mismatched_bundle(tiny_bundle, tmp_path / "other-frontend")
    pw = tmp_path / "pw"
    pw.write_text(broker.credentials["device-pi1"])
    import paho.mqtt.client as mqtt
    admin = broker.client("admin", protocol=mqtt.MQTTv311)
    cmd_t = protocol.topic("pi1", "cmd")

    def cmd(name, **args):
        return json.dumps({"v": 1, "type": "cmd", "device": "pi1", "seq": 1, "t": time.time(), "cmd": name,
                           "args": args}).encode()

    junk = [b"", b"\x00" * 100, b"[" * 50000, b'{"v":1,"type":"cmd"}', cmd("rm -rf /"), cmd("latency", ms=1e9),
            cmd("latency", ms="soon"), cmd("select_bundle"), cmd("select_bundle", path=["x"]),
            json.dumps({"v": 1, "type": "cmd", "device": "pi2", "seq": 1, "t": 1.0, "cmd": "stop"}).encode(),
            b'{"v":1,"type":"cmd","device":"pi1","seq":1,"t":NaN,"cmd":"stop"}']
    argv = fl.device_run_argv(song, tiny_bundle, broker.host, broker.port, pw)
    with fl.Recorder(broker.host, broker.port, "display", broker.credentials["display"]) as rec, \
            fl.DeviceProcess(argv, tmp_path / "device.log") as dev:
        assert rec.wait_for(lambda m: m["state"] == "online", 30, "status"), dev.log_text()[-2000:]
        for payload in junk:
            admin.publish(cmd_t, payload, qos=1).wait_for_publish(5)
        admin.publish(cmd_t, cmd("select_bundle", path=str(other)), qos=1).wait_for_publish(5)
        refused = rec.wait_for(lambda m: "select_bundle refused" in m.get("reason", ""), 15, "status")
        t_after = time.time()
        assert rec.wait_for(lambda m: True, 10, "pose", t_after), "the device stopped publishing"
        assert dev.proc.poll() is None
        rc = dev.stop()
    admin.disconnect()
    admin.loop_stop()
    log = dev.log_text()
    assert rc == 0 and "Traceback" not in log, log[-3000:]
    assert refused and "other-frontend" in refused.msg["reason"] and "n_mels" in refused.msg["reason"], refused
    assert log.count("ignored a bad command") == len(junk), log[-3000:]
    assert all(r.msg is not None for r in rec.snapshot() if r.kind != "cmd"), "the device published something invalid"


# --- silence, clipping and DC at the input ------------------------------------------------------

def _edge_signals() -> dict[str, np.ndarray]:
    """3 s each, float in [-1, 1] at 16 kHz (DC and full-scale square waves survive to int16 intact)."""
    n = 3 * SR
    t = np.arange(n) / SR
    loud = np.clip(8.0 * np.sin(2 * np.pi * 110 * t), -1, 1)  # hard-clipped at 18 dB over full scale
    return {
        "silence": np.zeros(n),
        "clipped": loud,
        "dc_half": np.full(n, 0.5),
        "dc_full_negative": np.full(n, -1.0),
        "nyquist_full_scale": np.where(np.arange(n) % 2 == 0, 1.0, -1.0),
        "dc_then_clipped_then_silence": np.concatenate([np.full(n // 3, 1.0), loud[: n // 3],
                                                        np.zeros(n - 2 * (n // 3))]),
    }


def test_silence_clipping_and_dc_through_generate(tiny_bundle, tmp_path):
    """`python -m device generate` on each: finite poses, keypoints within [-1, 1], the right frame count."""
    for name, x in _edge_signals().items():
        wav = tmp_path / f"{name}.wav"
        sf.write(wav, x.astype(np.float32), SR, subtype="PCM_16")
        out = tmp_path / f"{name}.npy"
        r = run_cli("generate", str(wav), "--out", str(out), "--model", str(tiny_bundle))
        assert r.returncode == 0 and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        poses = np.load(out)
        heading = np.load(tmp_path / f"{name}.heading.npy")
        assert poses.shape == (3 * DEFAULT_FEATURES.pose_fps, 14, 2), (name, poses.shape)
        assert np.all(np.isfinite(poses)) and np.all(np.isfinite(heading)), name
        assert np.abs(poses).max() <= 1.0, (name, float(np.abs(poses).max()))


def test_silence_clipping_and_dc_through_the_live_device(broker, tiny_bundle, tmp_path):
    """All of them back to back through `python -m device run` (file source, as fast as it goes, a ring big
    enough for the whole file) to a real broker: every frame arrives, each one schema-valid (finite,
    keypoints in [-1, 1], beat fields in range)."""
    x = np.concatenate(list(_edge_signals().values()))
    wav = tmp_path / "edges.wav"
    sf.write(wav, x.astype(np.float32), SR, subtype="PCM_16")
    pw = tmp_path / "pw"
    pw.write_text(broker.credentials["device-pi1"])
    argv = fl.device_run_argv(wav, tiny_bundle, broker.host, broker.port, pw, loop=False, audio_realtime="false",
                              audio_ring_s=30)
    with fl.Recorder(broker.host, broker.port, "display", broker.credentials["display"]) as rec:
        t0 = time.time()
        r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        want = len(x) // DEFAULT_FEATURES.samples_per_pose_frame
        fl.wait_until(lambda: len(rec.snapshot("pose", t0)) >= want, 10)
        got = rec.snapshot(since=t0)
    poses = [g for g in got if g.kind == "pose"]
    assert all(g.msg is not None for g in got), [g.error for g in got if g.msg is None][:3]
    assert len(poses) == want, (len(poses), want)
    assert [p.msg["seq"] for p in poses] == list(range(want))


def test_as_fast_as_possible_run_processes_the_whole_file(tiny_bundle, tmp_path):
    sf.write(tmp_path / "six.wav", tone(6.0), SR, subtype="PCM_16")
    r = run_cli("run", "--file", str(tmp_path / "six.wav"), "--model", str(tiny_bundle), "--set", "mqtt.enabled=false",
                "--set", "audio.realtime=false")
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"frames (\d+), audio ([\d.]+) s.*dropped frames (\d+)", r.stderr)
    assert m and int(m.group(1)) == 150 and int(m.group(3)) == 0, r.stderr[-500:]
