"""device.publish against a real Mosquitto (broker.launcher): poses, beats, status + last will,
commands, TLS, MQTT 3.1.1, and a broker that goes away and comes back."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from broker.launcher import Broker
from device import protocol
from device.publish import Publisher

DEV = "pi1"
BEAT = {"bpm": 120.0, "phase": 0.25, "bar_phase": 0.5, "meter": 4, "onset": 0.3, "is_beat": False,
        "next_beat_in": 0.2}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Sink:
    """A subscriber that reconnects fast and decodes everything it gets with protocol.decode."""

    def __init__(self, broker: Broker, user: str = "admin", topic: str = "edgedance/v1/#"):
        self.msgs: list[tuple[str, dict, bool, float]] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, broker.credentials[user])
        self.c.reconnect_delay_set(0.05, 0.1)
        self.topic = topic

        def on_connect(c, u, f, rc, p):
            if not rc.is_failure:
                c.subscribe(self.topic, qos=1)

        def on_subscribe(c, u, mid, rcs, p):
            self.subscribed.set()

        def on_disconnect(c, u, f, rc, p):
            self.subscribed.clear()

        def on_message(c, u, m):
            try:
                d = protocol.decode(m.payload, m.topic)
            except protocol.ProtocolError as e:
                self.errors.append(f"{m.topic}: {e}")
                return
            with self.lock:
                self.msgs.append((m.topic.rsplit("/", 1)[1], d, bool(m.retain), time.time()))

        self.c.on_connect, self.c.on_subscribe, self.c.on_message = on_connect, on_subscribe, on_message
        self.c.on_disconnect = on_disconnect
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert self.subscribed.wait(5), "the test subscriber did not subscribe"

    def of(self, kind: str) -> list[dict]:
        with self.lock:
            return [d for k, d, _, _ in self.msgs if k == kind]

    def wait_for(self, pred, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(0.02)
        return pred()

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def _pub(b: Broker, **kw) -> Publisher:
    kw.setdefault("username", f"device-{DEV}")
    kw.setdefault("password", b.credentials[f"device-{DEV}"])
    return Publisher(DEV, b.host, kw.pop("port", b.port), **kw)


def _kp(i: int) -> np.ndarray:
    return np.full((14, 2), (i % 100) / 100.0, np.float32)


@pytest.fixture
def broker(tmp_path):
    with Broker(tmp_path / "broker", devices=(DEV,), websockets=False) as b:
        yield b


@pytest.mark.parametrize("fmt", ["json", "binary"])
def test_poses_arrive_schema_valid_and_sequence_complete(broker, fmt):
    sink = Sink(broker)
    try:
        with _pub(broker, fmt=fmt, status_info={"bundle": "tiny", "fps": 25.0}) as pub:
            assert pub.wait_connected(5), pub.last_error
            for i in range(100):
                pub.pose(frame=i, t_audio=(i + 1) * 0.04, t_capture=time.time(), fps=25.0, kp=_kp(i), heading=0.1,
                         beat=BEAT)
            pub.beat(frame=7, t_audio=0.32, t_capture=time.time(), bpm=120, meter=4, beat_in_bar=1,
                     next_beat_in=0.5, beat_index=0)
            pub.metrics({"frames": 100})
            assert sink.wait_for(lambda: len(sink.of("pose")) == 100 and sink.of("beat") and sink.of("metrics"))
        assert sink.wait_for(lambda: any(d["state"] == "stopped" for d in sink.of("status")))
    finally:
        sink.close()
    assert not sink.errors
    poses = sink.of("pose")
    assert [p["seq"] for p in poses] == list(range(100))
    tol = 1e-6 if fmt == "json" else 1e-4  # JSON: 6 decimals; binary: int16 steps of 1/32767
    assert all(abs(c - (p["seq"] % 100) / 100) < tol for p in poses for pair in p["kp"] for c in pair)
    assert protocol.SequenceGuard().accept(poses[0])
    states = [d["state"] for d in sink.of("status")]
    assert states[0] == "online" and states[-1] == "stopped"
    assert sink.of("status")[0]["bundle"] == "tiny" and sink.of("status")[0]["format"] == fmt


def test_status_is_retained_and_last_will_is_offline(broker, tmp_path):
    # a device process killed with SIGKILL: the broker publishes its will, retained
    script = (f"import sys, time; sys.path.insert(0, {REPO!r})\n"
              "from device.publish import Publisher\n"
              f"p = Publisher({DEV!r}, {broker.host!r}, {broker.port}, username='device-{DEV}', "
              f"password={broker.credentials['device-' + DEV]!r}).start()\n"
              "assert p.wait_connected(5); print('up', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        time.sleep(0.3)
        late = Sink(broker)  # joins after the status was sent: gets it retained
        assert late.wait_for(lambda: late.of("status"))
        assert late.of("status")[0]["state"] == "online" and late.msgs[0][2], "status not retained"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        assert late.wait_for(lambda: any(d["state"] == "offline" for d in late.of("status")))
        last = late.of("status")[-1]
        assert last["reason"] == "lost connection" and last["seq"] == 0
        late.close()
        again = Sink(broker)
        assert again.wait_for(lambda: again.of("status"))
        assert again.of("status")[-1]["state"] == "offline"
        again.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_commands_reach_the_callback_and_bad_ones_are_counted(broker):
    got = []
    with _pub(broker, on_command=lambda cmd, args: got.append((cmd, args))) as pub:
        assert pub.wait_connected(5)
        time.sleep(0.2)  # the cmd subscription
        admin = broker.client("admin")
        topic = protocol.topic(DEV, "cmd")

        def cmd(name, **args):
            m = {"v": 1, "type": "cmd", "device": DEV, "seq": len(got), "t": time.time(), "cmd": name, "args": args}
            admin.publish(topic, json.dumps(m), qos=1).wait_for_publish(2)

        cmd("pause")
        cmd("latency", ms=80)
        admin.publish(topic, b'{"v": 1, "type": "cmd", "cmd": "dance-faster"}', qos=1).wait_for_publish(2)
        cmd("select_bundle", path="/tmp/x")
        end = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < end:
            time.sleep(0.02)
    assert got == [("pause", {}), ("latency", {"ms": 80}), ("select_bundle", {"path": "/tmp/x"})]
    assert pub.stats["bad_commands"] == 1 and pub.stats["commands"] == 3


def test_tls_and_mqtt311(broker):
    sink = Sink(broker)
    try:
        with _pub(broker, tls=True, cafile=str(broker.cafile), port=broker.tls_port) as pub:
            assert pub.wait_connected(5), pub.last_error
            pub.pose(frame=0, t_audio=0.04, t_capture=time.time(), fps=25.0, kp=_kp(1), heading=0.0, beat=BEAT)
            assert sink.wait_for(lambda: len(sink.of("pose")) == 1)
        with _pub(broker, protocol_version="3.1.1") as pub:
            assert pub.wait_connected(5), pub.last_error
            assert pub._client.protocol == mqtt.MQTTv311
            pub.pose(frame=0, t_audio=0.04, t_capture=time.time(), fps=25.0, kp=_kp(2), heading=0.0, beat=BEAT)
            assert sink.wait_for(lambda: len(sink.of("pose")) == 2)
    finally:
        sink.close()


def test_wrong_password_retries_without_raising(broker):
    with _pub(broker, password="wrong", reconnect_min_s=0.1, reconnect_max_s=0.2) as pub:
        assert not pub.wait_connected(1.0)
        pub.pose(frame=0, t_audio=0.04, t_capture=time.time(), fps=25.0, kp=_kp(0), heading=0.0, beat=BEAT)
        assert "refused" in pub.last_error and pub.stats["refused"] >= 2 and pub.queued == 1


def test_falls_back_to_mqtt311_when_the_broker_refuses_v5(broker):
    """A listener that answers an MQTT 5 CONNECT the way a 3.1.1-only broker does (CONNACK code 1,
    then close) and passes every later connection through to the real Mosquitto."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    stop = threading.Event()
    seen = []

    def pipe(a, b):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            first = conn.recv(65536)
            level = first[first.index(b"MQTT") + 4] if b"MQTT" in first else 0
            seen.append(level)
            if level == 5:
                conn.sendall(bytes([0x20, 0x02, 0x00, 0x01]))
                conn.close()
                continue
            up = socket.create_connection((broker.host, broker.port))
            up.sendall(first)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        with _pub(broker, port=port, reconnect_min_s=0.1) as pub:
            assert pub.wait_connected(5), pub.last_error
            assert pub.protocol_version == "3.1.1"
    finally:
        stop.set()
        th.join(2)
        srv.close()
    assert seen[0] == 5 and 4 in seen


def test_broker_outage_loses_no_beats_and_drops_stale_poses(tmp_path):
    """The broker stops for ~5 s mid-stream and comes back on the same port: no exception,
    every beat and the newest status of the outage arrive after the reconnect, stale poses don't."""
    work = tmp_path / "broker"
    b = Broker(work, devices=(DEV,), tls=False, websockets=False).start()
    port = b.port
    sink = Sink(b)
    pub = _pub(b, reconnect_min_s=0.5, reconnect_max_s=1.0, outbox_pose_frames=25, outbox_pose_max_age_s=1.0)
    pub.start()
    try:
        assert pub.wait_connected(5)
        frame = beat = 0
        t_stop = t_restart = None
        t0 = time.monotonic()
        while time.monotonic() - t0 < 9.0:  # 25 fps, a beat every 0.5 s
            el = time.monotonic() - t0
            if t_stop is None and el > 1.5:
                b.stop()
                t_stop = time.time()
            if t_restart is None and el > 6.5:
                b = Broker(work, devices=(DEV,), tls=False, websockets=False, port=port).start()
                t_restart = time.time()
            pub.pose(frame=frame, t_audio=(frame + 1) / 25, t_capture=time.time(), fps=25.0, kp=_kp(frame),
                     heading=0.0, beat=BEAT)
            if frame % 12 == 0:
                pub.beat(frame=frame, t_audio=(frame + 1) / 25, t_capture=time.time(), bpm=120, meter=4,
                         beat_in_bar=beat % 4 + 1, next_beat_in=0.5, beat_index=beat)
                beat += 1
            if frame == 100:
                pub.status("paused", reason="outage test")
            frame += 1
            time.sleep(0.04)
        assert sink.wait_for(lambda: len(sink.of("beat")) == beat, timeout=10), \
            f"{len(sink.of('beat'))} of {beat} beats arrived"
        assert [m["beat_index"] for m in sink.of("beat")] == list(range(beat))
        assert any(d["state"] == "paused" for d in sink.of("status"))
        poses = [d for k, d, _, t in sink.msgs if k == "pose"]
        outage = [p for p in poses if t_stop + 0.1 < p["t"] < t_restart - 1.5]
        assert not outage, f"{len(outage)} stale pose frames from the outage were delivered"
        assert pub.stats["dropped_pose"] > 50 and pub.stats["connects"] >= 2
        assert poses[-1]["seq"] == frame - 1
        assert not sink.errors
    finally:
        pub.close()
        sink.close()
        b.stop()
