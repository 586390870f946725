"""The robot as an MQTT subscriber: decode -> order guard -> controller, and a control loop -> bus.

Every payload goes through `device.protocol.decode` (schema, types, ranges, topic/device
match) and `SequenceGuard` (order). Anything rejected is counted by reason and never
reaches the controller, so never a servo. The control loop runs on its own thread at
`control_hz`, independent of message arrival: when frames stop it keeps ticking, and the
watchdog takes the joints to neutral. Its clock is the wall clock (`time.time`), the one the
device stamps `t_capture` with (see controller.py, beat lead).
"""
from __future__ import annotations

import collections
import logging
import ssl
import threading
import time

from device import protocol
from subscribers.robot.config import RobotConfig
from subscribers.robot.controller import Controller
from subscribers.robot.drivers import Bus

log = logging.getLogger(__name__)
REJECT_REASONS = ("malformed", "wrong_version", "out_of_range", "out_of_order", "wrong_topic")


def classify(error: protocol.ProtocolError) -> str:
    """The counter a rejected message goes to, from the decoder's message (which names the field)."""
    text = str(error)
    if "field 'v'" in text or "'version'" in text:
        return "wrong_version"
    if "outside [" in text or "in [-1, 1]" in text or "not finite" in text or "non-finite" in text:
        return "out_of_range"
    if "topic" in text:
        return "wrong_topic"
    return "malformed"


class Follower:
    """Follows one device's pose stream and drives a servo bus (context manager)."""

    def __init__(self, cfg: RobotConfig, bus: Bus, device_id: str, *, clock=time.time):
        protocol.topic(device_id, "pose")  # validates the id
        self.cfg, self.bus, self.device_id, self.clock = cfg, bus, device_id, clock
        self.controller = Controller(cfg)
        self.guard = protocol.SequenceGuard()
        self.counts = collections.Counter({"accepted": 0, **{r: 0 for r in REJECT_REASONS}})
        self.last_error = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None
        self.ticks = 0

    # --- messages -----------------------------------------------------------

    def handle(self, payload: bytes, topic_name: str, now: float | None = None) -> bool:
        """One MQTT message; True if it was accepted."""
        now = self.clock() if now is None else now
        try:
            msg = protocol.decode(payload, topic_name)
        except protocol.ProtocolError as e:
            reason = classify(e)
            with self._lock:
                self.counts[reason] += 1
                self.last_error = str(e)
            log.debug("rejected (%s) on %s: %s", reason, topic_name, e)
            return False
        if msg["type"] not in ("pose", "status"):
            return False
        with self._lock:
            if not self.guard.accept(msg):
                self.counts["out_of_order"] += 1
                return False
            self.counts["accepted"] += 1
            if msg["type"] == "pose":
                self.controller.on_frame(msg, now)
            else:
                self.controller.on_status(msg, now)
        return True

    @property
    def rejected(self) -> int:
        return sum(self.counts[r] for r in REJECT_REASONS)

    # --- the control loop ---------------------------------------------------

    def tick(self, now: float | None = None):
        now = self.clock() if now is None else now
        with self._lock:
            angles = self.controller.tick(now)
        self.bus.write(self.cfg.to_servo(angles), now)
        self.ticks += 1
        return angles

    def _run(self):
        period = 1.0 / self.cfg.control_hz
        next_t = self.clock()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bus hiccup must not kill the loop that can bring the robot to rest
                log.exception("servo bus write failed")
            next_t += period
            delay = next_t - self.clock()
            if delay < -period:  # fell behind (overloaded machine): skip, do not burst
                next_t = self.clock()
                delay = 0
            self._stop.wait(max(0.0, delay))

    # --- lifecycle ----------------------------------------------------------

    def connect(self, host: str, port: int, *, user: str | None = None, password: str | None = None,
                transport: str = "tcp", cafile=None, client_id: str = ""):
        """Subscribe to the device's pose and status topics (reconnects on its own)."""
        import paho.mqtt.client as mqtt

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                        transport="websockets" if transport == "websockets" else "tcp")
        if user:
            c.username_pw_set(user, password)
        if transport == "tls":
            c.tls_set(ca_certs=str(cafile) if cafile else None, cert_reqs=ssl.CERT_REQUIRED)
        topics = [(protocol.topic(self.device_id, k), 0 if k == "pose" else 1) for k in ("pose", "status")]
        connected = threading.Event()

        def on_connect(client, userdata, flags, reason_code, properties):
            if reason_code.is_failure:
                log.error("broker %s:%s refused the robot: %s", host, port, reason_code)
                return
            client.subscribe(topics)
            connected.set()
            log.info("following %s on %s:%s", self.device_id, host, port)

        c.on_connect = on_connect
        c.on_message = lambda client, userdata, m: self.handle(m.payload, m.topic)
        c.reconnect_delay_set(0.5, 5)
        c.connect_async(host, port, keepalive=15)
        c.loop_start()
        self._client = c
        return connected

    def start(self):
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="robot-control", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
