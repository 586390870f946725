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


def test_narrowed_cell_states_carry_their_product(models):
    """A narrowed LSTM cell state gives its grid to f * c, the product that carries it into
    c' = f * c + i * g (min/max calibration left that product on a 2-6x coarser grid)."""
    from tensorflow.lite.python import schema_py_generated as schema

    samples = cv.representative_samples(models, [cb.synthetic_features(200, F, seed=11)], n_samples=100)
    blob = cv.to_tflite(models, "int8", samples, narrow_states=False)
    sig = models.graph_signature()

    def grids(carry):
        b = cv.narrow_state_ranges(blob, sig, samples, pct=90.0, min_gain=1.0, carry_products=carry)
        m = schema.ModelT.InitFromPackedBuf(bytearray(b), 0)
        sg = m.subgraphs[0]
        ins = {t.name.decode(): t.tensorIndex for t in m.signatureDefs[0].inputs}
        outs = {t.name.decode(): t.tensorIndex for t in m.signatureDefs[0].outputs}
        keys = {n: k for k, n in cv.output_names(sig).items()}
        res = {}
        for state in ("enc_c_0", "dec_c"):
            o = outs[keys[state + "_out"]]
            prods = cv._carried_products(m, ins[state], o, cv._consumers(m, sg), cv._producers(m, sg))
            assert len(prods) == 1, (state, prods)  # exactly f * c
            q = lambda i: (sg.tensors[i].quantization.scale[0], sg.tensors[i].quantization.zeroPoint[0])
            res[state] = (q(o), q(prods[0]))
        return res

    for state, (q_state, q_prod) in grids(True).items():
        assert q_prod == q_state, state
    assert any(q_prod[0] > 1.5 * q_state[0] for q_state, q_prod in grids(False).values())  # coarser without


def test_pose_readout_refitted_to_the_int8_h(models):
    """int8: the pose read-out's weights are refitted (least squares) from the graph's own noisy
    decoder h, this frame's and the previous one's, to the float read-out: on those samples its
    error is lower than the float weights' (which are one candidate of the fit: h_t alone), and
    the graph converted again carries them; the heading's read-out is refitted from h_t."""
    samples = cv.representative_samples(models, [cb.synthetic_features(300, F, seed=12)], n_samples=300)
    blob0 = cv.to_tflite(models, "int8", samples, refit_readout=False)
    assert models.pose_readout is None
    X, Y, (W0, b0) = cv.readout_pairs(models, blob0, samples)
    units = models.mcfg.dec_units
    assert X.shape == (len(samples), 2 * units) and Y.shape == (len(samples), 29)  # [h_t, h_t-1]; pose, heading
    assert W0.shape == (2 * units, 28) and not W0[units:].any()  # the float read-out: h_t only
    fit = cv.fit_pose_readout(models, blob0, samples)
    W, b = fit["pose"]
    before, after = np.mean((X @ W0 + b0 - Y[:, :28]) ** 2), np.mean((X @ W + b - Y[:, :28]) ** 2)
    assert after < before, (after, before)
    assert fit["heading"][0].shape == (units, 1)
    blob1 = cv.to_tflite(models, "int8", samples)
    np.testing.assert_allclose(models.pose_readout["pose"][0], W, rtol=1e-3, atol=1e-5)  # the same fit, kept
    dec = cv.folded_clone(models, models.pose_decode, models.pose_readout).get_layer("decoder")
    np.testing.assert_allclose(dec.pose_out_head.get_weights()[0], models.pose_readout["pose"][0])
    np.testing.assert_allclose(dec.heading_head.get_weights()[1], models.pose_readout["heading"][1])
    assert blob1 != blob0


def test_local_errors(models, song, tmp_path):
    """validate.local_errors: the float graph makes no error of its own in a frame; the int8
    graph's outputs are off by a few steps of their grids, each reported by name."""
    from converter import validate

    cb.write_bundle(tmp_path / "f", cv.to_tflite(models, "float"), models, "float")
    fl = validate.local_errors(tmp_path / "f", models, song[:40])
    assert set(fl) == {o.name for o in models.graph_signature().outputs}
    assert all(e["scale"] == 0.0 and e["max"] < 1e-4 for e in fl.values()), fl
    samples = cv.representative_samples(models, [cb.synthetic_features(200, F, seed=11)], n_samples=100)
    cb.write_bundle(tmp_path / "q", cv.to_tflite(models, "int8", samples), models, "int8")
    q = validate.local_errors(tmp_path / "q", models, song[:40])
    assert all(e["scale"] > 0 for e in q.values())
    assert 0.05 < q["pose"]["mean"] < 20 and q["pose"]["max"] >= q["pose"]["mean"], q["pose"]
    assert q["dec_c_out"]["mean"] < 5, q


def test_int8_needs_samples(models):
    with pytest.raises(cv.ConversionError, match="representative"):
        cv.to_tflite(models, "int8", None)


def test_unknown_mode(models):
    with pytest.raises(cv.ConversionError, match="choose one of"):
        cv.to_tflite(models, "int4")
