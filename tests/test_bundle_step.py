"""StreamingModel.step, the per-frame cost of the model stage: it works on numpy views of the
interpreter's buffers, feeds the states back in place and runs the output tail as one matmul. It
must give the very same states and heading as the plain way (set_tensor / get_tensor copies and
the tail pole by pole, written out here once as the reference), and the same pose to float32
rounding, for a tiny int8 bundle with the low-pass and the gain, a float bundle, and the shipped
models/default."""
from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest

from device import model as dm

DEFAULT = pathlib.Path(__file__).resolve().parent.parent / "models" / "default"
F = 20


def reference_run(b: dm.Bundle, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The step as first written: quantize x, set every state with set_tensor, invoke, get_tensor
    copies back, re-quantize the states whose scales differ by the formula, dequantize the pose,
    low-pass and gain in float32. No noise input (the bundles here have none)."""
    interp = dm.make_interpreter(b.model_path)
    runner = interp.get_signature_runner(dm.SIGNATURE)
    idx_in = {k: d["index"] for k, d in runner.get_input_details().items()}
    idx_out = {k: d["index"] for k, d in runner.get_output_details().items()}
    del runner
    assert not any(t.role == "noise" for t in b.inputs.values())
    fx = next(t for t in b.inputs.values() if t.role == "features")
    tp = next(t for t in b.outputs.values() if t.role == "pose")
    th = next(t for t in b.outputs.values() if t.role == "heading")
    states = {a: np.full(b.inputs[a].shape, b.inputs[a].zero_point if b.inputs[a].scale else 0, b.inputs[a].dtype)
              for a, _ in b.states}
    post = b.manifest.get("pose_post") or {"alpha": 1.0, "gain": 1.0}
    smooth = np.zeros(28, np.float32)
    posture = np.zeros(28, np.float32)
    beta = float(post.get("beta", 0.0)) if post["gain"] != 1.0 else 0.0
    alpha2 = float(post.get("alpha2", 1.0))
    smooth2 = np.zeros(28, np.float32)
    poses, heads, heading = [], [], 0.0
    for xt in x:
        if fx.scale:
            q = np.rint(xt * np.float32(1.0 / fx.scale) + np.float32(fx.zero_point))
            q = np.clip(q, -128, 127).astype(fx.dtype)
        else:
            q = (xt * np.float32(1.0)).astype(np.float32)
        interp.set_tensor(idx_in[fx.key], q[None])
        for a, _ in b.states:
            interp.set_tensor(idx_in[b.inputs[a].key], states[a])
        interp.invoke()
        for a, o in b.states:
            ti, to = b.inputs[a], b.outputs[o]
            out = interp.get_tensor(idx_out[to.key])
            if ti.scale and (ti.scale, ti.zero_point) != (to.scale, to.zero_point):
                out = np.clip(np.rint((out.astype(np.float64) - to.zero_point) * (to.scale / ti.scale)) + ti.zero_point,
                              -128, 127).astype(ti.dtype)
            states[a] = out
        s, zp = (tp.scale, tp.zero_point) if tp.scale else (1.0, 0)
        y = interp.get_tensor(idx_out[tp.key])[0]
        if b.manifest.get("pose_decode") is not None:  # dequantize and decode: one multiply-add, then tanh
            dec = b.manifest["pose_decode"]
            sc = np.asarray(dec["scale"], np.float32)
            pose = np.tanh(y * (np.float32(s) * sc) + (np.asarray(dec["offset"], np.float32) - np.float32(zp * s) * sc))
        else:
            pose = y * np.float32(s) - np.float32(zp * s)
        ms = np.asarray(post.get("smooth_mean", np.zeros(28)), np.float32)
        mg = np.asarray(post.get("gain_mean", np.zeros(28)), np.float32)
        g = np.float32(post["gain"])
        last = None
        if post["alpha"] < 1.0 or alpha2 < 1.0 or beta > 0:
            smooth += (pose - ms - smooth) * np.float32(post["alpha"])
            last = smooth
        if alpha2 < 1.0:  # the second pole
            smooth2 += (smooth - smooth2) * np.float32(alpha2)
            last = smooth2
        if beta > 0:  # the motion about the running posture times g, the posture times its own gain
            posture += (last - posture) * np.float32(beta)
            gp = np.float32(post["posture_gain"])
            pose = (last * g + posture * (gp - g)) + (mg + g * (ms - mg))
        else:
            if last is not None:
                pose = ms + last
            if post["gain"] != 1.0:
                pose = (pose - mg) * g + mg
        poses.append(np.clip(pose, -1.0, 1.0).reshape(14, 2))
        hs, hz = (th.scale, th.zero_point) if th.scale else (1.0, 0)
        heading = (heading + (float(interp.get_tensor(idx_out[th.key])[0, 0]) - hz) * hs + math.pi) % (2 * math.pi) - math.pi
        heads.append(heading)
    return np.stack(poses), np.array(heads)


def assert_same_as_reference(b: dm.Bundle, x: np.ndarray) -> None:
    want_p, want_h = reference_run(b, x)
    for hold in (True, False):
        with dm.StreamingModel(b, hold_views=hold) as s:
            assert s.views_held == hold
            for _ in range(2):  # run() resets: the second pass starts from the same zero states
                p, h = s.run(x)
                np.testing.assert_allclose(p, want_p, rtol=0, atol=2e-6)  # the tail's sums in another order
                np.testing.assert_array_equal(h, want_h)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("tensorflow")
    from converter.bundle import make_test_bundle

    from converter import bundle as cb
    from converter import convert as cv

    root = tmp_path_factory.mktemp("step")
    out = {q: dm.load_bundle(make_test_bundle(root / q, n_features=F, seed=5, quantize=q, check=False))
           for q in ("int8", "float")}
    # untied states: every one goes back through its re-quantization table
    models = cb.tiny_models(F, seed=5)
    samples = cv.representative_samples(models, [cb.synthetic_features(200, F, seed=5)], n_samples=60)
    blob = cv.to_tflite(models, "int8", samples, tie_states=False)
    out["int8-untied"] = dm.load_bundle(cb.write_bundle(root / "untied", blob, models, "int8"))
    return out


@pytest.mark.parametrize("quantize", ["int8", "float", "int8-untied"])
def test_step_equals_plain_copies(tiny, quantize):
    from converter.bundle import synthetic_features

    b = tiny[quantize]
    if quantize == "int8-untied":
        assert sum(lut is not None for lut in b.stepper()._state_lut) >= 4
    post = b.manifest["pose_post"]
    assert post["alpha"] < 1 and post["alpha2"] < 1 and post["gain"] != 1 and post["beta"] > 0  # the tail is exercised
    x = synthetic_features(120, F, seed=11)
    x[5] = 3.0  # out of range: the quantization must clip, not wrap
    x[6] = -3.0
    assert_same_as_reference(b, x)


def test_views_are_dropped_on_close(tiny):
    s = tiny["int8"].stepper()
    assert s.views_held
    s.step(np.zeros(F, np.float32))
    s.close()
    assert not s.views_held


def test_returned_pose_is_the_callers(tiny):
    """step() hands back its own array: the next step must not change it."""
    from converter.bundle import synthetic_features

    x = synthetic_features(3, F, seed=2)
    s = tiny["int8"].stepper()
    p0, _ = s.step(x[0])
    keep = p0.copy()
    s.step(x[1])
    np.testing.assert_array_equal(p0, keep)


@pytest.mark.skipif(not (DEFAULT / "manifest.json").exists(), reason="models/default has no bundle yet")
def test_default_bundle_step_equals_plain_copies():
    b = dm.load_bundle(DEFAULT)
    t = np.arange(200)[:, None]
    x = np.clip(0.6 * np.sin(2 * np.pi * t / 12.5 + np.arange(b.n_features)), -1, 1).astype(np.float32)
    assert_same_as_reference(b, x)
