"""The model stage: load a model bundle and run it one pose frame at a time.

A bundle is a folder with `model.tflite` and `manifest.json` (written by
`converter.bundle`). `load_bundle` is the only way in: it checks the manifest against
the model file (size, SHA-256), the device's feature config (hash, field by field),
the pose contract and the interpreter's own tensor details, and raises `BundleError`
naming the file and the field for anything wrong.

`Bundle.stepper()` gives a `StreamingModel`: `step(x (F,) float32) -> (pose (14, 2), heading)`.
Per frame it quantizes the features (the model holds their normalisation) into the input buffer,
invokes, copies every state output into its input buffer for the next frame (re-quantized through a
table when the output and input scales differ), dequantizes the pose and the heading change, and
runs the model's output low-pass and gain in float when the manifest has them (`pose_post`). It
works on numpy views of the interpreter's buffers and allocates nothing per frame (about 13 µs of
Python around the invoke for 3 x 128; docs/bench/model.md). numpy + LiteRT only: no TensorFlow on
the device.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pathlib

import numpy as np

from device.contract import DEFAULT_FEATURES, KEYPOINTS, N_KEYPOINTS, FeatureConfig

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.tflite"
SIGNATURE = "serving_default"
N_POSE = 2 * N_KEYPOINTS  # 28 values, keypoint-major (x, y)
ROLES_IN = ("features", "noise", "state")
ROLES_OUT = ("pose", "heading", "state")
REQUIRED = ("schema_version", "model", "feature_config", "feature_hash", "n_features", "frame_rate_hz",
            "lookback", "keypoints", "normalization", "inputs", "outputs", "states", "heading",
            "model_config", "training", "metrics", "versions")


class BundleError(RuntimeError):
    """A model bundle that cannot be used: names the path and the field, says how to fix it."""


# ---------------------------------------------------------------------------------------
# The platform, chosen in one place


def interpreter_class():
    """(Interpreter class, runtime name): LiteRT if installed, else tflite_runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime"
    except ImportError as e:
        raise BundleError("no TFLite runtime: install LiteRT (`pip install ai-edge-litert`, the `device` extra) "
                          "or tflite-runtime (numpy < 2)") from e


def make_interpreter(model_path, num_threads: int = 1):
    cls, _ = interpreter_class()
    try:
        interp = cls(model_path=str(model_path), num_threads=num_threads)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise BundleError(f"{model_path}: the TFLite runtime cannot load this model ({e}); "
                          "re-create the bundle with `python -m converter convert`") from e
    return interp


# ---------------------------------------------------------------------------------------
# Loading and validation


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str  # our name (x, enc_h_0, pose, enc_h_0_out, ...)
    key: str  # the signature key in the .tflite (input name; output_i for outputs)
    role: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name
    scale: float  # 0.0 = not quantized
    zero_point: int


@dataclasses.dataclass
class Bundle:
    path: pathlib.Path
    manifest: dict
    cfg: FeatureConfig
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    states: list[tuple[str, str]]  # (input name, output name)

    @property
    def model_path(self) -> pathlib.Path:
        return self.path / self.manifest["model"]["file"]

    @property
    def n_features(self) -> int:
        return int(self.manifest["n_features"])

    @property
    def quantize(self) -> str:
        return self.manifest["model"]["quantize"]

    def stepper(self, num_threads: int = 1, seed: int = 0, hold_views: bool = True) -> "StreamingModel":
        return StreamingModel(self, num_threads=num_threads, seed=seed, hold_views=hold_views)


def _fail(path, field, what, fix="re-create the bundle with `python -m converter convert RUN --out DIR`"):
    raise BundleError(f"{path}: field {field!r}: {what}; {fix}")


def _get(m: dict, key: str, typ, path, where=""):
    field = f"{where}{key}"
    if key not in m:
        _fail(path, field, "missing")
    v = m[key]
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        _fail(path, field, f"expected {getattr(typ, '__name__', typ)}, got {type(v).__name__} {v!r:.60}")
    return v


def _read_manifest(path: pathlib.Path) -> dict:
    mpath = path / MANIFEST
    if not path.exists():
        raise BundleError(f"{path}: bundle folder does not exist; point --model at a folder made by "
                          "`python -m converter convert` (the shipped one is models/default)")
    if not path.is_dir():
        raise BundleError(f"{path}: not a folder; a bundle is a folder holding {MODEL_FILE} and {MANIFEST}")
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing; a bundle folder needs {MANIFEST} beside {MODEL_FILE}")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e}); the manifest is corrupt or truncated, "
                          "re-create the bundle with `python -m converter convert`") from e
    if not isinstance(m, dict):
        raise BundleError(f"{mpath}: expected a JSON object, got {type(m).__name__}")
    return m


def _check_feature_config(m: dict, mpath, cfg: FeatureConfig) -> FeatureConfig:
    fc = _get(m, "feature_config", dict, mpath)
    try:
        theirs = FeatureConfig.from_dict(fc, source=f"{mpath} feature_config")
    except ValueError as e:
        raise BundleError(f"{mpath}: field 'feature_config': {e}") from e
    h = _get(m, "feature_hash", str, mpath)
    if theirs.config_hash() != h:
        _fail(mpath, "feature_hash", f"{h} is not the hash of its own feature_config ({theirs.config_hash()}): "
              "the manifest was edited")
    if h != cfg.config_hash():
        mine, other = cfg.to_dict(), theirs.to_dict()
        diff = ", ".join(f"{k}: bundle {other.get(k)!r} vs device {mine.get(k)!r}"
                         for k in sorted(set(mine) | set(other)) if mine.get(k) != other.get(k))
        raise BundleError(f"{mpath}: field 'feature_hash': the bundle was trained on other features "
                          f"({h} vs the device's {cfg.config_hash()}; {diff}); use a bundle trained with this "
                          "feature config or run the device with the bundle's")
    return theirs


def _tensor_list(m, key, roles, mpath) -> list[TensorInfo]:
    items = _get(m, key, list, mpath)
    out = []
    for i, t in enumerate(items):
        where = f"{key}[{i}]."
        if not isinstance(t, dict):
            _fail(mpath, f"{key}[{i}]", "expected an object")
        role = _get(t, "role", str, mpath, where)
        if role not in roles:
            _fail(mpath, where + "role", f"{role!r} is not one of {roles}")
        shape = _get(t, "shape", list, mpath, where)
        if not all(isinstance(d, int) and d >= 1 for d in shape):
            _fail(mpath, where + "shape", f"{shape} is not a list of positive ints")
        q = _get(t, "quant", dict, mpath, where)
        scale = _get(q, "scale", float, mpath, where + "quant.")
        zp = _get(q, "zero_point", int, mpath, where + "quant.")
        dtype = _get(t, "dtype", str, mpath, where)
        if dtype not in ("float32", "int8", "int16"):
            _fail(mpath, where + "dtype", f"{dtype!r} is not float32, int8 or int16")
        if (dtype == "float32") != (scale == 0.0) or not math.isfinite(scale) or scale < 0:
            _fail(mpath, where + "quant.scale", f"{scale} does not fit dtype {dtype}")
        out.append(TensorInfo(_get(t, "name", str, mpath, where), _get(t, "key", str, mpath, where), role,
                              tuple(shape), dtype, float(scale), int(zp)))
    return out


def load_bundle(path, cfg: FeatureConfig = DEFAULT_FEATURES) -> Bundle:
    """Load and validate a model bundle folder; BundleError (path + field + fix) if unusable."""
    path = pathlib.Path(path)
    m = _read_manifest(path)
    mpath = path / MANIFEST
    for key in REQUIRED:
        if key not in m:
            _fail(mpath, key, "missing")
    sv = _get(m, "schema_version", int, mpath)
    if sv != SCHEMA_VERSION:
        _fail(mpath, "schema_version", f"{sv} is not supported (this device reads version {SCHEMA_VERSION})",
              "update the device software or re-convert the model with this version's converter")

    # The model file: present, complete, unchanged.
    mm = _get(m, "model", dict, mpath)
    fname = _get(mm, "file", str, mpath, "model.")
    size = _get(mm, "size_bytes", int, mpath, "model.")
    sha = _get(mm, "sha256", str, mpath, "model.")
    quantize = _get(mm, "quantize", str, mpath, "model.")
    if quantize not in ("float", "dynamic", "int8", "int16x8"):
        _fail(mpath, "model.quantize", f"{quantize!r} is not float, dynamic, int8 or int16x8")
    fpath = path / fname
    if pathlib.Path(fname).name != fname:
        _fail(mpath, "model.file", f"{fname!r} must be a file name inside the bundle folder")
    if not fpath.is_file():
        raise BundleError(f"{fpath}: missing (manifest field 'model.file'); copy the whole bundle folder")
    actual = fpath.stat().st_size
    if actual != size:
        raise BundleError(f"{fpath}: {actual} bytes but the manifest (field 'model.size_bytes') says {size}: "
                          "the file is truncated or replaced; copy the bundle again")
    digest = hashlib.sha256(fpath.read_bytes()).hexdigest()
    if digest != sha:
        raise BundleError(f"{fpath}: SHA-256 {digest[:12]}.. differs from the manifest's (field 'model.sha256') "
                          f"{sha[:12]}..: the file is corrupt or replaced; copy the bundle again")

    theirs = _check_feature_config(m, mpath, cfg)
    fps = _get(m, "frame_rate_hz", int, mpath)
    if fps != cfg.pose_fps:
        _fail(mpath, "frame_rate_hz", f"{fps} differs from the device's pose rate {cfg.pose_fps}")
    kps = _get(m, "keypoints", list, mpath)
    if tuple(kps) != KEYPOINTS:
        _fail(mpath, "keypoints", f"{kps} is not the BODY-14 order {list(KEYPOINTS)}")
    lookback = _get(m, "lookback", int, mpath)
    if lookback < 1:
        _fail(mpath, "lookback", f"{lookback} must be >= 1")
    F = _get(m, "n_features", int, mpath)
    norm = _get(m, "normalization", dict, mpath)
    if _get(norm, "applied_by", str, mpath, "normalization.") != "model":
        _fail(mpath, "normalization.applied_by", f"{norm['applied_by']!r}: this device needs 'model' (folded in)")
    for key in ("feat_mean", "feat_inv_std"):
        v = _get(norm, key, list, mpath, "normalization.")
        a = np.asarray(v, dtype=np.float64) if all(isinstance(e, (int, float)) for e in v) else None
        if a is None or a.shape != (F,) or not np.all(np.isfinite(a)):
            _fail(mpath, f"normalization.{key}", f"must be {F} finite numbers (n_features)")
        if key == "feat_inv_std" and not np.all(a > 0):
            _fail(mpath, f"normalization.{key}", "must be > 0")
    heading = _get(m, "heading", dict, mpath)
    if _get(heading, "kind", str, mpath, "heading.") != "delta_radians_per_frame":
        _fail(mpath, "heading.kind", f"{heading['kind']!r} is not 'delta_radians_per_frame'")
    for key in ("model_config", "training", "metrics", "versions"):
        _get(m, key, dict, mpath)
    dec = m.get("pose_decode")
    if dec is not None:  # bundles before it output the pose itself
        if not isinstance(dec, dict) or dec.get("activation") != "tanh":
            _fail(mpath, "pose_decode", "expected null or an object {activation: 'tanh', offset, scale}")
        for key in ("offset", "scale"):
            v = _get(dec, key, list, mpath, "pose_decode.")
            if len(v) != N_POSE or not all(isinstance(e, (int, float)) and math.isfinite(e) for e in v):
                _fail(mpath, f"pose_decode.{key}", f"must be {N_POSE} finite numbers")
        if min(dec["scale"]) <= 0:
            _fail(mpath, "pose_decode.scale", "must be > 0")
    post = m.get("pose_post")
    if post is not None:
        if not isinstance(post, dict):
            _fail(mpath, "pose_post", "expected null or an object {alpha, smooth_mean, gain, gain_mean[, beta, posture_gain]}")
        alpha = _get(post, "alpha", float, mpath, "pose_post.")
        if not 0.0 < alpha <= 1.0:
            _fail(mpath, "pose_post.alpha", f"{alpha} is not in (0, 1]")
        gain = _get(post, "gain", float, mpath, "pose_post.")
        if not (math.isfinite(gain) and gain > 0):
            _fail(mpath, "pose_post.gain", f"{gain} must be a positive number")
        for key in ("smooth_mean", "gain_mean"):
            v = _get(post, key, list, mpath, "pose_post.")
            if len(v) != N_POSE or not all(isinstance(e, (int, float)) and math.isfinite(e) for e in v):
                _fail(mpath, f"pose_post.{key}", f"must be {N_POSE} finite numbers")
        if "alpha2" in post:  # the low-pass's second pole; absent in bundles made before it (= 1, off)
            a2 = _get(post, "alpha2", float, mpath, "pose_post.")
            if not 0.0 < a2 <= 1.0:
                _fail(mpath, "pose_post.alpha2", f"{a2} is not in (0, 1] (1 = no second pole)")
        if "beta" in post:  # the running posture's coefficient; absent in bundles made before it (= 0)
            beta = _get(post, "beta", float, mpath, "pose_post.")
            if not 0.0 <= beta < 1.0:
                _fail(mpath, "pose_post.beta", f"{beta} is not in [0, 1) (0 = no running posture)")
        if "posture_gain" in post:
            pg = _get(post, "posture_gain", float, mpath, "pose_post.")
            if not (math.isfinite(pg) and pg > 0):
                _fail(mpath, "pose_post.posture_gain", f"{pg} must be a positive number")

    ins = _tensor_list(m, "inputs", ROLES_IN, mpath)
    outs = _tensor_list(m, "outputs", ROLES_OUT, mpath)
    inputs, outputs = {t.name: t for t in ins}, {t.name: t for t in outs}
    feats = [t for t in ins if t.role == "features"]
    if len(feats) != 1 or feats[0].shape != (1, F):
        _fail(mpath, "inputs", f"needs exactly one 'features' input of shape [1, {F}]")
    for role, shape in (("pose", (1, N_POSE)), ("heading", (1, 1))):
        t = [o for o in outs if o.role == role]
        if len(t) != 1 or t[0].shape != shape:
            _fail(mpath, "outputs", f"needs exactly one {role!r} output of shape {list(shape)}")
    states = []
    for i, s in enumerate(_get(m, "states", list, mpath)):
        where = f"states[{i}]."
        if not isinstance(s, dict):
            _fail(mpath, f"states[{i}]", "expected an object")
        a, b = _get(s, "input", str, mpath, where), _get(s, "output", str, mpath, where)
        if a not in inputs or inputs[a].role != "state" or b not in outputs or outputs[b].role != "state":
            _fail(mpath, where.rstrip("."), f"{a!r} -> {b!r} must name a state input and a state output")
        if inputs[a].shape != outputs[b].shape or inputs[a].dtype != outputs[b].dtype:
            _fail(mpath, where.rstrip("."), f"{a} {inputs[a].shape} {inputs[a].dtype} and {b} "
                  f"{outputs[b].shape} {outputs[b].dtype} must match")
        states.append((a, b))
    n_state_in = sum(t.role == "state" for t in ins)
    if len(states) != n_state_in or len({a for a, _ in states}) != n_state_in:
        _fail(mpath, "states", "every state input must appear exactly once")

    bundle = Bundle(path, m, theirs, inputs, outputs, states)
    _check_against_model(bundle)
    return bundle


def _check_against_model(bundle: Bundle) -> None:
    """The manifest's tensors must be the model's: names, shapes, dtypes, quantization."""
    interp = make_interpreter(bundle.model_path)
    mpath = bundle.path / MANIFEST
    try:
        runner = interp.get_signature_runner(SIGNATURE)
    except ValueError as e:
        raise BundleError(f"{bundle.model_path}: no signature {SIGNATURE!r} ({e}); re-convert the model") from e
    for kind, details, tensors in (("inputs", runner.get_input_details(), bundle.inputs),
                                   ("outputs", runner.get_output_details(), bundle.outputs)):
        keys = {t.key for t in tensors.values()}
        if keys != set(details):
            _fail(mpath, kind, f"names {sorted(keys)} differ from the model's {sorted(details)}")
        for t in tensors.values():
            d = details[t.key]
            scale, zp = d["quantization"]
            if (tuple(int(v) for v in d["shape"]) != t.shape or np.dtype(d["dtype"]).name != t.dtype
                    or not math.isclose(scale, t.scale, rel_tol=1e-6) or int(zp) != t.zero_point):
                _fail(mpath, f"{kind}.{t.name}", f"manifest {t.shape} {t.dtype} ({t.scale}, {t.zero_point}) "
                      f"differs from the model's {tuple(d['shape'])} {np.dtype(d['dtype']).name} ({scale}, {zp})")


# ---------------------------------------------------------------------------------------
# Streaming


def _qrange(dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


class _Views:
    """numpy views of the interpreter's own buffers, for every tensor `step` touches."""

    __slots__ = ("x", "noise", "states", "tied", "mapped", "pose", "heading")

    def __init__(self, interp, x_idx, noise_idx, states, pose_idx, head_idx):
        def view(idx):
            return interp.tensor(idx)()

        self.x = view(x_idx)[0]  # (F,)
        self.noise = None if noise_idx is None else view(noise_idx)
        # (input view, output view, table, unsigned dtype to index the table with)
        self.states = [(view(i), view(o), lut, udt) for i, o, lut, udt in states]
        self.tied = [(vin, vout) for vin, vout, lut, _ in self.states if lut is None]
        self.mapped = [s for s in self.states if s[2] is not None]
        self.pose = view(pose_idx)[0]  # (28,)
        self.heading = view(head_idx)

    def arrays(self):
        yield self.x
        if self.noise is not None:
            yield self.noise
        for vin, vout, _, _ in self.states:
            yield vin
            yield vout
        yield self.pose
        yield self.heading


class _InputViews:
    """The features' and the noise's views alone: what `step` writes before the invoke."""

    __slots__ = ("x", "noise")

    def __init__(self, interp, x_idx, noise_idx):
        self.x = interp.tensor(x_idx)()[0]
        self.noise = None if noise_idx is None else interp.tensor(noise_idx)()


class StreamingModel:
    """One pose frame per `step`; the states stay inside, fed back every frame.

    The states live in the interpreter's own input buffers: after each invoke every state
    output is copied (or mapped through its table) straight into its input's buffer, no
    intermediate arrays. When the runtime allows it the numpy views of those buffers are made
    once and kept (`views_held`), and the interpreter is invoked through its raw handle: the
    public `invoke()` refuses to run while any view exists, because a resize or re-allocation
    would move the buffers. This model has static shapes only, nothing re-allocates them; the
    constructor checks that the buffers stay put over an invoke and that no output shares memory
    with an input, else it makes fresh views every step (correct, about 20 µs slower here)."""

    NOISE_SMOOTH_FRAMES = 25.0  # the trainer's make_noise: AR(1), 1 s time constant at 25 fps

    def __init__(self, bundle: Bundle, num_threads: int = 1, seed: int = 0, hold_views: bool = True):
        self.bundle = bundle
        self._interp = make_interpreter(bundle.model_path, num_threads)
        runner = self._interp.get_signature_runner(SIGNATURE)
        in_idx = {k: d["index"] for k, d in runner.get_input_details().items()}
        out_idx = {k: d["index"] for k, d in runner.get_output_details().items()}
        del runner  # a live signature runner counts as a reference to the tensors
        ins, outs = bundle.inputs, bundle.outputs
        F = bundle.n_features

        fx = next(t for t in ins.values() if t.role == "features")
        self._x_shape = (F,)
        # Normalisation is folded into the model; quantization q = x / scale + zp = x * a + b
        # (a = 127, b = 0 for an int8 input pinned to the features' own [-1, 1] map).
        # Every constant of `step` is a float32 array of the operand's shape: numpy takes its
        # fast array-array loop (0.3 µs here) instead of converting a scalar (0.8 µs), and the
        # values are the float32 scalars' own.
        self._x_quantized = bool(fx.scale)
        lo, hi = _qrange(np.dtype(fx.dtype)) if fx.scale else (-np.inf, np.inf)
        self._x_a, self._x_b, self._x_lo, self._x_hi = (
            np.full(F, v, np.float32) for v in (1.0 / fx.scale if fx.scale else 1.0,
                                                 fx.zero_point if fx.scale else 0.0, lo, hi))
        self._x_tmp = np.zeros(F, np.float32)

        noise = [t for t in ins.values() if t.role == "noise"]
        self._noise = None
        if noise:
            t = noise[0]
            self._noise = (t, np.zeros(t.shape[-1], np.float64))
        self._rng = np.random.default_rng(seed)
        self._seed = seed

        # States: the value fed in next frame is the array the model returned this frame, as
        # it is when input and output carry the same quantization (the converter ties them
        # where it can), else mapped through a table over every integer value:
        # real = (q_out - zo) * s_out = (q_in - zi) * s_in.
        self._state_lut, self._state_init, states = [], [], []
        for a, b in bundle.states:
            ti, to = ins[a], outs[b]
            dtype = np.dtype(ti.dtype)
            lut = None
            if ti.scale and (ti.scale != to.scale or ti.zero_point != to.zero_point):
                info = np.iinfo(dtype)
                q = np.arange(info.min, info.max + 1, dtype=np.float64)
                table = np.clip(np.rint((q - to.zero_point) * (to.scale / ti.scale)) + ti.zero_point,
                                info.min, info.max).astype(dtype)
                lut = (np.roll(table, info.min), np.dtype(f"uint{8 * dtype.itemsize}"))  # index: unsigned view
            self._state_lut.append(lut)
            self._state_init.append(np.full(ti.shape, ti.zero_point if ti.scale else 0, dtype))  # real value 0
            states.append((in_idx[ti.key], out_idx[to.key]) + (lut if lut is not None else (None, None)))
        tp = next(t for t in outs.values() if t.role == "pose")
        th = next(t for t in outs.values() if t.role == "heading")
        self._view_args = (in_idx[fx.key], in_idx[noise[0].key] if noise else None, states,
                           out_idx[tp.key], out_idx[th.key])
        # real = (q - zp) * scale = q * scale - zp * scale
        self._pose_s = np.full(N_POSE, tp.scale or 1.0, np.float32)
        self._pose_off = np.full(N_POSE, np.float32((tp.zero_point if tp.scale else 0) * (tp.scale or 1.0)), np.float32)
        self._pose_lo, self._pose_hi = np.full(N_POSE, -1.0, np.float32), np.full(N_POSE, 1.0, np.float32)
        self._head_s, self._head_zp = float(th.scale or 1.0), float(th.zero_point if th.scale else 0)
        self._pose = np.zeros((N_KEYPOINTS, 2), np.float32)
        self._pose_flat = self._pose.reshape(-1)
        dec = bundle.manifest.get("pose_decode")  # pose = tanh(y * scale + offset), y the dequantized output
        self._decode = None
        if dec is not None:  # dequantize and decode in one multiply-add: q * (s * scale) + (offset - zp * s * scale)
            sc, off = np.asarray(dec["scale"], np.float32), np.asarray(dec["offset"], np.float32)
            self._decode = (self._pose_s * sc, off - self._pose_off * sc)
        self._tail = self._tail_system(bundle.manifest.get("pose_post"))
        self._views = None
        self._invoke = self._interp.invoke
        if hold_views:
            self._hold_views()
        self.reset()

    @staticmethod
    def _tail_system(post: dict | None) -> list | None:
        """The model's pose tail (`pose_post`) as one linear map per frame. Its poles, each from
        the mean pose: the low-pass s' = s + alpha (u - s) on u = y - ms; its second pole q' =
        q + alpha2 (s' - q); the running posture p' = p + beta (last' - p), last the last of
        those (beta > 0 with a gain only); then pose = mg + gp p' + g (ms + last' - mg - p')
        = g last' + (gp - g) p' + K, K = mg + g (ms - mg) (without a low-pass last' = u; the
        clip to [-1, 1] follows). Every pole is a row over [z; u], z the poles' states, and so
        is the pose: [z'; pose - K] = A [z; u], one (k + 1) x (k + 1) matmul on (k + 1, 28)
        instead of a dozen element-wise operations a frame. Returns [A, (ms, K), (current,
        next) buffers] or None (no tail: the pose as decoded)."""
        if post is None:
            return None
        alpha, alpha2, g = float(post["alpha"]), float(post.get("alpha2", 1.0)), float(post["gain"])
        beta = float(post.get("beta", 0.0)) if g != 1.0 else 0.0
        gp = float(post.get("posture_gain", 1.0))
        poles = []  # (coefficient, source pole index or -1 for u)
        if alpha < 1.0 or alpha2 < 1.0 or beta > 0.0:
            poles.append((alpha, -1))
        if alpha2 < 1.0:
            poles.append((alpha2, len(poles) - 1))
        last = len(poles) - 1  # the pose reads this pole (-1: u itself)
        if beta > 0.0:
            poles.append((beta, last))
        k = len(poles)
        rows = []  # each new state as a row over [z_0 .. z_k-1, u]
        for i, (c, src) in enumerate(poles):
            r = np.zeros(k + 1)
            r[i] = 1.0 - c
            r += c * (rows[src] if src >= 0 else np.eye(k + 1)[k])
            rows.append(r)
        out = g * (rows[last] if last >= 0 else np.eye(k + 1)[k])
        if beta > 0.0:
            out = out + (gp - g) * rows[-1]
        A = np.asarray(rows + [out], np.float32).reshape(k + 1, k + 1)
        ms, mg = np.asarray(post["smooth_mean"], np.float64), np.asarray(post["gain_mean"], np.float64)
        K = (mg + g * (ms - mg)).astype(np.float32)
        bufs = (np.zeros((k + 1, N_POSE), np.float32), np.zeros((k + 1, N_POSE), np.float32))
        return [A, (ms.astype(np.float32), K), bufs]

    def _open_views(self) -> _Views:
        return _Views(self._interp, *self._view_args)

    def _hold_views(self) -> None:
        raw = getattr(self._interp, "_interpreter", None)  # LiteRT's and tflite_runtime's C++ wrapper
        invoke = getattr(raw, "Invoke", None)
        if invoke is None:
            log.info("%s: this runtime has no raw invoke; fresh tensor views every step", self.bundle.path)
            return
        views = self._open_views()
        before = [a.__array_interface__["data"][0] for a in views.arrays()]
        invoke()  # any (re-)allocation would happen here
        after = [a.__array_interface__["data"][0] for a in self._open_views().arrays()]
        ins = [views.x] + ([views.noise] if views.noise is not None else []) + [s[0] for s in views.states]
        outs = [s[1] for s in views.states] + [views.pose, views.heading]
        if before != after or any(np.shares_memory(a, b) for a in ins for b in outs):
            log.warning("%s: tensor buffers move or overlap; fresh tensor views every step", self.bundle.path)
            return
        self._views, self._invoke = views, invoke

    @property
    def views_held(self) -> bool:
        return self._views is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._views = None
        self._invoke = None
        self._interp = None

    def reset(self):
        """Start of a new stream: all-zero states (the model's start), heading 0."""
        v = self._views or self._open_views()
        for (vin, _, _, _), init in zip(v.states, self._state_init):
            vin[...] = init
        del v
        if self._tail is not None:
            for z in self._tail[2]:
                z[:-1] = 0.0  # every pole of the tail starts at the mean pose
        self.heading = 0.0
        self._rng = np.random.default_rng(self._seed)
        if self._noise is not None:
            self._noise[1][:] = self._rng.standard_normal(self._noise[1].shape)

    def _quantize_into(self, real, dst, t: TensorInfo):
        if t.scale:
            lo, hi = _qrange(dst.dtype)
            dst[...] = np.clip(np.rint(real / t.scale + t.zero_point), lo, hi)
        else:
            dst[...] = real

    def step(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """x (F,) float32 features of one pose frame -> (pose (14, 2) float32, heading radians)."""
        if (x.shape if type(x) is np.ndarray else np.shape(x)) != self._x_shape:
            raise ValueError(f"StreamingModel.step: features of shape {np.shape(x)}, the bundle "
                             f"{self.bundle.path} takes {self._x_shape} (device.features for its feature config)")
        v = self._views or _InputViews(self._interp, *self._view_args[:2])  # inputs only: 2 views, not all
        if self._x_quantized:
            tmp = self._x_tmp
            np.multiply(x, self._x_a, out=tmp)
            np.add(tmp, self._x_b, out=tmp)
            np.rint(tmp, out=tmp)
            np.maximum(tmp, self._x_lo, out=tmp)  # np.clip costs 2 µs more (a Python wrapper)
            np.minimum(tmp, self._x_hi, out=tmp)
            v.x[...] = tmp  # exact: integers in range
        else:
            np.multiply(x, self._x_a, out=v.x)
        if self._noise is not None:
            t, z = self._noise
            rho = math.exp(-1.0 / self.NOISE_SMOOTH_FRAMES)
            z *= rho
            z += math.sqrt(1 - rho * rho) * self._rng.standard_normal(z.shape)
            self._quantize_into(z.reshape(t.shape), v.noise, t)
        if self._views is None:
            del v  # no view may live through invoke()
        self._invoke()
        v = self._views or self._open_views()
        for vin, vout in v.tied:  # next frame's states, straight into the input buffers
            vin[...] = vout
        for vin, vout, lut, udt in v.mapped:
            vin[...] = lut.take(vout.view(udt))  # np.take(out=) is twice as slow
        tail = self._tail
        pose = self._pose_flat if tail is None else tail[2][0][-1]  # the tail reads its input u from its last row
        if self._decode is not None:  # tanh(y * scale + offset), y dequantized
            np.multiply(v.pose, self._decode[0], out=pose)
            np.add(pose, self._decode[1], out=pose)
            np.tanh(pose, out=pose)
        else:
            np.multiply(v.pose, self._pose_s, out=pose)
            np.subtract(pose, self._pose_off, out=pose)
        if tail is not None:  # [z'; pose - K] = A [z; u], u = pose - ms; the two buffers swap
            A, (ms, k), (cur, nxt) = tail
            np.subtract(pose, ms, out=pose)
            np.matmul(A, cur, out=nxt)
            np.add(nxt[-1], k, out=self._pose_flat)
            tail[2] = (nxt, cur)
            pose = self._pose_flat
        np.maximum(pose, self._pose_lo, out=pose)
        np.minimum(pose, self._pose_hi, out=pose)
        dh = (float(v.heading[0, 0]) - self._head_zp) * self._head_s
        self.heading = (self.heading + dh + math.pi) % (2 * math.pi) - math.pi
        return self._pose.copy(), self.heading

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A whole song from a fresh start: x (T, F) -> poses (T, 14, 2), headings (T,)."""
        self.reset()
        T = x.shape[0]
        poses = np.empty((T, N_KEYPOINTS, 2), np.float32)
        heads = np.empty(T, np.float64)
        for t in range(T):
            poses[t], heads[t] = self.step(x[t])
        return poses, heads
