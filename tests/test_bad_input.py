"""Bad input, end to end: every way a user, a file or the network can hand the system garbage.

Each case gets a clear error naming the file / key / field (non-zero exit, no traceback), or a
safe, documented behaviour; nothing crashes the device, the robot or the display. What other
test files already cover is listed in docs/reliability.md and not repeated here.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
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
