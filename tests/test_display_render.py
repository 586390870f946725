"""The offline renderer: poses or a recorded stream -> GIF (and MP4 when ffmpeg is there)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from device import protocol
from subscribers.display import render


def test_gif_has_one_frame_per_pose(tmp_path):
    poses = render.demo_poses(37)  # (37, 14, 2)
    assert poses.shape == (37, 14, 2) and np.abs(poses).max() <= 1
    src = tmp_path / "poses.npy"
    np.save(src, poses)
    out = tmp_path / "dance.gif"
    assert render.main([str(src), "--out", str(out), "--size", "160"]) == 0
    with Image.open(out) as im:
        assert im.n_frames == 37 and im.size == (160, 160)
        assert im.info["duration"] == 40  # 25 fps
        im.seek(0)
        first = np.asarray(im.convert("RGB")).astype(int)
        im.seek(18)
        middle = np.asarray(im.convert("RGB")).astype(int)
    assert (np.abs(first - middle).max(-1) > 40).mean() > 0.005, "the figure does not move between frames"


def test_static_pose_still_gives_every_frame(tmp_path):
    poses = np.repeat(render.demo_poses(1), 12, axis=0)  # (12, 14, 2), all the same
    src = tmp_path / "still.npy"
    np.save(src, poses)
    out = render.write_gif(render.load(src, fps=10.0), tmp_path / "still.gif", size=96)
    with Image.open(out) as im:
        assert im.n_frames == 12 and im.info["duration"] == 100


def test_figure_is_drawn_y_up():
    poses = render.demo_poses(1)
    img = np.asarray(next(render.frames(render.Clip(poses=poses, fps=25.0), size=200))).astype(int)
    head_row = 200 * 0.52 - poses[0, 0, 1] * 200 * 0.4
    ankle_row = 200 * 0.52 - poses[0, 10, 1] * 200 * 0.4
    assert head_row < ankle_row
    torso = np.array(render.TORSO)
    head_col = int(100 + poses[0, 0, 0] * 200 * 0.4)
    assert np.abs(img[int(head_row), head_col] - torso).max() < 30  # the head is where y up puts it


def test_recorded_stream(tmp_path):
    poses = render.demo_poses(20)
    lines, now = [], time.time()
    for i, kp in enumerate(poses):
        beat = {"bpm": 120.0, "phase": (i % 12) / 12, "bar_phase": (i % 48) / 48, "meter": 4, "onset": 0.1,
                "is_beat": i % 12 == 0, "next_beat_in": 0.1}
        msg = protocol.pose_message("pi1", i, now + i / 25, frame=i, t_audio=i / 25, t_capture=now + i / 25,
                                    fps=25.0, kp=kp, heading=0.3, beat=beat)
        lines.append(protocol.encode_json(msg).decode())
        if i == 5:
            lines.append(json.dumps({"v": 1, "type": "status", "device": "pi1", "seq": 0, "t": now,
                                     "state": "online"}))
    src = tmp_path / "stream.jsonl"
    src.write_text("\n".join(lines) + "\n")
    clip = render.load(src)
    assert len(clip) == 20 and clip.is_beat.sum() == 2 and np.allclose(clip.poses, poses, atol=1e-6)
    out = render.write_gif(clip, tmp_path / "stream.gif", size=128)
    with Image.open(out) as im:
        assert im.n_frames == 20

    src.write_text("\n".join(lines[:3] + ['{"v": 1, "type": "pose"}'] + lines[3:]) + "\n")
    with pytest.raises(render.RenderError, match=r"stream.jsonl:4: .*--skip-bad"):
        render.load(src)
    assert len(render.load(src, skip_bad=True)) == 20


def test_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((5, 13, 2), np.float32))
    with pytest.raises(render.RenderError, match=r"bad.npy.*\(5, 13, 2\).*\(T, 14, 2\)"):
        render.load(bad)
    with pytest.raises(render.RenderError, match="unknown input type"):
        render.load(tmp_path / "poses.csv")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(render.RenderError, match="no pose messages"):
        render.load(tmp_path / "empty.jsonl")
    clip = render.Clip(poses=render.demo_poses(2), fps=25.0)
    with pytest.raises(render.RenderError, match="use .gif or .mp4"):
        render.render(clip, tmp_path / "x.avi")


@pytest.mark.skipif(not shutil.which("ffmpeg") or not shutil.which("ffprobe"), reason="ffmpeg is not installed")
def test_mp4(tmp_path):
    clip = render.Clip(poses=render.demo_poses(25), fps=25.0)
    out = render.write_mp4(clip, tmp_path / "dance.mp4", size=128)
    probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                            "stream=nb_read_frames,width", "-of", "csv=p=0", str(out)],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "128,25"


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "subscribers.display.render", "--help"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and "--out" in out.stdout
