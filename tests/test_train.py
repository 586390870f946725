"""End to end, small: fake dances in the release's format -> train -> resume -> generate."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from trainer import dataset
from trainer.cli import main as cli_main
from trainer.config import build_config
from trainer.train import train

pytestmark = [pytest.mark.train, pytest.mark.slow]

SMALL = ["layers=1", "units=16", "dec_units=16", "lookback=4", "chunk_frames=50", "batch_size=4",
         "ss_epochs=2", "lr=0.005", "lr_final=0.001", "val_max_frames=0", "minutes=2", "patience=50",
         "cache_dir=", "gif_frames=10"]


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("m2d")
    for i, style in enumerate("WWC"):
        dataset.write_fake_dance(root / f"DANCE_{style}_{i + 1}", seconds=6.0, seed=i, audio_format="wav")
    return root


def test_train_resume_generate(fake_root, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDANCE_DATA", str(fake_root))
    run = tmp_path / "run"
    cfg = build_config([], SMALL + ["epochs=6", "selection=calibrated"])
    m = train(cfg, run, progress=False)
    hist = json.loads((run / "history.json").read_text())
    assert len(hist) == 6
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["train_pose"] < hist[0]["train_pose"]
    for name in ("train_config.json", "model_config.json", "feature_config.json", "feature_hash.txt",
                 "split.json", "normalization.json", "history.json", "metrics.json", "model.weights.h5",
                 "ckpt/last.weights.h5", "ckpt/optimizer.npz", "ckpt/state.json", "plots/loss.png"):
        assert (run / name).is_file(), name
    split = json.loads((run / "split.json").read_text())
    assert split["val"] and not set(split["val"]) & set(split["train"])
    assert np.isfinite(m["val_mean"]["mse"]) and m["training"]["epochs"] == 6
    # Epochs are ranked by their output after the fitted low-pass and gain (what ships).
    assert all("val_cal_mse" in h and "val_raw_score" in h and "val_cal_gain" in h for h in hist)
    assert m["training"]["best_epoch"] == 1 + int(np.argmin([h["val_score"] for h in hist]))

    # Resume: continues from epoch 6 to 8 with the same split, history extended.
    m2 = train(build_config([], SMALL + ["epochs=8", "selection=calibrated"]), run, resume=True, progress=False)
    hist2 = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist2] == list(range(1, 9))
    assert hist2[:6] == hist
    assert m2["training"]["epochs"] == 8
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, run, progress=False)

    # Re-finishing a run (new gain fit, metrics with the current features) keeps its training record.
    from trainer.train import refinish

    m3 = refinish(run)
    assert m3["training"] == m2["training"] and "calibration" in m3
    assert 1.0 <= m3["calibration"]["gain"] <= 3.0

    # Fine-tuning from the run (init_from): it starts from the run's weights with the fitted
    # output stage off.
    from trainer.model import build_sequence_model, load_run, output_stage_params
    from trainer.train import init_weights

    seq, mcfg, _, _ = load_run(run)
    fresh = build_sequence_model(mcfg, seq.get_layer("feat_norm").get_weights()[0].shape[-1])
    init_weights(fresh, mcfg, run)
    w_run, w_new = seq.get_layer("decoder").get_weights(), fresh.get_layer("decoder").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(w_run, w_new))
    st_run, st_new = output_stage_params(seq), output_stage_params(fresh)
    assert (st_new["gain"], st_new["alpha"], st_new["beta"]) == (1.0, 1.0, 0.0) and st_new != st_run
    with pytest.raises(FileNotFoundError, match="init_from"):
        init_weights(fresh, mcfg, tmp_path / "nowhere")
    ft = train(build_config([], SMALL + ["epochs=1", f"init_from={run}", "gif_frames=0"]), tmp_path / "ft",
               progress=False)
    assert np.isfinite(ft["val_mean"]["mse"])
    assert json.loads((tmp_path / "ft" / "train_config.json").read_text())["init_from"] == str(run)

    # MSE at equal motion energy: the same fitted output stage for every model; absent runs left out.
    from device.contract import DEFAULT_FEATURES
    from trainer.experiments import matched_energy
    from trainer.train import load_data

    tr, va = load_data(cfg, DEFAULT_FEATURES, run)
    me = matched_energy({"ours": run, "absent": tmp_path / "none"}, tr, va)
    assert set(me) == {"ours"} and 1.0 <= me["ours"]["gain"] <= 10.0
    assert np.isfinite(me["ours"]["mse"]) and me["ours"]["energy_ratio"] > 0

    # The reports read the run folder.
    from trainer.experiments import write_report, write_training_report, _row

    doc = tmp_path / "training.md"
    write_training_report(run, {"CNN": tmp_path / "missing"}, doc, "test")
    text = doc.read_text()
    assert "| ours (shipped" in text and "| mean pose |" in text and "| other song" in text
    assert "CNN" not in text  # a run that does not exist is left out, not invented
    rows = {"r": _row("r", run)}
    write_report("t", rows, {"study": ["r", "absent"]}, tmp_path / "exp.md", 1.0, "test", tmp_path)
    exp = (tmp_path / "exp.md").read_text()
    assert "| r |" in exp and "| absent | not run" in exp

    # Generate from the run folder through the CLI.
    song = next(fake_root.glob("DANCE_C_*")) / "audio.wav"
    out = tmp_path / "p.npy"
    assert cli_main(["generate", str(song), "--out", str(out), "--model", str(run),
                     "--heading-out", str(tmp_path / "h.npy")]) == 0
    p = np.load(out)
    assert p.ndim == 3 and p.shape[1:] == (14, 2) and p.shape[0] >= 140
    assert np.all(np.abs(p) <= 1.0) and np.isfinite(p).all()
    assert np.load(tmp_path / "h.npy").shape == (p.shape[0],)


def test_cpu_budget_stops_training(fake_root, tmp_path, monkeypatch):
    """budget_clock=cpu counts the process's CPU time: a tiny budget stops after the first step."""
    monkeypatch.setenv("EDGEDANCE_DATA", str(fake_root))
    m = train(build_config([], SMALL + ["epochs=50", "minutes=0.0001", "budget_clock=cpu", "threads=1",
                                        "gif_frames=0"]), tmp_path / "run", progress=False)
    t = m["training"]
    assert t["stop_reason"] == "time" and t["epochs"] == 1
    assert t["budget_clock"] == "cpu" and t["train_cpu_seconds"] > 0


def test_output_stage_fit():
    """The output stage recovers the gain that undoes a shrunken copy of the dance."""
    from trainer.train import apply_output_stage, fit_output_stage

    rng = np.random.default_rng(0)
    t = np.arange(600)[:, None]
    gt = 0.3 * np.sin(2 * np.pi * t / 25.0 + rng.uniform(0, 6, 28)) + rng.normal(0, 0.01, (600, 28))
    mean = gt.mean(0)
    raw = mean + 0.4 * (gt - mean)
    st = fit_output_stage([(raw, gt)], mean, max_gain=4.0, smooth=False)
    assert st["alpha"] == 1.0 and st["gain"] == pytest.approx(2.5, rel=0.02)
    assert np.allclose(apply_output_stage(raw, mean, 1.0, st["gain"]), gt, atol=0.01)
    capped = fit_output_stage([(raw, gt)], mean, max_gain=2.0, smooth=False)
    assert capped["gain"] == 2.0


def test_output_stage_fit_posture():
    """A dancer who changes stance slowly half-way, and a model that follows the stance but moves 0.4x
    as much: the gain about the mean pose caricatures the stance, the gain about the running
    posture does not; the fit picks a posture and the same gain."""
    from trainer.train import POSTURE_TAUS_S, apply_output_stage, fit_output_stage

    rng = np.random.default_rng(1)
    t = np.arange(1200)[:, None]
    stance = 0.2 * np.tanh((t - 600) / 50.0) * rng.uniform(0.5, 1.0, 28)  # over about 4 s
    motion = 0.2 * np.sin(2 * np.pi * t / 25.0 + rng.uniform(0, 6, 28))
    gt = stance + motion
    mean = gt.mean(0)
    raw = stance + 0.4 * motion
    st = fit_output_stage([(raw, gt)], mean, max_gain=4.0, smooth=False, posture=True)
    assert st["beta"] == pytest.approx(1.0 / (POSTURE_TAUS_S[0] * 25.0))
    assert st["gain"] == pytest.approx(2.5, rel=0.05)
    assert st["posture_gain"] == 1.0  # one song: no spread between songs to match
    by_tau = {p["tau_s"]: p["mse"] for p in st["postures"]}
    assert by_tau[POSTURE_TAUS_S[0]] < 0.3 * by_tau[None]
    mse = lambda p: float(np.mean((p[50:] - gt[50:]) ** 2))  # noqa: E731 (after the posture settles)
    assert mse(apply_output_stage(raw, mean, 1.0, st["gain"], st["beta"])) < 0.1 * mse(apply_output_stage(raw, mean, 1.0, st["gain"]))


def test_gain_at_level():
    """MSE at equal energy: the gain is found for the common energy level even when energy is
    not quite proportional to it (a posture part the gain does not scale)."""
    from trainer.experiments import gain_at_level

    g, e = gain_at_level(lambda g: 0.05 + 0.1 * g + 0.01 * g * g, 6.0, 0.5)
    assert e == pytest.approx(0.5, abs=2e-3) and 0.05 + 0.1 * g + 0.01 * g * g == pytest.approx(e)


def test_posture_gain_matches_the_dancers_spread():
    """Three songs whose stances the model guesses at half their distance from the mean: the
    posture gain doubles them back."""
    from trainer.train import fit_output_stage

    rng = np.random.default_rng(2)
    t = np.arange(800)[:, None]
    pairs = []
    for k in range(3):
        stance = rng.normal(0, 0.15, 28)
        motion = 0.2 * np.sin(2 * np.pi * t / 25.0 + rng.uniform(0, 6, 28))
        gt = stance + motion
        pairs.append((0.5 * stance + 0.4 * motion, gt))
    mean = np.mean([gt.mean(0) for _, gt in pairs], axis=0)
    st = fit_output_stage(pairs, mean, max_gain=4.0, smooth=False, posture=True)
    assert st["beta"] > 0 and st["posture_gain"] == pytest.approx(2.0, rel=0.1)


def test_cli_errors(tmp_path, capsys):
    assert cli_main(["train", "--set", "unitz=3", "--out", str(tmp_path / "r")]) == 2
    assert "unitz" in capsys.readouterr().err
    assert cli_main(["generate", "x.wav", "--out", str(tmp_path / "p.npy"), "--model", str(tmp_path)]) == 2
    assert "model.weights.h5" in capsys.readouterr().err
