"""End to end, small: fake dances in the release's format -> a tiny trained run ->
`python -m converter convert RUN --quantize int8 --out DIR --report` -> a bundle the device loads."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from converter.cli import main as converter_main  # noqa: E402
from device import model as dm  # noqa: E402
from trainer import dataset  # noqa: E402
from trainer.config import build_config  # noqa: E402
from trainer.train import train  # noqa: E402

pytestmark = [pytest.mark.train, pytest.mark.slow]

SMALL = ["layers=1", "units=16", "dec_units=16", "lookback=4", "chunk_frames=50", "batch_size=4",
         "ss_epochs=1", "val_max_frames=0", "minutes=1", "patience=50", "epochs=2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("m2d")
    for i, style in enumerate("WWWC"):
        dataset.write_fake_dance(root / f"DANCE_{style}_{i + 1}", seconds=8.0, seed=i, audio_format="wav")
    run = tmp_path_factory.mktemp("run") / "run"
    cache = tmp_path_factory.mktemp("cache")
    train(build_config([], SMALL + [f"data_root={root}", f"cache_dir={cache}"]), run, progress=False)
    return run, root


def test_convert_int8_with_report(tiny_run, tmp_path, capsys):
    run, root = tiny_run
    out = tmp_path / "bundle"
    rc = converter_main(["convert", str(run), "--quantize", "int8", "--out", str(out), "--report",
                         "--samples", "50", "--calib-frames", "100"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "step == sequence (float)" in text
    b = dm.load_bundle(out)
    m = b.manifest
    assert m["model"]["quantize"] == "int8" and b.inputs["x"].dtype == "int8"
    assert m["training"]["step_vs_sequence_max_abs_diff"] <= 1e-4
    assert m["training"]["val_dances"] and not set(m["training"]["val_dances"]) & set(m["training"]["train_dances"])
    held = m["metrics"]["held_out"]
    assert held["size_ratio"] < 1.0 and held["step_median_ms"] > 0
    assert np.isfinite(held["mse"]) and np.isfinite(held["bas"])
    poses, _ = b.stepper().run(np.zeros((10, b.n_features), np.float32))
    assert poses.shape == (10, 14, 2)
    # The output stage was refitted to the int8 model's own output; the Keras one is kept beside it.
    assert m["pose_post_keras"]["gain"] >= 1.0 and m["pose_post_fit"]["dances"] >= 1
    assert set(m["pose_post"]) == set(m["pose_post_keras"])
    from device import selftest

    r = selftest.check_bundle(out)
    assert r.status == "PASS", r.line()  # the golden output was rewritten with the refitted stage
    json.dumps(m)  # plain JSON all the way down

    # Where its error arises, output by output.
    assert converter_main(["diagnose", str(run), "--bundle", str(out), "--frames", "30"]) == 0
    text = capsys.readouterr().out
    assert "| pose | " in text and "| dec_c_out | " in text


def test_convert_errors(tmp_path, capsys):
    assert converter_main(["convert", str(tmp_path / "no-run"), "--out", str(tmp_path / "b")]) == 2
    assert "not a trained run" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--readout-frames", "--samples", "--calib-frames"])
@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_counts_must_be_positive(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        converter_main(["convert", str(tmp_path / "run"), "--out", str(tmp_path / "b"), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "at least 1" in err and repr(value) in err
    with pytest.raises(SystemExit) as e:  # diagnose's own count too
        converter_main(["diagnose", str(tmp_path / "run"), "--bundle", str(tmp_path / "b"), "--frames", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--frames" in err and "at least 1" in err and repr(value) in err


def test_help():
    with pytest.raises(SystemExit) as e:
        converter_main(["--help"])
    assert e.value.code == 0
