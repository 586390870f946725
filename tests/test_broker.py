"""The launcher, the generated configuration, the CLI and the bridge example, with a real Mosquitto."""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from broker import Broker, BrokerError, config
from broker.launcher import free_port, mosquitto_path

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_broker_starts_serves_and_stops(tmp_path):
    with Broker(tmp_path, devices=("pi1", "pi2")) as b:
        pid = b.pid
        assert b.running and _alive(pid)
        assert b.host == "127.0.0.1"
        assert len({b.port, b.tls_port, b.ws_port}) == 3
        assert set(b.credentials) == {"device-pi1", "device-pi2", "robot", "display", "admin", "worker"}
        assert len(set(b.credentials.values())) == 6 and all(len(p) >= 20 for p in b.credentials.values())
        got = threading.Event()
        robot = b.client("robot")
        robot.on_message = lambda c, u, m: got.set()
        robot.subscribe("edgedance/v1/pi1/pose", qos=0)
        time.sleep(0.1)
        dev = b.client("device-pi1")
        dev.publish("edgedance/v1/pi1/pose", b"{}", qos=1).wait_for_publish(5)
        assert got.wait(5), "a message from the device did not reach the robot"
    assert not b.running and not _alive(pid), "mosquitto still runs after the context exited"
    assert not robot.is_connected() and not dev.is_connected()


def test_generated_files(tmp_path):
    with Broker(tmp_path, devices=("pi1",)) as b:
        conf = b.conf.read_text()
        for line in ("allow_anonymous false", "persistence false", "set_tcp_nodelay true",
                     "per_listener_settings false", f"listener {b.port} 127.0.0.1",
                     f"listener {b.ws_port} 127.0.0.1", "protocol websockets", f"cafile {b.cafile}"):
            assert line in conf.splitlines(), f"{line!r} missing from {b.conf}"
        assert re.search(r"^max_queued_messages \d+$", conf, re.M)
        passwd = (tmp_path / "passwd").read_text()
        for user, pw in b.credentials.items():
            assert f"{user}:$7$" in passwd, f"{user} is not hashed by mosquitto_passwd"
            assert pw not in passwd
        assert (tmp_path / "passwd").stat().st_mode & 0o077 == 0
        assert (tmp_path / "credentials.json").stat().st_mode & 0o077 == 0
        assert json.loads((tmp_path / "credentials.json").read_text()) == b.credentials
        out = subprocess.run(["openssl", "verify", "-CAfile", str(b.cafile), str(tmp_path / "server.crt")],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_without_tls_and_websockets(tmp_path):
    with Broker(tmp_path, tls=False, websockets=False) as b:
        assert b.tls_port is None and b.ws_port is None and b.cafile is None
        listeners = [l for l in b.conf.read_text().splitlines() if l.startswith("listener ")]
        assert listeners == [f"listener {b.port} 127.0.0.1"]
        b.client("admin")
        with pytest.raises(BrokerError, match="tls listener is disabled"):
            b.client("admin", transport="tls")


def test_credentials_survive_a_restart(tmp_path):
    with Broker(tmp_path) as b:
        first = dict(b.credentials)
    with Broker(tmp_path, devices=("pi1", "pi9")) as b:
        assert b.credentials["robot"] == first["robot"]
        assert "device-pi9" in b.credentials
        b.client("device-pi9")
        b.client("robot")


def test_bad_device_id_is_a_clear_error(tmp_path):
    with pytest.raises(config.BrokerConfigError, match="device id 'pi/1'"):
        Broker(tmp_path, devices=("pi/1",)).start()


def test_broken_config_names_the_log(tmp_path):
    with pytest.raises(BrokerError, match="mosquitto exited") as e:
        Broker(tmp_path, extra_conf="no_such_option 1").start()
    assert "mosquitto.log" in str(e.value)


def test_cli_run_prints_ports_and_stops_on_ctrl_c(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "broker", "run", "--dir", str(tmp_path), "--devices", "pi1,pi2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any(l.startswith("Ctrl-C") for l in lines):
            line = proc.stdout.readline()
            assert line, f"the CLI ended early: {proc.stderr.read()}"
            lines.append(line)
        text = "".join(lines)
        port = int(re.search(r"mqtt\s+127\.0\.0\.1:(\d+)", text).group(1))
        pid = int(re.search(r"pid (\d+)", text).group(1))
        cred_file = pathlib.Path(re.search(r"credentials (\S+)", text).group(1))
        creds = json.loads(cred_file.read_text())
        assert set(creds) >= {"device-pi1", "device-pi2", "admin"}
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.username_pw_set("admin", creds["admin"])
        assert c.connect("127.0.0.1", port) == 0
        c.disconnect()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert not _alive(pid), "Ctrl-C left mosquitto running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_help():
    for args in (["--help"], ["run", "--help"], ["files", "--help"]):
        out = subprocess.run([sys.executable, "-m", "broker", *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0 and "usage" in out.stdout


# --- the bridge example: edge -> cloud ------------------------------------------------

def _bridge_for_test(cloud_port: int, admin_password: str) -> str:
    """broker/bridge.example.conf pointed at a local plain 'cloud' broker."""
    out = []
    for line in (ROOT / "broker" / "bridge.example.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key == "address":
            line = f"address 127.0.0.1:{cloud_port}"
        elif key in ("bridge_cafile", "bridge_insecure", "bridge_tls_version"):
            continue  # the test's cloud broker has no TLS
        elif key == "local_password":
            line = f"local_password {admin_password}"
        out.append(line)
    return "\n".join(out)


@pytest.fixture
def cloud(tmp_path):
    port = free_port()
    conf = tmp_path / "cloud.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen([mosquitto_path(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            try:
                c.connect("127.0.0.1", port)
                break
            except OSError:
                assert time.monotonic() < deadline, "the cloud broker did not start"
                time.sleep(0.05)
        c.loop_start()
        yield port, c
        c.disconnect()
        c.loop_stop()
    finally:
        proc.terminate()
        proc.wait(5)


def test_bridge_example_forwards_status_up_and_commands_down(tmp_path, cloud):
    cloud_port, cloud_client = cloud
    edge_dir = tmp_path / "edge"
    creds = config.prepare(edge_dir, devices=("pi1",), port=1)  # credentials first, for local_password
    got, cond = [], threading.Condition()

    def on_message(c, u, m):
        with cond:
            got.append((m.topic, m.payload))
            cond.notify_all()

    cloud_client.on_message = on_message
    cloud_client.subscribe("sites/#", qos=1)
    with Broker(edge_dir, devices=("pi1",), tls=False, websockets=False,
                extra_conf=_bridge_for_test(cloud_port, creds.credentials["admin"])) as edge:
        with cond:
            assert cond.wait_for(lambda: ("sites/livingroom/bridge/state", b"1") in got, 10), \
                f"the bridge did not connect; edge log:\n{edge.log_tail()}"
        dev = edge.client("device-pi1")
        cmds = []
        dev.on_message = lambda c, u, m: cmds.append(m.payload)
        dev.subscribe("edgedance/v1/pi1/cmd", qos=1)
        time.sleep(0.2)
        dev.publish("edgedance/v1/pi1/pose", b"pose-not-forwarded", qos=1).wait_for_publish(5)
        dev.publish("edgedance/v1/pi1/status", b"status-up", qos=1).wait_for_publish(5)
        with cond:
            assert cond.wait_for(lambda: ("sites/livingroom/edgedance/v1/pi1/status", b"status-up") in got, 10)
        assert not any(p == b"pose-not-forwarded" for _, p in got), "pose frames must stay on the edge by default"
        cloud_client.publish("sites/livingroom/edgedance/v1/pi1/cmd", b"cmd-down", qos=1)
        deadline = time.monotonic() + 10
        while b"cmd-down" not in cmds and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b"cmd-down" in cmds, f"the cloud's command did not reach the device; edge log:\n{edge.log_tail()}"
