"""converter: a tiny model of the real architecture converted end to end; step == sequence in
Keras; the TFLite variants agree with Keras through the device's StreamingModel."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from converter import bundle as cb  # noqa: E402
from converter import convert as cv  # noqa: E402
from device import model as dm  # noqa: E402

F = 20


@pytest.fixture(scope="module")
def models():
    return cb.tiny_models(F, seed=1, layers=2, units=16)


@pytest.fixture(scope="module")
def song():
    return cb.synthetic_features(120, F, seed=7)


@pytest.fixture(scope="module")
def keras_out(models, song):
    return cv.KerasStepper(models).run(song)  # (T, 29)


def test_signature(models):
    sig = models.signature
    assert sig.n_features == F and sig.noise_dims == 0
    assert [s.name for s in sig.outputs[:2]] == ["pose", "dheading"]
    from trainer.model import step_state_specs

    assert ("att_buf", "att_buf_out") in sig.states
    assert sorted(a for a, _ in sig.states) == sorted(n for n, _ in step_state_specs(models.mcfg))
    assert getattr(models.mcfg, "skip_features", True)  # the fold must also cover the decoder's feature rows


def test_step_equals_sequence(models, song):
    assert cv.check_equivalence(models, song) <= cv.EQUIVALENCE_TOL


def test_equivalence_check_can_fail(models, song):
    w = models.step.get_layer("enc_lstm_1").get_weights()
    try:
        models.step.get_layer("enc_lstm_1").set_weights([w[0] * 1.5, *w[1:]])
        with pytest.raises(cv.ConversionError, match="differs from the sequence model"):
            cv.check_equivalence(models, song[:30])
    finally:
        models.step.get_layer("enc_lstm_1").set_weights(w)


def test_normalization_folded_into_the_first_lstm(models, song):
    x = song[:20]
    assert np.abs(models.feat_mean).max() > 0.1  # the fold has something to do
    np.testing.assert_allclose(cv.KerasStepper(models, folded=True).run(x), cv.KerasStepper(models).run(x), atol=1e-5)


def _stream(models, mode, song, tmp_path, samples=None):
    blob = cv.to_tflite(models, mode, samples)
    out = cb.write_bundle(tmp_path / mode, blob, models, mode)
    poses, heads = dm.load_bundle(out).stepper().run(song)
    return blob, poses, heads


def test_float_tflite_equals_keras(models, song, keras_out, tmp_path):
    _, poses, heads = _stream(models, "float", song, tmp_path)
    np.testing.assert_allclose(poses.reshape(len(song), 28), keras_out[:, :28], atol=1e-4)
    want = np.cumsum(keras_out[:, 28])
    np.testing.assert_allclose(np.unwrap(heads), want, atol=1e-3)


def test_int8_tflite_close_to_keras(models, song, keras_out, tmp_path):
    samples = cv.representative_samples(models, [cb.synthetic_features(200, F, seed=11)], n_samples=100)
    assert set(samples[0]) == {s.name for s in models.signature.inputs}
    fblob = cv.to_tflite(models, "float")
    blob, poses, _ = _stream(models, "int8", song, tmp_path, samples)
    b = dm.load_bundle(tmp_path / "int8")
    assert all(t.dtype == "int8" for t in b.inputs.values())
    assert len(blob) < len(fblob)
    err = np.abs(poses.reshape(len(song), 28) - keras_out[:, :28])
    scale = np.abs(keras_out[:, :28]).mean()
    assert err.mean() < 0.15 * scale, (err.mean(), scale)  # quantization error, not garbage


def test_int8_needs_samples(models):
    with pytest.raises(cv.ConversionError, match="representative"):
        cv.to_tflite(models, "int8", None)


def test_unknown_mode(models):
    with pytest.raises(cv.ConversionError, match="choose one of"):
        cv.to_tflite(models, "int4")
