"""The host-side pieces of bench.arm64 that can be checked without emulation: which apt mirror
it picks, which files it copies into the root, how it compares the two sides, its arguments."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from bench import arm64


def test_mirror_from_deb822_skips_security_and_disabled(tmp_path):
    f = tmp_path / "debian.sources"
    f.write_text(
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n")
    assert arm64.apt_mirror([f]) == "http://mirror.example/debian"


def test_mirror_from_one_line_format_with_options(tmp_path):
    f = tmp_path / "sources.list"
    f.write_text("# deb http://commented.example/debian bookworm main\n"
                 "deb http://security.example/debian-security bookworm-security main\n"
                 "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main contrib\n")
    assert arm64.apt_mirror([tmp_path / "missing.list", f]) == "http://one.example/debian"


def test_no_mirror_names_the_files_and_the_fix(tmp_path):
    f = tmp_path / "x.list"
    f.write_text("deb http://ubuntu.example/ubuntu jammy main\n")
    with pytest.raises(arm64.Arm64Error, match=r"x\.list.*--mirror"):
        arm64.apt_mirror([f])


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_working_tree_files_tracked_untracked_not_ignored(tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text(".venv/\n*.pyc\n")
    (repo / "pkg").mkdir()
    for name in ("pkg/a.py", "pkg/gone.py", "new.txt", "pkg/a.pyc", ".venv/lib.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(name)
    subprocess.run(["git", "-C", str(repo), "add", ".gitignore", "pkg/a.py", "pkg/gone.py"], check=True)
    (repo / "pkg" / "gone.py").unlink()  # tracked, deleted in the working tree
    assert arm64.working_tree_files(repo) == [".gitignore", "new.txt", "pkg/a.py"]
    n = arm64.copy_tree(repo, tmp_path / "copy")
    assert n == 3 and (tmp_path / "copy" / "pkg" / "a.py").read_text() == "pkg/a.py"
    assert not (tmp_path / "copy" / ".venv").exists()


def _side(d, pcm, mel, x, meta, poses=None):
    d.mkdir()
    np.save(d / "pcm.npy", pcm)
    np.save(d / "log_mel.npy", mel)
    np.save(d / "F.npy", x)
    (d / "F.json").write_text(json.dumps(meta))
    if poses is not None:
        np.save(d / "poses.npy", poses)
        np.save(d / "headings.npy", np.zeros(len(poses)))


def test_compare_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    pcm = rng.integers(-3000, 3000, 1600).astype(np.int16)
    mel = rng.integers(-20000, 0, (50, 40)).astype(np.int16)
    x = rng.standard_normal((10, 46)).astype(np.float32)
    poses = rng.uniform(-1, 1, (10, 14, 2)).astype(np.float32)
    meta = {"beat_times": [0.5, 1.0], "feature_config_hash": "abc"}
    _side(tmp_path / "a", pcm, mel, x, meta, poses)
    _side(tmp_path / "b", pcm, mel, x, meta, poses)
    r = arm64.compare_song(tmp_path / "a", tmp_path / "b")
    assert r["pcm_identical"] and r["log_mel_identical"] and r["features_identical"] and r["sidecar_identical"]
    assert r["features_max_abs_diff"] == 0.0 and r["pcm_samples_differing"] == 0
    assert arm64.compare_poses(tmp_path / "a", tmp_path / "b")["poses_identical"]

    pcm2, mel2, x2 = pcm.copy(), mel.copy(), x.copy()
    pcm2[[5, 900]] += 1  # two samples, one LSB
    mel2[7, 3] ^= 1  # one bit
    x2[2, 5] = np.nextafter(x2[2, 5], np.float32(np.inf))  # one ulp
    _side(tmp_path / "c", pcm2, mel2, x2, {**meta, "beat_times": [0.5, 1.04]}, poses + 1e-3)
    r = arm64.compare_song(tmp_path / "a", tmp_path / "c")
    assert not (r["pcm_identical"] or r["log_mel_identical"] or r["features_identical"] or r["sidecar_identical"])
    assert r["pcm_samples_differing"] == 2 and r["pcm_max_abs_diff"] == 1 and r["log_mel_max_abs_diff"] == 1
    assert 0 < r["features_max_abs_diff"] < 1e-6
    rp = arm64.compare_poses(tmp_path / "a", tmp_path / "c")
    assert not rp["poses_identical"] and rp["poses_max_abs_diff"] == pytest.approx(1e-3, rel=1e-2)

    _side(tmp_path / "d", pcm, mel.astype(np.int32), x, meta)  # same values, wrong dtype: not identical
    assert not arm64.compare_song(tmp_path / "a", tmp_path / "d")["log_mel_identical"]


def test_root_complete(tmp_path):
    assert not arm64.root_complete(tmp_path)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "debian_version").write_text("12.12\n")
    (tmp_path / "debootstrap").mkdir()  # second stage not finished
    assert not arm64.root_complete(tmp_path)
    (tmp_path / "debootstrap").rmdir()
    assert arm64.root_complete(tmp_path)


def test_cli_help_and_probe_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        arm64.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--root" in out and "--keep" in out
    with pytest.raises(SystemExit, match="--wav"):
        arm64.main(["--probe", "/nonexistent"])
