"""The device pipeline end to end: a file source, a real bundle (tiny_bundle), a real Mosquitto;
commands, dropped frames, sd_notify, SIGTERM through the CLI, and the offline `generate`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from broker.launcher import Broker
from device import protocol
from device.audio import FileSource, resample, to_pcm16
from device.demo import DEMO_SAMPLE_RATE_HZ, synthesize_song
from device.model import load_bundle
from device.pipeline import Pipeline, _Ring, generate, sd_notify
from device.publish import Publisher
from test_publish import Sink  # noqa: E402  (tests/ is on sys.path under pytest)

DEV = "pi1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    """6 s of the demo's synthesized song at 96 BPM, as a WAV file and as int16 PCM at 16 kHz."""
    x = synthesize_song(6.0, bpm=96.0)
    path = tmp_path_factory.mktemp("song") / "song.wav"
    sf.write(path, x, DEMO_SAMPLE_RATE_HZ, subtype="FLOAT")
    return path, to_pcm16(resample(x, DEMO_SAMPLE_RATE_HZ, 16000))


@pytest.fixture
def broker(tmp_path):
    with Broker(tmp_path / "broker", devices=(DEV,), tls=False, websockets=False) as b:
        yield b


def _publisher(b, **kw):
    return Publisher(DEV, b.host, b.port, username=f"device-{DEV}", password=b.credentials[f"device-{DEV}"], **kw)


def test_file_to_subscriber_poses_complete_and_equal_to_generate(broker, song, tiny_bundle):
    path, pcm = song
    T = len(pcm) // 640
    want_pose, want_head, ff = generate(path, tiny_bundle)
    assert want_pose.shape == (T, 14, 2) and want_head.shape == (T,)
    sink = Sink(broker)
    pub = _publisher(broker, status_info={"bundle": "tiny"})
    try:
        with pub, FileSource(path, realtime=True) as src:
            assert pub.wait_connected(5)
            stats = Pipeline(src, load_bundle(tiny_bundle), pub, metrics_interval_s=1.0).run()
        assert sink.wait_for(lambda: len(sink.of("pose")) == T and any(
            d["state"] == "stopped" for d in sink.of("status")), timeout=5)
    finally:
        sink.close()
    assert not sink.errors
    poses = sink.of("pose")
    assert [p["seq"] for p in poses] == list(range(T)) and [p["frame"] for p in poses] == list(range(T))
    got = np.array([p["kp"] for p in poses], np.float32)
    np.testing.assert_allclose(got, np.clip(want_pose, -1, 1), atol=1e-6)  # streaming == offline generate
    np.testing.assert_allclose([p["heading"] for p in poses], want_head, atol=1e-9)
    assert [p["t_audio"] for p in poses] == pytest.approx([(t + 1) * 0.04 for t in range(T)])
    # causality and no pile-up (the latency figures themselves are bench.pipeline's, not a test's)
    lat = np.array([ts - d["t_capture"] for k, d, _, ts in sink.msgs if k == "pose"]) * 1000
    assert lat.min() > 0 and np.median(lat) < 1000, (lat.min(), np.median(lat))
    beats = sink.of("beat")
    assert len(beats) == int(ff.is_beat.sum()) == stats.beats and len(beats) >= 4
    assert [b["beat_index"] for b in beats] == list(range(len(beats)))
    assert all(b["frame"] in set(np.flatnonzero(ff.is_beat)) for b in beats)
    assert sink.of("metrics") and "latency_ms_p50" in sink.of("metrics")[-1]
    s = stats.summary()
    assert s["frames"] == T and s["dropped_frames"] == 0 and stats.published == T
    assert s["cpu_ms_per_audio_s_total"] > 0 and set(s["cpu_ms_per_audio_s"]) == {"features", "model", "publish"}
    # the processing thread's own CPU holds the stages and more; the capture thread is counted apart
    assert s["cpu_ms_per_audio_s_loop"] >= s["cpu_ms_per_audio_s_total"] > 0 and stats.capture_cpu_s > 0
    assert s["cpu_ms_per_audio_s_process"] >= s["cpu_ms_per_audio_s_loop"] + s["cpu_ms_per_audio_s_capture"] * 0.9


def test_commands_pause_stop_start_latency_and_a_bad_bundle(broker, song, tiny_bundle, tmp_path):
    _, pcm = song
    sink = Sink(broker)
    bad = tmp_path / "not-a-bundle"
    bad.mkdir()
    pipe_ref = {}
    pub = _publisher(broker, on_command=lambda c, a: pipe_ref["p"].command(c, a))
    admin = broker.client("admin")

    def send(cmd, **args):
        m = {"v": 1, "type": "cmd", "device": DEV, "seq": 0, "t": time.time(), "cmd": cmd, "args": args}
        admin.publish(protocol.topic(DEV, "cmd"), json.dumps(m), qos=1)

    def at_frame(frame, *_):
        if frame == 20:
            send("pause")
        elif frame == 40:
            send("start")
        elif frame == 50:
            send("latency", ms=100)
            send("select_bundle", path=str(bad))
        elif frame == 70:
            send("stop")

    try:
        with pub, FileSource("song", realtime=True, pcm=pcm[:16000 * 4]) as src:
            assert pub.wait_connected(5)
            time.sleep(0.2)
            pipe = pipe_ref["p"] = Pipeline(src, load_bundle(tiny_bundle), pub, on_frame=at_frame)
            pipe.run()
        assert sink.wait_for(lambda: any(d["state"] == "stopped" for d in sink.of("status")))
    finally:
        sink.close()
    frames = [p["frame"] for p in sink.of("pose")]
    assert frames[:20] == list(range(20)), "frames before the pause"
    gap = [f for f in frames if 23 <= f <= 38]
    assert not gap, f"published while paused: {gap}"
    assert 45 in frames and max(frames) < 76, "resumed after start, silent after stop"
    assert [p["seq"] for p in sink.of("pose")] == list(range(len(frames))), "seq has no holes"
    states = [d["state"] for d in sink.of("status")]
    assert "paused" in states and "stopped" in states
    refused = [d for d in sink.of("status") if "select_bundle refused" in d.get("reason", "")]
    assert refused and "manifest.json" in refused[0]["reason"]
    assert pipe.latency_ms == 100 and pipe.bundle.path == tiny_bundle


def test_slow_processing_counts_dropped_frames(song, tiny_bundle):
    _, pcm = song
    class FastLive:  # a live source (it cannot wait: the ring drops) that delivers faster than real time
        realtime = True

        def __init__(self, src):
            self.src = src

        def __iter__(self):
            return iter(self.src)

    with FileSource("song", realtime=False, pcm=pcm) as src:
        pipe = Pipeline(FastLive(src), load_bundle(tiny_bundle), None, ring_s=0.2,
                        on_frame=lambda *a: time.sleep(0.01))  # 4x slower than the fast source
        st = pipe.run()
    T = len(pcm) // 640
    assert st.dropped_frames > 10
    assert abs(st.frames + st.dropped_frames - T) <= 2, (st.frames, st.dropped_frames, T)


def test_sd_notify_ready_watchdog_stopping(song, tiny_bundle, monkeypatch):
    _, pcm = song
    d = tempfile.mkdtemp(prefix="ednotify")
    addr = os.path.join(d, "notify")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(addr)
    srv.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    got = []
    try:
        with FileSource("song", realtime=True, pcm=pcm[:int(16000 * 3.5)]) as src:
            Pipeline(src, load_bundle(tiny_bundle), None).run()
        while True:
            try:
                got.append(srv.recv(1024).decode())
            except socket.timeout:
                break
    finally:
        srv.close()
        os.unlink(addr)
        os.rmdir(d)
    assert got[0].startswith("READY=1") and got[-1] == "STOPPING=1"
    assert got.count("WATCHDOG=1") >= 2
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("WATCHDOG=1") is False


def test_cli_run_stops_cleanly_on_sigterm(broker, song, tiny_bundle, tmp_path):
    path, _ = song
    ini = tmp_path / "device.ini"
    ini.write_text(f"[device]\nid = {DEV}\nbundle = {tiny_bundle}\n[audio]\nsource = file\nfile = {path}\nloop = true\n"
                   f"[mqtt]\nhost = {broker.host}\nport = {broker.port}\nusername = device-{DEV}\n")
    sink = Sink(broker)
    env = dict(os.environ, EDGEDANCE_MQTT_PASSWORD=broker.credentials[f"device-{DEV}"], PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "device", "run", "--config", str(ini)], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert sink.wait_for(lambda: len(sink.of("pose")) >= 25, timeout=20), proc.stderr.read() if proc.poll() else ""
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "frames" in err and "Traceback" not in err
    assert sink.wait_for(lambda: sink.of("status") and sink.of("status")[-1]["state"] == "stopped")
    sink.close()


def test_cli_generate_writes_poses_and_heading(song, tiny_bundle, tmp_path):
    path, pcm = song
    out = tmp_path / "p.npy"
    r = subprocess.run([sys.executable, "-m", "device", "generate", str(path), "--out", str(out), "--model",
                        str(tiny_bundle)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    poses, head = np.load(out), np.load(tmp_path / "p.heading.npy")
    assert poses.shape == (len(pcm) // 640, 14, 2) and poses.dtype == np.float32 and head.shape == (len(poses),)
    want, want_h, _ = generate(path, tiny_bundle)
    np.testing.assert_array_equal(poses, want)
    r = subprocess.run([sys.executable, "-m", "device", "generate", str(path), "--out", str(out), "--model",
                        str(tmp_path / "nope")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_whole_device_survives_a_broker_restart_and_delivers_the_outage_beats(tmp_path, song, tiny_bundle):
    """The broker stops ~5 s mid-stream and restarts on the same port: the pipeline keeps running,
    every beat of the song (those of the outage too) arrives in order after the reconnect, and
    the final status is 'stopped'. (The 30 s version: bench/faults.py.)"""
    _, pcm = song
    work = tmp_path / "broker"
    brokers = [Broker(work, devices=(DEV,), tls=False, websockets=False).start()]
    port = brokers[0].port
    sink = Sink(brokers[0])
    pub = Publisher(DEV, "127.0.0.1", port, username=f"device-{DEV}", password=brokers[0].credentials[f"device-{DEV}"],
                    reconnect_min_s=0.5, reconnect_max_s=1.0)
    song9 = np.tile(pcm, 2)[:16000 * 9]
    timers = [threading.Timer(1.5, lambda: brokers[0].stop()),
              threading.Timer(6.5, lambda: brokers.append(
                  Broker(work, devices=(DEV,), tls=False, websockets=False, port=port).start()))]
    try:
        with pub, FileSource("song", realtime=True, pcm=song9) as src:
            assert pub.wait_connected(5)
            for t in timers:
                t.start()
            stats = Pipeline(src, load_bundle(tiny_bundle), pub).run()
            assert len(brokers) == 2 and pub.connected, "the device did not reconnect"
        assert sink.wait_for(lambda: len(sink.of("beat")) == stats.beats and any(
            d["state"] == "stopped" for d in sink.of("status")), timeout=10), (len(sink.of("beat")), stats.beats)
    finally:
        for t in timers:
            t.cancel()
        sink.close()
        for b in brokers:
            b.stop()
    beats = sink.of("beat")
    assert stats.beats >= 10 and [b["beat_index"] for b in beats] == list(range(stats.beats))
    outage = [b for b in beats if 2.0 < b["t_audio"] < 6.0]
    assert outage, "no beat fell in the outage window"
    assert stats.frames == len(song9) // 640 and stats.dropped_frames == 0
    assert pub.stats["disconnects"] >= 1 and pub.stats["connects"] >= 2


class _C:  # the shape of device.audio.Chunk the ring needs
    def __init__(self, n, i=0):
        self.pcm, self.i = np.zeros(n, np.int16), i


def test_ring_wakes_the_loop_once_a_frame_is_complete_not_per_chunk():
    ring = _Ring(16000)
    got = []

    def reader():
        while len(got) < 3:
            chunks = ring.get(timeout=2.0, min_samples=640)
            if chunks:
                got.append((time.monotonic(), [c.i for c in chunks]))

    th = threading.Thread(target=reader)
    th.start()
    t0 = time.monotonic()
    for i in range(12):  # 10 ms chunks of 160 samples, at pace
        time.sleep(0.01)
        ring.put(_C(160, i))
    th.join(5)
    assert [ids for _, ids in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert got[0][0] - t0 >= 0.035  # woken by the 4th chunk, not before
    assert ring.get(timeout=0.05, min_samples=640) is None  # timed out: nothing taken
    ring.put(_C(160, 12))
    assert ring.get(timeout=0.05, min_samples=640) is None and ring._n == 160  # kept for the next call
    ring.close()
    assert [c.i for c in ring.get(timeout=0.05, min_samples=640)] == [12]  # closed: the rest


def test_blocking_ring_smaller_than_a_frame_request_does_not_stall():
    """A file read as fast as possible (blocking put) into a ring that cannot hold what the loop
    asks for: the waiting put hands the loop what there is, every sample arrives in order."""
    ring = _Ring(700, block=True)
    sizes = [250] * 20

    def writer():
        for i, n in enumerate(sizes):
            ring.put(_C(n, i))
        ring.close()

    th = threading.Thread(target=writer)
    th.start()
    seen, t0 = [], time.monotonic()
    while time.monotonic() - t0 < 5:
        chunks = ring.get(timeout=0.5, min_samples=640)
        if chunks is None and ring.closed and not ring._q:
            break
        seen += [c.i for c in chunks or []]
    th.join(5)
    assert seen == list(range(len(sizes))) and time.monotonic() - t0 < 2.0
