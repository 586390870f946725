"""The models: streaming step == sequence model, causality, scheduled-sampling mask, configs."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from trainer.model import (N_OUT, N_POSE, ModelConfig, build_sequence_model, build_step_model, copy_weights,
                           make_noise, run_free, run_step_model, set_gain, set_normalization, set_posture,
                           set_smoothing, smooth_np, step_state_specs)

pytestmark = pytest.mark.train
F = 9


def _model(mcfg, seed=0):
    m = build_sequence_model(mcfg, F)
    rng = np.random.default_rng(seed)
    set_normalization(m, rng.normal(size=F), rng.uniform(0.5, 2.0, F), rng.uniform(-0.3, 0.3, N_POSE))
    return m


@pytest.mark.parametrize("mcfg", [
    ModelConfig(layers=2, units=16, lookback=5, dec_units=12, noise_dims=3),
    ModelConfig(layers=1, units=8, lookback=1, dec_units=8, attention=False, feedback=False),
    ModelConfig(layers=1, units=8, lookback=30, dec_units=8),
])
def test_step_model_matches_sequence_model_free_running(mcfg):
    seq = _model(mcfg)
    if mcfg.output_gain:
        set_gain(seq, 1.7)
    if mcfg.smooth:
        set_smoothing(seq, 0.6, 0.7 if mcfg.has_smooth2 else None)
    if mcfg.has_posture:
        set_posture(seq, 0.2, 1.3)
    step = build_step_model(mcfg, F)
    assert copy_weights(seq, step) >= mcfg.layers + 2
    # The fed-back pose is a state only when the decoder reads it (an unread input cannot be quantized).
    assert ("prev_pose" in dict(step_state_specs(mcfg))) == mcfg.feedback
    assert ("prev_pose" in step.input) == mcfg.feedback
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, F)).astype(np.float32)
    noise = make_noise(40, mcfg.noise_dims, rng)
    a = run_free(seq, mcfg, x, noise)
    b = run_step_model(step, mcfg, x, noise)
    assert a.shape == b.shape == (40, N_OUT)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(a[:, :N_POSE]).max() <= 1.0
    assert np.std(a[:, :N_POSE], axis=0).mean() > 0  # not constant: the weights really arrived


def test_output_smoothing_matches_numpy_and_cuts_jerk():
    mcfg = ModelConfig(layers=1, units=8, lookback=3, dec_units=8, output_gain=False)
    seq = _model(mcfg)
    x = np.random.default_rng(4).normal(size=(60, F)).astype(np.float32)
    raw = run_free(seq, mcfg, x)[:, :N_POSE]
    set_smoothing(seq, 0.4)
    sm = run_free(seq, mcfg, x)[:, :N_POSE]
    mean = seq.get_layer("pose_smooth").get_weights()[0]
    assert np.abs(sm - smooth_np(raw, mean, 0.4)).max() < 1e-5
    assert np.abs(np.diff(sm, 3, axis=0)).mean() < np.abs(np.diff(raw, 3, axis=0)).mean()


def test_posture_stage_matches_numpy():
    """The gain about the running posture: the sequence and step models compute what
    trainer.train.apply_output_stage does, and beta = 0 is the gain about the mean pose."""
    from trainer.train import apply_output_stage

    mcfg = ModelConfig(layers=1, units=8, lookback=3, dec_units=8)
    assert mcfg.has_posture and ("posture_pose", (N_POSE,)) in step_state_specs(mcfg)
    seq = _model(mcfg, seed=2)
    x = np.random.default_rng(5).normal(size=(80, F)).astype(np.float32)
    raw = run_free(seq, mcfg, x)[:, :N_POSE]  # alpha 1, gain 1: the decoder's pose
    mean = seq.get_layer("pose_smooth").get_weights()[0]
    set_smoothing(seq, 0.5)
    set_gain(seq, 2.0)
    about_mean = run_free(seq, mcfg, x)[:, :N_POSE]
    assert np.abs(about_mean - np.clip(apply_output_stage(raw, mean, 0.5, 2.0), -1, 1)).max() < 1e-5
    set_posture(seq, 0.1, 1.5)
    set_smoothing(seq, 0.5, 0.6)  # and the second pole
    got = run_free(seq, mcfg, x)
    want = np.clip(apply_output_stage(raw, mean, 0.5, 2.0, 0.1, 1.5, alpha2=0.6), -1, 1)
    assert np.abs(got[:, :N_POSE] - want).max() < 1e-5
    assert np.abs(got[:, :N_POSE] - about_mean).max() > 1e-3  # the posture really moves the centre
    step = build_step_model(mcfg, F)
    copy_weights(seq, step)
    assert np.abs(run_step_model(step, mcfg, x) - got).max() < 1e-5


def test_state_noise_only_while_training():
    """ModelConfig.state_noise perturbs the decoder's h and c in training calls only; the step
    model (no noise) still equals the sequence model at inference."""
    mcfg = ModelConfig(layers=1, units=8, lookback=3, dec_units=8, state_noise=0.05, dropout=0.0)
    seq = _model(mcfg, seed=3)
    x = np.random.default_rng(6).normal(size=(1, 30, F)).astype(np.float32)
    feed = {"x": x, "prev": np.zeros((1, 30, N_POSE), np.float32), "tf_mask": np.zeros((1, 30, 1), np.float32)}
    a, b = (np.asarray(seq(feed, training=True)) for _ in range(2))
    assert np.abs(a - b).max() > 1e-4  # noise drawn afresh each call
    c, d = (np.asarray(seq(feed, training=False)) for _ in range(2))
    assert np.abs(c - d).max() == 0.0
    step = build_step_model(mcfg, F)
    copy_weights(seq, step)
    assert np.abs(run_step_model(step, mcfg, x[0]) - run_free(seq, mcfg, x[0])).max() < 1e-5


def test_legacy_model_config_has_no_posture():
    """A run saved before the posture stage loads as it was trained (no posture weight, no state)."""
    d = ModelConfig(layers=1, units=8).to_dict()
    del d["posture"], d["smooth2"]
    old = ModelConfig.from_dict(d)
    assert not old.has_posture and "posture_pose" not in dict(step_state_specs(old))
    assert not old.has_smooth2 and "smooth_pose2" not in dict(step_state_specs(old))
    with pytest.raises(ValueError, match="no posture"):
        set_posture(build_sequence_model(old, F), 0.1)


def test_step_model_states_and_plain_ops():
    import tensorflow as tf

    mcfg = ModelConfig(layers=2, units=8, lookback=4, dec_units=8)
    step = build_step_model(mcfg, F)
    names = {i.name for i in step.inputs}
    assert names == {"x"} | {n for n, _ in step_state_specs(mcfg)}
    assert set(step.output) >= {"pose", "dheading"} | {n + "_out" for n, _ in step_state_specs(mcfg)}
    specs = {i.name: tf.TensorSpec(i.shape, tf.float32) for i in step.inputs}
    graph = tf.function(lambda d: step(d)).get_concrete_function(specs).graph
    ops = {op.type for op in graph.get_operations()}
    assert not {"While", "StatelessWhile", "TensorListReserve"} & ops, ops


@pytest.mark.parametrize("kind", ["ours", "cnn", "am", "sa"])
def test_causal(kind):
    mcfg = ModelConfig(kind=kind, layers=2, units=8, lookback=6, dec_units=8, dropout=0.0)
    m = _model(mcfg)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, F)).astype(np.float32)
    y = x.copy()
    y[20:] += rng.normal(size=(10, F)).astype(np.float32) * 3
    a, b = run_free(m, mcfg, x), run_free(m, mcfg, y)
    assert a.shape == (30, N_OUT)
    assert np.abs(a[:20] - b[:20]).max() < 1e-5
    assert np.abs(a[20:] - b[20:]).max() > 1e-4


def test_teacher_forcing_mask_selects_the_fed_back_pose():
    mcfg = ModelConfig(layers=1, units=8, lookback=3, dec_units=8, dropout=0.0)
    m = _model(mcfg)
    rng = np.random.default_rng(3)
    T = 12
    feed = {"x": rng.normal(size=(1, T, F)).astype(np.float32),
            "prev": rng.uniform(-1, 1, (1, T, N_POSE)).astype(np.float32)}
    other = dict(feed, prev=rng.uniform(-1, 1, (1, T, N_POSE)).astype(np.float32))
    for mask, differs in ((0.0, False), (1.0, True)):
        mk = np.full((1, T, 1), mask, np.float32)
        a = np.asarray(m({**feed, "tf_mask": mk}))
        b = np.asarray(m({**other, "tf_mask": mk}))
        assert (np.abs(a - b).max() > 1e-4) == differs


def test_model_config_errors():
    with pytest.raises(ValueError, match="kind"):
        ModelConfig(kind="gru")
    with pytest.raises(ValueError, match="units"):
        ModelConfig(units=0)
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="only 'ours'"):
        build_step_model(ModelConfig(kind="cnn"), F)
