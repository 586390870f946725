"""The model bundle: a folder with `model.tflite` and `manifest.json` (schema in `device.model`).

`write_bundle` writes both from a converted model; the manifest's tensor table is read
back from the .tflite itself (names, shapes, dtypes, quantization), so it cannot drift
from the file. `make_test_bundle` makes a real, small bundle for other parts' tests.
"""
from __future__ import annotations

import datetime
import json
import logging
import pathlib
import shutil
import tempfile

import numpy as np

from converter import convert as cv
from device import model as dm
from device.contract import KEYPOINTS

log = logging.getLogger(__name__)


def _tensor_entries(interp_details: dict, roles: dict[str, str], names: dict[str, str]) -> list[dict]:
    out = []
    for key in sorted(interp_details, key=lambda k: names[k]):
        d = interp_details[key]
        scale, zp = d["quantization"]
        name = names[key]
        out.append({"name": name, "key": key, "role": roles[name], "shape": [int(v) for v in d["shape"]],
                    "dtype": np.dtype(d["dtype"]).name, "quant": {"scale": float(scale), "zero_point": int(zp)}})
    return out


def _feature_names(fcfg, n: int):
    from device import features

    names = list(features.feature_names(fcfg))
    return names if len(names) == n else None


def build_manifest(blob_path: pathlib.Path, models: cv.KerasModels, mode: str, *, training: dict | None = None,
                   metrics: dict | None = None) -> dict:
    sig = models.graph_signature()
    interp = dm.make_interpreter(blob_path)
    runner = interp.get_signature_runner(dm.SIGNATURE)
    in_roles = {s.name: ("features" if s.name == cv.FEATURE_INPUT else "noise" if s.name == cv.NOISE_INPUT
                         else "state") for s in sig.inputs}
    out_roles = {s.name: ("pose" if s.name == cv.POSE_OUTPUT else "heading" if s.name == cv.HEADING_OUTPUT
                          else "state") for s in sig.outputs}
    in_names = {k: k for k in runner.get_input_details()}
    out_names = cv.output_names(sig)
    missing = set(runner.get_output_details()) ^ set(out_names)
    if missing:
        raise cv.ConversionError(f"{blob_path}: signature outputs {sorted(runner.get_output_details())} do not "
                                 f"match the step model's {sorted(out_names)}")
    fcfg = models.feature_cfg
    return {
        "schema_version": dm.SCHEMA_VERSION,
        "format": "edgedance model bundle",
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"file": dm.MODEL_FILE, "size_bytes": blob_path.stat().st_size,
                  "sha256": cv.file_sha256(blob_path), "quantize": mode, "signature": dm.SIGNATURE},
        "feature_config": fcfg.to_dict(),
        "feature_hash": fcfg.config_hash(),
        "n_features": sig.n_features,
        "feature_names": _feature_names(fcfg, sig.n_features),
        "frame_rate_hz": fcfg.pose_fps,
        "lookback": int(models.mcfg.lookback),
        "keypoints": list(KEYPOINTS),
        "normalization": {
            "applied_by": "model",
            "folded_into": "the input kernel and bias of enc_lstm_0" + (" and of the decoder LSTM's feature rows"
                                                                        if getattr(models.mcfg, "skip_features", False) else "")
                           + " (the device feeds the features as device.features makes them)",
            "feat_mean": [float(v) for v in models.feat_mean],
            "feat_inv_std": [float(v) for v in models.feat_inv_std],
        },
        "heading": {"output": cv.HEADING_OUTPUT, "kind": "delta_radians_per_frame",
                    "note": "the device integrates it; the absolute yaw is arbitrary (0 at reset)"},
        "noise": {"dims": sig.noise_dims, "smooth_frames": dm.StreamingModel.NOISE_SMOOTH_FRAMES},
        "pose_decode": models.pose_decode or {"activation": "tanh", "offset": [0.0] * 28, "scale": [1.0] * 28,
                                              "note": "pose = tanh(y * scale + offset), y the pose output"},
        "pose_post": models.smoothing,
        "inputs": _tensor_entries(runner.get_input_details(), in_roles, in_names),
        "outputs": _tensor_entries(runner.get_output_details(), out_roles, out_names),
        "states": [{"input": a, "output": b, "shape": list(sig.input(a).shape), "init": "zeros (real value 0)",
                    **({"unit_scale": models.dec_c_scale, "note": "holds k * c, the LSTM's cell state c times unit_scale k"}
                       if a == "dec_c" and models.dec_c_scale is not None else {})}
                   for a, b in sig.states],
        "model_config": models.mcfg.to_dict(),
        "training": training or {},
        "metrics": metrics or {},
        "versions": cv.versions(),
        "source": models.source,
    }


def write_bundle(out_dir, blob: bytes, models: cv.KerasModels, mode: str, *, training: dict | None = None,
                 metrics: dict | None = None) -> pathlib.Path:
    """Write `model.tflite` + `manifest.json` into out_dir (created; an existing bundle there is
    replaced) and check the result loads with `device.model.load_bundle`."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / dm.MODEL_FILE
    tmp = model_path.with_suffix(".tflite.tmp")
    tmp.write_bytes(blob)
    tmp.replace(model_path)
    manifest = build_manifest(model_path, models, mode, training=training, metrics=metrics)
    write_manifest(out, manifest)
    dm.load_bundle(out, models.feature_cfg)
    from device.selftest import BUNDLE_GOLDEN, write_bundle_golden
    (out / BUNDLE_GOLDEN).unlink(missing_ok=True)  # a golden output of the previous model is stale
    write_bundle_golden(out)  # the on-device selftest compares against this
    log.info("bundle %s: %s, %d bytes", out, mode, len(blob))
    return out


def write_manifest(out_dir, manifest: dict) -> None:
    path = pathlib.Path(out_dir) / dm.MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def update_manifest(out_dir, **fields) -> dict:
    """Set top-level manifest fields (e.g. metrics) of an existing bundle."""
    path = pathlib.Path(out_dir) / dm.MANIFEST
    m = json.loads(path.read_text(encoding="utf-8"))
    m.update(fields)
    write_manifest(out_dir, m)
    return m


# ---------------------------------------------------------------------------------------
# A small real bundle for tests


def synthetic_features(T: int, n_features: int, seed: int = 0) -> np.ndarray:
    """(T, F) float32 stand-in features in the range of device.features ([-1, 1] per column):
    Mel-like columns pulsing with a 12.5-frame beat around an offset, then beat-phase-like
    sawtooth columns. For tests of shapes, quantization and timing, not of dancing."""
    rng = np.random.default_rng(seed)
    t = np.arange(T)[:, None]
    n_mel = min(n_features, 40)
    mel = -0.3 + 0.4 * np.sin(2 * np.pi * t / 12.5 + rng.uniform(0, 6, n_mel)) + 0.1 * rng.standard_normal((T, n_mel))
    rest = 2 * ((t / 12.5 + rng.uniform(0, 1, n_features - n_mel)) % 1.0) - 1
    return np.clip(np.concatenate([mel, rest], axis=1), -1, 1).astype(np.float32)[:, :n_features]


def tiny_models(n_features: int, seed: int = 0, layers: int = 1, units: int = 16, lookback: int = 4):
    """A randomly initialised model of the real architecture (trainer.model, kind 'ours') with
    feature normalisation set from synthetic features."""
    import keras

    from device.contract import DEFAULT_FEATURES
    from trainer import model as tm

    keras.utils.set_random_seed(seed)
    mcfg = tm.ModelConfig(layers=layers, units=units, dec_units=units, lookback=lookback, dropout=0.0)
    seq = tm.build_sequence_model(mcfg, n_features)
    x = synthetic_features(400, n_features, seed)
    tm.set_normalization(seq, x.mean(0), x.std(0), pose_mean=np.full(tm.N_POSE, 0.1, np.float32))
    names = {layer.name for layer in seq.layers}
    if "pose_smooth" in names:
        tm.set_smoothing(seq, 0.5, 0.6 if mcfg.has_smooth2 else None)  # exercise the device-side low-pass
    if "pose_gain" in names:
        tm.set_gain(seq, 1.5)  # and gain
    if mcfg.has_posture:
        tm.set_posture(seq, 0.1, 1.2)  # about the running posture, itself scaled
    norm = {"n_features": n_features, "feat_mean": x.mean(0).tolist(), "feat_std": x.std(0).tolist(),
            "note": "make_test_bundle: synthetic features, random weights"}
    return cv.from_sequence_model(seq, mcfg, DEFAULT_FEATURES, norm, source=f"make_test_bundle(seed={seed})")


def make_test_bundle(out_dir, n_features: int, seed: int = 0, layers: int = 1, units: int = 16,
                     quantize: str = "int8", check: bool = True) -> pathlib.Path:
    """A REAL conversion of a small randomly initialised model of the real architecture, for
    tests: full int8 by default, default feature config, loads with `device.model.load_bundle`.
    Random weights: its poses mean nothing, but shapes, dtypes, states and timing are real.
    With check=True the step model is first checked against the sequence model (float)."""
    cv.quiet_tensorflow()
    models = tiny_models(n_features, seed, layers, units)
    songs = [synthetic_features(150, n_features, seed + 1), synthetic_features(150, n_features, seed + 2)]
    diff = cv.check_equivalence(models, songs[0][:60]) if check else None
    samples = cv.representative_samples(models, songs, n_samples=100) if quantize in ("int8", "int16x8") else None
    blob = cv.to_tflite(models, quantize, samples)
    training = {"data": "none (random weights, synthetic features)", "seed": seed,
                "step_vs_sequence_max_abs_diff": diff}
    return write_bundle(out_dir, blob, models, quantize, training=training)


def copy_bundle(src, dst) -> pathlib.Path:
    """Copy a bundle folder (for tests that damage a copy)."""
    dst = pathlib.Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def temp_bundle_dir() -> pathlib.Path:
    return pathlib.Path(tempfile.mkdtemp(prefix="edgedance-bundle-"))
