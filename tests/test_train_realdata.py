"""The shipped model on real held-out dances: it moves, stays in range and locks to the beat."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from trainer import dataset, evaluate
from trainer.model import N_POSE, load_run, run_free

pytestmark = [pytest.mark.realdata, pytest.mark.train]

SHIPPED = pathlib.Path(__file__).resolve().parent.parent / "models" / "default" / "keras"


@pytest.mark.skipif(not (SHIPPED / "model.weights.h5").exists(), reason="no shipped Keras model")
def test_shipped_model_dances_on_held_out_songs(real_data):
    model, mcfg, fcfg, norm = load_run(SHIPPED)
    val = json.loads((SHIPPED / "split.json").read_text())["val"]
    assert val, "the shipped model must record its held-out dances"
    for name in val[:2]:
        d = dataset.load_dance(real_data / name, fcfg, cache_dir=None)
        T = min(len(d.poses), 1500)  # 60 s: enough 9 s windows for the period measure
        out = run_free(model, mcfg, np.asarray(d.features.x[:T], np.float32))
        poses = out[:, :N_POSE].reshape(T, 14, 2)
        assert np.isfinite(poses).all() and np.abs(poses).max() <= 1.0
        gt = d.poses[:T]
        e = evaluate.energy(poses) / evaluate.energy(gt)
        assert 0.4 < e < 2.5, f"{name}: energy ratio {e:.2f} (a frozen or flailing model)"
        pm = evaluate.period_match(poses, d.features)["mean"]
        pm_gt = evaluate.period_match(gt, d.features)["mean"]
        # The measure: the motion repeats at the song's beat or bar period at least as often
        # as the real dancer's motion does on the same song (and far more than another song's dance).
        assert pm >= pm_gt, f"{name}: motion period matches the music in {pm:.0%} of windows, the dancer's {pm_gt:.0%}"
