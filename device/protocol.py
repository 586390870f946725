"""The MQTT message schema (docs/protocol.md): topics, encoders, the one decoder.

Device, robot, display and offload workers all speak through this module, so a
message that passes `decode` is safe to act on: right version, right types,
finite numbers, keypoints in [-1, 1].
"""
from __future__ import annotations

import json
import math
import re
import struct

from device.contract import N_KEYPOINTS

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgedance/v1"
KINDS = ("pose", "beat", "status", "metrics", "cmd", "features")
STATES = ("online", "paused", "stopped", "offline")
COMMANDS = ("start", "stop", "pause", "select_bundle", "latency")
MAX_PAYLOAD = 64 * 1024
MAX_FEATURE_ROWS = 256  # offload: context + new frames in one features message
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")

BINARY_MAGIC = 0xED
BINARY_POSE = struct.Struct("<BBBBIdfffHHBBHh28h")  # 94 bytes, layout in docs/protocol.md
assert BINARY_POSE.size == 94
Q15 = 32767  # keypoints and heading as int16: value * 32767, |value| <= 1
PHASE_Q16 = 65536  # phases as u16: phase * 2**16, wraps at 1.0


class ProtocolError(ValueError):
    """A message that must not be acted on; the text names the field."""


def topic(device_id: str, kind: str) -> str:
    if not DEVICE_ID_RE.match(device_id or ""):
        raise ProtocolError(f"device id {device_id!r}: use 1-64 characters from A-Z a-z 0-9 _ -")
    if kind not in KINDS:
        raise ProtocolError(f"topic kind {kind!r}: must be one of {KINDS}")
    return f"{TOPIC_ROOT}/{device_id}/{kind}"


def parse_topic(t: str) -> tuple[str, str]:
    """'edgedance/v1/<id>/<kind>' -> (id, kind)."""
    parts = t.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != TOPIC_ROOT or parts[3] not in KINDS:
        raise ProtocolError(f"topic {t!r}: expected {TOPIC_ROOT}/<device_id>/<{'|'.join(KINDS)}>")
    if not DEVICE_ID_RE.match(parts[2]):
        raise ProtocolError(f"topic {t!r}: bad device id {parts[2]!r}")
    return parts[2], parts[3]


# --- encoding ---------------------------------------------------------------

def encode_json(msg: dict, *, check: bool = True) -> bytes:
    """Validate and serialize one message dict (as documented) to compact JSON.

    `check=False` skips `validate`: for messages the device builds itself on its audio loop,
    whose builders the tests hold to the schema (a NaN still raises ValueError)."""
    if check:
        validate(msg)
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()


def encode_binary(msg: dict) -> bytes:
    """The 94-byte binary form of a pose message."""
    validate(msg)
    if msg["type"] != "pose":
        raise ProtocolError(f"binary form exists for pose messages only, not {msg['type']!r}")
    b = msg["beat"]
    kp = [round(c * Q15) for pair in msg["kp"] for c in pair]
    return BINARY_POSE.pack(
        BINARY_MAGIC, SCHEMA_VERSION, 1, 1 if b["is_beat"] else 0,
        msg["seq"] & 0xFFFFFFFF, msg["t"], msg["t_audio"], msg["t"] - msg["t_capture"],
        b["bpm"], int(b["phase"] * PHASE_Q16) % PHASE_Q16, int(b["bar_phase"] * PHASE_Q16) % PHASE_Q16,
        b["meter"], min(255, round(msg["fps"])), min(65535, round(b["next_beat_in"] * 1000)),
        round(msg["heading"] / math.pi * Q15), *kp)


# --- decoding ---------------------------------------------------------------

def decode(payload: bytes | bytearray | str, topic_name: str | None = None) -> dict:
    """Bytes from the wire -> a validated message dict; ProtocolError otherwise."""
    if isinstance(payload, str):
        payload = payload.encode()
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if not payload:
        raise ProtocolError("empty payload")
    topic_id = parse_topic(topic_name)[0] if topic_name else None
    if payload[0] == BINARY_MAGIC:
        msg = _decode_binary(bytes(payload), topic_id)
    else:
        try:
            msg = json.loads(payload, parse_constant=_reject_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ProtocolError(f"payload is neither JSON nor binary pose: {e}") from e
        if not isinstance(msg, dict):
            raise ProtocolError(f"payload must be a JSON object, got {type(msg).__name__}")
    validate(msg)
    if topic_name:
        tid, kind = parse_topic(topic_name)
        if msg["device"] != tid:
            raise ProtocolError(f"field 'device' is {msg['device']!r} but the topic names {tid!r}")
        if msg["type"] != kind and not (kind == "status" and msg["type"] == "status"):
            raise ProtocolError(f"field 'type' is {msg['type']!r} but the topic is a {kind!r} topic")
    return msg


def _reject_constant(name):
    raise ProtocolError(f"non-finite number {name} in payload")


def _decode_binary(p: bytes, device_id: str | None) -> dict:
    if len(p) != BINARY_POSE.size:
        raise ProtocolError(f"binary pose must be {BINARY_POSE.size} bytes, got {len(p)}")
    (_, version, kind, flags, seq, t, t_audio, lag, bpm, phase, bar_phase, meter, fps,
     next_ms, heading, *kp) = BINARY_POSE.unpack(p)
    if version != SCHEMA_VERSION:
        raise ProtocolError(f"binary field 'version' is {version}, this decoder speaks {SCHEMA_VERSION}")
    if kind != 1:
        raise ProtocolError(f"binary field 'type' is {kind}, only 1 (pose) exists")
    return {
        "v": SCHEMA_VERSION, "type": "pose", "device": device_id or "unknown", "seq": seq, "t": t,
        "frame": seq, "t_audio": t_audio, "t_capture": t - lag, "fps": float(fps),
        "heading": heading * math.pi / Q15,
        "beat": {"bpm": bpm, "phase": phase / PHASE_Q16, "bar_phase": bar_phase / PHASE_Q16,
                 "meter": meter, "onset": 0.0, "is_beat": bool(flags & 1),
                 "next_beat_in": next_ms / 1000.0},
        "kp": [[kp[2 * i] / Q15, kp[2 * i + 1] / Q15] for i in range(N_KEYPOINTS)],
    }


# --- validation -------------------------------------------------------------

def _num(m: dict, key: str, where: str, lo=-math.inf, hi=math.inf, integer=False):
    if key not in m:
        raise ProtocolError(f"{where}: missing field {key!r}")
    x = m[key]
    ok_types = (int,) if integer else (int, float)
    if isinstance(x, bool) or not isinstance(x, ok_types):
        raise ProtocolError(f"{where}: field {key!r} must be {'an integer' if integer else 'a number'}, got {x!r:.40}")
    if not math.isfinite(x):
        raise ProtocolError(f"{where}: field {key!r} is not finite")
    if not lo <= x <= hi:
        raise ProtocolError(f"{where}: field {key!r} = {x} outside [{lo}, {hi}]")
    return x


def _str(m: dict, key: str, where: str, choices=None):
    x = m.get(key)
    if not isinstance(x, str):
        raise ProtocolError(f"{where}: field {key!r} must be a string, got {x!r:.40}")
    if choices is not None and x not in choices:
        raise ProtocolError(f"{where}: field {key!r} = {x!r} not one of {choices}")
    return x


def validate(msg: dict) -> dict:
    if not isinstance(msg, dict):
        raise ProtocolError(f"message must be an object, got {type(msg).__name__}")
    if msg.get("v") != SCHEMA_VERSION or isinstance(msg.get("v"), bool):
        raise ProtocolError(f"field 'v' is {msg.get('v')!r:.20}; this decoder speaks schema {SCHEMA_VERSION}")
    kind = _str(msg, "type", "message", KINDS)
    where = f"{kind} message"
    device_id = _str(msg, "device", where)
    if not DEVICE_ID_RE.match(device_id) and device_id != "unknown":
        raise ProtocolError(f"{where}: field 'device' = {device_id!r:.70} is not a valid device id")
    _num(msg, "seq", where, 0, 2**63, integer=True)
    _num(msg, "t", where, 0)
    if kind == "pose":
        _num(msg, "frame", where, 0, integer=True)
        _num(msg, "t_audio", where, 0)
        _num(msg, "t_capture", where, 0)
        _num(msg, "fps", where, 1, 240)
        _num(msg, "heading", where, -math.pi - 1e-3, math.pi + 1e-3)
        _beat(msg.get("beat"), where)
        kp = msg.get("kp")
        if not isinstance(kp, list) or len(kp) != N_KEYPOINTS:
            raise ProtocolError(f"{where}: field 'kp' must be {N_KEYPOINTS} [x, y] pairs")
        for i, pair in enumerate(kp):
            if not isinstance(pair, list) or len(pair) != 2:
                raise ProtocolError(f"{where}: field 'kp[{i}]' must be an [x, y] pair")
            for j, c in enumerate(pair):
                if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or abs(c) > 1.0:
                    raise ProtocolError(f"{where}: field 'kp[{i}][{j}]' = {c!r:.20} must be a finite number in [-1, 1]")
    elif kind == "beat":
        _num(msg, "frame", where, 0, integer=True)
        _num(msg, "t_audio", where, 0)
        _num(msg, "bpm", where, 0, 1000)
        _num(msg, "meter", where, 0, 16, integer=True)
        _num(msg, "beat_in_bar", where, 0, 16, integer=True)
        _num(msg, "next_beat_in", where, 0, 60)
        _num(msg, "beat_index", where, 0, integer=True)
    elif kind == "status":
        _str(msg, "state", where, STATES)
    elif kind == "cmd":
        cmd = _str(msg, "cmd", where, COMMANDS)
        args = msg.get("args", {})
        if not isinstance(args, dict):
            raise ProtocolError(f"{where}: field 'args' must be an object")
        if cmd == "select_bundle":
            _str(args, "path", f"{where} args")
        if cmd == "latency":
            _num(args, "ms", f"{where} args", -1000, 1000)
    elif kind == "features":
        _num(msg, "frame", where, 0, integer=True)
        _num(msg, "t_audio", where, 0)
        _num(msg, "t_capture", where, 0)
        _num(msg, "fps", where, 1, 240)
        _str(msg, "feature_hash", where)
        _beat(msg.get("beat"), where)
        x = msg.get("x")
        if not isinstance(x, list) or not 1 <= len(x) <= MAX_FEATURE_ROWS:
            raise ProtocolError(f"{where}: field 'x' must be a list of 1..{MAX_FEATURE_ROWS} feature frames")
        width = len(x[0]) if isinstance(x[0], list) else -1
        if not 1 <= width <= 1024:
            raise ProtocolError(f"{where}: field 'x[0]' must be a list of 1..1024 numbers")
        for i, row in enumerate(x):
            if not isinstance(row, list) or len(row) != width:
                raise ProtocolError(f"{where}: field 'x[{i}]' must be a list of {width} numbers like x[0]")
            for j, c in enumerate(row):
                if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
                    raise ProtocolError(f"{where}: field 'x[{i}][{j}]' must be a finite number")
        _num(msg, "context", where, 0, len(x) - 1, integer=True)
    return msg


def _beat(b, where: str):
    where = f"{where} beat"
    if not isinstance(b, dict):
        raise ProtocolError(f"{where}: field 'beat' must be an object")
    _num(b, "bpm", where, 0, 1000)
    _num(b, "phase", where, 0, 1)
    _num(b, "bar_phase", where, 0, 1)
    _num(b, "meter", where, 0, 16, integer=True)
    _num(b, "onset", where, 0)
    _num(b, "next_beat_in", where, 0, 60)
    if not isinstance(b.get("is_beat"), bool):
        raise ProtocolError(f"{where}: field 'is_beat' must be true or false")


class SequenceGuard:
    """Drops stale and out-of-order messages per (device, type); counts what it drops."""

    def __init__(self):
        self._last: dict[tuple[str, str], int] = {}
        self.dropped = 0

    def accept(self, msg: dict) -> bool:
        key = (msg["device"], msg["type"])
        last = self._last.get(key)
        if last is not None and msg["seq"] <= last and msg["seq"] != 0:
            self.dropped += 1
            return False
        self._last[key] = msg["seq"]
        return True


class PoseEncoder:
    """One device's own pose frames straight to payload bytes: the publish hot path (25 a second).

    `encode_json(pose_message(...))` builds a dict and validates every field of it (about 50 µs a
    frame); this fills a template made once per device instead, after one chain of comparisons
    that also rejects NaN and infinities. Values that would not pass `validate` take the reference
    path (keypoints clipped to [-1, 1], ProtocolError naming the field otherwise), so a payload
    from here always decodes. Keypoints are written with 6 decimals (resolution 1e-6, 30x finer
    than the binary form's 1/32767), the other numbers exactly as `json.dumps` writes them; the
    binary form is byte-identical to `encode_binary`. Tests hold both paths to the same messages
    (tests/test_protocol.py); receivers validate at their boundary (`decode`).
    """

    KP_FORMAT = "%.6f"  # |error| <= 5e-7; always a decimal point, so a keypoint decodes as a float
    HEADING_MAX = math.pi + 1e-3  # validate's bound

    def __init__(self, device_id: str, fmt: str = "json"):
        topic(device_id, "pose")  # a valid id has no character JSON would need to escape
        if fmt not in ("json", "binary"):
            raise ProtocolError(f"pose format {fmt!r}: use 'json' or 'binary'")
        self.device_id, self.fmt = device_id, fmt
        kp = ",".join([f"[{self.KP_FORMAT},{self.KP_FORMAT}]"] * N_KEYPOINTS)
        self._json = ('{"v":%d,"type":"pose","device":"%s",' % (SCHEMA_VERSION, device_id)
                      + '"seq":%d,"t":%r,"frame":%d,"t_audio":%r,"t_capture":%r,"fps":%r,"heading":%r,'
                      '"beat":{"bpm":%r,"phase":%r,"bar_phase":%r,"meter":%d,"onset":%r,"is_beat":%s,'
                      '"next_beat_in":%r},"kp":[' + kp + "]}")

    def encode(self, seq: int, t: float, *, frame: int, t_audio: float, t_capture: float, fps: float, kp,
               heading: float, beat: dict) -> bytes:
        """The same arguments as `pose_message` (kp: (14, 2) array or pairs) -> JSON or binary bytes."""
        flat = kp.ravel().tolist() if hasattr(kp, "ravel") else [float(c) for pair in kp for c in pair]
        seq, frame, meter = int(seq), int(frame), int(beat["meter"])
        t, t_audio, t_capture, fps, heading = float(t), float(t_audio), float(t_capture), float(fps), float(heading)
        bpm, phase, bar_phase = float(beat["bpm"]), float(beat["phase"]), float(beat["bar_phase"])
        onset, next_in, is_beat = float(beat["onset"]), float(beat["next_beat_in"]), bool(beat["is_beat"])
        lo, hi, total = min(flat), max(flat), sum(flat)
        # every comparison is False for NaN; the sum is finite only when each unbounded field is
        if not (len(flat) == 2 * N_KEYPOINTS and -1.0 <= lo and hi <= 1.0 and total == total
                and 0 <= seq <= 2**63 and 0 <= frame and 0.0 <= t and 0.0 <= t_audio and 0.0 <= t_capture
                and 0.0 <= onset and t + t_audio + t_capture + onset < math.inf and 1.0 <= fps <= 240.0
                and -self.HEADING_MAX <= heading <= self.HEADING_MAX and 0.0 <= bpm <= 1000.0
                and 0.0 <= phase <= 1.0 and 0.0 <= bar_phase <= 1.0 and 0 <= meter <= 16
                and 0.0 <= next_in <= 60.0):
            msg = pose_message(self.device_id, seq, t, frame=frame, t_audio=t_audio, t_capture=t_capture, fps=fps,
                               kp=kp, heading=heading, beat=beat)
            return encode_binary(msg) if self.fmt == "binary" else encode_json(msg)
        if self.fmt == "binary":
            return BINARY_POSE.pack(
                BINARY_MAGIC, SCHEMA_VERSION, 1, 1 if is_beat else 0, seq & 0xFFFFFFFF, t, t_audio, t - t_capture,
                bpm, int(phase * PHASE_Q16) % PHASE_Q16, int(bar_phase * PHASE_Q16) % PHASE_Q16, meter,
                min(255, round(fps)), min(65535, round(next_in * 1000)), round(heading / math.pi * Q15),
                *[round(c * Q15) for c in flat])
        return (self._json % (seq, t, frame, t_audio, t_capture, fps, heading, bpm, phase, bar_phase, meter, onset,
                              "true" if is_beat else "false", next_in, *flat)).encode()


def pose_message(device_id: str, seq: int, t: float, *, frame: int, t_audio: float, t_capture: float,
                 fps: float, kp, heading: float, beat: dict) -> dict:
    """Build a pose message from arrays/numbers (kp: (14, 2), clipped to [-1, 1])."""
    pairs = [[max(-1.0, min(1.0, float(x))), max(-1.0, min(1.0, float(y)))] for x, y in kp]
    return {"v": SCHEMA_VERSION, "type": "pose", "device": device_id, "seq": int(seq), "t": float(t),
            "frame": int(frame), "t_audio": float(t_audio), "t_capture": float(t_capture), "fps": float(fps),
            "heading": float(heading), "beat": dict(beat), "kp": pairs}
