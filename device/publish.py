"""The publish stage: pose frames, beats, status and metrics to MQTT (paho-mqtt 2.x).

The audio loop calls `Publisher.pose(...)`, `.beat(...)`, `.status(...)`, `.metrics(...)`;
none of them ever blocks on the network or raises because of it. paho's own network
thread (`loop_start`) connects, and reconnects with exponential backoff
(`mqtt.reconnect_min_s` doubling up to `mqtt.reconnect_max_s`).

Offline policy (the outbox, bounded):
- pose frames are live data: only the newest `outbox_pose_frames` are kept, and on
  reconnect those older than `outbox_pose_max_age_s` are dropped (default: 25 frames,
  1 s). Every dropped frame is counted in `stats["dropped_pose"]`.
- beat and metrics messages are kept in order up to `outbox_events` (default 2000, about
  15 minutes of beats at 130 BPM); past that the oldest go first (`stats["dropped_events"]`).
- status is one slot: the newest state is sent, retained, on every (re)connect.
After a reconnect the order is: status, events in order, fresh pose frames, then live.

MQTT 5 is used where the broker speaks it; `protocol = auto` falls back to 3.1.1 when the
broker refuses version 5. The last will is a retained `status` with state `offline`.
`cmd` messages (protocol.decode-validated) go to the `on_command(cmd, args)` callback,
called on paho's network thread: keep it short (queue the work).

Validation sits at the boundaries (received commands, configuration, status info); the
messages built here from the pipeline's numbers are not re-validated on the audio loop:
pose frames go through `protocol.PoseEncoder` (a template, no dict), beats through
`encode_json(check=False)`. The tests hold both to the schema, through a real Mosquitto.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import secrets
import socket
import ssl
import threading
import time
from typing import Callable

from device import protocol

log = logging.getLogger(__name__)

QOS = {"pose": 0, "beat": 1, "status": 1, "metrics": 0, "cmd": 1}
UNSUPPORTED_PROTOCOL = (1, 132)  # CONNACK: 3.1.1 "unacceptable protocol version", 5 "unsupported protocol version"
FLUSH_DELAY_S = 0.1  # after a CONNACK, paho re-sends in-flight QoS 1 messages first; the outbox follows


class PublishError(RuntimeError):
    """Bad publisher configuration (never raised for network trouble)."""


class Publisher:
    def __init__(self, device_id: str, host: str = "localhost", port: int = 1883, *,
                 username: str = "", password: str = "", tls: bool = False, cafile: str = "", certfile: str = "",
                 keyfile: str = "", tls_insecure: bool = False, protocol_version: str = "auto", fmt: str = "json",
                 keepalive_s: int = 30, reconnect_min_s: float = 0.5, reconnect_max_s: float = 10.0,
                 outbox_pose_frames: int = 25, outbox_pose_max_age_s: float = 1.0, outbox_events: int = 2000,
                 on_command: Callable[[str, dict], None] | None = None, status_info: dict | None = None,
                 client_id: str | None = None):
        protocol.topic(device_id, "pose")  # validates the id
        if fmt not in ("json", "binary"):
            raise PublishError(f"format {fmt!r}: use 'json' or 'binary'")
        if protocol_version not in ("auto", "5", "3.1.1"):
            raise PublishError(f"MQTT protocol {protocol_version!r}: use 'auto', '5' or '3.1.1'")
        self.device_id = device_id
        self.host, self.port = host, int(port)
        self.username, self.password = username, password
        self.tls, self.cafile, self.certfile, self.keyfile, self.tls_insecure = tls, cafile, certfile, keyfile, tls_insecure
        self.protocol_version = "5" if protocol_version in ("auto", "5") else "3.1.1"
        self._auto = protocol_version == "auto"
        self.fmt = fmt
        self.keepalive_s = keepalive_s
        self.reconnect = (reconnect_min_s, reconnect_max_s)
        self.pose_max_age_s = outbox_pose_max_age_s
        self.on_command = on_command
        self.boot = secrets.token_hex(4)
        self.client_id = client_id or f"edgedance-{device_id}-{self.boot}"
        self.topics = {k: protocol.topic(device_id, k) for k in protocol.KINDS}
        self._pose_encoder = protocol.PoseEncoder(device_id, fmt)
        self._seq = collections.Counter()
        self._lock = threading.RLock()
        self._online = False
        self._connected_evt = threading.Event()
        self._poses: collections.deque = collections.deque(maxlen=max(0, outbox_pose_frames))
        self._events: collections.deque = collections.deque()
        self._max_events = outbox_events
        self._status: dict = {"state": "online", "reason": ""}
        self._status_info = dict(status_info or {})
        self._client = None
        self._closing = False
        self.stats = collections.Counter()  # sent, queued, dropped_pose, dropped_events, connects, disconnects, ...
        self.last_error = ""

    @classmethod
    def from_settings(cls, s, on_command=None, status_info=None) -> "Publisher":
        m = s.mqtt
        return cls(s.device.id, m.host, m.port, username=m.username, password=s.mqtt_password(), tls=m.tls,
                   cafile=m.cafile, certfile=m.certfile, keyfile=m.keyfile, tls_insecure=m.tls_insecure,
                   protocol_version=m.protocol, fmt=s.device.format, keepalive_s=m.keepalive_s,
                   reconnect_min_s=m.reconnect_min_s, reconnect_max_s=m.reconnect_max_s,
                   outbox_pose_frames=m.outbox_pose_frames, outbox_pose_max_age_s=m.outbox_pose_max_age_s,
                   outbox_events=m.outbox_events, on_command=on_command, status_info=status_info)

    # --- lifecycle ------------------------------------------------------------

    def __enter__(self) -> "Publisher":
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def _make_client(self):
        import paho.mqtt.client as mqtt

        proto = mqtt.MQTTv5 if self.protocol_version == "5" else mqtt.MQTTv311
        kw = {} if proto == mqtt.MQTTv5 else {"clean_session": True}
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto, **kw)
        if self.username:
            c.username_pw_set(self.username, self.password or None)
        if self.tls:
            try:
                c.tls_set(ca_certs=self.cafile or None, certfile=self.certfile or None, keyfile=self.keyfile or None,
                          cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError) as e:
                raise PublishError(f"TLS set-up with cafile={self.cafile!r} certfile={self.certfile!r}: {e}") from e
            if self.tls_insecure:
                c.tls_insecure_set(True)
        will = self._status_payload("offline", reason="lost connection", seq=0)
        c.will_set(self.topics["status"], will, qos=1, retain=True)
        c.reconnect_delay_set(*self.reconnect)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        return c

    def start(self) -> "Publisher":
        """Begin connecting in the background; returns at once (see wait_connected)."""
        self._closing = False
        self._client = self._make_client()
        self._client.connect_async(self.host, self.port, keepalive=self.keepalive_s)
        self._client.loop_start()
        log.info("MQTT %s:%d as %r (MQTT %s%s), device %s", self.host, self.port, self.username or "anonymous",
                 self.protocol_version, ", TLS" if self.tls else "", self.device_id)
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self._connected_evt.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._online

    def close(self, state: str = "stopped", reason: str = "") -> None:
        """Publish the final status (retained), flush briefly, disconnect, stop paho's thread."""
        c = self._client
        if c is None:
            return
        with self._lock:
            self._status = {"state": state, "reason": reason}
            if self._online:
                info = c.publish(self.topics["status"], self._status_payload(state, reason=reason), qos=1, retain=True)
                with contextlib.suppress(Exception):
                    info.wait_for_publish(1.0)
            self._closing = True
        with contextlib.suppress(Exception):
            c.disconnect()
        c.loop_stop()
        self._client = None
        self._online = False

    # --- paho callbacks (network thread) --------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.last_error = f"connection refused: {reason_code}"
            self.stats["refused"] += 1
            value = getattr(reason_code, "value", None)
            if self._auto and self.protocol_version == "5" and value in UNSUPPORTED_PROTOCOL:
                log.warning("broker %s:%d refuses MQTT 5; falling back to 3.1.1", self.host, self.port)
                threading.Thread(target=self._fall_back, name="mqtt-fallback", daemon=True).start()
            else:
                log.warning("MQTT %s:%d: %s (retrying with backoff)", self.host, self.port, reason_code)
            return
        client.subscribe(self.topics["cmd"], qos=1)
        with contextlib.suppress(OSError, AttributeError):
            client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Paho re-sends the QoS 1 messages that were in flight when the link died right AFTER
        # this callback returns; flushing the outbox here would put newer beats ahead of them.
        # So the outbox is flushed a moment later from a timer, and until then new messages
        # keep going into the outbox: every receiver sees one ordered stream.
        if self.stats["connects"] == 0:  # the first connection: nothing in flight to re-send
            with self._lock:
                self._flush(client)
                self._online = True
        else:
            t = threading.Timer(FLUSH_DELAY_S, self._flush_when_ready, args=(client,))
            t.daemon = True
            t.start()
        self.stats["connects"] += 1
        self._connected_evt.set()
        log.info("MQTT connected to %s:%d (MQTT %s)", self.host, self.port, self.protocol_version)

    def _flush_when_ready(self, client):
        with self._lock:
            if self._client is not client or not client.is_connected():
                return  # lost again (or replaced): the next connect flushes
            self._flush(client)
            self._online = True

    def _fall_back(self):
        old = self._client
        with contextlib.suppress(Exception):
            old.disconnect()
        old.loop_stop()
        if self._closing:
            return
        self.protocol_version = "3.1.1"
        self.start()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self._lock:
            was = self._online
            self._online = False
        self._connected_evt.clear()
        if was:
            self.stats["disconnects"] += 1
            if not self._closing:
                log.warning("MQTT connection to %s:%d lost (%s); buffering, reconnecting with backoff",
                            self.host, self.port, reason_code)

    def _on_message(self, client, userdata, msg):
        try:
            m = protocol.decode(msg.payload, msg.topic)
            if m["type"] != "cmd":
                raise protocol.ProtocolError(f"expected a cmd message, got {m['type']!r}")
        except protocol.ProtocolError as e:
            self.stats["bad_commands"] += 1
            log.warning("ignored a bad command on %s: %s", msg.topic, e)
            return
        self.stats["commands"] += 1
        log.info("command %s %s", m["cmd"], m.get("args", {}))
        if self.on_command is not None:
            try:
                self.on_command(m["cmd"], m.get("args", {}))
            except Exception:  # a command must never take the network thread down
                self.stats["bad_commands"] += 1
                log.exception("command %s failed", m["cmd"])

    # --- the outbox -------------------------------------------------------------

    def _flush(self, client):
        """On (re)connect, under the lock: status, then events in order, then fresh poses."""
        st = self._status
        client.publish(self.topics["status"], self._status_payload(st["state"], reason=st["reason"]), qos=1, retain=True)
        self.stats["sent"] += 1
        while self._events:
            topic, payload, qos, _ = self._events.popleft()
            client.publish(topic, payload, qos=qos)
            self.stats["sent"] += 1
        now = time.monotonic()
        while self._poses:
            topic, payload, qos, t_made = self._poses.popleft()
            if now - t_made > self.pose_max_age_s:
                self.stats["dropped_pose"] += 1
                continue
            client.publish(topic, payload, qos=qos)
            self.stats["sent"] += 1

    def _send(self, kind: str, payload: bytes, *, retain: bool = False):
        topic, qos = self.topics[kind], QOS[kind]
        with self._lock:
            if self._online and self._client is not None:
                info = self._client.publish(topic, payload, qos=qos, retain=retain)
                if info.rc == 0 or qos > 0:  # QoS 1 stays in paho's session until acknowledged
                    self.stats["sent"] += 1
                    return
                self.stats["send_failed"] += 1
            self.stats["queued"] += 1
            if kind == "pose":
                if self._poses.maxlen == 0:
                    self.stats["dropped_pose"] += 1
                    return
                if len(self._poses) == self._poses.maxlen:
                    self.stats["dropped_pose"] += 1
                self._poses.append((topic, payload, qos, time.monotonic()))
            elif kind == "status":
                pass  # the status slot is sent on reconnect
            else:
                if len(self._events) >= self._max_events:
                    self._events.popleft()
                    self.stats["dropped_events"] += 1
                self._events.append((topic, payload, qos, time.monotonic()))

    @property
    def queued(self) -> int:
        return len(self._poses) + len(self._events)

    # --- messages -----------------------------------------------------------------

    def _next(self, kind: str) -> int:
        n = self._seq[kind]
        self._seq[kind] += 1
        return n

    def _status_payload(self, state: str, reason: str = "", seq: int | None = None) -> bytes:
        msg = {"v": protocol.SCHEMA_VERSION, "type": "status", "device": self.device_id,
               "seq": self._next("status") if seq is None else seq, "t": time.time(), "state": state,
               "boot": self.boot, "format": self.fmt, **self._status_info}
        if reason:
            msg["reason"] = reason
        return protocol.encode_json(msg)

    def pose(self, *, frame: int, t_audio: float, t_capture: float, fps: float, kp, heading: float,
             beat: dict) -> bytes:
        """One pose frame (kp (14, 2), keypoints clipped to [-1, 1]); returns the payload handed to MQTT.

        The hot path: protocol.PoseEncoder fills a template, no dict is built or validated."""
        payload = self._pose_encoder.encode(self._next("pose"), time.time(), frame=frame, t_audio=t_audio,
                                            t_capture=t_capture, fps=fps, kp=kp, heading=heading, beat=beat)
        self._send("pose", payload)
        return payload

    def beat(self, *, frame: int, t_audio: float, t_capture: float, bpm: float, meter: int, beat_in_bar: int,
             next_beat_in: float, beat_index: int) -> dict:
        msg = {"v": protocol.SCHEMA_VERSION, "type": "beat", "device": self.device_id, "seq": self._next("beat"),
               "t": time.time(), "frame": int(frame), "t_audio": float(t_audio), "t_capture": float(t_capture),
               "bpm": float(bpm), "meter": int(meter), "beat_in_bar": int(beat_in_bar),
               "next_beat_in": float(next_beat_in), "beat_index": int(beat_index)}
        self._send("beat", protocol.encode_json(msg, check=False))  # built here from numbers: tests check it
        return msg

    def status(self, state: str, reason: str = "", **info) -> None:
        """Set the device state (retained); sent now if online, else on reconnect."""
        if state not in protocol.STATES:
            raise PublishError(f"status state {state!r}: use one of {protocol.STATES}")
        with self._lock:
            self._status_info.update(info)
            self._status = {"state": state, "reason": reason}
            if self._online:
                self._send("status", self._status_payload(state, reason=reason), retain=True)

    def metrics(self, values: dict) -> dict:
        msg = {"v": protocol.SCHEMA_VERSION, "type": "metrics", "device": self.device_id,
               "seq": self._next("metrics"), "t": time.time(), **values}
        self._send("metrics", protocol.encode_json(msg))
        return msg
