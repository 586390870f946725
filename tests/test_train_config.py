"""TrainConfig: overrides from JSON/INI files and --set; unknown keys and bad values rejected."""
from __future__ import annotations

import json

import pytest

from trainer.config import TrainConfig, build_config


def test_overrides_in_order(tmp_path):
    j = tmp_path / "a.json"
    j.write_text(json.dumps({"layers": 1, "units": 36, "attention": False}))
    ini = tmp_path / "b.ini"
    ini.write_text("[train]\nunits = 128\nlr = 0.01\n")
    cfg = build_config([j, ini], ["lookback=30", "feedback=false"])
    assert (cfg.layers, cfg.units, cfg.lr, cfg.lookback, cfg.attention, cfg.feedback) == (1, 128, 0.01, 30, False, False)
    m = cfg.model_config()
    assert (m.layers, m.units, m.lookback) == (1, 128, 30)
    assert TrainConfig().layers == 3 and TrainConfig().units == 256 and TrainConfig().lookback == 15


def test_unknown_key_named(tmp_path):
    j = tmp_path / "bad.json"
    j.write_text(json.dumps({"unitz": 3}))
    with pytest.raises(ValueError, match="unitz"):
        build_config([j])
    with pytest.raises(ValueError, match="epochz"):
        build_config([], ["epochz=3"])
    with pytest.raises(ValueError, match="key=value"):
        build_config([], ["layers"])


def test_bad_values(tmp_path):
    with pytest.raises(ValueError, match="layers"):
        build_config([], ["layers=many"])
    with pytest.raises(ValueError, match="attention"):
        build_config([], ["attention=maybe"])
    with pytest.raises(ValueError, match="kind"):
        build_config([], ["kind=gru"])
    with pytest.raises(ValueError, match="budget_clock"):
        build_config([], ["budget_clock=sundial"])
    with pytest.raises(ValueError, match="selection"):
        build_config([], ["selection=best"])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_config([tmp_path / "nope.json"])
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="x.json"):
        build_config([tmp_path / "x.json"])


def test_shipped_config_files_are_valid():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "configs"
    files = sorted(root.glob("*.json")) + sorted(root.glob("*.ini"))
    for f in files:
        build_config([f])
