"""The allowed/denied table of docs/security.md, run row by row against a real Mosquitto."""
from __future__ import annotations

import pathlib
import socket
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from broker import Broker, BrokerError
from broker.config import make_ca

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "security.md"
TRANSPORTS = {"tcp": "tcp", "tls": "tls", "ws": "websockets", "tls-other-ca": "tls"}
WAIT_S = 5.0


def security_table() -> list[dict]:
    rows, header = [], None
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["case", "user"]:
            header = cells
        elif header and line.startswith("|") and not set(line) <= set("|- "):
            rows.append(dict(zip(header, cells)))
        elif header and not line.startswith("|"):
            break
    return rows


TABLE = security_table()


def test_table_is_complete():
    assert len(TABLE) >= 40, f"{DOC}: the security table was not found or lost rows"
    actions = {r["action"] for r in TABLE}
    assert actions == {"connect", "publish", "receive"}
    assert {r["expected"] for r in TABLE} == {"allowed", "denied"}


class Recorder:
    """Collects (topic, payload) of one client's incoming messages."""

    def __init__(self, client):
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.granted = {}
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.client = client

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.granted[mid] = reason_codes
            self.cond.notify_all()

    def subscribe(self, topic_filter: str):
        _, mid = self.client.subscribe(topic_filter, qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.granted, WAIT_S), f"no SUBACK for {topic_filter}"
        return self.granted[mid]

    def wait_for(self, payload: bytes) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: any(p == payload for _, p in self.messages), WAIT_S)

    def has(self, payload: bytes) -> bool:
        with self.cond:
            return any(p == payload for _, p in self.messages)


def publish_acked(client, topic: str, payload: bytes):
    """Publish QoS 1 and return the PUBACK reason code."""
    result = {}
    done = threading.Event()

    def on_publish(c, userdata, mid, reason_code, properties):
        result[mid] = reason_code
        done.set()

    client.on_publish = on_publish
    info = client.publish(topic, payload, qos=1)
    assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish to {topic} failed locally: {info.rc}"
    info.wait_for_publish(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while info.mid not in result and time.monotonic() < deadline:
        done.wait(0.05)
    client.on_publish = None
    assert info.mid in result, f"no PUBACK for {topic}"
    return result[info.mid]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker"), devices=("pi1", "pi2")) as b:
        yield b


@pytest.fixture(scope="module")
def clients(broker):
    cache = {}

    def get(user: str, via: str = "tcp"):
        key = (user, via)
        if key not in cache:
            cache[key] = broker.client(user, transport=TRANSPORTS[via], client_id=f"{user}-{via}-{uuid.uuid4().hex[:6]}")
        return cache[key]
    return get


@pytest.fixture(scope="module")
def spy(clients):
    rec = Recorder(clients("admin", "tcp"))
    rec.subscribe("edgedance/v1/#")
    return rec


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return make_ca(tmp_path_factory.mktemp("other-ca"), subject="/CN=not the edgedance CA")[0]


def _writer_for(topic: str) -> str:
    device, kind = topic.split("/")[2:4]
    return "admin" if kind == "cmd" else f"device-{device}"


def _marker_for(user: str) -> tuple[str, str]:
    """(writer, topic) of a message `user` may read: sent after the message under test."""
    if user.startswith("device-"):
        return "admin", f"edgedance/v1/{user[len('device-'):]}/cmd"
    if user == "worker":
        return "device-pi2", "edgedance/v1/pi2/features"
    return "device-pi2", "edgedance/v1/pi2/metrics"


@pytest.mark.parametrize("row", [r for r in TABLE if r["action"] == "connect"], ids=lambda r: r["case"])
def test_connect(row, broker, other_ca):
    user, _, password = row["user"].partition(":")
    user = None if user == "anonymous" else user
    cafile = other_ca if row["via"] == "tls-other-ca" else None
    try:
        c = broker.client(user, password=password or None, transport=TRANSPORTS[row["via"]], cafile=cafile,
                          track=False)
    except BrokerError as e:
        outcome, why = "denied", str(e)
    else:
        outcome, why = "allowed", "connected"
        c.disconnect()
        c.loop_stop()
    assert outcome == row["expected"], f"{row['case']}: {row['user']} via {row['via']}: {why}"


@pytest.mark.parametrize("row", [r for r in TABLE if r["action"] == "publish"], ids=lambda r: r["case"])
def test_publish(row, clients, spy):
    payload = f"{row['case']}-{uuid.uuid4().hex}".encode()
    rc = publish_acked(clients(row["user"], row["via"]), row["topic"], payload)
    marker = f"marker-{uuid.uuid4().hex}".encode()
    assert publish_acked(clients("device-pi2"), "edgedance/v1/pi2/metrics", marker) == 0
    assert spy.wait_for(marker), "the marker message did not arrive: the spy subscription is broken"
    delivered = spy.has(payload)
    if row["expected"] == "allowed":
        assert rc == 0 and delivered, f"{row['case']}: PUBACK {rc}, delivered={delivered}"
    else:
        assert rc.is_failure and rc.value == 0x87 and not delivered, f"{row['case']}: PUBACK {rc}, delivered={delivered}"


@pytest.mark.parametrize("row", [r for r in TABLE if r["action"] == "receive"], ids=lambda r: r["case"])
def test_receive(row, broker, clients):
    # A fresh client per row, so messages of earlier rows cannot confuse this one.
    sub = Recorder(broker.client(row["user"], transport=TRANSPORTS[row["via"]]))
    writer, marker_topic = _marker_for(row["user"])
    sub.subscribe(row["topic"])
    sub.subscribe(marker_topic)
    payload = f"{row['case']}-{uuid.uuid4().hex}".encode()
    assert publish_acked(clients(_writer_for(row["topic"])), row["topic"], payload) == 0
    marker = f"marker-{uuid.uuid4().hex}".encode()
    assert publish_acked(clients(writer), marker_topic, marker) == 0
    assert sub.wait_for(marker), f"{row['user']} did not receive its marker on {marker_topic}"
    outcome = "allowed" if sub.has(payload) else "denied"
    sub.client.disconnect()
    assert outcome == row["expected"], f"{row['case']}: {row['user']} receiving {row['topic']}"


def test_worker_shared_subscription(broker, clients):
    workers = [Recorder(broker.client("worker")) for _ in range(2)]
    for w in workers:
        w.subscribe("$share/edgedance-workers/edgedance/v1/+/features")
    payloads = [f"feat-{i}-{uuid.uuid4().hex}".encode() for i in range(6)]
    for p in payloads:
        assert publish_acked(clients("device-pi1"), "edgedance/v1/pi1/features", p) == 0
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and sum(len(w.messages) for w in workers) < len(payloads):
        time.sleep(0.02)
    got = sorted(p for w in workers for _, p in w.messages)
    assert got == sorted(payloads), "each feature frame must reach exactly one worker of the group"


def _drop_connection(client):
    """Cut the TCP connection without an MQTT DISCONNECT, as a crashed or unplugged device does."""
    client.loop_stop()
    client.socket().shutdown(socket.SHUT_RDWR)
    client.socket().close()


def test_last_will_reaches_followers(broker, clients):
    robot = Recorder(clients("robot"))
    robot.subscribe("edgedance/v1/pi1/status")
    will = f'{{"state":"offline","id":"{uuid.uuid4().hex}"}}'.encode()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.username_pw_set("device-pi1", broker.credentials["device-pi1"])
    c.will_set("edgedance/v1/pi1/status", will, qos=1, retain=True)
    c.connect(broker.host, broker.port, keepalive=30)
    c.loop_start()
    time.sleep(0.2)
    assert c.is_connected()
    _drop_connection(c)
    assert robot.wait_for(will), "the device's last will did not reach the robot"


def test_will_on_foreign_topic_is_dropped(broker, clients):
    admin = Recorder(broker.client("admin"))
    admin.subscribe("edgedance/v1/pi2/status")
    will = f"forged-{uuid.uuid4().hex}".encode()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.username_pw_set("device-pi1", broker.credentials["device-pi1"])
    c.will_set("edgedance/v1/pi2/status", will, qos=1, retain=True)
    connected = threading.Event()
    c.on_connect = lambda cl, u, f, rc, p: connected.set() if not rc.is_failure else None
    c.connect(broker.host, broker.port, keepalive=30)
    c.loop_start()
    if connected.wait(2.0):
        _drop_connection(c)
    else:
        c.loop_stop()
    marker = f"marker-{uuid.uuid4().hex}".encode()
    time.sleep(0.2)  # the broker publishes a will when it notices the closed socket
    assert publish_acked(clients("device-pi2"), "edgedance/v1/pi2/status", marker) == 0
    assert admin.wait_for(marker)
    assert not admin.has(will), "device-pi1 published a will on device pi2's status topic"
