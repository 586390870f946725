"""The device's settings: one INI file, then environment variables, then command-line flags.

    [mqtt]                      # /etc/edgedance/device.ini
    host = broker.local         # EDGEDANCE_MQTT_HOST=... overrides it
                                # python -m device run --set mqtt.host=... overrides both

Every key is declared once in SCHEMA (type, default, check, help); unknown sections or keys
and bad values are rejected at start with a `SettingsError` naming where the value came from
(file and line, environment variable or flag), the key, and what would be valid.
`deploy/device.ini` is the documented example; `python -m device run --print-config` shows
the merged result.
"""
from __future__ import annotations

import configparser
import dataclasses
import os
import pathlib
import re
from typing import Any, Callable

DEFAULT_PATH = "/etc/edgedance/device.ini"
ENV_PREFIX = "EDGEDANCE_"


class SettingsError(ValueError):
    """A bad setting: the text names its source, the key and what would be valid."""


@dataclasses.dataclass(frozen=True)
class Key:
    type: str  # str | int | float | bool | choice
    default: Any
    help: str
    choices: tuple = ()
    lo: float | None = None
    hi: float | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error text or None
    secret: bool = False


def _device_id(v: str) -> str | None:
    return None if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v) else "use 1-64 characters from A-Z a-z 0-9 _ -"


def _host(v: str) -> str | None:
    return None if v and not any(c.isspace() for c in v) else "must be a host name or address without spaces"


SCHEMA: dict[str, dict[str, Key]] = {
    "device": {
        "id": Key("str", "pi1", "device id in the MQTT topics edgedance/v1/<id>/...", check=_device_id),
        "bundle": Key("str", "/opt/edgedance/models/default", "model bundle folder (model.tflite + manifest.json)"),
        "format": Key("choice", "json", "pose payload: json, or the 94-byte binary form", choices=("json", "binary")),
        "latency_ms": Key("float", 0.0, "latency compensation: beats are announced this much earlier",
                          lo=-1000, hi=1000),
    },
    "audio": {
        "source": Key("choice", "mic", "where audio comes from", choices=("mic", "file", "stdin")),
        "device": Key("str", "", "microphone name (or part of it) or index; empty = the default input"),
        "file": Key("str", "", "audio file for source = file"),
        "realtime": Key("bool", True, "source = file: deliver at real-time pace (false: as fast as possible)"),
        "loop": Key("bool", False, "source = file: start again at the end"),
        "stdin_rate_hz": Key("int", 16000, "source = stdin: sample rate of the raw s16le mono PCM",
                             choices=(8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)),
        "chunk_ms": Key("int", 40, "capture chunk length (40 = one pose frame: one wake-up per frame)", lo=5, hi=100),
        "ring_s": Key("float", 2.0, "audio buffered between capture and processing before the oldest is dropped",
                      lo=0.2, hi=30),
    },
    "mqtt": {
        "enabled": Key("bool", True, "publish over MQTT (false: run the pipeline and log only)"),
        "host": Key("str", "localhost", "broker host", check=_host),
        "port": Key("int", 1883, "broker port (8883 is usual for TLS)", lo=1, hi=65535),
        "username": Key("str", "", "MQTT user (device-<id> with the project's broker)"),
        "password": Key("str", "", "MQTT password (prefer password_file)", secret=True),
        "password_file": Key("str", "", "file whose first line is the MQTT password"),
        "tls": Key("bool", False, "connect with TLS"),
        "cafile": Key("str", "", "CA certificate that signed the broker's (empty: the system's CAs)"),
        "certfile": Key("str", "", "client certificate (mutual TLS)"),
        "keyfile": Key("str", "", "client key (mutual TLS)"),
        "tls_insecure": Key("bool", False, "skip the broker host-name check (testing only)"),
        "protocol": Key("choice", "auto", "MQTT version: auto tries 5, then 3.1.1", choices=("auto", "5", "3.1.1")),
        "keepalive_s": Key("int", 10, "MQTT keep-alive: a dead link is noticed (and the last will sent) within 1.5x this", lo=5, hi=3600),
        "reconnect_min_s": Key("float", 0.5, "first reconnect delay", lo=0.05, hi=60),
        "reconnect_max_s": Key("float", 2.0, "reconnect delay cap (doubles from min up to this)", lo=0.1, hi=600),
        "outbox_pose_frames": Key("int", 25, "pose frames kept while offline (the newest)", lo=0, hi=10000),
        "outbox_pose_max_age_s": Key("float", 1.0, "pose frames older than this are not sent after a reconnect",
                                     lo=0, hi=60),
        "outbox_events": Key("int", 2000, "beat/status/metrics messages kept while offline", lo=10, hi=1000000),
        "metrics_interval_s": Key("float", 5.0, "seconds between metrics messages", lo=0.5, hi=3600),
    },
    "runtime": {
        "log_level": Key("choice", "info", "log level", choices=("debug", "info", "warning", "error")),
        "max_seconds": Key("float", 0.0, "stop after this many seconds of audio (0: run until stopped)",
                           lo=0, hi=1e9),
        "watchdog": Key("bool", True, "send systemd watchdog keep-alives when NOTIFY_SOCKET is set"),
        "start_paused": Key("bool", False, "start in state paused (listen, publish nothing) until a start cmd"),
    },
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Section:
    """Attribute access to one section's typed values."""

    def __init__(self, name: str, values: dict):
        self._name = name
        self.__dict__.update(values)

    def __repr__(self):
        return f"Section({self._name}, {self.as_dict()})"

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class Settings:
    """Typed, validated settings: `s.mqtt.host`, `s.audio.source`, ...; `s.sources[key]` says where each came from."""

    def __init__(self, values: dict[str, dict], sources: dict[str, str], path: str | None):
        self.path = path
        self.sources = sources
        for sec, vals in values.items():
            setattr(self, sec, Section(sec, vals))

    def get(self, dotted: str):
        sec, key = dotted.split(".", 1)
        return getattr(getattr(self, sec), key)

    def as_ini(self, show_secrets: bool = False) -> str:
        lines = []
        for sec, keys in SCHEMA.items():
            lines.append(f"[{sec}]")
            for key, spec in keys.items():
                v = self.get(f"{sec}.{key}")
                if spec.secret and v and not show_secrets:
                    v = "********"
                if isinstance(v, bool):
                    v = "true" if v else "false"
                lines.append(f"{key} = {v}    ; from {self.sources[f'{sec}.{key}']}")
            lines.append("")
        return "\n".join(lines)

    def mqtt_password(self) -> str:
        if self.mqtt.password_file:
            try:
                return pathlib.Path(self.mqtt.password_file).read_text().splitlines()[0].strip()
            except (OSError, IndexError) as e:
                raise SettingsError(f"[mqtt] password_file = {self.mqtt.password_file!r}: cannot read a password "
                                    f"from it ({e}); put the password on its first line") from e
        return self.mqtt.password


def _convert(raw: str, spec: Key, where: str, key: str):
    raw = raw.strip()
    if spec.type == "str":
        v = raw
    elif spec.type == "bool":
        low = raw.lower()
        if low not in _TRUE | _FALSE:
            raise SettingsError(f"{where}: {key} = {raw!r}: must be true or false (also yes/no, on/off, 1/0)")
        v = low in _TRUE
    elif spec.type in ("int", "float"):
        try:
            v = int(raw) if spec.type == "int" else float(raw)
        except ValueError:
            raise SettingsError(f"{where}: {key} = {raw!r}: must be {'an integer' if spec.type == 'int' else 'a number'}"
                                + (f" in [{spec.lo:g}, {spec.hi:g}]" if spec.lo is not None else "")) from None
        if spec.type == "float" and v != v:
            raise SettingsError(f"{where}: {key} = {raw!r}: must be a number")
        if (spec.lo is not None and v < spec.lo) or (spec.hi is not None and v > spec.hi):
            raise SettingsError(f"{where}: {key} = {raw!r}: must be in [{spec.lo:g}, {spec.hi:g}]")
        if spec.choices and v not in spec.choices:
            raise SettingsError(f"{where}: {key} = {raw!r}: must be one of {', '.join(map(str, spec.choices))}")
    elif spec.type == "choice":
        if raw not in spec.choices:
            raise SettingsError(f"{where}: {key} = {raw!r}: must be one of {', '.join(spec.choices)}")
        v = raw
    else:  # pragma: no cover - SCHEMA is ours
        raise AssertionError(spec.type)
    if spec.check:
        err = spec.check(v)
        if err:
            raise SettingsError(f"{where}: {key} = {raw!r}: {err}")
    return v


def _unknown(where: str, sec: str, key: str | None) -> SettingsError:
    if sec not in SCHEMA:
        return SettingsError(f"{where}: unknown section [{sec}]; sections are {', '.join(SCHEMA)}")
    return SettingsError(f"{where}: unknown key {key!r} in [{sec}]; keys there are {', '.join(SCHEMA[sec])}")


def load(path: str | os.PathLike | None = None, env: dict | None = None,
         overrides: dict[str, str] | None = None) -> Settings:
    """Merge defaults < INI file < EDGEDANCE_<SECTION>_<KEY> env vars < overrides ("section.key" -> text).

    path None: DEFAULT_PATH if it exists (else defaults only); an explicit path must exist.
    """
    env = os.environ if env is None else env
    values = {sec: {k: spec.default for k, spec in keys.items()} for sec, keys in SCHEMA.items()}
    sources = {f"{sec}.{k}": "default" for sec, keys in SCHEMA.items() for k in keys}

    used_path = None
    if path is None:
        if os.path.exists(DEFAULT_PATH):
            used_path = DEFAULT_PATH
    else:
        used_path = os.fspath(path)
        if not os.path.isfile(used_path):
            raise SettingsError(f"config file {used_path!r} does not exist (copy deploy/device.ini there, "
                                "or leave --config out to use the defaults)")
    if used_path:
        cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"), strict=True,
                                       default_section="__no_defaults__")
        cp.optionxform = str  # keys are case-sensitive, lower case
        try:
            with open(used_path, encoding="utf-8") as f:
                cp.read_file(f)
        except (configparser.Error, UnicodeDecodeError) as e:
            raise SettingsError(f"config file {used_path!r} is not a valid INI file: {e}") from e
        except OSError as e:
            raise SettingsError(f"config file {used_path!r} cannot be read: {e}") from e
        for sec in cp.sections():
            for key, raw in cp.items(sec):
                where = f"{used_path} [{sec}]"
                if sec not in SCHEMA or key not in SCHEMA[sec]:
                    raise _unknown(where, sec, key)
                values[sec][key] = _convert(raw, SCHEMA[sec][key], where, key)
                sources[f"{sec}.{key}"] = used_path
            if sec not in SCHEMA:
                raise _unknown(f"{used_path}", sec, None)

    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):]
        sec = next((s for s in SCHEMA if rest.startswith(s.upper() + "_")), None)
        if sec is None:
            continue  # EDGEDANCE_DATA and friends belong to other tools
        key = rest[len(sec) + 1:].lower()
        if key not in SCHEMA[sec]:
            raise SettingsError(f"environment variable {name}: unknown key {key!r} in [{sec}]; keys there are "
                                f"{', '.join(SCHEMA[sec])} (variables are {ENV_PREFIX}<SECTION>_<KEY>)")
        values[sec][key] = _convert(env[name], SCHEMA[sec][key], f"environment variable {name}", key)
        sources[f"{sec}.{key}"] = f"env {name}"

    for dotted, raw in (overrides or {}).items():
        sec, _, key = dotted.partition(".")
        if sec not in SCHEMA or key not in SCHEMA[sec]:
            raise _unknown(f"command-line setting {dotted!r}", sec, key or None)
        values[sec][key] = _convert(str(raw), SCHEMA[sec][key], "command line", f"{sec}.{key}")
        sources[dotted] = "command line"

    s = Settings(values, sources, used_path)
    _cross_check(s)
    return s


def _cross_check(s: Settings) -> None:
    def where(k):
        return f"{k} (from {s.sources[k]})"

    if s.audio.source == "file" and not s.audio.file:
        raise SettingsError(f"{where('audio.source')} is 'file' but audio.file is empty: give the audio file")
    if s.audio.file and s.audio.source == "file" and not os.path.isfile(s.audio.file):
        raise SettingsError(f"{where('audio.file')} = {s.audio.file!r}: no such file")
    if s.mqtt.reconnect_max_s < s.mqtt.reconnect_min_s:
        raise SettingsError(f"{where('mqtt.reconnect_max_s')} = {s.mqtt.reconnect_max_s} is below "
                            f"mqtt.reconnect_min_s = {s.mqtt.reconnect_min_s}")
    for k in ("cafile", "certfile", "keyfile", "password_file"):
        v = getattr(s.mqtt, k)
        if v and not os.path.isfile(v):
            raise SettingsError(f"{where('mqtt.' + k)} = {v!r}: no such file")
    if s.mqtt.password and s.mqtt.password_file:
        raise SettingsError(f"{where('mqtt.password')} and {where('mqtt.password_file')} are both set: keep one")
    if bool(s.mqtt.certfile) != bool(s.mqtt.keyfile):
        raise SettingsError(f"{where('mqtt.certfile')} and mqtt.keyfile go together (mutual TLS): set both or neither")
    if (s.mqtt.cafile or s.mqtt.certfile) and not s.mqtt.tls:
        raise SettingsError(f"{where('mqtt.cafile')}/certfile are set but mqtt.tls is false: set tls = true")


def parse_set(items: list[str] | None) -> dict[str, str]:
    """['mqtt.host=x', ...] (from --set) -> {'mqtt.host': 'x'}."""
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or "." not in k:
            raise SettingsError(f"--set {item!r}: use SECTION.KEY=VALUE, e.g. --set mqtt.host=broker.local")
        out[k.strip()] = v
    return out


def example_ini() -> str:
    """The INI text with every key, its default and its help (deploy/device.ini is checked against it)."""
    lines = ["; edgedance device settings. Precedence: this file < EDGEDANCE_<SECTION>_<KEY>",
             "; environment variables < command-line flags (python -m device run --set section.key=value).", ""]
    for sec, keys in SCHEMA.items():
        lines.append(f"[{sec}]")
        for key, spec in keys.items():
            v = spec.default
            v = ("true" if v else "false") if isinstance(v, bool) else v
            choices = f" ({' | '.join(map(str, spec.choices))})" if spec.choices else ""
            lines.append(f"; {spec.help}{choices}")
            lines.append(f"{key} = {v}")
        lines.append("")
    return "\n".join(lines)
