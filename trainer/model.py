"""The music-to-dance models: ours (causal LSTM encoder + attention + pose-feedback decoder)
and the paper's baselines (CNN, AM, SA), all with the same inputs and outputs.

Sequence model (training, whole chunks), inputs by name:
  x        (B, T, F)   music features (raw; normalisation is a layer inside the model)
  prev     (B, T, 28)  the ground-truth pose of the previous frame (teacher forcing)
  tf_mask  (B, T, 1)   1 = feed the ground-truth previous pose, 0 = feed the model's own
  noise    (B, T, N)   only when `noise_dims` > 0: a slowly varying random vector
output `out` (B, T, 29): 28 pose values (14x2 keypoints, tanh) then the heading change
(radians per frame; integrate it for the heading, the absolute yaw is arbitrary).

Step model (streaming, one frame, for the converter and the device): inputs `x` (1, F),
`noise` (1, N) if any, and the states; outputs `pose` (1, 28), `dheading` (1, 1) and the new
states under the same names with `_out` appended. All-zero states are the start of a stream.
It uses the same layer names as the sequence model, so weights copy by name
(`copy_weights`), and only plain ops (LSTM cells called once, no while loop), so it
converts to full-int8 TFLite.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib

import numpy as np

log = logging.getLogger(__name__)

N_POSE = 28  # 14 keypoints x (x, y)
N_OUT = N_POSE + 1  # + heading change per frame
KINDS = ("ours", "cnn", "am", "sa")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Every hyper-parameter of a model. Saved with each run and used to rebuild it."""

    kind: str = "ours"
    """'ours' (LSTM encoder + attention + feedback decoder) or a paper baseline: 'cnn', 'am', 'sa'."""
    layers: int = 3
    """LSTM encoder layers (ours); conv layers (cnn); attention blocks (sa)."""
    units: int = 256
    """Width of every encoder layer (LSTM units, conv filters, attention model width)."""
    lookback: int = 15
    """Frames of encoder states the causal attention sees (t-lookback+1 .. t); CNN receptive field."""
    attention: bool = True
    """ours: attend over the last `lookback` encoder states (off: the decoder sees only the current one)."""
    feedback: bool = True
    """ours: feed the previous pose back into the decoder (scheduled sampling in training)."""
    dec_units: int = 256
    """ours: LSTM units of the decoder cell."""
    skip_features: bool = True
    """ours: also feed the (normalised) music features straight to the decoder, so beat and bar
    phase reach it without passing through the encoder stack."""
    output_gain: bool = True
    """ours: a calibrated gain on the pose's deviation from the mean pose, applied after the
    feedback loop (pose = mean + g * (pose - mean), clipped to [-1, 1]); g is fitted after
    training so the motion energy on the TRAINING dances matches theirs (g = 1 until then)."""
    smooth: bool = True
    """ours: a causal one-pole low-pass on the output pose, after the feedback loop and before
    the gain: s_t = s_{t-1} + alpha * (pose_t - mean - s_{t-1}); alpha is fitted with the gain
    after training (alpha = 1, i.e. off, until then). One more state: smooth_pose (28,)."""
    posture: bool = True
    """ours, with smooth and output_gain: the gain amplifies the motion about the model's own
    running posture instead of about the training mean pose: p_t = p_{t-1} + beta * (s_t - p_{t-1})
    (a slow one-pole average of the low-passed pose s, both minus the mean pose, time constant
    1/(beta * 25 fps)), pose = mean + gp * p + g * (s - p). A dancer's posture differs by style and
    song (a waltz hold, an open Latin stance); amplifying the model's guess of it by the motion's
    gain draws a caricature. beta and the posture's own gain gp are fitted with g (beta 0 = off:
    the gain about the mean pose, as before). One more state: posture_pose (28,)."""
    smooth2: bool = True
    """ours, with smooth: a second one-pole low-pass after the first, q_t = q_{t-1} + alpha2 *
    (s_t - q_{t-1}); alpha2 is fitted with alpha (1 = off). Two poles cut frame-to-frame noise
    (the regressor's own jitter, and an int8 model's rounding) far more than one at the same lag.
    One more state: smooth_pose2 (28,)."""
    noise_dims: int = 0
    """ours: size of a slowly varying random input vector (0 = deterministic model)."""
    dropout: float = 0.1
    """Dropout between encoder layers and on the decoder input (training only)."""
    state_noise: float = 0.0
    """ours: std of Gaussian noise added to the decoder LSTM's h and c at every training step, so
    the model learns not to amplify small state errors (int8 rounding of the decoder's cell
    state is what makes a converted model jitter; docs/results/quantization.md). Training only."""
    heads: int = 4
    """sa: attention heads."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ModelConfig.kind={self.kind!r}: choose one of {KINDS}")
        for name in ("layers", "units", "lookback", "dec_units"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: must be >= 1")
        if self.noise_dims < 0:
            raise ValueError(f"ModelConfig.noise_dims={self.noise_dims}: must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout={self.dropout}: must be in [0, 1)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "model config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown model-config key(s) {unknown}; known keys are {sorted(known)}")
        for key in ("posture", "smooth2"):  # a run saved before these stages: its weights have none
            if key not in d:
                d = {**d, key: False}
        return cls(**d)

    @property
    def has_smooth2(self) -> bool:
        """The output low-pass has its second pole."""
        return self.kind == "ours" and self.smooth and self.smooth2

    @property
    def has_posture(self) -> bool:
        """The output stage tracks a posture (needs the low-pass and the gain it centres)."""
        return self.kind == "ours" and self.posture and self.smooth and self.output_gain


# ---------------------------------------------------------------------------------------
# Layers (imported lazily: `import trainer.model` must not pay for TensorFlow until used)


def _keras():
    import keras

    return keras


def _layers():
    keras = _keras()
    from keras import layers, ops

    @keras.saving.register_keras_serializable("edgedance")
    class FeatureNorm(layers.Layer):
        """(x - mean) / std with the training set's statistics, frozen inside the model."""

        def __init__(self, n_features, **kw):
            super().__init__(**kw)
            self.n_features = n_features
            self.mean = self.add_weight(shape=(n_features,), initializer="zeros", trainable=False, name="mean")
            self.inv_std = self.add_weight(shape=(n_features,), initializer="ones", trainable=False, name="inv_std")

        def call(self, x):
            return (x - self.mean) * self.inv_std

        def get_config(self):
            return {**super().get_config(), "n_features": self.n_features}

    @keras.saving.register_keras_serializable("edgedance")
    class CausalAttention(layers.Layer):
        """Dot-product attention of h_t over h_t, h_{t-1}, .., h_{t-L+1} (zeros before the start),
        plus a learned bias per lag. Sequence mode: call(h (B, T, U)) -> context (B, T, U), in
        parallel over time (one shifted copy per lag). Step mode: call([h (B, U), buf (B, L, U)])
        -> (context, new buf): the ring buffer holds the last L states, newest first."""

        def __init__(self, units, lookback, step=False, **kw):
            super().__init__(**kw)
            self.units, self.lookback, self.step = units, lookback, step
            self.wq = self.add_weight(shape=(units, units), initializer="glorot_uniform", name="wq")
            self.bq = self.add_weight(shape=(units,), initializer="zeros", name="bq")
            self.lag_bias = self.add_weight(shape=(lookback,), initializer="zeros", name="lag_bias")
            self.scale = 1.0 / math.sqrt(units)

        def call(self, inputs):
            L = self.lookback
            if self.step:
                h, buf = inputs
                window = ops.concatenate([h[:, None, :], buf[:, : L - 1, :]], axis=1)  # (B, L, U)
                q = ops.matmul(h, self.wq) + self.bq  # (B, U)
                scores = ops.sum(window * q[:, None, :], axis=-1) * self.scale + self.lag_bias  # (B, L)
                alpha = ops.softmax(scores, axis=-1)
                ctx = ops.sum(window * alpha[:, :, None], axis=1)  # (B, U)
                return ctx, window
            h = inputs  # (B, T, U)
            q = ops.matmul(h, self.wq) + self.bq
            T = ops.shape(h)[1]
            shifted = []
            for k in range(L):
                if k == 0:
                    shifted.append(h)
                else:
                    padded = ops.pad(h, [[0, 0], [k, 0], [0, 0]])
                    shifted.append(padded[:, :T, :])
            scores = ops.stack([ops.sum(s * q, axis=-1) for s in shifted], axis=-1) * self.scale + self.lag_bias
            alpha = ops.softmax(scores, axis=-1)  # (B, T, L)
            ctx = shifted[0] * alpha[:, :, 0:1]
            for k in range(1, L):
                ctx = ctx + shifted[k] * alpha[:, :, k : k + 1]
            return ctx  # (B, T, U)

        def get_config(self):
            return {**super().get_config(), "units": self.units, "lookback": self.lookback, "step": self.step}

    @keras.saving.register_keras_serializable("edgedance")
    class DecoderCell(layers.Layer):
        """One decoder step. Input per step: [music (M), ground-truth previous pose (28),
        teacher-forcing mask (1), noise (N)]. State: LSTM h, c and the cell's own last pose,
        stored minus the training mean pose (so the all-zero start state is the mean pose).
        prev = mask * (gt_prev - mean) + (1 - mask) * own_prev."""

        def __init__(self, units, music_dims, feedback=True, noise_dims=0, dropout=0.0, free_running=False,
                     state_noise=0.0, heading_apart=False, c_scale=None, **kw):
            super().__init__(**kw)
            self.state_noise = float(state_noise)
            self.noise_seed = keras.random.SeedGenerator(1) if self.state_noise > 0 else None
            self.units, self.music_dims, self.feedback = units, music_dims, feedback
            self.free_running = free_running  # step model: input is [music, noise] only, prev = own
            self.noise_dims, self.dropout = noise_dims, dropout
            # The converter's int8 graph: pose and heading change returned as two tensors (one
            # would share one int8 grid, the pose's, 27x coarser than the heading change needs).
            self.heading_apart = bool(heading_apart)
            # The converter's int8 graph: the cell state held per unit scaled, c' = k c, so one
            # int8 grid fits units of very different ranges (converter.convert.cell_state_scale).
            # c' = f c' + (i g) diag(k), h = o tanh(c' diag(1/k)); the diagonals are fully
            # connected layers, whose int8 weights are per unit, so k is exact.
            self.c_scale = None if c_scale is None else [float(v) for v in c_scale]
            if self.c_scale is not None:
                if len(self.c_scale) != units or min(self.c_scale) <= 0:
                    raise ValueError(f"DecoderCell: c_scale needs {units} positive values")
                k = np.asarray(self.c_scale, np.float32)
                self._c_up, self._c_down = np.diag(k), np.diag(1.0 / k).astype(np.float32)
            self.lstm = layers.LSTMCell(units, name="dec_lstm")
            self.pose_head = layers.Dense(N_POSE, activation="tanh", name="dec_pose")
            self.heading_head = layers.Dense(1, name="dec_heading", kernel_initializer="zeros")
            self.drop = layers.Dropout(dropout) if dropout > 0 else None
            self.pose_mean = self.add_weight(shape=(N_POSE,), initializer="zeros", trainable=False, name="pose_mean")
            self.state_size = [units, units, N_POSE]
            self.output_size = N_OUT

        def build(self, input_shape):
            z = self.music_dims + self.noise_dims + (N_POSE if self.feedback else 0)
            self.lstm.build((None, z))
            self.pose_head.build((None, self.units))
            self.heading_head.build((None, self.units))
            self.built = True

        def call(self, inputs, states, training=False):
            h, c, own = states
            if training and self.noise_seed is not None:
                h = h + self.state_noise * keras.random.normal(ops.shape(h), seed=self.noise_seed)
                c = c + self.state_noise * keras.random.normal(ops.shape(c), seed=self.noise_seed)
            M = self.music_dims
            music = inputs[:, :M]
            parts = [music]
            if self.free_running:
                if self.feedback:
                    parts.append(own)
                if self.noise_dims:
                    parts.append(inputs[:, M:])
            else:
                if self.feedback:
                    gt_prev = inputs[:, M : M + N_POSE]
                    mask = inputs[:, M + N_POSE : M + N_POSE + 1]
                    parts.append(mask * (gt_prev - self.pose_mean) + (1.0 - mask) * own)
                if self.noise_dims:
                    parts.append(inputs[:, M + N_POSE + 1 :])
            z = ops.concatenate(parts, axis=-1) if len(parts) > 1 else music
            if self.drop is not None:
                z = self.drop(z, training=training)
            if self.c_scale is None:
                out, (h2, c2) = self.lstm(z, [h, c], training=training)
                tanh_c = None
            else:  # Keras' LSTMCell written out (gates i, f, g, o; sigmoid, tanh) with c' = k c
                lstm = self.lstm
                zz = ops.matmul(z, lstm.kernel) + ops.matmul(h, lstm.recurrent_kernel) + lstm.bias
                zi, zf, zg, zo = ops.split(zz, 4, axis=-1)
                c2 = ops.sigmoid(zf) * c + ops.matmul(ops.sigmoid(zi) * ops.tanh(zg), self._c_up)
                tanh_c = ops.tanh(ops.matmul(c2, self._c_down))
                out = h2 = ops.sigmoid(zo) * tanh_c
            pose = self.pose_head(out)
            dh = self.heading_head(out)
            if self.heading_apart:
                heads = (pose, dh) if tanh_c is None else (pose, dh, tanh_c)
                return heads, [h2, c2, pose - self.pose_mean]
            return ops.concatenate([pose, dh], axis=-1), [h2, c2, pose - self.pose_mean]

        def get_config(self):
            return {**super().get_config(), "units": self.units, "music_dims": self.music_dims,
                    "feedback": self.feedback, "noise_dims": self.noise_dims, "dropout": self.dropout,
                    "free_running": self.free_running, "state_noise": self.state_noise,
                    "heading_apart": self.heading_apart, "c_scale": self.c_scale}

    return FeatureNorm, CausalAttention, DecoderCell


def _gain_layer():
    keras = _keras()
    from keras import layers, ops

    @keras.saving.register_keras_serializable("edgedance")
    class PoseGain(layers.Layer):
        """(..., 28 [+1]) -> the pose part scaled about the mean pose by g, clipped to [-1, 1];
        anything after the 28 pose values passes through. With a posture (ModelConfig.posture):
        `posture` (..., 28), the running posture minus the mean pose, p; the motion about it is
        scaled by g and the posture itself by its own gain gp: mean + gp * p + g * (y - mean - p)."""

        def __init__(self, posture=False, **kw):
            super().__init__(**kw)
            self.posture = bool(posture)
            self.mean = self.add_weight(shape=(N_POSE,), initializer="zeros", trainable=False, name="mean")
            self.gain = self.add_weight(shape=(1,), initializer="ones", trainable=False, name="gain")
            if self.posture:
                self.posture_gain = self.add_weight(shape=(1,), initializer="ones", trainable=False,
                                                    name="posture_gain")

        def call(self, y, posture=None):
            d = y[..., :N_POSE] - self.mean
            if posture is None:
                pose = self.mean + self.gain * d
            else:
                pose = self.mean + self.posture_gain * posture + self.gain * (d - posture)
            pose = ops.clip(pose, -1.0, 1.0)
            if y.shape[-1] == N_POSE:
                return pose
            return ops.concatenate([pose, y[..., N_POSE:]], axis=-1)

        def get_config(self):
            return {**super().get_config(), "posture": self.posture}

    return PoseGain


def _smooth_cell():
    keras = _keras()
    from keras import layers, ops

    @keras.saving.register_keras_serializable("edgedance")
    class SmoothCell(layers.Layer):
        """One step of the output low-pass. Input (B, 29): pose then heading change; state: the
        smoothed pose minus the mean pose (zero = the mean pose). The heading passes through.
        With smooth2: a second pole (alpha2; 1 = off) and its state. With posture: a state for
        the running posture minus the mean pose (beta: its one-pole coefficient, on the smoothed
        pose), and the output (B, 57) also carries it after the heading."""

        def __init__(self, posture=False, smooth2=False, **kw):
            super().__init__(**kw)
            self.posture, self.smooth2 = bool(posture), bool(smooth2)
            self.mean = self.add_weight(shape=(N_POSE,), initializer="zeros", trainable=False, name="mean")
            self.alpha = self.add_weight(shape=(1,), initializer="ones", trainable=False, name="alpha")
            if self.posture:
                self.beta = self.add_weight(shape=(1,), initializer="zeros", trainable=False, name="beta")
            if self.smooth2:
                self.alpha2 = self.add_weight(shape=(1,), initializer="ones", trainable=False, name="alpha2")
            self.state_size = [N_POSE] * (1 + self.smooth2 + self.posture)
            self.output_size = N_OUT + N_POSE if self.posture else N_OUT

        def call(self, inputs, states, training=False):
            states = list(states) if isinstance(states, (list, tuple)) else [states]
            s = states.pop(0)
            s1 = s + self.alpha * (inputs[:, :N_POSE] - self.mean - s)
            new, out = [s1], s1
            if self.smooth2:
                q = states.pop(0)
                out = q + self.alpha2 * (s1 - q)
                new.append(out)
            if not self.posture:
                return ops.concatenate([self.mean + out, inputs[:, N_POSE:]], axis=-1), new
            p = states.pop(0)
            p2 = p + self.beta * (out - p)
            return ops.concatenate([self.mean + out, inputs[:, N_POSE:N_OUT], p2], axis=-1), new + [p2]

        def get_config(self):
            return {**super().get_config(), "posture": self.posture, "smooth2": self.smooth2}

    return SmoothCell


def _band_mask_layer():
    keras = _keras()
    from keras import layers, ops

    @keras.saving.register_keras_serializable("edgedance")
    class BandMask(layers.Layer):
        """(B, T, T) boolean: frame i may attend to frames i-lookback+1 .. i."""

        def __init__(self, lookback, **kw):
            super().__init__(**kw)
            self.lookback = lookback

        def call(self, h):
            T = ops.shape(h)[1]
            i = ops.expand_dims(ops.arange(T, dtype="int32"), 1)
            j = ops.expand_dims(ops.arange(T, dtype="int32"), 0)
            band = ops.logical_and(j <= i, j > i - self.lookback)
            return ops.broadcast_to(band[None], (ops.shape(h)[0], T, T))

        def get_config(self):
            return {**super().get_config(), "lookback": self.lookback}

    return BandMask


# ---------------------------------------------------------------------------------------
# Builders


def _seq_inputs(mcfg: ModelConfig, n_features: int):
    keras = _keras()
    x = keras.Input(shape=(None, n_features), name="x")
    prev = keras.Input(shape=(None, N_POSE), name="prev")
    mask = keras.Input(shape=(None, 1), name="tf_mask")
    inputs = {"x": x, "prev": prev, "tf_mask": mask}
    if mcfg.kind == "ours" and mcfg.noise_dims:
        inputs["noise"] = keras.Input(shape=(None, mcfg.noise_dims), name="noise")
    return inputs


def build_sequence_model(mcfg: ModelConfig, n_features: int):
    """The training model over whole sequences: inputs dict (see module doc) -> out (B, T, 29)."""
    keras = _keras()
    from keras import layers, ops

    FeatureNorm, CausalAttention, DecoderCell = _layers()
    if mcfg.kind == "ours" and mcfg.noise_dims and not mcfg.feedback:
        raise ValueError("ModelConfig: noise_dims > 0 needs feedback=True (the noise enters with the fed-back pose)")
    inputs = _seq_inputs(mcfg, n_features)
    h = xn = FeatureNorm(n_features, name="feat_norm")(inputs["x"])
    if mcfg.kind == "ours":
        for i in range(mcfg.layers):
            h = layers.LSTM(mcfg.units, return_sequences=True, name=f"enc_lstm_{i}")(h)
            if mcfg.dropout:
                h = layers.Dropout(mcfg.dropout)(h)
        parts = [h]
        if mcfg.attention:
            parts.append(CausalAttention(mcfg.units, mcfg.lookback, name="attention")(h))
        if mcfg.skip_features:
            parts.append(xn)
        music_dims = mcfg.units * (1 + mcfg.attention) + n_features * mcfg.skip_features
        if mcfg.feedback:
            parts += [inputs["prev"], inputs["tf_mask"]]
        if mcfg.noise_dims:
            parts.append(inputs["noise"])
        dec_in = layers.Concatenate(axis=-1)(parts) if len(parts) > 1 else parts[0]
        cell = DecoderCell(mcfg.dec_units, music_dims, feedback=mcfg.feedback, noise_dims=mcfg.noise_dims,
                           dropout=mcfg.dropout, state_noise=mcfg.state_noise, name="decoder_cell")
        out = layers.RNN(cell, return_sequences=True, name="decoder")(dec_in)
        if mcfg.smooth:
            out = layers.RNN(_smooth_cell()(posture=mcfg.has_posture, smooth2=mcfg.has_smooth2, name="pose_smooth_cell"),
                             return_sequences=True, name="pose_smooth")(out)
        if mcfg.has_posture:
            out = _gain_layer()(posture=True, name="pose_gain")(out[..., :N_OUT], posture=out[..., N_OUT:])
        elif mcfg.output_gain:
            out = _gain_layer()(name="pose_gain")(out)
    elif mcfg.kind == "cnn":
        out = _cnn(mcfg, h)
    elif mcfg.kind == "am":
        out = _am(mcfg, h, CausalAttention)
    else:
        out = _sa(mcfg, h)
    out = layers.Identity(name="out")(out)
    return keras.Model(inputs, out, name=f"edgedance_{mcfg.kind}")


def _head(h):
    from keras import layers

    pose = layers.Dense(N_POSE, activation="tanh", name="head_pose")(h)
    dh = layers.Dense(1, name="head_heading", kernel_initializer="zeros")(h)
    return layers.Concatenate(axis=-1)([pose, dh])


def _cnn(mcfg, h):
    """The paper's CNN: a stack of causal 1-D convolutions; receptive field about `lookback`."""
    from keras import layers

    k = max(2, min(mcfg.lookback, 5))
    for i in range(mcfg.layers):
        d = 1 if i == 0 else min(2**i, max(1, mcfg.lookback // k))
        h = layers.Conv1D(mcfg.units, k, padding="causal", dilation_rate=d, activation="relu", name=f"conv_{i}")(h)
        if mcfg.dropout:
            h = layers.Dropout(mcfg.dropout)(h)
    return _head(h)


def _am(mcfg, h, CausalAttention):
    """AM: attention only. A per-frame projection, causal attention over the last `lookback`
    projected frames, then a small MLP to the pose; no recurrence."""
    from keras import layers

    h = layers.Dense(mcfg.units, activation="tanh", name="am_proj")(h)
    ctx = CausalAttention(mcfg.units, mcfg.lookback, name="attention")(h)
    z = layers.Concatenate(axis=-1)([h, ctx])
    z = layers.Dense(mcfg.units, activation="relu", name="am_mlp")(z)
    return _head(z)


def _sa(mcfg, h):
    """SA: causal self-attention (transformer blocks) over a band of the last `lookback` frames,
    with a learned lag-free position signal from a causal conv."""
    from keras import layers, ops

    h = layers.Dense(mcfg.units, name="sa_proj")(h)
    h = h + layers.Conv1D(mcfg.units, 3, padding="causal", name="sa_pos")(h)
    band = _band_mask_layer()(mcfg.lookback, name="sa_band")(h)  # (B, T, T) causal band
    for b in range(mcfg.layers):
        a = layers.MultiHeadAttention(mcfg.heads, max(1, mcfg.units // mcfg.heads), dropout=mcfg.dropout,
                                      name=f"sa_mha_{b}")(h, h, attention_mask=band)
        h = layers.LayerNormalization(name=f"sa_ln1_{b}")(h + a)
        f = layers.Dense(mcfg.units * 2, activation="relu", name=f"sa_ff1_{b}")(h)
        f = layers.Dense(mcfg.units, name=f"sa_ff2_{b}")(f)
        h = layers.LayerNormalization(name=f"sa_ln2_{b}")(h + f)
    return _head(h)


def step_state_specs(mcfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape without batch) of every state of the step model, in input order."""
    if mcfg.kind != "ours":
        raise ValueError(f"ModelConfig.kind={mcfg.kind!r}: only 'ours' has a streaming step model")
    specs = []
    for i in range(mcfg.layers):
        specs += [(f"enc_h_{i}", (mcfg.units,)), (f"enc_c_{i}", (mcfg.units,))]
    if mcfg.attention:
        specs.append(("att_buf", (mcfg.lookback, mcfg.units)))
    specs += [("dec_h", (mcfg.dec_units,)), ("dec_c", (mcfg.dec_units,))]
    if mcfg.feedback:  # the decoder's own previous pose; without feedback nothing reads it
        specs.append(("prev_pose", (N_POSE,)))
    if mcfg.smooth:
        specs.append(("smooth_pose", (N_POSE,)))
    if mcfg.has_smooth2:
        specs.append(("smooth_pose2", (N_POSE,)))
    if mcfg.has_posture:
        specs.append(("posture_pose", (N_POSE,)))
    return specs


def build_step_model(mcfg: ModelConfig, n_features: int, pose_out: bool = False, dec_c_scale=None):
    """One frame in, one pose out, every state in and out (see module doc). Batch size 1.
    Inputs: x (1, F), [noise (1, N)], then the states of `step_state_specs`. Outputs (a dict):
    pose (1, 28), dheading (1, 1), then `<state>_out` for every state. With `pose_out` (the
    converter's int8 graph, without the output stage) `pose` is a linear read-out, layer
    "dec_pose_out", of [h_t, h_t-1, tanh(c_t), x] (the decoder's h this frame and the previous
    one, its cell state through the tanh the LSTM takes of it anyway, and the frame's normalised
    features), not the pose: `converter.convert.folded_clone` sets its weights. `dec_c_scale`
    (dec_units,): the decoder's cell state held per unit scaled, dec_c = k c (DecoderCell.c_scale;
    the converter's int8 graph)."""
    keras = _keras()
    from keras import layers

    FeatureNorm, CausalAttention, DecoderCell = _layers()
    x = keras.Input(shape=(n_features,), batch_size=1, name="x")
    inputs = {"x": x}
    if mcfg.noise_dims:
        inputs["noise"] = keras.Input(shape=(mcfg.noise_dims,), batch_size=1, name="noise")
    for name, shape in step_state_specs(mcfg):
        inputs[name] = keras.Input(shape=shape, batch_size=1, name=name)
    outputs = {}
    h = xn = FeatureNorm(n_features, name="feat_norm")(x)
    for i in range(mcfg.layers):
        cell = layers.LSTMCell(mcfg.units, name=f"enc_lstm_{i}")
        h, (hh, cc) = cell(h, [inputs[f"enc_h_{i}"], inputs[f"enc_c_{i}"]])
        outputs[f"enc_h_{i}_out"], outputs[f"enc_c_{i}_out"] = hh, cc
    parts = [h]
    if mcfg.attention:
        ctx, buf = CausalAttention(mcfg.units, mcfg.lookback, step=True, name="attention")([h, inputs["att_buf"]])
        parts.append(ctx)
        outputs["att_buf_out"] = buf
    if mcfg.skip_features:
        parts.append(xn)
    music_dims = mcfg.units * (1 + mcfg.attention) + n_features * mcfg.skip_features
    dec_parts = list(parts)
    if mcfg.noise_dims:
        dec_parts.append(inputs["noise"])
    dec_in = layers.Concatenate(axis=-1)(dec_parts) if len(dec_parts) > 1 else dec_parts[0]
    if pose_out and (mcfg.smooth or mcfg.output_gain):
        raise ValueError("build_step_model(pose_out=True): only without the output stage (smooth, output_gain off)")
    cell = DecoderCell(mcfg.dec_units, music_dims, feedback=mcfg.feedback, noise_dims=mcfg.noise_dims,
                       free_running=True, heading_apart=pose_out, c_scale=dec_c_scale, name="decoder")
    # Without feedback the cell ignores its third state: any tensor fills the slot.
    prev = inputs["prev_pose"] if mcfg.feedback else inputs["dec_h"]
    y, (dh_, dc_, own) = cell(dec_in, [inputs["dec_h"], inputs["dec_c"], prev])
    if pose_out:
        # The fed-back pose stays the tanh head's: the read-out feeds nothing back.
        tanh_c = y[2] if len(y) == 3 else layers.Activation("tanh", name="dec_tanh_c")(dc_)
        readout_in = [dh_, inputs["dec_h"], tanh_c, xn]
        pose = layers.Dense(N_POSE, name="dec_pose_out")(layers.Concatenate(axis=-1, name="dec_readout_in")(readout_in))
        dhead = y[1]
    else:
        posture = None
        if mcfg.smooth:
            names = ["smooth_pose"] + ["smooth_pose2"] * mcfg.has_smooth2 + ["posture_pose"] * mcfg.has_posture
            cell = _smooth_cell()(posture=mcfg.has_posture, smooth2=mcfg.has_smooth2, name="pose_smooth")
            y, new = cell(y, [inputs[n] for n in names])
            for n, v in zip(names, new):
                outputs[n + "_out"] = v
            if mcfg.has_posture:
                posture = y[:, N_OUT:]
        pose = y[:, :N_POSE]
        if mcfg.output_gain:
            pose = _gain_layer()(posture=mcfg.has_posture, name="pose_gain")(pose, posture=posture)
        dhead = y[:, N_POSE:N_OUT]
    outputs["pose"] = layers.Identity(name="pose")(pose)
    outputs["dheading"] = layers.Identity(name="dheading")(dhead)
    outputs["dec_h_out"], outputs["dec_c_out"] = dh_, dc_
    if mcfg.feedback:
        outputs["prev_pose_out"] = own
    return keras.Model(inputs, outputs, name="edgedance_step")


def copy_weights(src, dst, strict: bool = True) -> int:
    """Copy weights layer by layer, matched by name (the RNN 'decoder' of the sequence model
    and the 'decoder' cell of the step model hold the same weights). Returns layers copied.
    strict=False leaves layers without a namesake as they are (upgrading an older run)."""
    n = 0
    src_by_name = {l.name: l for l in src.layers}
    for layer in dst.layers:
        w = layer.get_weights()
        if not w:
            continue
        s = src_by_name.get(layer.name)
        if s is None and not strict:
            continue
        if s is None:
            raise ValueError(f"copy_weights: layer {layer.name!r} of {dst.name} has no namesake in {src.name}")
        sw = s.get_weights()
        if not strict and len(sw) < len(w) and [a.shape for a in sw] == [a.shape for a in w[: len(sw)]]:
            sw = sw + w[len(sw):]  # an older layer with fewer weights (the output stage before its posture)
        layer.set_weights(sw)
        n += 1
    return n


def set_normalization(model, feat_mean, feat_std, pose_mean=None) -> None:
    """Freeze the training set's feature statistics (and mean pose, for ours) into a model."""
    std = np.maximum(np.asarray(feat_std, np.float32), 1e-3)
    model.get_layer("feat_norm").set_weights([np.asarray(feat_mean, np.float32), 1.0 / std])
    if pose_mean is not None:
        names = {l.name for l in model.layers}
        if "pose_gain" in names:
            g = model.get_layer("pose_gain")
            g.set_weights([np.asarray(pose_mean, np.float32).reshape(N_POSE), *g.get_weights()[1:]])
        if "pose_smooth" in names:
            sm = model.get_layer("pose_smooth")
            sm.set_weights([np.asarray(pose_mean, np.float32).reshape(N_POSE), *sm.get_weights()[1:]])
        dec = model.get_layer("decoder") if "decoder" in names else None
        if dec is not None:
            w = dec.get_weights()
            cell = dec.cell if hasattr(dec, "cell") else dec
            idx = [i for i, v in enumerate(cell.weights) if v.path.endswith("pose_mean")]
            assert len(idx) == 1, [v.path for v in cell.weights]
            w[idx[0]] = np.asarray(pose_mean, np.float32).reshape(N_POSE)
            dec.set_weights(w)


def set_gain(model, gain: float) -> None:
    """Set the calibrated output gain of a model that has a 'pose_gain' layer."""
    g = model.get_layer("pose_gain")
    g.set_weights([g.get_weights()[0], np.array([gain], np.float32), *g.get_weights()[2:]])


def _set_named(layer, name: str, value: float) -> None:
    w = layer.get_weights()
    idx = [i for i, v in enumerate(layer.weights) if v.path.rsplit("/", 1)[-1] == name]
    if len(idx) != 1:
        raise ValueError(f"{layer.name} has no weight {name!r} (its model config has that stage off)")
    w[idx[0]] = np.array([value], np.float32)
    layer.set_weights(w)


def set_smoothing(model, alpha: float, alpha2: float | None = None) -> None:
    """Set the output low-pass coefficient (1 = off) of a model that has a 'pose_smooth' layer,
    and its second pole's (ModelConfig.smooth2) when given."""
    sm = model.get_layer("pose_smooth")
    _set_named(sm, "alpha", alpha)
    if alpha2 is not None:
        _set_named(sm, "alpha2", alpha2)


def output_stage_params(model) -> dict | None:
    """The fitted output stage of a model, by weight name: {alpha, alpha2, smooth_mean, beta, gain,
    gain_mean, posture_gain}; stages the model lacks get their neutral value. None without one."""
    names = {layer.name for layer in model.layers}
    if "pose_smooth" not in names and "pose_gain" not in names:
        return None
    out = {"alpha": 1.0, "alpha2": 1.0, "smooth_mean": [0.0] * N_POSE, "beta": 0.0, "gain": 1.0,
           "gain_mean": [0.0] * N_POSE, "posture_gain": 1.0}
    for layer_name, keys in (("pose_smooth", {"mean": "smooth_mean", "alpha": "alpha", "alpha2": "alpha2", "beta": "beta"}),
                             ("pose_gain", {"mean": "gain_mean", "gain": "gain", "posture_gain": "posture_gain"})):
        if layer_name not in names:
            continue
        layer = model.get_layer(layer_name)
        for v, w in zip(layer.weights, layer.get_weights()):
            key = keys.get(v.path.rsplit("/", 1)[-1])
            if key is not None:
                out[key] = [float(e) for e in w] if w.shape[0] == N_POSE else float(w[0])
    return out


def reset_output_stage(model, mcfg: ModelConfig) -> None:
    """Switch the fitted output stage off (low-pass alpha 1, gain 1, no posture): the model then
    outputs the decoder's own pose, what the stage is fitted to."""
    names = {layer.name for layer in model.layers}
    if "pose_gain" in names:
        set_gain(model, 1.0)
    if "pose_smooth" in names:
        set_smoothing(model, 1.0, 1.0 if mcfg.has_smooth2 else None)
    if mcfg.has_posture:
        set_posture(model, 0.0, 1.0)


def set_output_stage(model, mcfg: ModelConfig, st: dict) -> None:
    """Set a fitted output stage (trainer.train.fit_output_stage's dict: alpha, alpha2, beta,
    posture_gain, gain) into a model, each part the model has."""
    if mcfg.smooth:
        set_smoothing(model, st["alpha"], st["alpha2"] if mcfg.has_smooth2 else None)
    if mcfg.has_posture:
        set_posture(model, st["beta"], st["posture_gain"])
    if mcfg.output_gain:
        set_gain(model, st["gain"])


def set_posture(model, beta: float, gain: float = 1.0) -> None:
    """Set the running posture's coefficient (0 = off: the gain about the mean pose) and its own
    gain of a model whose output stage tracks a posture (ModelConfig.has_posture)."""
    try:
        _set_named(model.get_layer("pose_smooth"), "beta", beta)
        _set_named(model.get_layer("pose_gain"), "posture_gain", gain)
    except ValueError as e:
        raise ValueError(f"set_posture: this model's output stage has no posture (ModelConfig.posture off): {e}") from e


def smooth_np(poses: np.ndarray, mean: np.ndarray, alpha: float) -> np.ndarray:
    """The same low-pass in numpy, for fitting alpha: poses (T, 28) -> (T, 28), state from zero."""
    out = np.empty_like(poses)
    s = np.zeros(poses.shape[1], np.float64)
    d = poses - mean
    for t in range(len(poses)):
        s = s + alpha * (d[t] - s)
        out[t] = mean + s
    return out


def make_noise(T: int, dims: int, rng: np.random.Generator, smooth_frames: float = 25.0) -> np.ndarray:
    """A slowly varying unit-variance random signal (T, dims): AR(1) with time constant
    `smooth_frames` (25 frames = 1 s). The device draws it the same way."""
    if dims == 0:
        return np.zeros((T, 0), np.float32)
    rho = math.exp(-1.0 / smooth_frames)
    e = rng.standard_normal((T, dims)) * math.sqrt(1 - rho * rho)
    z = np.empty((T, dims))
    z[0] = rng.standard_normal(dims)
    for t in range(1, T):
        z[t] = rho * z[t - 1] + e[t]
    return z.astype(np.float32)


def run_free(model, mcfg: ModelConfig, x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    """Free-running generation with the sequence model over a whole song: x (T, F) ->
    out (T, 29) (mask 0: the model feeds back its own poses)."""
    T = x.shape[0]
    feed = {"x": x[None].astype(np.float32), "prev": np.zeros((1, T, N_POSE), np.float32),
            "tf_mask": np.zeros((1, T, 1), np.float32)}
    if mcfg.kind == "ours" and mcfg.noise_dims:
        if noise is None:
            noise = make_noise(T, mcfg.noise_dims, np.random.default_rng(0))
        feed["noise"] = noise[None].astype(np.float32)
    return np.asarray(_compiled(model)(feed))[0]


def _compiled(model):
    """A traced inference function for the model (variable batch and length), cached on it."""
    fn = getattr(model, "_edgedance_infer", None)
    if fn is None:
        import tensorflow as tf

        def infer(feed):
            return model(feed, training=False)

        fn = tf.function(infer, reduce_retracing=True, autograph=False)
        model._edgedance_infer = fn
    return fn


def zero_states(mcfg: ModelConfig) -> dict[str, np.ndarray]:
    return {name: np.zeros((1, *shape), np.float32) for name, shape in step_state_specs(mcfg)}


def run_step_model(step, mcfg: ModelConfig, x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    """Drive a step model frame by frame over x (T, F); returns out (T, 29) like `run_free`."""
    states = zero_states(mcfg)
    outs = []
    for t in range(x.shape[0]):
        feed = {"x": x[t : t + 1].astype(np.float32), **states}
        if mcfg.noise_dims:
            feed["noise"] = noise[t : t + 1].astype(np.float32)
        r = step(feed, training=False)
        outs.append(np.concatenate([np.asarray(r["pose"]), np.asarray(r["dheading"])], axis=-1)[0])
        states = {name: np.asarray(r[name + "_out"]) for name in states}
    return np.stack(outs)


# ---------------------------------------------------------------------------------------
# Run folders


def load_run(run_dir):
    """(keras sequence model, ModelConfig, FeatureConfig, normalization dict) from a run folder
    or a shipped model folder (model.weights.h5 + model_config.json + feature_config.json +
    normalization.json)."""
    from device.contract import FeatureConfig

    run = pathlib.Path(run_dir)
    need = ["model_config.json", "feature_config.json", "normalization.json", "model.weights.h5"]
    missing = [n for n in need if not (run / n).exists()]
    if missing:
        raise FileNotFoundError(f"{run}: not a trained run/model folder, missing {missing} "
                                f"(train one with `python -m trainer train --out {run}`)")
    try:
        md = json.loads((run / "model_config.json").read_text())
        for flag in ("skip_features", "output_gain", "smooth"):  # runs made before these options existed
            md.setdefault(flag, False)
        mcfg = ModelConfig.from_dict(md, source=str(run / "model_config.json"))
        fcfg = FeatureConfig.from_dict(json.loads((run / "feature_config.json").read_text()), source=str(run / "feature_config.json"))
        norm = json.loads((run / "normalization.json").read_text())
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{run}: corrupt configuration file: {e}") from e
    model = build_sequence_model(mcfg, int(norm["n_features"]))
    try:
        model.load_weights(str(run / "model.weights.h5"))
    except Exception as e:  # h5py / keras raise many kinds
        raise ValueError(f"{run / 'model.weights.h5'}: cannot load weights into {mcfg}: {e}") from e
    return model, mcfg, fcfg, norm


def step_model_from_run(run_dir):
    """The streaming step model of a run, with its weights: (step_model, mcfg, fcfg, norm)."""
    model, mcfg, fcfg, norm = load_run(run_dir)
    step = build_step_model(mcfg, int(norm["n_features"]))
    copy_weights(model, step)
    return step, mcfg, fcfg, norm
