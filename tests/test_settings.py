"""device.settings: INI < environment < command line, typed values, errors that name the key."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from device import settings as S

REPO = pathlib.Path(__file__).resolve().parents[1]


def _ini(tmp_path, text: str) -> pathlib.Path:
    p = tmp_path / "device.ini"
    p.write_text(text)
    return p


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "DEFAULT_PATH", str(tmp_path / "absent.ini"))
    s = S.load(None, env={})
    assert s.mqtt.port == 1883 and s.audio.source == "mic" and s.device.format == "json"
    assert s.sources["mqtt.port"] == "default"


def test_precedence_file_then_env_then_flags(tmp_path):
    p = _ini(tmp_path, "[mqtt]\nhost = from-file\nport = 1884\nkeepalive_s = 40\n[device]\nid = pi7\n")
    env = {"EDGEDANCE_MQTT_PORT": "1885", "EDGEDANCE_MQTT_KEEPALIVE_S": "50", "EDGEDANCE_DATA": "/elsewhere"}
    s = S.load(p, env=env, overrides={"mqtt.keepalive_s": "60"})
    assert (s.mqtt.host, s.mqtt.port, s.mqtt.keepalive_s, s.device.id) == ("from-file", 1885, 60, "pi7")
    assert s.sources["mqtt.host"] == str(p)
    assert s.sources["mqtt.port"] == "env EDGEDANCE_MQTT_PORT"
    assert s.sources["mqtt.keepalive_s"] == "command line"
    assert isinstance(s.mqtt.port, int) and isinstance(s.audio.realtime, bool)


@pytest.mark.parametrize("text, match", [
    ("[mqtt]\nprot = 1883\n", r"unknown key 'prot' in \[mqtt\].*port"),
    ("[mqt]\nport = 1883\n", r"unknown section \[mqt\]"),
    ("[mqtt]\nport = abc\n", r"\[mqtt\]: port = 'abc': must be an integer"),
    ("[mqtt]\nport = 70000\n", r"port = '70000': must be in \[1, 65535\]"),
    ("[mqtt]\ntls = maybe\n", r"tls = 'maybe': must be true or false"),
    ("[device]\nformat = xml\n", r"format = 'xml': must be one of json, binary"),
    ("[device]\nid = pi 1\n", r"id = 'pi 1': use 1-64 characters"),
    ("[audio]\nsource = file\n", r"audio.source .* is 'file' but audio.file is empty"),
    ("[mqtt]\ncafile = /nope/ca.crt\ntls = true\n", r"mqtt.cafile .* '/nope/ca.crt': no such file"),
    ("[mqtt]\nport = 1\nport = 2\n", r"not a valid INI file"),
    ("port = 1\n", r"not a valid INI file"),
])
def test_bad_file_values_name_file_section_and_key(tmp_path, text, match):
    p = _ini(tmp_path, text)
    with pytest.raises(S.SettingsError, match=match) as e:
        S.load(p, env={})
    assert str(p) in str(e.value)


def test_bad_env_and_flags_name_their_source(tmp_path):
    with pytest.raises(S.SettingsError, match=r"environment variable EDGEDANCE_MQTT_PORTT: unknown key 'portt'"):
        S.load(None, env={"EDGEDANCE_MQTT_PORTT": "1"})
    with pytest.raises(S.SettingsError, match=r"environment variable EDGEDANCE_AUDIO_RING_S: ring_s = 'x'"):
        S.load(None, env={"EDGEDANCE_AUDIO_RING_S": "x"})
    with pytest.raises(S.SettingsError, match=r"command-line setting 'mqtt.hots'.*unknown key 'hots'"):
        S.load(None, env={}, overrides={"mqtt.hots": "x"})
    with pytest.raises(S.SettingsError, match=r"--set 'mqtt.host': use SECTION.KEY=VALUE"):
        S.parse_set(["mqtt.host"])
    with pytest.raises(S.SettingsError, match="does not exist"):
        S.load(tmp_path / "missing.ini", env={})


def test_password_file_and_secret_masking(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    s = S.load(None, env={"EDGEDANCE_MQTT_PASSWORD_FILE": str(pw)})
    assert s.mqtt_password() == "s3cret"
    s = S.load(None, env={"EDGEDANCE_MQTT_PASSWORD": "hunter2"})
    assert "hunter2" not in s.as_ini() and "********" in s.as_ini()


def test_shipped_example_ini_is_complete_and_valid():
    ini = REPO / "deploy" / "device.ini"
    s = S.load(ini, env={})
    text = ini.read_text()
    for sec, keys in S.SCHEMA.items():
        assert f"[{sec}]" in text
        for key in keys:
            assert f"\n{key} =" in text, f"deploy/device.ini does not document [{sec}] {key}"
    assert s.mqtt.username == "device-pi1"


def test_cli_print_config_and_bad_key_exit_2(tmp_path):
    p = _ini(tmp_path, "[mqtt]\nhost = h1\n")
    env = dict(os.environ, EDGEDANCE_MQTT_PORT="1999")
    r = subprocess.run([sys.executable, "-m", "device", "run", "--config", str(p), "--set", "mqtt.keepalive_s=44",
                        "--print-config"], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "host = h1" in r.stdout and "port = 1999    ; from env EDGEDANCE_MQTT_PORT" in r.stdout
    assert "keepalive_s = 44    ; from command line" in r.stdout
    p.write_text("[mqtt]\nhots = h1\n")
    r = subprocess.run([sys.executable, "-m", "device", "run", "--config", str(p)], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 2 and "unknown key 'hots'" in r.stderr and "Traceback" not in r.stderr
