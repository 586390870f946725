"""deploy/: the systemd unit (systemd-analyze verify), install.sh into a throwaway --prefix
(offline: pip gets --no-index --no-deps, the dependencies come from this .venv via PYTHONPATH),
the upgrade path, --pack for first boot, and the first-boot scripts."""
from __future__ import annotations

import configparser
import os
import pathlib
import shutil
import subprocess
import sysconfig
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "edgedance-device.service"
SYSTEM_PYTHON = shutil.which("python3.11", path="/usr/bin:/usr/local/bin") or shutil.which("python3", path="/usr/bin")


def _unit(path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(path)
    return cp


def test_unit_restarts_watches_and_runs_unprivileged():
    u = _unit(UNIT)
    s = u["Service"]
    assert s["Type"] == "notify" and s["Restart"] == "on-failure" and int(s["WatchdogSec"]) >= 5
    assert s["User"] not in ("", "root") and "audio" in s["SupplementaryGroups"].split()
    assert s["ExecStart"].split()[1:4] == ["-m", "device", "run"] and "--config /etc/edgedance/device.ini" in s["ExecStart"]
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_setup_cfg_device_extra_has_no_tensorflow():
    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    extra = cp["options.extras_require"]["device"].lower()
    assert "tensorflow" not in extra and "keras" not in extra
    assert "ai-edge-litert" in extra and "paho-mqtt" in extra and "pyaudio" in extra


def _install(prefix, bundle, *extra, config=None):
    site = sysconfig.get_paths()["purelib"]  # this .venv's packages stand in for PyPI
    env = dict(os.environ, PYTHONPATH=site)
    args = ["bash", str(DEPLOY / "install.sh"), "--prefix", str(prefix), "--no-apt", "--python", SYSTEM_PYTHON,
            "--bundle", str(bundle), "--pip-args", "--no-index --no-deps --no-build-isolation",
            "--selftest-args", "--max-p99-ms 5000 --max-cpu-ms 1000", *extra]  # no timing verdicts in tests
    if config:
        args += ["--config", str(config)]
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(not SYSTEM_PYTHON, reason="no system python3 to build a venv with")
def test_install_into_a_throwaway_prefix_then_upgrade(tiny_bundle, tmp_path):
    prefix = tmp_path / "root"
    cfg = tmp_path / "my.ini"
    cfg.write_text("[audio]\nsource = stdin\n[mqtt]\nhost = broker.local\n")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    before = subprocess.run(["git", "status", "--porcelain", "--ignored", "build"], cwd=REPO, capture_output=True,
                            text=True).stdout
    r = _install(prefix, tiny_bundle, "--device-id", "pi-test", "--mqtt-password-file", str(pw), config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    app, etc = prefix / "opt" / "edgedance", prefix / "etc" / "edgedance"
    # the selftest inside install.sh ran against the installed tree and passed
    assert "PASS frontend" in r.stdout and "PASS realtime" in r.stdout and "all checks passed" in r.stdout
    # the installed package, not the checkout
    py = app / "venv" / "bin" / "python"
    out = subprocess.run([str(py), "-c", "import device, sys; print(device.__file__)"], capture_output=True,
                         text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}).stdout
    assert out.startswith(str(app / "venv")), out
    assert not list((app / "venv" / "lib").glob("python3*/site-packages/tensorflow"))
    assert (app / "models" / "default" / "manifest.json").is_file()
    # the config: the user's file plus the keys install.sh sets, pointing into the prefix
    from device import settings
    s = settings.load(etc / "device.ini", env={})
    assert (s.device.id, s.mqtt.username, s.mqtt.host, s.audio.source) == ("pi-test", "device-pi-test", "broker.local",
                                                                           "stdin")
    assert s.device.bundle == str(app / "models" / "default") and s.mqtt_password() == "s3cret"
    assert oct((etc / "mqtt.password").stat().st_mode & 0o777) == "0o640"
    unit = prefix / "etc" / "systemd" / "system" / "edgedance-device.service"
    assert f"ExecStart={py} -m device run --config {etc}/device.ini" in unit.read_text()
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert v.returncode == 0, v.stdout + v.stderr
    # the checkout stays clean: pip built from a private copy
    assert subprocess.run(["git", "status", "--porcelain", "--ignored", "build"], cwd=REPO, capture_output=True,
                          text=True).stdout == before
    # upgrade: a second run keeps the edited device.ini and puts the new example beside it
    (etc / "device.ini").write_text((etc / "device.ini").read_text() + "\n[runtime]\nlog_level = debug\n")
    r = _install(prefix, tiny_bundle)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "log_level = debug" in (etc / "device.ini").read_text() and (etc / "device.ini.new").is_file()


def test_install_refuses_bad_arguments(tmp_path):
    r = subprocess.run(["bash", str(DEPLOY / "install.sh"), "--prefix", str(tmp_path), "--bundle", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a model bundle" in r.stderr
    r = subprocess.run(["bash", str(DEPLOY / "install.sh"), "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown option --frobnicate" in r.stderr
    r = subprocess.run(["bash", str(DEPLOY / "install.sh"), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--prefix DIR" in r.stdout and "--pip-args" in r.stdout


def test_pack_holds_sources_bundle_and_installer(tiny_bundle, tmp_path):
    out = tmp_path / "edgedance-src.tar.gz"
    r = subprocess.run(["bash", str(DEPLOY / "install.sh"), "--pack", str(out), "--bundle", str(tiny_bundle)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as t:
        names = set(t.getnames())
    for n in ("edgedance/setup.cfg", "edgedance/device/pipeline.py", "edgedance/deploy/install.sh",
              "edgedance/deploy/edgedance-device.service", "edgedance/models/default/manifest.json",
              "edgedance/models/default/model.tflite"):
        assert n in names, n
    assert not any("__pycache__" in n or n.startswith("edgedance/tests") for n in names)


def test_firstboot_scripts_are_consistent():
    fr = DEPLOY / "firstboot" / "firstrun.sh"
    assert subprocess.run(["bash", "-n", str(fr)]).returncode == 0
    text = fr.read_text()
    helptext = subprocess.run(["bash", str(DEPLOY / "install.sh"), "--help"], capture_output=True, text=True).stdout
    for opt in ("--bundle", "--config", "--mqtt-password-file"):
        assert opt in text and opt in helptext
    ud = (DEPLOY / "firstboot" / "user-data").read_text()
    assert ud.startswith("#cloud-config\n") and "edgedance-firstrun.sh" in ud and "\t" not in ud
    assert "portaudio19-dev" in ud
