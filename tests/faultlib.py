"""Fault-injection helpers shared by tests/test_faults.py and bench/faults.py.

Everything here drives real things: a real Mosquitto (broker.launcher.Broker), the device
as a real process through its CLI (`python -m device run`), real TCP sockets and a real
tmpfs. Nothing is mocked.

- `PartitionProxy`: a TCP proxy between the device and the broker that can *partition*
  the link: while partitioned it forwards nothing in either direction and answers nothing
  (bytes stay in the kernel's buffers, new connections are held without reaching the
  broker), like a cable pulled out of a switch: no FIN, no RST, the peers only find out by
  their own timeouts. `heal()` lets everything flow again.
- `Supervisor`: systemd's `Restart=on-failure` + `RestartSec=` for one process (systemd
  cannot run here): a process that dies by a signal or a non-zero exit is started again
  after `restart_sec`; a clean exit (0) is left alone.
- `Recorder`: a subscriber that records every message of one device with its arrival
  time, decoded by `device.protocol.decode`, and reconnects fast.
- `StalledSubscriber`: a client that subscribes to everything and then never reads its
  socket again.
- `tiny_tmpfs`: a small tmpfs mounted by the test (root only), filled to the last byte.
- `hostile_payloads`: the garbage tests/test_bad_input.py throws at the robot and the display.
- `scenario_*`: one fault each, start to end, returning what it measured (dict); used by
  tests/test_faults.py with short faults and by bench/faults.py with 30 s ones.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from device import protocol

log = logging.getLogger(__name__)
REPO = pathlib.Path(__file__).resolve().parents[1]
UNIT_GLOB = "deploy/*.service"
DEFAULT_RESTART_SEC = 2.0


# --- the partition -------------------------------------------------------------------

class PartitionProxy:
    """127.0.0.1:`port` -> `target`; `partition()` / `heal()` (context manager, own thread)."""

    def __init__(self, target_host: str, target_port: int, listen_port: int = 0):
        self.target = (target_host, target_port)
        self._listen_port = listen_port
        self.port: int | None = None
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = None  # asyncio.Event: set = traffic flows
        self._server = None
        self._writers: set = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.refusing = False  # new connections are closed at once (like a port with nothing listening)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, name="partition-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("partition proxy did not start")
        return self

    def __exit__(self, *exc):
        self.close()

    def _run(self):
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._shutdown())
        self._loop.close()

    async def _start(self):
        self._open = asyncio.Event()
        self._open.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self._listen_port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self):
        self._server.close()
        for w in list(self._writers):
            w.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, c_reader, c_writer):
        if self.refusing:
            c_writer.close()
            return
        self.connections += 1
        self._writers.add(c_writer)
        await self._open.wait()  # during a partition the connection never reaches the broker
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.close()
            self._writers.discard(c_writer)
            return
        self._writers.add(u_writer)
        await asyncio.gather(self._pipe(c_reader, u_writer), self._pipe(u_reader, c_writer),
                             return_exceptions=True)
        for w in (c_writer, u_writer):
            w.close()
            self._writers.discard(w)

    async def _pipe(self, reader, writer):
        try:
            while True:
                await self._open.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await self._open.wait()  # read before the cut: held, delivered after the heal
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()  # one side ended: end the other (a FIN, as TCP would pass on)

    def _call(self, fn):
        done = threading.Event()
        self._loop.call_soon_threadsafe(lambda: (fn(), done.set()))
        done.wait(5)

    def partition(self):
        self._call(self._open.clear)

    def heal(self):
        self._call(self._open.set)

    @property
    def partitioned(self) -> bool:
        return not self._open.is_set()

    def close(self):
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._open.set)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._thread = None


# --- the supervisor (systemd's restart policy) ------------------------------------------

def unit_restart_sec(default: float = DEFAULT_RESTART_SEC) -> tuple[float, str]:
    """RestartSec= of the device's systemd unit in deploy/ (and where it came from)."""
    for unit in sorted(REPO.glob(UNIT_GLOB)):
        m = re.search(r"^\s*RestartSec\s*=\s*([0-9.]+)\s*(ms|s)?\s*$", unit.read_text(), re.M)
        if m:
            v = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
            return v, str(unit.relative_to(REPO))
    return default, "default (no RestartSec in deploy/*.service)"


@dataclasses.dataclass
class Run:
    pid: int
    started: float  # time.time()
    ended: float | None = None
    returncode: int | None = None


class Supervisor:
    """Keeps `argv` running like systemd `Restart=on-failure`, `RestartSec=restart_sec`."""

    def __init__(self, argv: list[str], *, restart_sec: float, log_path: pathlib.Path, env: dict | None = None,
                 cwd=REPO):
        self.argv, self.restart_sec, self.log_path, self.env, self.cwd = argv, restart_sec, log_path, env, cwd
        self.runs: list[Run] = []
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._log = open(log_path, "ab")

    def _spawn(self):
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, cwd=self.cwd, start_new_session=True)
        self.runs.append(Run(self.proc.pid, time.time()))
        log.info("supervisor: started pid %d", self.proc.pid)

    def _watch(self):
        while not self._stop.is_set():
            rc = self.proc.wait()
            with self._lock:
                self.runs[-1].ended, self.runs[-1].returncode = time.time(), rc
                if self._stop.is_set() or rc == 0:  # on-failure: a clean exit is not restarted
                    return
            log.info("supervisor: pid %d ended with %s, restarting in %.1f s", self.proc.pid, rc, self.restart_sec)
            if self._stop.wait(self.restart_sec):
                return
            with self._lock:
                if not self._stop.is_set():
                    self._spawn()

    def __enter__(self):
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()
        return self

    def kill(self, sig=signal.SIGKILL) -> float:
        """Send `sig` to the current process; returns the time it was sent."""
        with self._lock:
            t = time.time()
            os.kill(self.proc.pid, sig)
        return t

    def __exit__(self, *exc):
        with self._lock:
            self._stop.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(5)
        self._log.close()


# --- subscribers ---------------------------------------------------------------------

@dataclasses.dataclass
class Received:
    t: float  # arrival, time.time()
    topic: str
    kind: str
    msg: dict | None  # decoded, None when rejected
    error: str = ""
    retained: bool = False


class Recorder:
    """Records every message on edgedance/v1/<device>/# (context manager); reconnects every 0.1-1 s."""

    def __init__(self, host: str, port: int, user: str, password: str, device: str = "pi1", name: str = "recorder"):
        import paho.mqtt.client as mqtt

        self.device = device
        self.items: list[Received] = []
        self.connects: list[float] = []
        self.disconnects: list[float] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}-{id(self)}",
                        protocol=mqtt.MQTTv5)
        c.username_pw_set(user, password)
        c.reconnect_delay_set(0.1, 1)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c
        self.host, self.port = host, port

    def _on_connect(self, client, userdata, flags, rc, props):
        if rc.is_failure:
            return
        client.subscribe(f"{protocol.TOPIC_ROOT}/{self.device}/#", qos=1)
        with self._lock:
            self.connects.append(time.time())
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, rc, props):
        with self._lock:
            self.disconnects.append(time.time())
        self._connected.clear()

    def _on_message(self, client, userdata, m):
        now = time.time()
        kind = m.topic.rsplit("/", 1)[-1]
        try:
            msg, err = protocol.decode(m.payload, m.topic), ""
        except protocol.ProtocolError as e:
            msg, err = None, str(e)
        with self._lock:
            self.items.append(Received(now, m.topic, kind, msg, err, bool(m.retain)))

    def __enter__(self):
        self.client.connect_async(self.host, self.port, keepalive=5)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise RuntimeError(f"recorder could not connect to {self.host}:{self.port}")
        return self

    def __exit__(self, *exc):
        self.client.disconnect()
        self.client.loop_stop()

    def snapshot(self, kind: str | None = None, since: float = 0.0) -> list[Received]:
        with self._lock:
            return [r for r in self.items if (kind is None or r.kind == kind) and r.t >= since]

    def wait_for(self, pred, timeout: float, kind: str | None = None, since: float = 0.0) -> Received | None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for r in self.snapshot(kind, since):
                if r.msg is not None and pred(r.msg):
                    return r
            time.sleep(0.02)
        return None

    def statuses(self, since: float = 0.0) -> list[tuple[float, str, str]]:
        """(arrival, state, boot) of every status message."""
        return [(r.t, r.msg["state"], r.msg.get("boot", "")) for r in self.snapshot("status", since) if r.msg]


class StalledSubscriber:
    """Logs in, subscribes to `topic` at `qos`, then never reads its socket again (context manager).

    A raw MQTT 3.1.1 client in a few bytes, so nothing in a library reads behind our back;
    SO_RCVBUF is made small so the broker's send side fills up quickly.
    """

    def __init__(self, host: str, port: int, user: str, password: str, topic: str, qos: int = 1,
                 client_id: str = "stalled"):
        self.args = (host, port, user, password, topic, qos, client_id)
        self.sock: socket.socket | None = None

    @staticmethod
    def _str(s: str) -> bytes:
        b = s.encode()
        return len(b).to_bytes(2, "big") + b

    @staticmethod
    def _packet(kind: int, body: bytes) -> bytes:
        n, length = len(body), b""
        while True:
            byte, n = n % 128, n // 128
            length += bytes([byte | (0x80 if n else 0)])
            if not n:
                break
        return bytes([kind]) + length + body

    def __enter__(self):
        host, port, user, password, topic, qos, client_id = self.args
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(5)
        s.connect((host, port))
        flags = 0x80 | 0x40 | 0x02  # username, password, clean session
        body = self._str("MQTT") + bytes([4, flags]) + (60).to_bytes(2, "big") + self._str(client_id) \
            + self._str(user) + self._str(password)
        s.sendall(self._packet(0x10, body))
        connack = s.recv(4)
        if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
            s.close()
            raise RuntimeError(f"stalled subscriber refused: {connack!r}")
        s.sendall(self._packet(0x82, (1).to_bytes(2, "big") + self._str(topic) + bytes([qos])))
        suback = s.recv(5)
        if len(suback) < 5 or suback[0] != 0x90 or suback[4] > 2:
            s.close()
            raise RuntimeError(f"stalled subscriber's subscription refused: {suback!r}")
        self.sock = s  # from here on: never read again
        return self

    def __exit__(self, *exc):
        if self.sock is not None:
            self.sock.close()


def process_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --- a full disk ---------------------------------------------------------------------

@contextlib.contextmanager
def tiny_tmpfs(size_kb: int = 64, fill: bool = True):
    """A `size_kb` tmpfs mounted on a fresh directory (root only), optionally filled to the last byte."""
    mnt = pathlib.Path(tempfile.mkdtemp(prefix="edgedance-fulldisk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0777", "tmpfs", str(mnt)], check=True,
                   capture_output=True)
    try:
        if fill:
            fill_up(mnt)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        shutil.rmtree(mnt, ignore_errors=True)


def fill_up(directory: pathlib.Path) -> int:
    """Write a file until the file system says ENOSPC; returns the bytes written."""
    n = 0
    with open(directory / "filler", "wb", buffering=0) as f:
        block = b"\0" * 4096
        while True:
            try:
                n += f.write(block)
            except OSError:
                break
        for size in (512, 64, 1):  # the last partial block
            while True:
                try:
                    n += f.write(b"\0" * size)
                except OSError:
                    break
    return n


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


# --- the device as a process ----------------------------------------------------------

def device_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "device", *args]


def device_run_argv(audio, bundle, host: str, port: int, password_file, *, device_id: str = "pi1",
                    loop: bool = True, **settings) -> list[str]:
    """`python -m device run` with a file source at real-time pace, as `device-<id>`; `settings` are
    extra `section_key=value` pairs, e.g. mqtt_keepalive_s=5."""
    argv = device_argv("run", "--file", str(audio), "--model", str(bundle), "--id", device_id, "--host", host,
                       "--port", str(port), "--set", f"mqtt.username=device-{device_id}",
                       "--set", f"mqtt.password_file={password_file}", "--set", f"audio.loop={str(loop).lower()}",
                       "--set", "runtime.log_level=info")
    for k, v in settings.items():
        sec, key = k.split("_", 1)
        argv += ["--set", f"{sec}.{key}={v}"]
    return argv


# --- what a fault cost -----------------------------------------------------------------

def streams(items: list[Received], kind: str) -> list[list[Received]]:
    """The decoded messages of one kind split into device runs: a process starts counting at seq 0.
    (Within a run messages may arrive out of order, e.g. an outbox flushed before paho's resends.)"""
    runs: list[list[Received]] = []
    for r in items:
        if r.kind != kind or r.msg is None or r.retained:
            continue
        if not runs or (r.msg["seq"] == 0 and any(x.msg["seq"] == 0 for x in runs[-1])):
            runs.append([])
        runs[-1].append(r)
    return runs


def reordered(run: list[Received]) -> int:
    """Messages that arrived after one with a higher seq."""
    top, n = -1, 0
    for r in run:
        if r.msg["seq"] < top:
            n += 1
        top = max(top, r.msg["seq"])
    return n


def missing_seqs(run: list[Received]) -> list[int]:
    """Sequence numbers absent between the first and the last one received (duplicates ignored)."""
    seen = {r.msg["seq"] for r in run}
    return [s for s in range(min(seen), max(seen) + 1) if s not in seen] if seen else []


def gap_around(items: list[Received], kind: str, t: float) -> tuple[float, float]:
    """(last arrival at or before t, first arrival after t) of one kind."""
    before = [r.t for r in items if r.kind == kind and r.msg is not None and r.t <= t]
    after = [r.t for r in items if r.kind == kind and r.msg is not None and r.t > t]
    return (max(before) if before else float("nan"), min(after) if after else float("nan"))


def robot_neutral_at(bus, cfg, since: float, tol_deg: float = 0.5) -> float | None:
    """First control tick after `since` at which every servo is within tol of neutral (SimulatedBus trace)."""
    neutral = cfg.to_servo(cfg.neutral)
    ticks: dict[float, dict[int, float]] = {}
    for t, ch, deg in list(bus.trace):
        if t >= since:
            ticks.setdefault(t, {})[ch] = deg
    for t in sorted(ticks):
        if all(abs(ticks[t].get(ch, neutral[ch]) - neutral[ch]) <= tol_deg for ch in neutral):
            return t
    return None


def robot_moving_from(bus, cfg, since: float, tol_deg: float = 2.0) -> float | None:
    """First time after `since` when some servo is more than tol away from neutral."""
    neutral = cfg.to_servo(cfg.neutral)
    for t, ch, deg in list(bus.trace):
        if t >= since and abs(deg - neutral[ch]) > tol_deg:
            return t
    return None


def wait_until(pred, timeout: float, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


# --- hostile MQTT payloads -------------------------------------------------------------

def _valid_pose(device: str = "pi1", seq: int = 5) -> dict:
    now = time.time()
    beat = {"bpm": 120.0, "phase": 0.25, "bar_phase": 0.5, "meter": 4, "onset": 0.3, "is_beat": False,
            "next_beat_in": 0.3}
    return protocol.pose_message(device, seq, now, frame=seq, t_audio=seq / 25, t_capture=now - 0.02, fps=25.0,
                                 kp=[[0.1 * (i % 3) - 0.1, 0.9 - 0.12 * i] for i in range(14)], heading=0.2,
                                 beat=beat)


BROKER_PAYLOAD_LIMIT = 64 * 1024  # message_size_limit in broker/templates/mosquitto.conf.tmpl


def delivered(items):
    """The hostile payloads the broker passes on (it drops those over its message_size_limit)."""
    return [i for i in items if len(i[1]) <= BROKER_PAYLOAD_LIMIT]


def hostile_payloads(device: str = "pi1") -> list[tuple[str, bytes, str]]:
    """(topic kind, payload, what is wrong) for every topic a follower reads: none may be acted on.

    Sizes go up to 1 MiB (our Mosquitto drops those over 64 KiB: `delivered()` is what gets through);
    nesting to 50 000 levels; numbers to NaN, Infinity, 1e999 (which Python's json reads as inf)
    and 2**80; every field its wrong type; binary junk with and without the 0xED magic.
    """
    import json
    import random

    rnd = random.Random(8)
    good = _valid_pose(device)

    def pose(**changes):
        m = json.loads(json.dumps(good))
        for k, v in changes.items():
            if "." in k:
                a, b = k.split(".")
                m[a][b] = v
            else:
                m[k] = v
        return json.dumps(m, allow_nan=True, separators=(",", ":")).encode()

    deep_in_object = (b'{"v":1,"type":"pose","device":"%s","seq":9,"kp":' % device.encode()
                      + b"[" * 20000 + b"]" * 20000 + b"}")
    status = {"v": 1, "type": "status", "device": device, "seq": 3, "t": time.time(), "state": "online", "boot": "b"}
    beat = {"v": 1, "type": "beat", "device": device, "seq": 3, "t": time.time(), "frame": 10, "t_audio": 0.4,
            "t_capture": time.time(), "bpm": 120.0, "meter": 4, "beat_in_bar": 1, "next_beat_in": 0.5,
            "beat_index": 1}
    out = [
        ("pose", b"{" + b'"a":' * 1 + b'"' + b"x" * (1 << 20) + b'"}', "1 MiB JSON"),
        ("pose", b"\xed\x01" + bytes(1 << 20), "1 MiB binary with the magic"),
        ("pose", b"[" * 50000, "50 000 nested arrays"),
        ("pose", deep_in_object, "20 000 levels inside a pose"),
        ("pose", pose(heading=float("nan")), "NaN heading"),
        ("pose", pose(t=float("inf")), "Infinity t"),
        ("pose", pose().replace(b'"heading":0.2', b'"heading":1e999'), "1e999 (inf) heading"),
        ("pose", pose(seq=2 ** 80), "seq 2**80"),
        ("pose", pose(seq=-1), "negative seq"),
        ("pose", pose(seq="6"), "seq as a string"),
        ("pose", pose(kp="[[0,0]]"), "kp as a string"),
        ("pose", pose(kp=[[0.0, 0.0]] * 13 + [[1.5, 0.0]]), "keypoint out of range"),
        ("pose", pose(kp=[[0.0, 0.0, 0.0]] * 14), "keypoint triples"),
        ("pose", pose(kp=[[None, 0.0]] * 14), "null keypoint"),
        ("pose", pose(beat=[1, 2]), "beat as a list"),
        ("pose", pose(**{"beat.is_beat": 1}), "is_beat as a number"),
        ("pose", pose(**{"beat.phase": 1.5}), "phase out of range"),
        ("pose", pose(fps=0), "fps 0"),
        ("pose", pose(v=2), "schema version 2"),
        ("pose", pose(device="pi2" if device != "pi2" else "pi1"), "another device's id in the payload"),
        ("pose", json.dumps(beat).encode(), "a valid beat message on the pose topic"),
        ("pose", bytes(rnd.randrange(1, 256) for _ in range(300)).replace(b"\xed", b"\x00").replace(b"{", b"\x00"),
         "binary junk"),
        ("pose", b"\xed\x01\x01\x00" + bytes(rnd.randrange(256) for _ in range(60)), "short binary pose"),
        ("pose", b"", "empty payload"),
        ("pose", b"null", "JSON null"),
        ("pose", '{"v":1,"type":"pose","device":"\u202e\u0000"}'.encode(), "control characters in the id"),
        ("status", json.dumps(dict(status, state="exploded")).encode(), "unknown state"),
        ("status", json.dumps(dict(status, state=["offline"])).encode(), "state as a list"),
        ("status", b"offline", "a bare word"),
        ("beat", json.dumps(dict(beat, bpm=-5)).encode(), "negative tempo"),
        ("beat", json.dumps(dict(beat, beat_index="x")).encode(), "beat_index as a string"),
        ("metrics", b"\x00\x01\x02", "binary junk on metrics"),
    ]
    return out


# --- scenarios (shared by tests/test_faults.py and bench/faults.py) ---------------------

class DeviceProcess:
    """`argv` as a process (its own session), output to `log_path`; SIGTERM on exit (context manager)."""

    def __init__(self, argv: list[str], log_path: pathlib.Path, cwd=REPO):
        self.argv, self.log_path, self.cwd = argv, pathlib.Path(log_path), cwd
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def __enter__(self):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.cwd, start_new_session=True)
        return self

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode

    def __exit__(self, *exc):
        self.stop()
        self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class Scene:
    """A broker on a fixed port, a recorder (the display's view: user `display`) and a simulated
    robot (`subscribers.robot.follower.Follower` + `SimulatedBus`) following pi1 (context manager)."""

    def __init__(self, workdir: pathlib.Path, *, websockets: bool = False):
        from broker.launcher import Broker, free_port
        self.workdir = pathlib.Path(workdir)
        self.broker = Broker(self.workdir / "broker", devices=("pi1", "pi2"), tls=False, websockets=websockets,
                             port=free_port())
        self.stack = contextlib.ExitStack()

    def __enter__(self):
        from subscribers.robot.config import load_config
        from subscribers.robot.drivers import SimulatedBus
        from subscribers.robot.follower import Follower
        b = self.stack.enter_context(self.broker)
        self.stack.callback(self.broker.stop)  # also after a restart
        self.password_file = self.workdir / "device-pi1.password"
        self.password_file.write_text(b.credentials["device-pi1"] + "\n")
        self.recorder = self.stack.enter_context(Recorder(b.host, b.port, "display", b.credentials["display"]))
        self.robot_cfg = load_config()
        self.bus = SimulatedBus()
        self.robot = self.stack.enter_context(Follower(self.robot_cfg, self.bus, "pi1"))
        if not self.robot.connect(b.host, b.port, user="robot", password=b.credentials["robot"]).wait(10):
            raise RuntimeError("the robot could not connect")
        return self

    def __exit__(self, *exc):
        self.stack.close()

    def device_argv(self, song, bundle, port: int | None = None, **settings) -> list[str]:
        return device_run_argv(song, bundle, self.broker.host, port or self.broker.port, self.password_file,
                               **settings)

    def wait_dancing(self, since: float = 0.0, seconds: float = 2.0, timeout: float = 40.0) -> float:
        """Waits until `seconds` of poses arrived after `since`; returns the first one's arrival."""
        first = self.recorder.wait_for(lambda m: True, timeout, "pose", since)
        if first is None:
            raise RuntimeError("no pose arrived")
        ok = wait_until(lambda: len(self.recorder.snapshot("pose", since)) >= seconds * 25, timeout)
        if not ok:
            raise RuntimeError(f"poses stopped: {len(self.recorder.snapshot('pose', since))} arrived")
        return first.t


def _losses(items: list[Received]) -> dict:
    pose_runs, beat_runs = streams(items, "pose"), streams(items, "beat")
    return {
        "poses": sum(len(r) for r in pose_runs),
        "pose_lost": sum(len(missing_seqs(r)) for r in pose_runs),
        "beats": sum(len(r) for r in beat_runs),
        "beat_lost": sum(len(missing_seqs(r)) for r in beat_runs),
        "beat_dup": sum(len(r) - len({x.msg["seq"] for x in r}) for r in beat_runs),
        "beat_reordered": sum(reordered(r) for r in beat_runs),
        "pose_reordered": sum(reordered(r) for r in pose_runs),
        "runs": len(pose_runs),
        "bad": sum(1 for r in items if r.msg is None),
    }


def _robot(sc: Scene, fault_t: float, back_t: float | None) -> dict:
    cfg = sc.robot_cfg
    neutral = robot_neutral_at(sc.bus, cfg, fault_t)
    moving = robot_moving_from(sc.bus, cfg, back_t) if back_t else None
    return {"robot_neutral_s": None if neutral is None else neutral - fault_t,
            "robot_moving_again_s": None if moving is None or back_t is None else moving - back_t,
            "robot_bound_s": cfg.watchdog_s + cfg.glide_s}


def scenario_broker_restart(workdir, song, bundle, outage_s: float, after_s: float = 4.0) -> dict:
    """The broker is SIGKILLed mid-song and started again on the same port after `outage_s`."""
    workdir = pathlib.Path(workdir)
    with Scene(workdir) as sc, PartitionProxy(sc.broker.host, sc.broker.port) as px, \
            DeviceProcess(sc.device_argv(song, bundle, port=px.port), workdir / "device.log") as dev:
        sc.wait_dancing(seconds=3)
        t_kill = time.time()
        os.kill(sc.broker.pid, signal.SIGKILL)
        sc.broker._proc.wait()
        time.sleep(outage_s)
        px.refusing = True  # the device comes back through the proxy only once the observers are back
        connects = len(sc.recorder.connects)
        sc.broker.stop()
        sc.broker.start()
        t_up = time.time()
        wait_until(lambda: len(sc.recorder.connects) > connects, 15)
        time.sleep(0.2)  # their SUBSCRIBEs
        px.refusing = False
        t_open = time.time()
        online = sc.recorder.wait_for(lambda m: m["state"] == "online", 40, "status", t_up)
        first = sc.recorder.wait_for(lambda m: True, 40, "pose", t_up)
        time.sleep(after_s)
        rc = dev.stop()
        time.sleep(0.5)
        items = sc.recorder.snapshot()
        out = {"fault": f"broker SIGKILL, restarted after {outage_s:.0f} s", "outage_s": t_up - t_kill,
               "observers_back_s": t_open - t_up,
               "online_after_up_s": online.t - t_up if online else None,
               "pose_after_up_s": first.t - t_up if first else None,
               "returncode": rc, "device_log": dev.log_text(), **_losses(items), **_robot(sc, t_kill, t_open)}
        out["pose_gap_s"] = (first.t - gap_around(items, "pose", t_kill)[0]) if first else None
    return out


def scenario_device_kill(workdir, song, bundle, restart_sec: float, after_s: float = 4.0, page=None,
                         websockets: bool = False, on_scene=None) -> dict:
    """The device is SIGKILLed; a supervisor with systemd's Restart=on-failure policy starts it again.
    `on_scene(scene)` is called once the broker is up (the test opens the display page there);
    `page(state)` then waits until the page shows the device `state` (seconds, or None)."""
    workdir = pathlib.Path(workdir)
    with Scene(workdir, websockets=websockets) as sc, Supervisor(sc.device_argv(song, bundle), restart_sec=restart_sec,
                                          log_path=workdir / "device.log") as sup:
        if on_scene is not None:
            on_scene(sc)
        sc.wait_dancing(seconds=3)
        boot = [b for _, s, b in sc.recorder.statuses() if s == "online"][-1]
        t_kill = sup.kill(signal.SIGKILL)
        offline = sc.recorder.wait_for(lambda m: m["state"] == "offline", 30, "status", t_kill)
        page_offline = page("offline") if page else None
        online = sc.recorder.wait_for(lambda m: m["state"] == "online" and m.get("boot") != boot, 60, "status", t_kill)
        first = sc.recorder.wait_for(lambda m: True, 60, "pose", t_kill)
        page_online = page("online") if page else None
        time.sleep(after_s)
        items = sc.recorder.snapshot()
        out = {"fault": "device SIGKILL, supervisor restart", "restart_sec": restart_sec,
               "offline_s": offline.t - t_kill if offline else None,
               "offline_msg": offline.msg if offline else None,
               "online_s": online.t - t_kill if online else None,
               "pose_s": first.t - t_kill if first else None,
               "restarted_after_s": sup.runs[1].started - t_kill if len(sup.runs) > 1 else None,
               "supervisor_runs": [(r.returncode, r.started) for r in sup.runs],
               "page_offline": page_offline, "page_online": page_online,
               **_losses(items), **_robot(sc, t_kill, online.t if online else None)}
        out["robot_neutral_after_offline_s"] = (out["robot_neutral_s"] - out["offline_s"]
                                                if out["robot_neutral_s"] is not None and offline else None)
    out["device_log"] = (workdir / "device.log").read_text(errors="replace")
    out["final_returncode"] = sup.runs[-1].returncode
    return out


def scenario_partition(workdir, song, bundle, seconds: float, keepalive_s: int, after_s: float = 5.0) -> dict:
    """The device's link to the broker is partitioned (PartitionProxy) for `seconds`."""
    workdir = pathlib.Path(workdir)
    with Scene(workdir) as sc, PartitionProxy(sc.broker.host, sc.broker.port) as px, \
            DeviceProcess(sc.device_argv(song, bundle, port=px.port, mqtt_keepalive_s=keepalive_s),
                          workdir / "device.log") as dev:
        sc.wait_dancing(seconds=3)
        boot = [b for _, s, b in sc.recorder.statuses() if s == "online"][-1]
        t_cut = time.time()
        px.partition()
        time.sleep(seconds)
        px.heal()
        t_heal = time.time()
        offline = [r for r in sc.recorder.snapshot("status", t_cut) if r.msg and r.msg["state"] == "offline"]
        first = sc.recorder.wait_for(lambda m: True, 60, "pose", t_heal)
        # a partition shorter than the keep-alive goes unnoticed: no new status then
        online = sc.recorder.wait_for(lambda m: m["state"] == "online", 15, "status", t_heal)
        time.sleep(after_s)
        rc = dev.stop()
        time.sleep(0.5)
        items = sc.recorder.snapshot()
        beats_during = [r for r in items if r.kind == "beat" and r.msg and t_cut <= r.msg["t"] <= t_heal]
        out = {"fault": f"partition {seconds:.0f} s (keepalive {keepalive_s} s)", "partition_s": t_heal - t_cut,
               "offline_s": offline[0].t - t_cut if offline else None,
               "online_after_heal_s": online.t - t_heal if online else None,
               "pose_after_heal_s": first.t - t_heal if first else None,
               "same_boot": bool(online.msg.get("boot") == boot) if online else None,
               "device_noticed": "lost" in dev.log_text(),
               "late_poses": sum(1 for r in sc.recorder.snapshot("pose", t_cut) if r.msg and r.t - r.msg["t"] > 1.0),
               "beats_made_during": len(beats_during),
               "beats_made_during_late_s": max((r.t - r.msg["t"] for r in beats_during), default=0.0),
               "returncode": rc, "device_log": dev.log_text(), **_losses(items),
               **_robot(sc, t_cut, t_heal)}
        out["beat_missing"] = [(s, [(round(r.msg["t"] - t_cut, 2), round(r.t - t_cut, 2)) for r in run
                                    if abs(r.msg["seq"] - s) == 1])
                               for run in streams(items, "beat") for s in missing_seqs(run)]
    return out


def scenario_stalled_subscriber(workdir, song, bundle, seconds: float, flood: int = 20000) -> dict:
    """A subscriber to everything stops reading. Phase 1 (`seconds`): only that. Phase 2: a second device
    also sends `flood` 1 kB QoS 1 messages, which pile up for the stalled client (broker memory)."""
    workdir = pathlib.Path(workdir)
    import numpy as np

    def latency(since, until=float("inf")):
        lat = [1000 * (r.t - r.msg["t_capture"]) for r in sc.recorder.snapshot("pose", since) if r.msg and r.t < until]
        return (float(np.median(lat)), float(np.percentile(lat, 99)), len(lat)) if lat else (None, None, 0)

    with Scene(workdir) as sc, DeviceProcess(sc.device_argv(song, bundle), workdir / "device.log") as dev:
        sc.wait_dancing(seconds=2)
        t_base = time.time()
        time.sleep(seconds / 2)
        base = latency(t_base)
        rss0 = process_rss_kb(sc.broker.pid)
        b = sc.broker
        with StalledSubscriber(b.host, b.port, "robot", b.credentials["robot"], "edgedance/v1/#", 1):
            t0 = time.time()
            time.sleep(seconds)
            stalled = latency(t0)
            ticks, frames = sc.robot.ticks, sc.robot.controller.frames
            t1 = time.time()
            pi2 = b.client("device-pi2")
            payload = b"x" * 1000
            for i in range(flood):
                pi2.publish("edgedance/v1/pi2/metrics", payload, qos=1)
                if i % 500 == 0:
                    time.sleep(0.01)
            rss_peak = rss0
            while time.time() < t1 + seconds:
                rss_peak = max(rss_peak, process_rss_kb(b.pid))
                time.sleep(0.2)
            flooded = latency(t1)
            robot_alive = sc.robot.ticks > ticks and sc.robot.controller.frames > frames
            pi2.disconnect()
            pi2.loop_stop()
        rc = dev.stop()
        time.sleep(0.3)
        items = sc.recorder.snapshot()
        log_text = b.log_file.read_text(errors="replace")
        out = {"fault": f"a subscriber stops reading (then {flood} x 1 kB QoS 1 more for it from a second device)",
               "broker_rss_kb": (rss0, rss_peak), "returncode": rc, "device_log": dev.log_text(),
               "latency_ms_before": base[:2], "latency_ms_stalled": stalled[:2], "latency_ms_flood": flooded[:2],
               "poses_stalled": stalled[2], "poses_flood": flooded[2], "seconds": seconds,
               "robot_alive": robot_alive, "broker_dropped_note": "dropped" in log_text.lower(), **_losses(items)}
    return out


def scenario_full_log_disk(workdir, song, bundle, seconds: float) -> dict:
    """The device's stdout/stderr (its log) go to a file on a full tmpfs."""
    workdir = pathlib.Path(workdir)
    with tiny_tmpfs(64) as full, Scene(workdir) as sc:
        log_path = full / "device.log"
        argv = sc.device_argv(song, bundle, loop=False, runtime_max_seconds=seconds)
        t0 = time.time()
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(argv, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, cwd=REPO,
                                    start_new_session=True)
            try:
                rc = proc.wait(seconds + 60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        time.sleep(0.5)
        items = sc.recorder.snapshot()
        out = {"fault": "device log on a full disk", "returncode": rc, "wall_s": time.time() - t0,
               "log_bytes": log_path.stat().st_size if log_path.exists() else 0,
               "states": [s for _, s, _ in sc.recorder.statuses()], **_losses(items)}
    return out
