"""Start and stop a real Mosquitto with the project's configuration.

    with Broker(tmp_path, devices=("pi1",)) as b:
        c = b.client("device-pi1")            # connected, network loop running
        c.publish("edgedance/v1/pi1/pose", payload)

Debian's `/usr/sbin/mosquitto` runs in the foreground with our generated
`mosquitto.conf`, on free ports of 127.0.0.1; its log goes to `workdir/mosquitto.log`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
import threading
import time

from broker import config

log = logging.getLogger(__name__)

MOSQUITTO = "/usr/sbin/mosquitto"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class BrokerError(RuntimeError):
    """Mosquitto could not be started, or a client could not connect (reason in the text)."""


def mosquitto_path() -> str:
    path = MOSQUITTO if os.path.exists(MOSQUITTO) else shutil.which("mosquitto")
    if not path:
        raise BrokerError("mosquitto not found: install Debian's 'mosquitto' package (scripts/setup.sh does)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """A Mosquitto on free ports with auth, ACL, TLS and WebSockets listeners (context manager).

    Attributes: `host`, `port`, `tls_port`, `ws_port` (None when disabled), `cafile`,
    `credentials` (user -> password), `credentials_file`, `conf`, `log_file`.
    """

    def __init__(self, workdir, devices=("pi1",), tls: bool = True, websockets: bool = True, *,
                 port: int | None = None, host: str = "127.0.0.1", extra_conf: str = ""):
        self.workdir = pathlib.Path(workdir)
        self.devices = tuple(devices)
        self.tls = tls
        self.websockets = websockets
        self.host = host
        self._fixed_port = port
        self.extra_conf = extra_conf  # appended to mosquitto.conf, e.g. a bridge section
        self.port = self.tls_port = self.ws_port = None
        self.cafile = None
        self.credentials: dict[str, str] = {}
        self.credentials_file = self.conf = None
        self.log_file = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen | None = None
        self._log_fh = None
        self._clients = []
        self._lock = threading.Lock()

    # --- lifecycle ----------------------------------------------------------

    def __enter__(self) -> "Broker":
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        exe = mosquitto_path()
        attempts = 1 if self._fixed_port else 3  # a free port can be taken between probe and bind
        for attempt in range(attempts):
            self.port = self._fixed_port or free_port(self.host)
            self.tls_port = free_port(self.host) if self.tls else None
            self.ws_port = free_port(self.host) if self.websockets else None
            layout = config.prepare(self.workdir, devices=self.devices, port=self.port, tls_port=self.tls_port,
                                    ws_port=self.ws_port, bind_address=self.host)
            self.conf, self.cafile = layout.conf, layout.cafile
            self.credentials, self.credentials_file = layout.credentials, layout.credentials_file
            if self.extra_conf:
                with open(self.conf, "a") as f:
                    f.write("\n# --- extra configuration given to Broker(extra_conf=...) ---\n" + self.extra_conf + "\n")
            self._log_fh = open(self.log_file, "ab")
            self._proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=self._log_fh,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)  # Ctrl-C reaches us, we stop it
            try:
                self._wait_ready()
                log.info("mosquitto pid %d on %s: mqtt %s, tls %s, ws %s", self._proc.pid, self.host,
                         self.port, self.tls_port, self.ws_port)
                return self
            except BrokerError:
                self.stop()
                if attempt == attempts - 1:
                    raise
                log.warning("mosquitto did not start (attempt %d), retrying on other ports", attempt + 1)

    def _wait_ready(self):
        ports = [p for p in (self.port, self.tls_port, self.ws_port) if p]
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with code {self._proc.returncode}; "
                                  f"log {self.log_file}:\n{self.log_tail()}")
            if all(_accepts(self.host, p) for p in ports):
                return
            time.sleep(0.05)
        raise BrokerError(f"mosquitto did not accept connections on {ports} within {START_TIMEOUT_S} s; "
                          f"log {self.log_file}:\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        return ""

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self):
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            with contextlib.suppress(Exception):
                c.disconnect()
            with contextlib.suppress(Exception):
                c.loop_stop()
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.warning("mosquitto pid %d ignored SIGTERM, killing it", self._proc.pid)
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    # --- clients ------------------------------------------------------------

    def client(self, user: str | None, protocol=None, *, password: str | None = None, transport: str = "tcp",
               cafile=None, client_id: str = "", timeout: float = 5.0, track: bool = True, **kw):
        """A paho client logged in as `user` (None: anonymous), connected, loop started.

        `transport`: "tcp" (plain port), "tls" (TLS port, trusting `cafile`, default the
        project CA) or "websockets". `password` overrides the generated one. Extra
        keywords go to `paho.mqtt.client.Client`. Raises BrokerError with the broker's
        reason when the connection is refused. Tracked clients are stopped on exit.
        """
        import paho.mqtt.client as mqtt

        protocol = mqtt.MQTTv5 if protocol is None else protocol
        ports = {"tcp": self.port, "tls": self.tls_port, "websockets": self.ws_port}
        if transport not in ports:
            raise ValueError(f"transport {transport!r}: use one of {sorted(ports)}")
        if not ports[transport]:
            raise BrokerError(f"the {transport} listener is disabled on this broker")
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                        transport="websockets" if transport == "websockets" else "tcp", **kw)
        if user is not None:
            c.username_pw_set(user, self.credentials.get(user, "") if password is None else password)
        if transport == "tls":
            c.tls_set(ca_certs=str(cafile or self.cafile), cert_reqs=ssl.CERT_REQUIRED)
        done = threading.Event()
        result = {}

        def on_connect(client, userdata, flags, reason_code, properties):
            result["rc"] = reason_code
            done.set()

        def on_disconnect(client, userdata, flags, reason_code, properties):
            result.setdefault("rc", reason_code)
            done.set()

        c.on_connect, c.on_disconnect = on_connect, on_disconnect
        try:
            c.connect(self.host, ports[transport], keepalive=30)
        except (OSError, ssl.SSLError) as e:
            raise BrokerError(f"{transport} connection to {self.host}:{ports[transport]} as {user!r} failed: {e}") from e
        c.loop_start()
        ok = done.wait(timeout)
        rc = result.get("rc")
        if not ok or rc is None or rc.is_failure:
            c.loop_stop()
            with contextlib.suppress(Exception):
                c.disconnect()
            why = "no CONNACK within %.1f s" % timeout if not ok else f"refused: {rc}"
            raise BrokerError(f"{transport} connection to {self.host}:{ports[transport]} as {user!r} {why}")
        c.on_connect = c.on_disconnect = None
        if track:
            with self._lock:
                self._clients.append(c)
        return c
