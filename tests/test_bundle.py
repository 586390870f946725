"""device.model.load_bundle: a good bundle loads and streams; every kind of bad bundle is refused
with a BundleError naming the file and the field. One real int8 bundle (tiny model) per module."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from converter.bundle import copy_bundle, make_test_bundle, synthetic_features  # noqa: E402
from device import model as dm  # noqa: E402
from device.contract import DEFAULT_FEATURES  # noqa: E402

F = 20


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_test_bundle(tmp_path_factory.mktemp("b") / "int8", n_features=F, seed=3)


@pytest.fixture
def copy(bundle_dir, tmp_path):
    return copy_bundle(bundle_dir, tmp_path / "copy")


def edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_good_bundle_loads_and_streams(bundle_dir):
    b = dm.load_bundle(bundle_dir)
    assert b.quantize == "int8" and b.n_features == F
    assert b.inputs["x"].dtype == "int8" and b.outputs["pose"].shape == (1, 28)
    from trainer.model import ModelConfig, step_state_specs

    # every state of the step model, but the pose tail's: the device runs the low-pass itself
    specs = {n for n, _ in step_state_specs(ModelConfig.from_dict(b.manifest["model_config"]))}
    assert b.manifest["pose_post"] is not None and "smooth_pose" in specs
    assert "posture_pose" in specs and b.manifest["pose_post"]["beta"] > 0
    assert {a for a, _ in b.states} == specs - {"smooth_pose", "smooth_pose2", "posture_pose"}
    assert {"enc_h_0", "enc_c_0", "att_buf", "dec_h", "dec_c", "prev_pose"} <= {a for a, _ in b.states}
    x = synthetic_features(50, F, seed=9)
    with b.stepper() as s:
        poses, heads = s.run(x)
        assert poses.shape == (50, 14, 2) and poses.dtype == np.float32
        assert np.all(np.abs(poses) <= 1.0) and np.isfinite(heads).all()
        assert np.ptp(poses, axis=0).max() > 0  # the states move: not a constant output
        again, _ = s.run(x)  # run() resets: the same song gives the same poses
        np.testing.assert_array_equal(poses, again)
        pose, heading = s.step(x[0])
        assert pose.shape == (14, 2) and isinstance(heading, float)
        with pytest.raises(ValueError, match="features of shape"):
            s.step(x[0, :-1])


def test_missing_folder(tmp_path):
    with pytest.raises(dm.BundleError, match="does not exist"):
        dm.load_bundle(tmp_path / "nope")


def test_missing_manifest(copy):
    (copy / "manifest.json").unlink()
    with pytest.raises(dm.BundleError, match=r"manifest.json: missing"):
        dm.load_bundle(copy)


def test_missing_model(copy):
    (copy / "model.tflite").unlink()
    with pytest.raises(dm.BundleError, match=r"model.tflite: missing"):
        dm.load_bundle(copy)


def test_truncated_model(copy):
    blob = (copy / "model.tflite").read_bytes()
    (copy / "model.tflite").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(dm.BundleError, match=r"model.size_bytes.*truncated"):
        dm.load_bundle(copy)


def test_corrupt_model(copy):
    blob = bytearray((copy / "model.tflite").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (copy / "model.tflite").write_bytes(bytes(blob))
    with pytest.raises(dm.BundleError, match=r"model.sha256.*corrupt"):
        dm.load_bundle(copy)


def test_bad_json(copy):
    text = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(dm.BundleError, match="not valid JSON"):
        dm.load_bundle(copy)


@pytest.mark.parametrize("key", ["schema_version", "feature_hash", "normalization", "states", "metrics"])
def test_missing_key(copy, key):
    edit_manifest(copy, lambda m: m.pop(key))
    with pytest.raises(dm.BundleError, match=rf"field '{key}': missing"):
        dm.load_bundle(copy)


def test_feature_hash_mismatch_names_the_fields(bundle_dir):
    other = dataclasses.replace(DEFAULT_FEATURES, n_mels=64, fmax_hz=7600.0)
    with pytest.raises(dm.BundleError, match="feature_hash") as e:
        dm.load_bundle(bundle_dir, cfg=other)
    assert "n_mels: bundle 40 vs device 64" in str(e.value) and "fmax_hz" in str(e.value)
    assert "hop_length" not in str(e.value)


def test_edited_feature_config_is_caught(copy):
    edit_manifest(copy, lambda m: m["feature_config"].update(n_mels=64))
    with pytest.raises(dm.BundleError, match="not the hash of its own feature_config"):
        dm.load_bundle(copy)


def test_schema_version(copy):
    edit_manifest(copy, lambda m: m.update(schema_version=99))
    with pytest.raises(dm.BundleError, match="'schema_version': 99 is not supported"):
        dm.load_bundle(copy)


def test_keypoint_order(copy):
    edit_manifest(copy, lambda m: m["keypoints"].reverse())
    with pytest.raises(dm.BundleError, match="'keypoints'"):
        dm.load_bundle(copy)


def test_normalization_length(copy):
    edit_manifest(copy, lambda m: m["normalization"]["feat_mean"].pop())
    with pytest.raises(dm.BundleError, match="normalization.feat_mean"):
        dm.load_bundle(copy)


@pytest.mark.parametrize("beta", [1.0, -0.1, "0.1"])
def test_posture_coefficient(copy, beta):
    edit_manifest(copy, lambda m: m["pose_post"].update(beta=beta))
    with pytest.raises(dm.BundleError, match="pose_post.beta"):
        dm.load_bundle(copy)


@pytest.mark.parametrize("alpha2", [0.0, 1.5])
def test_second_pole_coefficient(copy, alpha2):
    edit_manifest(copy, lambda m: m["pose_post"].update(alpha2=alpha2))
    with pytest.raises(dm.BundleError, match="pose_post.alpha2"):
        dm.load_bundle(copy)


def test_pose_decode_checked(copy):
    edit_manifest(copy, lambda m: m["pose_decode"]["scale"].__setitem__(3, -1.0))
    with pytest.raises(dm.BundleError, match="pose_decode.scale"):
        dm.load_bundle(copy)


def test_posture_gain_must_be_positive(copy):
    edit_manifest(copy, lambda m: m["pose_post"].update(posture_gain=0.0))
    with pytest.raises(dm.BundleError, match="pose_post.posture_gain"):
        dm.load_bundle(copy)


def test_bundle_without_posture_still_loads(copy):
    """A bundle made before the running posture (no pose_post.beta) gains about the mean pose."""
    x = synthetic_features(30, F, seed=4)
    with_beta, _ = dm.load_bundle(copy).stepper().run(x)
    edit_manifest(copy, lambda m: (m["pose_post"].pop("beta"), m["pose_post"].pop("posture_gain"),
                                   m["pose_post"].pop("alpha2")))
    without, _ = dm.load_bundle(copy).stepper().run(x)
    assert np.abs(with_beta - without).max() > 1e-4


def test_quant_params_must_match_the_model(copy):
    def bump(m):
        t = next(t for t in m["inputs"] if t["name"] == "x")
        t["quant"]["scale"] *= 2
    edit_manifest(copy, bump)
    with pytest.raises(dm.BundleError, match=r"inputs\.x.*differs from the model's"):
        dm.load_bundle(copy)


def test_state_pairing(copy):
    edit_manifest(copy, lambda m: m["states"].pop())
    with pytest.raises(dm.BundleError, match="'states'"):
        dm.load_bundle(copy)


def test_runtime_is_chosen_in_one_place():
    cls, name = dm.interpreter_class()
    assert name in ("ai_edge_litert", "tflite_runtime") and callable(cls)


def test_state_feedback_requantization_table(bundle_dir, tmp_path):
    """States whose output and input scales differ go back through a table; check it against
    the formula for every int8 value. The converter ties every state of the real architecture
    (prev_pose, in a concatenation, by its output), so the tables are checked on a bundle
    converted without the tie."""
    from converter import bundle as cb
    from converter import convert as cv

    b = dm.load_bundle(bundle_dir)
    for a, o in b.states:  # tied: copied back as they are
        assert (b.inputs[a].scale, b.inputs[a].zero_point) == (b.outputs[o].scale, b.outputs[o].zero_point), a
    assert all(lut is None for lut in b.stepper()._state_lut)

    models = cb.tiny_models(F, seed=3)
    samples = cv.representative_samples(models, [synthetic_features(200, F, seed=4)], n_samples=60)
    untied = cb.write_bundle(tmp_path / "untied", cv.to_tflite(models, "int8", samples, tie_states=False), models, "int8")
    b = dm.load_bundle(untied)
    s = b.stepper()
    tables = 0
    for (a, o), lut in zip(b.states, s._state_lut):
        ti, to = b.inputs[a], b.outputs[o]
        if lut is None:
            assert (ti.scale, ti.zero_point) == (to.scale, to.zero_point)
            continue
        tables += 1
        lut, udtype = lut
        q = np.arange(-128, 128, dtype=np.int8)
        want = np.clip(np.rint((q.astype(float) - to.zero_point) * to.scale / ti.scale) + ti.zero_point, -128, 127)
        np.testing.assert_array_equal(lut[q.view(udtype)], want)
    assert tables >= 4  # untied, the calibrator's input and output scales differ
