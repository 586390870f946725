"""`python -m device demo` end to end: real broker, device, robot, display processes."""
import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.train  # the tiny bundle is built with TensorFlow


def test_demo_dances_and_writes_the_gif_and_trace(tmp_path, tiny_bundle):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "device", "demo", "--model", str(tiny_bundle), "--seconds", "6",
                        "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "open the display at http://127.0.0.1:" in r.stdout
    poses = [json.loads(line) for line in (out / "stream.jsonl").read_text().splitlines()]
    frames = [m["frame"] for m in poses if m["type"] == "pose"]
    assert frames == list(range(150)), "every pose frame of the 6 s song arrives, in order"
    states = [m["state"] for m in poses if m["type"] == "status"]
    assert states[0] == "online" and states[-1] == "stopped"
    assert (out / "dance.gif").stat().st_size > 10_000
    assert (out / "robot_trace.png").stat().st_size > 10_000
    robot_log = (out / "logs" / "robot.log").read_text()
    accepted = int(re.search(r"accepted (\d+)", robot_log).group(1))
    assert accepted >= 140, robot_log  # the robot followed (almost) every frame
    assert "malformed 0" in robot_log


def test_demo_without_a_bundle_says_so(tmp_path):
    r = subprocess.run([sys.executable, "-m", "device", "demo", "--model", str(tmp_path / "none"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no model bundle" in r.stderr and "Traceback" not in r.stderr
