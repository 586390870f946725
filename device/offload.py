"""Edge offload: boards too weak for the model publish features; workers publish poses.

The device side (`FeatureWindow`) turns each new feature frame into a `features`
message carrying the last `context` frames too. Workers (`Worker`, `python -m device
worker`) share the load through the MQTT 5 shared subscription
`$share/edgedance-workers/edgedance/v1/+/features`. Mosquitto hands shared messages out
round-robin, so a worker keeps no per-device state: it resets the model, replays the
context rows and publishes the new rows' poses (docs/protocol.md, "features").
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import numpy as np

from device import protocol
from device.features import FeatureFrames

log = logging.getLogger(__name__)

SHARE_GROUP = "edgedance-workers"
SHARED_TOPIC = f"$share/{SHARE_GROUP}/{protocol.TOPIC_ROOT}/+/features"
DEFAULT_CONTEXT = 50  # frames replayed before each new one: 2 s at 25 fps
ROUND = 4  # decimals kept per feature value on the wire (features are in [-1, 1])


def beat_dict(ff: FeatureFrames, i: int) -> dict:
    """The `beat` object of docs/protocol.md for frame i of a FeatureFrames."""
    return {"bpm": float(ff.bpm[i]), "phase": float(ff.phase[i]) % 1.0, "bar_phase": float(ff.bar_phase[i]) % 1.0,
            "meter": int(ff.meter[i]), "onset": max(0.0, float(ff.onset[i])), "is_beat": bool(ff.is_beat[i]),
            "next_beat_in": min(60.0, max(0.0, float(ff.next_beat_in[i])))}


class FeatureWindow:
    """Device side: feature frames in, `features` messages (dicts) out, one per frame."""

    def __init__(self, device_id: str, feature_hash: str, fps: float, context: int = DEFAULT_CONTEXT):
        assert 0 <= context < protocol.MAX_FEATURE_ROWS
        self.device_id, self.feature_hash, self.fps, self.context = device_id, feature_hash, fps, context
        self.rows: collections.deque = collections.deque(maxlen=context + 1)
        self.frame = -1

    def reset(self):
        self.rows.clear()
        self.frame = -1

    def messages(self, ff: FeatureFrames, t_capture: float) -> list[dict]:
        out = []
        for i in range(len(ff)):
            self.frame += 1
            self.rows.append([round(float(v), ROUND) for v in ff.x[i]])
            out.append({
                "v": protocol.SCHEMA_VERSION, "type": "features", "device": self.device_id, "seq": self.frame,
                "t": time.time(), "frame": self.frame, "t_audio": (self.frame + 1) / self.fps,
                "t_capture": t_capture, "fps": float(self.fps), "feature_hash": self.feature_hash,
                "beat": beat_dict(ff, i), "x": list(self.rows), "context": len(self.rows) - 1,
            })
        return out


class Worker:
    """One edge inference worker: shared subscription in, pose messages out."""

    def __init__(self, bundle, client_factory, *, fmt: str = "json"):
        self.bundle = bundle
        self.stepper = bundle.stepper()
        self.feature_hash = bundle.manifest["feature_hash"]
        self.fmt = fmt
        self.client_factory = client_factory
        self.handled = self.rejected = 0
        self.step_s = 0.0
        self._lock = threading.Lock()
        self._client = None

    def start(self):
        self._client = self.client_factory(self._on_message)
        self._client.subscribe(SHARED_TOPIC, qos=0)
        return self

    def stop(self):
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()
            self._client = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _on_message(self, client, userdata, m):
        try:
            msg = protocol.decode(m.payload, m.topic)
            if msg["feature_hash"] != self.feature_hash:
                raise protocol.ProtocolError(
                    f"features from {msg['device']!r} have feature hash {msg['feature_hash']}, "
                    f"this worker's bundle expects {self.feature_hash}")
            for kind, payload in self.handle(msg):
                client.publish(protocol.topic(msg["device"], kind), payload, qos=0)
        except protocol.ProtocolError as e:
            self.rejected += 1
            log.warning("rejected a features message on %s: %s", m.topic, e)

    def handle(self, msg: dict) -> list[tuple[str, bytes]]:
        """One features message -> the pose payloads of its new rows."""
        x = np.asarray(msg["x"], np.float32)  # (n, F)
        if x.shape[1] != self.bundle.n_features:
            raise protocol.ProtocolError(f"field 'x' has {x.shape[1]} features per frame, the bundle takes "
                                         f"{self.bundle.n_features}")
        t0 = time.perf_counter()
        with self._lock:  # paho calls back from one thread, but keep the stepper exclusive anyway
            poses, heads = self.stepper.run(x)
        self.step_s += time.perf_counter() - t0
        n, ctx = len(x), msg["context"]
        out = []
        for r in range(ctx, n):
            frame = msg["frame"] - (n - 1 - r)
            pm = protocol.pose_message(msg["device"], frame, time.time(), frame=frame,
                                       t_audio=max(0.0, msg["t_audio"] - (n - 1 - r) / msg["fps"]),
                                       t_capture=msg["t_capture"], fps=msg["fps"], kp=poses[r],
                                       heading=float(heads[r]), beat=msg["beat"])
            out.append(("pose", protocol.encode_binary(pm) if self.fmt == "binary" else protocol.encode_json(pm)))
        self.handled += 1
        return out


def paho_factory(host: str, port: int, user: str, password: str, *, tls_ca: str | None = None):
    """A client_factory for Worker: MQTT 5 connection with loop started."""
    import paho.mqtt.client as mqtt

    def make(on_message):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.username_pw_set(user, password)
        if tls_ca:
            c.tls_set(ca_certs=tls_ca)
        c.on_message = on_message
        c.reconnect_delay_set(0.5, 10)
        try:
            c.connect(host, port, keepalive=30)
        except OSError as e:
            raise RuntimeError(f"worker: cannot reach the broker at {host}:{port}: {e}") from e
        c.loop_start()
        return c
    return make
