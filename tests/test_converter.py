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


def test_pose_readout_refitted_to_the_int8_graph(models):
    """int8: the pose read-out's weights are refitted (least squares) from what the graph holds
    running free (its decoder's h this frame and the previous one, tanh of its cell state, the
    frame's features) to the float model's read-out running free over the same songs: its error
    is lower than the float weights' (one candidate of the fit), and the graph converted again
    carries them; the heading's read-out is refitted from h_t."""
    songs = [cb.synthetic_features(200, F, seed=12), cb.synthetic_features(150, F, seed=13)]
    samples = cv.representative_samples(models, songs, n_samples=300)
    blob0 = cv.to_tflite(models, "int8", samples)  # no songs: the float read-out weights
    assert models.pose_readout is None
    X, Y, (W0, b0) = cv.readout_trajectories(models, blob0, songs)
    u = models.mcfg.dec_units
    assert X.shape == (350, 3 * u + F) and Y.shape == (350, 29)  # [h_t, h_t-1, tanh(c_t), x]; pose, heading
    assert W0.shape == (3 * u + F, 28) and not W0[u:].any()  # the float read-out: h_t only
    np.testing.assert_array_equal(X[1:200, u : 2 * u], X[:199, :u])  # h_t-1 is the graph's own last h_t
    assert not X[200, u : 2 * u].any()  # each song starts from zero states
    assert np.abs(X[:, 2 * u : 3 * u]).max() <= 1.0 and np.allclose(X[:, 2 * u : 3 * u] * 128, np.round(X[:, 2 * u : 3 * u] * 128))
    np.testing.assert_allclose(X[:200, 3 * u :], songs[0], atol=0.5 / 127 + 1e-6)  # the features, on the input's grid
    with pytest.raises(cv.ConversionError, match="fewer than the read-out's .* inputs"):
        cv.fit_pose_readout(models, blob0, [songs[0][:20]])  # under-determined: a clear error, not a singular solve
    fit = cv.fit_pose_readout(models, blob0, songs)
    W, b = fit["pose"]
    before, after = np.mean((X @ W0 + b0 - Y[:, :28]) ** 2), np.mean((X @ W + b - Y[:, :28]) ** 2)
    assert after < before, (after, before)
    assert fit["heading"][0].shape == (u, 1)
    blob1 = cv.to_tflite(models, "int8", samples, readout_songs=songs)
    np.testing.assert_allclose(models.pose_readout["pose"][0], W, rtol=1e-3, atol=1e-5)  # the same fit, kept
    clone = cv.folded_clone(models, models.pose_decode, models.pose_readout)
    np.testing.assert_allclose(clone.get_layer("decoder").heading_head.get_weights()[1], models.pose_readout["heading"][1])
    # the clone reads out y = W [h_t, h_t-1, tanh(c_t), x] + b from its own new states
    feed = {i.name: samples[7][i.name].astype(np.float32) for i in clone.inputs}
    out = {k: np.asarray(v)[0] for k, v in clone(feed, training=False).items()}
    Wf, bf = models.pose_readout["pose"]
    y = np.concatenate([out["dec_h_out"], feed["dec_h"][0], np.tanh(out["dec_c_out"]), feed["x"][0]]) @ Wf + bf
    np.testing.assert_allclose(out["pose"], y, atol=1e-4)
    assert blob1 != blob0


def test_pose_output_pinned(models, tmp_path):
    """int8: the pose read-out leaves on [-1, 1] (scale 1/127, zero point 0), not on its
    calibrated min/max; the heading change keeps its own calibrated grid."""
    samples = cv.representative_samples(models, [cb.synthetic_features(200, F, seed=12)], n_samples=200)

    def runner(blob):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.tflite"
        path.write_bytes(blob)
        return dm.make_interpreter(path).get_signature_runner()

    keys = {n: k for k, n in cv.output_names(cv.describe(cv.folded_clone(models))).items()}
    pinned = runner(cv.to_tflite(models, "int8", samples)).get_output_details()
    free = runner(cv.to_tflite(models, "int8", samples, pin_pose=False)).get_output_details()
    assert pinned[keys["pose"]]["quantization"] == pytest.approx((cv.POSE_OUTPUT_SCALE, 0))
    assert free[keys["pose"]]["quantization"] != pinned[keys["pose"]]["quantization"]  # calibrated: the tails
    assert pinned[keys["dheading"]]["quantization"] == free[keys["dheading"]]["quantization"]


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


def test_bas_difference_carries_its_standard_error():
    """The report's BAS - Keras comes with the standard error of the song-by-song differences."""
    from converter import validate

    se = validate.paired_standard_error([0.7, 0.6, 0.5], [0.6, 0.4, 0.2])  # differences 0.1, 0.2, 0.3
    assert se == pytest.approx(0.1 / np.sqrt(3))
    assert validate.paired_standard_error([0.7], [0.6]) is None  # one song: no spread to measure
    with pytest.raises(ValueError, match="3 against 2"):
        validate.paired_standard_error([0.7, 0.6, 0.5], [0.6, 0.4])

    songs = [{"dance": n, "bas": b, "mse": 0.01, "max_abs_err": 0.1, "mean_abs_err": 0.01, "err_first_fifth": 0.01,
              "err_last_fifth": 0.01, "heading_err_end_deg": 1.0} for n, b in (("A", 0.7), ("B", 0.6), ("C", 0.5))]
    res = {"songs": songs, "mean": {k: float(np.mean([s_[k] for s_ in songs])) for k in songs[0] if k != "dance"}}
    # The Keras figures in another order: paired by song, not by position.
    kf = {"songs": [{"dance": "C", "bas": 0.2}, {"dance": "A", "bas": 0.6}, {"dance": "B", "bas": 0.4}],
          "mean": {"mse": 0.01, "bas": 0.4}}
    row = validate.summarize("int8", 1000, 4000, {"median_ms": 0.02, "p99_ms": 0.04}, res, kf)
    assert row["bas_diff"] == pytest.approx(0.2) and row["bas_diff_se"] == pytest.approx(0.1 / np.sqrt(3))
    assert "+0.2000 ± 0.0577" in validate.markdown_table([row])
    with pytest.raises(ValueError, match=r"no Keras figures for the songs \['C'\]"):
        validate.summarize("int8", 1000, 4000, {"median_ms": 0.02, "p99_ms": 0.04}, res,
                           {"songs": kf["songs"][1:], "mean": kf["mean"]})


def test_cell_state_scale():
    """k per unit: [-1, 1] spans 1.5x the unit's reach, at most the unscaled grid's +-r, and a
    unit that barely moves is scaled as if it reached CELL_SCALE_FLOOR."""
    k = cv.cell_state_scale(np.array([0.0, 0.5, 5.0]), r=1.8)
    np.testing.assert_allclose(k, [1 / (cv.CELL_HEADROOM * cv.CELL_SCALE_FLOOR), 1 / (cv.CELL_HEADROOM * 0.5), 1 / 1.8])


def test_scaled_cell_state(models, song, tmp_path):
    """int8: the decoder's cell state is held per unit scaled, dec_c = k c. In float the scaled
    clone is the same function (its dec_c k times the other's); the int8 graph holds the state,
    and the products that carry and feed it, on [-1, 1], and the way back into tanh on +-r; the
    manifest records k; without `scale_cell` nothing is scaled."""
    from tensorflow.lite.python import schema_py_generated as schema

    songs = [cb.synthetic_features(200, F, seed=12)]
    samples = cv.representative_samples(models, songs, n_samples=100)
    blob = cv.to_tflite(models, "int8", samples, readout_songs=songs)
    k, r = np.asarray(models.dec_c_scale), models.dec_tanh_range
    assert k.shape == (models.mcfg.dec_units,) and (k > 0).all() and r > 0
    reach = cv.cell_state_reach(models, songs)
    np.testing.assert_allclose(k, cv.cell_state_scale(reach, r))

    plain, scaled = cv.folded_clone(models), cv.folded_clone(models, c_scale=k)
    states_p = {i.name: np.zeros(i.shape, np.float32) for i in plain.inputs if i.name != "x"}
    states_s = dict(states_p)
    for t in range(30):
        op = {n: np.asarray(v) for n, v in plain({**states_p, "x": song[t : t + 1]}, training=False).items()}
        os_ = {n: np.asarray(v) for n, v in scaled({**states_s, "x": song[t : t + 1]}, training=False).items()}
        np.testing.assert_allclose(os_["pose"], op["pose"], atol=1e-5)
        np.testing.assert_allclose(os_["dec_c_out"], op["dec_c_out"] * k, atol=1e-5)
        states_p = {n: op[n + "_out"] for n in states_p}
        states_s = {n: os_[n + "_out"] for n in states_s}

    m = schema.ModelT.InitFromPackedBuf(bytearray(blob), 0)
    sg = m.subgraphs[0]
    keys = {n: k_ for k_, n in cv.output_names(models.graph_signature()).items()}
    i_idx = {t.name.decode(): t.tensorIndex for t in m.signatureDefs[0].inputs}["dec_c"]
    o_idx = {t.name.decode(): t.tensorIndex for t in m.signatureDefs[0].outputs}[keys["dec_c_out"]]
    q = lambda i: (sg.tensors[i].quantization.scale[0], sg.tensors[i].quantization.zeroPoint[0])
    add = cv._producers(m, sg)[o_idx]
    assert q(i_idx) == q(o_idx) == pytest.approx((2 / 255, 0))
    assert all(q(int(t)) == pytest.approx((2 / 255, 0)) for t in add.inputs)  # f c' and (i g) diag(k): one grid
    back = [int(op.outputs[0]) for op in sg.operators if o_idx in map(int, op.inputs) and cv._op_name(m, op) == "FULLY_CONNECTED"]
    assert len(back) == 1 and q(back[0]) == pytest.approx((2 * r / 255, 0))

    b = dm.load_bundle(cb.write_bundle(tmp_path / "scaled", blob, models, "int8"))
    entry = next(s_ for s_ in b.manifest["states"] if s_["input"] == "dec_c")
    np.testing.assert_allclose(entry["unit_scale"], k)

    from trainer import model as tm

    with pytest.raises(ValueError, match=f"c_scale needs {models.mcfg.dec_units} positive values"):
        tm.build_step_model(models.mcfg, F, dec_c_scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        tm.build_step_model(models.mcfg, F, dec_c_scale=[0.0] * models.mcfg.dec_units)

    plain_blob = cv.to_tflite(models, "int8", samples, scale_cell=False)
    assert models.dec_c_scale is None and models.dec_tanh_range is None
    with pytest.raises(cv.ConversionError, match="not the scaled cell state"):
        cv.pin_cell_state(plain_blob, models.graph_signature(), 1.0)
    b = dm.load_bundle(cb.write_bundle(tmp_path / "plain", plain_blob, models, "int8"))
    assert "unit_scale" not in next(s_ for s_ in b.manifest["states"] if s_["input"] == "dec_c")
