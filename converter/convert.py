"""Keras step model -> TFLite (float32, dynamic-range int8, full int8, int16x8).

The device runs the model one pose frame at a time: the trainer's step model
(`trainer.model.build_step_model`) takes one frame of features plus every state
(encoder LSTM h/c, the attention ring buffer, decoder h/c, the last pose) and returns
the pose, the heading change and the new states. It is plain ops (no WHILE loop), so
it converts to full int8.

Two decisions shape the converted graph:

* Feature normalisation is folded into the first encoder LSTM. The trainer's step model
  starts with `feat_norm` ((x - mean) * inv_std); with a small std that multiplies some
  columns by up to 1000, and a per-tensor int8 scale after it would crush the others. The
  converter sets `feat_norm` to identity and moves it into the input kernel and bias of every
  LSTM that reads the normalised features (`enc_lstm_0`; with `skip_features` also the
  decoder's rows for them): W' = diag(inv_std) W, b' = b - (mean * inv_std) W, exact in
  float, where int8 weights
  are quantized per output channel. The graph then takes the features as
  `device.features` makes them: every column a fixed affine map of an integer quantity,
  clipped to [-1, 1]. For int8 the converter then pins the input's quantization to
  scale 1/127, zero point 0 (`fix_input_quantization`), so q = round(127 x) exactly.
* States round-trip as integers. Each state input gets the quantization of the output that
  is fed back into it (`tie_state_quantization`), so the device copies the integers back
  as they are. Not for states that enter a concatenation (the attention buffer, the
  previous pose): XNNPACK refuses a concatenation whose inputs have different scales; the
  device re-quantizes those through a lookup table.
* The pose tail leaves the graph too: the output low-pass (`pose_smooth`, s += alpha *
  (y - mean - s)) and the gain (`pose_gain`, clip(mean + g (y - mean), -1, 1)). In int8 the
  low-pass state has a dead zone (a change under half a step / alpha never moves it: 0.011
  for alpha 0.35), a staircase the beat metrics punish. The converted graph is built without
  them (and without their state `smooth_pose`; `KerasModels.graph_signature`), ending at the
  decoder's pose, and the manifest's `pose_post` {alpha, alpha2, smooth_mean, gain, gain_mean,
  beta, posture_gain} has the device run both in float on the dequantized pose (28 values): the
  low-pass s, its second pole q (alpha2 < 1), the running posture (beta > 0,
  `ModelConfig.posture`: p += beta * (q - p)) and pose = gain_mean + posture_gain * p + gain *
  (smooth_mean + q - gain_mean - p).
* The graph is saved from a frozen concrete function. Keras 3 variables otherwise
  stay resource variables in the .tflite and the int8 calibrator fails on READ_VARIABLE.
  Signature outputs are then named output_0.. in the order of `StepSignature.outputs`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import tempfile
import warnings

import numpy as np

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("float", "dynamic", "int8", "int16x8")
FEATURE_INPUT = "x"
NOISE_INPUT = "noise"
POSE_OUTPUT = "pose"
HEADING_OUTPUT = "dheading"
STATE_OUT_SUFFIX = "_out"
EQUIVALENCE_TOL = 1e-4  # max abs diff, step vs sequence model, float


class ConversionError(RuntimeError):
    """The model cannot be converted as asked (with what to change)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # with the batch dimension (1)


@dataclasses.dataclass(frozen=True)
class StepSignature:
    """Names and shapes of a step model's inputs and outputs, and how states pair up."""

    inputs: tuple[TensorSpec, ...]  # x, [noise], states, in the Keras model's input order
    outputs: tuple[TensorSpec, ...]  # pose, dheading, then `<state>_out` in state order
    states: tuple[tuple[str, str], ...]  # (input name, output name)

    @property
    def n_features(self) -> int:
        return self.input(FEATURE_INPUT).shape[-1]

    @property
    def noise_dims(self) -> int:
        return next((s.shape[-1] for s in self.inputs if s.name == NOISE_INPUT), 0)

    def input(self, name: str) -> TensorSpec:
        return next(s for s in self.inputs if s.name == name)


def describe(step_model) -> StepSignature:
    """Read the step model's tensor names; states are the inputs other than x/noise, each with
    an output of the same name plus `_out`."""
    in_specs = [TensorSpec(t.name, tuple(int(d) for d in t.shape)) for t in step_model.inputs]
    names = [s.name for s in in_specs]
    if FEATURE_INPUT not in names:
        raise ConversionError(f"step model {step_model.name}: no input named {FEATURE_INPUT!r} (inputs {names})")
    out = step_model({s.name: np.zeros(s.shape, np.float32) for s in in_specs}, training=False)
    if not isinstance(out, dict):
        raise ConversionError(f"step model {step_model.name}: outputs must be a dict by name, got {type(out).__name__}")
    out_shapes = {k: tuple(int(d) for d in np.shape(v)) for k, v in out.items()}
    for need in (POSE_OUTPUT, HEADING_OUTPUT):
        if need not in out_shapes:
            raise ConversionError(f"step model {step_model.name}: no output named {need!r} (outputs {sorted(out_shapes)})")
    states = []
    for s in in_specs:
        if s.name in (FEATURE_INPUT, NOISE_INPUT):
            continue
        o = s.name + STATE_OUT_SUFFIX
        if out_shapes.get(o) != s.shape:
            raise ConversionError(f"step model {step_model.name}: state input {s.name!r} {s.shape} needs an output "
                                  f"{o!r} of the same shape (got {out_shapes.get(o)})")
        states.append((s.name, o))
    outputs = [POSE_OUTPUT, HEADING_OUTPUT] + [o for _, o in states]
    extra = sorted(set(out_shapes) - set(outputs))
    if extra:
        raise ConversionError(f"step model {step_model.name}: unexpected outputs {extra}")
    return StepSignature(tuple(in_specs), tuple(TensorSpec(n, out_shapes[n]) for n in outputs), tuple(states))


# ---------------------------------------------------------------------------------------
# Keras side: the models, their equivalence, realistic states


@dataclasses.dataclass
class KerasModels:
    """The trained sequence model, its step model (weights copied) and what the bundle needs."""

    sequence: object
    step: object
    mcfg: object  # trainer.model.ModelConfig
    feature_cfg: object  # device.contract.FeatureConfig
    normalization: dict  # as saved by the trainer (n_features, ...)
    feat_mean: np.ndarray  # (F,) taken from the model's feat_norm layer
    feat_inv_std: np.ndarray  # (F,)
    signature: StepSignature
    source: str = ""
    smoothing: dict | None = None  # the pose tail run on the device (trainer.model.output_stage_params)
    pose_decode: dict | None = None  # the pose read-out of the last to_tflite (fit_pose_decode; None = identity)
    pose_readout: dict | None = None  # its weights refitted to the int8 graph's own decoder (fit_pose_readout)
    dec_c_scale: list | None = None  # the int8 graph's per-unit scale of the decoder's cell state (cell_state_scale)
    dec_tanh_range: float | None = None  # the int8 range of that cell state on its way into tanh (unscaled)
    _graph_sig: StepSignature | None = dataclasses.field(default=None, repr=False)

    def graph_signature(self) -> StepSignature:
        """The signature of the converted graph (`folded_clone`): the step model's, without the
        states of the pose tail when the device runs it (`smooth_pose`)."""
        if self._graph_sig is None:
            self._graph_sig = describe(folded_clone(self))
        return self._graph_sig


def from_sequence_model(sequence, mcfg, feature_cfg, normalization: dict, source: str = "") -> KerasModels:
    """Build the step model of a (trained) sequence model and copy its weights by layer name."""
    from trainer import model as tm

    n_features = int(sequence.get_layer("feat_norm").n_features)
    step = tm.build_step_model(mcfg, n_features)
    tm.copy_weights(sequence, step)
    mean, inv_std = (np.asarray(w, np.float32) for w in step.get_layer("feat_norm").get_weights())
    smoothing = tm.output_stage_params(step)
    return KerasModels(sequence, step, mcfg, feature_cfg, dict(normalization), mean, inv_std, describe(step), source,
                       smoothing)


def from_run(run_dir) -> KerasModels:
    """The models of a trained run folder (`trainer.model.load_run`)."""
    from trainer import model as tm

    seq, mcfg, fcfg, norm = tm.load_run(run_dir)
    if mcfg.kind != "ours":
        raise ConversionError(f"{run_dir}: model kind {mcfg.kind!r} has no streaming step model; convert an 'ours' run")
    return from_sequence_model(seq, mcfg, fcfg, norm, source=str(run_dir))


class KerasStepper:
    """Runs a Keras step model frame by frame (compiled once), feeding the states back."""

    def __init__(self, models: KerasModels, folded: bool = False):
        import tensorflow as tf

        self.models = models
        self.sig = models.graph_signature() if folded else models.signature
        step = folded_clone(models, models.pose_decode, models.pose_readout, models.dec_c_scale) if folded else models.step
        sm = models.smoothing if folded else None
        dc = (models.pose_decode or {"offset": [0.0] * 28, "scale": [1.0] * 28}) if folded else None
        self._decode = None if dc is None else (np.asarray(dc["scale"], np.float32), np.asarray(dc["offset"], np.float32))
        self._post = None if sm is None else {k: np.asarray(v, np.float32) for k, v in sm.items()}
        self._fn = tf.function(lambda feed: step(feed, training=False), reduce_retracing=True)
        self.reset()

    def reset(self):
        self.states = {i: np.zeros(self.sig.input(i).shape, np.float32) for i, _ in self.sig.states}
        self._s = np.zeros((1, 28), np.float32)
        self._q = np.zeros((1, 28), np.float32)
        self._p = np.zeros((1, 28), np.float32)

    def step(self, x: np.ndarray, noise: np.ndarray | None = None) -> dict:
        feed = {FEATURE_INPUT: np.asarray(x, np.float32).reshape(1, -1), **self.states}
        if self.sig.noise_dims:
            feed[NOISE_INPUT] = np.asarray(noise, np.float32).reshape(1, -1)
        out = {k: np.asarray(v) for k, v in self._fn(feed).items()}
        self.states = {i: out[o] for i, o in self.sig.states}
        if self._decode is not None:  # the folded graph's pose is the linear read-out
            out[POSE_OUTPUT] = np.tanh(out[POSE_OUTPUT] * self._decode[0] + self._decode[1])
        if self._post is not None:  # the folded graph leaves the low-pass and the gain to the device
            p = self._post
            self._s += p["alpha"] * (out[POSE_OUTPUT] - p["smooth_mean"] - self._s)
            self._q += p["alpha2"] * (self._s - self._q)  # the second pole (alpha2 1: q = s)
            self._p += p["beta"] * (self._q - self._p)  # the running posture (beta 0: stays at the mean)
            d = p["smooth_mean"] + self._q - p["gain_mean"]
            pose = p["gain_mean"] + p["posture_gain"] * self._p + p["gain"] * (d - self._p)
            out[POSE_OUTPUT] = np.clip(pose, -1.0, 1.0)
        return out

    def run(self, x: np.ndarray, noise: np.ndarray | None = None, record_every: int = 0):
        """x (T, F) -> out (T, 29) (pose then dheading); with record_every > 0 also a list of
        input dicts (features + states as fed) every that many frames, for calibration."""
        self.reset()
        outs, rec = [], []
        for t in range(x.shape[0]):
            nt = None if noise is None else noise[t]
            if record_every and t % record_every == 0:
                feed = {FEATURE_INPUT: x[t : t + 1].astype(np.float32), **{k: v.copy() for k, v in self.states.items()}}
                if nt is not None:
                    feed[NOISE_INPUT] = nt[None].astype(np.float32)
                rec.append(feed)
            o = self.step(x[t], nt)
            outs.append(np.concatenate([o[POSE_OUTPUT][0], o[HEADING_OUTPUT][0]]))
        return (np.stack(outs), rec) if record_every else np.stack(outs)


def sequence_outputs(models: KerasModels, x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    """The sequence model free-running over a whole song: (T, 29)."""
    from trainer import model as tm

    return tm.run_free(models.sequence, models.mcfg, x, noise)


def check_equivalence(models: KerasModels, x: np.ndarray, noise: np.ndarray | None = None,
                      tol: float = EQUIVALENCE_TOL) -> float:
    """Max abs difference of step vs sequence model over x (T, F), float. Raises over `tol`."""
    seq = sequence_outputs(models, x, noise)
    step = KerasStepper(models).run(x, noise)
    diff = float(np.max(np.abs(seq - step)))
    log.info("step vs sequence over %d frames: max abs diff %.3g", x.shape[0], diff)
    if not diff <= tol:
        raise ConversionError(f"{models.source or 'model'}: the step model differs from the sequence model by "
                              f"{diff:.3g} (> {tol}) over {x.shape[0]} frames: the step model does not match training")
    return diff


def representative_samples(models: KerasModels, songs: list[np.ndarray], n_samples: int = 400,
                           noises: list[np.ndarray] | None = None) -> list[dict]:
    """Calibration inputs for full-integer quantization: real features with the states the
    float step model really reaches there (dicts keyed by input name)."""
    total = sum(s.shape[0] for s in songs)
    every = max(1, total // n_samples)
    stepper = KerasStepper(models)
    samples = []
    for i, x in enumerate(songs):
        _, rec = stepper.run(x, None if noises is None else noises[i], record_every=every)
        samples += rec
    log.info("representative data: %d samples from %d songs (%d frames)", len(samples), len(songs), total)
    return samples


# ---------------------------------------------------------------------------------------
# TFLite


def folded_clone(models: KerasModels, pose_decode: dict | None = None, readout: dict | None = None,
                 c_scale=None):
    """A copy of the step model with feat_norm folded into the LSTMs (feat_norm = identity) and
    without the pose tail (low-pass, gain, posture, their states): the device runs it in float
    (module doc), so the graph ends at the decoder. Its pose leaves as the linear read-out
    y = (W h + b - offset) / scale (`trainer.model.build_step_model(pose_out=True)`; `pose_decode`
    {offset, scale}, per coordinate; identity when None) and the device takes tanh(y * scale +
    offset): in int8, tanh's output has a fixed 1/128 grid over [-1, 1] for all 28 coordinates
    at once, while y gives each coordinate 256 steps over its own range of motion. The read-out
    takes [h_t, h_t-1, tanh(c_t), x] (the previous frame's h is a state input anyway, tanh(c_t)
    the LSTM computes anyway, x the frame's features): weight 0 on all but h_t here, or
    `readout` {"pose": (W (3 units + F, 28), b), "heading": (W (units, 1), b)} from
    `fit_pose_readout`. `c_scale` (dec_units,): the decoder's cell state held per unit scaled,
    dec_c = k c (`cell_state_scale`); the same function of the inputs and the other states."""
    from trainer import model as tm

    mcfg = dataclasses.replace(models.mcfg, smooth=False, output_gain=False)
    clone = tm.build_step_model(mcfg, models.signature.n_features, pose_out=True, dec_c_scale=c_scale)
    tm.copy_weights(models.step, clone, strict=False)  # by name: the tail's layers are not in the clone
    n = models.signature.n_features
    clone.get_layer("feat_norm").set_weights([np.zeros(n, np.float32), np.ones(n, np.float32)])
    m, s = models.feat_mean.astype(np.float64), models.feat_inv_std.astype(np.float64)
    _fold_rows(clone.get_layer("enc_lstm_0"), 0, m, s)
    mcfg = models.mcfg
    if getattr(mcfg, "skip_features", False):  # the decoder also sees the normalised features
        offset = mcfg.units * (1 + bool(mcfg.attention))  # decoder input: [h, ctx, xn, prev pose]
        _fold_rows(clone.get_layer("decoder").lstm, offset, m, s)
    dec, head = clone.get_layer("decoder"), clone.get_layer("dec_pose_out")
    W, b = (w.astype(np.float64) for w in dec.pose_head.get_weights())
    dc = pose_decode or {"offset": [0.0] * 28, "scale": [1.0] * 28}
    off, sc = np.asarray(dc["offset"], np.float64), np.asarray(dc["scale"], np.float64)
    if readout is not None:  # fit_pose_readout's weights
        head.set_weights([np.asarray(w, np.float32) for w in readout["pose"]])
        dec.heading_head.set_weights([np.asarray(w, np.float32) for w in readout["heading"]])
    else:  # the float read-out: this frame's h only
        rest = np.zeros((head.get_weights()[0].shape[0] - W.shape[0], W.shape[1]))  # h_t-1, tanh(c_t), x
        head.set_weights([np.concatenate([W / sc, rest]).astype(np.float32), ((b - off) / sc).astype(np.float32)])
    return clone


POSE_RANGE_PERCENTILE = 99.9  # the int8 pose read-out spans this share of each coordinate's motion


def fit_pose_decode(models: KerasModels, samples: list[dict], pct: float = POSE_RANGE_PERCENTILE) -> dict:
    """Per coordinate of the pose pre-activation z = W h + b over the representative samples:
    offset = its mean, scale = the pct-th percentile of |z - offset| (so y = (z - offset) / scale
    is within [-1, 1] but for the tails). For `folded_clone` and the manifest's `pose_decode`."""
    import tensorflow as tf

    step = folded_clone(models)  # identity decode: the pose output is z
    names = [i.name for i in step.inputs]
    fn = tf.function(lambda feed: step(feed, training=False)[POSE_OUTPUT])
    z = np.concatenate([np.asarray(fn({k: smp[k].astype(np.float32) for k in names})) for smp in samples])
    off = z.mean(0)
    sc = np.maximum(np.percentile(np.abs(z - off), pct, axis=0), 1e-3)
    return {"activation": "tanh", "offset": [float(v) for v in off], "scale": [float(v) for v in sc],
            "note": "pose = tanh(y * scale + offset), y the dequantized pose output"}


READOUT_RIDGE = 1e-5  # the read-out fit's ridge, per frame (error on held-out songs: 1e-6 0.00058, 1e-5 0.00059, 1e-4 0.00064)


def quantize_to(v, detail: dict) -> np.ndarray:
    """Real values onto a TFLite tensor's grid (`detail`: an entry of a signature runner's
    get_input_details / get_output_details); a float tensor takes them as they are."""
    s_, z = detail["quantization"]
    if not s_:
        return np.asarray(v, detail["dtype"])
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(np.asarray(v, np.float32) / s_) + z, info.min, info.max).astype(detail["dtype"])


def dequantize(v: np.ndarray, detail: dict) -> np.ndarray:
    """A TFLite tensor's values as real numbers (float32)."""
    s_, z = detail["quantization"]
    return (v.astype(np.float32) - z) * s_ if s_ else v.astype(np.float32)


def readout_trajectories(models: KerasModels, blob: bytes, songs: list[np.ndarray]):
    """Each song (T, F) run free: the int8 graph `blob` on its own states, fed back as the device
    does, and the float step model on its own. Per frame what the graph's pose read-out reads,
    dequantized: [h_t, h_t-1, tanh(c_t), x] (N, 3 units + F; tanh(c_t) on the int8 TANH's 1/128
    grid, x on the input's), the float model's read-outs (N, 29: the pose's 28 then the heading
    change), and the float pose read-out's weights (W (3 units + F, 28), b). The read-out feeds
    nothing back (the fed-back pose is the tanh head's): these are what the graph holds
    whatever its read-out weights."""
    import tensorflow as tf

    step = folded_clone(models, models.pose_decode)
    sig = describe(step)
    keys = {name: key for key, name in output_names(sig).items()}
    if not {"dec_h_out", "dec_c_out"} <= set(keys):
        raise ConversionError("fit_pose_readout: the step model has no decoder states dec_h, dec_c")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tf.lite.Interpreter's deprecation notice
        runner = tf.lite.Interpreter(model_content=blob).get_signature_runner()
    ind, outd = runner.get_input_details(), runner.get_output_details()
    fn = tf.function(lambda feed: step(feed, training=False), reduce_retracing=True)
    extra = {NOISE_INPUT: np.zeros((1, sig.noise_dims), np.float32)} if sig.noise_dims else {}  # at zero noise
    extra_q = {k: quantize_to(v, ind[k]) for k, v in extra.items()}
    if models.dec_c_scale is None:  # tanh reads the state on its own grid
        inv_k, tanh_step = 1.0, None
    else:  # tanh reads c = dec_c / k on its own grid (pin_cell_state)
        inv_k, tanh_step = 1.0 / np.asarray(models.dec_c_scale, np.float64), 2.0 * models.dec_tanh_range / 255.0
    X, Y = [], []
    for x in songs:
        q = zero_states(sig, ind)
        f = {a: np.zeros(ind[a]["shape"], np.float32) for a, _ in sig.states}
        for t in range(len(x)):
            xt = np.asarray(x[t : t + 1], np.float32)
            xq = quantize_to(xt, ind[FEATURE_INPUT])
            out = runner(**{FEATURE_INPUT: xq, **q, **extra_q})
            c = dequantize(out[keys["dec_c_out"]], outd[keys["dec_c_out"]])[0] * inv_k
            if tanh_step is not None:
                c = np.clip(np.round(c / tanh_step), -128, 127) * tanh_step
            X.append(np.concatenate([dequantize(out[keys["dec_h_out"]], outd[keys["dec_h_out"]])[0],
                                     dequantize(q["dec_h"], ind["dec_h"])[0],
                                     np.clip(np.round(np.tanh(c) * 128), -128, 127) / 128,
                                     dequantize(xq, ind[FEATURE_INPUT])[0]]))
            q = fed_back(sig, keys, out, ind, outd)
            ref = fn({FEATURE_INPUT: xt, **f, **extra})
            Y.append(np.concatenate([np.asarray(ref[POSE_OUTPUT])[0], np.asarray(ref[HEADING_OUTPUT])[0]]))
            f = {a: np.asarray(ref[b]) for a, b in sig.states}
    return np.asarray(X, np.float64), np.asarray(Y, np.float64), step.get_layer("dec_pose_out").get_weights()


def zero_states(sig: StepSignature, ind: dict) -> dict:
    """A TFLite step's state inputs at the model's start (real value 0), on their grids."""
    return {a: quantize_to(np.zeros(ind[a]["shape"], np.float32), ind[a]) for a, _ in sig.states}


def fed_back(sig: StepSignature, keys: dict, out: dict, ind: dict, outd: dict) -> dict:
    """A TFLite step's state outputs as its next state inputs, as the device feeds them back:
    a tied state's integers as they are, another re-quantized onto its input's grid. `keys`:
    our output name -> signature key; `ind`, `outd`: the runner's input and output details."""
    nxt = {}
    for a, o in sig.states:
        v, d = out[keys[o]], outd[keys[o]]
        nxt[a] = v if d["quantization"] == ind[a]["quantization"] else quantize_to(dequantize(v, d), ind[a])
    return nxt


def _least_squares(X: np.ndarray, Y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """W, b minimising |X W + b - Y|^2 + ridge * N * |W|^2."""
    A = np.concatenate([X, np.ones((len(X), 1))], axis=1)
    R = ridge * len(X) * np.eye(A.shape[1])
    R[-1, -1] = 0.0  # no penalty on the bias
    sol = np.linalg.solve(A.T @ A + R, A.T @ Y)
    return sol[:-1].astype(np.float32), sol[-1].astype(np.float32)


def fit_pose_readout(models: KerasModels, blob: bytes, songs: list[np.ndarray], ridge: float = READOUT_RIDGE) -> dict:
    """The pose read-out refitted to what the int8 graph really holds when it runs free: the
    least-squares y = W [h_t, h_t-1, tanh(c_t), x] + b from the graph's own dequantized decoder
    and the frame's features to what the float model reads out running free itself over the same
    songs (`readout_trajectories`). The int8 h carries rounding noise on every unit (the int8
    TANH and LOGISTIC grids, h's own grid) that the float weights, large in directions where h
    barely varies, turn into frame-to-frame noise of the pose; and over a song the int8 states
    drift from the float model's, and with them the timing of the moves. The fit keeps the
    signal, averages the noise over two frames, reads the float model's pose from where the int8
    decoder really is (tanh(c_t) holds what the rounded h loses) and takes the beat's timing
    from the features themselves, which are exact. The heading change's read-out gets the same
    fit from h_t (it is integrated on the device, so its bias is what turns the figure).
    Returns {"pose": (W (3 units + F, 28), b), "heading": (W (units, 1), b)}."""
    X, Y, (W0, b0) = readout_trajectories(models, blob, songs)
    if len(X) <= X.shape[1]:
        raise ConversionError(f"fit_pose_readout: {len(X)} frames in {len(songs)} songs, fewer than the read-out's "
                              f"{X.shape[1]} inputs: give it more (training songs, --readout-frames)")
    units = models.mcfg.dec_units
    pose, heading = _least_squares(X, Y[:, :28], ridge), _least_squares(X[:, :units], Y[:, 28:], ridge)
    log.info("pose read-out refitted to the int8 graph over %d frames of %d songs run free: error %.3g -> %.3g "
             "(y units^2)", len(X), len(songs), np.mean((X @ W0 + b0 - Y[:, :28]) ** 2),
             np.mean((X @ pose[0] + pose[1] - Y[:, :28]) ** 2))
    return {"pose": pose, "heading": heading}


def _fold_rows(cell, offset: int, mean: np.ndarray, inv_std: np.ndarray) -> None:
    """An LSTM cell whose input rows offset..offset+F take (x - mean) * inv_std: take x instead.
    z = xn W + b = x (diag(inv_std) W) + (b - (mean * inv_std) W)."""
    kernel, recurrent, bias = cell.get_weights()  # (in, 4U), (U, 4U), (4U,)
    F = mean.shape[0]
    rows = kernel[offset:offset + F].astype(np.float64)  # (F, 4U)
    assert rows.shape[0] == F, (cell.name, kernel.shape, offset, F)
    kernel = kernel.copy()
    kernel[offset:offset + F] = (inv_std[:, None] * rows).astype(np.float32)
    cell.set_weights([kernel, recurrent, (bias - (mean * inv_std) @ rows).astype(np.float32)])


FIXED_INPUT_SCALE = 1.0 / 127  # device.features: every column in [-1, 1] -> q = round(127 x)


def _retune_quantization(blob: bytes, plan) -> bytes:
    """Rewrite the quantization of signature input tensors. plan(model, subgraph, inputs, outputs) returns
    {input tensor index: (scale, zero point)}, given name -> tensor index maps.

    Exact, not approximate: every TFLite kernel reads its operands' scales when it is
    prepared, so the ops consuming an input simply rescale from the new scale. Valid when
    the new scale still covers the input's range."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(blob), 0)
    sg = model.subgraphs[0]
    sig = model.signatureDefs[0]
    inputs = {t.name.decode(): t.tensorIndex for t in sig.inputs}
    outputs = {t.name.decode(): t.tensorIndex for t in sig.outputs}
    for idx, (scale, zp) in plan(model, sg, inputs, outputs).items():  # any tensor index
        q = sg.tensors[idx].quantization
        if q is None or q.scale is None or len(q.scale) != 1:
            raise ConversionError(f"tensor {sg.tensors[idx].name!r} is not per-tensor quantized")
        log.debug("tensor %s: quantization (%.6g, %d) -> (%.6g, %d)", sg.tensors[idx].name,
                  q.scale[0], q.zeroPoint[0], scale, zp)
        q.scale, q.zeroPoint = [float(scale)], [int(zp)]
    b = flatbuffers.Builder(len(blob) + 1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


RESCALE_SAFE_OPS = ("FULLY_CONNECTED", "MUL", "ADD", "SUB", "TANH", "LOGISTIC")


@functools.cache
def _builtin_names() -> dict[int, str]:
    from tensorflow.lite.python import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def _op_name(model, op) -> str:
    """The builtin operator's name of a flatbuffer op (FULLY_CONNECTED, ADD, ...)."""
    code = model.operatorCodes[op.opcodeIndex]
    return _builtin_names().get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")


def _consumers(model, sg) -> dict[int, set[str]]:
    """Tensor index -> names of the builtin ops that read it."""
    out: dict[int, set[str]] = {}
    for op in sg.operators:
        name = _op_name(model, op)
        for i in op.inputs:
            out.setdefault(int(i), set()).add(name)
    return out


def _producers(model, sg) -> dict[int, object]:
    """Tensor index -> the op that writes it."""
    return {int(o): op for op in sg.operators for o in op.outputs}


def _concat_inputs(model, sg) -> set[int]:
    """Tensors that enter a CONCATENATION: XNNPACK wants one scale across its inputs."""
    return {int(i) for op in sg.operators if _op_name(model, op) == "CONCATENATION" for i in op.inputs}


def fix_input_quantization(blob: bytes, input_name: str = FEATURE_INPUT, scale: float = FIXED_INPUT_SCALE,
                           zero_point: int = 0) -> bytes:
    """Pin an int8 input's quantization to a fixed (scale, zero point): for the features,
    1/127 and 0, the features' own [-1, 1] map."""
    def plan(model, sg, inputs, outputs):
        if input_name not in inputs:
            raise ConversionError(f"fix_input_quantization: no signature input {input_name!r}")
        if inputs[input_name] in _concat_inputs(model, sg):
            log.info("input %s enters a concatenation: keeping its calibrated quantization", input_name)
            return {}
        return {inputs[input_name]: (scale, zero_point)}
    return _retune_quantization(blob, plan)


POSE_OUTPUT_SCALE = 1.0 / 127  # the int8 pose read-out's grid: y in [-1, 1] (fit_pose_decode's range)


def pin_pose_output(blob: bytes, sig: StepSignature, scale: float = POSE_OUTPUT_SCALE) -> bytes:
    """Pin the int8 pose read-out's quantization to [-1, 1] (scale 1/127, zero point 0), the range
    `fit_pose_decode` maps the 99.9th percentile of each coordinate's motion to. Calibrated on
    min/max it spans the tails (about +-1.5): a 1.5x coarser grid, whose rounding, white noise
    every frame, is jitter the output gain amplifies. The rare y past +-1 saturate. Exact: the
    op making y (the read-out's FULLY_CONNECTED) rescales onto its output's grid, and nothing in
    the graph reads y."""
    key = {name: key for key, name in output_names(sig).items()}[POSE_OUTPUT]

    def plan(model, sg, inputs, outputs):
        idx = outputs[key]
        maker = _producers(model, sg).get(idx)
        if maker is None or _op_name(model, maker) not in RESCALE_SAFE_OPS or idx in _consumers(model, sg):
            log.info("pose output: kept its calibrated quantization (not made by a rescaling op, or read in the graph)")
            return {}
        return {idx: (scale, 0)}
    return _retune_quantization(blob, plan)


def tie_state_quantization(blob: bytes, sig: StepSignature) -> bytes:
    """Give every state input the quantization of the state output fed back into it, so the
    device copies the integers back unchanged: no re-quantization step and no extra rounding
    per frame. The calibrator sees inputs and outputs of the same distribution, so the
    ranges (and scales) differ by a few percent only."""
    keys = {name: key for key, name in output_names(sig).items()}

    def plan(model, sg, inputs, outputs):
        concat_inputs = _concat_inputs(model, sg)
        consumers, producers = _consumers(model, sg), _producers(model, sg)
        out = {}
        for a, b in sig.states:
            i_idx, o_idx = inputs[a], outputs[keys[b]]
            if i_idx in concat_inputs:
                # XNNPACK (and the quantizer) want one scale across a concatenation's inputs: the
                # input keeps it, and the output takes it instead when the op making it rescales
                # (the fed-back pose, pose - mean: one rounding onto the grid the input has anyway,
                # instead of two through a table on the device)
                maker = producers.get(o_idx)
                if (maker is not None and _op_name(model, maker) in RESCALE_SAFE_OPS
                        and consumers.get(o_idx, set()) <= set(RESCALE_SAFE_OPS)):
                    q = sg.tensors[i_idx].quantization
                    out[o_idx] = (q.scale[0], q.zeroPoint[0])
                continue
            q = sg.tensors[o_idx].quantization
            out[i_idx] = (q.scale[0], q.zeroPoint[0])
        return out
    return _retune_quantization(blob, plan)


# The tied LSTM states' int8 range: the 99th percentile of |value|, when that narrows the
# min/max range by 1.2x or more. The decoder's cell state decides the device's jitter: its
# units' 99.9th percentiles run from 0.14 (median 0.26) to 5.6, and one per-tensor int8 scale
# for all of them (min/max: [-5.7, 3.1], a step of 0.034) made frame-to-frame noise that the
# output gain amplifies. 99 (+-1.8) against 99.9 on the shipped model, int8: jitter with the
# Keras output stage 3.2 -> 2.8x a dancer's, and with the refitted stage energy 0.68 -> 0.74,
# MSE 0.0075 -> 0.0076; 97 clips too much (MSE 0.015).
STATE_RANGE_PERCENTILE = 99.0
STATE_RANGE_MIN_GAIN = 1.2


def state_percentile(samples: list[dict], state: str, pct: float) -> float:
    """The pct-th percentile of |value| of one state over the calibration samples, all units."""
    return float(np.percentile(np.abs(np.concatenate([np.ravel(s_[state]) for s_ in samples])), pct))


def _carried_products(model, i_idx: int, o_idx: int, consumers: dict, producers: dict) -> list[int]:
    """The products that carry a state into its own update: for an LSTM cell state, f * c in
    c' = f * c + i * g (an ADD whose operand is a MUL that reads the state input), when read by
    that ADD only (`_consumers`, `_producers` of the subgraph)."""
    add = producers.get(o_idx)
    if add is None or _op_name(model, add) != "ADD":
        return []
    return [t for t in map(int, add.inputs)
            if (mul := producers.get(t)) is not None and _op_name(model, mul) == "MUL"
            and i_idx in map(int, mul.inputs) and consumers.get(t, set()) == {"ADD"}]


def narrow_state_ranges(blob: bytes, sig: StepSignature, samples: list[dict], pct: float = STATE_RANGE_PERCENTILE,
                        min_gain: float = STATE_RANGE_MIN_GAIN, pct_by_state: dict | None = None,
                        carry_products: bool = True) -> bytes:
    """Calibrate the tied states by a percentile of |value| instead of min/max. An LSTM's cell
    state has long tails (the first encoder's c: |c| up to 20, std 0.9, 99.9th percentile 9),
    and a min/max int8 scale spends its 256 steps on the tails. The rare values past the
    percentile saturate; tanh(c) is flat there anyway. Applied to a tied state (output and
    input together) only when the range shrinks by at least `min_gain`. With `carry_products`
    the product that carries the state into its update (f * c, |f * c| <= |c|) gets the state's
    grid too: calibrated on min/max it kept the tails' coarse step (2-6x the state's), and its
    rounding every frame moved the state's trajectory."""
    keys = {name: key for key, name in output_names(sig).items()}

    def plan(model, sg, inputs, outputs):
        consumers, producers = _consumers(model, sg), _producers(model, sg)
        out = {}
        for a, b in sig.states:
            i_idx, o_idx = inputs[a], outputs[keys[b]]
            if not (consumers.get(i_idx, set()) | consumers.get(o_idx, set())) <= set(RESCALE_SAFE_OPS):
                continue  # a slice, reshape or concatenation must keep its operands' scale (XNNPACK)
            q = sg.tensors[o_idx].quantization
            lo_c = (-128 - q.zeroPoint[0]) * q.scale[0]
            hi_c = (127 - q.zeroPoint[0]) * q.scale[0]
            p_a = (pct_by_state or {}).get(a, pct)
            r = state_percentile(samples, a, p_a)
            lo, hi = max(lo_c, -r), min(hi_c, r)
            if r <= 0 or (hi_c - lo_c) < min_gain * (hi - lo):
                continue
            scale = (hi - lo) / 255.0
            zp = int(np.clip(np.rint(-128 - lo / scale), -128, 127))
            log.info("state %s: int8 range [%.3g, %.3g] -> [%.3g, %.3g]", a, lo_c, hi_c, lo, hi)
            out[i_idx] = out[o_idx] = (scale, zp)
            for t in _carried_products(model, i_idx, o_idx, consumers, producers) if carry_products else ():
                log.info("state %s: its carried product %s on the state's grid", a, sg.tensors[t].name.decode())
                out[t] = (scale, zp)
        return out
    return _retune_quantization(blob, plan)


# The decoder's cell state held per unit scaled in the int8 graph (DecoderCell.c_scale): dec_c = k c
# on the grid [-1, 1]. Unscaled, the shipped model's units reach 0.16 to 6 (median 0.40) over the
# training songs and share one grid, +-r (r = 1.81, the 99th percentile of |c|, as
# `narrow_state_ranges` sets it): a step of 0.014, some 60 of 256 steps for the median unit.
# Rounding that state alone, in the float model, costs BAS 0.015 on the held-out songs, half its
# step none (docs/results/quantization.md, session 6). k = 1 / (CELL_HEADROOM x min(reach, r /
# CELL_HEADROOM)): a unit that reaches less than r / 1.5 gets a grid 1.5x its reach (the median
# unit 0.0047, 3x finer; the headroom for songs that drive it further than the training songs
# did); a wider one keeps the unscaled grid and clips where it did (scaled to its reach instead,
# the widest got 5x coarser grids and the output more jitter).
CELL_HEADROOM = 1.5
CELL_SCALE_FLOOR = 1e-2  # a unit that barely moves (|c| below this) is scaled as if it reached it


def cell_state_reach(models: KerasModels, songs: list[np.ndarray], state: str = "dec_c") -> np.ndarray:
    """Each unit's largest |c| with the float step model running over the songs, every frame.
    (The calibration samples, a frame in 30, miss the peaks: 44 of the shipped model's 128 units
    reach more than 1.5x their largest sampled value somewhere in the training songs.)"""
    stepper = KerasStepper(models)
    reach = np.zeros(np.shape(stepper.states[state])[-1])
    for x in songs:
        stepper.reset()
        for t in range(x.shape[0]):
            stepper.step(x[t])
            reach = np.maximum(reach, np.abs(stepper.states[state][0]))
    return reach


def cell_state_scale(reach: np.ndarray, r: float, headroom: float = CELL_HEADROOM) -> list[float]:
    """k per unit: 1 / (headroom x min(reach, r / headroom)), the reach floored at
    CELL_SCALE_FLOOR: [-1, 1] spans headroom x the unit's reach, or at most +-r."""
    reach = np.clip(np.asarray(reach, np.float64), CELL_SCALE_FLOOR, r / headroom)
    return [float(v) for v in 1.0 / (headroom * reach)]


def scaled_samples(samples: list[dict] | None, c_scale, state: str = "dec_c") -> list[dict] | None:
    """Calibration samples for the graph with the scaled cell state (dec_c = k c); as they are
    without a scale."""
    if c_scale is None or not samples:
        return samples
    k = np.asarray(c_scale, np.float32)
    return [{**s_, state: (np.asarray(s_[state], np.float32) * k).astype(np.float32)} for s_ in samples]


def pin_cell_state(blob: bytes, sig: StepSignature, tanh_range: float, state: str = "dec_c") -> bytes:
    """The scaled cell state's grids: the state (input and output), the product that carries it
    (f c') and the one that feeds it ((i g) diag(k), the FULLY_CONNECTED into the ADD) on [-1, 1],
    so the ADD sums integers of one grid and rounds nothing; the FULLY_CONNECTED diag(1/k) that
    takes it back to c for tanh on [-tanh_range, tanh_range]. Calibrated on min/max the state's
    range would end at the calibration's largest value, and the fed product's at its widest
    unit's (several times the state's step)."""
    key = {name: key for key, name in output_names(sig).items()}[state + STATE_OUT_SUFFIX]

    def plan(model, sg, inputs, outputs):
        i_idx, o_idx = inputs[state], outputs[key]
        consumers, producers = _consumers(model, sg), _producers(model, sg)
        add = producers.get(o_idx)
        fcs = [int(op.outputs[0]) for op in sg.operators
               if _op_name(model, op) == "FULLY_CONNECTED" and o_idx in map(int, op.inputs)]
        fed = [t for t in map(int, add.inputs) if (p := producers.get(t)) is not None
               and _op_name(model, p) == "FULLY_CONNECTED"] if add is not None and _op_name(model, add) == "ADD" else []
        if len(fcs) != 1 or consumers.get(fcs[0], set()) != {"TANH"} or len(fed) != 1:
            raise ConversionError(f"pin_cell_state: {state} is not the scaled cell state c' = f c' + (i g) diag(k) "
                                  "read by tanh(c' diag(1/k)) (DecoderCell.c_scale)")
        grid = (2.0 / 255.0, 0)
        plan_ = {t: grid for t in [i_idx, o_idx, fed[0], *_carried_products(model, i_idx, o_idx, consumers, producers)]}
        plan_[fcs[0]] = (2.0 * tanh_range / 255.0, 0)
        return plan_
    return _retune_quantization(blob, plan)


def to_tflite(models: KerasModels, mode: str, samples: list[dict] | None = None, fixed_input: bool = True,
              tie_states: bool = True, narrow_states: bool = True, readout_songs: list[np.ndarray] | None = None,
              refit_readout: bool = True, carry_products: bool = True, pin_pose: bool = True,
              scale_cell: bool = True) -> bytes:
    """Convert the step model (normalisation folded in) to a TFLite flatbuffer. int8 with
    `readout_songs` (training songs' features, (T, F) each): then the pose read-out refitted to
    the converted graph's own decoder running free over them (`fit_pose_readout`) and converted
    again with it; without songs (or `refit_readout` off) the read-out keeps the float weights.
    int8 with `scale_cell` (and `tie_states`: the scaled state is pinned, input and output on one
    grid): the decoder's cell state held per unit scaled (`cell_state_scale`)."""
    if mode not in QUANTIZE_MODES:
        raise ConversionError(f"quantize={mode!r}: choose one of {QUANTIZE_MODES}")
    if mode in ("int8", "int16x8") and not samples:
        raise ConversionError(f"quantize={mode}: needs representative samples (real features)")
    # The pose read-out's per-coordinate map: fitted for the integer variants, identity in float.
    # Kept on `models` for the bundle written next (write_bundle puts it in the manifest).
    models.pose_decode = fit_pose_decode(models, samples) if mode in ("int8", "int16x8") else None
    models.pose_readout = None
    models.dec_c_scale = models.dec_tanh_range = None
    if mode == "int8" and scale_cell and tie_states and models.mcfg.kind == "ours":  # pinned, so tied
        # each unit's reach over the read-out songs, every frame (else over the samples)
        reach = (cell_state_reach(models, readout_songs) if readout_songs else
                 np.abs(np.concatenate([np.reshape(s_["dec_c"], (-1, np.shape(s_["dec_c"])[-1])) for s_ in samples])).max(0))
        # r: c = dec_c / k on its way into tanh keeps the unscaled state's grid (tanh is flat past
        # it; only tanh reads it, so its rounding does not accumulate)
        models.dec_tanh_range = state_percentile(samples, "dec_c", STATE_RANGE_PERCENTILE)
        models.dec_c_scale = cell_state_scale(reach, models.dec_tanh_range)
    conv = dict(fixed_input=fixed_input, tie_states=tie_states, narrow_states=narrow_states,
                carry_products=carry_products, pin_pose=pin_pose)
    blob = _convert(models, mode, samples, **conv)
    if mode == "int8" and refit_readout and readout_songs:
        models.pose_readout = fit_pose_readout(models, blob, readout_songs)
        blob = _convert(models, mode, samples, **conv)
    return blob


def _convert(models: KerasModels, mode: str, samples, *, fixed_input: bool, tie_states: bool, narrow_states: bool,
             carry_products: bool, pin_pose: bool) -> bytes:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    step = folded_clone(models, models.pose_decode, models.pose_readout, models.dec_c_scale)
    samples = scaled_samples(samples, models.dec_c_scale)
    sig = describe(step)
    in_names = [s.name for s in sig.inputs]
    out_names = [s.name for s in sig.outputs]

    @tf.function(input_signature=[tf.TensorSpec(s.shape, tf.float32, name=s.name) for s in sig.inputs])
    def serve(*args):
        out = step(dict(zip(in_names, args)), training=False)
        return [out[n] for n in out_names]  # signature outputs output_0.. in this order

    frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    with tempfile.TemporaryDirectory(prefix="edgedance-convert-") as tmp:
        tf.saved_model.save(tf.Module(), tmp, signatures={"serving_default": frozen})
        conv = tf.lite.TFLiteConverter.from_saved_model(tmp)
        if mode != "float":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode in ("int8", "int16x8"):
            # The calibrator feeds inputs by signature name; it must be a dict (inputs are
            # ordered alphabetically in the flatbuffer, not as in the Keras model).
            conv.representative_dataset = lambda: ({k: s[k].astype(np.float32) for k in in_names} for s in samples)
            if mode == "int8":
                conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                conv.inference_input_type = conv.inference_output_type = tf.int8
            else:
                conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
                conv.inference_input_type = conv.inference_output_type = tf.int16
        try:
            with warnings.catch_warnings():  # the calibrator's own tf.lite.Interpreter deprecation notice
                warnings.simplefilter("ignore", UserWarning)
                blob = conv.convert()
        except Exception as e:  # the converter raises ConverterError, RuntimeError, ValueError...
            raise ConversionError(f"TFLite conversion ({mode}) of {models.source or 'the step model'} failed: {e}") from e
    if mode in ("int8", "int16x8") and tie_states:
        blob = tie_state_quantization(blob, sig)
        if mode == "int8" and narrow_states:
            blob = narrow_state_ranges(blob, sig, samples, carry_products=carry_products)
    if mode == "int8" and models.dec_c_scale is not None:  # its units span [-1, 1] by construction
        blob = pin_cell_state(blob, sig, models.dec_tanh_range)
    if mode == "int8" and fixed_input:
        blob = fix_input_quantization(blob)
    if mode == "int8" and pin_pose:
        blob = pin_pose_output(blob, sig)
    log.info("converted %s: %d bytes", mode, len(blob))
    return bytes(blob)


def window_tflite(models: KerasModels, frames: int = 15) -> bytes:
    """The float sequence model over a fixed window of `frames` (the non-streaming way: re-run the
    last `frames` frames every frame). For the benchmark only. Inputs x (1, T, F), prev, tf_mask."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    F = models.signature.n_features
    specs = {"x": (1, frames, F), "prev": (1, frames, 28), "tf_mask": (1, frames, 1)}
    seq = models.sequence

    @tf.function(input_signature=[tf.TensorSpec(s, tf.float32, name=n) for n, s in specs.items()])
    def serve(x, prev, tf_mask):
        return [seq({"x": x, "prev": prev, "tf_mask": tf_mask}, training=False)]

    frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    with tempfile.TemporaryDirectory(prefix="edgedance-window-") as tmp:
        tf.saved_model.save(tf.Module(), tmp, signatures={"serving_default": frozen})
        return bytes(tf.lite.TFLiteConverter.from_saved_model(tmp).convert())


def output_names(sig: StepSignature) -> dict[str, str]:
    """Signature output key (output_i) -> our tensor name."""
    return {f"output_{i}": s.name for i, s in enumerate(sig.outputs)}


def versions() -> dict:
    import platform

    import tensorflow as tf
    import keras

    from converter import __version__

    try:
        import ai_edge_litert
        litert = getattr(ai_edge_litert, "__version__", None)
        if litert is None:
            from importlib.metadata import version
            litert = version("ai-edge-litert")
    except Exception:  # noqa: BLE001 - informational only
        litert = None
    return {"edgedance": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "ai_edge_litert": litert}


def quiet_tensorflow():
    """Keep TensorFlow's C++ start-up chatter out of CLI output (before importing it)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def file_sha256(path: pathlib.Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
